"""objectives.sample_time_pairs: the distribution of (s, t) each option promises,
checked with Kolmogorov-Smirnov tests against the exact distributions (scipy)."""
import numpy as np
import pytest
from scipy import stats

from ttfm_np.losses import DistillLossConfig
from ttfm_np.objectives import sample_time_pairs

N = 20000


def _pairs(**kw):
    return sample_time_pairs(np.random.default_rng(7), N, **kw)


def test_minmax_gap_has_density_2_times_1_minus_gap():
    s, t = _pairs()
    assert np.all((0 <= s) & (s <= t) & (t <= 1))
    gap = t - s
    # CDF of density 2 (1 - g): F(g) = 1 - (1 - g)^2
    assert stats.kstest(gap, lambda g: 1 - (1 - g) ** 2).pvalue > 1e-3
    assert stats.kstest(gap, "uniform").pvalue < 1e-6           # and it is not uniform


def test_uniform_gap_has_uniform_gap_and_uniform_start_given_the_gap():
    s, t = _pairs(pairs="uniform-gap")
    assert np.all((0 <= s) & (s <= t) & (t <= 1 + 1e-15))
    gap = t - s
    assert stats.kstest(gap, "uniform").pvalue > 1e-3
    # s | g ~ U[0, 1 - g]: s / (1 - g) is uniform and independent of g
    u = s / (1 - gap)
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    assert abs(stats.spearmanr(u, gap).statistic) < 0.03
    # long jumps start near 0: among pairs with gap > 0.9, s < 0.1
    assert s[gap > 0.9].max() < 0.1 and (gap > 0.9).mean() > 0.08


def test_frac_t1_and_max_gap_apply_to_both_samplings():
    for pairs in ("minmax", "uniform-gap"):
        s, t = _pairs(pairs=pairs, frac_t1=0.3)
        assert abs((t == 1.0).mean() - 0.3) < 0.015
        s, t = _pairs(pairs=pairs, max_gap=0.25)
        assert (t - s).max() <= 0.25 + 1e-15 and ((t - s) > 0.2499).mean() > 0.1


def test_unknown_sampling_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="minmax or uniform-gap"):
        _pairs(pairs="log-gap")
    with pytest.raises(ValueError, match="pairs must be one of minmax, uniform-gap"):
        DistillLossConfig(pairs="log-gap").validate()
