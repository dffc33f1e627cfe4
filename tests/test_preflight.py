"""Cheap checks before anything trains: `rlhf plan` and `rlhf run` refuse a bad setting within seconds, with
exit status 2 and a message naming the file or key, and leave the store and runs/ as they were."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import REPO, ppo_config, write_config, write_jsonl
from rlhf.cli import main as rlhf_main
from rlhf.config import load_experiment
from rlhf.errors import DataError, StageError
from rlhf.pipeline import Pipeline
from stages.sft import SFTStage


# ---- what a researcher or a user might name in YAML ----------------------------------------------------


def one_score(prompts, responses):
    return [0.0]


def nan_score(prompts, responses):
    return [0.0, float("nan")] * (len(responses) // 2) + [0.0] * (len(responses) % 2)


class RefusingSFT(SFTStage):
    """A researcher's stage with a precondition of its own."""

    def check(self) -> None:
        super().check()
        raise StageError(f"{self.where('max_steps')}: this stage needs a GPU; run it with --launch")


# ---- bad inputs ---------------------------------------------------------------------------------------------


def _bad_row(paths):
    write_jsonl(paths["sft_train"], [{"prompt": "p", "response": "r"}] * 2 + [{"prompt": "p", "response": " "}])
    return str(paths["sft_train"]), fr'stages\.sft\.train_data: {paths["sft_train"]} line 3: "response" is empty'


def _store_file(paths):
    (paths["root"] / "store").write_text("not a directory\n")
    return "", fr"store: {paths['root'] / 'store'} is a file, not a directory"


def _lr_in_file(paths):
    cfg = paths["cfg"]
    cfg["stages"]["sft"]["learning_rate"] = -1
    write_config(paths["yaml"], cfg)
    return "", fr"{paths['yaml'].resolve()}: stages\.sft\.learning_rate: -1\.0 must be > 0"


BAD = {
    "temperature": (["stages.ppo.temperature=0"], r"command-line override: stages\.ppo\.temperature: 0\.0 must be > 0"),
    "learning_rate": (_lr_in_file, None),
    "judge name": (["evaluation.judges.gold=word_vadr"],
                   r"evaluation\.judges\.gold: unknown judge 'word_vadr'.*did you mean 'word_vader'"),
    "judge import": (["stages.preferences.judge=no_such_module_q7:judge"],
                     r"stages\.preferences\.judge: judge 'no_such_module_q7:judge': cannot import module"),
    "judge count": ([f"evaluation.judges.heldout={__name__}:one_score"],
                    r"evaluation\.judges\.heldout: judge '.*one_score' returned 1 scores for 2 responses"),
    "judge nan": ([f"stages.preferences.judge={__name__}:nan_score"],
                  r"stages\.preferences\.judge: judge '.*nan_score' scored row 1 .* as nan"),
    "reward function": ([f"stages.ppo.rewards={{{__name__}:nan_score: 1.0}}"],
                        r"stages\.ppo\.rewards: judge '.*nan_score' scored row 1 .* as nan"),
    "store file": (_store_file, None),
    "data row": (_bad_row, None),
    "model path": (["stages.sft.model=./models/not-there"],
                   r"stages\.sft\.model: \./models/not-there does not exist"),
    "stage name": (["stages.ppo.rewards={reward: 1.0, rewrd: 1.0}"],
                   r"stages\.ppo\.rewards\.rewrd: rewrd is not a stage of this experiment; did you mean reward\?"),
    "stage check": ([f"stages.sft.class={__name__}:RefusingSFT"], r"stages\.sft\.max_steps: this stage needs a GPU"),
}


@pytest.fixture
def experiment(workdir, tiny_data):
    """The four-stage tiny experiment, nothing built; store and runs/ under the working directory."""
    cfg = ppo_config(tiny_data, str(workdir / "store"))
    path = write_config(workdir / "exp.yaml", cfg)
    return {**tiny_data, "root": workdir, "cfg": cfg, "yaml": path}


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if "data" not in p.relative_to(root).parts)


