"""Retrieval metrics by Hamming ranking.

Ranking rule (METHODS.md section 3): the database is ranked by Hamming distance to the query and ties
are broken by database index, so every figure is unique and independent of sort stability. An item is
relevant when it shares at least one label with the query.

Speed without a Q x N argsort or a loop over ranks: codes and labels are packed into bit words, so a
distance is a popcount of an XOR and relevance a bitwise AND. Distances are small integers, so each
chunk of queries is ranked by numpy's stable radix sort on uint8/uint16 keys, and for K < N a per-row
histogram of distances finds the boundary distance first, so only about K candidates per query are
ranked. Chunks run on a few threads (numpy releases the GIL) and memory stays bounded by the chunk.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# Elements (queries x database items) per chunk: a few MB per working array, cache friendly.
_CHUNK_ELEMENTS = 1 << 20


def as_numpy(array):
    """A numpy view of a numpy array or torch tensor (moved to the CPU if needed)."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _pack_rows(bits):
    """(N, B) bool -> list of contiguous (N,) unsigned words (little-endian bit order), one per 64 bits.

    The smallest unsigned type that holds the bits is used, so gathers move as few bytes as possible.
    """
    num_rows, num_bits = bits.shape
    num_words = max(1, -(-num_bits // 64))
    width = 64 if num_bits > 32 else next(w for w in (8, 16, 32) if num_bits <= w)
    padded = np.zeros((num_rows, num_words * 64), dtype=bool)
    padded[:, :num_bits] = bits
    words = np.packbits(padded, axis=1, bitorder="little").view(np.uint64)
    dtype = np.dtype(f"uint{width}")
    return [np.ascontiguousarray(words[:, w]).astype(dtype) for w in range(num_words)]


def pack_codes(codes):
    """Real-valued (N, n) codes -> bit words of their signs (bit set for x >= 0, i.e. sign 0 -> +1)."""
    codes = as_numpy(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be a 2-D (items, bits) array, got shape {codes.shape}")
    return _pack_rows(codes >= 0)


def pack_labels(labels):
    """Multi-hot (N, C) labels -> bit words; two items are relevant when their words share a bit."""
    labels = as_numpy(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D (items, classes) array, got shape {labels.shape}")
    return _pack_rows(labels > 0)


def hamming_distances(query_words, db_words, num_bits):
    """(m, N) Hamming distances between packed query codes and packed database codes."""
    dtype = np.uint8 if num_bits < 256 else np.uint16
    dist = None
    for q, d in zip(query_words, db_words):
        block = np.bitwise_count(q[:, None] ^ d[None, :])
        dist = block.astype(dtype, copy=False) if dist is None else dist + block
    return dist


def _relevance(query_label_words, db_label_words, columns):
    """rel[i, j] = query i shares a label with database item columns[i, j]."""
    relevant = None
    for q, d in zip(query_label_words, db_label_words):
        shared = (d[columns] & q[:, None]) != 0
        relevant = shared if relevant is None else relevant | shared
    return relevant


def rank_top_k(dist, k):
    """Column indices of the k best database items of each row, best first: (m, k).

    Order: Hamming distance, then database index. Only the items at or below each row's boundary
    distance (the distance of the k-th item) are sorted.
    """
    num_rows, num_items = dist.shape
    if k >= num_items:
        return np.argsort(dist, axis=1, kind="stable")
    num_values = int(dist.max()) + 1
    counts = np.stack([np.bincount(row, minlength=num_values) for row in dist])
    at_or_below = np.cumsum(counts, axis=1)
    boundary = np.count_nonzero(at_or_below < k, axis=1)
    rows = np.arange(num_rows)
    below = np.where(boundary > 0, at_or_below[rows, boundary - 1], 0)
    taken_from_boundary = k - below

    flat = np.flatnonzero(dist <= boundary[:, None].astype(dist.dtype))  # row-major: index order
    cand_row = flat // num_items
    cand_col = flat - cand_row * num_items
    cand_dist = dist.ravel()[flat]
    on_boundary = cand_dist == boundary[cand_row]
    # 1-based rank of each boundary item among its row's boundary items, in database-index order.
    running = np.cumsum(on_boundary)
    row_start = np.searchsorted(cand_row, rows)
    before_row = np.where(row_start > 0, running[row_start - 1], 0)
    boundary_rank = running - before_row[cand_row]
    keep = ~on_boundary | (boundary_rank <= taken_from_boundary[cand_row])

    kept_cols = cand_col[keep].reshape(num_rows, k)
    kept_dist = cand_dist[keep].reshape(num_rows, k)
    order = np.argsort(kept_dist, axis=1, kind="stable")
    return np.take_along_axis(kept_cols, order, axis=1)


def _average_precision_chunk(query_words, query_labels, db_words, db_labels, num_bits, k):
    dist = hamming_distances(query_words, db_words, num_bits)
    ranked = rank_top_k(dist, k)
    relevant = _relevance(query_labels, db_labels, ranked)
    hits = np.flatnonzero(relevant)
    hit_row = hits // ranked.shape[1]
    hit_rank = hits - hit_row * ranked.shape[1] + 1
    num_rows = ranked.shape[0]
    num_relevant = np.bincount(hit_row, minlength=num_rows)
    first_hit = np.cumsum(num_relevant) - num_relevant
    relevant_so_far = np.arange(1, len(hits) + 1) - first_hit[hit_row]
    precision_sum = np.bincount(hit_row, weights=relevant_so_far / hit_rank, minlength=num_rows)
    return np.where(num_relevant > 0, precision_sum / np.maximum(num_relevant, 1), 0.0)


def average_precisions(query_codes, query_labels, db_codes, db_labels, topk=None, threads=None):
    """AP@K of every query (METHODS.md section 3), as a float64 array of length Q.

    Codes are real-valued or +-1 (binarised with sign, 0 -> +1); labels are multi-hot. topk <= 0 or
    None means the whole database; a topk above the database size is clamped to it.
    """
    q_codes, d_codes = pack_codes(query_codes), pack_codes(db_codes)
    q_labels, d_labels = pack_labels(query_labels), pack_labels(db_labels)
    num_queries, num_bits = as_numpy(query_codes).shape
    num_items, db_bits = as_numpy(db_codes).shape
    if db_bits != num_bits:
        raise ValueError(f"query codes have {num_bits} bits but database codes have {db_bits}")
    if len(q_labels) != len(d_labels):
        raise ValueError("query and database labels have different numbers of classes")
    if len(q_labels[0]) != num_queries or len(d_labels[0]) != num_items:
        raise ValueError("codes and labels disagree on the number of items")
    if num_queries == 0 or num_items == 0:
        raise ValueError("mAP needs at least one query and one database item")
    k = num_items if topk is None or topk <= 0 else min(int(topk), num_items)

    rows_per_chunk = max(1, _CHUNK_ELEMENTS // num_items)
    starts = range(0, num_queries, rows_per_chunk)

    def chunk(start):
        part = slice(start, start + rows_per_chunk)
        return _average_precision_chunk([w[part] for w in q_codes], [w[part] for w in q_labels],
                                        d_codes, d_labels, num_bits, k)

    threads = threads or min(4, os.cpu_count() or 1)
    if threads == 1 or len(starts) == 1:
        return np.concatenate([chunk(s) for s in starts])
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return np.concatenate(list(pool.map(chunk, starts)))


def map_at_k(query_codes, query_labels, db_codes, db_labels, topk=None):
    """mAP@K by Hamming ranking with ties broken by database index (see average_precisions)."""
    return float(np.mean(average_precisions(query_codes, query_labels, db_codes, db_labels, topk)))
