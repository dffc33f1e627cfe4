"""Judges: the built-in scorers, loading judges from config strings, and on-policy preference pairs."""

from __future__ import annotations

import socket

import pytest

from rlhf import judges as J
from rlhf.judges import BUILTIN_JUDGES, fluency, load_judge, rank_pairs, textblob, vader

POSITIVE = "I love this wonderful day."
NEGATIVE = "This is a terrible, awful mistake."


# ---- judges a config can point at (this module is importable under its own __name__) ----------------


def length_judge(prompts, responses):
    """Longer is better: a deterministic judge for pair tests."""
    return [len(r) for r in responses]


class ExclaimJudge:
    """A class judge: load_judge instantiates it once."""

    def __init__(self):
        self.calls = 0

    def __call__(self, prompts, responses):
        self.calls += 1
        return [r.count("!") for r in responses]


def short_judge(prompts, responses):
    return [0.0]


NOT_CALLABLE = 3


# ---- built-in judges --------------------------------------------------------------------------------


def test_vader_sign_and_value():
    pos, neg = vader(["p", "p"], [POSITIVE, NEGATIVE])
    assert pos > 0.5 and neg < -0.5
    # Golden values from vaderSentiment 3.3.2, which rounds compound to 4 decimals.
    assert pos == pytest.approx(0.8616, abs=1e-9)
    assert neg == pytest.approx(-0.8176, abs=1e-9)


def test_textblob_sign_and_value():
    pos, neg = textblob(["p", "p"], [POSITIVE, NEGATIVE])
    assert pos > 0.5 and neg < -0.5
    assert pos == pytest.approx(0.75, abs=1e-12)
    assert neg == pytest.approx(-1.0, abs=1e-12)


def test_fluency_exact_shares():
    scores = fluency(["p"] * 6, ["the cat sat on the mat", "the qzxvw", "", "The cat, don't!",
                                 "qzxvw qzxvw the", "123 ... !!"])
    assert scores == [1.0, 1 / 2, 0.0, 1.0, 1 / 3, 0.0]


def test_fluency_curly_apostrophe_and_digits():
    # Digits are not words, and a typographic apostrophe spells the same contraction.
    assert fluency(["p", "p"], ["the 42 cats", "don\u2019t stop"]) == [1.0, 1.0]


def test_builtins_return_one_float_per_response_and_accept_empty_batches():
    for judge in BUILTIN_JUDGES.values():
        out = judge(["a", "b", "c"], [POSITIVE, "", NEGATIVE], word=["day", "x", "mistake"])
        assert len(out) == 3 and all(type(s) is float for s in out)
        assert judge([], [], word=[]) == []


def test_builtins_work_offline_without_corpora(monkeypatch, tmp_path):
    """Nothing downloads: sockets refuse to connect and NLTK sees only an empty data directory."""
    import nltk

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(nltk, "download", refuse)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    # Rebuild the cached analyzer and spell checker under these conditions.
    J._vader_analyzer.cache_clear()
    J._spell_checker.cache_clear()
    try:
        assert vader(["p"], [POSITIVE])[0] > 0.5
        assert textblob(["p"], [POSITIVE])[0] > 0.5
        assert fluency(["p"], ["the cat sat"]) == [1.0]
    finally:
        J._vader_analyzer.cache_clear()
        J._spell_checker.cache_clear()


# ---- load_judge -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILTIN_JUDGES))
def test_load_builtin(name):
    prompts, responses, words = ["Use the word day in a sentence."] * 2, [POSITIVE, NEGATIVE], ["day", "mistake"]
    expected = BUILTIN_JUDGES[name](prompts, responses, word=words)
    assert load_judge(name)(prompts, responses, word=words) == expected
    assert load_judge(f"  {name} ").__wrapped__ is BUILTIN_JUDGES[name]