@pytest.mark.parametrize("command", ["plan", "run"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_fast_naming_the_key_and_writes_nothing(experiment, capsys, command, case):
    setting, pattern = BAD[case]
    overrides = setting if isinstance(setting, list) else []
    if callable(setting):
        _, pattern = setting(experiment)
    before = _tree(experiment["root"])
    code = rlhf_main([command, str(experiment["yaml"]), *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert re.search(pattern, err), err
    assert _tree(experiment["root"]) == before  # no store, no runs/<experiment>/<stage>-<key>/
    assert not (experiment["root"] / "runs").exists()


def test_a_hub_id_missing_from_the_cache_is_refused_when_offline(experiment, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert rlhf_main(["plan", str(experiment["yaml"]), "stages.sft.model=nobody-q7/no-such-model"]) == 2
    assert re.search(r"stages\.sft\.model: nobody-q7/no-such-model is not in the local hub cache and HF_HUB_OFFLINE "
                     r"is set", capsys.readouterr().err)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online, a hub id is taken as given (fetched when its stage runs)
    assert rlhf_main(["plan", str(experiment["yaml"]), "stages.sft.model=nobody-q7/no-such-model"]) == 0


def test_problems_of_several_stages_are_listed_together(experiment, capsys):
    write_jsonl(experiment["prompts"], [{"prompt": "p"}, {"promt": "typo"}])
    assert rlhf_main(["plan", str(experiment["yaml"]), f"stages.preferences.judge={__name__}:one_score"]) == 2
    err = capsys.readouterr().err
    assert "problems:" in err and "stages.preferences.prompts" in err and "evaluation.prompts" in err
    assert "line 2: missing field(s)" in err and "returned 1 scores" not in err  # judged only on parsed prompts


def test_only_stages_that_will_run_are_checked(experiment, capsys):
    # the PPO stage is not selected: its bad prompts file does not stop the run of SFT's inputs
    write_jsonl(experiment["root"] / "data" / "ppo_prompts.jsonl", [{"text": "no prompt"}])
    overrides = [f"stages.ppo.prompts={experiment['root'] / 'data' / 'ppo_prompts.jsonl'}"]
    assert rlhf_main(["plan", str(experiment["yaml"]), "--until", "reward", *overrides]) == 0
    assert rlhf_main(["plan", str(experiment["yaml"]), *overrides]) == 2
    assert "stages.ppo.prompts" in capsys.readouterr().err


def test_a_failing_stage_leaves_no_empty_run_directory(experiment, monkeypatch, capsys):
    from stages.pretrain import PretrainStage

    def setup(self):
        raise StageError("pretrain: failed in setup")

    monkeypatch.setattr(PretrainStage, "setup", setup)
    assert rlhf_main(["run", str(experiment["yaml"]), "--until", "pretrain"]) == 2
    assert "failed in setup" in capsys.readouterr().err
    assert not (experiment["root"] / "runs").exists()
    assert not (experiment["root"] / "store" / "work").exists()


def test_data_checked_once_is_remembered_by_content(experiment, monkeypatch, tmp_path):
    import rlhf.data

    monkeypatch.setenv("RLHF_CACHE", str(tmp_path / "cache"))
    pipe = Pipeline(load_experiment(experiment["yaml"]))
    pipe.check()
    parsed = []
    original = rlhf.data.read_local
    monkeypatch.setattr(rlhf.data, "read_local", lambda path, schema: parsed.append(path) or original(path, schema))
    pipe.check()
    assert all(p == experiment["prompts"] for p in parsed), parsed  # only to sample two prompts for the judges
    write_jsonl(experiment["sft_train"], [{"prompt": "p", "response": ""}])  # new content: parsed again
    with pytest.raises(DataError, match=r"stages\.sft\.train_data: .* \"response\" is empty"):
        Pipeline(load_experiment(experiment["yaml"])).check()


def test_default_experiment_plan_checks_the_real_data(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(REPO)
    store = f"store={tmp_path / 'store'}"
    assert rlhf_main(["plan", "configs/tiny.yaml", store]) == 0
    assert rlhf_main(["plan", "configs/tiny.yaml", store, "stages.ppo.temperature=0"]) == 2
    assert "stages.ppo.temperature: 0.0 must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()
