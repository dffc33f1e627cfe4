"""Statistics for comparing policies: a paired bootstrap of a mean difference, and mean/std.

The evaluation scores the same held-out prompts before and after training, so the comparison is paired:
resampling prompts (not scores) keeps each prompt's before/after together and lets per-prompt difficulty
cancel out, giving a much tighter interval than comparing two independent means.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["mean_std", "paired_bootstrap"]

# Upper bound on resampled values held in memory at once (8 bytes each, index and value: ~32 MiB).
_MAX_DRAWS = 2**21


def paired_bootstrap(
    before: Sequence[float],
    after: Sequence[float],
    n_resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Mean of the paired differences `after[i] - before[i]` with a percentile bootstrap interval.

    Items are resampled with replacement `n_resamples` times (numpy's generator seeded with `seed`, so
    the interval is reproducible); `ci_low`/`ci_high` are the (1 - confidence)/2 and (1 + confidence)/2
    quantiles of the resampled mean differences.

    Returns `{"mean_before", "mean_after", "mean_diff", "ci_low", "ci_high"}` as floats.
    Raises `ValueError` when the lists differ in length, are empty, hold non-finite values, or the
    settings are out of range.
    """
    b, a = _vector(before, "before"), _vector(after, "after")
    if b.size != a.size:
        raise ValueError(
            f"paired_bootstrap: before has {b.size} values and after has {a.size}; pass one score per item "
            f"for the same items in the same order"
        )
    if b.size == 0:
        raise ValueError("paired_bootstrap: before and after are empty; score at least one item")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"paired_bootstrap: confidence={confidence} must lie strictly between 0 and 1, e.g. 0.95")
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"paired_bootstrap: n_resamples={n_resamples} must be a positive integer, e.g. 10000")
    n_resamples = int(n_resamples)

    diff = a - b
    n = diff.size
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    # Resample in chunks so thousands of items times thousands of resamples never builds one huge index
    # matrix; the chunk size depends only on n, so results stay reproducible for a seed.
    chunk = max(1, _MAX_DRAWS // n)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = diff[idx].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return {
        "mean_before": float(b.mean()),
        "mean_after": float(a.mean()),
        "mean_diff": float(diff.mean()),
        "ci_low": float(low),
        "ci_high": float(high),
    }


def mean_std(xs: Sequence[float], ddof: int = 0) -> tuple[float, float]:
    """Mean and standard deviation of `xs` as floats.

    `ddof=0` (the default) gives the population standard deviation, the one used to normalise scores;
    `ddof=1` gives the sample estimate. Raises `ValueError` for fewer than `ddof + 1` values or
    non-finite values.
    """
    v = _vector(xs, "xs")
    if v.size <= ddof:
        raise ValueError(f"mean_std: xs has {v.size} values; at least {ddof + 1} are needed for ddof={ddof}")
    return float(v.mean()), float(v.std(ddof=ddof))


def _vector(xs: Sequence[float], name: str) -> np.ndarray:
    """`xs` as a 1-D float array, or a `ValueError` naming the argument."""
    try:
        v = np.asarray(xs, dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected a list of numbers ({e})") from None
    if v.ndim != 1:
        raise ValueError(f"{name}: expected a flat list of numbers, got an array of shape {v.shape}")
    bad = np.flatnonzero(~np.isfinite(v))
    if bad.size:
        raise ValueError(f"{name}: value {v[bad[0]]} at index {bad[0]} is not finite; drop or fix that item")
    return v
