"""YAML experiments -> typed dataclasses.

An experiment file names the experiment, its seed, the artifact store, tracking, and one block per stage:

    _base_: base.yaml            # optional; merged first, this file wins
    name: tiny
    seed: 0
    store: artifacts             # a path or any fsspec URL
    stages:
      pretrain: {max_steps: 600}
      sft: {model: pretrain}     # `class: my_pkg.stages:MySFT` swaps in a subclass
      ppo: {seed: 1}             # this stage's own seed: another draw from the same inputs
      dpo: false                 # drops a stage inherited from the base file

Command-line overrides are dotted (`stages.pretrain.max_steps=50`). Loading and merging is OmegaConf's;
this module adds the file and key to every error and checks each stage block against the config
dataclass of the stage class that will run it (found through the stage registry, also here).

Every numeric field declares the values it accepts next to its definition, with `checked`:

    learning_rate: float = checked(1e-3, gt=0)       # then its one-line docstring
    logging_steps: int = logging_only(10, ge=1)     # logging_only takes the same bounds

Loading checks every declared range of every config dataclass (nested ones too) and names the file, the
key, the value and the range: `configs/tiny.yaml: stages.sft.learning_rate: -1.0 must be > 0`. A
dataclass's `__post_init__` is left with the checks that involve several fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from rlhf.errors import ConfigError, one_message

ENTRY_POINT_GROUP = "rlhf.stages"


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
            **kwargs: Any) -> Any:
    """A config field with the values it accepts (see `Bounds`), checked when an experiment loads.

    `learning_rate: float = checked(1e-3, gt=0)`; `gamma: float = checked(1.0, ge=0, le=1)`;
    `kl_estimator: str = checked("k1", choices=("k1", "k3"))`. A field that may be None skips the check
    when it is None. Other keyword arguments go to `dataclasses.field` (e.g. `default_factory`).

    `keyed_when_set`: the field enters artifact keys only when it differs from its default, so that a
    field added later leaves the keys of every artifact built before it (at that default) as they were.
    """
    meta: dict[str, Any] = {}
    if (gt, ge, lt, le, choices) != (None,) * 5 or finite:
        meta["bounds"] = Bounds(gt, ge, lt, le, tuple(choices) if choices is not None else None, finite, hint)
    if not affects_result:
        meta["affects_result"] = False
    if keyed_when_set:
        meta["keyed_when_set"] = True
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
            and not (f.metadata.get("keyed_when_set") and getattr(cfg, f.name) == f.default)
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
    """Held-out prompts ({"prompt"} rows; other fields, e.g. "word", reach the judges as columns)."""
    num_prompts: int = checked(512, ge=1)
    """How many of them (the first N); at least 256 for numbers worth quoting."""
    judges: dict[str, str | None] = field(default_factory=lambda: {
        "gold": "word_vader", "heldout": "word_textblob", "task": "uses_word", "fluency": "fluency"})
    """Role -> judge (a built-in name or `package.module:function`; null drops a role). `gold` is the simulated
    person the experiment optimises for, never seen by the policy; `heldout` a second judge nothing trains on;
    `task` scores whether the response does what the prompt asked (1 = yes), reported as task success."""
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
    num_logged_samples: int = logging_only(8, ge=0)
    """Prompts whose responses the manifest and the report show side by side."""

    def __post_init__(self) -> None:
        if not self.judges.get("gold"):
            raise ValueError("evaluation.judges.gold: every experiment needs a gold judge (e.g. word_vader)")


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


@dataclass
class StageSpec:
    """A stage as the experiment configures it: its class and its validated config."""

    name: str
    cls: type
    config: Any
    seed: int | None = None
    """The stage block's own `seed:`, replacing the experiment's for this stage (and so for every artifact
    downstream of it); None: the experiment's."""


@dataclass
class Experiment:
    """A loaded experiment: the top-level config and each stage's class and typed config."""

    config: ExperimentConfig
    stages: dict[str, StageSpec]
    source: str
    layers: list[tuple[str, DictConfig]] = field(default_factory=list, repr=False)
    """The YAML files (and overrides) it was merged from, most basic first: `origin` reads them."""

    @property
    def name(self) -> str:
        return self.config.name

    def origin(self, key: str) -> str:
        """The file (or 'command-line override') that set dotted `key`, for messages; the experiment's
        own file when no layer sets it (a default)."""
        return _origin(self.layers, key) if self.layers else self.source

    def where(self, key: str) -> str:
        """'<file>: <key>', the way every message names a setting."""
        return f"{self.origin(key)}: {key}"


