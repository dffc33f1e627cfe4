"""YAML experiments: inheritance, overrides, and errors that name the file, the key and the fix."""

from __future__ import annotations


import pytest

from conftest import REPO, tiny_config, write_config
from rlhf.config import ConfigError, load_experiment
from rlhf.schema import result_config
from stages.pretrain import PretrainConfig, PretrainStage


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    exp = load_experiment(path)
    assert exp.stages, f"{path} defines no stages"


def test_types_and_defaults(tiny_yaml):
    exp = load_experiment(tiny_yaml)
    cfg = exp.stages["pretrain"].config
    assert isinstance(cfg, PretrainConfig)
    assert exp.stages["pretrain"].cls is PretrainStage
    assert cfg.model.num_layers == 2 and cfg.max_steps == 8
    assert cfg.learning_rate == PretrainConfig.learning_rate  # untouched fields keep their defaults


def test_dotted_override(tiny_yaml):
    exp = load_experiment(tiny_yaml, ["stages.pretrain.max_steps=50", "stages.pretrain.model.hidden_size=64", "seed=3"])
    cfg = exp.stages["pretrain"].config
    assert (cfg.max_steps, cfg.model.hidden_size, exp.config.seed) == (50, 64, 3)


def test_misspelled_key_names_file_key_and_suggestion(tiny_yaml):
    text = tiny_yaml.read_text().replace("max_steps:", "max_step:")
    tiny_yaml.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_experiment(tiny_yaml)
    msg = str(e.value)
    assert str(tiny_yaml.resolve()) in msg and "stages.pretrain.max_step" in msg and "did you mean max_steps?" in msg


def test_misspelled_nested_key_suggests_from_nested_config(tiny_yaml):
    with pytest.raises(ConfigError, match=r"stages\.pretrain\.model\.num_layer: unknown key; did you mean num_layers\?"):
        load_experiment(tiny_yaml, ["stages.pretrain.model.num_layer=3"])


def test_misspelled_top_level_key(workdir, tiny_data):
    path = write_config(workdir / "e.yaml", {"name": "x", "seeed": 1, "stages": {}})
    with pytest.raises(ConfigError, match=r"seeed: unknown key; did you mean seed\?"):
        load_experiment(path)


def test_wrong_type_names_key(tiny_yaml):
    with pytest.raises(ConfigError) as e:
        load_experiment(tiny_yaml, ["stages.pretrain.batch_size=eight"])
    assert "command-line override" in str(e.value) and "stages.pretrain.batch_size: wrong type" in str(e.value)


def test_wrong_type_in_file_names_the_file(workdir, tiny_data):
    path = write_config(workdir / "e.yaml", {"name": "x", "stages": {"pretrain": {"learning_rate": "fast"}}})
    with pytest.raises(ConfigError) as e:
        load_experiment(path)
    assert str(path.resolve()) in str(e.value) and "stages.pretrain.learning_rate" in str(e.value)


def test_post_init_validation(workdir):
    path = write_config(workdir / "e.yaml", {"stages": {"pretrain": {"model": {"hidden_size": 30, "num_heads": 4}}}})
    with pytest.raises(ConfigError, match="divisible"):
        load_experiment(path)


def test_base_inheritance_and_error_in_base_names_base(workdir):
    base = write_config(workdir / "base.yaml", {"name": "base", "seed": 7, "stages": {"pretrain": {"max_steps": 10, "batch_size": 4}}})
    child = write_config(workdir / "child.yaml", {"_base_": "base.yaml", "name": "child", "stages": {"pretrain": {"max_steps": 20}}})
    exp = load_experiment(child)
    cfg = exp.stages["pretrain"].config
    assert (exp.name, exp.config.seed, cfg.max_steps, cfg.batch_size) == ("child", 7, 20, 4)

    write_config(base, {"stages": {"pretrain": {"batch_sise": 4}}})
    with pytest.raises(ConfigError) as e:
        load_experiment(child)
    assert str(base.resolve()) in str(e.value) and "did you mean batch_size?" in str(e.value)


