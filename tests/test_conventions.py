"""mAP conventions (normalize, zero_hit, ties) and the graded metrics (NDCG, ACG, WAP) against loops over their
definitions in docs/METHOD.md §3.5-§3.7: brute-force rankings, every tie order enumerated, seeded shuffles."""
import itertools
import math

import numpy as np
import pytest

from hashing.codes import CodeSet
from hashing.evaluation.conventions import NORMALIZE, TIES, ZERO_HIT, Convention
from hashing.evaluation.metrics import (acg_at_k, average_precisions, map_at_k, map_of_codes, metrics_of_codes, ndcg_at_k,
                             ranking_metrics_of_codes, retrieval_metrics, wap_at_k)

METRICS = {"map": map_at_k, "wap": wap_at_k, "ndcg": ndcg_at_k, "acg": acg_at_k}


def tied_problem(seed, num_queries, num_items, bits=4, classes=4, density=0.3):
    """Short codes (many equal distances), sparse labels (some queries share nothing with the database)."""
    rng = np.random.default_rng(seed)
    codes = rng.choice([-1.0, 1.0], size=(num_queries + num_items, bits))
    labels = (rng.random((num_queries + num_items, classes)) < density).astype(np.float32)
    return codes[:num_queries], labels[:num_queries], codes[num_queries:], labels[num_queries:]


def loop_figures(distances, grades, k, tie_key):
    """Every per-query figure of one query by the definitions, ranking by (distance, tie_key)."""
    order = sorted(range(len(distances)), key=lambda i: (distances[i], tie_key[i]))
    total_relevant = sum(1 for g in grades if g > 0)
    hits = precision_sum = weighted_sum = grade_sum = dcg = 0.0
    for t, item in enumerate(order[:k], start=1):
        g = grades[item]
        grade_sum += g
        dcg += (2 ** g - 1) / math.log2(t + 1)
        if g > 0:
            hits += 1
            precision_sum += hits / t
            weighted_sum += grade_sum / t
    ideal = sorted(grades, reverse=True)[:k]
    ideal_dcg = sum((2 ** g - 1) / math.log2(t + 1) for t, g in enumerate(ideal, start=1))
    figures = {"ndcg": dcg / ideal_dcg if ideal_dcg else 0.0, "ndcg_defined": ideal_dcg > 0, "acg": grade_sum / k}
    for normalize, denominator in (("hits", hits), ("min", min(total_relevant, k)), ("relevant", total_relevant)):
        figures[f"map_{normalize}"] = precision_sum / denominator if denominator else 0.0
        figures[f"wap_{normalize}"] = weighted_sum / denominator if denominator else 0.0
        figures[f"defined_{normalize}"] = denominator > 0
    return figures


def query_figures(problem, k, tie_keys):
    """Per query, the figures averaged over the given tie keys, and whether any order defines them."""
    query, query_labels, database, database_labels = problem
    distances = (query.shape[1] - query @ database.T) / 2
    grades = (query_labels @ database_labels.T).astype(int)
    result = []
    for q in range(len(query)):
        runs = [loop_figures(list(distances[q]), list(grades[q]), k, key) for key in tie_keys]
        result.append({name: (any(r[name] for r in runs) if "defined" in name else np.mean([r[name] for r in runs]))
                       for name in runs[0]})
    return result


def loop_mean(per_query, metric, normalize, zero_hit):
    if metric in ("map", "wap"):
        value, defined = f"{metric}_{normalize}", f"defined_{normalize}"
    else:
        value, defined = metric, ("ndcg_defined" if metric == "ndcg" else None)
    kept = [f for f in per_query if zero_hit == "zero" or defined is None or f[defined]]
    return np.mean([f[value] for f in kept]) if kept else 0.0


def every_option():
    return itertools.product(METRICS, NORMALIZE, ZERO_HIT)


@pytest.mark.parametrize("seed, num_items, k", [(0, 6, 3), (1, 6, 6), (2, 7, 4), (3, 5, 1)])
def test_tie_aware_is_the_mean_over_every_tie_order(seed, num_items, k):
    problem = tied_problem(seed, 3, num_items, bits=2, classes=3)
    per_query = query_figures(problem, k, list(itertools.permutations(range(num_items))))
    for metric, normalize, zero_hit in every_option():
        expected = loop_mean(per_query, metric, normalize, zero_hit)
        got = METRICS[metric](*problem, topk=k, normalize=normalize, zero_hit=zero_hit, ties="aware")
        assert got == pytest.approx(expected, abs=1e-12), (metric, normalize, zero_hit)


