"""The artifact store: manifests last, atomic publish, aliases, local and fsspec roots."""

from __future__ import annotations

import json
import uuid

import pytest

from rlhf.artifacts import MANIFEST, ArtifactStore, content_key


def _stores(tmp_path):
    return {
        "path": ArtifactStore(str(tmp_path / "local"), cache_dir=str(tmp_path / "cache")),
        "file-url": ArtifactStore(f"file://{tmp_path / 'viaurl'}", cache_dir=str(tmp_path / "cache")),
        "memory": ArtifactStore(f"memory://store-{uuid.uuid4().hex}", cache_dir=str(tmp_path / "cache")),
    }


@pytest.mark.parametrize("kind", ["path", "file-url", "memory"])
def test_publish_read_and_alias(tmp_path, kind):
    store = _stores(tmp_path)[kind]
    assert store.keys() == [] and not store.exists("k1")
    with store.staging("k1") as out:
        (out / "weights.bin").write_bytes(b"\x00" * 10)
        (out / "sub").mkdir()
        (out / "sub" / "x.json").write_text("{}")
        store.publish(out, "k1", {"stage": "pretrain", "metrics": {"loss": 1.0}})
    assert store.exists("k1") and store.keys() == ["k1"]
    m = store.manifest("k1")
    assert m["stage"] == "pretrain" and m["key"] == "k1" and "created" in m
    local = store.local_dir("k1")
    assert (local / "weights.bin").read_bytes() == b"\x00" * 10
    assert json.loads((local / "sub" / "x.json").read_text()) == {}
    store.set_alias("exp", "pretrain", "k1")
    assert store.alias("exp", "pretrain") == "k1" and store.resolve("exp/pretrain") == "k1"
    assert store.resolve("k") == "k1"
    with pytest.raises(KeyError):
        store.resolve("exp/sft")


@pytest.mark.parametrize("kind", ["path", "file-url", "memory"])
def test_interrupted_save_leaves_store_unchanged(tmp_path, kind):
    store = _stores(tmp_path)[kind]
    with pytest.raises(KeyboardInterrupt):
        with store.staging("k2") as out:
            (out / "model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt  # the crash happens before publish
    assert store.keys() == [] and not store.exists("k2")
    with pytest.raises(KeyError):
        store.local_dir("k2")
    if store.is_local:  # nothing left behind in the staging area either
        assert list((tmp_path / ("local" if kind == "path" else "viaurl") / "tmp").iterdir()) == []


def test_directory_without_manifest_is_not_an_artifact(tmp_path):
    store = ArtifactStore(str(tmp_path / "s"))
    half = tmp_path / "s" / "artifacts" / "k3"
    half.mkdir(parents=True)
    (half / "model.safetensors").write_bytes(b"half")  # e.g. left by a copy that died
    assert not store.exists("k3") and store.keys() == []
    with store.staging("k3") as out:
        (out / "model.safetensors").write_bytes(b"full")
        store.publish(out, "k3", {})
    assert (half / "model.safetensors").read_bytes() == b"full" and (half / MANIFEST).exists()


def test_content_key_is_stable_and_sensitive():
    a = {"stage": "x", "config": {"lr": 1e-3, "steps": 10}, "seed": 0}
    assert content_key(a) == content_key(json.loads(json.dumps(a)))
    assert content_key(a) == content_key({"seed": 0, "config": {"steps": 10, "lr": 1e-3}, "stage": "x"})
    assert content_key(a) != content_key({**a, "seed": 1})
    assert len(content_key(a)) == 16


@pytest.mark.parametrize("kind", ["path", "file-url", "memory"])
def test_same_key_keeps_the_first_unless_replaced(tmp_path, kind):
    """Same key = same work, so a second publish keeps the first artifact; a forced rerun (`replace`)
    swaps it out whole, and a remote store's local cache notices."""
    store = _stores(tmp_path)[kind]

    def publish(tag: str, replace: bool) -> None:
        with store.staging("k") as out:
            (out / f"only-in-{tag}.txt").write_text(tag)
            store.publish(out, "k", {"metrics": {"run": tag}}, replace=replace)

    publish("first", replace=False)
    assert store.local_dir("k").joinpath("only-in-first.txt").exists()  # cached now, for remote roots
    publish("second", replace=False)
    assert store.manifest("k")["metrics"] == {"run": "first"}
    publish("forced", replace=True)
    assert store.manifest("k")["metrics"] == {"run": "forced"}
    files = sorted(p.name for p in store.local_dir("k").iterdir())
    assert files == ["manifest.json", "only-in-forced.txt"]  # nothing of the first artifact is left
    assert store.keys() == ["k"]


def test_every_command_opens_the_experiment_store_with_its_cache_dir(tmp_path):
    """`ArtifactStore.for_experiment` is the one way the commands open an experiment's store; `rlhf chat`'s
    own copy once dropped `cache_dir`, so a remote policy was copied into the default cache instead."""
    from rlhf.chat import resolve_model
    from rlhf.schema import ExperimentConfig

    root, cache = f"memory://store-{uuid.uuid4().hex}", tmp_path / "cache"
    store = ArtifactStore.for_experiment(ExperimentConfig(store=root, cache_dir=str(cache)))
    assert store.url == root and store.cache.parent == cache
    assert ArtifactStore.for_experiment(ExperimentConfig(store=root), str(tmp_path / "other")).url == str(tmp_path / "other")
    with store.staging("k1") as out:
        (out / "config.json").write_text("{}")
        store.publish(out, "k1", {"stage": "sft", "kind": "policy"})
    store.set_alias("exp", "sft", "k1")
    config = tmp_path / "exp.yaml"
    config.write_text(f"name: exp\nstore: {root}\ncache_dir: {cache}\nstages: {{}}\n")
    assert resolve_model("sft", str(config)).startswith(str(cache))
