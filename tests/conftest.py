"""Shared fixtures: tiny real-looking data, a 2-layer experiment, a store in a temporary directory.

Every test runs offline (HF_HUB_OFFLINE) with wandb disabled unless a test turns it on, in its own
working directory so runs/ and artifacts/ never touch the checkout.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _threads_per_worker() -> None:
    """Under `pytest -n N` the cores are shared by N workers, and each torch would start a thread per core:
    on 2 cores, 2 workers x 2 threads ran the suite in 376 s against 246 s with one thread each (user
    time 11.3 against 7.1 minutes: the surplus threads only waited on each other). The tests' own
    subprocesses (`rlhf run`, `accelerate launch`) inherit the setting."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))


_threads_per_worker()

REPO = Path(__file__).resolve().parents[1]

WORDS = (
    "the a cat dog bird sat ran sang on in under over mat tree sky happy sad bright dark "
    "morning evening river stone quick slow green red blue small large old young"
).split()


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))).capitalize() + "." for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session", autouse=True)
def local_cache(tmp_path_factory):
    """The pipeline's local cache (checked data files, remote artifacts) in a temporary directory, not ~/.cache."""
    if "RLHF_CACHE" not in os.environ:
        os.environ["RLHF_CACHE"] = str(tmp_path_factory.mktemp("rlhf-cache"))


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A fresh working directory (runs/ and relative stores land here)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tiny_data(workdir) -> dict[str, Path]:
    """Small text corpora in the project's schemas."""
    return make_tiny_data(workdir)


def length_judge(prompts: list[str], responses: list[str]) -> list[float]:
    """A user-style judge (named by dotted path in YAML) that always separates a 2-layer model's samples."""
    return [float(len(r)) for r in responses]


def make_tiny_data(root: Path) -> dict[str, Path]:
    d = root / "data"
    return {
        "pretrain_train": write_jsonl(d / "pretrain_train.jsonl", [{"text": s} for s in sentences(600, 0)]),
        "pretrain_eval": write_jsonl(d / "pretrain_eval.jsonl", [{"text": s} for s in sentences(60, 1)]),
        "sft_train": write_jsonl(d / "sft_train.jsonl", sft_rows(400, 2)),
        "sft_eval": write_jsonl(d / "sft_eval.jsonl", sft_rows(40, 3)),
        "prompts": write_jsonl(d / "prompts.jsonl", [{"prompt": r["prompt"]} for r in sft_rows(40, 4)]),
        "prefs_train": write_jsonl(d / "prefs_train.jsonl", preference_rows(200, 5)),
        "prefs_eval": write_jsonl(d / "prefs_eval.jsonl", preference_rows(40, 6)),
    }


def preference_rows(n: int, seed: int) -> list[dict]:
    """Pairs where the chosen sentence is the cheerful one, as the default experiment's judge prefers."""
    rng = random.Random(seed)
    rows = []
    for s, row in zip(sentences(n, seed), sft_rows(n, seed)):
        body = s.rstrip(".").lower()
        rows.append({"prompt": row["prompt"],
                     "chosen": f"{rng.choice(['Happy', 'Bright', 'Lovely'])} {body}.",
                     "rejected": f"{rng.choice(['Sad', 'Dark', 'Awful'])} {body}."})
    return rows


def sft_rows(n: int, seed: int) -> list[dict]:
    """Pairs in the default experiment's form: use a word in a short sentence."""
    rng = random.Random(seed)
    rows = []
    for s in sentences(n, seed):
        word = rng.choice(s.rstrip(".").split()).lower()
        rows.append({"prompt": f'Use the word "{word}" in a sentence.', "response": s})
    return rows


def policy_reference_pairs(n_pairs: int):
    """(tokenizer, policy, reference, pairs) for checking a preference loss against TRL: 2-layer models of
    different weights (so the log-ratios are far from 0) and `n_pairs` pairs in conversational form."""
    import datasets
    import torch

    from rlhf.models import ModelConfig, build_causal_lm
    from rlhf.preferences import conversational
    from rlhf.tokenizer import TokenizerConfig, train_tokenizer

    tok = train_tokenizer(sentences(200, 0), TokenizerConfig(vocab_size=320, min_frequency=1))
    size = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    policy = build_causal_lm(size, tok)
    torch.manual_seed(1)
    reference = build_causal_lm(size, tok)
    rows = [{"prompt": r["prompt"], "chosen": r["response"], "rejected": s}
            for r, s in zip(sft_rows(n_pairs, 7), sentences(n_pairs, 8))]
    return tok, policy, reference, datasets.Dataset.from_list([conversational(r) for r in rows])