def test_columns_reach_only_judges_that_take_them():
    seen = {}

    def needs_answer(prompts, responses, answer):
        seen["answer"] = answer
        return [float(r == a) for r, a in zip(responses, answer)]

    def takes_all(prompts, responses, **columns):
        seen["all"] = sorted(columns)
        return [0.0] * len(responses)

    cols = {"answer": ["4", "5"], "source": ["x", "y"]}
    assert load_judge(needs_answer)(["2+2", "2+3"], ["4", "6"], **cols) == [1.0, 0.0]
    assert seen["answer"] == ["4", "5"]
    load_judge(takes_all)(["a", "b"], ["c", "d"], **cols)
    assert seen["all"] == ["answer", "source"]
    assert load_judge(length_judge)(["a"], ["abc"], **{"answer": ["x"]}) == [3.0]  # none given to it


def test_judge_that_raises_or_returns_nan_names_the_judge_and_row():
    def broken(prompts, responses):
        raise KeyError("boom")

    def nan_at_1(prompts, responses):
        return [0.0, float("nan")]

    with pytest.raises(ValueError, match=r"^stages.x.judge: judge 'broken' failed .*KeyError"):
        load_judge(broken, field="stages.x.judge")(["p"], ["r"])
    with pytest.raises(ValueError, match=r"judge 'nan_at_1' scored row 1 \(prompt 'q', response 's'\) as nan"):
        load_judge(nan_at_1)(["p", "q"], ["r", "s"])


@pytest.mark.parametrize("sep", [":", "."])
def test_load_dotted_path_to_function(sep):
    judge = load_judge(f"{__name__}{sep}length_judge")
    assert judge(["p", "p"], ["ab", "abcd"]) == [2.0, 4.0]
    assert judge.__name__ == "length_judge"


def test_load_dotted_path_to_class_instantiates_once():
    judge = load_judge(f"{__name__}:ExclaimJudge")
    assert judge(["p", "p"], ["hi", "hi!!"]) == [0.0, 2.0]
    assert judge(["p"], ["!"]) == [1.0]


def test_load_wraps_callables_once():
    judge = load_judge(length_judge)
    assert judge.__wrapped__ is length_judge and load_judge(judge) is judge


def test_registered_names_load_the_experiments_judges(monkeypatch):
    """pyproject.toml registers the default experiment's judges (tasks/words.py) under the names its YAML uses."""
    from tasks import words

    for name in ("uses_word", "uses_word_once", "word_in_sentence", "word_vader", "word_textblob", "talks_about_word"):
        assert load_judge(name).__wrapped__ is getattr(words, name)
        assert name in J.judge_names() and name not in BUILTIN_JUDGES
    monkeypatch.setattr(J, "registered_judges", lambda: {"longest": f"{__name__}:length_judge",
                                                         "gone": "no_such_module:judge"})
    assert load_judge("longest", "evaluation.judges.gold")(["p"], ["abc"]) == [3.0]
    with pytest.raises(ValueError, match=r"^evaluation.judges.task: judge 'gone', registered as 'no_such_module:judge': "
                                         r"cannot import module 'no_such_module'"):
        load_judge("gone", "evaluation.judges.task")


def test_unknown_name_suggests_close_match():
    with pytest.raises(ValueError) as e:
        load_judge("vadr", field="stages.ppo.gold_judge")
    msg = str(e.value)
    assert msg.startswith("stages.ppo.gold_judge: unknown judge 'vadr'")
    assert "did you mean 'vader'?" in msg
    assert "'vader', 'textblob', 'fluency'" in msg and "'uses_word'" in msg and "package.module:function" in msg


def test_unknown_name_without_close_match_has_no_suggestion():
    with pytest.raises(ValueError, match=r"^judge: unknown judge 'zzz'") as e:
        load_judge("zzz")
    assert "did you mean" not in str(e.value)


@pytest.mark.parametrize("spec", ["", "   ", None, 3])
def test_empty_or_non_string_spec(spec):
    with pytest.raises(ValueError, match=r"^stages.preferences.judge: expected a judge name"):
        load_judge(spec, field="stages.preferences.judge")


def test_unimportable_module():
    with pytest.raises(ValueError, match=r"stages.ppo.heldout_judge: judge 'no_such_pkg_q7.mod:fn': "
                                         r"cannot import module 'no_such_pkg_q7.mod'"):
        load_judge("no_such_pkg_q7.mod:fn", field="stages.ppo.heldout_judge")


