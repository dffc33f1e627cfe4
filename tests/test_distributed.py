"""Two CPU processes (gloo, configs/accelerate/cpu-ddp.yaml) against one, at the same global batch.

The two-process run goes through `rlhf run --launch`, the path users take. SFT and reward use a per-process
batch of 4 (global 8) against the one-process batch of 8; PPO's global rollout batch is the same 8
prompts either way.

Tolerance: 1e-5 on every weight. With the same global batch the only difference is float summation
order (two half-batch gradients averaged by the all-reduce instead of one full-batch sum), about 1e-7
relative; measured: SFT 7e-9, reward 2e-7, PPO update 7e-9. Getting the global batch wrong (e.g. 8 per
process = 16 in all, or per-rank advantage whitening) moves weights by the order of one Adam step, the
learning rate (3e-4 .. 1e-3), 30 to 100 times the tolerance.

PPO samples, so a two-process rollout cannot repeat the one-process samples token for token; its
comparison is on one update of a fixed rollout batch (tests/helpers/ppo_update_step.py), which covers
everything distributed in the PPO loop: sharded rows, global whitening, the token-weighted accumulation
with the global token count, and the gradient average across ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, make_tiny_data, ppo_config, write_config
from rlhf.config import load_experiment
from rlhf.distributed import launch_command
from rlhf.pipeline import Pipeline
from rlhf.ppo.rollout import Trajectory

sys.path.insert(0, str(REPO / "tests" / "helpers"))  # ppo_update_step: the update both runs make

LAUNCH = REPO / "configs" / "accelerate" / "cpu-ddp.yaml"
TOLERANCE = 1e-5
PER_PROCESS = ["stages.sft.batch_size=4", "stages.reward.batch_size=4"]  # x 2 processes = the default 8
# One minibatch so both runs update on the same set of rows; two micro-batches so accumulation runs
# across ranks; reward whitening so both whitenings are global.
PPO_UPDATE = ["stages.ppo.num_minibatches=1", "stages.ppo.gradient_accumulation_steps=2",
              "stages.ppo.ppo_epochs=2", "stages.ppo.whiten_rewards=true"]


def launch(program: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd, env = launch_command(LAUNCH, program)
    # the test judge (conftest:length_judge) and the helper stages import from tests/
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO / "tests" / "helpers"), env.get("PYTHONPATH", "")])
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def rlhf_launch(path: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`rlhf run PATH ARGS --launch cpu-ddp.yaml`, as a user (or `make ... LAUNCH=`) runs it."""
    cmd = [sys.executable, "-m", "rlhf.cli", "run", str(path), *args, "--launch", str(LAUNCH)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO / "tests" / "helpers")])}
    return subprocess.run(cmd, cwd=path.parent, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    """The tiny four-stage experiment with its pretrain artifact, the common start of both runs."""
    root = tmp_path_factory.mktemp("distributed")
    path = write_config(root / "exp.yaml", ppo_config(make_tiny_data(root), str(root / "store")))
    Pipeline(load_experiment(path)).run(until="pretrain")
    return path


@pytest.fixture(scope="module")
def two_processes(experiment):
    """SFT, reward and PPO in two processes through `rlhf run --launch`; the pipeline that names their keys."""
    done = rlhf_launch(experiment, *PER_PROCESS)
    assert done.returncode == 0, done.stderr[-4000:]
    return Pipeline(load_experiment(experiment, PER_PROCESS))


@pytest.fixture(scope="module")
def one_process(experiment):
    pipe = Pipeline(load_experiment(experiment))
    pipe.run(until="reward")
    return pipe


def _max_difference(store, key_a: str, key_b: str, auto_class) -> float:
    a = auto_class.from_pretrained(store.local_dir(key_a)).state_dict()
    b = auto_class.from_pretrained(store.local_dir(key_b)).state_dict()
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_two_processes_match_one_at_the_same_global_batch(two_processes, one_process, stage):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if stage == "sft" else AutoModelForSequenceClassification
    two, one = two_processes.stages[stage], one_process.stages[stage]
    assert two.key != one.key  # different per-process batch sizes: two artifacts side by side
    diff = _max_difference(one_process.store, one.key, two.key, auto)
    assert diff < TOLERANCE, f"{stage}: max |w_2proc - w_1proc| = {diff:.3g}"
    m1, m2 = one_process.store.manifest(one.key)["metrics"], one_process.store.manifest(two.key)["metrics"]
    assert m2["train_steps"] == m1["train_steps"]
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], rel=1e-5)


def test_two_process_ppo_writes_once_from_the_main_process(two_processes):
    ppo = two_processes.stages["ppo"]
    store = two_processes.store
    manifest = store.manifest(ppo.key)
    assert manifest["metrics"]["train_steps"] == ppo.config.num_steps
    assert store.alias("test", "ppo") == ppo.key
    # one metrics row per step (the main process logs reduced statistics; the other rank logs nothing)
    rows = [json.loads(line) for line in (store.local_dir(ppo.key) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, ppo.config.num_steps + 1))
    assert all(r["env/response_length"] > 0 for r in rows)
    assert not store.work_dir(ppo.key).exists() or not any(store.work_dir(ppo.key).iterdir())