def tiny_config(data: dict[str, Path], store: str, stages: tuple[str, ...] = ("pretrain",), **pretrain) -> dict:
    """A 2-layer experiment that trains in seconds."""
    block = {
        "train_data": str(data["pretrain_train"]),
        "eval_data": str(data["pretrain_eval"]),
        "tokenizer": {"vocab_size": 320, "min_frequency": 1},
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64},
        "block_size": 32,
        "max_steps": 8,
        "batch_size": 8,
        "warmup_steps": 1,
        "eval_blocks": 16,
        "logging_steps": 2,
        "save_steps": 4,
    }
    block.update(pretrain)
    blocks = {
        "pretrain": block,
        "sft": {
            "train_data": str(data["sft_train"]),
            "eval_data": str(data["sft_eval"]),
            "max_length": 48,
            "max_steps": 6,
            "batch_size": 8,
            "warmup_steps": 1,
            "eval_examples": 16,
            "min_eos_rate": 0.0,
            "logging_steps": 2,
            "save_steps": 3,
        },
        "preferences": {
            # named, because the stage registry (pyproject.toml's entry points) is read from the installed metadata
            "class": "stages.preferences:PreferencesStage",
            "prompts": str(data["prompts"]), "num_prompts": 20, "k": 3, "margin": 0.0,
            "judge": "conftest:length_judge", "eval_fraction": 0.25, "max_new_tokens": 8,
            "train_data": str(data["prefs_train"]),
            "eval_data": str(data["prefs_eval"]),
        },
        "reward": {
            "preferences": "preferences",
            "max_length": 64,
            "max_steps": 6,
            "batch_size": 8,
            "warmup_steps": 1,
            "min_accuracy": 0.0,
            "stats_samples": 16,
            "logging_steps": 2,
            "save_steps": 3,
        },
    }
    if "reward" in stages and "preferences" not in stages:  # the reward model learns the human pairs alone
        blocks["reward"].update(preferences=None, train_data=str(data["prefs_train"]), eval_data=str(data["prefs_eval"]),
                                stats_prompts=str(data["prompts"]))
    runs = str(Path(store).parent / "runs")
    evaluation = {"prompts": str(data["prompts"]), "num_prompts": 8, "max_new_tokens": 8, "batch_size": 8,
                  "num_logged_samples": 2,
                  "judges": {"gold": "word_vader", "heldout": "word_textblob", "task": "uses_word", "fluency": "fluency"}}
    return {"name": "test", "seed": 0, "store": store, "tracking": {"wandb": "disabled", "dir": runs},
            "evaluation": evaluation, "stages": {name: blocks[name] for name in stages}}


def small_rl_run(stage: str, prompts, **settings) -> list[str]:
    """Dotted overrides for a short run of RL stage `stage` on the tiny models: 8 responses per step in groups
    of 4, at most 8 tokens each, 2 minibatches, 2 steps, no evaluation during training, no checkpoints, no
    diversity watchdog. `settings` (YAML values, e.g. rewards="{reward: 1.0}") add to or replace these."""
    base = {"prompts": prompts, "num_steps": 2, "rollout_batch_size": 8, "samples_per_prompt": 4,
            "num_minibatches": 2, "max_new_tokens": 8, "eval_every": 0, "save_every": 0, "min_unique_share": "null"}
    return [f"stages.{stage}.{k}={v}" for k, v in {**base, **settings}.items()]


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture
def tiny_yaml(workdir, tiny_data) -> Path:
    return write_config(workdir / "exp.yaml", tiny_config(tiny_data, str(workdir / "store")))


PPO_BLOCK = {
    "max_new_tokens": 8,
    "num_steps": 2,
    "rollout_batch_size": 8,
    "num_minibatches": 2,
    "ppo_epochs": 2,
    "eval_every": 0,
    "save_every": 1,
}


DPO_BLOCK = {
    "class": "stages.dpo:DPOStage",  # named, as the preferences stage above
    "max_length": 64,
    "max_steps": 4,
    "batch_size": 8,
    "warmup_steps": 1,
    "learning_rate": 1e-3,
    "min_accuracy": 0.0,
    "min_eos_rate": 0.0,
    "eval_every": 2,
    "logging_steps": 1,
    "save_steps": 2,
}


