"""Selection criteria: pure functions from routing statistics to the experts to remove.

specificity (the paper's domain / language masks): expert e belongs to label D when its mean
  routing weight on D is at least `factor` times its weight on the second label, and at least
  `floor` (so that experts nobody uses are not picked by noise). With `coverage`, D's experts
  are ranked by specificity (weight on D over the best other label) and taken until they carry
  that share of D's routing mass, trading the edit's strength against collateral damage.
pearson (the paper's toxic expert purging): correlation over tokens between an expert's
  routing weight and a toxicity score, from running sums; experts above a threshold go.
"""

from __future__ import annotations

import numpy as np

# The builders' default criterion per profile kind. On the shipped model only the learned
# masks move generations off a language (Python's paper-criterion mask raises its loss by
# 0.01-0.04 nats and leaves the model writing Python; docs/language-generation.md); for
# domains the paper's criterion stays the default.
DEFAULT_CRITERION = {"language": "learned", "domain": "specificity"}

__all__ = [
    "DEFAULT_CRITERION",
    "correlated_experts",
    "pearson_from_sums",
    "specific_experts",
    "specificity",
]


def _split(weights: np.ndarray, target: int) -> tuple[np.ndarray, np.ndarray]:
    """(weight on the target, best weight on any other label), each [N]."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2:
        raise ValueError(f"weights must be [labels, experts], got shape {weights.shape}")
    if not 0 <= target < weights.shape[0]:
        raise ValueError(f"target {target} out of range for {weights.shape[0]} labels")
    own = weights[target]
    others = np.delete(weights, target, axis=0)
    second = others.max(axis=0) if others.shape[0] else np.zeros_like(own)
    return own, second


def specificity(weights: np.ndarray, target: int) -> np.ndarray:
    """Weight on the target over the best other label, [N] (inf where the others are 0)."""
    own, second = _split(weights, target)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = own / second
    ratio[(second == 0) & (own > 0)] = np.inf
    ratio[(second == 0) & (own == 0)] = 0.0
    return ratio


def specific_experts(
    weights: np.ndarray,
    target: int,
    *,
    factor: float | None = 2.0,
    floor: float = 0.0,
    coverage: float | None = None,
) -> np.ndarray:
    """Experts specific to label `target`: bool [N].

    weights: [labels, N] mean routing weight per token of N experts on each label.
    factor: weight on the target >= factor * weight on the second label (None: no ratio test;
        with coverage, the ranking alone decides).
    floor: minimum weight on the target (same units as weights).
    coverage: in (0, 1]: of the experts passing factor and floor, take the most specific
        (ties: heavier first) until they carry this share of the target's total weight.
    """
    own, second = _split(weights, target)
    selected = own >= floor
    selected &= own > 0
    if factor is not None:
        selected &= own >= factor * second
    if coverage is None:
        return selected
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    total = own.sum()
    candidates = np.flatnonzero(selected)
    if total <= 0 or candidates.size == 0:
        return np.zeros_like(selected)
    ratio = specificity(weights, target)[candidates]
    order = candidates[np.lexsort((-own[candidates], -ratio))]  # by ratio, then weight
    carried = np.cumsum(own[order]) / total
    count = int(np.searchsorted(carried, coverage - 1e-12)) + 1  # first prefix reaching it
    out = np.zeros_like(selected)
    out[order[:count]] = True
    return out


def pearson_from_sums(
    n: int,
    sum_s: float,
    sum_s2: float,
    sum_x: np.ndarray,
    sum_x2: np.ndarray,
    sum_xs: np.ndarray,
) -> np.ndarray:
    """Pearson r of x (per expert) with s over n tokens, from the running sums; NaN where x
    or s is constant. Computed in float64 from centred sums."""
    sum_x = np.asarray(sum_x, dtype=np.float64)
    if n < 2:
        return np.full(sum_x.shape, np.nan)
    cov = np.asarray(sum_xs, dtype=np.float64) - sum_x * (sum_s / n)
    var_x = np.asarray(sum_x2, dtype=np.float64) - sum_x * (sum_x / n)
    var_s = sum_s2 - sum_s * sum_s / n
    # Rounding can leave tiny negative or positive variances for constant x: treat as 0.
    tiny = 1e-12 * np.maximum(np.asarray(sum_x2, dtype=np.float64), 1e-300)
    var_x = np.where(var_x > tiny, var_x, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = cov / np.sqrt(var_x * var_s) if var_s > 0 else np.full(sum_x.shape, np.nan)
    r = np.where(var_x > 0, r, np.nan)
    return np.clip(r, -1.0, 1.0)


def correlated_experts(r: np.ndarray, threshold: float) -> np.ndarray:
    """Experts whose correlation exceeds the threshold (NaN never does): bool, r's shape."""
    r = np.asarray(r, dtype=np.float64)
    return np.nan_to_num(r, nan=-np.inf) > threshold
