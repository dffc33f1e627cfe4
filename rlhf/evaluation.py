"""The held-out evaluation every policy stage runs: judges, task success, diversity, KL, length, samples.

One `PolicyEvaluation` per stage, built from the experiment's `evaluation:` block, reads the same prompts
with the same seed and judges for every policy (SFT, PPO, ...), so numbers compare across stages and, prompt
by prompt, against the reference policy (paired-bootstrap intervals, `compare`):

    evaluation = PolicyEvaluation(experiment.evaluation, seed)
    before = evaluation.run(sft_policy, tokenizer)                    # per-prompt lists
    after = evaluation.run(policy, tokenizer, reference=sft_policy)   # + KL to the reference
    metrics = compare(before, after, evaluation.roles, seed)          # flat numbers for the manifest

Each run decodes twice: sampled at the evaluation temperature (seeded without disturbing the caller's
RNG; KL to the reference is measured on these) and, with `greedy`, greedily (what a user sees by default).
A score counts only beside task success and diversity: a policy that answers every prompt with one upbeat
phrase pleases a tone judge while ignoring the prompt, and `diversity` is how that shows.
"""

from __future__ import annotations

from collections import Counter
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

import torch

MODES = ("sampled", "greedy")
"""Decoding modes of a run; metric names carry `greedy_` for the greedy one."""


def diversity(responses: list[str]) -> dict[str, float]:
    """How varied a set of responses is (one per prompt), each in [0, 1].

    distinct_1, distinct_2: distinct word unigrams (bigrams) over all responses / all of them (Li et al.
    2016), words lowercased and split on whitespace; unique_share: distinct responses / responses;
    top_share: share of the most common response. A policy that collapsed onto one phrase has
    unique_share near 1/N and top_share near 1. repetition: within each response, the share of its words
    that repeat an earlier word of it, averaged over responses (seq-rep-1, Welleck et al. 2019): "the rim
    of the rim" 0.4, a response that never repeats itself 0. The others compare responses with each
    other; this one sees a policy that pads each answer with copies of a word it is paid for.
    opening_top_share: share of the most common opening, a response's first two words (lowercased, end
    punctuation stripped): a policy that starts every answer with one frame ("We talked about ...") while
    the rest varies. Empty input gives zeros.
    """
    if not responses:
        return {"distinct_1": 0.0, "distinct_2": 0.0, "unique_share": 0.0, "top_share": 0.0, "repetition": 0.0,
                "opening_top_share": 0.0}
    words = [r.lower().split() for r in responses]
    unigrams = [w for ws in words for w in ws]
    bigrams = [pair for ws in words for pair in zip(ws, ws[1:])]
    counts = Counter(responses)
    openings = Counter(" ".join(w.strip(_PUNCTUATION) for w in ws[:2]) for ws in words)
    return {
        "distinct_1": len(set(unigrams)) / len(unigrams) if unigrams else 0.0,
        "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
        "unique_share": len(counts) / len(responses),
        "top_share": counts.most_common(1)[0][1] / len(responses),
        "repetition": sum(1 - len(set(ws)) / len(ws) for ws in words if ws) / len(responses),
        "opening_top_share": openings.most_common(1)[0][1] / len(responses),
    }


_PUNCTUATION = ".,;:!?\"'()[]`"
"""Stripped from both ends of a word before it is compared with the prompt's words."""


def templates(prompts: list[str], responses: list[str]) -> list[str]:
    """Each response with the words it shares with its own prompt blanked out (`_`), lowercased.

    Only a prompt's own words are blanked, those in fewer than half of the prompts (`harbor` in "Use the
    word harbor in a sentence.", not `the`). A policy that copies the word into one fixed frame ("an
    abstractive man", "a ridge man") answers every prompt differently, so `unique_share` misses it; its
    templates ("an _ man", "a _ man") are the same.
    """
    def words(text: str) -> list[str]:
        return [w.strip(_PUNCTUATION) for w in text.lower().split()]

    prompt_words = [set(words(p)) - {""} for p in prompts]
    frequency = Counter(w for ws in prompt_words for w in ws)
    out = []
    for own, response in zip(prompt_words, responses):
        specific = {w for w in own if frequency[w] < len(prompts) / 2}
        out.append(" ".join("_" if w.strip(_PUNCTUATION) in specific else w for w in response.lower().split()))
    return out


