"""Judges: programs that score responses, standing in for human annotators.

A judge is any callable `(prompts: list[str], responses: list[str], **columns) -> list[float]` returning
one score per response, higher meaning better. `columns` are the prompt rows' other fields (a prompts file
of `{"prompt", "answer"}` rows gives `answer=[...]`, one value per response), so a checkable task ships its
answers beside its prompts; a judge that takes only `(prompts, responses)` is called without them. It
takes whole batches so a judge backed by a model can score many responses in one call; the built-ins
here simply loop.

Built-ins (`BUILTIN_JUDGES`), for any prompt:

- `vader`, `textblob`: the tone of the response (VADER's compound sentiment, TextBlob's polarity, both in
  [-1, 1]), prompt ignored.
- `fluency`: the share of the response's words that a spelling dictionary knows, in [0, 1]; it catches a
  policy that drifts into gibberish while pleasing the sentiment judges.

None of them downloads anything: VADER and TextBlob's default (pattern) analyzer read lexicons shipped
inside their packages, and pyspellchecker ships its word list. Their imports are deferred to first use
so that `import rlhf.judges` stays cheap.

An experiment brings the judges of its task: registered by name as entry points of the `rlhf.judges`
group (pyproject.toml registers the default experiment's, tasks/words.py), a config names them like the
built-ins; any other callable by its dotted path.

`load_judge` turns a config string (a judge's name or a dotted path to a user's callable) into a judge;
`rank_pairs` turns K sampled responses per prompt into preference pairs, the on-policy preference
collection of InstructGPT with a judge in place of the labellers.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import numbers
import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

__all__ = ["BUILTIN_JUDGES", "ENTRY_POINT_GROUP", "Judge", "checked_scores", "fluency", "judge_names", "load_judge",
           "rank_pairs", "registered_judges", "split_words", "textblob", "vader"]


class Judge(Protocol):
    """Scores a batch of responses to their prompts: one float per response, higher is better."""

    def __call__(self, prompts: list[str], responses: list[str], **columns: list) -> list[float]:
        """Return `len(responses)` scores; `prompts[i]` is the prompt `responses[i]` answers, and
        `columns[name][i]` that prompt row's other fields."""
        ...


# ---- built-in judges ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _vader_analyzer():
    # Building the analyzer parses a 7,500-entry lexicon; do it once per process, not once per call.
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader(prompts: list[str], responses: list[str], **columns) -> list[float]:
    """VADER compound sentiment of each response, in [-1, 1] (the prompt is ignored)."""
    analyzer = _vader_analyzer()
    return [float(analyzer.polarity_scores(r)["compound"]) for r in responses]


def textblob(prompts: list[str], responses: list[str], **columns) -> list[float]:
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


def split_words(text: str) -> list[str]:
    """The text's words (`_WORD`), lowercased, curly apostrophes made straight (the spelling dictionary and
    word lists spell contractions with "'")."""
    return [w.replace("\u2019", "'").lower() for w in _WORD.findall(text)]


def fluency(prompts: list[str], responses: list[str], **columns) -> list[float]:
    """Share of each response's words that pyspellchecker's English dictionary knows, in [0, 1].

    A response without any word (empty, or only digits and punctuation) scores 0.0: saying nothing is
    not fluent. The prompt is ignored.
    """
    checker = _spell_checker()
    scores = []
    for response in responses:
        words = split_words(response)
        if not words:
            scores.append(0.0)
            continue
        known = checker.known(set(words))
        # Count tokens, not distinct words: "qzxvw qzxvw the" is two-thirds gibberish.
        scores.append(sum(w in known for w in words) / len(words))
    return scores


BUILTIN_JUDGES: dict[str, Judge] = {"vader": vader, "textblob": textblob, "fluency": fluency}
"""The library's own judges, which a config names without a dotted path."""

ENTRY_POINT_GROUP = "rlhf.judges"
"""Entry points of this group register an experiment's judges by name (`name = "package.module:function"`),
so that a config names them as it names the built-ins."""


