"""The stage graph: order stages by their inputs, compute every key up front, check every stage that will
run, then run what is out of date."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.artifacts import ArtifactStore
from rlhf.config import Experiment, registered_stages
from rlhf.errors import ERRORS, ConfigError, one_message
from rlhf.stage import InputRef, Stage

log = logging.getLogger("rlhf")


@dataclass
class PlannedStage:
    """One stage of a plan: its key, whether it must run, and why."""

    name: str
    stage: Stage
    key: str
    will_run: bool
    reason: str


@dataclass
class StageResult:
    name: str
    key: str
    ran: bool
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)


class Pipeline:
    """An experiment's stages, ordered by their inputs, over one artifact store."""

    def __init__(self, experiment: Experiment, store: ArtifactStore | None = None):
        self.experiment = experiment
        self.store = store or ArtifactStore.for_experiment(experiment.config)
        self.order = self._order()
        self.stages = self._instantiate()

    def _upstream(self, name: str) -> dict[str, str | None]:
        return upstream_of(self.experiment, name)

    def _order(self) -> list[str]:
        return stage_order(self.experiment)

    def _instantiate(self) -> dict[str, Stage]:
        stages: dict[str, Stage] = {}
        for name in self.order:
            spec = self.experiment.stages[name]
            refs = {}
            values = spec.cls.input_values(spec.config)
            for fname, up in self._upstream(name).items():
                value = values[fname]  # not None: _upstream skips unset inputs
                if up:
                    refs[fname] = InputRef(fname, stages[up].key, stage=up)
                else:
                    refs[fname] = InputRef(fname, external_fingerprint(value), external=value)
            stages[name] = spec.cls(spec.config, self.experiment.config, self.store, refs, stage_name=name,
                                    seed=spec.seed)
            stages[name].config_origin = self.experiment.origin
        return stages

    def selected(self, until: str | None = None) -> list[str]:
        """Stage names to consider: all, or `until` and everything it needs."""
        if until is None:
            return list(self.order)
        if until not in self.stages:
            known = registered_stages()
            hint = "" if until in known else " (this stage is not built yet)"
            raise ConfigError(
                f"{self.experiment.source}: no stage {until!r} in this experiment{hint}; stages: {', '.join(self.order)}"
            )
        needed: set[str] = set()

        def add(name: str) -> None:
            needed.add(name)
            for up in self._upstream(name).values():
                if up:
                    add(up)

        add(until)
        return [n for n in self.order if n in needed]

    def plan(self, until: str | None = None, force: tuple[str, ...] | list[str] = ()) -> list[PlannedStage]:
        """What `run` would do: each stage's key, whether it runs, and why."""
        for name in force:
            if name not in self.stages:
                raise ConfigError(f"--force {name}: no such stage; stages: {', '.join(self.order)}")
        plan: list[PlannedStage] = []
        running: set[str] = set()
        for name in self.selected(until):
            stage = self.stages[name]
            ups = [u for u in self._upstream(name).values() if u]
            if name in force:
                will, why = True, "forced"
            elif self.store.exists(stage.key):
                will, why = False, "up to date"
            elif running.intersection(ups):
                will, why = True, f"input {', '.join(sorted(running.intersection(ups)))} will run"
            else:
                will, why = True, self._why_new(name, stage)
            if will:
                running.add(name)
            plan.append(PlannedStage(name, stage, stage.key, will, why))
        return plan

    def check(self, until: str | None = None, force: tuple[str, ...] | list[str] = ()) -> list[PlannedStage]:
        """Every cheap precondition of a run, before anything trains or is written; returns the plan.

        The store root must be a usable directory; then `Stage.check()` runs for every stage that will run
        (data rows, judges, input paths, and whatever a stage class adds). All problems are collected: one
        is raised as itself (a `ConfigError`, `DataError` or `StageError` naming the file and the key), several
        as one `ConfigError` listing them. Takes seconds; the store and runs/ are left as they were.
        """
        reason = self.store.unusable_reason()
        if reason:
            raise ConfigError(f"{self.experiment.where('store')}: {reason}; point store: at a directory "
                              "(it is created if missing) or an fsspec URL")
        plan = self.plan(until, force)
        problems: dict[str, Exception] = {}  # by message: a policy's evaluation judges are checked per stage
        for step in plan:
            if step.will_run:
                try:
                    step.stage.check()
                except ERRORS as e:
                    problems.setdefault(str(e), e)
        if len(problems) == 1:
            raise next(iter(problems.values()))
        if problems:
            raise ConfigError(one_message(list(problems)))
        return plan

    def _why_new(self, name: str, stage: Stage) -> str:
        """Explain a missing key by comparing with the artifact the experiment's alias points at."""
        old_key = self.store.alias(self.experiment.name, name)
        if old_key is None or not self.store.exists(old_key):
            return "never built"
        old = self.store.manifest(old_key)
        payload = stage.key_payload()
        # Only result-relevant fields are in the payload, so logging-only edits never show up here.
        changes = _diff("", old.get("config", {}), payload["config"])
        if old.get("seed") != payload["seed"]:
            changes.append(f"seed {old.get('seed')} -> {payload['seed']}")
        if old.get("data") != payload["data"]:
            changes.append("data changed")
        old_inputs = {f: v["key"] for f, v in old.get("inputs", {}).items()}
        if old_inputs != payload["inputs"]:
            changes.append("inputs changed")
        for part in sorted(payload.keys() - {"stage", "config", "inputs", "data", "seed"}):  # a subclass's own
            if part not in old:
                changes.append(f"{part} settings (not recorded by the old manifest)")
            else:
                changes += _diff(f"{part}.", old[part], payload[part])
        if not changes:
            changes.append(f"stage code changed ({old.get('class')})")
        return f"changed since {old_key[:8]}: " + "; ".join(changes[:6])

    def run(self, until: str | None = None, force: tuple[str, ...] | list[str] = ()) -> list[StageResult]:
        """Check, then run every out-of-date stage up to `until`, in order; skip the up-to-date ones.

        Under `accelerate launch` every rank runs this; they plan from the same store state (a barrier
        first), only the main process writes aliases and artifacts, and each stage ends at a barrier.
        """
        from rlhf.distributed import barrier, is_main_process

        self.check(until, force)  # nothing trains, and nothing is written, unless every check passes
        barrier()
        plan = self.plan(until, force)
        if is_main_process():  # GGUF inputs become store artifacts once, before the stages that read them
            self.convert_sources([step.stage for step in plan if step.will_run])
        barrier()
        results = []
        for step in plan:
            if not step.will_run:
                log.info("%s: up to date (key %s)", step.name, step.key)
                if is_main_process():
                    self.store.set_alias(self.experiment.name, step.name, step.key)
                results.append(StageResult(step.name, step.key, False, 0.0, self.store.manifest(step.key)["metrics"]))
                continue
            log.info("%s: running (key %s): %s", step.name, step.key, step.reason)
            t0 = time.time()
            step.stage.forced = step.name in force  # a forced rerun replaces its artifact
            manifest = step.stage.run()
            results.append(StageResult(step.name, step.key, True, time.time() - t0, manifest["metrics"]))
        return results

    def convert_sources(self, stages: list[Stage]) -> None:
        """Convert every GGUF file that these stages read into its artifact, once (rlhf/gguf.py)."""
        from rlhf.gguf import materialize

        done: set[str] = set()
        for stage in stages:
            for ref in stage.input_refs.values():
                if ref.converted and ref.key not in done:
                    materialize(self.store, str(ref.external), ref.key, self.experiment.config.name)
                    done.add(ref.key)