class PolicyEvaluation:
    """The experiment's held-out prompts and judges, loaded once; `run` measures one policy on them."""

    def __init__(self, config, seed: int, field: str = "evaluation", model_path: str | None = None):
        from rlhf.data import load_rows
        from rlhf.judges import load_judge

        self.config, self.seed = config, seed
        self.model_path, self.engine = model_path, None  # where evaluation.engine: vllm starts from; the engine
        rows = load_rows(config.prompts, "prompts", limit=config.num_prompts)
        self.prompts: list[str] = rows["prompt"]
        self.columns: dict[str, list] = {c: rows[c] for c in rows.column_names if c != "prompt"}
        self.judges = {role: load_judge(spec, f"{field}.judges.{role}")
                       for role, spec in config.judges.items() if spec}

    @property
    def roles(self) -> list[str]:
        return list(self.judges)

    def keep_prompts(self, keep: Callable[[str], bool]) -> None:
        """Drop prompts (and their columns) for which `keep` is False, e.g. those too long for a stage."""
        idx = [i for i, p in enumerate(self.prompts) if keep(p)]
        self.prompts = [self.prompts[i] for i in idx]
        self.columns = {c: [v[i] for i in idx] for c, v in self.columns.items()}

    @torch.no_grad()
    def run(self, policy, tokenizer, *, reference=None,
            reference_context: Callable[[], AbstractContextManager] = nullcontext,
            greedy: bool | None = None) -> dict[str, dict[str, list]]:
        """{mode: per-prompt lists} for "sampled" (and "greedy" when asked; default: the config's).

        Each mode holds `responses`, their `templates`, `length`, `ended` and one score list per judge
        role; "sampled" also `kl`, the summed per-token log-ratio to `reference` (or to `policy` itself
        inside `reference_context`, LoRA's adapters-off reference) when either is given.
        """
        c = self.config
        greedy = c.greedy if greedy is None else greedy
        engine = self._engine(policy, tokenizer)
        out = {"sampled": self._decode(policy, tokenizer, c.temperature, reference, reference_context, engine)}
        if greedy:
            out["greedy"] = self._decode(policy, tokenizer, 0.0, None, None, engine)
        for results in out.values():
            results["templates"] = templates(self.prompts, results["responses"])
            for role, judge in self.judges.items():
                results[role] = judge(self.prompts, results["responses"], **self.columns)
        return out

    def greedy(self, policy, tokenizer) -> list[str]:
        """The greedy responses alone, decoded as `run` decodes its greedy half (for measuring a policy
        with judges of one's own, e.g. bench/smol_dpo_settings.py)."""
        return self._decode(policy, tokenizer, 0.0, None, None, self._engine(policy, tokenizer))["responses"]

    def _engine(self, policy, tokenizer):
        """None for `generate`; for evaluation.engine: vllm, vLLM (rlhf/vllm_engine.py) started once on
        `model_path` (the stage's starting checkpoint: same architecture and tokenizer) and given `policy`'s
        weights at every call. One process only."""
        if self.config.engine == "hf":
            return None
        from types import SimpleNamespace

        from rlhf.distributed import process_state
        from rlhf.engines import SamplingSettings, engine_class
        from rlhf.errors import StageError

        c = self.config
        if self.model_path is None or process_state().num_processes > 1:
            raise StageError("evaluation.engine: vllm needs one process and the stage's starting checkpoint; "
                             "use evaluation.engine: hf here")
        if self.engine is None:
            launch = SimpleNamespace(accelerator=SimpleNamespace(device=policy.device, unwrap_model=lambda m: m))
            settings = SamplingSettings(c.max_new_tokens, c.temperature, bf16=c.bf16_sampling)
            self.engine = engine_class(c.engine)(tokenizer, launch, settings, model=self.model_path, seed=self.seed,
                                                 **(c.engine_options or {}))
            self.engine.start(policy)
        else:
            self.engine.load(self.engine.weights(policy))
        return self.engine

    def _decode(self, policy, tokenizer, temperature: float, reference, reference_context,
                engine=None) -> dict[str, list]:
        from rlhf.ppo.core import masked_sum, response_mask_from_eos
        from rlhf.rollout import policy_forward
        from tqdm.auto import tqdm

        from rlhf.distributed import process_state
        from rlhf.engines import SamplingSettings
        from rlhf.sampling import batches, encode_prompts, generate, generation_config

        c, eos = self.config, tokenizer.eos_token_id
        was_training = policy.training
        policy.eval()
        out: dict[str, list] = {"responses": [], "length": [], "ended": []}
        measure_kl = temperature > 0 and (reference is not None or reference_context is not nullcontext)
        if measure_kl:
            out["kl"] = []
        config = generation_config(tokenizer, max_new_tokens=c.max_new_tokens, temperature=temperature)
        with torch.random.fork_rng(devices=[policy.device] if policy.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            chunks = list(batches(self.prompts, c.batch_size))
            mode = "sampled" if temperature > 0 else "greedy"
            for i, chunk in enumerate(tqdm(chunks, desc=f"evaluation ({mode})", leave=False,
                                           disable=len(chunks) < 2 or not process_state().is_main_process)):
                if engine is not None:  # prompt j's draws seeded by seed + j: the same for every policy
                    settings = SamplingSettings(c.max_new_tokens, temperature, bf16=c.bf16_sampling)
                    q_ids, q_mask, r_ids, r_mask = (t.to(policy.device) for t in engine.sample(
                        chunk, settings, seed=self.seed + i * c.batch_size)[:4])
                else:
                    enc = encode_prompts(tokenizer, chunk, policy.device)
                    seqs = generate(policy, config, bf16=c.bf16_sampling, **enc)
                    q_ids, q_mask = enc["input_ids"], enc["attention_mask"].bool()
                    r_ids = seqs[:, q_ids.shape[1]:]
                    r_mask = response_mask_from_eos(r_ids, eos)
                if measure_kl:
                    logp, _ = policy_forward(policy, q_ids, q_mask, r_ids, r_mask, temperature)
                    with reference_context():
                        ref_logp, _ = policy_forward(reference or policy, q_ids, q_mask, r_ids, r_mask, temperature)
                    out["kl"] += masked_sum(logp - ref_logp, r_mask, dim=1).tolist()
                out["length"] += r_mask.sum(1).tolist()
                out["ended"] += (r_ids == eos).any(1).tolist()
                for ids, mask in zip(r_ids, r_mask):
                    out["responses"].append(tokenizer.decode(ids[mask], skip_special_tokens=True).strip())
        policy.train(was_training)
        return out

    def samples(self, after: dict, before: dict | None = None) -> list[dict[str, str]]:
        """The first `num_logged_samples` prompts with their responses (and the reference's, if given)."""
        rows = []
        for i, prompt in enumerate(self.prompts[: self.config.num_logged_samples]):
            row = {"prompt": prompt}
            for mode in after:
                if before is not None:
                    row[_name(mode, "before")] = before[mode]["responses"][i]
                row[_name(mode, "after" if before is not None else "response")] = after[mode]["responses"][i]
            rows.append(row)
        return rows


def reference_results(store, policy_key: str, evaluation: PolicyEvaluation, seed: int,
                      measure: Callable[[], dict]) -> dict[str, dict[str, list]]:
    """The evaluation of a policy stage's starting policy, measured once and shared.

    Every policy stage compares itself with the policy it started from, on the same prompts and seed, so
    PPO, GRPO and DPO from one SFT model would each measure the same thing again (~85 s a stage on the
    default experiment). The results are kept in the store under a key of the starting policy's key, the
    evaluation settings, the prompts and the seed; `measure()` runs only when none is kept. The KL of the
    reference to itself is 0 and is not kept.
    """
    import json

    from rlhf.artifacts import content_key, digest
    from rlhf.distributed import process_state
    from rlhf.schema import result_config

    state = process_state()
    key = content_key({"policy": policy_key, "evaluation": result_config(evaluation.config), "seed": seed,
                       "prompts": digest(json.dumps(list(evaluation.prompts))), "processes": state.num_processes})
    kept = store.read_evaluation(key)
    if kept is not None:
        return kept
    results = measure()
    if state.is_main_process:
        store.write_evaluation(key, {mode: {k: v for k, v in r.items() if k != "kl"} for mode, r in results.items()})
    return results


def _name(mode: str, metric: str) -> str:
    """Metric name in the manifest: plain for sampled responses, `greedy_` + name for greedy ones."""
    return metric if mode == "sampled" else f"{mode}_{metric}"


def summarize(results: dict[str, dict[str, list]], roles: list[str]) -> dict[str, float]:
    """Means over prompts of one `PolicyEvaluation.run`, and the diversity of its responses.

    Keys: each judge role (`task` is task success), `kl` (sampled only), `response_length`, `eos_rate`,
    `distinct_1`, `distinct_2`, `unique_share`, `top_share`, `repetition`, `opening_top_share` (`diversity`),
    `template_top_share` (the share of the most common response once each prompt's own words are blanked,
    `templates`); greedy ones prefixed `greedy_`.
    """
    out: dict[str, float] = {}
    for mode, r in results.items():
        n = max(len(r["responses"]), 1)
        means = {role: sum(r[role]) / n for role in roles if role in r}
        means["response_length"] = sum(r["length"]) / n
        means["eos_rate"] = sum(r["ended"]) / n
        if "kl" in r:
            means["kl"] = sum(r["kl"]) / n
        means.update(diversity(r["responses"]))
        if "templates" in r:  # the most common frame the prompt's own words were copied into
            means["template_top_share"] = diversity(r["templates"])["top_share"]
        out.update({_name(mode, k): float(v) for k, v in means.items()})
    return out


def compare(before: dict, after: dict, roles: list[str], seed: int) -> dict[str, Any]:
    """The policy (`after`) against the reference (`before`) on the same prompts: flat manifest metrics.

    For every judge role and mode: `<role>` (the policy's mean), `<role>_ref` (the reference's),
    `<role>_gain` and `<role>_gain_ci` (paired-bootstrap 95% interval of the mean difference);
    diversity, length and EOS rate of both (`_ref` for the reference's); `kl` of the policy.
    """
    from rlhf.stats import paired_bootstrap

    s_before, s_after = summarize(before, roles), summarize(after, roles)
    metrics: dict[str, Any] = dict(s_after)
    metrics.update({f"{k}_ref": v for k, v in s_before.items() if not k.endswith("kl")})
    for mode in after:
        for role in roles:
            boot = paired_bootstrap(before[mode][role], after[mode][role], seed=seed)
            metrics[_name(mode, f"{role}_gain")] = boot["mean_diff"]
            metrics[_name(mode, f"{role}_gain_ci")] = [boot["ci_low"], boot["ci_high"]]
    return metrics
