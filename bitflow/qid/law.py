"""The QiD scaling law of Ouyang et al., "Low-Bit Quantization Favors Undertrained LLMs" (arXiv 2411.17691).

Quantization-induced degradation QiD = Loss_quantized - Loss_16bit follows

    QiD(N, D, P) = k * D^beta / (N^alpha * P^gamma)

(N non-embedding parameters, D training tokens, P bits), which is linear in logs:

    log QiD = log k + beta log D - alpha log N - gamma log P,

fitted here by ordinary least squares on centred logs, with t-distribution confidence intervals from the residual
covariance s^2 (X^T X)^-1 (s^2 = residual sum of squares / (n - 4)). Points with QiD <= 0 (or not finite) cannot
enter a log fit and are dropped; every fit says how many. The single-factor fits estimate one exponent with the
other two factors held fixed: one intercept per combination of the other factors (a slice), one shared slope.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["FACTORS", "PAPER", "PAPER_SINGLE", "LawFit", "SingleFactorFit", "fit_qid_law", "fit_single_factor"]

# the paper's unified fit on Pythia checkpoints, and its single-factor exponents
PAPER = {"k": 0.017, "beta": 0.5251, "alpha": 0.2261, "gamma": 5.4967}
PAPER_SINGLE = {"beta": 0.5316, "alpha": 0.2276, "gamma": 5.4812}
# exponent name -> (factor, sign of its log in the law)
FACTORS = {"beta": ("D", 1.0), "alpha": ("N", -1.0), "gamma": ("P", -1.0)}


def _clean(qid: Sequence[float], *factors: Sequence[float]) -> tuple[np.ndarray, list[np.ndarray], int]:
    """log QiD and the log factors of the points with a positive, finite QiD; and how many were dropped."""
    q = np.asarray(qid, dtype=np.float64)
    cols = [np.asarray(f, dtype=np.float64) for f in factors]
    if any(c.shape != q.shape for c in cols) or q.ndim != 1:
        raise ValueError(f"QiD and its factors must be 1-D and of one length, got {[q.shape, *(c.shape for c in cols)]}")
    for name, c in zip("NDP", cols, strict=False):
        if np.any(~np.isfinite(c)) or np.any(c <= 0):
            raise ValueError(f"every {name} must be a positive number for a log fit")
    keep = np.isfinite(q) & (q > 0)
    return np.log(q[keep]), [np.log(c[keep]) for c in cols], int((~keep).sum())


def _ols(y: np.ndarray, x: np.ndarray, names: list[str], confidence: float) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Least squares y ~ x; coefficients, their covariance, residual sum of squares, degrees of freedom.

    Raises ValueError for fewer points than parameters or a factor that does not vary."""
    n, p = x.shape
    if n < p:
        raise ValueError(
            f"the fit has {n} usable point(s) (QiD > 0) for {p} parameters ({', '.join(names)}); it needs at least {p}"
        )
    if np.linalg.matrix_rank(x) < p:
        raise ValueError(
            f"the fit's design is singular: a factor does not vary (or varies only together with another) among "
            f"the {n} points; parameters: {', '.join(names)}"
        )
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ coef
    rss = float(resid @ resid)
    dof = n - p
    s2 = rss / dof if dof > 0 else math.nan
    cov = s2 * np.linalg.inv(x.T @ x)
    return coef, cov, rss, dof


def _interval(value: float, se: float, dof: int, confidence: float) -> tuple[float, float]:
    if dof <= 0 or not math.isfinite(se):
        return (math.nan, math.nan)
    from scipy import stats

    t = float(stats.t.ppf(0.5 + confidence / 2, dof))
    return (value - t * se, value + t * se)


@dataclass(frozen=True)
class LawFit:
    """The unified fit. ``ci`` holds the ``confidence`` interval of k, beta, alpha and gamma (k's is exp of the
    interval of log k); ``stderr`` the standard errors (of log k for k). ``n_points`` entered the fit,
    ``n_dropped`` had QiD <= 0."""

    k: float
    beta: float
    alpha: float
    gamma: float
    ci: dict[str, tuple[float, float]]
    stderr: dict[str, float]
    n_points: int
    n_dropped: int
    r2: float
    confidence: float = 0.95

    def predict(self, n: float | np.ndarray, d: float | np.ndarray, p: float | np.ndarray) -> np.ndarray:
        """k * D^beta / (N^alpha * P^gamma)."""
        return self.k * np.power(d, self.beta) / (np.power(n, self.alpha) * np.power(p, self.gamma))

    def as_dict(self) -> dict[str, object]:
        """Plain data (JSON)."""
        return {
            "k": self.k, "beta": self.beta, "alpha": self.alpha, "gamma": self.gamma,
            "ci": {k: list(v) for k, v in self.ci.items()}, "stderr": dict(self.stderr),
            "n_points": self.n_points, "n_dropped": self.n_dropped, "r2": self.r2, "confidence": self.confidence,
        }


