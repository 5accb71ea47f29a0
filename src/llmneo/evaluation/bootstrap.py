"""Bootstrap 95% intervals over held-out rows for the token-weighted metrics (perplexity, agreement, KL) and bits
per byte.

The held-out rows, not the tokens, are the independent units: a conversation's tokens move together. Each resample
draws the rows with replacement and recomputes the metric as the point estimate does (summed over the drawn rows'
answer tokens, divided by their token count); the interval is the percentile interval of the resampled values.
"""

from __future__ import annotations

import math

import numpy as np

METRIC_OF_SUM = {"nll": "perplexity", "agree": "top1_agreement", "kl": "kl_to_teacher"}


def bootstrap_intervals(row_sums: dict[str, np.ndarray], row_tokens: np.ndarray, resamples: int = 1000,
                        level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """``{metric}_ci_low`` / ``{metric}_ci_high`` for every summed quantity in ``row_sums`` (per held-out row), with
    ``row_tokens`` the answer tokens of each row; perplexity's interval is exp of the mean NLL's."""
    tokens = np.asarray(row_tokens, dtype=np.float64)
    if resamples < 1 or tokens.size == 0 or tokens.sum() == 0:
        return {}
    draws = resampled_rows(tokens.size, resamples, seed)
    intervals = {}
    for name, sums in row_sums.items():
        metric = METRIC_OF_SUM[name]
        found = percentile_interval(metric, resampled_ratios(sums, tokens, draws), level)
        if name == "nll":
            found = {key: math.exp(value) for key, value in found.items()}
        intervals.update(found)
    return intervals


def bits_per_byte_interval(row_nll: np.ndarray, row_bytes: np.ndarray, resamples: int = 1000, level: float = 0.95,
                           seed: int = 0) -> dict[str, float]:
    """``bits_per_byte_ci_low`` / ``_high``: each row's answer NLL in bits over its answer bytes, the rows drawn as
    for the other metrics (the same seed: the same resamples)."""
    counts = np.asarray(row_bytes, dtype=np.float64)
    if resamples < 1 or counts.size == 0 or counts.sum() == 0:
        return {}
    bits = np.asarray(row_nll, dtype=np.float64) / math.log(2)
    return percentile_interval("bits_per_byte", resampled_ratios(bits, counts, resampled_rows(counts.size, resamples,
                                                                                                 seed)), level)


def resampled_rows(rows: int, resamples: int, seed: int = 0) -> np.ndarray:
    """(resamples, rows) row indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, rows, size=(resamples, rows))


def resampled_ratios(sums, counts, draws: np.ndarray) -> np.ndarray:
    """Per resample: the drawn rows' summed ``sums`` over their summed ``counts`` (a resample of only empty rows
    counts one)."""
    sums, counts = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    return sums[draws].sum(axis=1) / np.maximum(counts[draws].sum(axis=1), 1.0)


def percentile_interval(name: str, values: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """``{name}_ci_low`` / ``{name}_ci_high``: the percentile interval of resampled ``values``."""
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return {f"{name}_ci_low": float(low), f"{name}_ci_high": float(high)}
