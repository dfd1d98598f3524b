import numpy as np
import pytest
import torch

from utils.metrics import average_precisions, hamming_distances, map_at_k, pack_codes, rank_top_k


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
    import utils.metrics as metrics
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
        np.testing.assert_array_equal(hamming_distances(pack_codes(a), pack_codes(b), bits), expected)


def test_bad_shapes_are_rejected():
    codes, labels = np.ones((3, 8)), np.ones((3, 2))
    with pytest.raises(ValueError, match="bits"):
        map_at_k(codes, labels, np.ones((3, 9)), labels)
    with pytest.raises(ValueError, match="at least one"):
        map_at_k(codes[:0], labels[:0], codes, labels)
