"""data/build.py's sentence frames: which WordNet examples get one, and which frame."""

import importlib.util
import random
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("data_build", Path(__file__).resolve().parents[1] / "data" / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


class FirstFrame(random.Random):
    """An rng whose choice is always the first frame, so the expected sentences can be written down."""

    def choice(self, seq):
        return seq[0]


@pytest.mark.parametrize("example, word, pos, expected", [
    # a noun or adjective example opening with a determiner: a noun-phrase frame, the determiner lowered
    ("a jealous lover", "jealous", "adj", "It was a jealous lover."),
    ("The generic name", "generic", "adj", "It was the generic name."),
    ("the dead of winter", "dead", "noun", "It was the dead of winter."),
    # an adjective example opening with the adjective itself: a bare noun phrase
    ("livid bruises", "livid", "adj", "I saw livid bruises."),
    # a verb example opening with a verb lemma, lower case: a verb-phrase frame, end punctuation replaced
    ("seek an education", "seek", "verb", "I wanted to seek an education."),
    ("shelter from the storm;", "shelter", "verb", "I wanted to shelter from the storm."),
    # kept as they are: sentences already, and shapes no frame fits
    ("he was led astray", "led", "verb", "he was led astray"),
    ("Please write to me every week", "write", "verb", "Please write to me every week"),
    ("on familiar terms", "familiar", "adj", "on familiar terms"),
    ("quite soon", "soon", "adv", "quite soon"),
])
def test_as_sentence_frames_phrases_by_their_part_of_speech(example, word, pos, expected):
    assert build.as_sentence(example, word, pos, {"seek", "shelter", "please", "write"}, FirstFrame()) == expected


def test_every_frame_is_a_sentence_with_the_word_once_and_no_tone():
    from rlhf.judges import vader
    from tasks.words import word_in_sentence

    frames = build.NOUN_PHRASE_FRAMES + build.BARE_NOUN_PHRASE_FRAMES + build.VERB_PHRASE_FRAMES
    filled = [f.format("see a rim") if f in build.VERB_PHRASE_FRAMES else f.format("a rim") for f in frames]
    assert word_in_sentence(["Use the word rim in a sentence."] * len(filled), filled) == [1.0] * len(filled)
    assert vader(filled, filled) == [0.0] * len(filled)  # the gold judge's tone is the example's own