def test_missing_attribute():
    with pytest.raises(ValueError,
                       match=rf"^judge: judge '{__name__}:nope': module '{__name__}' has no attribute 'nope'"):
        load_judge(f"{__name__}:nope")


def test_not_callable():
    with pytest.raises(ValueError, match=r"^my.field: judge '.*:NOT_CALLABLE' is a int, not a callable"):
        load_judge(f"{__name__}:NOT_CALLABLE", field="my.field")


def test_user_judge_with_wrong_number_of_scores_fails_on_call():
    judge = load_judge(f"{__name__}:short_judge", field="f")
    with pytest.raises(ValueError, match=r"^f: judge '.*short_judge' returned 1 scores for 2 responses"):
        judge(["p", "p"], ["a", "b"])


# ---- rank_pairs -------------------------------------------------------------------------------------


def table_judge(table):
    """A judge reading scores from a dict, counting its calls."""

    def judge(prompts, responses):
        judge.calls += 1
        return [table[r] for r in responses]

    judge.calls = 0
    return judge


def test_rank_pairs_takes_best_and_worst_in_one_batch():
    judge = table_judge({"good": 0.9, "ok": 0.2, "bad": -0.5, "meh": 0.0, "fine": 0.3})
    pairs = rank_pairs(["p1", "p2"], [["ok", "good", "bad"], ["meh", "fine"]], judge, margin=0.0)
    assert judge.calls == 1
    assert pairs == [
        {"prompt": "p1", "chosen": "good", "rejected": "bad", "margin": pytest.approx(1.4, abs=1e-12)},
        {"prompt": "p2", "chosen": "fine", "rejected": "meh", "margin": pytest.approx(0.3, abs=1e-12)},
    ]


def test_rank_pairs_gives_each_response_its_prompt_rows_columns():
    # the default task's gold judge reads the requested word from the prompts file's "word" column
    prompts = ["Use the word x in a sentence.", "Use the word x in a sentence.", "lone"]
    groups = [["I love my dog.", "I love my cat."], ["a cat", "the cat sat"], ["only one"]]
    pairs = rank_pairs(prompts, groups, load_judge("word_vader"), margin=0.1,
                       columns={"word": ["dog", "cat", "unused"]})
    # prompt 0: only the dog sentence uses "dog" (VADER 0.6369), the other scores -1
    assert pairs[0]["chosen"] == "I love my dog." and pairs[0]["margin"] == pytest.approx(1.6369)
    # prompt 1: both use "cat" with VADER 0.0: a tie, below the margin, dropped; prompt 2 has one response
    assert len(pairs) == 1


def test_rank_pairs_drops_small_gaps_and_keeps_gap_equal_to_margin():
    judge = table_judge({"a": 0.0, "b": 0.25, "c": 0.5, "d": 0.75})
    pairs = rank_pairs(["small", "equal", "large"], [["a", "b"], ["a", "c"], ["a", "d"]], judge, margin=0.5)
    assert [p["prompt"] for p in pairs] == ["equal", "large"]
    assert [p["margin"] for p in pairs] == [0.5, 0.75]


def test_rank_pairs_drops_identical_texts_even_when_scores_differ():
    # A judge that scores by position gives the two copies of "same" different scores.
    def by_position(prompts, responses):
        return [float(i) for i in range(len(responses))]

    assert rank_pairs(["p"], [["same", "other", "same"]], by_position, margin=0.0) == []


def test_rank_pairs_all_tied_group_pairs_first_and_last_only_when_margin_allows():
    judge = table_judge({"x": 1.0, "y": 1.0, "z": 1.0})
    assert rank_pairs(["p"], [["x", "y", "z"]], judge, margin=0.0) == [
        {"prompt": "p", "chosen": "x", "rejected": "z", "margin": 0.0}
    ]
    assert rank_pairs(["p"], [["x", "y", "z"]], judge, margin=1e-9) == []


