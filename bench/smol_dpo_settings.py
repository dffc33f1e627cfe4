"""Greedy answers of policies in the store to configs/smol.yaml's 256 held-out words, scored by the judges
that watch for the cheap ways to the task check: how many talk about the word instead of using it
(`talks_about_word`), how many use it exactly once (`uses_word_once`), task success (`uses_word`).

docs/smol.md compares the DPO settings it tried with it; policies built before the evaluation had these
judges are measured here the same way (the same prompts, greedy decoding and bfloat16 sampling as the
evaluation's greedy half):

    .venv/bin/python bench/smol_dpo_settings.py <label>=<artifact key> ...
"""

from __future__ import annotations

import sys

from rlhf.artifacts import ArtifactStore
from rlhf.config import load_experiment
from rlhf.evaluation import PolicyEvaluation
from rlhf.models import load_causal_lm
from tasks.words import talks_about_word, uses_word, uses_word_once


def main(pairs: list[str]) -> None:
    exp = load_experiment("configs/smol.yaml")
    store = ArtifactStore.for_experiment(exp.config)
    evaluation = PolicyEvaluation(exp.config.evaluation, exp.config.seed)
    prompts, columns = evaluation.prompts, evaluation.columns
    print("| policy | key | talks about the word | the word once | task success |")
    print("|---|---|---|---|---|")
    for label, key in (p.split("=", 1) for p in pairs):
        model, tokenizer = load_causal_lm(str(store.local_dir(key)))
        responses = evaluation.greedy(model.eval(), tokenizer)

        def share(judge) -> str:
            return f"{sum(judge(prompts, responses, **columns)) / len(responses):.3f}"

        print(f"| {label} | `{key}` | {share(talks_about_word)} | {share(uses_word_once)} | {share(uses_word)} |",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
