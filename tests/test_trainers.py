"""The Trainer arguments the three Trainer stages build through `rlhf.trainers.trainer_arguments`.

The golden values are what each stage's `build_trainer` passed before the shared helper existed, on the
tiny test experiment (tests/conftest.py `tiny_config`), so moving the arguments into one place changed
no number that reaches a Trainer.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import TrainingArguments

from conftest import make_tiny_data, tiny_config, write_config
from rlhf.config import load_experiment
from rlhf.pipeline import Pipeline
from rlhf.trainers import TrainerSettings, trainer_arguments

# The same for all three: a fixed checkpoint count, reporting through our own callback ("none" reads back
# as []), the experiment's seed (0) for the model and the data order, pinned memory only with a GPU, and
# on one process the Trainer's default accelerator settings.
COMMON = {
    "save_total_limit": 2,
    "report_to": [],
    "seed": 0,
    "data_seed": 0,
    "dataloader_num_workers": 0,
    "dataloader_pin_memory": torch.cuda.is_available(),
    "gradient_accumulation_steps": 1,  # every config's default
    "max_grad_norm": 1.0,  # every config's default
    "bf16": False,  # every config's default
    "warmup_steps": 1,  # tiny_config
    "logging_steps": 2,  # tiny_config
    "lr_scheduler_type": "cosine",  # pretrain and reward fix it; SFT's lr_scheduler_type defaults to it
    "accelerator_config": {"dispatch_batches": None, "even_batches": True, "gradient_accumulation_kwargs": None,
                           "non_blocking": False, "split_batches": False, "use_seedable_sampler": True},
}

GOLDEN = {
    "pretrain": ("TrainingArguments", {
        **COMMON,
        "max_steps": 8, "per_device_train_batch_size": 8, "save_steps": 4,  # tiny_config
        "per_device_eval_batch_size": 64,  # PretrainConfig.eval_batch_size, not batch_size
        "learning_rate": 3e-3, "weight_decay": 0.1,  # PretrainConfig defaults
    }),
    "sft": ("SFTConfig", {
        **COMMON,
        "max_steps": 6, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "save_steps": 3,
        "max_length": 48,  # tiny_config
        "learning_rate": 1e-3, "weight_decay": 0.0, "packing": False,  # SFTConfig defaults
        "train_sampling_strategy": "random",  # group_by_length off
        "assistant_only_loss": True,
    }),
    "reward": ("RewardConfig", {
        **COMMON,
        "max_steps": 6, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "save_steps": 3,
        "max_length": 64,  # tiny_config
        "learning_rate": 5e-4, "weight_decay": 0.0, "center_rewards_coefficient": 0.01,  # RewardConfig defaults
    }),
}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """The tiny experiment with its pretrain artifact; the reward stage starts from it (no SFT run needed)."""
    root = tmp_path_factory.mktemp("trainers")
    cfg = tiny_config(make_tiny_data(root), str(root / "store"), stages=("pretrain", "sft", "reward"))
    cfg["stages"]["reward"]["model"] = "pretrain"
    path = write_config(root / "exp.yaml", cfg)
    Pipeline(load_experiment(path)).run(until="pretrain")
    return path


def _args(path, stage, *overrides):
    built = Pipeline(load_experiment(path, list(overrides))).stages[stage].open(tracking=False)
    return built, built.trainer.args


def test_every_trainer_stage_config_is_trainer_settings():
    from stages.dpo import DPOConfig
    from stages.pretrain import PretrainConfig
    from stages.reward import RewardConfig
    from stages.sft import SFTConfig

    for cls in (PretrainConfig, SFTConfig, RewardConfig, DPOConfig):  # what trainer_arguments reads by name
        assert issubclass(cls, TrainerSettings), cls.__name__
    # a redeclared default replaces the shared one
    assert (PretrainConfig().max_steps, DPOConfig().learning_rate, SFTConfig().max_steps) == (600, 1e-4, 400)


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward"])
def test_each_stage_hands_its_trainer_the_arguments_it_always_did(experiment, stage):
    built, args = _args(experiment, stage)
    class_name, golden = GOLDEN[stage]
    assert type(args).__name__ == class_name
    got = args.to_dict()
    assert {k: got[k] for k in golden} == golden
    assert got["output_dir"] == str(built.work_dir / "checkpoints")  # where rlhf.trainers.last_checkpoint looks


def test_sft_schedule_and_length_grouping_reach_the_trainer(experiment):
    _, args = _args(experiment, "sft", "stages.sft.lr_scheduler_type=linear", "stages.sft.group_by_length=true")
    assert args.lr_scheduler_type == "linear" and args.train_sampling_strategy == "group_by_length"


def test_a_stages_own_argument_wins_over_the_shared_one(tmp_path):
    config = TrainerSettings(max_steps=3, batch_size=4, gradient_accumulation_steps=2, learning_rate=0.1)
    stage = SimpleNamespace(config=config, work_dir=tmp_path, seed=7)
    args = trainer_arguments(TrainingArguments, stage, per_device_eval_batch_size=16)
    assert (args.per_device_train_batch_size, args.per_device_eval_batch_size) == (4, 16)
    assert (args.seed, args.data_seed, args.output_dir) == (7, 7, str(tmp_path / "checkpoints"))


def test_dataset_num_proc_reaches_trls_configs_and_stays_out_of_the_key(experiment):
    built, args = _args(experiment, "sft", "stages.sft.dataset_num_proc=2")
    plain, plain_args = _args(experiment, "sft")
    assert (args.dataset_num_proc, plain_args.dataset_num_proc) == (2, None)
    assert built.key == plain.key  # the same rows in any number of processes: the same artifact
    assert _args(experiment, "reward", "stages.reward.dataset_num_proc=2")[1].dataset_num_proc == 2
    # TrainingArguments has no such field: pretraining tokenizes through pack_texts instead
    assert not hasattr(_args(experiment, "pretrain", "stages.pretrain.dataset_num_proc=2")[1], "dataset_num_proc")
