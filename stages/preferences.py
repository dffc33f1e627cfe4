"""Preferences: the pairs that the reward model and DPO learn from, as an artifact of their own.

In:  a policy to sample from (the `sft` artifact, a hub id or a local directory), prompts, a judge; and
     optionally preference files or hub datasets (human pairs), passed through.
Out: a preference dataset (rlhf/preferences.py): `train.jsonl` and `eval.jsonl` of {"prompt", "chosen",
     "rejected", "margin", "source"} rows, `samples.jsonl` with every response the judge ranked, and a
     manifest with the counts per source and split, the judge, the margins and the policy's key.

On-policy collection is InstructGPT's loop with a judge in place of the labellers: sample K responses per
prompt from the policy, let the judge score them, pair the best with the worst, drop pairs the judge
barely separates (`margin`), and swap a share of the labels (`label_noise`) for annotator-noise
experiments. Pairs are split by prompt, so no held-out prompt was trained on. The artifact's key holds
the judge and every setting here, and the policy's key: changing the judge rebuilds these pairs and
everything downstream of them (the reward model, PPO, DPO), and nothing upstream.
"""

from __future__ import annotations

import logging
import random
import statistics
from dataclasses import dataclass

import torch

from rlhf.data import load_rows
from rlhf.models import load_causal_lm, whole_models
from rlhf.preferences import (HUMAN, ONPOLICY, SAMPLES, SPLITS, by_source, pair_row, read_pairs, read_preferences,
                              write_jsonl)
from rlhf.schema import checked
from rlhf.sampling import sample
from rlhf.stage import Stage, StageError

log = logging.getLogger("rlhf")


@dataclass
class PreferencesConfig:
    policy: str | None = "sft"
    """Policy whose responses the judge ranks: an upstream stage, a hub id or a local HF directory; None
    collects no on-policy pairs (the dataset is then `train_data` and `eval_data` alone)."""
    prompts: str = "data/prompts/train.jsonl.gz"
    """Prompts to sample responses for ({"prompt"} rows; other fields reach the judge as columns)."""
    num_prompts: int = checked(1024, ge=1)
    """How many prompts to use (the first N)."""
    k: int = checked(4, ge=2, hint="ranking needs at least 2 responses per prompt")
    """Responses sampled per prompt."""
    judge: str = "word_vader"
    """The simulated annotator: a built-in judge name or a dotted path to `fn(prompts, responses, **columns)
    -> scores` (columns: the prompt rows' other fields)."""
    margin: float = checked(0.1, ge=0)
    """Drop pairs whose judge scores differ by less than this."""
    label_noise: float = checked(0.0, ge=0, le=1)
    """Probability of swapping chosen and rejected (annotator noise experiments)."""
    eval_fraction: float = checked(0.1, ge=0, lt=1)
    """Share of prompts whose pairs are held out for evaluation."""
    max_new_tokens: int = checked(48, ge=1)
    """Response length limit when sampling."""
    temperature: float = checked(1.0, gt=0)
    """Sampling temperature."""
    batch_size: int = checked(64, ge=1)
    """Prompts per generate call (part of the key: the random draws depend on the batches)."""
    bf16_sampling: bool = checked(False, keyed_when_set=True)
    """Sample under bfloat16 autocast (faster on CPUs with AVX512-BF16 and on GPUs; rlhf.sampling.generate)."""
    train_data: str | None = "data/preferences/train.jsonl.gz"
    """Preference pairs from outside ({"prompt","chosen","rejected"}; a local file or hub dataset), passed
    through as source "human"; None for none."""
    eval_data: str | None = "data/preferences/valid.jsonl.gz"
    """Held-out preference pairs from outside (source "human"); None for none."""


