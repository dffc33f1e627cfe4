"""The memory planner: parameter counts from configs, the per-process estimate, `rlhf plan --memory`."""

from __future__ import annotations

import pytest

from conftest import REPO, ppo_config, write_config
from rlhf.cli import main
from rlhf.memory import LaunchSettings, ModelShape, estimate_ppo_memory, launch_settings, lora_params, shape_from_config

POLICY = ModelShape(params=1_000_000, num_layers=2, num_kv_heads=2, head_dim=16, vocab_size=1000, hidden_size=32)
REWARD = ModelShape(params=900_000, num_layers=2, num_kv_heads=2, head_dim=16, vocab_size=1000, hidden_size=32)
BATCH = dict(rollout_batch_size=8, micro_batch_size=4, prompt_tokens=24, response_tokens=8)  # 32 tokens a row


def test_pythia_160m_parameters_from_its_config_alone():
    from transformers import GPTNeoXConfig

    config = GPTNeoXConfig(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, rotary_pct=0.25, tie_word_embeddings=False)
    # embed_in 50304*768 = 38,633,472; per layer: 2 LayerNorms 4*768 = 3,072, qkv 768*2304+2304 = 1,771,776,
    # dense 768*768+768 = 590,592, MLP 768*3072+3072 = 2,362,368 and 3072*768+768 = 2,360,064, so 7,087,872;
    # x 12 = 85,054,464; final LayerNorm 1,536; embed_out 38,633,472. Sum 162,322,944 (Pythia-160M's count).
    assert shape_from_config(config).params == 162_322_944
    # the reward/value model swaps embed_out for a 768 -> 1 score head: 162,322,944 - 38,633,472 + 768
    assert shape_from_config(config, sequence_classification=True).params == 123_690_240
    assert shape_from_config(config).head_dim == 64


def test_ddp_two_processes_holds_everything_whole():
    est = estimate_ppo_memory(POLICY, REWARD, LaunchSettings(num_processes=2), **BATCH)
    # fp32 weights 4 B, gradients 4 B, AdamW m+v 8 B per trained parameter; nothing sharded under DDP
    assert est.rows["policy weights"] == 4_000_000
    assert est.rows["policy gradients"] == 4_000_000
    assert est.rows["policy optimizer state (AdamW)"] == 8_000_000
    assert est.rows["value optimizer state (AdamW)"] == 7_200_000
    assert est.rows["reference (frozen)"] == 4_000_000 and est.rows["reward model (frozen)"] == 3_600_000
    # KV: 2 (K, V) x 2 layers x 2 heads x 16 dims x 32 tokens x 4 rows per process x 4 B = 65,536
    assert est.rows["KV cache (generation)"] == 65_536
    # logits over the response columns only: 4 / 2 = 2 rows x (8 + 1) columns x 1000 vocab x 4 B = 72,000
    assert est.rows["logits (training micro-batch)"] == 72_000
    # 16e6 (policy) + 14.4e6 (value) + 4e6 + 3.6e6 (frozen) + 65,536 + 72,000
    assert est.total == 38_137_536
    assert "policy gathered for generation" not in est.rows


def test_zero3_in_bf16_shards_everything_over_the_processes():
    launch = LaunchSettings(num_processes=4, zero_stage=3, mixed_precision="bf16")
    est = estimate_ppo_memory(POLICY, REWARD, launch, **BATCH)
    # DeepSpeed bf16: 2 B weights, 2 B gradients, 12 B optimizer (fp32 master + m + v), all / 4
    assert est.rows["policy weights"] == 500_000 and est.rows["policy gradients"] == 500_000
    assert est.rows["policy optimizer state (AdamW)"] == 3_000_000
    assert est.rows["value weights"] == 450_000 and est.rows["value optimizer state (AdamW)"] == 2_700_000
    # frozen models in bf16, sharded too: 1e6 x 2 / 4 and 9e5 x 2 / 4
    assert est.rows["reference (frozen)"] == 500_000 and est.rows["reward model (frozen)"] == 450_000
    # KV in bf16 for 8 / 4 = 2 rows: 2 x 2 x 2 x 16 x 32 x 2 x 2 B = 16,384; generation gathers 1e6 x 2 B
    assert est.rows["KV cache (generation)"] == 16_384
    assert est.rows["policy gathered for generation"] == 2_000_000
    assert est.rows["logits (training micro-batch)"] == 1 * 9 * 1000 * 4


def test_zero3_in_fp32_gathers_the_policy_at_four_bytes_a_parameter():
    est = estimate_ppo_memory(POLICY, REWARD, LaunchSettings(num_processes=4, zero_stage=3), **BATCH)
    assert est.rows["policy weights"] == 1_000_000  # 1e6 x 4 B / 4 processes
    assert est.rows["policy gathered for generation"] == 4_000_000  # the whole policy, 1e6 x 4 B


def test_zero2_shards_gradients_and_optimizer_state_only():
    est = estimate_ppo_memory(POLICY, REWARD, LaunchSettings(num_processes=4, zero_stage=2, mixed_precision="bf16"),
                              **BATCH)
    assert est.rows["policy weights"] == 2_000_000  # whole, in bf16
    assert est.rows["policy gradients"] == 500_000 and est.rows["policy optimizer state (AdamW)"] == 3_000_000
    assert est.rows["reference (frozen)"] == 2_000_000  # not sharded below ZeRO-3


