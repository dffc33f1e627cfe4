"""The default experiment's task judges (tasks/words.py): the requested word, used once, in a sentence, in a
positive tone."""

from __future__ import annotations

import pytest

from rlhf.judges import load_judge
from tasks import words as W

POSITIVE = "I love this wonderful day."
NEGATIVE = "This is a terrible, awful mistake."


def test_requested_word_is_read_from_the_prompt_with_or_without_quotes():
    assert W.requested_word("Use the word firm in a sentence.") == "firm"
    assert W.requested_word('Use the word "firm" in a sentence.') == "firm"
    assert W.requested_word("use THE word Zukerman in a sentence please") == "Zukerman"
    assert W.requested_word("Write a poem.") is None


def test_uses_word_counts_whole_words_in_any_case_only():
    prompts = ["Use the word firm in a sentence."] * 7
    responses = ["you must stand firm", "Firm ground.", "a firm's books", "(firm)", "firmly", "infirm", "firm-ish"]
    # whole word, any case, punctuation around it allowed; "firmly" and "infirm" are other words;
    # "firm-ish": the hyphen is not a letter, so "firm" stands as a word there
    assert W.uses_word(prompts, responses) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0]


def test_uses_word_once_counts_the_same_words_and_wants_exactly_one():
    prompts = ["Use the word rim in a sentence."] * 6
    responses = ["a rim", "the rim of the rim", "Rim, rim!", "rims and a brim", "the rim's edge", ""]
    assert W.uses_word(prompts, responses) == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    assert W.uses_word_once(prompts, responses) == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    # loaded by its registered name, the same function, its scores checked (rlhf.judges.checked_scores)
    judge = load_judge("uses_word_once", "stages.ppo.rewards")
    assert judge(prompts, responses) == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match=r"uses_word_once: prompt 0 \('Write a poem.'\) names no word"):
        W.uses_word_once(["Write a poem."], ["roses are red"])


def test_reads_as_sentence_wants_a_clause_without_padding():
    sentences = ["he was divinely interesting",           # subject pronoun first
                 "the play was abstractive",              # a copula
                 "They found a jealous lover.",
                 "the cat sat on the mat and the dog can't",  # function words may repeat; a contraction is finite
                 "It\u2019s a rim thing"]                  # curly apostrophe
    phrases = ["a jealous lover",                         # no clause
               "the automobile reduced the demand",       # a clause the cheap test misses (plain verb)
               "he was big",                              # three words
               "the divinely was divinely independently",  # a content word written twice
               "he was rim of the rim", ""]
    assert [W.reads_as_sentence(s) for s in sentences] == [True] * 5
    assert [W.reads_as_sentence(s) for s in phrases] == [False] * 6


def test_word_in_sentence_wants_the_word_once_in_a_sentence():
    prompts = ["Use the word rim in a sentence."] * 5
    responses = ["I saw the rim of the cup.", "the rim of the rim", "I saw the brim of the cup.",
                 "a rim of gold", "It was a rim, a rim."]
    assert W.word_in_sentence(prompts, responses) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert W.word_in_sentence(["Use the word x in a sentence."], ["he was a big cat"], word=["cat"]) == [1.0]
    with pytest.raises(ValueError, match=r"word_in_sentence: prompt 0 \('Write a poem.'\) names no word"):
        W.word_in_sentence(["Write a poem."], ["roses are red"])


def test_uses_word_prefers_the_word_column_and_refuses_prompts_without_a_word():
    # the column wins over the prompt text
    assert W.uses_word(["Use the word firm in a sentence."], ["a dog"], word=["dog"]) == [1.0]
    with pytest.raises(ValueError, match=r"uses_word: prompt 0 \('Write a poem.'\) names no word"):
        W.uses_word(["Write a poem."], ["roses are red"])


def test_gold_judge_puts_the_task_first_and_tone_second():
    prompt = "Use the word day in a sentence."
    # VADER compounds (vaderSentiment 3.3.2): POSITIVE 0.8616, NEGATIVE -0.8176, "a day" 0.0
    scores = W.word_vader([prompt] * 4, [POSITIVE, "a day", "This day is a terrible, awful mistake.", NEGATIVE])
    assert scores[0] == pytest.approx(0.8616)  # uses "day", positive
    assert scores[1] == 0.0  # uses "day", neutral
    assert -1.0 < scores[2] < 0.0  # uses "day", negative: still better than not doing the task
    assert scores[3] == -1.0  # does not use "day": the worst score, whatever its tone
    tb = W.word_textblob([prompt] * 2, [POSITIVE, NEGATIVE])
    assert tb == [pytest.approx(0.75), -1.0]


@pytest.mark.parametrize("name", ["uses_word", "uses_word_once", "word_in_sentence", "word_vader", "word_textblob",
                                  "talks_about_word"])
def test_each_judge_returns_one_float_per_response_and_accepts_empty_batches(name):
    judge = getattr(W, name)
    out = judge(["a", "b", "c"], [POSITIVE, "", NEGATIVE], word=["day", "x", "mistake"])
    assert len(out) == 3 and all(type(s) is float for s in out)
    assert judge([], [], word=[]) == []


def test_talks_about_word_flags_commentary_not_answers():
    prompts = ["Use the word rim in a sentence."] * 6
    responses = [
        'The word rim is used in the sentence "The rim of the moon is a beautiful sight."',  # names the word
        "Here is a sentence: the rim of the cup was chipped.",           # no: "a sentence" is not "in a sentence"
        'I used "rim" to describe the edge.',                            # the word in quotes
        "The rim of the glass caught the light.",                        # an answer
        "Rim: the edge of something round. This sentence uses it.",      # "this sentence"
        "A trimmed hedge.",                                              # neither (and not the word)
    ]
    assert W.talks_about_word(prompts, responses) == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    # the word column wins over the prompt's text, as for uses_word
    assert W.talks_about_word(["Write."], ["'cup' it is"], word=["cup"]) == [1.0]
    assert load_judge("talks_about_word", "evaluation.judges.commentary")(prompts[:1], responses[:1]) == [1.0]
