"""Two CPU processes against one, at the same global batch: DDP over gloo (configs/accelerate/cpu-ddp.yaml)
and DeepSpeed ZeRO-2 and ZeRO-3 (configs/accelerate/zero2.yaml, zero3.yaml with 2 processes, `use_cpu: true`,
no mixed precision; DeepSpeed's CPU accelerator over gloo): every launch config that runs without a GPU.

The two-process run goes through `rlhf run --launch`, the path users take. SFT and reward use a per-process
batch of 4 (global 8) against the one-process batch of 8; PPO's global rollout batch is the same 8
prompts either way. Under ZeRO the comparison goes through the DeepSpeed engine, ZeRO-3's partitioned
parameters, the gathered state dict every sharded stage saves, PPO's generation from gathered ZeRO-3
weights and the sharded reference and reward models.

Tolerance: 1e-5 on every weight. With the same global batch the only difference is float summation
order (two half-batch gradients averaged by the all-reduce instead of one full-batch sum), about 1e-7
relative; measured: SFT 7e-9 (DDP) to 1e-7 (ZeRO-2), reward 2e-7 to 3e-7, PPO update 7e-9 to 1.2e-7.
Getting the global batch wrong (e.g. 8 per process = 16 in all, or per-rank advantage whitening) moves
weights by the order of one Adam step, the learning rate (3e-4 .. 1e-3), 30 to 100 times the tolerance;
a ZeRO-3 gradient-accumulation fault (each micro-batch's gradient replacing the previous one's) moved
PPO weights by 0.02.

PPO samples, so a two-process rollout cannot repeat the one-process samples token for token; its
comparison is on one update of a fixed rollout batch (tests/helpers/ppo_update_step.py), which covers
everything distributed in the PPO loop: sharded rows, global whitening, the token-weighted accumulation
with the global token count, and the gradient average across ranks.

Not covered: FSDP, which Accelerate applies on GPUs only (with `use_cpu` it would run plain DDP, so
`launch_command` refuses that combination).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, ppo_config, seeded_store, write_config
from rlhf.config import load_experiment
from rlhf.distributed import launch_command
from rlhf.pipeline import Pipeline
from rlhf.rollout import Trajectory

sys.path.insert(0, str(REPO / "tests" / "helpers"))  # ppo_update_step: the update both runs make

LAUNCH = REPO / "configs" / "accelerate" / "cpu-ddp.yaml"
TOLERANCE = 1e-5
PER_PROCESS = ["stages.sft.batch_size=4", "stages.reward.batch_size=4"]  # x 2 processes = the default 8
# One minibatch so both runs update on the same set of rows; two micro-batches so accumulation runs
# across ranks; reward whitening so both whitenings are global.
PPO_UPDATE = ["stages.ppo.num_minibatches=1", "stages.ppo.gradient_accumulation_steps=2",
              "stages.ppo.ppo_epochs=2", "stages.ppo.whiten_rewards=true"]


def cpu_launch_config(name: str, directory: Path) -> Path:
    """The launch file for two CPU processes: cpu-ddp.yaml, or configs/accelerate/NAME.yaml made into one."""
    if name == "cpu-ddp":
        return LAUNCH
    cfg = yaml.safe_load((REPO / "configs" / "accelerate" / f"{name}.yaml").read_text())
    cfg.update(num_processes=2, use_cpu=True, mixed_precision="no")
    path = directory / f"{name}-cpu.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _tests_on_path(env: dict[str, str]) -> dict[str, str]:
    # the test judge (conftest:length_judge) and the helper stages import from tests/
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO / "tests"), str(REPO / "tests" / "helpers"), env.get("PYTHONPATH", "")])}


def launch(program: list[str], cwd: Path, launch_file: Path = LAUNCH, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd, env = launch_command(launch_file, program)
    return subprocess.run(cmd, cwd=cwd, env=_tests_on_path(env), capture_output=True, text=True, timeout=timeout)


def rlhf_launch(path: Path, *args: str, launch_file: Path = LAUNCH, timeout: int = 600) -> subprocess.CompletedProcess:
    """`rlhf run PATH ARGS --launch FILE`, as a user (or `make ... LAUNCH=`) runs it."""
    cmd = [sys.executable, "-m", "rlhf.cli", "run", str(path), *args, "--launch", str(launch_file)]
    return subprocess.run(cmd, cwd=path.parent, env=_tests_on_path(dict(os.environ)), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def experiment(shared_data, upstream_store, tmp_path_factory) -> Path:
    """The tiny four-stage experiment with its artifacts up to the reward model (built in one process),
    the common start of both runs."""
    root = tmp_path_factory.mktemp("distributed")
    return write_config(root / "exp.yaml", ppo_config(shared_data, str(seeded_store(upstream_store, root))))


# ZeRO-2 partitions gradients and optimizer states inside DeepSpeed; ZeRO-3 also runs this project's own
# sharded paths (weights gathered to save and to generate, sharded reference and reward models). Each launch
# config costs 30-60 s of the suite on 2 cores. ZeRO-2 was left out from 2026-11-30 to 2026-12-07 to fit the
# suite's time, which has since lost a DeepSpeed kernel build (rlhf.distributed.process_state) and the
# surplus torch threads of its workers (conftest.py).
@pytest.fixture(scope="module", params=["cpu-ddp", "zero2", "zero3"])
def two_processes(request, experiment, tmp_path_factory):
    """SFT, reward and PPO in two processes through `rlhf run --launch FILE`, in a copy of the experiment's
    store and with run logs of their own (the launches give the same keys): (launch file, the overrides,
    the pipeline that names the keys)."""
    root = tmp_path_factory.mktemp(request.param)
    shutil.copytree(experiment.parent / "store", root / "store")
    launch_file = cpu_launch_config(request.param, root)
    overrides = [f"store={root / 'store'}", f"tracking.dir={root / 'runs'}", *PER_PROCESS]
    done = rlhf_launch(experiment, *overrides, launch_file=launch_file)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "shm_comm" not in done.stdout  # DeepSpeed's CPU kernel, a minute of compiling (rlhf.distributed.process_state)
    return launch_file, overrides, Pipeline(load_experiment(experiment, overrides))


@pytest.fixture(scope="module")
def one_process(experiment):
    pipe = Pipeline(load_experiment(experiment))
    pipe.run(until="reward")
    return pipe


def _max_difference(store_a, key_a: str, store_b, key_b: str, auto_class) -> float:
    a = auto_class.from_pretrained(store_a.local_dir(key_a)).state_dict()
    b = auto_class.from_pretrained(store_b.local_dir(key_b)).state_dict()
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_two_processes_match_one_at_the_same_global_batch(two_processes, one_process, stage):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    launch_file, _, pipe = two_processes
    auto = AutoModelForCausalLM if stage == "sft" else AutoModelForSequenceClassification
    two, one = pipe.stages[stage], one_process.stages[stage]
    assert two.key != one.key  # different per-process batch sizes: different artifacts
    diff = _max_difference(one_process.store, one.key, pipe.store, two.key, auto)
    assert diff < TOLERANCE, f"{launch_file.name} {stage}: max |w_2proc - w_1proc| = {diff:.3g}"
    m1, m2 = one_process.store.manifest(one.key)["metrics"], pipe.store.manifest(two.key)["metrics"]
    assert m2["train_steps"] == m1["train_steps"]
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], rel=1e-5)


def test_two_process_ppo_writes_once_from_the_main_process(two_processes):
    _, _, pipe = two_processes
    ppo, store = pipe.stages["ppo"], pipe.store
    manifest = store.manifest(ppo.key)
    assert manifest["metrics"]["train_steps"] == ppo.config.num_steps
    assert store.alias("test", "ppo") == ppo.key
    # one metrics row per step (the main process logs reduced statistics; the other rank logs nothing),
    # then the final evaluation's at the last step (rlhf.policy.PolicyStage.compare_with_reference)
    rows = [json.loads(line) for line in (store.local_dir(ppo.key) / "metrics.jsonl").read_text().splitlines()]
    steps = list(range(1, ppo.config.num_steps + 1))
    assert [r["step"] for r in rows] == steps + [ppo.config.num_steps]
    assert all(r["env/response_length"] > 0 for r in rows[:-1]) and "gold_gain" in rows[-1]
    assert not store.work_dir(ppo.key).exists() or not any(store.work_dir(ppo.key).iterdir())


def test_ppo_update_in_two_processes_matches_one(two_processes, tmp_path):
    from ppo_update_step import build_stage, update

    launch_file, overrides, pipe = two_processes
    config = pipe.experiment.source
    out = tmp_path / "update"
    overrides = [*overrides, *PPO_UPDATE]  # starts from the two-process SFT and reward artifacts
    done = launch([str(REPO / "tests" / "helpers" / "ppo_update_step.py"), config, str(out), *overrides],
                  cwd=Path(config).parent, launch_file=launch_file)
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
    assert diff < TOLERANCE, (f"{launch_file.name}: max |w_2proc - w_1proc| = {diff:.3g} after an update that moved "
                              f"weights by {moved:.3g}")


# GRPO: groups of 2 (each rank holds two whole groups), no value model, the KL in the loss; the reward
# model's own scores even without EOS (the tiny policy rarely stops within 8 tokens, and a group whose
# responses all get the no-EOS score has no advantage at all)
GRPO_UPDATE = ["stages.grpo.rewards={reward: 1.0}", "stages.grpo.no_eos_score=null", "stages.grpo.rollout_batch_size=8", "stages.grpo.samples_per_prompt=2",
               "stages.grpo.num_minibatches=1", "stages.grpo.gradient_accumulation_steps=2", "stages.grpo.ppo_epochs=2",
               "stages.grpo.max_new_tokens=8", "stages.grpo.kl_coef=0.1", "stages.grpo.eval_every=0"]
MODES = ["token_mean", "sequence_mean", "sequence_sum"]


def test_grpo_update_in_two_processes_matches_one_in_every_aggregation_mode(one_process, tmp_path):
    """A dropped 1/N, a per-rank token or sequence count, or a group split across ranks moves the weights
    by the order of the update itself, far past the tolerance."""
    from ppo_update_step import build_stage, update

    config = one_process.experiment.source
    prompts = one_process.stages["ppo"].config.prompts
    overrides = [f"stages.grpo.prompts={prompts}", *GRPO_UPDATE]
    out = tmp_path / "grpo"
    done = launch([str(REPO / "tests" / "helpers" / "ppo_update_step.py"), config, str(out), "--stage", "grpo",
                   "--modes", ",".join(MODES), *overrides], cwd=Path(config).parent)
    assert done.returncode == 0, done.stderr[-4000:]
    traj = Trajectory(*torch.load(out / "traj.pt"))
    assert traj.values is None  # no value model anywhere
    for mode in MODES:
        stage = build_stage(config, [*overrides, f"stages.grpo.loss_aggregation={mode}"], "grpo")
        before = {f"policy.{k}": v.clone() for k, v in stage.policy.state_dict().items()}
        one, two = update(stage, traj), torch.load(out / f"after-{mode}.pt")
        moved = max((one[k] - before[k]).abs().max().item() for k in one)
        diff = max((one[k] - two[k]).abs().max().item() for k in one)
        assert moved > 30 * TOLERANCE, mode
        assert diff < TOLERANCE, f"{mode}: max |w_2proc - w_1proc| = {diff:.3g} after an update that moved {moved:.3g}"


def test_a_failing_rank_stops_the_others_with_its_error(experiment):
    done = rlhf_launch(experiment, "--until", "sft", "--force", "sft", "stages.sft.class=failing_stage:FailsOnRankOne",
                       "stages.sft.max_steps=3", timeout=300)
    assert done.returncode != 0
    assert "error: rank 1: sft: deliberate failure on this rank" in done.stderr
    failed = Pipeline(load_experiment(experiment, ["stages.sft.class=failing_stage:FailsOnRankOne",
                                                   "stages.sft.max_steps=3"])).stages["sft"]
    assert not failed.store.exists(failed.key)  # rank 0 was stopped before it could publish


@pytest.mark.parametrize("name", ["single", "ddp", "zero2", "zero3", "fsdp", "cpu-ddp"])
def test_every_launch_config_loads_and_builds_the_launch_command(name, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the GPU configs are refused without GPUs
    path = REPO / "configs" / "accelerate" / f"{name}.yaml"
    cfg = load_config_from_file(str(path))  # Accelerate's own validation of the file
    cmd, env = launch_command(path, ["-m", "rlhf.cli", "run", "configs/tiny.yaml"])
    assert cmd[1:5] == ["-m", "accelerate.commands.launch", "--config_file", str(path)]
    assert cmd[-4:] == ["-m", "rlhf.cli", "run", "configs/tiny.yaml"]
    # one-machine CPU processes go through torchrun's launcher, each told to stay on the CPU (gloo)
    assert ("--multi_gpu" in cmd) == (name == "cpu-ddp")
    assert (env.get("ACCELERATE_USE_CPU") == "true") == (name == "cpu-ddp")
    assert cfg.num_processes == (2 if name == "cpu-ddp" else 1 if name == "single" else 8)


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3", "fsdp"])
def test_a_gpu_launch_config_is_refused_on_a_machine_without_gpus(name, monkeypatch):
    # Each process would otherwise train alone on the CPU, with no error and N times the work.
    from rlhf.distributed import LaunchError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LaunchError, match=f"{name}.yaml: distributed_type .* runs on GPUs and this machine has none"):
        launch_command(REPO / "configs" / "accelerate" / f"{name}.yaml", ["-m", "rlhf.cli"])


def test_fsdp_on_cpu_is_refused_rather_than_run_as_ddp(tmp_path):
    from rlhf.distributed import LaunchError

    with pytest.raises(LaunchError, match="fsdp-cpu.yaml: FSDP with use_cpu: true is not supported"):
        launch_command(cpu_launch_config("fsdp", tmp_path), ["-m", "rlhf.cli"])


def test_deepspeed_on_cpu_is_launched_on_deepspeeds_cpu_accelerator(tmp_path):
    # ACCELERATE_USE_CPU would make Accelerate drop DeepSpeed altogether (and run DDP)
    _, env = launch_command(cpu_launch_config("zero3", tmp_path), ["-m", "rlhf.cli"])
    assert env.get("ACCELERATE_USE_CPU") != "true"
    assert env["DS_ACCELERATOR"] == "cpu" and env["CUDA_VISIBLE_DEVICES"] == ""


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
