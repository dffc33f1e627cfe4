"""The report's building blocks: judge roles named and ordered without knowing the experiment."""

from __future__ import annotations

from rlhf.report import comparison_table, evaluation_table, ordered_roles


def _labels(lines: list[str], header: int) -> list[str]:
    return [line.split(" | ")[0].removeprefix("| ") for line in lines[header:] if line.startswith("| ")]


def test_roles_every_evaluation_knows_come_first_and_the_experiments_own_by_name():
    assert ordered_roles(["tone", "fluency", "task", "gold", "heldout"]) == ["gold", "heldout", "task", "fluency", "tone"]
    # a policy without a reference (SFT): the roles are the means that both decodings have, other than the measures
    m = {"sentence": 0.5, "greedy_sentence": 0.4, "gold": 0.1, "greedy_gold": 0.2, "fluency": 0.9, "greedy_fluency": 0.8,
         "unique_share": 1.0, "greedy_unique_share": 0.5, "perplexity": 3.0, "eval_loss": 1.1, "eval_prompts": 8}
    rows = _labels(evaluation_table(m), 4)
    assert rows[:4] == ["gold judge", "fluency", "sentence", "unique responses (share)"]
    # against a reference: the roles with a gain, under their own names unless every evaluation knows them
    m = {"tone": 0.5, "tone_ref": 0.4, "tone_gain": 0.1, "tone_gain_ci": [0.0, 0.2],  # the experiment's first
         "gold": 0.3, "gold_ref": 0.1, "gold_gain": 0.2, "gold_gain_ci": [0.1, 0.3], "eval_prompts": 8}
    assert _labels(comparison_table(m, "reference", "ppo"), 4)[:2] == ["gold judge", "tone"]