def test_base_loop_and_missing_file(workdir):
    a = write_config(workdir / "a.yaml", {"_base_": "b.yaml"})
    write_config(workdir / "b.yaml", {"_base_": "a.yaml"})
    with pytest.raises(ConfigError, match="loops"):
        load_experiment(a)
    with pytest.raises(ConfigError, match="config file not found"):
        load_experiment(workdir / "nope.yaml")


def test_invalid_yaml_names_file(workdir):
    p = workdir / "bad.yaml"
    p.write_text("stages:\n  pretrain: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_experiment(p)


def test_unknown_stage_and_custom_class(workdir):
    p = write_config(workdir / "e.yaml", {"stages": {"pretrian": {}}})
    with pytest.raises(ConfigError, match="no stage named 'pretrian'"):
        load_experiment(p)
    p = write_config(workdir / "e.yaml", {"stages": {"pretrain": {"class": "stages.pretrain:PretrainConfig"}}})
    with pytest.raises(ConfigError, match="not a subclass"):
        load_experiment(p)
    p = write_config(workdir / "e.yaml", {"stages": {"pretrain": {"class": "no_such_module:Stage"}}})
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module'"):
        load_experiment(p)


def test_custom_class_from_yaml(workdir, monkeypatch):
    (workdir / "my_stages.py").write_text(
        "from stages.pretrain import PretrainStage\nclass MyPretrain(PretrainStage):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(workdir))
    p = write_config(workdir / "e.yaml", {"stages": {"pretrain": {"class": "my_stages:MyPretrain", "max_steps": 3}}})
    spec = load_experiment(p).stages["pretrain"]
    assert spec.cls.__name__ == "MyPretrain" and spec.config.max_steps == 3


def test_a_stage_seed_redraws_that_stage_and_what_is_downstream(workdir, tiny_data):
    from rlhf.pipeline import Pipeline

    path = write_config(workdir / "e.yaml", tiny_config(tiny_data, str(workdir / "store"),
                                                        stages=("pretrain", "sft", "preferences", "reward")))
    keys = {name: stage.key for name, stage in Pipeline(load_experiment(path)).stages.items()}
    pipe = Pipeline(load_experiment(path, ["stages.sft.seed=7"]))
    assert pipe.stages["pretrain"].key == keys["pretrain"] and pipe.stages["pretrain"].seed == 0
    assert pipe.stages["sft"].seed == 7 and pipe.stages["preferences"].seed == 0
    for name in ("sft", "preferences", "reward"):  # preferences and reward keep seed 0 but read a new SFT
        assert pipe.stages[name].key != keys[name], name
    # the experiment's own seed, stated as the stage's, is the same draw
    assert Pipeline(load_experiment(path, ["stages.sft.seed=0"])).stages["reward"].key == keys["reward"]
    for bad in ("-1", "1.5", "true", "abc"):
        with pytest.raises(ConfigError, match=r"e\.yaml|override") as e:
            load_experiment(path, [f"stages.sft.seed={bad}"])
        assert "stages.sft.seed" in str(e.value) and "experiment's seed" in str(e.value)


def test_result_config_leaves_out_logging_fields():
    cfg = PretrainConfig()
    rc = result_config(cfg)
    assert "max_steps" in rc and "tokenizer" in rc and "vocab_size" in rc["tokenizer"]
    assert "logging_steps" not in rc and "save_steps" not in rc


# ---- the modules' imports ----------------------------------------------------------------------------------


def _imports() -> dict[str, set[str]]:
    """Every module of rlhf/, stages/ and tasks/ -> the modules it imports anywhere in its file, inside functions too
    (a lazy import still runs, and still ties the two modules together), with their packages (importing
    `rlhf.ppo.core` runs `rlhf/ppo/__init__.py`) but not its own (they are imported before it runs)."""
    import ast

    out: dict[str, set[str]] = {}
    for f in (p for top in ("rlhf", "stages", "tasks") for p in (REPO / top).rglob("*.py")):
        mod = ".".join(f.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        names = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}  # `from rlhf import x`
        with_packages = {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 2)}
        out[mod] = {n for n in with_packages if n != mod and not mod.startswith(n + ".")}
    return out


def _graph() -> dict[str, set[str]]:
    """`_imports` restricted to the modules of rlhf/, stages/ and tasks/."""
    imports = _imports()
    return {mod: deps & imports.keys() for mod, deps in imports.items()}


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, str] = {}  # "open" while on the path being walked, "done" once every path from it was

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = "open"
        for dep in sorted(graph[mod]):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join([*path[path.index(dep):], dep])}"
            if dep not in state:
                visit(dep, [*path, dep])
        state[mod] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])


