"""The fused numba kernel (hashing/evaluation/fused.py) and the NumPy path of hashing/evaluation/metrics.py give identical figures, and
the NumPy path alone still matches the brute-force definitions (tests/test_conventions.py's loops)."""
import itertools

import numpy as np
import pytest

from hashing.evaluation import fused
from hashing.evaluation import metrics
from hashing.codes import CodeSet
from hashing.evaluation.conventions import Convention
from test_conventions import METRICS, every_option, loop_mean, query_figures, tied_problem

needs_numba = pytest.mark.skipif(not fused.available(), reason="numba is not installed: only the NumPy path runs")


@pytest.fixture
def numpy_path(monkeypatch):
    monkeypatch.setattr(fused, "enabled", False)


@pytest.fixture
def kernel_for_small_problems(monkeypatch):
    monkeypatch.setattr(fused, "MIN_PAIRS", 0)


def every_figure(codes, k, top_ns):
    """Everything metrics.py computes for one problem: all 18 conventions, the full metrics dict under each tie
    rule (precision@top-N, radius curves), and the per-query AP of the default."""
    return [metrics.convention_table(codes, k, seed=3),
            *[metrics.metrics_of_codes(codes, k, top_ns=top_ns, convention=Convention(ties=ties, seed=2))
              for ties in ("index", "random", "aware")],
            metrics.average_precisions_of_codes(codes, k).tolist(),
            metrics.precision_recall_curve(*codes_arrays(codes)).precision.tolist()]


def codes_arrays(codes):
    return codes.query_signs(), codes.query_label_matrix(), codes.database_signs(), codes.database_label_matrix()


@needs_numba
@pytest.mark.parametrize("seed, bits, classes", [(0, 3, 4), (1, 5, 3), (2, 70, 70)])  # 70: two words of each
def test_kernel_and_numpy_give_identical_figures(monkeypatch, kernel_for_small_problems, seed, bits, classes):
    rng = np.random.default_rng(seed)
    for num_queries, num_items in ((7, 40), (3, 9)):
        problem = tied_problem(int(rng.integers(1000)), num_queries, num_items, bits=bits, classes=classes,
                               density=0.3 if classes < 10 else 0.03)
        codes = CodeSet.from_outputs(*problem)
        assert metrics._problem(codes).fused_query is not None  # the kernel serves it
        for k in (1, num_items // 3, num_items):  # K < N and K = N
            top_ns = sorted({1, k, num_items})[::-1]  # unsorted on purpose
            kernel = every_figure(codes, k, top_ns)
            monkeypatch.setattr(fused, "enabled", False)
            assert metrics._problem(codes).fused_query is None
            assert repr(every_figure(codes, k, top_ns)) == repr(kernel), (seed, num_items, k)  # to the last bit
            monkeypatch.setattr(fused, "enabled", True)


@pytest.mark.parametrize("ties", ["index", "random", "aware"])
def test_numpy_path_matches_the_brute_force_ranking(numpy_path, ties):
    seed = 5
    if ties == "aware":  # the exact expectation: every tie order enumerated on a small case
        problem, k = tied_problem(0, 3, 6, bits=2, classes=3), 3
        keys = list(itertools.permutations(range(6)))
    else:
        problem, k = tied_problem(4, 12, 30, classes=4, density=0.3), 9
        keys = [np.arange(30) if ties == "index" else np.argsort(np.random.default_rng(seed).permutation(30))]
    assert metrics._problem(CodeSet.from_outputs(*problem)).fused_query is None
    per_query = query_figures(problem, k, keys)
    for metric, normalize, zero_hit in every_option():
        expected = loop_mean(per_query, metric, normalize, zero_hit)
        got = METRICS[metric](*problem, topk=k, normalize=normalize, zero_hit=zero_hit, ties=ties, seed=seed)
        assert got == pytest.approx(expected, abs=1e-12), (metric, normalize, zero_hit)


def test_small_problems_and_keys_beyond_16_bits_take_the_numpy_path():
    # (n + 1) (G + 1) distinct (distance, shared labels) keys must fit the kernel's uint16 keys
    assert not fused.fits(hash_bit=4095, max_grade=20, pairs=fused.MIN_PAIRS)
    assert fused.fits(hash_bit=64, max_grade=20, pairs=fused.MIN_PAIRS) == fused.available()
    assert not fused.fits(hash_bit=64, max_grade=20, pairs=fused.MIN_PAIRS - 1)  # NumPy: no numba to load


@needs_numba
def test_a_read_only_checkout_compiles_without_a_cache(monkeypatch):
    from numba.core import caching

    from hashing.evaluation import fused_kernel

    def unwritable(locator):
        raise PermissionError("read-only")
    monkeypatch.setattr(caching._CacheLocator, "ensure_cache_path", unwritable)
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    with pytest.raises(RuntimeError, match="no locator"):  # what a plain cache=True would do at import
        fused_kernel.numba.njit(cache=True)(lambda x: x + 1)
    assert fused_kernel._compiled(lambda x: x + 1)(2) == 3
