"""Judges: programs that score responses, standing in for human annotators.

A judge is any callable `(prompts: list[str], responses: list[str]) -> list[float]` returning one score
per response, higher meaning better. It takes whole batches so a judge backed by a model can score many
responses in one call; the built-ins here simply loop.

Built-ins (`BUILTIN_JUDGES`):

- `vader`: VADER's compound sentiment of the response, in [-1, 1]. The default experiment's gold judge,
  the simulated human whose preferences the reward model learns.
- `textblob`: TextBlob's polarity of the response, in [-1, 1]. A held-out judge nothing is trained on, so
  a gain here is not just the policy exploiting VADER's lexicon.
- `fluency`: the share of the response's words that a spelling dictionary knows, in [0, 1]; it catches a
  policy that drifts into gibberish while pleasing the sentiment judges.

None of them downloads anything: VADER and TextBlob's default (pattern) analyzer read lexicons shipped
inside their packages, and pyspellchecker ships its word list. Their imports are deferred to first use
so that `import rlhf.judges` stays cheap.

`load_judge` turns a config string (a built-in name or a dotted path to a user's callable) into a judge;
`rank_pairs` turns K sampled responses per prompt into preference pairs, the on-policy preference
collection of InstructGPT with a judge in place of the labellers.
"""

from __future__ import annotations

import difflib
import functools
import math
import random
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

__all__ = ["BUILTIN_JUDGES", "Judge", "fluency", "load_judge", "rank_pairs", "textblob", "vader"]


class Judge(Protocol):
    """Scores a batch of responses to their prompts: one float per response, higher is better."""

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        """Return `len(responses)` scores; `prompts[i]` is the prompt `responses[i]` answers."""
        ...


# ---- built-in judges ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _vader_analyzer():
    # Building the analyzer parses a 7,500-entry lexicon; do it once per process, not once per call.
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader(prompts: list[str], responses: list[str]) -> list[float]:
    """VADER compound sentiment of each response, in [-1, 1] (the prompt is ignored)."""
    analyzer = _vader_analyzer()
    return [float(analyzer.polarity_scores(r)["compound"]) for r in responses]


def textblob(prompts: list[str], responses: list[str]) -> list[float]:
    """TextBlob polarity of each response, in [-1, 1] (the prompt is ignored)."""
    # TextBlob's default analyzer is the pattern lexicon bundled with the package; unlike its
    # NaiveBayesAnalyzer it needs no NLTK corpora, so nothing is downloaded.
    from textblob import TextBlob

    return [float(TextBlob(r).sentiment.polarity) for r in responses]


@functools.lru_cache(maxsize=1)
def _spell_checker():
    # Loading the English word-frequency list takes ~0.15 s; do it once per process.
    from spellchecker import SpellChecker

    return SpellChecker(language="en")


# Words are runs of letters (any alphabet) joined by apostrophes, so "don't" is one word; digits and
# punctuation are not words and neither help nor hurt the score.
_WORD = re.compile(r"[^\W\d_]+(?:['\u2019][^\W\d_]+)*")


def fluency(prompts: list[str], responses: list[str]) -> list[float]:
    """Share of each response's words that pyspellchecker's English dictionary knows, in [0, 1].

    A response without any word (empty, or only digits and punctuation) scores 0.0: saying nothing is
    not fluent. The prompt is ignored.
    """
    checker = _spell_checker()
    scores = []
    for response in responses:
        # Curly apostrophes are normalised because the dictionary spells contractions with "'".
        words = [w.replace("\u2019", "'").lower() for w in _WORD.findall(response)]
        if not words:
            scores.append(0.0)
            continue
        known = checker.known(set(words))
        # Count tokens, not distinct words: "qzxvw qzxvw the" is two-thirds gibberish.
        scores.append(sum(w in known for w in words) / len(words))
    return scores


BUILTIN_JUDGES: dict[str, Judge] = {"vader": vader, "textblob": textblob, "fluency": fluency}
"""Judges a config can name without a dotted path."""


# ---- loading judges from config ------------------------------------------------------------------------