def test_imports_run_from_higher_layers_to_lower_ones_only():
    graph = _graph()
    # the leaf every module may import: config helpers and the experiment's settings, on the errors alone
    assert graph["rlhf.errors"] == set() and graph["rlhf.schema"] == {"rlhf.errors"}
    # the library knows no stage and no experiment's task (tasks/ registers its judges by name)
    upward = {mod: sorted(d for d in deps if d.split(".")[0] in ("stages", "tasks"))
              for mod, deps in graph.items() if mod.split(".")[0] == "rlhf"}
    assert {mod: deps for mod, deps in upward.items() if deps} == {}
    # rlhf/ppo/ is RL math on tensors: it imports the rest of rlhf/ppo/ and torch, no model code
    imports = _imports()
    model_code = {"transformers", "peft", "accelerate", "trl", "deepspeed", "vllm"}
    math = {mod: sorted(d for d in deps if d in model_code or (d.split(".")[0] == "rlhf" and not d.startswith("rlhf.ppo")))
            for mod, deps in imports.items() if mod.startswith("rlhf.ppo")}
    assert {mod: deps for mod, deps in math.items() if deps} == {}


@pytest.mark.parametrize("module", ["rlhf.errors", "rlhf.schema", "rlhf.config", "rlhf.stage", "rlhf.tracking", "rlhf.distributed"])
def test_each_module_imports_alone(module):
    import subprocess
    import sys

    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    if module != "rlhf.distributed":
        assert out.stdout.strip() == "False", f"{module} imports torch"


# ---- declared ranges -------------------------------------------------------------------------------------


def _config_classes() -> set[type]:
    """Every config dataclass of this checkout: the experiment's, each stage's (as pyproject.toml registers
    them; the installed entry points may belong to another checkout) and the example's, nested ones too."""
    import dataclasses
    import tomllib

    from examples.reinforce_baseline import ReinforceBaselineConfig
    from rlhf.config import stage_class
    from rlhf.schema import ExperimentConfig, nested_config_class

    registered = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["rlhf.stages"]
    roots = {ExperimentConfig, ReinforceBaselineConfig}
    roots |= {stage_class(name, path).config_class for name, path in registered.items()}
    found: set[type] = set()

    def walk(cls):
        if cls not in found:
            found.add(cls)
            for f in dataclasses.fields(cls):
                sub = nested_config_class(cls, f)
                if sub is not None:
                    walk(sub)

    for cls in roots:
        walk(cls)
    return found


def _is_numeric(hint) -> bool:
    import types
    import typing

    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return any(t in (int, float) for t in options)  # bool is neither


def test_every_numeric_config_field_declares_its_range():
    import dataclasses
    import typing

    from rlhf.schema import field_bounds

    classes = _config_classes()
    assert {"PretrainConfig", "SFTConfig", "RewardConfig", "PreferencesConfig", "DPOConfig", "PPOConfig", "GRPOConfig",
            "ModelConfig",
            "LoraSettings", "TokenizerConfig", "EvalConfig", "TrackingConfig", "ExperimentConfig"} <= {
        c.__name__ for c in classes}
    missing = [f"{cls.__name__}.{f.name}" for cls in classes for f in dataclasses.fields(cls)
               if _is_numeric(typing.get_type_hints(cls)[f.name]) and field_bounds(f) is None]
    assert missing == [], f"declare a range with rlhf.schema.checked(...) for: {', '.join(sorted(missing))}"


