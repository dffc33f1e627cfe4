"""The Stage base class: one piece of work that turns input artifacts into an output artifact.

`run()` is the lifecycle every stage shares:

    1. validate inputs   upstream artifacts exist and fit together
    2. setup             seed, tracking, models, data (the stage's `setup`)
    3. resume            training state under the store's work/<key>/ is picked up by `train`
    4. train             the stage's own loop or trainer
    5. evaluate          held-out metrics, into the manifest
    6. save              into a staging directory; reloaded and compared; published atomically

Subclasses declare `name`, `config_class`, `kind`, `inputs` and implement `setup`, `train`,
`evaluate` and `save`. Researchers subclass a stage and point the YAML at it with `class:`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

from rlhf.artifacts import ArtifactStore, code_version, content_key, library_versions
from rlhf.config import ConfigError, ExperimentConfig, as_dict, import_object, result_config

log = logging.getLogger("rlhf")

ENTRY_POINT_GROUP = "rlhf.stages"


class StageError(RuntimeError):
    """A stage cannot run or produced something unusable; the message says why and what to do."""


@dataclass(frozen=True)
class InputRef:
    """Where a stage input comes from: an upstream stage's artifact, or a model from outside.

    `stage` is set for upstream stages (then `key` is that stage's artifact key); otherwise `external`
    is a hub id or a local Hugging Face directory, and `key` is its fingerprint.
    """

    field: str
    key: str
    stage: str | None = None
    external: str | None = None

    def describe(self) -> str:
        return f"{self.stage} ({self.key})" if self.stage else f"{self.external} ({self.key})"


def registered_stages() -> dict[str, str]:
    """Stage names registered through the `rlhf.stages` entry points, with their class paths."""
    return {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def stage_class(name: str, class_path: str | None = None) -> type[Stage]:
    """The class that runs stage `name`: `class_path` if given, else the registered one."""
    if class_path:
        cls = import_object(class_path, "class")
    else:
        known = registered_stages()
        if name not in known:
            raise ConfigError(
                f"no stage named {name!r} (registered: {', '.join(sorted(known)) or 'none'}); "
                f"name a class with `class: package.module:StageClass`"
            )
        cls = import_object(known[name], "class")
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise ConfigError(f"class {class_path or name!r} is not a subclass of rlhf.stage.Stage")
    return cls


class Stage:
    """Base class of every stage. See the module docstring for the lifecycle."""

    name: ClassVar[str] = "stage"
    """Default stage name (the key of its block under `stages:`)."""
    config_class: ClassVar[type]
    """The dataclass its YAML block is validated against."""
    kind: ClassVar[str] = "causal-lm"
    """What the artifact is: a Hugging Face checkpoint (causal-lm, reward-model, policy) or a dataset
    (preferences). A policy stage's key and manifest hold the experiment's shared evaluation."""
    inputs: ClassVar[dict[str, str]] = {}
    """Config fields that name an input model, with the upstream stage each defaults to."""

    @classmethod
    def input_values(cls, config: Any) -> dict[str, str | None]:
        """The models this stage reads, by input name: an upstream stage, a hub id, a local directory, or
        None for an optional input left unset. By default the config fields named in `inputs`; a stage
        whose inputs depend on its config (the reward models of an RL stage's `rewards:`) overrides it."""
        return {name: getattr(config, name) for name in cls.inputs}
    forced: bool = False
    """Set by the pipeline for `--force`: the new artifact replaces the one with the same key."""

    def __init__(
        self,
        config: Any,
        experiment: ExperimentConfig,
        store: ArtifactStore,
        inputs: dict[str, InputRef] | None = None,
        stage_name: str | None = None,
    ):
        self.config = config
        self.experiment = experiment
        self.store = store
        self.input_refs = inputs or {}
        self.stage_name = stage_name or self.name
        self.seed = experiment.seed
        self._key: str | None = None

    # ---- identity ------------------------------------------------------------------------------

    def data_files(self) -> dict[str, str | None]:
        """The data this stage reads, by role (local paths or hub dataset ids). Part of the key."""
        return {}

    def data_fingerprints(self) -> dict[str, str]:
        from rlhf.data import fingerprint

        files = dict(self.data_files())
        if self.kind == "policy":
            files["evaluation_prompts"] = self.experiment.evaluation.prompts
        return {role: fingerprint(spec) for role, spec in files.items() if spec}

    def key_payload(self) -> dict[str, Any]:
        """Everything that decides what this stage produces; its hash is the artifact key.

        A policy's manifest holds the experiment's shared evaluation of it, so the evaluation settings
        are part of a policy stage's key.
        """
        cls = type(self)
        payload = {
            "stage": f"{cls.__module__}.{cls.__qualname__}",
            "config": result_config(self.config),
            "inputs": {f: ref.key for f, ref in sorted(self.input_refs.items())},
            "data": self.data_fingerprints(),
            "seed": self.seed,
        }
        if self.kind == "policy":
            payload["evaluation"] = result_config(self.experiment.evaluation)
        return payload

    @property
    def key(self) -> str:
        if self._key is None:
            self._key = content_key(self.key_payload())
        return self._key

    def input_path(self, field: str) -> str:
        """A path or hub id that `from_pretrained` can load for input `field`."""
        ref = self.input_refs[field]
        if ref.stage is not None:
            return str(self.store.local_dir(ref.key))
        return ref.external  # type: ignore[return-value]

    def input_manifest(self, field: str) -> dict[str, Any] | None:
        ref = self.input_refs[field]
        return self.store.manifest(ref.key) if ref.stage is not None else None

    # ---- lifecycle (override these) ------------------------------------------------------------

    def validate_inputs(self) -> None:
        """Step 1: fail early when inputs are missing or do not fit together."""
        for ref in self.input_refs.values():
            if ref.stage is not None and not self.store.exists(ref.key):
                raise StageError(
                    f"{self.stage_name}: input {ref.field} = stage {ref.stage!r} has no artifact {ref.key} "
                    f"in {self.store.url}; run `rlhf run <config> --until {ref.stage}` first"
                )

    def input_tokenizer_digest(self, field: str) -> str:
        """Tokenizer digest of an input: from its manifest, or by loading an outside model's tokenizer."""
        manifest = self.input_manifest(field)
        if manifest is not None and manifest.get("tokenizer_digest"):
            return manifest["tokenizer_digest"]
        from rlhf.tokenizer import load_tokenizer, tokenizer_digest

        return tokenizer_digest(load_tokenizer(self.input_path(field)))

    def require_same_tokenizer(self, *fields: str) -> None:
        """Refuse inputs whose tokenizers differ: token ids from one would be garbage to the other."""
        digests = {f: self.input_tokenizer_digest(f) for f in fields if f in self.input_refs}
        if len(set(digests.values())) > 1:
            listing = "; ".join(f"{f} = {self.input_refs[f].describe()} has tokenizer {d}" for f, d in digests.items())
            raise StageError(
                f"{self.stage_name}: inputs use different tokenizers ({listing}). Train them from the same "
                "tokenizer, e.g. start the reward model from the SFT policy."
            )

    def setup(self) -> None:
        """Step 2: build models, tokenizer and data. `self.work_dir` is ready for resumable state."""
        raise NotImplementedError

    def train(self) -> dict[str, float]:
        """Step 3-4: train, resuming from the state under `self.work_dir` if any; return metrics."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, Any]:
        """Step 5: held-out metrics for the manifest."""
        return {}

    def save(self, out: Path) -> None:
        """Step 6: write the artifact's files to `out`: a loadable Hugging Face checkpoint (model, tokenizer,
        generation config) for a model stage, the data files for a dataset stage."""
        raise NotImplementedError

    def verify_saved(self, out: Path) -> None:
        """Read back what `save` wrote and check it is what is in memory (a model: reloaded and run)."""

    def last_checkpoint(self) -> str | None:
        """The newest complete trainer checkpoint under the work directory, or None.

        A process killed while saving leaves a checkpoint directory without its trainer_state.json
        (the Trainer writes it last); resuming from that would crash, so such directories are skipped.
        """
        ckpt_dir = self.work_dir / "checkpoints"
        found = sorted(ckpt_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True) \
            if ckpt_dir.is_dir() else []
        for path in found:
            try:
                json.loads((path / "trainer_state.json").read_text())
                return str(path)
            except (OSError, ValueError):
                log.warning("%s: skipping incomplete checkpoint %s", self.stage_name, path.name)
        return None

    def manifest_extra(self) -> dict[str, Any]:
        """Stage-specific manifest fields (tokenizer digests, reward statistics, ...)."""
        return {}

    # ---- how the stage shows itself (`rlhf run`, `rlhf status`, `rlhf report`) ------------------

    @classmethod
    def headline(cls, metrics: dict[str, Any]) -> str:
        """One line of the numbers a person looks at first; kept in the manifest as `headline`."""
        return ""

    @classmethod
    def report_section(cls, section: Any) -> list[str]:
        """Markdown lines of this stage's section of `rlhf report` (`section` is a `rlhf.report.StageReport`:
        the manifest, the logged rows, and `plot()` for figures); [] for none."""
        return []

    # ---- the shared run ------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run the whole lifecycle and return the manifest of the published artifact."""
        from rlhf.distributed import process_state

        started = time.time()
        state = process_state()
        # 1-2. validate inputs; seed every RNG, open tracking, build models and data
        self.open(tracking=state.is_main_process)
        try:
            # 3-4. train (resuming from self.work_dir when a checkpoint is there)
            train_metrics = self.train()
            # 5. evaluate
            eval_metrics = self.evaluate()
            metrics = {**train_metrics, **eval_metrics}
            self.tracker.summary(metrics)
            # 6. save, reload-check and publish (main process only; others wait)
            manifest = self.build_manifest(metrics, time.time() - started)
            if state.is_main_process:
                with self.store.staging(self.key) as out:
                    self.save(out)
                    self.verify_saved(out)
                    self.tracker.copy_metrics(out)
                    self.store.publish(out, self.key, manifest, replace=self.forced)
                self.store.set_alias(self.experiment.name, self.stage_name, self.key)
                self.store.clear_work(self.key)
            state.wait_for_everyone()
        finally:
            self.tracker.close()
        return self.store.manifest(self.key)

    def open(self, tracking: bool = True) -> "Stage":
        """Steps 1-2 of the lifecycle alone: inputs validated, RNGs seeded, tracking opened, `setup()` run.

        `run()` starts with it; a notebook or a test calls it to drive one piece of a stage (a rollout,
        one update) without training the whole stage. Returns the stage.
        """
        from transformers import set_seed

        from rlhf.tracking import Tracker

        self.validate_inputs()
        set_seed(self.seed)
        self.work_dir = self.store.work_dir(self.key)
        self.tracker = Tracker(self.experiment, self.stage_name, self.key, enabled=tracking)
        try:
            self.setup()
        except BaseException:
            self.tracker.close()
            raise
        return self

    def build_manifest(self, metrics: dict[str, Any], seconds: float) -> dict[str, Any]:
        cls = type(self)
        return {
            "stage": self.stage_name,
            "class": f"{cls.__module__}:{cls.__qualname__}",
            "kind": self.kind,
            "experiment": self.experiment.name,
            "inputs": {f: {"key": r.key, "stage": r.stage, "external": r.external} for f, r in self.input_refs.items()},
            "config": as_dict(self.config),
            "seed": self.seed,
            "data": self.data_fingerprints(),
            "libraries": library_versions(),
            "code_version": code_version(),
            "metrics": metrics,
            "headline": self.headline(metrics),
            "seconds": round(seconds, 1),
            **self.manifest_extra(),
        }
