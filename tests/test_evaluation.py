"""The shared policy evaluation: diversity with golden values, and the reference comparison's numbers."""

from __future__ import annotations

import pytest

from rlhf.evaluation import compare, diversity, summarize, templates
from rlhf.stats import paired_bootstrap


def test_diversity_golden_values():
    responses = ["a good dog", "a good dog", "A bad cat", "the dog"]
    d = diversity(responses)
    # words, lowercased: a good dog | a good dog | a bad cat | the dog -> 11 words, 6 distinct
    assert d["distinct_1"] == pytest.approx(6 / 11)
    # bigrams: (a good)(good dog) x2, (a bad)(bad cat), (the dog) -> 7 bigrams, 5 distinct
    assert d["distinct_2"] == pytest.approx(5 / 7)
    # responses compare as whole strings: 3 distinct of 4; the most common one is 2 of 4
    assert d["unique_share"] == 0.75 and d["top_share"] == 0.5
    # no response repeats a word of its own (the repeats are across responses)
    assert d["repetition"] == 0.0


def test_repetition_is_the_share_of_a_responses_words_that_repeat_an_earlier_one():
    d = diversity(["the rim of the rim", "rim rim rim rim", "a rim", ""])
    # "the rim of the rim": 5 words, 3 distinct -> 2/5; "rim rim rim rim": 3/4; "a rim": 0; "": 0 (no words)
    assert d["repetition"] == pytest.approx((2 / 5 + 3 / 4 + 0 + 0) / 4)
    assert diversity(["Rim rim."])["repetition"] == 0.0  # words as distinct-n splits them: "rim" and "rim."
    assert diversity(["Rim rim"])["repetition"] == 0.5  # lowercased


def test_opening_top_share_is_the_share_of_the_most_common_first_two_words():
    d = diversity(["We talked about a rim.", "we talked, about it", "We had to go.", "I saw", "ok", ""])
    # openings: "we talked" x2 (case and end punctuation aside), "we had", "i saw", "ok", "" -> 2 of 6
    assert d["opening_top_share"] == pytest.approx(2 / 6)
    assert diversity(["I saw a rim.", "I saw a cat."])["opening_top_share"] == 1.0


def test_diversity_of_a_collapsed_policy_and_of_nothing():
    d = diversity(["a good person"] * 9 + ["a good party"])
    assert d["unique_share"] == 0.2 and d["top_share"] == 0.9
    assert d["distinct_2"] == pytest.approx(3 / 20)  # (a good), (good person), (good party) of 20 bigrams
    assert diversity([]) == {"distinct_1": 0.0, "distinct_2": 0.0, "unique_share": 0.0, "top_share": 0.0,
                             "repetition": 0.0, "opening_top_share": 0.0}
    assert diversity(["", "one"])["distinct_2"] == 0.0  # no bigram at all


def test_templates_blank_each_prompts_own_words_only():
    prompts = [f"Use the word {w} in a sentence." for w in ("ridge", "sovereign", "abstractive", "rim")]
    responses = ["Ridge, the ridge!", "a sovereign man", "an abstractive man", "the word rim is a rim"]
    # "the", "word", "in", "a" are in every prompt, so only each prompt's own word is blanked; punctuation
    # around a blanked word goes with it, and a word of another prompt ("ridge" in the 4th) stays
    assert templates(prompts, responses) == ["_ the _", "a _ man", "an _ man", "the word _ is a _"]
    assert diversity(templates(prompts, responses))["top_share"] == 0.25  # every frame differs
    framed = templates(prompts, [f"a {w} man" for w in ("ridge", "sovereign", "abstractive", "rim")])
    assert framed == ["a _ man"] * 4 and diversity([f"a {w} man" for w in "abcd"])["unique_share"] == 1.0


def _run(responses, task, gold, kl=None):
    sampled = {"responses": responses, "length": [len(r.split()) for r in responses], "ended": [True] * len(responses),
               "task": task, "gold": gold}
    if kl is not None:
        sampled["kl"] = kl
    greedy = {k: v for k, v in sampled.items() if k != "kl"}
    return {"sampled": sampled, "greedy": greedy}


