"""The preferences stage: pairs as an artifact (files, manifest, lineage) that the reward model and DPO read."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from conftest import DPO_BLOCK, length_judge, make_tiny_data, ppo_config, write_config
from rlhf.config import load_experiment
from rlhf.pipeline import Pipeline
from rlhf.stage import StageError


def _pipe(path, *overrides):
    return Pipeline(load_experiment(path, list(overrides)))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The whole tiny experiment with a DPO stage beside PPO; pretrain -> sft -> preferences built."""
    root = tmp_path_factory.mktemp("preferences")
    cfg = ppo_config(make_tiny_data(root), str(root / "store"))
    cfg["stages"]["dpo"] = dict(DPO_BLOCK)
    path = write_config(root / "exp.yaml", cfg)
    pipe = _pipe(path)
    results = {r.name: r for r in pipe.run(until="preferences")}
    return path, pipe.store, results["preferences"].key, results["sft"].key


def test_artifact_is_a_dataset_with_a_manifest(built):
    import datasets

    path, store, key, sft_key = built
    art = store.local_dir(key)
    files = {split: str(art / f"{split}.jsonl") for split in ("train", "eval")}
    loaded = datasets.load_dataset("json", data_files=files)  # as anyone would, without project code
    m = store.manifest(key)
    assert m["kind"] == "preferences" and m["judge"] == "conftest:length_judge"
    assert m["inputs"]["policy"] == {"key": sft_key, "stage": "sft", "external": None}  # lineage: the sampled policy
    for split in ("train", "eval"):
        rows = loaded[split]
        assert set(rows.column_names) == {"prompt", "chosen", "rejected", "margin", "source"}
        counts = {s: rows["source"].count(s) for s in set(rows["source"])}
        assert counts == m["counts"][split] and len(rows) == m["metrics"][f"pairs_{split}"]
        assert m["metrics"][f"pairs_{split}_human"] == counts["human"]
    # tiny_config: 200 human training pairs, 40 held out; 20 prompts x 3 samples, at most one pair per prompt
    assert m["counts"]["train"]["human"] == 200 and m["counts"]["eval"]["human"] == 40
    assert m["counts"]["eval"]["onpolicy"] > 0 and m["counts"]["train"]["onpolicy"] + m["counts"]["eval"]["onpolicy"] <= 20
    margins = [r["margin"] for split in ("train", "eval") for r in loaded[split] if r["source"] == "onpolicy"]
    assert all(g >= 0 for g in margins) and m["metrics"]["margin_max"] == max(margins)
    assert all(r["margin"] is None for r in loaded["train"] if r["source"] == "human")
    samples = [json.loads(line) for line in (art / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 20 and all(len(s["responses"]) == 3 for s in samples)
    assert "pairs: train" in m["headline"] and "onpolicy" in m["headline"]


def test_the_pairs_are_the_judges_ranking_of_the_samples_and_a_rerun_gives_the_same(built):
    from rlhf.judges import load_judge, rank_pairs

    path, store, key, _ = built
    art = store.local_dir(key)
    before = {split: (art / f"{split}.jsonl").read_bytes() for split in ("train", "eval", "samples")}
    # from the samples alone: rank_pairs with the config's judge, margin and seed, the prompt split by the seed
    samples = [json.loads(line) for line in before["samples"].decode().splitlines()]
    prompts = [s["prompt"] for s in samples]
    pairs = rank_pairs(prompts, [s["responses"] for s in samples], load_judge(length_judge), margin=0.0, seed=0)
    held = set(random.Random(0).sample(prompts, int(len(prompts) * 0.25)))
    rows = {split: [json.loads(line) for line in before[split].decode().splitlines()] for split in ("train", "eval")}
    for split, keep in (("train", lambda p: p not in held), ("eval", lambda p: p in held)):
        expected = [{**p, "source": "onpolicy"} for p in pairs if keep(p["prompt"])]
        assert [r for r in rows[split] if r["source"] == "onpolicy"] == expected
    # same settings and seed: a forced rerun samples, ranks and splits exactly the same pairs
    _pipe(path).run(until="preferences", force=["preferences"])
    assert {split: (art / f"{split}.jsonl").read_bytes() for split in before} == before


def test_changing_the_judge_rebuilds_the_pairs_and_everything_downstream_only(built, capsys):
    path = built[0]
    keys = {name: stage.key for name, stage in _pipe(path).stages.items()}
    changed = {name: stage.key for name, stage in _pipe(path, "stages.preferences.judge=fluency").stages.items()}
    assert {n for n in keys if keys[n] != changed[n]} == {"preferences", "reward", "ppo", "dpo"}
    # and the plan says why, from the store: pretrain and SFT are built and stay
    plan = {p.name: p for p in _pipe(path, "stages.preferences.judge=fluency").plan()}
    assert not plan["sft"].will_run and not plan["pretrain"].will_run
    assert "judge 'conftest:length_judge' -> 'fluency'" in plan["preferences"].reason
    assert plan["reward"].reason == plan["dpo"].reason == "input preferences will run"
    # a reward-model setting changes the reward model and PPO, not the pairs nor DPO
    other = {name: stage.key for name, stage in _pipe(path, "stages.reward.max_steps=7").stages.items()}
    assert {n for n in keys if keys[n] != other[n]} == {"reward", "ppo"}


def test_reward_stage_reads_a_directory_of_pairs_and_keys_on_its_content(built, tmp_path):
    path, store, key, _ = built
    copy = tmp_path / "pairs"
    shutil.copytree(store.local_dir(key), copy)
    (copy / "manifest.json").unlink()  # a directory of pairs from anywhere, not an artifact
    stage = _pipe(path, f"stages.reward.preferences={copy}").stages["reward"].open(tracking=False)
    lines = (copy / "train.jsonl").read_text().splitlines()
    assert len(stage.train_ds) == len(lines) and set(stage.eval_sets) == {"human", "onpolicy"}
    assert stage.input_refs["preferences"].external == str(copy)
    before = stage.key
    (copy / "train.jsonl").write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # same names and sizes
    assert _pipe(path, f"stages.reward.preferences={copy}").stages["reward"].key != before
    with pytest.raises(StageError, match=r"stages\.reward\.preferences = '.*nowhere' is neither a stage"):
        _pipe(path, f"stages.reward.preferences={tmp_path / 'nowhere'}").stages["reward"].open(tracking=False)


def test_pairs_from_files_alone_need_no_policy(built):
    path, store, _, _ = built
    pipe = _pipe(path, "stages.preferences.policy=null")
    assert "policy" not in pipe.stages["preferences"].input_refs
    result = pipe.run(until="preferences")[-1]
    m = store.manifest(result.key)
    assert m["judge"] is None and m["counts"] == {"train": {"human": 200}, "eval": {"human": 40}}
    assert not (store.local_dir(result.key) / "samples.jsonl").exists()
    with pytest.raises(StageError, match=r"stages\.preferences\.policy is null and stages\.preferences\.train_data"):
        _pipe(path, "stages.preferences.policy=null", "stages.preferences.train_data=null").run(until="preferences")
