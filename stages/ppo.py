"""The RL stage: optimise the SFT policy against its rewards, held near the SFT model by a KL penalty.

In:  the `sft` policy; rewards from reward models (the `reward` stage, hub ids, local directories) and
     Python functions, weighted (rlhf/rewards.py); prompts, whose other columns reach the functions.
Out: a policy artifact, with the experiment's shared evaluation of the reference (SFT) policy and of this
     policy on the same held-out prompts: gold, held-out and task judges, diversity, KL and length,
     sampled and greedy, with paired-bootstrap intervals of each gain.

One loop for the whole family (`train()`): PPO with a value model and GAE (Ziegler et al. 2019, Ouyang
et al. 2022, Huang et al. 2024), and the critic-free estimators that need none, GRPO, Dr. GRPO, RLOO and
REINFORCE++ (rlhf/ppo/estimators.py). They differ in small pure functions chosen by the config: the
advantage estimator, how token losses aggregate (rlhf/ppo/aggregation.py) and where the KL goes (in the
reward or in the loss). `stages/grpo.py` is this stage with GRPO's defaults. Every step of the loop is a
small method a subclass can replace. The setup (models, optimizer, rewards, rollout engine, prompts) and
the end (evaluation, save) are `RLStage`'s (rlhf/rl.py); what running under `accelerate launch` needs
(sharding, gathering, reductions) is the `RLLaunch` object the stage owns (rlhf/launch.py). Rollouts come
from a rollout engine, possibly running ahead (`max_staleness`), corrected for the difference between its
probabilities and the trainer's (`importance_correction`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import torch

from rlhf.checkpoints import CheckpointDir
from rlhf.engines import Rollout
from rlhf.errors import StageError
from rlhf.evaluation import summarize
from rlhf.packing import Packed, pack
from rlhf.ppo import apply_no_eos_penalty, compute_rewards, explained_variance, has_eos, kl_k3, masked_mean, \
    masked_sum, value_loss, with_state_after_eos
from rlhf.ppo.aggregation import aggregate
from rlhf.ppo.correction import importance_weights
from rlhf.ppo.losses import POLICY_LOSSES
from rlhf.rl import RLStage
from rlhf.rollout import Trajectory, policy_forward, score_at_eos, value_forward
from stages.ppo_config import KL_ESTIMATORS, PPOConfig

__all__ = ["PPOConfig", "PPOStage"]

log = logging.getLogger("rlhf")


class PPOStage(RLStage):
    """The RL loop: rollout, score, rewards, advantages (GAE with a value model, or critic-free), clipped update."""

    name = "ppo"
    config_class = PPOConfig
    training_panels = (("env/score", "score"), ("env/kl", "KL to reference"), ("env/response_length", "response length"),
                       ("env/unique_share", "unique responses"))
    kept_forward: tuple | None = None
    """(trajectory, its policy forward with autograd) between `make_trajectory` and `update`, where the update
    trains on the rollout's forward (`rollout_logprobs`)."""

    # ---- override points: one per step of the loop ---------------------------------------------

    @torch.no_grad()
    def score(self, query_ids, query_mask, response_ids, response_mask, prompts: list[str],
              columns: dict[str, list], packed=None):
        """Step 2: the weighted rewards at EOS; a fixed score without EOS. Returns (scores, raw, per source).
        `packed`: the batch's layout (`pack`), made here where not given."""
        c = self.config
        if packed is None:
            packed = self.pack(query_ids, query_mask, response_ids, response_mask)
        score_model = lambda *batch: score_at_eos(*batch, packed=packed)  # noqa: E731
        responses = self.decode(response_ids, response_mask)
        scores, raw, per_source = self.rewards.score(score_model, query_ids, query_mask, response_ids, response_mask,
                                                     prompts, responses, columns)
        if c.no_eos_score is not None:
            scores = apply_no_eos_penalty(scores, has_eos(response_ids, self.tokenizer.eos_token_id), c.no_eos_score)
        return scores, raw, per_source

    def pack(self, query_ids, query_mask, response_ids, response_mask) -> Packed | bool:
        """The batch's packed layout for its forwards (rlhf/packing.py; `share_prompts`: each shared prompt
        once), or False where `pack_sequences` is off."""
        c = self.config
        return pack(query_ids, query_mask, response_ids, response_mask, share_prompts=c.share_prompts) \
            if c.pack_sequences else False

    def decode(self, response_ids, response_mask) -> list[str]:
        """The responses as text (what reward functions and the diversity watchdog read)."""
        return [self.tokenizer.decode(ids[mask], skip_special_tokens=True).strip()
                for ids, mask in zip(response_ids, response_mask)]

    @torch.no_grad()
    def reference_logprobs(self, query_ids, query_mask, response_ids, response_mask, packed=None):
        """Logprobs (B, R) under the reference: the frozen copy, or with LoRA the policy with its adapters
        disabled (None when the stage computes no KL). `packed`: the batch's layout (`pack`), made here where
        not given."""
        if not self.config.uses_reference:
            return None
        if packed is None:
            packed = self.pack(query_ids, query_mask, response_ids, response_mask)
        model, scope = self.reference, contextlib.nullcontext()
        if model is None:  # LoRA: the base weights are the reference
            model, scope = self.policy, self.accelerator.unwrap_model(self.policy).disable_adapter()
        with scope:
            return policy_forward(model, query_ids, query_mask, response_ids, response_mask, self.config.temperature,
                                  packed=packed)[0]

    def episode_mask(self, response_mask: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        """(B, R) positions with a reward and (GAE) a value: the response tokens, and the state after EOS
        when `score_after_eos`. The policy loss and advantage whitening stay on the response tokens."""
        return with_state_after_eos(response_mask, eos) if self.config.score_after_eos else response_mask

    def kl(self, traj: Trajectory) -> torch.Tensor:
        """Per-token KL estimate (B, R) to the reference (0 without one), with the configured estimator."""
        if traj.ref_logprobs is None:
            return torch.zeros_like(traj.logprobs)
        return KL_ESTIMATORS[self.config.kl_estimator](traj.logprobs, traj.ref_logprobs)

    def compute_rewards(self, traj: Trajectory) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 3: per-token rewards (B, R) = -beta * KL (when the KL is in the reward) + the score at the
        episode's end. Returns (rewards, kl)."""
        kl = self.kl(traj)
        coef = self.kl_ctl.value if self.config.kl_penalty == "reward" else 0.0
        rewards = compute_rewards(traj.scores, kl, coef, traj.response_mask, traj.episode_mask)
        if self.config.whiten_rewards:
            rewards = self.launch.whiten(rewards, traj.episode_mask, shift_mean=False)
        return rewards, kl

    def compute_advantages(self, rewards: torch.Tensor, traj: Trajectory) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Step 4: advantages (B, R) from the configured estimator, whitened if asked, and the value
        model's targets (B, R) (None without a value model)."""
        c = self.config
        advantages, returns = self.estimator(rewards, traj.scores, traj.episode_mask, traj.response_mask, traj.values,
                                             c.samples_per_prompt, whiten=self.launch.whiten, gamma=c.gamma,
                                             lam=c.lam)
        if c.whiten_advantages:
            advantages = self.launch.whiten(advantages, traj.response_mask)
        return advantages, returns

    def loss(self, mb: Trajectory, advantages, returns, counts: dict, forward: tuple | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """Step 5 (per micro-batch): (policy loss, value loss or None, statistics).

        The policy loss is the clipped surrogate (plus coef x the clamped k3 KL when the KL is in the
        loss), aggregated over the response tokens by `loss_aggregation` with the whole minibatch's
        `counts` ("sequences", "tokens"), so micro-batches sum to the minibatch's loss. The value loss is
        this micro-batch's share of the minibatch's token mean over the episode positions. `forward`: the
        policy's (logprobs, entropy) of `mb` already computed with autograd (`rollout_logprobs`).
        """
        c = self.config

        def reduce(per_token):
            return aggregate(per_token, mb.response_mask, c.loss_aggregation, num_sequences=counts["sequences"],
                             num_tokens=counts["tokens"], max_len=c.max_new_tokens)

        batch = (mb.query_ids, mb.query_mask, mb.response_ids, mb.response_mask)
        packed = self.pack(*batch) if forward is None or self.value_model is not None else False
        logprobs, entropy = forward or policy_forward(self.policy, *batch, c.temperature, with_entropy=True,
                                                      entropy_grad=False, packed=packed)
        pg, pg_stats = POLICY_LOSSES[c.policy_loss](logprobs, mb.logprobs, advantages, mb.response_mask, c.clip_range,
                                                    c.clip_range_high, reduce=reduce, token_weights=mb.token_weights)
        stats = {"policy/loss": pg_stats["loss"], "policy/clipfrac": pg_stats["clipfrac"],
                 "policy/approx_kl": pg_stats["approx_kl"], "policy/ratio": pg_stats["ratio_mean"],
                 "policy/entropy": masked_mean(entropy.detach(), mb.response_mask)}
        if c.kl_penalty == "loss" and mb.ref_logprobs is not None:
            kl_term = reduce(kl_k3(logprobs, mb.ref_logprobs))
            pg = pg + self.kl_ctl.value * kl_term
            stats["policy/kl_loss"] = kl_term.detach()
        if self.value_model is None:
            return pg, None, stats
        values = value_forward(self.value_model, *batch, packed=packed, value_mask=mb.episode_mask)
        vf, vf_stats = value_loss(values, mb.values, returns, mb.episode_mask, c.clip_range_value)
        stats.update({"value/loss": vf.detach(), "value/clipfrac": vf_stats["clipfrac"]})
        return pg, vf * (mb.episode_mask.sum() / counts["value_tokens"]), stats

    # ---- the loop ------------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        c = self.config
        # the rollout's forward is kept for the update (`rollout_logprobs`) in one process without DeepSpeed
        self.reuses_rollout_forward = (c.reuse_rollout_forward and self.launch.num_processes == 1
                                       and not self.launch.engine)
        if c.reuse_required and not self.reuses_rollout_forward:
            raise StageError(f"{self.stage_name}: reuse_rollout_forward runs in one process without DeepSpeed; "
                             "set it to false (or leave it unset) for this launch")

    def rollout_logprobs(self, query_ids, query_mask, response_ids, response_mask, packed):
        """The policy's logprobs (B, R) of the rollout it sampled, and the forward itself, (logprobs, entropy)
        with autograd, where the update will train on it (`reuse_rollout_forward`, which the config and the
        setup allow only where the update is one micro-batch holding the whole rollout batch at the weights
        that sampled it; the old logprobs are then that forward's, detached, so the first ratio is exactly 1);
        else None."""
        c = self.config
        if not self.reuses_rollout_forward:
            with torch.no_grad():
                return policy_forward(self.policy, query_ids, query_mask, response_ids, response_mask,
                                      c.temperature, packed=packed)[0], None
        self.policy.train()  # the update's forward, done now (see `update`)
        with torch.enable_grad():
            kept = policy_forward(self.policy, query_ids, query_mask, response_ids, response_mask, c.temperature,
                                  with_entropy=True, entropy_grad=False, packed=packed)
        return kept[0].detach(), kept

    def make_trajectory(self, rows: list[int], sampled: Rollout | None = None, step: int = 0) -> Trajectory:
        """Steps 1-2 and the forwards that go with them: one rollout batch of prompts `rows` (indices into
        `self.prompts`) of `step`, `sampled` already or sampled now, with everything the update needs. The
        batch is packed once for all its forwards (the policy's is left out where the sampler kept the
        logprobs: `sampler_logprobs`)."""
        timed, c = self.timer, self.config
        prompts = [self.prompts[i] for i in rows]
        columns = {name: [values[i] for i in rows] for name, values in self.prompt_columns.items()}
        if sampled is None:
            with timed("rollout"):
                sampled = self.rollout(prompts)
        q_ids, q_mask, r_ids, r_mask = sampled[:4]
        eos = has_eos(r_ids, self.tokenizer.eos_token_id)
        episode = self.episode_mask(r_mask, eos)
        with torch.no_grad():
            packed = self.pack(q_ids, q_mask, r_ids, r_mask)
            with timed("reference_forward"):
                ref_logprobs = self.reference_logprobs(q_ids, q_mask, r_ids, r_mask, packed=packed)
            values = None
            if self.value_model is not None:
                with timed("value_forward"):
                    values = value_forward(self.value_model, q_ids, q_mask, r_ids, r_mask, packed=packed,
                                           value_mask=episode)
        with timed("score"):
            scores, raw, per_source = self.score(q_ids, q_mask, r_ids, r_mask, prompts, columns, packed=packed)
        engine_logprobs = getattr(sampled, "logprobs", None)
        if engine_logprobs is not None and not self.rollout_engine.holds_weights:
            # the policy's own, as it drew each token (`sampler_logprobs`): no forward to run, no mismatch
            logprobs, kept, engine_logprobs = engine_logprobs, None, None
        else:
            with timed("policy_forward"):  # last: a forward kept for the update holds its graph from here on
                logprobs, kept = self.rollout_logprobs(q_ids, q_mask, r_ids, r_mask, packed)
        weights = self.correct_mismatch(logprobs, engine_logprobs, r_mask)
        traj = Trajectory(q_ids, q_mask, r_ids, r_mask, logprobs, ref_logprobs, values, scores, raw, eos, episode,
                          per_source, weights)
        self.kept_forward = (traj, kept) if kept is not None else None  # for this very trajectory only
        return traj

    def correct_mismatch(self, logprobs, engine_logprobs, response_mask):
        """Importance weights (B, R) trainer / engine of the sampled tokens (rlhf/ppo/correction.py), None
        where the trainer sampled or `importance_correction` is none; the mismatch is logged either way."""
        c = self.config
        if engine_logprobs is None:
            return None
        level, _, mode = (c.importance_correction if c.importance_correction != "none" else "token_truncate"
                          ).partition("_")
        weights, stats = importance_weights(logprobs, engine_logprobs, response_mask, level, mode,
                                            c.importance_upper, c.importance_lower)
        self.mismatch = {f"rollout/{k}": float(v) for k, v in stats.items()}
        return None if c.importance_correction == "none" else weights

    def update(self, traj: Trajectory, advantages, returns) -> dict[str, float]:
        """Step 5: `ppo_epochs` passes of minibatch updates over one rollout batch (`RLLaunch.micro_batches`:
        each micro-batch's loss is its share of the minibatch's, so their gradients sum to the minibatch's)."""
        c, launch = self.config, self.launch
        self.policy.train()
        if self.value_model is not None:
            self.value_model.train()
        totals: dict[str, float] = {}
        count = 0
        # the rollout's forward with its graph, where `rollout_logprobs` kept one for this trajectory
        kept = self.kept_forward[1] if self.kept_forward and self.kept_forward[0] is traj else None
        self.kept_forward = None
        for mb, (mb_adv, mb_ret), counts, last, rows in launch.micro_batches(
                traj, (advantages, returns), epochs=c.ppo_epochs, minibatch_size=c.minibatch_size,
                micro_batch_size=c.micro_batch_size, generator=getattr(self, "update_rng", None)):
            # the one micro-batch is the whole batch, shuffled and stripped of padding columns: so its forward
            forward = tuple(t[rows][:, : mb.response_ids.shape[1]] for t in kept) if kept is not None else None
            pg, vf, stats = launch.micro_batch_loss(self.loss, mb, mb_adv, mb_ret, counts, forward)
            launch.backward(pg if vf is None else pg + c.vf_coef * vf, last_micro_batch=last)
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            count += 1
            if last:
                if c.max_grad_norm:  # 0: no clipping
                    self.accelerator.clip_grad_norm_(launch.trained_parameters(), c.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
        return {k: v / count for k, v in totals.items()}

    def train(self) -> dict:
        c, acc, launch = self.config, self.accelerator, self.launch
        # Each checkpoint is written aside and renamed into place whole: a run killed mid-save resumes
        # from the previous checkpoint, never from a mixture of two steps (rlhf/checkpoints.py).
        checkpoints = CheckpointDir(self.work_dir / "checkpoints", is_main_process=acc.is_main_process,
                                    barrier=acc.wait_for_everyone)
        # The starting policy's evaluation, before a checkpoint replaces it: kept in the store under that
        # policy's key (rlhf/policy.py), so a resumed run reads the same baseline and measures nothing.
        self.measure_reference(lambda: self.judge_policy(greedy=None))
        if (latest := checkpoints.latest()) is not None:
            acc.load_state(str(latest))
            self.sampler.load(latest)  # rollouts sampled ahead before the checkpoint: taken, not sampled again
            log.info("%s: resuming at step %d", self.stage_name, self.progress.step)
        self.rollout_engine.start(self.policy)  # an engine with weights of its own takes the current ones
        resumed_from = self.progress.step
        self.stopped: str | None = None
        last_good, good_step = None, self.progress.step
        from tqdm.auto import tqdm

        bar = tqdm(range(self.progress.step, c.num_steps), desc=self.stage_name, initial=self.progress.step,
                   total=c.num_steps, disable=not acc.is_main_process)  # one bar for a launch, not one per rank
        for step in bar:
            step_start = time.perf_counter()
            # 1-2. rollout and score (this rank's share of the batch; groups stay whole). Rollouts of the next
            # max_staleness steps are asked for now: they sample while this step trains.
            with self.timer("rollout"):
                for ahead in range(step, min(step + c.max_staleness + 1, c.num_steps)):
                    self.sampler.submit(ahead, [self.prompts[i] for i in self.rank_rows(ahead)])
                sampled = self.sampler.take(step)
            traj = self.make_trajectory(self.rank_rows(step), sampled, step)
            # 3. rewards: per-token KL penalty (if in the reward) plus the score at the episode's end
            rewards, kl = self.compute_rewards(traj)
            # 4. advantages
            advantages, returns = self.compute_advantages(rewards, traj)
            # 6a. watchdogs look at the rollout of the policy the last update produced
            # (over every rank's rows: all ranks must take the same decision)
            seq_kl = launch.batch_mean(masked_sum(kl, traj.response_mask, dim=1))
            length = launch.batch_mean(traj.response_mask.sum(1).float())
            firsts = self.decode(traj.response_ids, traj.response_mask)[:: c.samples_per_prompt]
            unique = launch.unique_share(firsts)  # one response per prompt: K samples of a prompt may agree
            if reason := self.watchdog(seq_kl, length, unique):
                self.stopped = f"step {step}: {reason}"
                # at the first rollout of this run nothing earlier is in memory: the policy it started from stays
                log.warning("%s: stopping: %s; keeping the policy %s", self.stage_name, self.stopped,
                            "this run started from" if last_good is None else f"of step {good_step}")
                if last_good is not None:
                    launch.restore_policy(last_good)
                break
            # This rollout passed, so its policy is the last good one (a CPU copy of what training changes:
            # the only way to go back one step without a checkpoint per step). The earlier copy goes first,
            # so that one copy is in memory at a time, not two.
            last_good = None
            last_good, good_step = launch.policy_state_copy(), step
            # 5. update (while rollouts run ahead, its shuffles draw from a generator of its own: the sampler
            # draws from the global one), then the engine takes the new weights
            self.update_rng = torch.Generator().manual_seed(self.seed * 1000003 + step) if c.max_staleness else None
            with self.timer("update"):
                stats = self.update(traj, advantages, returns)
            with self.timer("sync"):  # the engine takes the new weights (nothing to do for hf at staleness 0)
                self.sampler.sync(self.policy)
            self.kl_ctl.update(seq_kl, c.rollout_batch_size)
            # 6. log
            stats.update({
                "env/score": traj.scores.mean().item(), "env/raw_score": traj.raw_scores.mean().item(),
                "env/reward_total": masked_sum(rewards, traj.episode_mask, dim=1).mean().item(), "env/kl": seq_kl,
                "env/kl_coef": self.kl_ctl.value, "env/response_length": length,
                "env/eos_rate": traj.has_eos.float().mean().item(), "env/unique_share": unique,
                **{f"env/reward/{s.name}": traj.source_scores[:, i].mean().item()
                   for i, s in enumerate(self.rewards.sources)},
                **self.timer.pop(), "time/step": time.perf_counter() - step_start,
                **getattr(self, "mismatch", {}), **getattr(self, "sampling_stats", {}),
            })
            if returns is not None:
                stats["value/explained_variance"] = explained_variance(traj.values, returns, traj.episode_mask).item()
            self.progress.step = step + 1
            # The last step's evaluation is the manifest's (evaluate), drawn with the same seed: not twice.
            if c.eval_every and self.progress.step % c.eval_every == 0 and self.progress.step < c.num_steps:
                self.sampler.drain()  # the evaluation seeds torch's generator: nothing may sample meanwhile
                results = self.judge_policy(greedy=False)
                stats.update({f"eval/{k}": v for k, v in summarize(results, self.evaluation.roles).items()})
            stats = launch.reduce_stats(stats)
            self.tracker.log(stats, step=self.progress.step)
            bar.set_postfix(score=f"{stats['env/score']:.2f}", kl=f"{seq_kl:.2f}")
            if c.save_every and self.progress.step % c.save_every == 0:
                self.sampler.drain()  # first: the random state saved is the one after the rollouts sampled ahead
                checkpoints.save(self.progress.step, self.save_checkpoint)
        self.sampler.close()
        self.kept_forward = None  # a rollout's forward the watchdog stopped before its update
        self.final_state = launch.gathered_policy_state()  # every rank gathers; the main one saves
        return {"train_steps": self.progress.step, "resumed_from_step": resumed_from,
                "stopped_early": self.stopped, "kl_coef_final": self.kl_ctl.value}

    def watchdog(self, seq_kl: float, length: float, unique_share: float) -> str | None:
        """A reason to stop, or None. KL past the budget, collapsing responses or the same few answers to
        every prompt mean the policy is gaming its rewards."""
        c, key = self.config, f"stages.{self.stage_name}"
        if not math.isfinite(seq_kl) or seq_kl > c.kl_budget:
            return f"KL to the reference {seq_kl:.2f} exceeds {key}.kl_budget={c.kl_budget}"
        if length < c.min_response_length:
            return f"mean response length {length:.1f} fell below {key}.min_response_length={c.min_response_length}"
        if c.min_unique_share is not None and unique_share < c.min_unique_share:
            return (f"only {unique_share:.0%} of the rollout's responses are distinct, below "
                    f"{key}.min_unique_share={c.min_unique_share}")
        return None
