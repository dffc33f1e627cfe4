"""Experiment tracking: metrics.jsonl always, wandb when enabled (offline unless configured).

Each stage run gets `runs/<experiment>/<stage>-<key>/` with `metrics.jsonl` (one JSON object per
logging step) and, unless wandb is disabled, a wandb run. The metrics file is copied into the artifact
so reports can be drawn from the store alone.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from rlhf.schema import ExperimentConfig


def _plain(value: Any) -> Any:
    """Numbers as floats (tensors included); NaN/inf become None so the file stays valid JSON."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Tracker:
    """Writes metrics for one stage run to metrics.jsonl and, if enabled, to wandb."""

    def __init__(self, experiment: ExperimentConfig, stage: str, key: str, enabled: bool = True):
        self.enabled = enabled
        self.dir = Path(experiment.tracking.dir) / experiment.name / f"{stage}-{key}"
        self.path = self.dir / "metrics.jsonl"
        self._wandb = None
        if not enabled:
            return
        # the outermost directory this run creates, so a run that logged nothing can leave none behind
        self._created = next((p for p in reversed([self.dir, *self.dir.parents]) if not p.exists()), None)
        self.dir.mkdir(parents=True, exist_ok=True)
        mode = experiment.tracking.wandb
        if mode != "disabled":
            import wandb  # heavy: imported only when used

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(
                project=experiment.tracking.project,
                entity=experiment.tracking.entity,
                mode=mode,
                dir=str(self.dir),
                name=f"{experiment.name}/{stage}",
                group=experiment.name,
                job_type=stage,
                config={"experiment": experiment.name, "stage": stage, "key": key},
                reinit="finish_previous",
            )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Record `metrics` at `step` (the stage's own step count)."""
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k not in ("step", "time")}, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        """Final metrics of the run (also in the manifest)."""
        if self._wandb is not None:
            for k, v in metrics.items():
                if isinstance(_plain(v), (int, float)):
                    self._wandb.summary[k] = _plain(v)

    def copy_metrics(self, out: Path) -> None:
        """Put metrics.jsonl into the artifact directory."""
        if self.path.exists():
            shutil.copyfile(self.path, out / "metrics.jsonl")

    def close(self, discard_if_empty: bool = False) -> None:
        """Finish the wandb run. With `discard_if_empty` (the stage failed), a run that logged no metrics
        leaves nothing behind: its directory (wandb's offline run included) and the parents it created
        are removed."""
        if self._wandb is not None:
            self._wandb.finish(exit_code=1 if discard_if_empty else None)
            self._wandb = None
        if discard_if_empty and self.enabled and not self.path.exists() and self._created is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            for parent in self.dir.parents:
                if parent == self._created.parent:
                    break
                try:
                    parent.rmdir()  # only while empty: another stage's run may live beside it
                except OSError:
                    break


def trainer_callback(tracker: Tracker):
    """A transformers TrainerCallback that forwards the trainer's logs to `tracker`."""
    from transformers import TrainerCallback

    class _TrackerCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                tracker.log(dict(logs), step=state.global_step)

    return _TrackerCallback()
