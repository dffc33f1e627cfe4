"""The default experiment's task, "Use the word X in a sentence.", and its judges.

The library scores with judges it does not know: an experiment registers its own under names, as
pyproject.toml does these (entry points of the `rlhf.judges` group), and its YAML names them like the
built-ins (`gold: word_vader`). A prompt row's `word` column names the word; without it the X of the
prompt's text does.

- `uses_word`: the task judge: 1.0 when the response uses the word the prompt asks for as a whole word,
  any case; else 0.0.
- `uses_word_once`: the same, but 1.0 only when the word is used exactly once.
- `word_in_sentence`: 1.0 only when the word is used exactly once in an answer that reads as a sentence
  (`reads_as_sentence`: a clause, no word padded in twice); "the rim of the rim" and "a lipped role" fail,
  "he was divinely interesting" passes.
- `word_vader`: the gold judge, the simulated person whose preferences the reward model learns: VADER's
  compound sentiment (in [-1, 1]) of a response that does the task, and -1, the worst score, for one that
  does not. Doing what was asked comes first; among answers that do, the more positive one wins.
- `word_textblob`: the same with TextBlob's polarity: the held-out judge nothing is trained on, so a gain
  here is not just the policy exploiting VADER's lexicon.
- `talks_about_word`: 1.0 where the answer talks about the word or the sentence ("The word rim is used in
  the sentence ...") instead of only using it: a way to pass `uses_word` that a reader does not want.
"""

from __future__ import annotations

import re

from rlhf.judges import Judge, split_words, textblob, vader

__all__ = ["reads_as_sentence", "requested_word", "talks_about_word", "uses_word", "uses_word_once",
           "word_in_sentence", "word_textblob", "word_vader"]


# "Use the word X in a sentence." (quotes around X allowed, as in earlier versions of the data)
_ASKED_WORD = re.compile(r"""\buse the word ["“']?([^\s"”']+)["”']? in a sentence""", re.IGNORECASE)


def requested_word(prompt: str) -> str | None:
    """The word a prompt of the default task asks for ("Use the word X in a sentence."), or None."""
    match = _ASKED_WORD.search(prompt)
    return match.group(1) if match else None


def uses_word(prompts: list[str], responses: list[str], word: list[str] | None = None, **columns) -> list[float]:
    """1.0 where the response uses the requested word as a whole word (any case), else 0.0.

    The word is the prompt row's `word` column when the prompts file has one, else the X of "Use the
    word X in a sentence." in the prompt. "firm" counts in "Firm ground." and "a firm's books", not in
    "firmly" or "infirm": the task is to use the word, not a longer one that contains its letters.
    """
    return [1.0 if n >= 1 else 0.0 for n in _word_counts("uses_word", prompts, responses, word)]


def uses_word_once(prompts: list[str], responses: list[str], word: list[str] | None = None,
                   **columns) -> list[float]:
    """1.0 where the response uses the requested word exactly once (as `uses_word` counts words), else 0.0:
    "the rim of the rim" uses "rim" but pads the answer with a copy of it."""
    return [1.0 if n == 1 else 0.0 for n in _word_counts("uses_word_once", prompts, responses, word)]


# Commentary on the request rather than an answer to it: "the word", "the sentence", "this sentence", "in a
# sentence" (the prompt's own phrase), or the word itself in quotes ("lipped" was used ...).
_COMMENTARY = re.compile(r"\b(the word|the sentence|this sentence|in a sentence)\b", re.IGNORECASE)


def talks_about_word(prompts: list[str], responses: list[str], word: list[str] | None = None,
                     **columns) -> list[float]:
    """1.0 where the response talks about the word or the sentence instead of only using it, else 0.0:
    "The word rim is used in the sentence ..." passes `uses_word` by naming the word. The instruct model
    answers this way to ~7% of the held-out words; a policy that learns it has found a cheap way to the
    task check, and the share says how far (docs/smol.md)."""
    words = word if word is not None else [requested_word(p) or "" for p in prompts]
    return [1.0 if _COMMENTARY.search(r) or (w and re.search(rf"[\"“']{re.escape(w)}[\"”']", r, re.IGNORECASE))
            else 0.0 for r, w in zip(responses, words)]