def test_summarize_and_compare_name_every_number():
    before = _run(["a dog", "a cat", "the sun", "a tree"], [1, 0, 1, 0], [0.5, -1.0, 0.0, -1.0])
    after = _run(["a good dog", "a good cat", "a good sun", "a good sun"], [1, 1, 0, 0], [0.9, 0.8, -1.0, -1.0],
                 kl=[1.0, 2.0, 3.0, 2.0])
    s = summarize(before, ["task", "gold"])
    assert s["task"] == 0.5 and s["greedy_task"] == 0.5 and s["gold"] == pytest.approx(-0.375)
    assert s["unique_share"] == 1.0 and s["response_length"] == 2.0 and "kl" not in s
    m = compare(before, after, ["task", "gold"], seed=0)
    # paired differences of gold: +0.4, +1.8, -1.0, 0.0 -> mean +0.3
    assert m["gold_gain"] == pytest.approx(0.3) and m["gold_ref"] == pytest.approx(-0.375)
    assert m["gold"] == pytest.approx(-0.075) and m["greedy_gold_gain"] == pytest.approx(0.3)
    # the interval is the paired bootstrap of those four differences (rlhf.stats, same seed), and strictly
    # inside their range: a mean of 4 draws is -1.0 only when all four draw the -1.0 (p = 1/256, under 2.5%)
    boot = paired_bootstrap([0.5, -1.0, 0.0, -1.0], [0.9, 0.8, -1.0, -1.0], seed=0)
    assert m["gold_gain_ci"] == pytest.approx([boot["ci_low"], boot["ci_high"]])
    lo, hi = m["gold_gain_ci"]
    assert -1.0 < lo < 0.3 < hi < 1.8
    assert m["task_gain"] == 0.0 and m["kl"] == 2.0
    assert m["unique_share"] == 0.75 and m["unique_share_ref"] == 1.0 and m["top_share"] == 0.5
    assert "template_top_share" not in m  # only a run that knows its prompts has templates
    after["sampled"]["templates"] = ["a good _", "a good _", "a good _", "a _ sun"]
    assert compare(before, after, ["task", "gold"], seed=0)["template_top_share"] == 0.75


def test_the_starting_policys_evaluation_is_measured_once_per_policy_settings_and_prompts(tmp_path):
    from types import SimpleNamespace

    from rlhf.artifacts import ArtifactStore
    from rlhf.schema import EvalConfig
    from rlhf.evaluation import reference_results

    store = ArtifactStore(str(tmp_path / "store"))
    calls = []

    def measure():
        calls.append(1)
        return {"sampled": {"responses": ["a", "b"], "gold": [0.5, -1.0], "kl": [0.0, 0.0]}}

    evaluation = SimpleNamespace(config=EvalConfig(num_prompts=2), prompts=["p1", "p2"])
    first = reference_results(store, "sftkey", evaluation, 0, measure)
    assert first["sampled"]["kl"] == [0.0, 0.0] and len(calls) == 1
    # a second stage from the same policy: read back, without the reference's KL to itself
    assert reference_results(store, "sftkey", evaluation, 0, measure) == {
        "sampled": {"responses": ["a", "b"], "gold": [0.5, -1.0]}}
    assert len(calls) == 1
    # another policy, seed, setting or prompt list is measured anew
    reference_results(store, "otherkey", evaluation, 0, measure)
    reference_results(store, "sftkey", evaluation, 1, measure)
    reference_results(store, "sftkey", SimpleNamespace(config=EvalConfig(num_prompts=2, max_new_tokens=8),
                                                       prompts=["p1", "p2"]), 0, measure)
    reference_results(store, "sftkey", SimpleNamespace(config=evaluation.config, prompts=["p1"]), 0, measure)
    assert len(calls) == 5
