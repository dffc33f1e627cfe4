"""Running the stages under `accelerate launch`: the launch command, the process state, global reductions.

`rlhf run CONFIG --launch FILE` re-runs itself as `accelerate launch --config_file FILE -m rlhf.cli run
CONFIG ...`; each process then runs the same pipeline. Only the main process writes to the store and
the trackers; every rank meets the others at stage boundaries (`barrier`). Accelerate's launcher
(torchrun underneath) stops the other ranks when one exits with an error, and that rank prints its
error with its rank.

Launch configs are Accelerate's own YAML (`configs/accelerate/`). One quirk is handled here: Accelerate
launches several CPU processes on one machine only through mpirun; for `distributed_type: MULTI_CPU` on
one machine we use its torchrun launcher instead and tell each process to stay on the CPU (gloo).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from rlhf.errors import LaunchError, StageError

LAUNCHED_ENV = "RLHF_LAUNCHED"
"""Set in the processes `rlhf run --launch` starts, so they never launch again."""


def read_launch_config(path: str | Path) -> dict[str, Any]:
    """An Accelerate launch YAML as a dict, checked for the fields the pipeline relies on."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LaunchError(f"{path}: launch config not found; see configs/accelerate/ for examples")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise LaunchError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(cfg, dict) or "distributed_type" not in cfg:
        raise LaunchError(f"{path}: not an Accelerate launch config (no distributed_type); "
                          "write one with `accelerate config --config_file FILE` or copy configs/accelerate/*.yaml")
    n = cfg.get("num_processes", 1)
    if not isinstance(n, int) or n < 1:
        raise LaunchError(f"{path}: num_processes: {n!r}; expected a positive integer")
    if cfg["distributed_type"] == "FSDP" and cfg.get("use_cpu"):
        # Accelerate would quietly run plain DDP instead: FSDP is applied to GPU processes only
        raise LaunchError(f"{path}: FSDP with use_cpu: true is not supported (Accelerate shards with FSDP on GPUs "
                          "only and would run plain DDP); on CPU use DeepSpeed (configs/accelerate/zero3.yaml with "
                          "use_cpu: true) or configs/accelerate/cpu-ddp.yaml")
    return cfg