class PreferencesStage(Stage):
    """On-policy preference pairs ranked by a judge, with any human pairs, as one dataset."""

    name = "preferences"
    config_class = PreferencesConfig
    kind = "preferences"
    inputs = {"policy": "sft"}

    def data_files(self):
        c = self.config
        return {"prompts": c.prompts if c.policy else None, "train": c.train_data, "eval": c.eval_data}

    data_schemas = {"prompts": "prompts", "train_data": "preferences", "eval_data": "preferences"}

    def check(self) -> None:
        """The base checks, and the judge loads and scores two responses to the first two prompts."""
        super().check()
        if self.config.policy is not None:
            self.check_judge(self.config.judge, "judge", self.config.prompts)

    def validate_inputs(self) -> None:
        super().validate_inputs()
        if self.config.policy is None and not self.config.train_data:
            raise StageError(f"{self.stage_name}: no pairs to collect: stages.{self.stage_name}.policy is null and "
                             f"stages.{self.stage_name}.train_data is not set; name a policy to sample from, a "
                             "preference file, or both")

    # -- override points --------------------------------------------------------------------------

    def collect(self) -> tuple[list[dict], list[dict], list[dict]]:
        """On-policy (train pairs, held-out pairs, samples). Under several processes the main one samples
        and judges, and every rank gets its result (so every rank's manifest agrees)."""
        from rlhf.distributed import broadcast_object, is_main_process

        return broadcast_object(self._collect() if is_main_process() else None)

    def _collect(self) -> tuple[list[dict], list[dict], list[dict]]:
        from rlhf.distributed import process_state
        from rlhf.judges import rank_pairs

        c = self.config
        rows = load_rows(c.prompts, "prompts", limit=c.num_prompts)
        prompts = rows["prompt"]
        columns = {name: rows[name] for name in rows.column_names if name != "prompt"}  # e.g. the task's answers
        repeated = [p for p in prompts for _ in range(c.k)]
        # The main process alone loads and samples: outside ZeRO-3's lockstep (rlhf.models.whole_models).
        with whole_models():
            policy, tok = load_causal_lm(self.input_path("policy"))
            policy.to(process_state().device)
            # Seeded here, not by whatever ran before in this process: the pairs depend on the settings alone.
            with torch.random.fork_rng(devices=[policy.device] if policy.device.type == "cuda" else []):
                torch.manual_seed(self.seed)
                samples = sample(policy, tok, repeated, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                                 batch_size=c.batch_size, progress=True, bf16=c.bf16_sampling)
        grouped = [[s.response for s in samples[i * c.k : (i + 1) * c.k]] for i in range(len(prompts))]
        pairs = rank_pairs(prompts, grouped, self.judge, margin=c.margin, noise=c.label_noise, seed=self.seed,
                           columns=columns)
        held = set(random.Random(self.seed).sample(list(prompts), int(len(prompts) * c.eval_fraction)))
        train = [pair_row(p, ONPOLICY) for p in pairs if p["prompt"] not in held]
        evals = [pair_row(p, ONPOLICY) for p in pairs if p["prompt"] in held]
        log.info("%s: %d on-policy pairs from %d prompts x %d samples (%d held out)", self.stage_name, len(pairs),
                 len(prompts), c.k, len(evals))
        return train, evals, [{"prompt": p, "responses": g} for p, g in zip(prompts, grouped)]

    # -- lifecycle --------------------------------------------------------------------------------

    def setup(self) -> None:
        from rlhf.judges import load_judge

        c, key = self.config, f"stages.{self.stage_name}"
        self.judge = load_judge(c.judge, field=f"{key}.judge") if c.policy else None
        # Read (and check) the human pairs before sampling, so a bad row fails the stage at once.
        self.human = {"train": [pair_row(r, HUMAN) for r in load_rows(c.train_data, "preferences").to_list()]
                      if c.train_data else [],
                      "eval": [pair_row(r, HUMAN) for r in load_rows(c.eval_data, "preferences").to_list()]
                      if c.eval_data else []}

    def train(self) -> dict:
        on_train, on_eval, self.samples = self.collect() if self.config.policy else ([], [], [])
        self.pairs = {"train": self.human["train"] + on_train, "eval": self.human["eval"] + on_eval}
        if not self.pairs["train"]:
            raise StageError(f"{self.stage_name}: the judge kept no training pair; lower stages.{self.stage_name}.margin, "
                             "sample more prompts, or check that the judge tells the policy's responses apart")
        return {}

    def evaluate(self) -> dict:
        """Counts per split and source, and the judge's margins of the on-policy pairs."""
        metrics: dict = {}
        for split in SPLITS:
            metrics[f"pairs_{split}"] = len(self.pairs[split])
            for source, rows in by_source(self.pairs[split]).items():
                metrics[f"pairs_{split}_{source}"] = len(rows)
        margins = [p["margin"] for split in SPLITS for p in self.pairs[split] if p["margin"] is not None]
        if margins:
            metrics.update(margin_mean=statistics.fmean(margins), margin_median=statistics.median(margins),
                           margin_min=min(margins), margin_max=max(margins))
        if self.samples:
            metrics["sampled_prompts"] = len(self.samples)
            metrics["sampled_responses"] = sum(len(s["responses"]) for s in self.samples)
            # a prompt gives no pair when its best and worst responses score within `margin` (or are the same text)
            metrics["paired_share"] = sum(1 for p in self.pairs["train"] + self.pairs["eval"]
                                          if p["source"] == ONPOLICY) / len(self.samples)
        self.tracker.log({k: v for k, v in metrics.items()}, step=0)
        metrics["examples"] = [{k: p[k] for k in ("prompt", "chosen", "rejected", "margin")}
                               for p in self.pairs["eval"] if p["source"] == ONPOLICY][:4]
        log.info("%s: %s", self.stage_name, self.headline(metrics))
        return metrics

    def save(self, out) -> None:
        for split in SPLITS:
            write_jsonl(out / f"{split}.jsonl", self.pairs[split])
        if self.samples:
            write_jsonl(out / SAMPLES, self.samples)

    def verify_saved(self, out) -> None:
        """Read the files back as a consumer will and compare them with the pairs in memory."""
        if any(read_pairs(out / f"{split}.jsonl") != self.pairs[split] for split in SPLITS) \
                or read_preferences(out).samples != self.samples:
            raise StageError(f"{self.stage_name}: the preference files written to {out} do not read back as the "
                             "pairs collected; nothing was published")

    def manifest_extra(self):
        c = self.config
        counts = {split: {source: len(rows) for source, rows in by_source(self.pairs[split]).items()}
                  for split in SPLITS}
        return {"judge": c.judge if c.policy else None, "counts": counts,
                "files": [f"{split}.jsonl" for split in SPLITS] + ([SAMPLES] if self.samples else [])}

    @classmethod
    def headline(cls, m):
        from rlhf.report import fmt

        def split(name):
            parts = [f"{k.removeprefix(f'pairs_{name}_')} {m[k]}" for k in m if k.startswith(f"pairs_{name}_")]
            return f"{name} {m.get(f'pairs_{name}', '?')}" + (f" ({', '.join(parts)})" if parts else "")

        return f"pairs: {split('train')}; {split('eval')}; mean margin {fmt(m, 'margin_mean')}"

    @classmethod
    def report_section(cls, section):
        from rlhf.report import samples_table

        m, man = section.metrics, section.manifest
        counts = man.get("counts", {})
        sources = sorted({s for split in counts.values() for s in split})
        lines = [f"Judge: `{man.get('judge')}`." if man.get("judge") else "No judge: pairs from files only.", "",
                 "| split | " + " | ".join(sources) + " | all |", "|---" * (len(sources) + 2) + "|"]
        for split in SPLITS:
            row = counts.get(split, {})
            lines.append(f"| {split} | " + " | ".join(str(row.get(s, 0)) for s in sources) + f" | {sum(row.values())} |")
        lines.append("")
        if "margin_mean" in m:
            share = (f", {m['paired_share']:.0%} of {m['sampled_prompts']} prompts gave a pair"
                     if "paired_share" in m else "")
            lines += [f"Judge's margin (best - worst score): mean {m['margin_mean']:.3f}, median "
                      f"{m['margin_median']:.3f}, range {m['margin_min']:.3f} to {m['margin_max']:.3f}{share}.", ""]
        return lines + samples_table(m.get("examples", []), [("chosen", "chosen"), ("rejected", "rejected")])
