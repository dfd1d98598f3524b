"""Long-tailed digits (--imbalance) and the per-class / head-medium-tail AP breakdown (docs/METHOD.md §9.1, §9.2)."""
import math

import numpy as np
import pytest

import retrieval
from data import digits
from hashing.evaluation.metrics import (average_precisions, frequency_buckets, long_tail_breakdown,
                             per_class_average_precision)
from test_metrics import brute_force_average_precisions
from utils.errors import UserError


def test_budgets_decay_exponentially_from_the_head_to_the_tail():
    budgets = digits.class_budgets(50, 800)
    # n_c = round(n_max * rho^(-c / (C - 1))), worked out term by term
    assert budgets.tolist() == [round(800 * 50 ** (-c / 9)) for c in range(10)]
    assert budgets[0] == 800 and budgets[-1] == 16
    assert digits.class_budgets(1, 800).tolist() == [800] * 10


def test_selection_takes_the_tail_first_and_keeps_every_budget():
    # Classes 0 (head, budget 2) and 2 (tail, budget 1); row 3 holds both, row 1 only the tail.
    labels = np.array([[1, 0, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=np.float32)
    kept = digits.long_tailed_selection(labels, np.array([2, 5, 1]), np.random.default_rng(0))
    counts = labels[kept].sum(axis=0)
    assert counts[2] == 1 and counts[0] == 2 and counts[1] == 2  # all budgets reached, none exceeded
    assert kept.tolist() == sorted(kept.tolist())


@pytest.mark.parametrize("imbalance", [50])
def test_long_tailed_digits_follow_the_budgets_and_keep_the_balanced_queries(imbalance):
    train_images, train_labels, query_images, query_labels = digits.generate(3, imbalance=imbalance)
    counts = train_labels.sum(axis=0)
    budgets = digits.class_budgets(imbalance, 800)
    assert (counts <= budgets).all() and counts[-1] == budgets[-1] and counts[0] == budgets[0]
    assert counts[0] / counts[-1] == pytest.approx(imbalance, rel=0.05)
    assert len(train_images) == len(train_labels) < digits.TRAIN_SIZE
    balanced = digits.generate(3)
    assert np.array_equal(query_images, balanced[2]) and np.array_equal(query_labels, balanced[3])
    again = digits.generate(3, imbalance=imbalance)
    assert np.array_equal(train_images, again[0]) and np.array_equal(train_labels, again[1])


def test_buckets_are_thirds_by_training_frequency():
    counts = [5, 100, 40, 7, 60, 60, 1, 30, 20, 9]
    # ranked: 1(100) 4(60) 5(60) 2(40) 7(30) 8(20) 9(9) 3(7) 0(5) 6(1)
    assert frequency_buckets(counts) == {"head": [1, 4, 5], "medium": [2, 7, 8, 9],
                                         "tail": [0, 3, 6]}
    sizes = {name: len(classes) for name, classes in frequency_buckets(np.arange(20)).items()}
    assert sizes == {"head": 6, "medium": 8, "tail": 6}


def test_per_class_ap_is_the_mean_over_the_queries_holding_the_class():
    rng = np.random.default_rng(1)
    query_codes, db_codes = rng.standard_normal((12, 8)), rng.standard_normal((40, 8))
    query_labels = (rng.random((12, 4)) < 0.4).astype(np.float32)
    query_labels[:, 3] = 0  # a class no query holds
    db_labels = (rng.random((40, 4)) < 0.4).astype(np.float32)
    aps = brute_force_average_precisions(query_codes, query_labels, db_codes, db_labels, 40)
    assert np.allclose(average_precisions(query_codes, query_labels, db_codes, db_labels), aps)
    per_class = per_class_average_precision(aps, query_labels)
    for c in range(3):
        holders = [aps[q] for q in range(12) if query_labels[q, c] > 0]
        assert per_class[c] == pytest.approx(sum(holders) / len(holders))
    assert math.isnan(per_class[3])

    breakdown = long_tail_breakdown(aps, query_labels, train_counts=[30, 3, 10, 1])
    assert breakdown["buckets"]["head"] == {"classes": [0], "map": pytest.approx(per_class[0])}
    medium = pytest.approx((per_class[1] + per_class[2]) / 2)
    assert breakdown["buckets"]["medium"] == {"classes": [1, 2], "map": medium}
    assert breakdown["buckets"]["tail"] == {"classes": [3], "map": None}  # no query holds class 3
    assert breakdown["per_class"]["ap"][3] is None and breakdown["per_class"]["train_count"] == [30, 3, 10, 1]


def parse(argv):
    return retrieval.get_args_parser().parse_args(argv)


def test_imbalance_is_refused_where_it_cannot_apply(tmp_path):
    with pytest.raises(UserError, match="--imbalance: --dataset voc2007 has no long-tailed variant"):
        retrieval.main(parse(["--dataset", "voc2007", "--imbalance", "10", "--data_root", str(tmp_path)]))
    with pytest.raises(UserError, match="--imbalance 0.5: .* must be >= 1"):
        retrieval.main(parse(["--dataset", "digits", "--backbone", "small", "--imbalance", "0.5",
                              "--output_dir", str(tmp_path)]))


def test_study_table_reports_mean_and_spread_of_the_finished_seeds():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "longtail_study.py"
    spec = importlib.util.spec_from_file_location("longtail_study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    options = study.get_args_parser().parse_args(["--studies", "hpl", "--seeds", "0", "1", "--epochs", "2"])
    results = {("hpl", variant, 1.0, seed): None for variant in study.HPL_VARIANTS for seed in (0, 1)}
    results[("hpl", "given: parity", 1.0, 0)] = (0.5, 0.25)
    results[("hpl", "given: parity", 1.0, 1)] = (0.7, 0.45)
    table = study.render(options, results, "cmd")
    # mean 0.6, sample standard deviation sqrt(((0.1)^2 + (0.1)^2) / 1) = 0.1414
    assert "| given: parity | 0.6000 ± 0.1414 | 0.3500 ± 0.1414 | 2 |" in table
    assert "| HyP² (no hierarchy) | — | — | 0 |" in table
    args = study.cell_args(options, "hpl", "given: parity", 1.0, 1)
    assert args.hierarchy_file == "digits" and args.seed == 1 and args.epochs == 2 and args.imbalance == 1