# A cheap clause test. A subject pronoun first ("he was led astray", "they sighted land") or a finite
# auxiliary or copula anywhere ("the play was abstractive", "focused light can set a fire") marks a clause;
# WordNet's phrases ("a jealous lover", "shed bitter tears") have neither. It misses clauses with a noun
# subject and a plain verb ("the automobile reduced the demand"): a sentence judge that errs towards "no"
# cannot be satisfied by a phrase.
_SUBJECTS = frozenset("i you he she it we they there".split())
_FINITE = frozenset(
    "am is are was were has have had do does did will would can could shall should may might must "
    "isn't aren't wasn't weren't hasn't haven't hadn't don't doesn't didn't won't wouldn't can't couldn't "
    "shouldn't mustn't i'm you're we're they're it's he's she's that's there's".split())
# Words a sentence may repeat ("the cat sat on the mat"); any other word written twice is padding.
_FUNCTION_WORDS = _SUBJECTS | _FINITE | frozenset(
    "a an the of to in on at for with by from and or but as that this these those his her its their our your "
    "my me him them us not no so than then when if".split())


def reads_as_sentence(response: str) -> bool:
    """Whether a response reads as a sentence, not a phrase: at least four words, a subject pronoun first or
    a finite auxiliary/copula anywhere, and no word but a function word ("the", "of", "was", ...) written
    twice (padding such as "the divinely was divinely" is not a sentence). Case and punctuation are
    ignored."""
    words = split_words(response)
    if len(words) < 4 or not (words[0] in _SUBJECTS or any(w in _FINITE for w in words)):
        return False
    content = [w for w in words if w not in _FUNCTION_WORDS]
    return len(content) == len(set(content))


def word_in_sentence(prompts: list[str], responses: list[str], word: list[str] | None = None,
                     **columns) -> list[float]:
    """1.0 where the response uses the requested word exactly once (as `uses_word_once`) and reads as a
    sentence (`reads_as_sentence`), else 0.0: what "Use the word X in a sentence." asks, checked cheaply."""
    counts = _word_counts("word_in_sentence", prompts, responses, word)
    return [1.0 if n == 1 and reads_as_sentence(r) else 0.0 for n, r in zip(counts, responses)]


def _word_counts(judge: str, prompts: list[str], responses: list[str], word: list[str] | None) -> list[int]:
    """How often each response uses its prompt's requested word as a whole word, any case."""
    words = list(word) if word is not None else [requested_word(p) for p in prompts]
    counts = []
    for i, (w, response) in enumerate(zip(words, responses)):
        if not isinstance(w, str) or not w.strip():
            raise ValueError(f"{judge}: prompt {i} ({prompts[i]!r}) names no word; give the prompts file a "
                             '"word" column or phrase the prompt as "Use the word X in a sentence."')
        pattern = rf"(?<![^\W_]){re.escape(w.strip())}(?![^\W_])"
        counts.append(len(re.findall(pattern, response, flags=re.IGNORECASE)))
    return counts


def _on_task(tone: Judge, prompts: list[str], responses: list[str], columns: dict) -> list[float]:
    """`tone`'s score where the response does the task (`uses_word`), the worst score -1 where it does not."""
    done = uses_word(prompts, responses, **columns)
    scores = tone(prompts, responses)
    return [s if ok else -1.0 for s, ok in zip(scores, done)]


def word_vader(prompts: list[str], responses: list[str], **columns) -> list[float]:
    """VADER compound of a response that uses the requested word, -1 for one that does not (in [-1, 1])."""
    return _on_task(vader, prompts, responses, columns)


def word_textblob(prompts: list[str], responses: list[str], **columns) -> list[float]:
    """TextBlob polarity of a response that uses the requested word, -1 for one that does not (in [-1, 1])."""
    return _on_task(textblob, prompts, responses, columns)
