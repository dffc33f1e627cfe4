"""A process SIGKILLed inside a checkpoint write resumes to the same weights as a run never killed.

The kill comes from `killer.py` (written by the tests into their directory): it runs `rlhf` with
safetensors' `save_file` wrapped so that the process kills itself right after the n-th
`model.safetensors` is written, optionally cutting that file in half first (a kill during the write).
Nothing in the project knows about it. The first model file of a checkpoint is the point where an
in-place save holds the new weights beside the old optimizer, step counter and KL controller.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import small_rl_run
from rlhf.checkpoints import COMPLETE, CheckpointDir, write_aside, write_atomic
from rlhf.config import load_experiment
from rlhf.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[1]

KILLER = '''
import os, signal, sys
from pathlib import Path

import safetensors.torch

kill_at, mode, marker = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
original, written = safetensors.torch.save_file, 0


def save_file(tensors, filename, *args, **kwargs):
    global written
    original(tensors, filename, *args, **kwargs)
    if Path(filename).name != "model.safetensors":
        return
    written += 1
    if written == kill_at:
        if mode == "truncated":  # as if killed half-way through writing the file
            os.truncate(filename, os.path.getsize(filename) // 2)
        marker.write_text(str(Path(filename).resolve()))
        os.kill(os.getpid(), signal.SIGKILL)


safetensors.torch.save_file = save_file  # before accelerate and transformers import it by name
from rlhf.cli import main

sys.exit(main(sys.argv[4:]))
'''


def run_killed(exp: Path, kill_at: int, mode: str, *args: str) -> Path:
    """Run `rlhf run exp *args` in a fresh process that SIGKILLs itself at the `kill_at`-th model file;
    return the path of the file it was writing."""
    killer = exp.parent / "killer.py"
    killer.write_text(KILLER)
    marker, log = exp.parent / "killed_at.txt", exp.parent / "killed.log"
    marker.unlink(missing_ok=True)
    paths = [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")]  # this checkout's code; conftest judges
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, str(killer), str(kill_at), mode, str(marker), "run", str(exp), *args],
                              cwd=exp.parent, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=300)
    tail = log.read_text()[-3000:]
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}, not killed:\n{tail}"
    return Path(marker.read_text())


def run_stage(exp: Path, stage: str, *overrides: str):
    """Run the experiment up to `stage` in this process; return (store, result, the artifact's weights)."""
    from transformers import AutoModelForCausalLM

    pipe = Pipeline(load_experiment(exp, list(overrides)))
    result = {r.name: r for r in pipe.run(until=stage)}[stage]
    weights = AutoModelForCausalLM.from_pretrained(pipe.store.local_dir(result.key)).state_dict()
    return pipe.store, result, weights


def assert_same_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=0, atol=1e-6), f"{k}: max diff {(got[k] - want[k]).abs().max()}"


# ---- PPO: our own loop on Accelerate --------------------------------------------------------------

PPO_RUN = ["stages.ppo.num_steps=4", "stages.ppo.save_every=1"]


def forget(exp: Path, key: str) -> None:
    """Remove the artifact `key` and its training state, so that the same key trains again from scratch."""
    for part in ("artifacts", "work"):
        shutil.rmtree(exp.parent / "store" / part / key, ignore_errors=True)


@pytest.fixture(scope="module")
def ppo_uninterrupted(ppo_upstream):
    """(key, weights) of the 4-step PPO run never killed."""
    _, result, weights = run_stage(ppo_upstream, "ppo", *PPO_RUN)
    return result.key, weights


@pytest.mark.parametrize("mode", ["written", "truncated"])
def test_ppo_killed_inside_a_checkpoint_write_resumes_to_the_same_weights(ppo_upstream, ppo_uninterrupted, mode):
    key, uninterrupted = ppo_uninterrupted
    forget(ppo_upstream, key)
    # Saves come after steps 1, 2, 3, 4; each writes the policy (model.safetensors) first.
    killed_in = run_killed(ppo_upstream, 3, mode, *PPO_RUN)
    work = ppo_upstream.parent / "store" / "work" / key
    assert work in killed_in.parents  # inside the step-3 checkpoint, not the artifact
    assert not (ppo_upstream.parent / "store" / "artifacts" / key).exists()

    _, resumed, weights = run_stage(ppo_upstream, "ppo", *PPO_RUN)
    assert resumed.key == key and resumed.metrics["resumed_from_step"] == 2
    assert_same_weights(weights, uninterrupted)
    assert not work.exists()  # training state is dropped once the artifact is published