def test_ppo_update_in_two_processes_matches_one(two_processes, tmp_path):
    from ppo_update_step import build_stage, update

    config = two_processes.experiment.source
    out = tmp_path / "update"
    overrides = [*PER_PROCESS, *PPO_UPDATE]  # starts from the two-process SFT and reward artifacts
    done = launch([str(REPO / "tests" / "helpers" / "ppo_update_step.py"), config, str(out), *overrides],
                  cwd=Path(config).parent)
    assert done.returncode == 0, done.stderr[-4000:]
    # the same update in this process on the whole batch the two ranks split
    stage = build_stage(config, overrides)
    before = {**{f"policy.{k}": v.clone() for k, v in stage.policy.state_dict().items()},
              **{f"value.{k}": v.clone() for k, v in stage.value_model.state_dict().items()}}
    traj = Trajectory(*torch.load(out / "traj.pt"))
    assert traj.response_mask[:4].sum() != traj.response_mask[4:].sum()  # ranks held different token counts
    one = update(stage, traj)
    two = torch.load(out / "after.pt")
    assert one.keys() == two.keys()
    moved = max((one[k] - before[k]).abs().max().item() for k in one)
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    assert moved > 30 * TOLERANCE  # the update really moved the weights (SGD, so by lr x the gradient)
    assert diff < TOLERANCE, f"max |w_2proc - w_1proc| = {diff:.3g} after an update that moved weights by {moved:.3g}"


def test_a_failing_rank_stops_the_others_with_its_error(experiment):
    done = rlhf_launch(experiment, "--until", "sft", "--force", "sft", "stages.sft.class=failing_stage:FailsOnRankOne",
                       "stages.sft.max_steps=3", timeout=300)
    assert done.returncode != 0
    assert "error: rank 1: sft: deliberate failure on this rank" in done.stderr
    failed = Pipeline(load_experiment(experiment, ["stages.sft.class=failing_stage:FailsOnRankOne",
                                                   "stages.sft.max_steps=3"])).stages["sft"]
    assert not failed.store.exists(failed.key)  # rank 0 was stopped before it could publish


@pytest.mark.parametrize("name", ["single", "ddp", "zero2", "zero3", "fsdp", "cpu-ddp"])
def test_every_launch_config_loads_and_builds_the_launch_command(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = REPO / "configs" / "accelerate" / f"{name}.yaml"
    cfg = load_config_from_file(str(path))  # Accelerate's own validation of the file
    cmd, env = launch_command(path, ["-m", "rlhf.cli", "run", "configs/tiny.yaml"])
    assert cmd[1:5] == ["-m", "accelerate.commands.launch", "--config_file", str(path)]
    assert cmd[-4:] == ["-m", "rlhf.cli", "run", "configs/tiny.yaml"]
    # one-machine CPU processes go through torchrun's launcher, each told to stay on the CPU (gloo)
    assert ("--multi_gpu" in cmd) == (name == "cpu-ddp")
    assert (env.get("ACCELERATE_USE_CPU") == "true") == (name == "cpu-ddp")
    assert cfg.num_processes == (2 if name == "cpu-ddp" else 1 if name == "single" else 8)


def test_saved_weights_are_checked_against_the_gathered_state(tmp_path):
    # What ZeRO-3 and FSDP runs verify instead of running the model (each rank holds only a shard).
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from rlhf.models import verify_saved_weights
    from rlhf.stage import StageError

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, tie_word_embeddings=True))
    model.save_pretrained(tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    verify_saved_weights(tmp_path, AutoModelForCausalLM, state)
    state["model.norm.weight"][0] += 1e-3
    with pytest.raises(StageError, match="does not hold the trained weights"):
        verify_saved_weights(tmp_path, AutoModelForCausalLM, state)


def test_ppo_in_bf16_autocast_publishes_a_checkpoint_that_reloads(one_process):
    # The GPU configs train in bf16; on CPU Accelerate's autocast runs the same code path. The reload check
    # must compare the saved fp32 weights with the full-precision forward, not the autocast one.
    config = Path(one_process.experiment.source)
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16", "PYTHONPATH": str(REPO / "tests")}
    overrides = ["stages.ppo.num_steps=1", "stages.ppo.kl_coef=0.06"]  # a key of its own
    done = subprocess.run([sys.executable, "-m", "rlhf.cli", "run", str(config), *overrides], cwd=config.parent,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ppo = Pipeline(load_experiment(config, overrides)).stages["ppo"]
    assert ppo.store.exists(ppo.key) and ppo.store.manifest(ppo.key)["metrics"]["train_steps"] == 1


def test_a_launch_file_that_is_not_an_accelerate_config_is_refused(tmp_path, capsys):
    from rlhf.cli import main

    assert main(["run", "configs/tiny.yaml", "--launch", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: launch config not found" in capsys.readouterr().err
    (tmp_path / "exp.yaml").write_text("name: not-a-launch-config\n")
    assert main(["run", "configs/tiny.yaml", "--launch", str(tmp_path / "exp.yaml")]) == 2
    assert "not an Accelerate launch config (no distributed_type)" in capsys.readouterr().err


@pytest.mark.parametrize("env, refused", [
    ({"ACCELERATE_USE_FSDP": "true"}, True),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, True),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, False),
    ({}, False),
])
def test_lora_is_refused_before_training_where_parameters_are_sharded(monkeypatch, env, refused):
    from rlhf.distributed import refuse_sharded_lora
    from rlhf.stage import StageError

    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    refuse_sharded_lora("sft", lora_enabled=False)  # without LoRA every launch is fine
    if refused:
        with pytest.raises(StageError, match=r"sft: stages.sft.lora.enabled=true .* ZeRO-3 or FSDP .*ddp.yaml"):
            refuse_sharded_lora("sft", lora_enabled=True)
    else:
        refuse_sharded_lora("sft", lora_enabled=True)