def registered_judges() -> dict[str, str]:
    """Judge names registered through the `rlhf.judges` entry points, with their dotted paths."""
    from importlib import metadata

    return {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


# ---- loading judges from config ------------------------------------------------------------------------


def load_judge(spec: str | Judge, field: str = "judge") -> Judge:
    """The judge a config value names, wrapped so that every call is checked.

    `spec` is a key of `BUILTIN_JUDGES`, a name an experiment registered (`registered_judges`), or a dotted
    path to a user's callable, `package.module:function` or `package.module.function`, importable from the
    working directory or `PYTHONPATH`. A class found there is instantiated once with no arguments (so a
    judge can load a model in `__init__`), and its instance is the judge. A callable passed in place of a
    string is wrapped the same way.

    The returned judge takes `(prompts, responses, **columns)` and hands the function only the columns
    its signature names (all of them if it takes `**kwargs`). A judge that raises, returns a non-number,
    the wrong count or a non-finite score stops with an error naming `field`, the judge and the row.
    Raises `ValueError` (a `rlhf.errors.ConfigError` for import failures) saying what to change.
    """
    if callable(spec) and not isinstance(spec, str):
        return _checked(spec, getattr(spec, "__name__", type(spec).__name__), field)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"{field}: expected a judge name ({_names(judge_names())}) or a dotted path 'package.module:function', "
            f"got {spec!r}"
        )
    spec = spec.strip()
    if spec in BUILTIN_JUDGES:
        return _checked(BUILTIN_JUDGES[spec], spec, field)
    registered = registered_judges()
    if ":" not in spec and "." not in spec and spec not in registered:
        names = judge_names()
        close = difflib.get_close_matches(spec, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"{field}: unknown judge {spec!r}; judges by name are {_names(names)}, or give a dotted path "
            f"'package.module:function' to your own{hint}"
        )

    # Shared with stage classes: same syntax, and it resolves modules from the working directory.
    from rlhf.errors import ConfigError
    from rlhf.schema import import_object

    if spec in registered:
        obj = import_object(registered[spec], what=f"{field}: judge {spec!r}, registered as")
    else:
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
            f"(prompts: list[str], responses: list[str], **columns) -> list[float]"
        )
    return _checked(obj, spec, field)


def judge_names() -> list[str]:
    """Every judge a config can name without a dotted path: the built-ins, then the registered ones."""
    return [*BUILTIN_JUDGES, *sorted(set(registered_judges()) - set(BUILTIN_JUDGES))]


def _names(names: list[str]) -> str:
    return ", ".join(repr(name) for name in names)


