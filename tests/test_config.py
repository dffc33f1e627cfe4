"""YAML experiments: inheritance, overrides, and errors that name the file, the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, write_config
from rlhf.config import ConfigError, load_experiment, result_config
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


def test_result_config_leaves_out_logging_fields():
    cfg = PretrainConfig()
    rc = result_config(cfg)
    assert "max_steps" in rc and "tokenizer" in rc and "vocab_size" in rc["tokenizer"]
    assert "logging_steps" not in rc and "save_steps" not in rc


# ---- the modules' imports ----------------------------------------------------------------------------------


def test_no_module_level_import_cycle_in_rlhf():
    import ast

    graph: dict[str, set[str]] = {}
    for f in (REPO / "rlhf").rglob("*.py"):
        mod = ".".join(f.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.parse(f.read_text()).body:  # module level only: imports inside functions are lazy
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                deps.add(node.module)
        graph[mod] = {d for d in deps if d.startswith("rlhf")}

    def visit(mod: str, path: list[str]) -> None:
        for dep in graph.get(mod, ()):
            assert dep not in path, f"import cycle: {' -> '.join([*path, dep])}"
            visit(dep, [*path, dep])

    for mod in graph:
        visit(mod, [mod])


@pytest.mark.parametrize("module", ["rlhf.errors", "rlhf.config", "rlhf.stage", "rlhf.tracking", "rlhf.distributed"])
def test_each_module_imports_alone(module):
    import subprocess
    import sys

    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    if module != "rlhf.distributed":
        assert out.stdout.strip() == "False", f"{module} imports torch"


def test_old_import_paths_still_work():
    from rlhf import config, data, distributed, errors, stage

    assert stage.StageError is errors.StageError and config.ConfigError is errors.ConfigError
    assert data.DataError is errors.DataError and distributed.LaunchError is errors.LaunchError
    assert stage.stage_class is config.stage_class and stage.registered_stages is config.registered_stages