def dpo_config(data: dict[str, Path], store: str, **dpo) -> dict:
    """pretrain, SFT, preferences and DPO from the SFT policy on the preferences' pairs."""
    cfg = tiny_config(data, store, stages=("pretrain", "sft", "preferences"))
    cfg["stages"]["dpo"] = {**DPO_BLOCK, **dpo}
    return cfg


def ppo_config(data: dict[str, Path], store: str, **ppo) -> dict:
    """The whole tiny experiment: pretrain, SFT, preferences, reward model, PPO."""
    cfg = tiny_config(data, store, stages=("pretrain", "sft", "preferences", "reward"))
    cfg["stages"]["ppo"] = {"prompts": str(data["prompts"]), **PPO_BLOCK, **ppo}
    return cfg


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory) -> dict[str, Path]:
    """The tiny data, written once per test process. Experiments that name these files get the same
    artifact keys (keys follow the data's paths), so their upstream artifacts can be built once."""
    return make_tiny_data(tmp_path_factory.mktemp("shared-data"))


@pytest.fixture(scope="session")
def upstream_store(shared_data, tmp_path_factory) -> Path:
    """A store holding the tiny experiment's pretrain -> sft -> preferences -> reward artifacts on
    `shared_data`, built once per test process. Modules copy it (`seeded_store`) and never write to it."""
    from rlhf.config import load_experiment
    from rlhf.pipeline import Pipeline

    root = tmp_path_factory.mktemp("upstream")
    path = write_config(root / "exp.yaml", ppo_config(shared_data, str(root / "store")))
    Pipeline(load_experiment(path)).run(until="reward")
    return root / "store"


def seeded_store(upstream_store: Path, root: Path) -> Path:
    """`root`/store: a copy of `upstream_store` of its own, where a module's experiment on `shared_data` finds
    its pretrain .. reward artifacts already built (stages with other settings train as usual)."""
    shutil.copytree(upstream_store, root / "store")
    return root / "store"


@pytest.fixture(scope="module")
def ppo_upstream(shared_data, upstream_store, tmp_path_factory) -> Path:
    """A PPO experiment with its pretrain -> sft -> preferences -> reward artifacts built, in a store of this
    test module's own."""
    root = tmp_path_factory.mktemp("ppo")
    return write_config(root / "exp.yaml", ppo_config(shared_data, str(seeded_store(upstream_store, root))))


def assert_plain_head_matches_trls(config: Path, stage: str, rows: int = 8) -> None:
    """`stage` (DPO, KTO) of the experiment `config`, opened with TRL's fused LM head (`fused_lm_head=true`)
    and with the model's own logits (`rlhf.trainers.plain_lm_head`: the default, null, on a CPU): one batch
    of `rows` training examples gives the same loss, gradient and logged metrics under both, and the own
    head reads the logits from the first answer token on only (fewer columns than the batch has; TRL's tiles
    score them all)."""
    import torch

    from rlhf.config import load_experiment
    from rlhf.pipeline import Pipeline

    runs = {}
    for setting in ("true", "false" if torch.cuda.is_available() else "null"):
        built = Pipeline(load_experiment(config, [f"stages.{stage}.fused_lm_head={setting}"])).stages[stage]
        trainer = built.open(tracking=False).trainer
        head = trainer.model.get_output_embeddings()
        columns = []
        hook = head.register_forward_hook(lambda module, args, out: columns.append(args[0].shape[1]))
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(rows)])
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        hook.remove()
        runs[setting] = (loss.item(), {k: v[-1] for k, v in trainer._metrics["train"].items()},
                         {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None},
                         columns, batch["input_ids"].shape[1])
    (fused_loss, fused_logs, fused_grads, fused_columns, _), (loss, logs, grads, columns, width) = runs.values()
    assert loss == pytest.approx(fused_loss, rel=1e-5, abs=1e-6)
    assert logs.keys() == fused_logs.keys() and {"entropy", "logits/chosen"} <= logs.keys()
    for name, value in logs.items():
        assert value == pytest.approx(fused_logs[name], rel=1e-4, abs=1e-5), name
    assert grads.keys() == fused_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.allclose(grad, fused_grads[name], rtol=1e-4, atol=1e-6), name
    assert fused_columns == []  # TRL's head multiplies by the LM head's weight itself
    assert columns and all(0 < c < width for c in columns)  # policy and reference, from the answers on
