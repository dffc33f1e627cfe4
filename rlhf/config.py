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

The config dataclasses are built from `rlhf.schema` (`checked`, `logging_only`: each field declares the
values it accepts), which also holds the experiment's own settings (`ExperimentConfig`); loading checks
every declared range and names the file, the key, the value and the range: `configs/tiny.yaml:
stages.sft.learning_rate: -1.0 must be > 0`.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from rlhf.errors import ConfigError, one_message
from rlhf.schema import ExperimentConfig, field_bounds, import_object, range_problems
from rlhf.stage import Stage

ENTRY_POINT_GROUP = "rlhf.stages"


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


# --------------------------------------------------------------------------------------------------
# The stage registry: stage names -> classes (entry points of the `rlhf.stages` group), or a `class:` path


def registered_stages() -> dict[str, str]:
    """Stage names registered through the `rlhf.stages` entry points, with their class paths."""
    return {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def stage_class(name: str, class_path: str | None = None) -> type:
    """The class that runs stage `name`: `class_path` if given, else the registered one (an
    `rlhf.stage.Stage` subclass)."""
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