def test_defaults_are_within_their_declared_ranges():
    import dataclasses

    from rlhf.schema import field_bounds

    for cls in _config_classes():
        for f in dataclasses.fields(cls):
            bounds, default = field_bounds(f), f.default
            if bounds is not None and default is not dataclasses.MISSING and default is not None:
                assert bounds.allows(default), f"{cls.__name__}.{f.name} = {default!r} is outside {bounds.describe()}"


def test_bounds_describe_and_allow():
    from rlhf.schema import Bounds

    assert Bounds(gt=0).describe() == "> 0" and not Bounds(gt=0).allows(0) and Bounds(gt=0).allows(1e-9)
    assert Bounds(ge=0, le=1).describe() == "in [0, 1]" and Bounds(ge=0, le=1).allows(1)
    assert Bounds(ge=0, lt=1).describe() == "in [0, 1)" and not Bounds(ge=0, lt=1).allows(1.0)
    assert not Bounds(gt=0).allows(float("nan")) and not Bounds(gt=0).allows(float("inf"))
    assert Bounds(finite=True).describe() == "a finite number" and Bounds(finite=True).allows(-3.5)
    assert Bounds(choices=("k1", "k3")).describe() == "one of 'k1', 'k3'" and not Bounds(choices=("k1",)).allows("k2")


def test_out_of_range_value_names_file_key_value_and_range(workdir):
    path = write_config(workdir / "e.yaml", {"_base_": str(REPO / "configs" / "tiny.yaml"),
                                             "stages": {"sft": {"learning_rate": -1}}})
    with pytest.raises(ConfigError) as e:
        load_experiment(path)
    assert str(e.value) == f"{path.resolve()}: stages.sft.learning_rate: -1.0 must be > 0"
    with pytest.raises(ConfigError, match=r"^command-line override: stages\.ppo\.temperature: 0\.0 must be > 0; "):
        load_experiment(REPO / "configs" / "tiny.yaml", ["stages.ppo.temperature=0"])


def test_every_out_of_range_value_is_listed_at_once():
    overrides = ["stages.sft.learning_rate=-1", "stages.ppo.gamma=1.5", "stages.ppo.kl_estimator=k2",
                 "stages.pretrain.model.num_heads=0", "tracking.wandb=offlin"]
    with pytest.raises(ConfigError) as e:
        load_experiment(REPO / "configs" / "tiny.yaml", overrides)
    msg = str(e.value)
    assert msg.startswith("5 problems:\n")
    for line in ("stages.sft.learning_rate: -1.0 must be > 0", "stages.ppo.gamma: 1.5 must be in [0, 1]",
                 "stages.ppo.kl_estimator: 'k2' must be one of 'k1', 'k3'",
                 "stages.pretrain.model.num_heads: 0 must be >= 1",
                 "tracking.wandb: 'offlin' must be one of 'offline', 'online', 'disabled'"):
        assert f"  - command-line override: {line}" in msg.splitlines()


def test_none_skips_the_check_and_logging_only_fields_keep_out_of_the_key(workdir):
    path = write_config(workdir / "e.yaml", {"stages": {"ppo": {"min_unique_share": None, "save_every": 0}}})
    cfg = load_experiment(path).stages["ppo"].config
    assert cfg.min_unique_share is None
    assert "save_every" not in result_config(cfg) and "gamma" in result_config(cfg)
    write_config(path, {"stages": {"ppo": {"save_every": -1}}})
    with pytest.raises(ConfigError, match=r"stages\.ppo\.save_every: -1 must be >= 0"):
        load_experiment(path)