def launch_command(launch_file: str | Path, program: list[str]) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch` command line (and environment) that runs `program` in every process.

    `program` is what follows `python`: `["-m", "rlhf.cli", "run", ...]` or `["script.py", ...]`.
    """
    cfg = read_launch_config(launch_file)
    if (cfg["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED") and not cfg.get("use_cpu")
            and not torch.cuda.is_available()):
        # without GPUs each process would find no process group to join and train alone on the CPU
        raise LaunchError(f"{launch_file}: distributed_type {cfg['distributed_type']} runs on GPUs and this machine "
                          "has none (torch.cuda.is_available() is False); on CPU set use_cpu: true in it, or use "
                          "configs/accelerate/cpu-ddp.yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_file)]
    env = {**os.environ, LAUNCHED_ENV: "1"}
    if cfg.get("use_cpu"):
        if cfg["distributed_type"] == "DEEPSPEED":
            # Accelerate drops DeepSpeed when told to use the CPU (ACCELERATE_USE_CPU); DeepSpeed runs on
            # the CPU by itself where no GPU is visible (its CPU accelerator, gloo), see `process_state`.
            env["CUDA_VISIBLE_DEVICES"] = ""
            env["DS_ACCELERATOR"] = "cpu"
        else:
            env["ACCELERATE_USE_CPU"] = "true"
    if (cfg["distributed_type"] == "MULTI_CPU" and cfg.get("num_machines", 1) == 1
            and not cfg.get("mpirun_config") and cfg.get("num_processes", 1) > 1):
        cmd.append("--multi_gpu")  # torchrun's launcher; ACCELERATE_USE_CPU makes each process pick gloo
    return [*cmd, *program], env


def process_state():
    """Accelerate's process state, created so that CPU launches (ACCELERATE_USE_CPU) form a gloo group.

    `PartialState` is shared by every Accelerator and Trainer in the process, and the first construction
    decides the backend, so the pipeline creates it here before any stage builds a trainer.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    if deepspeed_on_cpu():
        # DeepSpeed on CPU (its CPU accelerator): without a backend Accelerate would count each rank as a
        # single process; gloo unless oneCCL's bindings are installed (DeepSpeed then uses ccl).
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator

        # DeepSpeed's CPU communication backend JIT-compiles a shared-memory all-reduce kernel when it starts
        # (C++ against torch's headers: 50-60 s on 2 cores, again in every new environment, since the build
        # is keyed by the virtualenv's path). Only `inference_all_reduce` (DeepSpeed inference's tensor
        # parallelism) calls it; ZeRO training's collectives go through torch.distributed. Marked
        # unavailable, it is not built (DeepSpeed's own fallback where the kernel cannot be compiled).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        return PartialState(backend=get_accelerator().communication_backend_name())
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def deepspeed_on_cpu() -> bool:
    """A multi-process DeepSpeed launch with no GPU: DeepSpeed's CPU accelerator over gloo (or oneCCL)."""
    return uses_deepspeed() and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def trainer_accelerator_config() -> dict | None:
    """`TrainingArguments(accelerator_config=...)` for this launch (None: the Trainer's default).

    The Trainer normally builds the process state anew, and for DeepSpeed it names no backend, so on
    CPU each rank would count itself as the only process. Under DeepSpeed on CPU it keeps the state
    `process_state` made (gloo); the previous stage's Accelerator settings are dropped first.
    """
    if not deepspeed_on_cpu():
        return None
    _drop_accelerator_settings()
    return {"use_configured_state": True}


def new_accelerator(**kwargs):
    """An `Accelerator` with these settings and the launch's own (DeepSpeed or FSDP plugin from the environment).

    Accelerate keeps one `AcceleratorState` per process and ignores the settings of a later `Accelerator`;
    a Trainer of an earlier stage in the same process leaves its own there (under DeepSpeed its plugin,
    with the batch sizes that Trainer filled in, which DeepSpeed then rejects). They are dropped first;
    the process group is kept.
    """
    from accelerate import Accelerator

    _drop_accelerator_settings()
    return Accelerator(**kwargs)


def _drop_accelerator_settings() -> None:
    from accelerate.state import AcceleratorState, GradientState

    process_state()
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def is_main_process() -> bool:
    return process_state().is_main_process


def barrier() -> None:
    """Every rank waits here for the others (a no-op in a single process)."""
    process_state().wait_for_everyone()


def broadcast_object(obj: Any) -> Any:
    """The main process's `obj` on every rank (work done once, e.g. sampling on-policy pairs)."""
    state = process_state()
    if state.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj if state.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


# ---- PPO's own loop under a launch (the Trainer-based stages get this from the Trainer) -----------


def shards_parameters() -> bool:
    """Whether this launch shards parameters over processes (ZeRO-3 or FSDP), read from what
    `accelerate launch` puts in the environment, so a stage can refuse before it trains."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return True
    return uses_deepspeed() and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"


def refuse_sharded_lora(stage: str, lora_enabled: bool) -> None:
    """LoRA's merge needs whole weights, which ZeRO-3 and FSDP never hold on one process."""
    if lora_enabled and shards_parameters():
        raise StageError(f"{stage}: stages.{stage}.lora.enabled=true is not supported under ZeRO-3 or FSDP yet; "
                         f"launch with configs/accelerate/ddp.yaml or zero2.yaml, or turn LoRA off")


def uses_deepspeed() -> bool:
    """True in processes started with a DeepSpeed launch config (known before the Accelerator exists)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def zero_stage(accelerator) -> int:
    """The DeepSpeed ZeRO stage of this run, 0 without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


class PolicyAndValue(torch.nn.Module):
    """Policy and value model as one module: DeepSpeed wraps exactly one trained model per engine."""

    def __init__(self, policy: torch.nn.Module, value: torch.nn.Module):
        super().__init__()
        self.policy = policy
        self.value = value

    def forward(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)` (a micro-batch's loss over both models) inside the engine's forward:
        DeepSpeed keeps per-micro-batch state there (ZeRO-3 counts micro-batches at each forward, and
        without that count every micro-batch's gradient replaces the last instead of adding to it)."""
        return fn(*args, **kwargs)


def prepare_frozen(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """Place a frozen model (reference, reward) for the launch.

    ZeRO-3 shards it like the trained models (an inference engine, no optimizer state); elsewhere each
    process holds a whole copy, in bf16 when the run trains in bf16 on GPU (it is never updated, so
    fp32 master weights would only cost memory).
    """
    if zero_stage(accelerator) == 3:
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(model, accelerator)
    model = model.to(accelerator.device)
    if accelerator.mixed_precision == "bf16" and accelerator.device.type == "cuda":
        model = model.to(torch.bfloat16)
    return model


def gathered_state_dict(accelerator, model) -> dict | None:
    """The whole state dict of a model whose parameters are sharded over the ranks (ZeRO-3, FSDP), else None.

    A collective: every rank must call it, although only the main process saves. `model` is what the
    accelerator prepared (a Trainer's `model_wrapped`).
    """
    if zero_stage(accelerator) == 3 or is_fsdp(accelerator):
        return accelerator.get_state_dict(model)
    return None
