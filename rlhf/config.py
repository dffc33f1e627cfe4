"""YAML experiments -> typed dataclasses.

An experiment file names the experiment, its seed, the artifact store, tracking, and one block per stage:

    _base_: base.yaml            # optional; merged first, this file wins
    name: tiny
    seed: 0
    store: artifacts             # a path or any fsspec URL
    stages:
      pretrain: {max_steps: 600}
      sft: {model: pretrain}     # `class: my_pkg.stages:MySFT` swaps in a subclass

Command-line overrides are dotted (`stages.pretrain.max_steps=50`). Loading and merging is OmegaConf's;
this module adds the file and key to every error and checks each stage block against the config
dataclass of the stage class that will run it (found through the stage registry, also here).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from rlhf.errors import ConfigError

ENTRY_POINT_GROUP = "rlhf.stages"


def logging_only(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A config field that changes what is logged but not what is trained: left out of the artifact key."""
    return field(default=default, metadata={"affects_result": False}, **kwargs)


def result_config(cfg: Any) -> Any:
    """The fields of a config dataclass that change results, as plain data (nested dataclasses included)."""
    if dataclasses.is_dataclass(cfg):
        return {
            f.name: result_config(getattr(cfg, f.name))
            for f in dataclasses.fields(cfg)
            if f.metadata.get("affects_result", True)
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
    wandb: str = "offline"
    """wandb mode: 'offline' (default; runs land under `dir` and can be synced later), 'online', or 'disabled'."""
    project: str = "rlhf-pipeline"
    """wandb project name."""
    entity: str | None = None
    """wandb entity (team or user); None uses the logged-in default."""
    dir: str = "runs"
    """Where run logs (metrics.jsonl, wandb offline runs, trainer checkpoints' logs) are written."""

    def __post_init__(self) -> None:
        if self.wandb not in ("offline", "online", "disabled"):
            raise ConfigError(f"tracking.wandb: {self.wandb!r} is not one of offline, online, disabled")


@dataclass
class EvalConfig:
    """The one held-out evaluation every policy stage runs (SFT, PPO, ...): same prompts, seed and judges,
    so their numbers compare across stages and against the reference policy prompt by prompt."""

    prompts: str = "data/prompts/eval.jsonl.gz"
    """Held-out prompts ({"prompt"} rows; other fields, e.g. "word", reach the judges as columns)."""
    num_prompts: int = 512
    """How many of them (the first N); at least 256 for numbers worth quoting."""
    judges: dict[str, str | None] = field(default_factory=lambda: {
        "gold": "word_vader", "heldout": "word_textblob", "task": "uses_word", "fluency": "fluency"})
    """Role -> judge (a built-in name or `package.module:function`; null drops a role). `gold` is the simulated
    person the experiment optimises for, never seen by the policy; `heldout` a second judge nothing trains on;
    `task` scores whether the response does what the prompt asked (1 = yes), reported as task success."""
    max_new_tokens: int = 32
    """Response length limit."""
    temperature: float = 1.0
    """Sampling temperature of the sampled responses (KL to the reference is measured on these)."""
    greedy: bool = True
    """Also decode greedily and judge those responses (what a user of the model sees by default)."""
    batch_size: int = 64
    """Prompts per generate call."""
    num_logged_samples: int = logging_only(8)
    """Prompts whose responses the manifest and the report show side by side."""

    def __post_init__(self) -> None:
        if not self.judges.get("gold"):
            raise ValueError("evaluation.judges.gold: every experiment needs a gold judge (e.g. word_vader)")
        if self.num_prompts < 1:
            raise ValueError(f"evaluation.num_prompts: {self.num_prompts}; at least 1")
        if not self.temperature > 0:
            raise ValueError(f"evaluation.temperature: {self.temperature}; must be > 0 (greedy: set greedy: true)")


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    """Experiment name: aliases in the store (`<name>/<stage>`), run directories and reports use it."""
    seed: int = 0
    """Seed for every RNG of every stage; part of every artifact key."""
    store: str = "artifacts"
    """Artifact store root: a local path (relative to the working directory) or an fsspec URL (s3://, gs://, memory://)."""
    cache_dir: str | None = None
    """Local cache for artifacts of a remote store; default ~/.cache/rlhf-pipeline."""
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


@dataclass
class Experiment:
    """A loaded experiment: the top-level config and each stage's class and typed config."""

    config: ExperimentConfig
    stages: dict[str, StageSpec]
    source: str

    @property
    def name(self) -> str:
        return self.config.name


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
    return layers[-1][0]


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
    top = _typed(ExperimentConfig, raw, layers, "")
    if not isinstance(stage_blocks, dict):
        raise ConfigError(f"{_origin(layers, 'stages')}: stages: expected a mapping of stage name to settings")

    specs: dict[str, StageSpec] = {}
    for name, block in stage_blocks.items():
        block = dict(block or {})
        class_path = block.pop("class", None)
        try:
            cls = stage_class(name, class_path)
        except ConfigError as e:
            raise ConfigError(f"{_origin(layers, f'stages.{name}')}: stages.{name}: {e}") from None
        specs[name] = StageSpec(name, cls, _typed(cls.config_class, block, layers, f"stages.{name}."))
    top.stages = {name: spec.config for name, spec in specs.items()}
    return Experiment(config=top, stages=specs, source=str(Path(path)))