def test_ranges_are_checked_before_the_cross_field_checks(workdir):
    # num_minibatches=0 would divide by zero in PPOConfig.__post_init__ if ranges came second
    path = write_config(workdir / "e.yaml", {"stages": {"ppo": {"num_minibatches": 0}}})
    with pytest.raises(ConfigError, match=r"stages\.ppo\.num_minibatches: 0 must be >= 1"):
        load_experiment(path)
    write_config(path, {"stages": {"ppo": {"rollout_batch_size": 10, "num_minibatches": 4}}})
    with pytest.raises(ConfigError, match="must divide evenly"):
        load_experiment(path)
    write_config(path, {"stages": {"pretrain": {"model": {"num_heads": 4, "num_kv_heads": 3}}}})
    with pytest.raises(ConfigError, match=r"num_heads \(4\) must be divisible by model\.num_kv_heads \(3\)"):
        load_experiment(path)


def test_the_comparison_runs_the_very_stages_of_the_configs_it_copies():
    # configs/compare.yaml repeats the stages of the single-method configs so that, after those ran,
    # `make compare` trains nothing again: that holds only while every copied stage has the same key
    from rlhf.pipeline import Pipeline

    def keys(name: str) -> dict[str, str]:
        pipe = Pipeline(load_experiment(REPO / "configs" / name))
        return {stage: pipe.stages[stage].key for stage in pipe.order}

    compare = keys("compare.yaml")
    # compare.yaml's stage -> (the config it copies, that config's name for it)
    copied = {**{s: ("tiny.yaml", s) for s in ("pretrain", "sft", "preferences", "reward", "ppo")},
              "ppo_rm": ("tiny-ppo-rm.yaml", "ppo_rm"), "grpo": ("tiny-grpo.yaml", "grpo"),
              "grpo_rlvr": ("tiny-rlvr.yaml", "grpo"), "dpo": ("tiny-dpo.yaml", "dpo"), "kto": ("tiny-kto.yaml", "kto")}
    assert set(compare) == set(copied)
    sources = {config: keys(config) for config, _ in copied.values()}
    for stage, (config, own) in copied.items():
        assert compare[stage] == sources[config][own], f"compare.yaml's {stage} is not {config}'s {own}"


def test_a_field_keyed_when_set_leaves_keys_alone_at_its_default():
    from dataclasses import dataclass

    from rlhf.schema import checked, result_config

    @dataclass
    class Cfg:
        lr: float = checked(1e-3, gt=0)
        fast: bool = checked(False, keyed_when_set=True)

    assert result_config(Cfg()) == {"lr": 1e-3}  # the key of every artifact built before `fast` existed
    assert result_config(Cfg(fast=True)) == {"lr": 1e-3, "fast": True}
    # the sampling switches added for the released-model experiment are such fields
    from rlhf.schema import EvalConfig
    from stages.ppo_config import PPOConfig
    from stages.preferences import PreferencesConfig

    for cfg in (EvalConfig(), PPOConfig(), PreferencesConfig()):
        assert "bf16_sampling" not in result_config(cfg)
        assert result_config(type(cfg)(bf16_sampling=True))["bf16_sampling"] is True


def test_a_field_keyed_unless_its_old_default_keeps_the_keys_built_at_that_value():
    from dataclasses import dataclass

    from rlhf.schema import checked, result_config

    @dataclass
    class Cfg:
        lr: float = checked(1e-3, gt=0)
        sampler: str = checked("new", keyed_unless="old")

    assert result_config(Cfg(sampler="old")) == {"lr": 1e-3}  # the key of every artifact built at the old default
    assert result_config(Cfg()) == {"lr": 1e-3, "sampler": "new"}  # the new default gets keys of its own
    # the RL stages' sampler is such a field: inverse_cdf by default, gumbel and multinomial before
    from stages.ppo_config import PPOConfig

    assert result_config(PPOConfig())["sampler"] == "inverse_cdf"
    assert result_config(PPOConfig(sampler="gumbel"))["sampler"] == "gumbel"
    assert "sampler" not in result_config(PPOConfig(sampler="multinomial"))
