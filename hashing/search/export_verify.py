"""`python -m hashing.export --verify`: how far an engine's answers are from the exact ranking, ties taken into account.

An engine orders equal distances as it likes and, at the k-th distance, keeps any of the tied codes, so comparing
ids with the evaluator's ranking would count a correct answer as wrong. Here each query's k answers are compared
by distance level: with e_d the exact top k's count of codes at distance d and f_d the engine's count of
distinct answers whose true distance (recomputed from the codes, not read from the engine) is d,

    recall@k (by distance level) = sum_d min(e_d, f_d) / k

which is 1 exactly when the engine's answers are a correct top k (the multiset of distances equal at every k),
whichever tied codes it chose. The engine's mAP@k is the paper's AP (docs/METHOD.md §3.3: precision at the
relevant ranks over the relevant items found in the top k) of the engine's own ranking, next to the evaluator's
mAP@k of the exact ranking (hashing/evaluation/metrics.py): with a correct top k they differ only by tie order.
"""
import numpy as np

from hashing.evaluation.conventions import precision_sums_of_ranking
from hashing.evaluation.metrics import average_precisions_of_codes
from hashing.search.index import HammingIndex


def answered(ids, rows):
    """The answers that count: ids of a database of `rows` codes (not -1, not out of range), each once per row."""
    ids = np.asarray(ids, dtype=np.int64)
    valid = (ids >= 0) & (ids < rows)
    for row in range(len(ids)):  # a repeated id counts once
        repeated = np.ones(ids.shape[1], dtype=bool)
        repeated[np.unique(ids[row], return_index=True)[1]] = False
        valid[row] &= ~repeated
    return valid


def true_distances(query_bits, database_bits, ids, hash_bit):
    """The Hamming distance of each answer (Q, k) to its query, computed from the codes; hash_bit + 1 for an
    answer that does not count (answered)."""
    ids = np.asarray(ids, dtype=np.int64)
    valid = answered(ids, len(database_bits))
    xor = np.bitwise_xor(database_bits[np.where(valid, ids, 0)], query_bits[:, None, :])
    distances = np.unpackbits(xor, axis=-1).sum(axis=-1)
    return np.where(valid, distances, hash_bit + 1)


def recall_by_distance_level(exact_distances, found_distances, hash_bit):
    """Per query: sum over distances d of min(exact count at d, found count at d), over the exact row's length."""
    levels = hash_bit + 2

    def counts(distances):
        offsets = np.asarray(distances, dtype=np.int64) + levels * np.arange(len(distances))[:, None]
        return np.bincount(offsets.reshape(-1), minlength=levels * len(distances)).reshape(-1, levels)

    matched = np.minimum(counts(exact_distances), counts(found_distances))[:, :hash_bit + 1].sum(axis=1)
    return matched / np.asarray(exact_distances).shape[1]


def average_precisions_of_ranking(ids, query_labels, database_labels):
    """AP (hits normalization) of each query's ranking `ids` (Q, k); an answer that does not count (answered) is
    not relevant."""
    ids = np.asarray(ids, dtype=np.int64)
    valid = answered(ids, len(database_labels))
    shared = (database_labels[np.where(valid, ids, 0)] & query_labels[:, None, :]).any(axis=-1)
    precision_sum, relevant = precision_sums_of_ranking(shared & valid)
    return np.where(relevant > 0, precision_sum / np.maximum(relevant, 1), 0.0)


def compare_with_exact(engine_answer, codes, k):
    """The figures of --verify for an engine's (distances, ids) answer to codes.query_bits at `k`: recall@k by
    distance level (mean, and the queries below 1), the engine's and the evaluator's mAP@k, and a verdict."""
    _, engine_ids = engine_answer
    exact_distances, _ = HammingIndex.build(codes.database_bits, method="flat").search(codes.query_bits, k)
    k = exact_distances.shape[1]
    found = true_distances(codes.query_bits, codes.database_bits, np.asarray(engine_ids)[:, :k], codes.hash_bit)
    recall = recall_by_distance_level(exact_distances, found, codes.hash_bit)
    query_labels, database_labels = codes.query_label_matrix() > 0, codes.database_label_matrix() > 0
    engine_map = float(average_precisions_of_ranking(np.asarray(engine_ids)[:, :k], query_labels,
                                                     database_labels).mean())
    evaluator_map = float(average_precisions_of_codes(codes, topk=k).mean())
    short = int((recall < 1).sum())
    verdict = ("the engine's answers are the exact ranking up to the order of tied codes" if short == 0 else
               f"the engine misses true neighbours for {short:,} of {len(recall):,} queries")
    return {"k": k, "queries": len(recall), "recall_by_distance_level": float(recall.mean()),
            "queries_short": short, "map_engine": engine_map, "map_evaluator": evaluator_map, "verdict": verdict}
