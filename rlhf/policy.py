"""What every policy stage shares: the experiment's evaluation of the policy it trains, set against the
policy it started from.

A policy stage (SFT, PPO, GRPO, DPO, KTO, yours) writes a causal LM that the experiment's `evaluation:`
block measures: the same held-out prompts, judges, decoding and seed for every method, so `rlhf report`
can set the methods side by side. `PolicyStage` owns that part of the lifecycle; a method keeps only its
training:

    setup      self.evaluation = self.start_evaluation()
    train      self.measure_reference(lambda: <evaluate the starting policy>)   kept in the store and
               shared by every method that starts from the same policy; then the method's own training,
               with `self.evaluation_callback()` (Trainer stages) or `self.evaluation.run` every
               `eval_every` steps for the report's gold-against-KL curves
    evaluate   return self.compare_with_reference(<evaluation of the trained policy>, step, **extra)
               gains with paired-bootstrap intervals, samples before and after, the EOS floor

The evaluation settings and prompts are part of the key (the manifest holds the evaluation), and `rlhf
plan` checks the prompts and judges before anything trains. The report's section of a policy stage is
the training curves the stage names (`training_panels`), its notes (`report_notes`), the gold-against-KL
plot, the comparison table and the samples.

A new method is a subclass that sets `name`, `config_class`, `inputs` and writes `setup`, `train` and
`evaluate` with the three calls above (stages/kto.py is one in about a hundred lines).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

from rlhf.engines import require_installed
from rlhf.errors import StageError
from rlhf.evaluation import PolicyEvaluation, compare, reference_results, summarize
from rlhf.schema import result_config
from rlhf.stage import Stage

log = logging.getLogger("rlhf")


class PolicyStage(Stage):
    """A stage whose artifact is a policy, evaluated by the experiment's shared evaluation."""

    kind = "policy"
    reference_input: ClassVar[str] = "policy"
    """The input that is the starting policy: the one this stage's evaluation is compared with."""
    training_panels: ClassVar[tuple[tuple[str, str], ...]] = ()
    """(logged metric, label) pairs the report plots over training steps, one panel each."""

    # ---- key and checks --------------------------------------------------------------------------

    def fingerprinted_files(self) -> dict[str, str | None]:
        return {**super().fingerprinted_files(), "evaluation_prompts": self.experiment.evaluation.prompts}

    def _data_where(self, role: str, spec: str) -> str:
        if role == "evaluation_prompts":
            return self.where("evaluation.prompts", top=True)
        return super()._data_where(role, spec)

    def key_payload(self) -> dict[str, Any]:
        """The base key, and the evaluation settings: the manifest holds the policy's evaluation."""
        return {**super().key_payload(), "evaluation": result_config(self.experiment.evaluation)}

    def build_manifest(self, metrics: dict[str, Any], seconds: float) -> dict[str, Any]:
        """The base manifest, and the evaluation settings its metrics come from (`rlhf plan` names them
        when they change)."""
        return {**super().build_manifest(metrics, seconds), "evaluation": result_config(self.experiment.evaluation)}

    def check(self) -> None:
        """The base checks, and the evaluation's prompts parse and each of its judges scores two of them."""
        super().check()
        ev = self.experiment.evaluation
        self.check_data_file(ev.prompts, "prompts", self.where("evaluation.prompts", top=True))
        for role, spec in ev.judges.items():
            if spec:
                self.check_judge(spec, f"evaluation.judges.{role}", ev.prompts, top=True)
        require_installed(ev.engine, self.where("evaluation.engine", top=True))

    # ---- the evaluation's lifecycle --------------------------------------------------------------

    def start_evaluation(self) -> PolicyEvaluation:
        """The experiment's evaluation, seeded by this stage: call it in `setup`."""
        ev = self.experiment.evaluation
        # evaluation.engine: vllm starts from the starting checkpoint (SFT's: the model it fine-tunes)
        source = self.reference_input if self.reference_input in self.input_refs else next(iter(self.input_refs), None)
        self.evaluation = PolicyEvaluation(ev, self.seed, model_path=self.input_path(source)
                                           if source and ev.engine != "hf" else None)
        return self.evaluation

    def measure_reference(self, measure: Callable[[], dict]) -> dict:
        """The starting policy's evaluation (`self.baseline`): kept in the store under the starting policy's
        key, so `measure()` runs once for every method that starts from it. Call it before training
        changes the model (a resumed run measures the same starting policy)."""
        key = self.input_refs[self.reference_input].key
        self.baseline = reference_results(self.store, key, self.evaluation, self.seed, measure)
        return self.baseline

    def build_reference(self):
        """A frozen copy of the starting policy (`reference_input`) in evaluation mode: the reference of a
        method's loss and of the evaluation's KL where the stage holds one."""
        from rlhf.models import load_causal_lm

        return load_causal_lm(self.input_path(self.reference_input))[0].requires_grad_(False).eval()

    def reference_kwargs(self, model) -> dict:
        """How `PolicyEvaluation.run` measures KL: against `self.reference` when the stage holds one, with
        LoRA against the same model with its adapters disabled; {} where neither is at hand."""
        from peft import PeftModel

        if getattr(self, "reference", None) is not None:
            return {"reference": self.reference}
        if isinstance(model, PeftModel):
            return {"reference_context": model.disable_adapter}
        return {}

    def log_evaluation(self, model, step: int) -> None:
        """The evaluation of sampled responses as `eval/*` at `step`: the points of the report's
        gold-against-KL plot. It draws from its own seeded RNG, so training takes the same steps with it."""
        results = self.evaluation.run(model, self.tokenizer, greedy=False, **self.reference_kwargs(model))
        self.tracker.log({f"eval/{k}": v for k, v in summarize(results, self.evaluation.roles).items()}, step=step)

    def evaluation_callback(self):
        """A Trainer callback calling `log_evaluation` every `config.eval_every` steps (0: never; the last
        step's evaluation is the manifest's)."""
        from transformers import TrainerCallback

        stage = self

        class _Periodic(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                every = stage.config.eval_every
                if every and state.global_step % every == 0 and state.global_step < state.max_steps:
                    stage.log_evaluation(model, state.global_step)

        return _Periodic()

    def compare_with_reference(self, final: dict, step: int, **extra: Any) -> dict[str, Any]:
        """The manifest's metrics: `extra`, then every judge's value before and after with its gain and
        paired-bootstrap interval (`rlhf.evaluation.compare`), logged at `step`, and samples; the stage
        fails when fewer sampled answers than `config.min_eos_rate` end (where the config has one)."""
        metrics = {"eval_prompts": len(self.evaluation.prompts), **extra,
                   **compare(self.baseline, final, self.evaluation.roles, self.seed)}
        self.tracker.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        metrics["samples"] = self.evaluation.samples(final, before=self.baseline)
        log.info("%s: %s", self.stage_name, self.headline(metrics))
        self.require_eos(metrics)
        return metrics

    def require_eos(self, metrics: dict[str, Any], fix: str = "") -> None:
        """Fail the stage when the share of sampled answers that end with EOS is below `config.min_eos_rate`:
        a policy that stops ending its answers has drifted too far (or, after SFT, gives RL nothing to score)."""
        floor = getattr(self.config, "min_eos_rate", None)
        if floor is None or metrics["eos_rate"] >= floor:
            return
        key = f"stages.{self.stage_name}"
        before = f"; the reference's {metrics['eos_rate_ref']:.0%}" if "eos_rate_ref" in metrics else ""
        raise StageError(
            f"{self.stage_name}: only {metrics['eos_rate']:.0%} of {metrics['eval_prompts']} held-out samples end "
            f"with EOS within evaluation.max_new_tokens={self.experiment.evaluation.max_new_tokens} tokens (floor "
            f"{key}.min_eos_rate={floor}{before}). "
            + (fix or f"Train fewer steps or at a lower {key}.learning_rate, or lower the floor on purpose.")
        )

    # ---- how it shows itself ---------------------------------------------------------------------

    @classmethod
    def headline(cls, m):
        from rlhf.report import fmt

        return (f"gold {fmt(m, 'gold_ref')} -> {fmt(m, 'gold')}, task success {fmt(m, 'task_ref', '{:.2f}')} -> "
                f"{fmt(m, 'task', '{:.2f}')}, held-out {fmt(m, 'heldout_ref')} -> {fmt(m, 'heldout')}, unique "
                f"{fmt(m, 'unique_share_ref', '{:.2f}')} -> {fmt(m, 'unique_share', '{:.2f}')}, KL {fmt(m, 'kl')}")

    @classmethod
    def report_notes(cls, metrics: dict[str, Any]) -> list[str]:
        """Markdown lines the report shows under the training curves (held-out pair accuracy, an early stop)."""
        return []

    @classmethod
    def report_section(cls, section):
        from rlhf.report import comparison_table, overoptimisation_plot, samples_table

        m, name = section.metrics, section.name
        panels = [(label, [(label, *section.series(key))]) for key, label in cls.training_panels
                  if section.series(key)[0]]
        lines = [section.plot(f"{name}_training.png", panels, f"{name} training"), ""] if panels else []
        if notes := cls.report_notes(m):
            lines += [*notes, ""]
        lines += [overoptimisation_plot(section, f"{name}_overoptimisation.png"), ""]
        lines += comparison_table(m, "reference", name)
        lines += samples_table(m.get("samples", []), [("greedy_before", "reference, greedy"),
                                                      ("greedy_after", f"{name}, greedy"),
                                                      ("before", "reference, sampled"),
                                                      ("after", f"{name}, sampled")])
        return lines