def test_lora_trains_adapters_and_has_no_reference_copy():
    adapters = lora_params(POLICY, r=8, num_target_modules=4)
    assert adapters == 2 * 4 * 2 * 8 * 32  # layers x modules x (A + B) x r x hidden = 4,096
    est = estimate_ppo_memory(POLICY, REWARD, LaunchSettings(), lora_trainable=adapters, **BATCH)
    assert "reference (frozen)" not in est.rows
    assert est.rows["policy weights"] == 4_000_000  # the base weights are still held
    assert est.rows["policy gradients"] == 4 * 4_096 and est.rows["policy optimizer state (AdamW)"] == 8 * 4_096


def test_launch_settings_read_from_the_launch_configs():
    s = launch_settings(str(REPO / "configs" / "accelerate" / "zero3.yaml"))
    assert (s.num_processes, s.zero_stage, s.fsdp, s.mixed_precision) == (8, 3, False, "bf16")
    assert launch_settings(str(REPO / "configs" / "accelerate" / "fsdp.yaml")).fsdp
    assert launch_settings(str(REPO / "configs" / "accelerate" / "cpu-ddp.yaml")).gpu is False


def test_plan_memory_prints_a_table_and_warns_when_it_cannot_fit(workdir, tiny_data, capsys):
    # nothing has run: the planner sizes the models from the pretraining config
    path = write_config(workdir / "exp.yaml", ppo_config(tiny_data, str(workdir / "store")))
    launch = str(REPO / "configs" / "accelerate" / "cpu-ddp.yaml")
    assert main(["plan", str(path), "--memory", "--launch", launch]) == 0
    out = capsys.readouterr().out
    assert "stages.ppo: memory per process (cpu-ddp.yaml: CPU DDP, 2 process(es)" in out and "KV cache (generation)" in out
    # 2**24 rollout rows: the KV cache and logits alone are hundreds of gigabytes per process
    assert main(["plan", str(path), "--memory", "--launch", launch, "stages.ppo.rollout_batch_size=16777216"]) == 1
    assert "warning: stages.ppo needs more memory per process than is available" in capsys.readouterr().err


@pytest.mark.parametrize("launch", ["single", "ddp", "zero2", "zero3", "fsdp"])
def test_every_gpu_launch_config_gives_a_plan(workdir, tiny_data, launch, capsys):
    path = write_config(workdir / "exp.yaml", ppo_config(tiny_data, str(workdir / "store")))
    code = main(["plan", str(path), "--memory", "--launch", str(REPO / "configs" / "accelerate" / f"{launch}.yaml")])
    assert code == 0 and "total" in capsys.readouterr().out


def test_run_with_launch_warns_before_launching_what_cannot_fit(workdir, tiny_data, caplog):
    from rlhf.cli import _warn_if_memory_short, build_parser

    path = write_config(workdir / "exp.yaml", ppo_config(tiny_data, str(workdir / "store")))
    launch = str(REPO / "configs" / "accelerate" / "cpu-ddp.yaml")
    fits = build_parser().parse_args(["run", str(path), "--launch", launch])
    too_big = build_parser().parse_args(["run", str(path), "stages.ppo.rollout_batch_size=16777216", "--launch", launch])
    with caplog.at_level("WARNING", logger="rlhf"):
        _warn_if_memory_short(fits)
        assert not caplog.records
        _warn_if_memory_short(too_big)
    assert "warning: stages.ppo needs about" in caplog.text and "rlhf plan" in caplog.text


def test_plan_memory_without_an_rl_stage_names_the_file(tiny_yaml, capsys):
    assert main(["plan", str(tiny_yaml), "--memory"]) == 2
    err = capsys.readouterr().err
    assert f"error: memory plan: {tiny_yaml}: no stage under stages: describes its memory" in err
    assert "without --memory" in err


def test_plan_memory_takes_the_prompt_bound_from_the_config(workdir, tiny_data, capsys):
    path = write_config(workdir / "exp.yaml", ppo_config(tiny_data, str(workdir / "store")))
    assert main(["plan", str(path), "--memory"]) == 0
    assert "assumes prompts of 256 tokens; set --prompt-tokens" in capsys.readouterr().out
    assert main(["plan", str(path), "--memory", "stages.ppo.max_prompt_tokens=40"]) == 0
    assert "assumes prompts of 40 tokens; set stages.ppo.max_prompt_tokens" in capsys.readouterr().out


def test_plan_memory_names_the_stage_it_plans(workdir, tiny_data, capsys):
    """The plan comes from the stage's own description (`Stage.memory_plan`), whatever the block is called."""
    cfg = ppo_config(tiny_data, str(workdir / "store"))
    cfg["stages"]["rlvr"] = {**cfg["stages"].pop("ppo"), "class": "stages.grpo:GRPOStage", "max_prompt_tokens": 40}
    path = write_config(workdir / "exp.yaml", cfg)
    assert main(["plan", str(path), "--memory"]) == 0
    out = capsys.readouterr().out
    assert "stages.rlvr: memory per process" in out and "set stages.rlvr.max_prompt_tokens" in out
    assert "value weights" not in out  # GRPO's estimator has no value model
