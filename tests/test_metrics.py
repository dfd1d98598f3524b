import json

import numpy as np
import pytest
import torch

from hashing.codes import hamming_distances, pack_signs, word_columns
from hashing.evaluation.metrics import (average_precisions, default_top_ns, map_at_k,
                           precision_at_top_n, precision_recall_curve, precision_within_radius, rank_top_k,
                           retrieval_metrics)


def brute_force_average_precisions(query_codes, query_labels, db_codes, db_labels, topk):
    """The paper's evaluation loop, with a stable sort: one query and one rank at a time."""
    q = np.where(np.asarray(query_codes) >= 0, 1, -1)
    d = np.where(np.asarray(db_codes) >= 0, 1, -1)
    n_bits = q.shape[1]
    aps = []
    for code, label in zip(q, np.asarray(query_labels)):
        hamming = (n_bits - d @ code) // 2
        order = np.argsort(hamming, kind="stable")
        hits, precision_sum = 0, 0.0
        for rank, item in enumerate(order[:topk], start=1):
            if np.dot(label, db_labels[item]) > 0:
                hits += 1
                precision_sum += hits / rank
        aps.append(precision_sum / hits if hits else 0.0)
    return np.array(aps)


def tied_problem(rng, queries, items, bits, classes, distinct_codes, density=0.15):
    """Random codes drawn from few distinct codes, so Hamming distances tie massively."""
    pool = rng.standard_normal((distinct_codes, bits))
    q = pool[rng.integers(distinct_codes, size=queries)] + 0.0
    d = pool[rng.integers(distinct_codes, size=items)]
    q[:, 0] = 0.0  # sign(0) counts as +1
    q_labels = (rng.random((queries, classes)) < density).astype(np.float32)
    d_labels = (rng.random((items, classes)) < density).astype(np.float32)
    q_labels[0] = 0  # a query with no relevant item
    return q, q_labels, d, d_labels


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("topk", ["one", "third", "all-1", "all"])
def test_matches_brute_force_with_ties(seed, topk):
    rng = np.random.default_rng(seed)
    bits = [8, 12, 48, 64, 70, 130][seed]
    classes = [3, 20, 21, 38, 65, 100][seed]
    problem = tied_problem(rng, queries=37, items=211, bits=bits, classes=classes, distinct_codes=9)
    k = {"one": 1, "third": 70, "all-1": 210, "all": 211}[topk]
    expected = brute_force_average_precisions(*problem, topk=k)
    got = average_precisions(*problem, topk=k)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert got[0] == 0.0


def test_whole_database_spellings():
    problem = tied_problem(np.random.default_rng(7), 20, 90, 16, 5, distinct_codes=6)
    expected = brute_force_average_precisions(*problem, topk=90).mean()
    for topk in (None, 0, -1, 90, 1000):
        assert map_at_k(*problem, topk=topk) == pytest.approx(expected, abs=1e-12)


def test_hand_worked_example():
    # Query 1111 with label {0}. Database distances [2, 0, 2, 1, 0], relevant [1, 0, 0, 1, 1].
    # Rank by (distance, index): items 1, 4, 3, 0, 2 -> relevance 0, 1, 1, 1, 0.
    query = np.array([[1, 1, 1, 1]])
    db = np.array([[-1, -1, 1, 1], [1, 1, 1, 1], [-1, -1, 1, 1], [-1, 1, 1, 1], [1, 1, 1, 1]])
    q_labels = np.array([[1, 0]])
    db_labels = np.array([[1, 0], [0, 1], [0, 1], [1, 1], [1, 0]])
    assert map_at_k(query, q_labels, db, db_labels, topk=5) == pytest.approx((1 / 2 + 2 / 3 + 3 / 4) / 3)
    assert map_at_k(query, q_labels, db, db_labels, topk=3) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert map_at_k(query, q_labels, db, db_labels, topk=1) == 0.0


def test_accepts_torch_tensors_and_matches_numpy():
    problem = tied_problem(np.random.default_rng(3), 15, 60, 24, 6, distinct_codes=5)
    tensors = [torch.from_numpy(np.asarray(a)) for a in problem]
    assert map_at_k(*tensors, topk=20) == map_at_k(*problem, topk=20)


def test_chunking_and_threads_do_not_change_the_result(monkeypatch):
    import hashing.evaluation.metrics as metrics
    problem = tied_problem(np.random.default_rng(4), 50, 300, 32, 10, distinct_codes=12)
    reference = average_precisions(*problem, topk=100, threads=1)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 600)  # two queries per chunk
    np.testing.assert_array_equal(average_precisions(*problem, topk=100, threads=3), reference)


