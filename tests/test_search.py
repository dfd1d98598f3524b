"""Packed codes, the codes cache and exact Hamming search (FAISS and numpy) against brute force."""
import faiss
import numpy as np
import pytest

from hashing import cache as codes_cache
from hashing.codes import CodeSet, pack_signs, unpack_signs
from hashing.search.exact import build_index, search, write_index


@pytest.mark.parametrize("bits", [5, 12, 48, 64, 70])
def test_sign_bits_round_trip(bits):
    codes = np.random.default_rng(bits).standard_normal((33, bits))
    codes[:, 0] = 0.0  # sign(0) counts as +1
    packed = pack_signs(codes)
    assert packed.dtype == np.uint8 and packed.shape == (33, -(-bits // 8))
    np.testing.assert_array_equal(unpack_signs(packed, bits), np.where(codes >= 0, 1, -1))


def example_codes(rng, bits=20, queries=7, items=40, classes=5):
    return CodeSet.from_outputs(rng.standard_normal((queries, bits)), rng.random((queries, classes)) < 0.3,
                                rng.standard_normal((items, bits)), rng.random((items, classes)) < 0.3)


def key_for(checkpoint, seed=0):
    return codes_cache.cache_key(checkpoint, {"dataset": "digits", "hash_bit": 20, "seed": seed})


def test_cache_round_trips_bit_exactly_and_is_keyed_by_checkpoint_bytes(tmp_path):
    checkpoint, cache = tmp_path / "run.ckpt", tmp_path / "run.codes.npz"
    checkpoint.write_bytes(b"weights v1")
    codes = example_codes(np.random.default_rng(0))
    codes_cache.save(cache, codes, key_for(checkpoint))

    loaded = codes_cache.load(cache, key_for(checkpoint))
    for field in ("query_bits", "query_labels", "database_bits", "database_labels"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(codes, field))
        assert getattr(loaded, field).dtype == getattr(codes, field).dtype
    assert loaded.hash_bit == 20

    assert codes_cache.load(cache, key_for(checkpoint, seed=1)) is None  # other data split
    checkpoint.write_bytes(b"weights v2")  # retrained: same name, other bytes
    assert codes_cache.load(cache, key_for(checkpoint)) is None
    assert key_for(tmp_path / "missing.ckpt") is None


def test_unreadable_cache_is_a_miss(tmp_path):
    checkpoint, cache = tmp_path / "run.ckpt", tmp_path / "run.codes.npz"
    checkpoint.write_bytes(b"weights")
    cache.write_bytes(b"not an npz file")
    assert codes_cache.load(cache, key_for(checkpoint)) is None
    assert codes_cache.load(tmp_path / "absent.npz", key_for(checkpoint)) is None


def brute_force_search(query_bits, database_bits, k):
    """Distances by unpacking bits, order by (distance, index) one query at a time."""
    q = np.unpackbits(query_bits, axis=1)
    d = np.unpackbits(database_bits, axis=1)
    distances, indices = [], []
    for row in q:
        dist = (row != d).sum(axis=1)
        order = sorted(range(len(d)), key=lambda j: (dist[j], j))[:k]
        distances.append(dist[order])
        indices.append(order)
    return np.array(distances), np.array(indices)


SEARCHERS = {
    "search with faiss": lambda query_bits, database_bits, k: search(query_bits, database_bits, k, use_faiss=True),
    "search with numpy": lambda query_bits, database_bits, k: search(query_bits, database_bits, k, use_faiss=False),
    # search() re-sorts rows by (distance, index) but cannot repair which tied items FAISS keeps at the
    # k-th distance: the pinned FAISS itself must keep the lowest indices and order ties by index.
    "faiss alone": lambda query_bits, database_bits, k: build_index(database_bits).search(query_bits, k),
}


@pytest.mark.parametrize("bits, items", [(12, 300), (48, 3000), (64, 257), (130, 500)])
@pytest.mark.parametrize("searcher", SEARCHERS)
def test_search_equals_brute_force_with_ties(bits, items, searcher):
    rng = np.random.default_rng(bits + items)
    pool = rng.standard_normal((9, bits))  # few distinct codes: massive ties
    database_bits = pack_signs(pool[rng.integers(9, size=items)])
    query_bits = pack_signs(np.concatenate([pool[:3], rng.standard_normal((5, bits))]))
    for k in (1, 10, items // 3, items, items + 5):
        k = k if searcher != "faiss alone" else min(k, items)
        distances, indices = SEARCHERS[searcher](query_bits, database_bits, k)
        expected_distances, expected_indices = brute_force_search(query_bits, database_bits, min(k, items))
        np.testing.assert_array_equal(indices, expected_indices)
        np.testing.assert_array_equal(distances, expected_distances)


def test_faiss_ties_across_its_database_blocks():
    # FAISS scans the database in blocks of 65,536 codes; ties must still come out by index across blocks.
    rng = np.random.default_rng(1)
    pool = rng.standard_normal((5, 16))
    database_bits = pack_signs(pool[rng.integers(5, size=70_000)])
    query_bits = pack_signs(pool[:2])
    distances, indices = search(query_bits, database_bits, 20_000, use_faiss=True)
    expected_distances, expected_indices = search(query_bits, database_bits, 20_000, use_faiss=False)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_array_equal(distances, expected_distances)


def test_exported_index_searches_like_the_tool(tmp_path):
    rng = np.random.default_rng(2)
    database_bits = pack_signs(rng.standard_normal((200, 36)))
    query_bits = pack_signs(rng.standard_normal((4, 36)))
    write_index(database_bits, tmp_path / "db.faissindex")
    index = faiss.read_index_binary(str(tmp_path / "db.faissindex"))
    assert index.ntotal == 200 and index.d == 40  # 36 bits padded to whole bytes
    np.testing.assert_array_equal(index.search(query_bits, 7)[1], search(query_bits, database_bits, 7)[1])
    np.testing.assert_array_equal(build_index(database_bits).search(query_bits, 7)[0],
                                  search(query_bits, database_bits, 7)[0])