def test_grpo_killed_inside_a_checkpoint_write_resumes_to_the_same_weights(ppo_upstream):
    """The critic-free path of the same loop (groups, no value model, the KL in the loss, a reward
    function beside the reward model): a kill in the step-3 save resumes from step 2 to the same weights."""
    prompts = load_experiment(ppo_upstream).stages["ppo"].config.prompts
    run = small_rl_run("grpo", prompts, num_steps=4, save_every=1, rewards="{reward: 1.0, conftest:length_judge: 0.1}")
    _, result, uninterrupted = run_stage(ppo_upstream, "grpo", *run)
    forget(ppo_upstream, result.key)
    killed_in = run_killed(ppo_upstream, 3, "written", "--until", "grpo", *run)
    assert ppo_upstream.parent / "store" / "work" / result.key in killed_in.parents
    _, resumed, weights = run_stage(ppo_upstream, "grpo", *run)
    assert resumed.key == result.key and resumed.metrics["resumed_from_step"] == 2
    assert_same_weights(weights, uninterrupted)


def test_grpo_one_step_off_policy_killed_resumes_to_the_same_weights_without_losing_the_rollout_ahead(ppo_upstream):
    """With max_staleness 1 each checkpoint holds the next step's rollout, sampled with the weights one update
    old: a resumed run takes it instead of sampling it again (with newer weights), so it ends where the run
    never killed ends."""
    prompts = load_experiment(ppo_upstream).stages["ppo"].config.prompts
    run = small_rl_run("grpo", prompts, num_steps=4, save_every=1, no_eos_score="null", max_staleness=1,
                       rewards="{reward: 1.0, conftest:length_judge: 0.1}")
    _, result, uninterrupted = run_stage(ppo_upstream, "grpo", *run)
    forget(ppo_upstream, result.key)
    killed_in = run_killed(ppo_upstream, 3, "written", "--until", "grpo", *run)
    work = ppo_upstream.parent / "store" / "work" / result.key
    assert work in killed_in.parents
    assert (CheckpointDir(work / "checkpoints").latest() / "rollouts.pt").exists()  # step 3's, sampled ahead
    _, resumed, weights = run_stage(ppo_upstream, "grpo", *run)
    assert resumed.key == result.key and resumed.metrics["resumed_from_step"] == 2
    assert_same_weights(weights, uninterrupted)


# ---- a Trainer-based stage: SFT through trl.SFTTrainer --------------------------------------------

SFT_RUN = ["stages.sft.max_steps=9", "stages.sft.save_steps=3"]


def test_sft_killed_inside_a_checkpoint_write_resumes_to_the_same_weights(ppo_upstream):
    _, result, uninterrupted = run_stage(ppo_upstream, "sft", *SFT_RUN)
    forget(ppo_upstream, result.key)

    # Checkpoints at steps 3, 6, 9: killed after writing checkpoint-6's model, before its trainer state.
    killed_in = run_killed(ppo_upstream, 2, "written", "--until", "sft", *SFT_RUN)
    assert killed_in.parent.name == "checkpoint-6"

    _, resumed, weights = run_stage(ppo_upstream, "sft", *SFT_RUN)
    assert resumed.key == result.key and resumed.metrics["resumed_from_step"] == 3
    assert_same_weights(weights, uninterrupted)


# ---- the checkpoint directory itself --------------------------------------------------------------

def fill(value: int):
    def write(path: Path) -> None:
        (path / "state.json").write_text(json.dumps({"value": value}))
    return write


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    ckpts = CheckpointDir(tmp_path / "ckpt")
    assert ckpts.latest() is None
    ckpts.save(1, fill(1))

    def dies_half_way(path: Path) -> None:
        (path / "state.json").write_text('{"val')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpts.save(2, dies_half_way)
    assert json.loads((ckpts.latest() / "state.json").read_text()) == {"value": 1}


def test_only_the_newest_complete_checkpoint_is_kept_and_leftovers_go(tmp_path):
    ckpts = CheckpointDir(tmp_path / "ckpt")
    ckpts.save(1, fill(1))
    (tmp_path / "ckpt" / "partial-00000002").mkdir()  # a killed write
    (tmp_path / "ckpt" / "step-00000009").mkdir()  # never marked complete: not a checkpoint
    assert ckpts.latest().name == "step-00000001"
    ckpts.save(2, fill(2))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000002"]
    assert json.loads((ckpts.latest() / COMPLETE).read_text()) == {"step": 2}


def test_keep_two(tmp_path):
    ckpts = CheckpointDir(tmp_path / "ckpt", keep=2)
    for step in (1, 2, 3):
        ckpts.save(step, fill(step))
    assert [s for s, _ in ckpts.complete()] == [2, 3]


def test_write_atomic_and_write_aside_leave_nothing_half_written(tmp_path):
    target = tmp_path / "baseline.json"
    write_atomic(target, "old")
    write_atomic(target, "new")
    assert target.read_text() == "new"
    dest = tmp_path / "tokenizer"
    with pytest.raises(KeyboardInterrupt), write_aside(dest) as tmp:
        (tmp / "vocab.json").write_text("{")
        raise KeyboardInterrupt
    assert not dest.exists()
    with write_aside(dest) as tmp:
        (tmp / "vocab.json").write_text("{}")
    assert (dest / "vocab.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baseline.json", "tokenizer"]