def test_rank_top_k_orders_by_distance_then_index():
    rng = np.random.default_rng(5)
    dist = rng.integers(0, 4, size=(6, 40)).astype(np.uint8)
    for k in (1, 7, 39, 40):
        expected = np.stack([np.lexsort((np.arange(40), row))[:k] for row in dist])
        np.testing.assert_array_equal(rank_top_k(dist, k), expected)


def test_hamming_distances_match_the_dot_product_formula():
    rng = np.random.default_rng(6)
    for bits in (5, 64, 65, 200):
        a, b = rng.standard_normal((4, bits)), rng.standard_normal((9, bits))
        expected = (bits - np.where(a >= 0, 1, -1) @ np.where(b >= 0, 1, -1).T) // 2
        np.testing.assert_array_equal(hamming_distances(word_columns(pack_signs(a)), word_columns(pack_signs(b)), bits), expected)


def test_bad_shapes_are_rejected():
    codes, labels = np.ones((3, 8)), np.ones((3, 2))
    with pytest.raises(ValueError, match="bits"):
        map_at_k(codes, labels, np.ones((3, 9)), labels)
    with pytest.raises(ValueError, match="at least one"):
        map_at_k(codes[:0], labels[:0], codes, labels)


# --- precision@top-N, precision-recall over Hamming radii, precision within a Hamming radius ---------------

def brute_force_hamming(code, db_codes):
    code, db_codes = np.where(np.asarray(code) >= 0, 1, -1), np.where(np.asarray(db_codes) >= 0, 1, -1)
    return (len(code) - db_codes @ code) // 2


def brute_force_precision_at_top_n(query_codes, query_labels, db_codes, db_labels, top_ns):
    """One query and one rank at a time, ranking by (distance, database index)."""
    means = []
    for n in top_ns:
        precisions = []
        for code, label in zip(query_codes, query_labels):
            order = sorted(range(len(db_codes)), key=lambda j, h=brute_force_hamming(code, db_codes): (h[j], j))
            hits = sum(1 for j in order[:n] if np.dot(label, db_labels[j]) > 0)
            precisions.append(hits / n)
        means.append(np.mean(precisions))
    return np.array(means)


def brute_force_radius(query_codes, query_labels, db_codes, db_labels, radii):
    """Per radius: (PR precision over queries retrieving something, recall over queries with a relevant
    item, precision with empty retrievals as 0 over all queries); one query and one radius at a time."""
    precisions, recalls, all_precisions = ({r: [] for r in radii} for _ in range(3))
    for code, label in zip(query_codes, query_labels):
        dist = brute_force_hamming(code, db_codes)
        relevant = [np.dot(label, db_labels[j]) > 0 for j in range(len(db_codes))]
        for radius in radii:
            retrieved = [j for j in range(len(db_codes)) if dist[j] <= radius]
            hits = sum(relevant[j] for j in retrieved)
            if retrieved:
                precisions[radius].append(hits / len(retrieved))
            all_precisions[radius].append(hits / len(retrieved) if retrieved else 0.0)
            if sum(relevant):
                recalls[radius].append(hits / sum(relevant))
    mean = lambda values: np.mean(values) if values else np.nan  # noqa: E731
    return {r: (mean(precisions[r]), mean(recalls[r]), np.mean(all_precisions[r])) for r in radii}


@pytest.mark.parametrize("seed", range(3))
def test_curves_match_brute_force_with_ties(seed):
    rng = np.random.default_rng(100 + seed)
    bits, classes = [8, 48, 130][seed], [4, 21, 38][seed]
    problem = tied_problem(rng, queries=23, items=157, bits=bits, classes=classes, distinct_codes=7)
    top_ns = [1, 5, 50, 156, 157]
    np.testing.assert_allclose(precision_at_top_n(*problem, top_ns=top_ns),
                               brute_force_precision_at_top_n(*problem, top_ns), rtol=0, atol=1e-12)
    curves = precision_recall_curve(*problem)
    assert len(curves.precision) == bits + 1
    expected = brute_force_radius(*problem, range(bits + 1))
    for radius in range(bits + 1):
        precision, recall, empty_as_zero = expected[radius]
        np.testing.assert_allclose([curves.precision[radius], curves.recall[radius]], [precision, recall],
                                   rtol=0, atol=1e-12)
        assert curves.precision_empty_as_zero[radius] == pytest.approx(empty_as_zero, abs=1e-12)
        assert precision_within_radius(*problem, radius=radius) == pytest.approx(empty_as_zero, abs=1e-12)
    assert curves.recall[-1] == 1.0 and curves.retrieving[-1] == 1.0


