"""The pretrain stage through the pipeline: keys, skipping, atomic saves, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_config, write_config
from rlhf.artifacts import ArtifactStore
from rlhf.cli import main as rlhf_main
from rlhf.config import load_experiment
from rlhf.pipeline import Pipeline
from rlhf.stage import StageError
from rlhf.trainers import last_checkpoint
from stages.pretrain import PretrainStage, unigram_perplexity


def _pipeline(path, *overrides):
    return Pipeline(load_experiment(path, list(overrides)))


def _store_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "work" not in p.parts)


@pytest.fixture
def trained(tiny_yaml):
    results = _pipeline(tiny_yaml).run()
    assert [r.ran for r in results] == [True]
    return tiny_yaml, results[0].key


def test_artifact_loads_without_project_code_and_generates(trained):
    path, key = trained
    store = ArtifactStore(str(path.parent / "store"))
    art = store.local_dir(key)
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1]); m = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3\n"
        "ids = tok('The cat', return_tensors='pt')\n"
        "out = m.generate(**ids, max_new_tokens=5, do_sample=False)\n"
        "assert 'rlhf' not in sys.modules and 'stages' not in sys.modules\n"
        "print(tok.decode(out[0]))\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(art)], capture_output=True, text=True, cwd="/")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("The cat")


def test_manifest_records_lineage_and_metrics(trained):
    path, key = trained
    m = ArtifactStore(str(path.parent / "store")).manifest(key)
    for field in ("stage", "kind", "key", "inputs", "config", "data", "libraries", "code_version", "metrics",
                  "tokenizer_digest", "chat_template_digest", "special_token_ids", "created", "seed"):
        assert field in m, field
    assert m["kind"] == "causal-lm" and m["key"] == key
    assert set(m["data"]) == {"train", "eval"} and all(v.startswith("sha256:") for v in m["data"].values())
    assert {"torch", "transformers"} <= set(m["libraries"])
    metrics = m["metrics"]
    assert metrics["train_steps"] == 8 and metrics["resumed_from_step"] == 0
    assert metrics["perplexity"] < metrics["perplexity_before"]
    assert metrics["unigram_perplexity"] > 1
    ids = m["special_token_ids"]
    assert len({ids["bos"], ids["eos"], ids["pad"]}) == 3
    lines = (ArtifactStore(str(path.parent / "store")).local_dir(key) / "metrics.jsonl").read_text().splitlines()
    assert any("loss" in json.loads(line) for line in lines)


def test_second_run_trains_nothing(trained, monkeypatch):
    path, key = trained

    def boom(self):
        raise AssertionError("an up-to-date stage must not train")

    monkeypatch.setattr(PretrainStage, "setup", boom)
    results = _pipeline(path).run()
    assert [(r.ran, r.key) for r in results] == [(False, key)]


def test_keys_follow_result_fields_only(tiny_yaml):
    base = _pipeline(tiny_yaml).stages["pretrain"].key
    assert _pipeline(tiny_yaml, "stages.pretrain.logging_steps=1").stages["pretrain"].key == base
    assert _pipeline(tiny_yaml, "stages.pretrain.save_steps=1").stages["pretrain"].key == base
    assert _pipeline(tiny_yaml, "stages.pretrain.max_steps=9").stages["pretrain"].key != base
    assert _pipeline(tiny_yaml, "stages.pretrain.model.hidden_size=64").stages["pretrain"].key != base
    assert _pipeline(tiny_yaml, "seed=1").stages["pretrain"].key != base
    data = Path(load_experiment(tiny_yaml).stages["pretrain"].config.train_data)
    data.write_text(data.read_text() + '{"text": "one more document."}\n')
    assert _pipeline(tiny_yaml).stages["pretrain"].key != base


def test_plan_says_why(trained, capsys):
    path, key = trained
    assert rlhf_main(["plan", str(path)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert rlhf_main(["plan", str(path), "stages.pretrain.max_steps=9"]) == 0
    out = capsys.readouterr().out
    assert "will run" in out and "max_steps 8 -> 9" in out
    assert rlhf_main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert key in out and "[test/pretrain]" in out


def test_interrupted_save_leaves_store_unchanged(tiny_yaml, monkeypatch):
    original = PretrainStage.save

    def save_then_crash(self, out):
        original(self, out)  # a whole checkpoint is in staging ...
        raise KeyboardInterrupt  # ... and the process dies before publishing it

    monkeypatch.setattr(PretrainStage, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        _pipeline(tiny_yaml).run()
    store = tiny_yaml.parent / "store"
    assert ArtifactStore(str(store)).keys() == []
    assert not (store / "artifacts").exists() or list((store / "artifacts").iterdir()) == []
    assert list((store / "tmp").iterdir()) == []


def test_checkpoint_that_does_not_reproduce_the_model_is_refused(tiny_yaml, monkeypatch):
    original = PretrainStage.save

    def corrupt_save(self, out):
        original(self, out)
        with torch.no_grad():  # what a broken save would do: the file differs from the trained weights
            self.model.model.norm.weight.add_(1.0)

    monkeypatch.setattr(PretrainStage, "save", corrupt_save)
    with pytest.raises(StageError, match="does not reproduce the trained model"):
        _pipeline(tiny_yaml).run()
    assert ArtifactStore(str(tiny_yaml.parent / "store")).keys() == []


def test_sigkill_then_rerun_resumes_from_checkpoint(workdir, tiny_data):
    # 60 steps: the kill lands after step 10's checkpoint with ~50 steps to spare (each takes tens of ms)
    cfg = tiny_config(tiny_data, str(workdir / "store"), max_steps=60, save_steps=5)
    path = write_config(workdir / "exp.yaml", cfg)
    cmd = [str(Path(sys.executable).parent / "rlhf"), "run", str(path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = workdir / "store" / "work"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        # a complete checkpoint (what a resume may use): its trainer_state.json seen whole, not mid-write
        done = [last_checkpoint(d, "pretrain") for d in work.glob("*/checkpoints")]
        if any(c is not None and int(c.rsplit("-", 1)[1]) >= 10 for c in done):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ArtifactStore(str(workdir / "store")).keys() == []  # nothing published by the killed run

    exp = load_experiment(path)
    results = Pipeline(exp).run()
    m = results[0].metrics
    assert m["resumed_from_step"] >= 10, m
    assert m["train_steps"] == 60


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "file not found"),
        (b"", "file is empty"),
        (b'{"text": "fine"}\n{"text": "broken\n', "line 2: malformed JSON"),
        (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "line 2: not valid UTF-8"),
    ],
)
def test_bad_data_exits_nonzero_and_leaves_store_unchanged(tiny_yaml, tiny_data, content, message, capsys):
    target = tiny_data["pretrain_train"]
    if content is None:
        target.unlink()
    else:
        target.write_bytes(content)
    store = tiny_yaml.parent / "store"
    before = _store_files(store) if store.exists() else []
    assert rlhf_main(["run", str(tiny_yaml)]) == 2
    err = capsys.readouterr().err
    assert str(target) in err and message in err
    assert (_store_files(store) if store.exists() else []) == before


def test_bad_config_exits_nonzero(tiny_yaml, capsys):
    assert rlhf_main(["run", str(tiny_yaml), "stages.pretrain.max_stepz=3"]) == 2
    assert "did you mean max_steps?" in capsys.readouterr().err
    assert not (tiny_yaml.parent / "store").exists()


def test_unigram_perplexity_golden():
    # train tokens: 0,0,0,1 with vocab 3 -> add-one probabilities (3+1)/7, (1+1)/7, (0+1)/7
    # eval blocks [[2, 0], [2, 1]]: predicted tokens 0 and 1 -> ppl = exp(-(ln 4/7 + ln 2/7) / 2) = 7 / sqrt(8)
    got = unigram_perplexity([[0, 0], [0, 1]], [[2, 0], [2, 1]], 3)
    assert got == pytest.approx(7 / 8**0.5, rel=1e-12)


def test_cli_help_lists_commands_and_imports_no_torch():
    out = subprocess.run([str(Path(sys.executable).parent / "rlhf"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and all(c in out.stdout for c in ("run", "plan", "status"))
    assert "torch" not in subprocess.run(
        [sys.executable, "-c", "import sys, rlhf.cli, rlhf.config, rlhf.artifacts; print(' '.join(sys.modules))"],
        capture_output=True, text=True, cwd=REPO,
    ).stdout.split()


def test_force_reruns_and_replaces_the_artifact(trained):
    """`--force` is how a user reruns a stage after changing its code: the new artifact must win, not the
    old one with the same key (which a plain second publish keeps)."""
    path, key = trained
    store = ArtifactStore(str(path.parent / "store"))
    weights = store.local_dir(key) / "model.safetensors"
    weights.write_bytes(b"stale")  # mark the old artifact so its survival shows
    results = _pipeline(path).run(force=["pretrain"])
    assert [(r.ran, r.key) for r in results] == [(True, key)]
    assert weights.read_bytes() != b"stale"
    assert _pipeline(path).plan()[0].will_run is False
