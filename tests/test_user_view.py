"""What a user sees: the report and its plots, chat, generate."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DPO_BLOCK, ppo_config, seeded_store, write_config
from rlhf.cli import main as rlhf_main
from rlhf.config import load_experiment
from rlhf.pipeline import Pipeline


@pytest.fixture(scope="module")
def finished(shared_data, upstream_store, tmp_path_factory):
    """The whole tiny experiment, run once for this module (on a copy of the upstream artifacts)."""
    root = tmp_path_factory.mktemp("pipeline")
    cfg = ppo_config(shared_data, str(seeded_store(upstream_store, root)), eval_every=1)
    # a second policy stage under a name no module knows: the report and status show it through its class
    cfg["stages"]["ppo_short"] = {**cfg["stages"]["ppo"], "class": "stages.ppo:PPOStage", "num_steps": 1}
    cfg["stages"]["dpo"] = dict(DPO_BLOCK)  # a third policy, trained by another method on the same pairs
    path = write_config(root / "exp.yaml", cfg)
    Pipeline(load_experiment(path)).run()
    return root, path


def test_ppo_evaluates_every_step_but_the_last_whose_evaluation_is_the_manifests(finished):
    # eval_every=1 over ppo's 2 steps (ppo_short's 1): the periodic evaluations stop before the last step,
    # whose evaluation is the manifest's final one (the same seed would draw the same responses twice)
    root, path = finished
    pipe = Pipeline(load_experiment(path))
    keys = {p.name: p.key for p in pipe.plan()}
    for name, logged in (("ppo", [1]), ("ppo_short", [])):
        rows = [json.loads(line) for line in
                (pipe.store.local_dir(keys[name]) / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "eval/gold" in r] == logged, name
        manifest = pipe.store.manifest(keys[name])["metrics"]
        assert manifest["train_steps"] == len(logged) + 1 and "gold_gain" in manifest and "greedy_task" in manifest


def test_report_writes_every_plot_it_names(finished, capsys):
    root, path = finished
    out = root / "report"
    assert rlhf_main(["report", str(path), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    named = [line.split("(")[1].rstrip(")") for line in md.splitlines() if line.startswith("![")]
    assert set(named) == {"losses.png", "reward_accuracy.png", "ppo_training.png", "ppo_overoptimisation.png",
                          "ppo_short_training.png", "ppo_short_overoptimisation.png", "dpo_training.png",
                          "dpo_overoptimisation.png", "frontier.png"}
    for name in named:
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, name
    for heading in ("## Stages", "## Training losses", "## sft", "## preferences", "## reward", "## ppo",
                    "## ppo_short", "## dpo", "## Comparison of the alignment methods"):
        assert heading in md
    # the comparison: one row per policy stage against its reference, in a table per decoding
    comparison = md.split("## Comparison of the alignment methods")[1]
    assert all(comparison.count(f"| {name} | ") == 2 for name in ("ppo", "ppo_short", "dpo"))  # sampled, greedy
    # every policy's shared evaluation: task success and diversity beside the judges, sampled and greedy
    for row in ("| task success | sampled |", "| task success | greedy |", "| unique responses (share) | greedy |",
                "| gold judge | sampled |", "| KL to reference"):
        assert row in md
    assert "Missing stages" not in md
    # PPO and DPO each against the same reference on the same prompts: the same comparison table
    sections = {part.split("\n", 1)[0]: part for part in md.split("\n## ")[1:]}
    for name in ("ppo", "dpo"):
        section = sections[name]
        assert f"| metric | decoding | reference | {name} | gain (95% CI) |" in section
        assert "| gold judge | sampled |" in section and "| KL to reference (nats per response) | sampled |" in section
        assert f"| prompt | reference, greedy | {name}, greedy |" in section
    assert "held-out onpolicy pairs: the implicit reward prefers the chosen response" in sections["dpo"]
    assert "| split | human | onpolicy | all |" in sections["preferences"]


def test_status_shows_each_stage_headline_from_its_class(finished, capsys):
    root, path = finished
    assert rlhf_main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[test/ppo_short]" in out and "task success" in out and "perplexity" in out and "accuracy" in out


def test_report_names_missing_stages(workdir, tiny_data, capsys):
    cfg = ppo_config(tiny_data, str(workdir / "store"))
    path = write_config(workdir / "exp.yaml", cfg)
    Pipeline(load_experiment(path)).run(until="sft")
    assert rlhf_main(["report", str(path), "--out", str(workdir / "r")]) == 0
    out = capsys.readouterr().out
    assert "stages not run yet for test: preferences, reward, ppo" in out
    assert "**Missing stages:** preferences, reward, ppo" in (workdir / "r" / "report.md").read_text()


def test_report_on_an_empty_store_says_so(workdir, tiny_data, capsys):
    path = write_config(workdir / "exp.yaml", ppo_config(tiny_data, str(workdir / "empty")))
    assert rlhf_main(["report", str(path)]) == 1
    assert "has no artifacts" in capsys.readouterr().err


class Writer(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


def test_chat_answers_streams_resets_and_quits(finished):
    from rlhf.chat import chat_loop, resolve_model
    from rlhf.models import load_causal_lm

    root, path = finished
    model, tok = load_causal_lm(resolve_model("ppo", str(path)))
    lines = iter(["Use the word \"sky\" in a sentence.", "/reset", "again", "/quit", "never read"])
    out = Writer()
    turns = chat_loop(model, tok, read=lambda prompt: next(lines), out=out, max_new_tokens=6, temperature=0.0)
    assert turns == 2
    text = out.getvalue()
    assert text.count("model> ") == 2 and "(history cleared)" in text
    start = out.writes.index("model> ")
    end = next(i for i in range(start + 1, len(out.writes)) if out.writes[i].endswith("\n"))
    assert end - start >= 2  # the reply arrived in pieces as it was generated, not at once

    def eof(prompt):
        raise EOFError

    assert chat_loop(model, tok, read=eof, out=Writer()) == 0  # end of input exits cleanly


def test_chat_command_over_stdin_and_generate(finished, shared_data):
    root, path = finished
    rlhf = str(Path(sys.executable).parent / "rlhf")
    run = subprocess.run([rlhf, "chat", "ppo", "--config", str(path), "--max-new-tokens", "4"],
                         input="hello\n/quit\n", capture_output=True, text=True, cwd=root, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "model> " in run.stdout and "/reset" in run.stdout
    out = root / "answers.jsonl"
    run = subprocess.run([rlhf, "generate", "test/ppo", "--config", str(path), "--prompts",
                          str(shared_data["prompts"]), "--out", str(out), "--max-new-tokens", "4"],
                         capture_output=True, text=True, cwd=root, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 40 and {"prompt", "response", "ended"} <= set(rows[0])
    bad = subprocess.run([rlhf, "chat", "nope", "--config", str(path)], capture_output=True, text=True, cwd=root)
    assert bad.returncode == 2 and "'nope' is not a stage" in bad.stderr


def test_chat_and_generate_take_any_policy_stage_and_refuse_other_kinds(finished, shared_data, monkeypatch, capsys):
    root, path = finished
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/quit\n"))
    assert rlhf_main(["chat", "dpo", "--config", str(path), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.count("you> ") == 2  # answered "hello", then read /quit
    out = root / "dpo_answers.jsonl"
    assert rlhf_main(["generate", "dpo", "--config", str(path), "--prompts", str(shared_data["prompts"]),
                      "--out", str(out), "--max-new-tokens", "4"]) == 0
    assert len(out.read_text().splitlines()) == 40
    for stage, kind in (("preferences", "preferences"), ("reward", "reward-model")):
        with pytest.raises(SystemExit) as exit_:
            rlhf_main(["chat", stage, "--config", str(path)])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"stage '{stage}'" in err and f"is a {kind} artifact, not a policy" in err
        assert "(sft, ppo, ppo_short, dpo in " in err


def test_label_writes_preferences_and_resumes(tmp_path):
    from rlhf.data import load_rows
    from rlhf.label import label, load_candidates

    cands = tmp_path / "cands.jsonl"
    cands.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "p1", "responses": ["a sunny day", "a dull day"]},
        {"prompt": "p2", "responses": ["same", "same"]},  # nothing to choose between: not asked
        {"prompt": "p3", "responses": ["x", "y", "z"]},
        {"prompt": "p4", "responses": ["good", "bad"]},
    ]) + "\n")
    rows = load_candidates(str(cands))
    assert [r["prompt"] for r in rows] == ["p1", "p3", "p4"]
    out = tmp_path / "prefs.jsonl"
    answers = iter(["2", "?", "s", "q"])  # p1: second; p3: a typo, then skip; then quit before p4
    counts = label(rows, str(out), read=lambda _: next(answers), out=io.StringIO())
    assert counts == {"labelled": 1, "skipped": 1, "already": 0}
    assert load_rows(str(out), "preferences").to_list() == [{"prompt": "p1", "chosen": "a dull day", "rejected": "a sunny day"}]
    answers = iter(["1", "1"])  # a later session: p1 is done; p3 and p4 are asked
    counts = label(rows, str(out), read=lambda _: next(answers), out=io.StringIO())
    assert counts == {"labelled": 2, "skipped": 0, "already": 1}
    assert [r["chosen"] for r in load_rows(str(out), "preferences")] == ["a dull day", "x", "good"]


def test_candidates_and_labelling_through_the_cli(finished, shared_data):
    """The README's human-feedback path as a user types it: `rlhf generate --samples 2`, then `rlhf label`,
    and the preference file loads as the reward stage's training data."""
    from rlhf.data import load_rows
    from rlhf.label import load_candidates

    root, path = finished
    rlhf = str(Path(sys.executable).parent / "rlhf")
    cands = root / "cands.jsonl"
    run = subprocess.run([rlhf, "generate", "sft", "--config", str(path), "--samples", "2", "--temperature", "1.0",
                          "--prompts", str(shared_data["prompts"]), "--out", str(cands),
                          "--max-new-tokens", "6"], capture_output=True, text=True, cwd=root, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in cands.read_text().splitlines()]
    assert len(rows) == 40 and all(len(r["responses"]) == 2 for r in rows)
    prefs = root / "prefs.jsonl"
    run = subprocess.run([rlhf, "label", str(cands), "--out", str(prefs)], input="1\n2\nq\n",
                         capture_output=True, text=True, cwd=root, timeout=60)
    assert run.returncode == 0, run.stderr
    labelled = load_rows(str(prefs), "preferences")
    assert len(labelled["prompt"]) == 2  # two answers, then quit
    asked = load_candidates(str(cands))[:2]  # the pairs label shows: identical responses are not asked
    assert labelled["chosen"] == [asked[0]["a"], asked[1]["b"]] and labelled["rejected"] == [asked[0]["b"], asked[1]["a"]]
