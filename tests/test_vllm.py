"""The vLLM rollout engine (rlhf/vllm_engine.py), where vLLM imports: `make test-vllm` runs these in .venv-vllm
(vLLM's CPU build); in the default environment they are skipped.

After a weight sync the engine's log-probabilities of what it sampled agree with the trainer's within
ATOL; before the sync, with the trainer's weights moved, they do not (so the agreement is the sync's
doing). A GRPO run samples every rollout through the engine and logs the mismatch.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("vllm")

from conftest import small_rl_run  # noqa: E402
from rlhf.config import load_experiment  # noqa: E402
from rlhf.engines import SamplingSettings  # noqa: E402
from rlhf.pipeline import Pipeline  # noqa: E402

ATOL = 2e-3
"""Largest |engine - trainer| log-probability of a sampled token, in float32: vLLM's CPU kernels and
transformers' differ in summation order (measured: about 1e-5 on the tiny model)."""


@pytest.fixture(scope="module")
def vllm_upstream(tmp_path_factory):
    """conftest's tiny upstream with one attention head of 32 dimensions: vLLM's CPU attention has no kernel
    for the 16 of the two-head default."""
    from conftest import make_tiny_data, ppo_config, write_config

    root = tmp_path_factory.mktemp("vllm")
    cfg = ppo_config(make_tiny_data(root), str(root / "store"))
    cfg["stages"]["pretrain"]["model"]["num_heads"] = 1
    path = write_config(root / "exp.yaml", cfg)
    Pipeline(load_experiment(path)).run(until="reward")
    return path


@pytest.fixture(scope="module")
def engine_and_policy(vllm_upstream):
    from accelerate import Accelerator

    from rlhf.launch import RLLaunch
    from rlhf.models import load_causal_lm
    from rlhf.vllm_engine import VLLMEngine

    pipe = Pipeline(load_experiment(vllm_upstream))
    path = str(pipe.store.local_dir(pipe.stages["sft"].key))
    policy, tok = load_causal_lm(path)
    launch = RLLaunch(Accelerator(cpu=True), micro_batch_size=1, gradient_accumulation_steps=1, max_grad_norm=1.0)
    engine = VLLMEngine(tok, launch, SamplingSettings(max_new_tokens=12, temperature=1.0), model=path, seed=0)
    engine.start(policy)
    prompts = [json.loads(line)["prompt"] for line in open(load_experiment(vllm_upstream).stages["ppo"].config.prompts)]
    yield engine, policy, prompts[:16]
    engine.close()


def gap(engine, policy, prompts) -> float:
    from rlhf.rollout import policy_forward

    r = engine.sample(prompts)
    assert r.response_mask.any() and r.logprobs is not None
    trainer = policy_forward(policy, r.query_ids, r.query_mask, r.response_ids, r.response_mask, 1.0)[0]
    return (trainer - r.logprobs)[r.response_mask].abs().max().item()


def test_engine_logprobs_match_the_trainers_after_a_weight_sync(engine_and_policy):
    engine, policy, prompts = engine_and_policy
    assert gap(engine, policy, prompts) < ATOL  # the checkpoint it loaded
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert gap(engine, policy, prompts) > 20 * ATOL  # the trainer moved, the engine did not
    engine.load(engine.weights(policy))
    assert gap(engine, policy, prompts) < ATOL


def test_grpo_samples_and_is_evaluated_through_vllm_and_logs_the_mismatch(vllm_upstream):
    prompts = load_experiment(vllm_upstream).stages["ppo"].config.prompts
    run = [*small_rl_run("grpo", prompts, no_eos_score="null", rollout_engine="vllm", rewards="{reward: 1.0, conftest:length_judge: 0.1}"),
           "evaluation.engine=vllm", "evaluation.num_prompts=16"]
    pipe = Pipeline(load_experiment(vllm_upstream, run))
    result = {r.name: r for r in pipe.run(until="grpo")}["grpo"]
    rows = [json.loads(line) for line in (pipe.store.local_dir(result.key) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "env/score" in r]
    assert len(rows) == 2 and result.metrics["train_steps"] == 2 and result.metrics["eval_prompts"] == 16
    assert "gold_gain_ci" in result.metrics  # the evaluation, of the reference and of the policy, through vLLM
    # the engine took the update between the steps: step 2's rollout agrees with the trainer as step 1's did
    assert all(0 <= r["rollout/mismatch_kl"] < 1e-4 and r["rollout/truncated_share"] == 0 for r in rows)


def test_the_evaluation_samples_through_vllm_for_every_policy_alike(vllm_upstream):
    """`evaluation.engine: vllm`: greedy answers as `generate` gives them (float32; a near-tie may flip a
    token), sampled ones seeded per prompt, so the same policy gets the same draws every time."""
    import dataclasses

    from rlhf.evaluation import PolicyEvaluation
    from rlhf.models import load_causal_lm

    exp = load_experiment(vllm_upstream)
    path = str(Pipeline(exp).store.local_dir(Pipeline(exp).stages["sft"].key))
    policy, tok = load_causal_lm(path)
    config = dataclasses.replace(exp.config.evaluation, num_prompts=32, engine="vllm")
    through_vllm = PolicyEvaluation(config, seed=0, model_path=path)
    first, again = through_vllm.run(policy, tok, reference=policy), through_vllm.run(policy, tok)
    plain = PolicyEvaluation(dataclasses.replace(config, engine="hf"), seed=0).run(policy, tok)
    same = sum(a == b for a, b in zip(first["greedy"]["responses"], plain["greedy"]["responses"]))
    assert same >= 0.9 * 32, f"{same} of 32 greedy answers agree"
    assert first["sampled"]["responses"] == again["sampled"]["responses"]
    assert first["sampled"]["kl"] == pytest.approx([0.0] * 32, abs=1e-5)  # against itself
    assert set(first["sampled"]) >= {"responses", "length", "ended", "gold"}