def test_rank_pairs_skips_prompts_with_fewer_than_two_responses():
    judge = table_judge({"a": 0.0, "b": 1.0})
    pairs = rank_pairs(["none", "one", "two"], [[], ["a"], ["a", "b"]], judge, margin=0.0)
    assert [p["prompt"] for p in pairs] == ["two"]
    assert rank_pairs([], [], judge, margin=0.0) == []


def many_prompts(n=400):
    prompts = [f"p{i}" for i in range(n)]
    groups = [[f"r{i}", f"r{i}xx", f"r{i}x"] for i in range(n)]
    return prompts, groups


def test_rank_pairs_noise_zero_never_swaps_and_one_always_swaps():
    prompts, groups = many_prompts()
    clean = rank_pairs(prompts, groups, length_judge, margin=0.0, noise=0.0, seed=3)
    flipped = rank_pairs(prompts, groups, length_judge, margin=0.0, noise=1.0, seed=3)
    assert len(clean) == len(flipped) == len(prompts)
    assert all(p["chosen"] == f"r{i}xx" and p["rejected"] == f"r{i}" for i, p in enumerate(clean))
    for c, f in zip(clean, flipped):
        assert (f["chosen"], f["rejected"], f["margin"]) == (c["rejected"], c["chosen"], c["margin"])


def test_rank_pairs_noise_is_seeded_and_independent_of_margin():
    prompts, groups = many_prompts()
    a = rank_pairs(prompts, groups, length_judge, margin=0.0, noise=0.3, seed=7)
    assert a == rank_pairs(prompts, groups, length_judge, margin=0.0, noise=0.3, seed=7)
    assert a != rank_pairs(prompts, groups, length_judge, margin=0.0, noise=0.3, seed=8)
    swapped = {p["prompt"] for p in a if p["chosen"].endswith("xx") is False}
    assert 0.22 < len(swapped) / len(prompts) < 0.38
    # A stricter margin keeps fewer prompts but swaps exactly the same ones among those it keeps.
    groups_mixed = [g if i % 2 else [g[0], g[2]] for i, g in enumerate(groups)]  # gap 1 or 2
    strict = rank_pairs(prompts, groups_mixed, length_judge, margin=2.0, noise=0.3, seed=7)
    assert len(strict) == len(prompts) // 2
    assert {p["prompt"] for p in strict if not p["chosen"].endswith("xx")} == {
        p["prompt"] for p in strict if p["prompt"] in swapped
    }


def test_rank_pairs_validates_inputs():
    with pytest.raises(ValueError, match=r"2 prompts but 1 response groups"):
        rank_pairs(["a", "b"], [["x", "y"]], length_judge, margin=0.0)
    with pytest.raises(ValueError, match=r"noise=1.5 is not a probability"):
        rank_pairs(["a"], [["x", "y"]], length_judge, margin=0.0, noise=1.5)
    with pytest.raises(ValueError, match=r"returned 1 scores for 2 responses"):
        rank_pairs(["a"], [["x", "y"]], short_judge, margin=0.0)
    with pytest.raises(ValueError, match=r"as nan; judges must return finite numbers"):
        rank_pairs(["a"], [["x", "y"]], lambda p, r: [0.0, float("nan")], margin=0.0)


def test_rank_pairs_with_vader_prefers_the_positive_sentence():
    pairs = rank_pairs(['Use the word "day" in a sentence.'],
                       [["It is a day.", POSITIVE, NEGATIVE]], vader, margin=0.5)
    assert pairs == [{"prompt": 'Use the word "day" in a sentence.', "chosen": POSITIVE, "rejected": NEGATIVE,
                      "margin": pytest.approx(0.8616 + 0.8176, abs=1e-9)}]


def test_a_judge_that_returns_text_is_refused_with_its_row():
    from rlhf.judges import _checked

    judge = _checked(lambda prompts, responses: ["1", "0.5"], "text_judge", "evaluation.judges.gold")
    # float("0.5") would have taken it; a judge's scores are numbers, as a reward function's are
    with pytest.raises(ValueError, match=r"^evaluation\.judges\.gold: judge 'text_judge' scored row 0 "
                                         r"\(prompt 'p1', response 'r1'\) as '1', a str"):
        judge(["p1", "p2"], ["r1", "r2"])