def fit_qid_law(
    n: Sequence[float], d: Sequence[float], p: Sequence[float], qid: Sequence[float], confidence: float = 0.95
) -> LawFit:
    """Fit QiD = k D^beta / (N^alpha P^gamma) by least squares in log space (centred logs), with t intervals.

    Points with QiD <= 0 are dropped (counted in ``n_dropped``). Raises ValueError when fewer than 4 points
    remain or a factor takes a single value."""
    y, (ln, ld, lp), dropped = _clean(qid, n, d, p)
    names = ["log k", "beta", "alpha", "gamma"]
    if len(y) < len(names):
        raise ValueError(
            f"the fit has {len(y)} usable point(s) (QiD > 0; {dropped} dropped) for {len(names)} parameters "
            f"({', '.join(names)}); it needs at least {len(names)}"
        )
    for factor, col in (("D", ld), ("N", ln), ("P", lp)):
        if np.ptp(col) <= 1e-9 * max(1.0, float(np.abs(col).max())):
            raise ValueError(
                f"the fit's design is singular: {factor} takes the single value {math.exp(col[0]):.6g} among the "
                f"{len(y)} usable point(s); the law needs at least 2 values of each of N, D and P"
            )
    logs = np.stack([ld, -ln, -lp], axis=1)
    means = logs.mean(axis=0)
    x = np.concatenate([np.ones((len(y), 1)), logs - means], axis=1)
    coef, cov, rss, dof = _ols(y, x, names, confidence)
    se = np.sqrt(np.diag(cov))
    # log k at the uncentred logs; the centred design makes the intercept uncorrelated with the slopes
    log_k = float(coef[0] - coef[1:] @ means)
    se_log_k = float(math.sqrt(cov[0, 0] + means @ cov[1:, 1:] @ means)) if dof > 0 else math.nan
    lo, hi = _interval(log_k, se_log_k, dof, confidence)
    ci = {"k": (math.exp(lo), math.exp(hi)) if math.isfinite(lo) else (math.nan, math.nan)}
    stderr = {"k": se_log_k}
    for i, name in enumerate(("beta", "alpha", "gamma"), start=1):
        ci[name] = _interval(float(coef[i]), float(se[i]), dof, confidence)
        stderr[name] = float(se[i])
    tss = float(((y - y.mean()) ** 2).sum())
    return LawFit(
        k=math.exp(log_k), beta=float(coef[1]), alpha=float(coef[2]), gamma=float(coef[3]), ci=ci, stderr=stderr,
        n_points=len(y), n_dropped=dropped, r2=1.0 - rss / tss if tss > 0 else math.nan, confidence=confidence,
    )


@dataclass(frozen=True)
class SingleFactorFit:
    """One exponent (``name``: beta, alpha or gamma, with the law's sign) with the other two factors held fixed:
    ``slices`` combinations of them, each with its own intercept."""

    name: str
    factor: str
    exponent: float
    ci: tuple[float, float]
    stderr: float
    n_points: int
    n_dropped: int
    slices: int
    confidence: float = 0.95
    intercepts: dict[tuple[float, float], float] = field(default_factory=dict)


def fit_single_factor(
    name: str,
    n: Sequence[float],
    d: Sequence[float],
    p: Sequence[float],
    qid: Sequence[float],
    confidence: float = 0.95,
) -> SingleFactorFit:
    """The single-factor fit of exponent ``name`` (``beta``: QiD ~ D^beta; ``alpha``: QiD ~ N^-alpha; ``gamma``:
    QiD ~ P^-gamma): log QiD = c_slice + sign * e * log F, one intercept per combination of the other two factors.

    Slices with a single point carry no information on the slope and are left out of ``slices``."""
    if name not in FACTORS:
        raise ValueError(f"name={name!r} is not allowed; allowed: {', '.join(FACTORS)}")
    factor, sign = FACTORS[name]
    y, (ln, ld, lp), dropped = _clean(qid, n, d, p)
    logs = {"N": ln, "D": ld, "P": lp}
    others = [f for f in "NDP" if f != factor]
    keys = [tuple(round(float(logs[o][i]), 12) for o in others) for i in range(len(y))]
    counts: dict[tuple[float, ...], int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    slices = sorted(k for k, c in counts.items() if c > 1)
    rows = [i for i, key in enumerate(keys) if key in set(slices)]
    params = [f"intercept {i}" for i in range(len(slices))] + [name]
    if not rows:
        raise ValueError(
            f"the single-factor fit of {name} needs points that differ only in {factor}; none do "
            f"({len(y)} usable point(s))"
        )
    index = {key: j for j, key in enumerate(slices)}
    x = np.zeros((len(rows), len(slices) + 1))
    for r, i in enumerate(rows):
        x[r, index[keys[i]]] = 1.0
        x[r, -1] = sign * logs[factor][i]
    coef, cov, _, dof = _ols(y[rows], x, params, confidence)
    se = float(math.sqrt(cov[-1, -1])) if dof > 0 else math.nan
    return SingleFactorFit(
        name=name, factor=factor, exponent=float(coef[-1]), ci=_interval(float(coef[-1]), se, dof, confidence),
        stderr=se, n_points=len(rows), n_dropped=dropped, slices=len(slices), confidence=confidence,
        intercepts={tuple(float(f'{math.exp(v):.6g}') for v in key): float(c)
                    for key, c in zip(slices, coef[:-1], strict=True)},
    )