@pytest.mark.parametrize("ties", ["index", "random"])
@pytest.mark.parametrize("k, classes, density", [(9, 4, 0.3), (60, 4, 0.3), (20, 70, 0.03)])  # 70: two words
def test_index_and_random_ties_match_a_brute_force_ranking(ties, k, classes, density):
    problem = tied_problem(4, 12, 60, classes=classes, density=density)
    seed = 5
    tie_key = np.arange(60) if ties == "index" else np.argsort(np.random.default_rng(seed).permutation(60))
    per_query = query_figures(problem, k, [tie_key])
    assert any(not f["defined_relevant"] for f in per_query)  # queries without relevant items are exercised
    for metric, normalize, zero_hit in every_option():
        expected = loop_mean(per_query, metric, normalize, zero_hit)
        got = METRICS[metric](*problem, topk=k, normalize=normalize, zero_hit=zero_hit, ties=ties, seed=seed)
        assert got == pytest.approx(expected, abs=1e-12), (metric, normalize, zero_hit)


def test_tie_aware_agrees_with_the_mean_of_many_seeded_shuffles():
    problem = tied_problem(6, 6, 150, bits=5, classes=5)
    for metric in ("map", "ndcg"):
        for normalize in ("hits", "relevant"):
            aware = METRICS[metric](*problem, topk=40, normalize=normalize, ties="aware")
            shuffled = [METRICS[metric](*problem, topk=40, normalize=normalize, ties="random", seed=s)
                        for s in range(200)]
            assert aware == pytest.approx(np.mean(shuffled), abs=4 * np.std(shuffled) / np.sqrt(200) + 1e-4)


def test_worked_example_of_method_md():
    """docs/METHOD.md §3.7: distance 0 one relevant item (rel 2); distance 1 [no, yes (rel 1), no]; K = 3."""
    query, query_labels = np.array([[1.0, 1.0]]), np.array([[1, 1, 0]])
    database = np.array([[1.0, 1.0], [1.0, -1.0], [1.0, -1.0], [1.0, -1.0]])
    database_labels = np.array([[1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 0, 1]])
    problem = (query, query_labels, database, database_labels)
    assert map_at_k(*problem, 3) == pytest.approx(5 / 6)
    assert map_at_k(*problem, 3, ties="aware") == pytest.approx(17 / 18)
    assert map_at_k(*problem, 3, normalize="min", ties="aware") == pytest.approx(7 / 9)
    assert acg_at_k(*problem, 3) == pytest.approx(1.0)
    assert acg_at_k(*problem, 3, ties="aware") == pytest.approx(8 / 9)
    ideal = 3 + 1 / math.log2(3)
    assert ndcg_at_k(*problem, 3) == pytest.approx(3.5 / ideal)
    assert ndcg_at_k(*problem, 3, ties="aware") == pytest.approx((3 + (1 / math.log2(3) + 0.5) / 3) / ideal)
    assert wap_at_k(*problem, 3) == pytest.approx((2 + 1) / 2)


def test_defaults_reproduce_the_paper_convention_exactly():
    problem = tied_problem(7, 30, 200, bits=8)
    codes = CodeSet.from_outputs(*problem)
    today = float(np.mean(average_precisions(*problem, topk=50)))
    assert map_at_k(*problem, 50) == today
    assert map_of_codes(codes, 50) == today
    assert metrics_of_codes(codes, 50)["map"] == today
    assert ranking_metrics_of_codes(codes, 50)["map"] == today
    metrics = retrieval_metrics(*problem, topk=50)
    assert metrics["convention"] == {"normalize": "hits", "zero_hit": "zero", "ties": "index", "seed": 0}


def test_skip_reports_the_queries_it_leaves_out():
    problem = tied_problem(8, 20, 40)
    query_labels, database_labels = problem[1], problem[3]
    without_relevant = int(((query_labels @ database_labels.T) == 0).all(axis=1).sum())
    assert without_relevant > 0
    figures = ranking_metrics_of_codes(CodeSet.from_outputs(*problem), 0, Convention("relevant", "skip"))
    assert figures["skipped_queries"] == figures["ndcg_skipped_queries"] == without_relevant


def test_tie_aware_precision_at_top_n_is_the_expected_hits():
    problem = tied_problem(9, 4, 7, bits=2, classes=3)
    orders = list(itertools.permutations(range(7)))
    query, query_labels, database, database_labels = problem
    distances = (2 - query @ database.T) / 2
    relevant = (query_labels @ database_labels.T) > 0
    expected = np.mean([[relevant[q, sorted(range(7), key=lambda i: (distances[q, i], key[i]))[:3]].sum() / 3
                         for key in orders] for q in range(4)])
    got = retrieval_metrics(*problem, topk=5, top_ns=[3], convention=Convention(ties="aware"))
    assert got["precision_at_top_n"]["precision"][0] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("option, value", [("normalize", "all"), ("zero_hit", "nan"), ("ties", "stable")])
def test_unknown_convention_is_refused(option, value):
    with pytest.raises(ValueError, match=option):
        map_at_k(*tied_problem(0, 2, 5), **{option: value})
    assert set(TIES) == {"index", "aware", "random"}