def load_judge(spec: str | Judge, field: str = "judge") -> Judge:
    """The judge a config value names.

    `spec` is a key of `BUILTIN_JUDGES` (`vader`, `textblob`, `fluency`) or a dotted path to a user's
    callable, `package.module:function` or `package.module.function`, importable from the working
    directory or `PYTHONPATH`. A class found there is instantiated once with no arguments (so a judge can
    load a model in `__init__`), and its instance is the judge. User judges are wrapped so that a wrong
    number of scores fails loudly instead of being silently zipped away. A callable passed in place of
    a string is returned unchanged.

    `field` is the config key the value came from (e.g. `stages.ppo.gold_judge`); every error names it.
    Raises `ValueError` (a `rlhf.config.ConfigError` for import failures) saying what to change.
    """
    if callable(spec) and not isinstance(spec, str):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"{field}: expected a judge name ({_builtin_names()}) or a dotted path 'package.module:function', "
            f"got {spec!r}"
        )
    spec = spec.strip()
    if spec in BUILTIN_JUDGES:
        return BUILTIN_JUDGES[spec]
    if ":" not in spec and "." not in spec:
        close = difflib.get_close_matches(spec, list(BUILTIN_JUDGES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"{field}: unknown judge {spec!r}; built-in judges are {_builtin_names()}, or give a dotted path "
            f"'package.module:function' to your own{hint}"
        )

    # Shared with stage classes: same syntax, and it resolves modules from the working directory.
    from rlhf.config import ConfigError, import_object

    obj = import_object(spec, what=f"{field}: judge")
    if isinstance(obj, type):
        try:
            obj = obj()
        except TypeError as e:
            raise ConfigError(
                f"{field}: judge {spec!r} is a class that cannot be created without arguments ({e}); "
                f"give it defaults or point {field} at a function"
            ) from None
    if not callable(obj):
        raise ConfigError(
            f"{field}: judge {spec!r} is a {type(obj).__name__}, not a callable; point {field} at a function "
            f"(prompts: list[str], responses: list[str]) -> list[float]"
        )
    return _checked(obj, spec, field)


def _builtin_names() -> str:
    return ", ".join(repr(name) for name in BUILTIN_JUDGES)


def _checked(fn: Callable, spec: str, field: str) -> Judge:
    """`fn` with its output turned into a list of floats, one per response, or a clear error."""

    @functools.wraps(fn)
    def judge(prompts: list[str], responses: list[str]) -> list[float]:
        out = fn(prompts, responses)
        try:
            scores = [float(s) for s in out]
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"{field}: judge {spec!r} must return a list of numbers, one per response ({e})"
            ) from None
        if len(scores) != len(responses):
            raise ValueError(
                f"{field}: judge {spec!r} returned {len(scores)} scores for {len(responses)} responses; "
                f"it must return exactly one score per response"
            )
        return scores

    return judge


# ---- preference pairs from a judge ---------------------------------------------------------------------


def rank_pairs(
    prompts: Sequence[str],
    responses_per_prompt: Sequence[Sequence[str]],
    judge: Judge,
    margin: float,
    noise: float = 0.0,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Preference pairs from K sampled responses per prompt, labelled by a simulated annotator.

    All responses go to `judge` in one batch. For each prompt with at least two responses, the best and
    worst scoring responses form a pair; it is dropped when the score gap is below `margin` (the judge
    barely prefers one, so the label would be mostly noise) or when both texts are identical (nothing to
    learn). With probability `noise` the kept pair's labels are swapped, simulating annotator mistakes.

    The noise draws come from `random.Random(seed)`, one per prompt with K >= 2 whether or not its pair is
    kept, so which prompts get swapped does not depend on `margin`. Among tied scores the best is the
    earliest response and the worst the latest.

    Returns dicts `{"prompt", "chosen", "rejected", "margin"}` in prompt order, where `margin` is the
    judge's score gap (best - worst, >= 0), left as is when the labels are swapped: a mistaken annotator
    does not know they are wrong.
    """
    if len(prompts) != len(responses_per_prompt):
        raise ValueError(
            f"rank_pairs: {len(prompts)} prompts but {len(responses_per_prompt)} response groups; "
            f"pass one list of sampled responses per prompt"
        )
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"rank_pairs: noise={noise} is not a probability; use a value in [0, 1]")

    groups = [(p, list(g)) for p, g in zip(prompts, responses_per_prompt) if len(g) >= 2]
    flat_prompts = [p for p, g in groups for _ in g]
    flat_responses = [r for _, g in groups for r in g]
    scores = [float(s) for s in judge(flat_prompts, flat_responses)] if flat_responses else []
    if len(scores) != len(flat_responses):
        raise ValueError(
            f"rank_pairs: the judge returned {len(scores)} scores for {len(flat_responses)} responses; "
            f"a judge returns one score per response"
        )
    bad = next((i for i, s in enumerate(scores) if not math.isfinite(s)), None)
    if bad is not None:
        raise ValueError(
            f"rank_pairs: the judge scored response {flat_responses[bad]!r} as {scores[bad]}; "
            f"judges must return finite numbers"
        )

    rng = random.Random(seed)
    pairs: list[dict[str, Any]] = []
    start = 0
    for prompt, group in groups:
        group_scores = scores[start : start + len(group)]
        start += len(group)
        swap = rng.random() < noise
        best = max(range(len(group)), key=group_scores.__getitem__)
        # The last of the lowest, so a group whose scores all tie still pairs two different responses
        # (kept only when margin <= 0, as the caller asked for every pair).
        worst = min(reversed(range(len(group))), key=group_scores.__getitem__)
        gap = group_scores[best] - group_scores[worst]
        if gap < margin or group[best] == group[worst]:
            continue
        chosen, rejected = group[best], group[worst]
        if swap:
            chosen, rejected = rejected, chosen
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": gap})
    return pairs