def two_query_example():
    # Query A = 1111, label {0}: database distances [2, 0, 2, 1, 0], relevant items {0, 3, 4}.
    # Query B = -1-1-1-1, label {1}: distances [2, 4, 2, 3, 4], relevant items {1, 2, 3}.
    queries = np.array([[1, 1, 1, 1], [-1, -1, -1, -1]])
    db = np.array([[-1, -1, 1, 1], [1, 1, 1, 1], [-1, -1, 1, 1], [-1, 1, 1, 1], [1, 1, 1, 1]])
    q_labels = np.array([[1, 0], [0, 1]])
    db_labels = np.array([[1, 0], [0, 1], [0, 1], [1, 1], [1, 0]])
    return queries, q_labels, db, db_labels


def test_hand_worked_precision_at_top_n():
    # A ranks items 1, 4, 3, 0, 2 (relevance 0 1 1 1 0); B ranks 0, 2, 3, 1, 4 (relevance 0 1 1 1 0).
    got = precision_at_top_n(*two_query_example(), top_ns=[1, 2, 3, 5])
    np.testing.assert_allclose(got, [0, 1 / 2, 2 / 3, 3 / 5])


def test_hand_worked_radius_metrics():
    # Radius 0: A retrieves {1, 4} (1 relevant of 3), B nothing. Radius 1: A {1, 4, 3}, B nothing.
    # Radius 2: A everything (3 of 5), B {0, 2} (1 relevant of 3).
    curves = precision_recall_curve(*two_query_example())
    np.testing.assert_allclose(curves.precision[:3], [1 / 2, 2 / 3, (3 / 5 + 1 / 2) / 2])
    np.testing.assert_allclose(curves.recall[:3], [(1 / 3) / 2, (2 / 3) / 2, (1 + 1 / 3) / 2])
    np.testing.assert_allclose(curves.retrieving[:3], [1 / 2, 1 / 2, 1])
    # An empty retrieval counts as precision 0 within a radius.
    assert precision_within_radius(*two_query_example(), radius=1) == pytest.approx((2 / 3 + 0) / 2)
    assert precision_within_radius(*two_query_example()) == pytest.approx((3 / 5 + 1 / 2) / 2)


def test_undefined_curve_points_are_nan_and_null_in_json():
    queries, q_labels, db, db_labels = two_query_example()
    far = -db[:1]  # one query at distance 4 from item 0
    curves = precision_recall_curve(far, np.zeros((1, 2)), db[:1], db_labels[:1])
    assert np.isnan(curves.precision[:4]).all() and curves.precision[4] == 0.0
    assert np.isnan(curves.recall).all()  # no query has a relevant item
    metrics = retrieval_metrics(far, np.zeros((1, 2)), db[:1], db_labels[:1])
    assert metrics["precision_recall"]["precision"][:4] == [None] * 4
    json.dumps(metrics, allow_nan=False)


def test_retrieval_metrics_agree_with_each_metric_and_do_not_depend_on_chunking(monkeypatch):
    import hashing.evaluation.metrics as metrics_module
    problem = tied_problem(np.random.default_rng(9), 41, 230, 24, 8, distinct_codes=10)
    together = retrieval_metrics(*problem, topk=100, top_ns=[10, 100, 200])
    assert together["map"] == pytest.approx(map_at_k(*problem, topk=100), abs=1e-12)
    assert together["map_topk"] == 100
    np.testing.assert_allclose(together["precision_at_top_n"]["precision"],
                               precision_at_top_n(*problem, top_ns=[10, 100, 200]), atol=1e-12)
    assert together["precision_within_radius"]["precision"] == pytest.approx(precision_within_radius(*problem))
    monkeypatch.setattr(metrics_module, "_CHUNK_ELEMENTS", 500)  # two queries per chunk
    assert retrieval_metrics(*problem, topk=100, top_ns=[10, 100, 200], threads=3) == together


def test_default_top_ns_and_bad_arguments():
    assert default_top_ns(5011) == list(range(100, 1001, 100))
    assert default_top_ns(300) == list(range(30, 301, 30))
    assert default_top_ns(3) == [1, 2, 3]
    problem = two_query_example()
    with pytest.raises(ValueError, match="between 1 and the database size 5"):
        precision_at_top_n(*problem, top_ns=[6])
    with pytest.raises(ValueError, match="Hamming radius"):
        precision_within_radius(*problem, radius=5)