# --------------------------------------------------------------------------------------------------
# Loading


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, DictConfig]]:
    """Load a YAML file and its `_base_` chain, most basic first, each with the file it came from."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"{path}: _base_ inheritance loops ({chain})")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError carries the line and column in its text
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    layers: list[tuple[str, DictConfig]] = []
    base = node.pop("_base_", None)
    for b in [base] if isinstance(base, str) else list(base or []):
        layers += _read_yaml(path.parent / b, (*seen, path))
    layers.append((str(path), node))
    return layers


def _origin(layers: list[tuple[str, DictConfig]], key: str) -> str:
    """The file (or override) that set a dotted key, for error messages."""
    for src, node in reversed(layers):
        if OmegaConf.select(node, key, default=None, throw_on_missing=False) is not None:
            return src
    files = [src for src, _ in layers if src != "command-line override"]
    return files[-1] if files else layers[-1][0]


def _suggest(word: str, options: list[str]) -> str:
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else f"; valid keys: {', '.join(sorted(options))}"


def _typed(cls: type, data: Any, layers: list[tuple[str, DictConfig]], prefix: str) -> Any:
    """Validate `data` against dataclass `cls` and build it; errors name file, key and the fix."""
    if data is None:
        data = {}
    if not isinstance(data, (dict, DictConfig)):
        where = _origin(layers, prefix.rstrip("."))
        raise ConfigError(f"{where}: {prefix.rstrip('.')}: expected a mapping of settings, got {data!r}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), data)
        # declared ranges first: a cross-field check in __post_init__ may divide by a count
        problems = range_problems(cls, OmegaConf.to_container(merged, resolve=True), prefix)
        if problems:
            messages = [f"{_origin(layers, key)}: {key}: {value!r} must be {bounds.describe()}"
                        + (f"; {bounds.hint}" if bounds.hint else "") for key, value, bounds in problems]
            error = ConfigError(one_message(messages))
            error.problems = messages  # type: ignore[attr-defined]  (load_experiment lists every block's)
            raise error
        return OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        key = prefix + str(e.full_key or e.key)
        parent_cls = _field_owner(cls, str(e.full_key or e.key))
        names = [f.name for f in dataclasses.fields(parent_cls)]
        leaf = key.rsplit(".", 1)[-1]
        raise ConfigError(f"{_origin(layers, key)}: {key}: unknown key{_suggest(leaf, names)}") from None
    except ValidationError as e:
        key = prefix + str(e.full_key or e.key)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{_origin(layers, key)}: {key}: wrong type: {msg}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{layers[-1][0]}: {prefix.rstrip('.')}: {str(e).splitlines()[0]}") from None
    except ConfigError:
        raise
    except ValueError as e:  # a dataclass's own __post_init__ checks, which name their field
        raise ConfigError(f"{layers[-1][0]}: {prefix}{e}") from None


def _field_owner(cls: type, dotted: str) -> type:
    """The dataclass that owns the last part of a dotted key (for suggestions in nested configs)."""
    parts = dotted.split(".")[:-1]
    for part in parts:
        sub = getattr(cls, "__dataclass_fields__", {}).get(part)
        if sub is None:
            break
        default = sub.default_factory() if sub.default_factory is not dataclasses.MISSING else sub.default
        if not dataclasses.is_dataclass(default):
            break
        cls = type(default)
    return cls


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


# --------------------------------------------------------------------------------------------------
# The stage registry: stage names -> classes (entry points of the `rlhf.stages` group), or a `class:` path


def registered_stages() -> dict[str, str]:
    """Stage names registered through the `rlhf.stages` entry points, with their class paths."""
    return {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def stage_class(name: str, class_path: str | None = None) -> type:
    """The class that runs stage `name`: `class_path` if given, else the registered one (an
    `rlhf.stage.Stage` subclass)."""
    # Imported here, not at the top: rlhf.stage builds on this module (and every stage class imports it anyway).
    from rlhf.stage import Stage

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


def load_experiment(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Experiment:
    """Load an experiment YAML (with `_base_` files and dotted overrides) into typed configs.

    Each stage block is checked against the config dataclass of its stage class: the registered class
    for that name, or the class its `class:` key names.
    """
    layers = _read_yaml(Path(path))
    if overrides:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected key=value, e.g. stages.pretrain.max_steps=50")
        try:
            layers.append(("command-line override", OmegaConf.from_dotlist(list(overrides))))
        except OmegaConfBaseException as e:
            raise ConfigError(f"command-line overrides: {e}") from None
    merged = OmegaConf.merge(*(node for _, node in layers))
    raw = OmegaConf.to_container(merged, resolve=True)
    stage_blocks = raw.pop("stages", None) or {}
    if not isinstance(stage_blocks, dict):
        raise ConfigError(f"{_origin(layers, 'stages')}: stages: expected a mapping of stage name to settings")
    # Every block is checked before anything is raised, so one run shows every problem of the file.
    problems: list[str] = []
    try:
        top = _typed(ExperimentConfig, raw, layers, "")
    except ConfigError as e:
        problems += getattr(e, "problems", [str(e)])

    specs: dict[str, StageSpec] = {}
    seed_bounds = field_bounds(ExperimentConfig.__dataclass_fields__["seed"])  # a stage's seed: the same range
    for name, block in stage_blocks.items():
        if block is False:  # `ppo: false` drops a stage a `_base_` file brought in
            continue
        block = dict(block or {})
        class_path = block.pop("class", None)
        try:
            cls = stage_class(name, class_path)
        except ConfigError as e:
            problems.append(f"{_origin(layers, f'stages.{name}')}: stages.{name}: {e}")
            continue
        # `seed:` is the stage's own seed, unless its config class declares a field of that name
        own_field = "seed" in {f.name for f in dataclasses.fields(cls.config_class)}
        seed = None if own_field else block.pop("seed", None)
        if seed is not None and not (isinstance(seed, int) and seed_bounds.allows(seed)):
            problems.append(f"{_origin(layers, f'stages.{name}.seed')}: stages.{name}.seed: {seed!r} must be an "
                            f"integer {seed_bounds.describe()}; leave it out to use the experiment's seed")
            continue
        try:
            specs[name] = StageSpec(name, cls, _typed(cls.config_class, block, layers, f"stages.{name}."), seed)
        except ConfigError as e:
            problems += getattr(e, "problems", [str(e)])
    if problems:
        raise ConfigError(one_message(problems))
    top.stages = {name: spec.config for name, spec in specs.items()}
    return Experiment(config=top, stages=specs, source=str(Path(path)), layers=layers)