def _accepted_columns(fn: Callable) -> Callable[[dict], dict]:
    """A filter that keeps the columns `fn` can take: all with `**kwargs`, else those it names."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: give it none
        return lambda columns: {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return lambda columns: columns
    names = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                  inspect.Parameter.KEYWORD_ONLY)}
    return lambda columns: {k: v for k, v in columns.items() if k in names}


def checked_scores(out: Any, where: str, prompts: Sequence[str], responses: Sequence[str],
                   what: str = "judges") -> list[float]:
    """`out`, a judge's or reward function's return value, as one float per response, or a ValueError that starts with
    `where` and names the row, its prompt and its response.

    A list or tuple (or a 1-D numpy array or tensor) of real numbers is accepted: ints, floats, bools and
    numpy scalars. A string is refused (a str is a sequence of characters: "123" would read as 1, 2, 3),
    and so are a dict, None, text that looks like a number and NaN or infinity.
    """
    if hasattr(out, "tolist") and not isinstance(out, (str, bytes)):  # numpy arrays, tensors
        out = out.tolist()
    if isinstance(out, (str, bytes, Mapping)) or not isinstance(out, Sequence):
        shown = f" ({out!r:.40})" if isinstance(out, (str, bytes)) else ""
        raise ValueError(f"{where} returned {'None' if out is None else 'a ' + type(out).__name__}{shown}, not a list "
                         f"of numbers; it must return one number per response (a list of {len(responses)} here)")
    if len(out) != len(responses):
        raise ValueError(f"{where} returned {len(out)} scores for {len(responses)} responses; it must return exactly "
                         "one score per response")
    scores = []
    for i, s in enumerate(out):
        if getattr(s, "ndim", None) == 0 and hasattr(s, "item"):  # a 0-dim tensor or array
            s = s.item()
        if not isinstance(s, numbers.Real) or not math.isfinite(float(s)):
            kind = "" if isinstance(s, numbers.Real) else f", a {type(s).__name__}" if s is not None else ""
            raise ValueError(f"{where} scored row {i} (prompt {prompts[i]!r}, response {responses[i]!r}) as "
                             f"{s!r}{kind}; {what} must return finite real numbers")
        scores.append(float(s))
    return scores


def _checked(fn: Callable, spec: str, field: str) -> Judge:
    """`fn` called with the columns it takes, its output checked: one finite float per response."""
    if getattr(fn, "_rlhf_checked", False):
        return fn
    take = _accepted_columns(fn)

    @functools.wraps(fn)
    def judge(prompts: list[str], responses: list[str], **columns: list) -> list[float]:
        where = f"{field}: judge {spec!r}"
        for name, values in columns.items():
            if len(values) != len(responses):
                raise ValueError(f"{where}: column {name!r} has {len(values)} values for {len(responses)} responses")
        try:
            out = fn(list(prompts), list(responses), **take(columns))
        except Exception as e:
            raise ValueError(f"{where} failed on a batch of {len(responses)} responses "
                             f"(first prompt {prompts[0] if prompts else None!r}): {type(e).__name__}: {e}") from e
        return checked_scores(out, where, prompts, responses)

    judge._rlhf_checked = True  # type: ignore[attr-defined]
    return judge


# ---- preference pairs from a judge ---------------------------------------------------------------------


def rank_pairs(
    prompts: Sequence[str],
    responses_per_prompt: Sequence[Sequence[str]],
    judge: Judge,
    margin: float,
    noise: float = 0.0,
    seed: int = 0,
    columns: dict[str, Sequence] | None = None,
) -> list[dict[str, Any]]:
    """Preference pairs from K sampled responses per prompt, labelled by a simulated annotator.

    All responses go to `judge` in one batch, with the prompt rows' other `columns` (one value per
    prompt, repeated for each of its responses). For each prompt with at least two responses, the best and
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

    keep = [i for i, g in enumerate(responses_per_prompt) if len(g) >= 2]
    groups = [(prompts[i], list(responses_per_prompt[i])) for i in keep]
    flat_prompts = [p for p, g in groups for _ in g]
    flat_responses = [r for _, g in groups for r in g]
    flat_columns = {name: [values[i] for i in keep for _ in responses_per_prompt[i]]
                    for name, values in (columns or {}).items()}
    scores = [float(s) for s in judge(flat_prompts, flat_responses, **flat_columns)] if flat_responses else []
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


def check_judge(spec: str, key: str, prompts: str, responses: Sequence[str], prefix: str = "") -> None:
    """Before anything runs: the judge `spec` (set at `key`) loads and returns finite scores for
    `responses` to the first rows of `prompts` (with their columns); prompts that are not a local file
    only load it. Raises `ConfigError` starting with `prefix` (the file that set it)."""
    from rlhf.data import sample_rows
    from rlhf.errors import ConfigError

    try:
        judge = load_judge(spec, key)  # its messages start with the key
    except ValueError as e:
        raise ConfigError(f"{prefix}{e}") from None
    rows = sample_rows(prompts, "prompts", len(responses))
    if not rows:
        return
    columns = {name: [r.get(name) for r in rows] for name in rows[0] if name != "prompt"}
    try:
        judge([r["prompt"] for r in rows], list(responses[: len(rows)]), **columns)
    except ValueError as e:  # the loaded judge's own checks: it raised, a wrong count, NaN
        raise ConfigError(f"{prefix}{e} (checked on the first {len(rows)} prompts of {prompts} before "
                          "anything ran)") from None
