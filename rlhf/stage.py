"""The Stage base class: one piece of work that turns input artifacts into an output artifact.

`run()` is the lifecycle every stage shares:

    1. validate inputs   upstream artifacts exist and fit together
    2. setup             seed, tracking, models, data (the stage's `setup`)
    3. resume            training state under the store's work/<key>/ is picked up by `train`
    4. train             the stage's own loop or trainer
    5. evaluate          held-out metrics, into the manifest
    6. save              into a staging directory; reloaded and compared; published atomically

Before any stage of a run trains, the pipeline calls `check()` of every stage that will run: cheap
preconditions (data rows, judges, input paths) that fail in seconds rather than after earlier stages have
trained.

Subclasses declare `name`, `config_class`, `kind`, `inputs` and implement `setup`, `train`,
`evaluate` and `save`. Researchers subclass a stage and point the YAML at it with `class:`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from rlhf.artifacts import ArtifactStore, cache_root, code_version, content_key, library_versions
from rlhf.errors import ConfigError, DataError, StageError
from rlhf.schema import ExperimentConfig, as_dict, result_config

SAMPLE_RESPONSES = ("A short answer.", "A longer answer, with a few more words in it than the first one.")
"""What `check` asks judges to score: two responses to the first two prompts of their prompts file."""


@dataclass(frozen=True)
class InputRef:
    """Where a stage input comes from: an upstream stage's artifact, or a model from outside.

    `stage` is set for upstream stages (then `key` is that stage's artifact key); otherwise `external`
    is a hub id or a local Hugging Face directory, and `key` is its fingerprint, or a GGUF file, and `key`
    is the artifact it is converted into (rlhf/gguf.py).
    """

    field: str
    key: str
    stage: str | None = None
    external: str | None = None

    def describe(self) -> str:
        return f"{self.stage} ({self.key})" if self.stage else f"{self.external} ({self.key})"

    @property
    def converted(self) -> bool:
        """A GGUF file, read through its converted artifact in the store."""
        from rlhf.gguf import is_gguf

        return self.stage is None and is_gguf(self.external)


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
    data_schemas: ClassVar[dict[str, str]] = {}
    """Config fields (dotted, e.g. `onpolicy.prompts`) that name data, with the schema of their rows
    (`rlhf.data.SCHEMAS`): `check` parses every row of each before anything trains."""
    forced: bool = False
    """Set by the pipeline for `--force`: the new artifact replaces the one with the same key."""

    config_origin: Callable[[str], str] | None = None
    """Set by the pipeline: the file (or override) that set a dotted key, for messages (`where`)."""

    @classmethod
    def input_values(cls, config: Any) -> dict[str, str | None]:
        """The models this stage reads, by input name: an upstream stage, a hub id, a local directory, or
        None for an optional input left unset. By default the config fields named in `inputs`; a stage
        whose inputs depend on its config (the reward models of an RL stage's `rewards:`) overrides it."""
        return {name: getattr(config, name) for name in cls.inputs}

    def __init__(
        self,
        config: Any,
        experiment: ExperimentConfig,
        store: ArtifactStore,
        inputs: dict[str, InputRef] | None = None,
        stage_name: str | None = None,
        seed: int | None = None,
    ):
        self.config = config
        self.experiment = experiment
        self.store = store
        self.input_refs = inputs or {}
        self.stage_name = stage_name or self.name
        # A stage block's own `seed:` draws this stage again from the same inputs (PPO over three seeds on
        # one SFT model); it is in the key, so everything downstream is drawn again too.
        self.seed = experiment.seed if seed is None else seed
        self._key: str | None = None

    # ---- identity ------------------------------------------------------------------------------

    def data_files(self) -> dict[str, str | None]:
        """The data this stage reads, by role (local paths or hub dataset ids). Part of the key."""
        return {}

    def data_fingerprints(self) -> dict[str, str]:
        from rlhf.data import fingerprint

        files = self.fingerprinted_files()
        out = {}
        for role, spec in files.items():
            if spec:
                try:
                    out[role] = fingerprint(spec)
                except DataError as e:  # name the setting as well as the file
                    raise DataError(f"{self._data_where(role, spec)}: {e}") from None
        return out

    def fingerprinted_files(self) -> dict[str, str | None]:
        """The data whose content is part of the key, by role: `data_files()`, and whatever else the stage
        reads (a policy stage adds the evaluation prompts; rlhf/policy.py)."""
        return dict(self.data_files())

    def _data_where(self, role: str, spec: str) -> str:
        field = next((f for f in self.data_schemas if _dotted(self.config, f) == spec), None)
        return self.where(field) if field else f"stages.{self.stage_name} ({role} data)"

    def key_payload(self) -> dict[str, Any]:
        """Everything that decides what this stage produces; its hash is the artifact key (a subclass that
        reads more, as a policy stage the experiment's evaluation settings, adds it)."""
        cls = type(self)
        return {
            "stage": f"{cls.__module__}.{cls.__qualname__}",
            "config": result_config(self.config),
            "inputs": {f: ref.key for f, ref in sorted(self.input_refs.items())},
            "data": self.data_fingerprints(),
            "seed": self.seed,
        }

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
        if ref.converted:  # converted on first use (the pipeline does it before the first stage runs)
            from rlhf.gguf import materialize

            return str(materialize(self.store, ref.external, ref.key, self.experiment.name))
        return ref.external  # type: ignore[return-value]

    def input_manifest(self, field: str) -> dict[str, Any] | None:
        ref = self.input_refs[field]
        if ref.stage is not None or (ref.converted and self.store.exists(ref.key)):
            return self.store.manifest(ref.key)
        return None

    # ---- cheap preconditions, before anything trains (override `check` to add yours) -------------

    def where(self, key: str, top: bool = False) -> str:
        """How a message names a setting: `'<file>: stages.<stage>.<key>'` (`top`: `key` is the
        experiment's own, e.g. `evaluation.prompts`)."""
        key = key if top else f"stages.{self.stage_name}.{key}"
        return f"{self.config_origin(key)}: {key}" if self.config_origin else key

    def check(self) -> None:
        """Verify this stage's cheap preconditions; called for every stage that will run, before the
        first stage of the run trains (`rlhf plan` and `rlhf run` call it through `Pipeline.check`).

        The base class checks what every stage has: each data file in `data_schemas` parses against its
        schema (every row; a file that passed once is remembered by its content, so later plans skip
        it), and each outside model input is an existing Hugging Face directory or looks like a hub id
        (a policy stage adds its evaluation's prompts and judges; rlhf/policy.py).

        Add your own by overriding it; call `super().check()` and raise `ConfigError` (from
        `rlhf.errors`) naming the setting with `self.where(field)` and saying what to do:

            def check(self):
                super().check()
                if self.config.baseline == "value" and not self.config.whiten_advantages:
                    raise ConfigError(f"{self.where('baseline')}: 'value' needs whiten_advantages: true")

        It runs within seconds on every plan: no training, no model loading, no writes to the store.
        """
        self.check_inputs()
        self.check_data()

    def check_inputs(self) -> None:
        """Outside model inputs: an existing Hugging Face directory, a plausible hub id (not fetched;
        `rlhf.models.check_model_source`), or a GGUF file that transformers can read
        (`rlhf.gguf.check_source`; skipped once it is converted)."""
        from rlhf.models import check_model_source

        for field, ref in self.input_refs.items():
            if ref.stage is not None:
                continue
            where, value = self.where(field), str(ref.external)
            if ref.converted:
                if not self.store.exists(ref.key):
                    from rlhf.gguf import check_source

                    try:
                        check_source(value)
                    except ConfigError as e:
                        raise ConfigError(f"{where}: {e}") from None
                continue
            check_model_source(value, where, list(self.experiment.stages))

    def check_data(self) -> None:
        """Every data file in `data_schemas` parses against its schema (see `rlhf.data.check_data`)."""
        for field, schema in self.data_schemas.items():
            spec = _dotted(self.config, field)
            if spec:
                self.check_data_file(spec, schema, self.where(field))

    def check_data_file(self, spec: str, schema: str, where: str) -> None:
        from rlhf.data import check_data

        try:
            check_data(spec, schema, cache_root(self.experiment.cache_dir))
        except DataError as e:
            raise DataError(f"{where}: {e}") from None

    def check_judge(self, spec: str, key: str, prompts: str, top: bool = False) -> None:
        """The judge `spec` (set at `key`) scores two responses to the first two rows of `prompts` with two
        finite numbers (`rlhf.judges.check_judge`); messages name the file that set it."""
        from rlhf.judges import check_judge

        full_key = key if top else f"stages.{self.stage_name}.{key}"
        origin = self.config_origin(full_key) if self.config_origin else None
        check_judge(spec, full_key, prompts, SAMPLE_RESPONSES, prefix=f"{origin}: " if origin else "")

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

    def memory_plan(self) -> Any:
        """What `rlhf plan --memory` needs to estimate this stage's memory per process (an
        `rlhf.memory.RLMemoryPlan`: its models, batch sizes and lengths), or None: not estimated."""
        return None

    # ---- the shared run ------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run the whole lifecycle and return the manifest of the published artifact."""
        from rlhf.distributed import process_state

        started = time.time()
        state = process_state()
        # 1-2. validate inputs; seed every RNG, open tracking, build models and data
        self.open(tracking=state.is_main_process)
        finished = False
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
            finished = True
        finally:
            # a run that failed before logging anything leaves no run directory and no empty work directory
            self.tracker.close(discard_if_empty=not finished)
            if not finished:
                self.store.clear_work_if_empty(self.key)
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
            self.tracker.close(discard_if_empty=True)
            self.store.clear_work_if_empty(self.key)
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


def _dotted(obj: Any, key: str) -> Any:
    """`obj.a.b` for key "a.b"."""
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj
