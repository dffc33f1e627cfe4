"""What config dataclasses are made of, and the experiment's own settings: the bottom layer of the library.

Every numeric field declares the values it accepts next to its definition, with `checked`:

    learning_rate: float = checked(1e-3, gt=0)       # then its one-line docstring
    logging_steps: int = logging_only(10, ge=1)     # logging_only takes the same bounds

`rlhf.config` loads YAML into these dataclasses and checks every declared range of every config dataclass
(nested ones too), naming the file, the key, the value and the range: `configs/tiny.yaml:
stages.sft.learning_rate: -1.0 must be > 0`. A dataclass's `__post_init__` is left with the checks that
involve several fields. `result_config` is what of a config enters artifact keys.

Every module may import this one; it imports nothing from the library but `rlhf.errors`, so it can never
close an import circle (tests/test_config.py checks it).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any

from rlhf.errors import ConfigError


@dataclass(frozen=True)
class Bounds:
    """The values a config field accepts, declared beside the field with `checked(...)`.

    Numbers must be finite and pass every bound given (`gt`: >, `ge`: >=, `lt`: <, `le`: <=); `finite`
    alone accepts any finite number. `choices` lists the accepted values of a field (strings too).
    `hint` is added to the error: what to set instead, where the range alone does not say it.
    """

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple | None = None
    finite: bool = False
    hint: str = ""

    def allows(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))

    def describe(self) -> str:
        """'> 0', 'in [0, 1]', "one of 'k1', 'k3'", 'a finite number'."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        low = (f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}") if (
            self.ge is not None or self.gt is not None) else None
        high = (f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})") if (
            self.le is not None or self.lt is not None) else None
        if low and high:
            return f"in {low}, {high}"
        for op, bound in ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le)):
            if bound is not None:
                return f"{op} {_num(bound)}"
        return "a finite number"


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def checked(default: Any = dataclasses.MISSING, *, gt: float | None = None, ge: float | None = None,
            lt: float | None = None, le: float | None = None, choices: tuple | None = None,
            finite: bool = False, hint: str = "", affects_result: bool = True, keyed_when_set: bool = False,
            keyed_unless: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A config field with the values it accepts (see `Bounds`), checked when an experiment loads.

    `learning_rate: float = checked(1e-3, gt=0)`; `gamma: float = checked(1.0, ge=0, le=1)`;
    `kl_estimator: str = checked("k1", choices=("k1", "k3"))`. A field that may be None skips the check
    when it is None. Other keyword arguments go to `dataclasses.field` (e.g. `default_factory`).

    `keyed_when_set`: the field enters artifact keys only when it differs from its default, so that a
    field added later leaves the keys of every artifact built before it (at that default) as they were.
    `keyed_unless=value`: the same, measured from `value` instead of the default: for a default that
    changed, the artifacts built at the old one (`value`) keep their keys and the new default gets new ones.
    """
    meta: dict[str, Any] = {}
    if (gt, ge, lt, le, choices) != (None,) * 5 or finite:
        meta["bounds"] = Bounds(gt, ge, lt, le, tuple(choices) if choices is not None else None, finite, hint)
    if not affects_result:
        meta["affects_result"] = False
    if keyed_when_set or keyed_unless is not dataclasses.MISSING:
        meta["unkeyed_value"] = default if keyed_unless is dataclasses.MISSING else keyed_unless
    return field(default=default, metadata=meta, **kwargs)


def logging_only(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A config field that changes what is logged but not what is trained: left out of the artifact key.

    Takes the bounds of `checked` too: `logging_steps: int = logging_only(10, ge=1)`.
    """
    return checked(default, affects_result=False, **kwargs)


def field_bounds(f: dataclasses.Field) -> Bounds | None:
    """The bounds a dataclass field declared with `checked` or `logging_only`, or None."""
    return f.metadata.get("bounds")


def nested_config_class(owner: type, f: dataclasses.Field) -> type | None:
    """The dataclass a field of config dataclass `owner` holds (e.g. `LoraSettings`), or None."""
    try:
        hint = typing.get_type_hints(owner).get(f.name)
    except Exception:  # an annotation that cannot be resolved: fall back on the default's type
        hint = None
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
        return type(default) if dataclasses.is_dataclass(default) else None
    return None


def range_problems(cls: type, data: Any, prefix: str = "") -> list[tuple[str, Any, Bounds]]:
    """(dotted key, value, bounds) of every value in `data` (plain dicts shaped like dataclass `cls`, nested
    dataclasses included) that its field's declared bounds refuse; None values are not checked."""
    problems: list[tuple[str, Any, Bounds]] = []
    if not isinstance(data, dict):
        return problems
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, key = data[f.name], f"{prefix}{f.name}"
        sub = nested_config_class(cls, f)
        if sub is not None and isinstance(value, dict):
            problems += range_problems(sub, value, key + ".")
            continue
        bounds = field_bounds(f)
        if bounds is not None and value is not None and not bounds.allows(value):
            problems.append((key, value, bounds))
    return problems


def result_config(cfg: Any) -> Any:
    """The fields of a config dataclass that change results, as plain data (nested dataclasses included)."""
    if dataclasses.is_dataclass(cfg):
        return {
            f.name: result_config(getattr(cfg, f.name))
            for f in dataclasses.fields(cfg)
            if f.metadata.get("affects_result", True)
            and not ("unkeyed_value" in f.metadata and getattr(cfg, f.name) == f.metadata["unkeyed_value"])
        }
    if isinstance(cfg, (list, tuple)):
        return [result_config(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: result_config(v) for k, v in cfg.items()}
    return cfg


def as_dict(cfg: Any) -> dict:
    """Every field of a config dataclass as plain data (for manifests and logs)."""
    return dataclasses.asdict(cfg)


@dataclass
class TrackingConfig:
    wandb: str = checked("offline", choices=("offline", "online", "disabled"))
    """wandb mode: 'offline' (default; runs land under `dir` and can be synced later), 'online', or 'disabled'."""
    project: str = "rlhf-pipeline"
    """wandb project name."""
    entity: str | None = None
    """wandb entity (team or user); None uses the logged-in default."""
    dir: str = "runs"
    """Where run logs (metrics.jsonl, wandb offline runs, trainer checkpoints' logs) are written."""


@dataclass
class EvalConfig:
    """The one held-out evaluation every policy stage runs (SFT, PPO, ...): same prompts, seed and judges,
    so their numbers compare across stages and against the reference policy prompt by prompt."""

    prompts: str = "data/prompts/eval.jsonl.gz"
    """Held-out prompts ({"prompt"} rows; other fields, e.g. "answer", reach the judges as columns)."""
    num_prompts: int = checked(512, ge=1)
    """How many of them (the first N); at least 256 for numbers worth quoting."""
    judges: dict[str, str | None] = field(default_factory=lambda: {
        "gold": "vader", "heldout": "textblob", "fluency": "fluency"})
    """Role -> judge (a judge's name, built-in or registered, or `package.module:function`; null drops a role;
    an experiment's roles are added to these). `gold` is the simulated person the experiment optimises for,
    never seen by the policy; `heldout` a second judge nothing trains on; `task` scores whether the response
    does what the prompt asked (1 = yes), reported as task success; any other role is reported by its name."""
    max_new_tokens: int = checked(32, ge=1)
    """Response length limit."""
    temperature: float = checked(1.0, gt=0, hint="greedy responses are decoded beside the sampled ones "
                                                  "with evaluation.greedy: true")
    """Sampling temperature of the sampled responses (KL to the reference is measured on these)."""
    greedy: bool = True
    """Also decode greedily and judge those responses (what a user of the model sees by default)."""
    batch_size: int = checked(64, ge=1)
    """Prompts per generate call."""
    bf16_sampling: bool = checked(False, keyed_when_set=True)
    """Generate under bfloat16 autocast (faster on CPUs with AVX512-BF16 and on GPUs); judges and KL are
    computed as before, KL in float32 (rlhf.sampling.generate)."""
    engine: str = checked("hf", choices=("hf", "vllm"), keyed_when_set=True)
    """What samples the evaluation's responses, for every policy alike (the comparison needs one sampler):
    hf (`generate`) or vllm (rlhf/vllm_engine.py: `make vllm-setup`; one process)."""
    engine_options: dict[str, Any] | None = checked(None, keyed_when_set=True)
    """Extra arguments of `vllm.LLM` where `engine` is vllm."""
    num_logged_samples: int = logging_only(8, ge=0)
    """Prompts whose responses the manifest and the report show side by side."""

    def __post_init__(self) -> None:
        if not self.judges.get("gold"):
            raise ValueError("evaluation.judges.gold: every experiment needs a gold judge (e.g. vader)")


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    """Experiment name: aliases in the store (`<name>/<stage>`), run directories and reports use it."""
    seed: int = checked(0, ge=0, lt=2**32)
    """Seed for every RNG of every stage; part of every artifact key."""
    store: str = "artifacts"
    """Artifact store root: a local path (relative to the working directory) or an fsspec URL (s3://, gs://, memory://)."""
    cache_dir: str | None = None
    """Local cache for artifacts of a remote store and for the names of data files that passed their checks;
    default $RLHF_CACHE, else ~/.cache/rlhf-pipeline."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking (wandb + metrics.jsonl)."""
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    """The held-out evaluation every policy stage runs."""
    stages: dict[str, Any] = field(default_factory=dict)
    """One block per stage, in any order; the pipeline orders them by their inputs."""


# --------------------------------------------------------------------------------------------------
# Dotted paths that settings name (stage classes, judges, reward functions)


def import_object(path: str, what: str = "object") -> Any:
    """Import `package.module:attr` or `package.module.attr`; the error says which part failed."""
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"{what} {path!r}: expected 'package.module:Name'")
    # Researchers keep their subclasses and judges next to their experiments: resolve from the working
    # directory as `python -m` would, even under the `rlhf` console script.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{what} {path!r}: cannot import module {module_name!r} ({e})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}") from None
