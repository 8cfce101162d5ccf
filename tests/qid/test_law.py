"""The QiD law fit (arXiv 2411.17691): recovering known exponents from synthetic points, intervals, drops, errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from bitflow.qid.law import PAPER, fit_qid_law, fit_single_factor


def grid(noise: float = 0.0, seed: int = 0, law: dict[str, float] = PAPER):
    """3 sizes x 6 token counts x 4 bit widths = 72 points of the paper's law, with log-normal noise."""
    rng = np.random.default_rng(seed)
    pts = list(itertools.product([1e5, 3e5, 1e6], [2e5, 4e5, 6e5, 8e5, 1e6, 1.2e6], [2, 3, 4, 8]))
    n, d, p = (np.array(c, dtype=float) for c in zip(*pts, strict=True))
    qid = law["k"] * d ** law["beta"] / (n ** law["alpha"] * p ** law["gamma"])
    return n, d, p, qid * np.exp(noise * rng.standard_normal(len(qid)))


def test_exact_points_give_back_the_exponents():
    n, d, p, qid = grid()
    fit = fit_qid_law(n, d, p, qid)
    for name in ("k", "beta", "alpha", "gamma"):
        assert getattr(fit, name) == pytest.approx(PAPER[name], rel=1e-9)
    assert fit.n_points == 72 and fit.n_dropped == 0 and fit.r2 == pytest.approx(1.0)
    assert fit.predict(1e6, 1e6, 4) == pytest.approx(PAPER["k"] * 1e6 ** PAPER["beta"] / (1e6 ** PAPER["alpha"] * 4 ** PAPER["gamma"]))


def test_noisy_points_recover_the_exponents_and_the_intervals_cover_them():
    n, d, p, qid = grid(noise=0.05, seed=1)
    fit = fit_qid_law(n, d, p, qid)
    assert fit.beta == pytest.approx(PAPER["beta"], rel=0.05)
    assert fit.alpha == pytest.approx(PAPER["alpha"], rel=0.1)
    assert fit.gamma == pytest.approx(PAPER["gamma"], rel=0.02)
    for name in ("k", "beta", "alpha", "gamma"):
        lo, hi = fit.ci[name]
        assert lo < PAPER[name] < hi, name
        assert hi - lo > 0
    # 95% intervals cover the truth in about 95% of noisy repetitions (here: of 40)
    covered = 0
    for seed in range(40):
        f = fit_qid_law(*grid(noise=0.2, seed=100 + seed))
        covered += all(f.ci[k][0] < PAPER[k] < f.ci[k][1] for k in ("beta", "alpha", "gamma"))
    assert covered >= 30  # all three at once: ~0.95^3 = 86% expected


def test_the_interval_is_the_t_interval_of_the_residual_covariance():
    n, d, p, qid = grid(noise=0.1, seed=3)
    fit = fit_qid_law(n, d, p, qid)
    x = np.stack([np.ones(72), np.log(d), -np.log(n), -np.log(p)], axis=1)  # uncentred: same estimates
    coef, rss, *_ = np.linalg.lstsq(x, np.log(qid), rcond=None)
    cov = rss[0] / (72 - 4) * np.linalg.inv(x.T @ x)
    from scipy import stats

    t = stats.t.ppf(0.975, 68)
    assert fit.beta == pytest.approx(coef[1]) and math.log(fit.k) == pytest.approx(coef[0])
    assert fit.ci["gamma"] == pytest.approx((coef[3] - t * cov[3, 3] ** 0.5, coef[3] + t * cov[3, 3] ** 0.5))
    assert fit.ci["k"] == pytest.approx((math.exp(coef[0] - t * cov[0, 0] ** 0.5), math.exp(coef[0] + t * cov[0, 0] ** 0.5)))


def test_points_with_qid_at_most_zero_are_dropped_and_counted():
    n, d, p, qid = grid()
    qid = qid.copy()
    qid[[0, 5, 17]] = [0.0, -0.01, np.nan]
    fit = fit_qid_law(n, d, p, qid)
    assert (fit.n_points, fit.n_dropped) == (69, 3)
    assert fit.gamma == pytest.approx(PAPER["gamma"])


def test_fewer_points_than_parameters_is_a_clear_error():
    n, d, p, qid = grid()
    with pytest.raises(ValueError, match=r"3 usable point\(s\) .* for 4 parameters"):
        fit_qid_law(n[:3], d[:3], p[:3], qid[:3])
    qid = qid.copy()
    qid[3:] = -1.0
    with pytest.raises(ValueError, match="needs at least 4"):
        fit_qid_law(n, d, p, qid)


def test_a_factor_that_does_not_vary_is_a_clear_error():
    n, d, p, qid = grid()
    four = p == 4
    with pytest.raises(ValueError, match="singular: P takes the single value 4 "):
        fit_qid_law(n[four], d[four], p[four], qid[four])


@pytest.mark.parametrize("name", ["beta", "alpha", "gamma"])
def test_single_factor_fits_recover_each_exponent(name):
    n, d, p, qid = grid(noise=0.05, seed=2)
    fit = fit_single_factor(name, n, d, p, qid)
    assert fit.exponent == pytest.approx(PAPER[name], rel=0.1)
    assert abs(fit.exponent - PAPER[name]) < 4 * fit.stderr  # one 95% interval may miss; 4 s.e. should not
    lo, hi = fit.ci
    assert lo < fit.exponent < hi
    assert fit.slices == {"beta": 12, "alpha": 24, "gamma": 18}[name] and fit.n_points == 72
    exact = fit_single_factor(name, *grid())
    assert exact.exponent == pytest.approx(PAPER[name], rel=1e-9)