def external_fingerprint(ref: str) -> str:
    """Identity of a model from outside the store, for artifact keys.

    A local directory is fingerprinted by its config and the names and sizes of its files (hashing
    gigabytes of weights on every plan would be slow); a hub id by its name, since the user pins a
    revision by naming it (`owner/model@rev`); a GGUF file by its content (`rlhf.gguf.source_key`), which is
    also the key of its converted artifact.
    """
    from rlhf import gguf

    if gguf.is_gguf(ref):
        return gguf.source_key(ref)
    path = Path(ref)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(path.rglob("*")):
            if f.is_file():
                h.update(f"{f.relative_to(path)}:{f.stat().st_size}".encode())
                if f.suffix == ".json" and f.stat().st_size < 1 << 20:
                    h.update(f.read_bytes())
        return "dir:" + h.hexdigest()[:16]
    return "hub:" + ref


def upstream_of(experiment: Experiment, name: str) -> dict[str, str | None]:
    """For each input field of stage `name`: the upstream stage it names, or None for an outside model."""
    spec = experiment.stages[name]
    known = set(registered_stages())
    out: dict[str, str | None] = {}
    for fname, value in spec.cls.input_values(spec.config).items():
        if value is None:  # an optional input left unset
            continue
        if value in experiment.stages:
            out[fname] = value
        elif value in known:
            raise ConfigError(
                f"{experiment.source}: stages.{name}.{fname} = {value!r} names a stage that is not in "
                f"this experiment; add a `{value}:` block under stages, or name a hub id or local model directory"
            )
        else:
            out[fname] = None
    return out


def stage_order(experiment: Experiment) -> list[str]:
    """The experiment's stage names, every stage after the stages it reads."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ConfigError(f"{experiment.source}: stage inputs form a cycle through {name!r}")
        visiting.add(name)
        for up in upstream_of(experiment, name).values():
            if up:
                visit(up)
        visiting.discard(name)
        order.append(name)

    for name in experiment.stages:
        visit(name)
    return order


def _diff(prefix: str, old: Any, new: Any) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in new:
            if k in old:
                out += _diff(f"{prefix}{k}.", old[k], new[k])
            else:
                out.append(f"{prefix}{k} {new[k]!r} added")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')} {old!r} -> {new!r}"]

