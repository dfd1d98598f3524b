"""hashing/search/index.py: every exact method ranks like a brute-force loop (ties by id) and like --query's search;
add/remove/save/load round trips; radius search; what the approximate methods promise; and load refusing
files that are not complete indexes."""
import os

import numpy as np
import pytest

from hashing.codes import pack_signs
from hashing.search.auto import knn_radius, mih_work
from hashing.search.index import HammingIndex
from hashing.search.mih import MultiIndexTables, default_substrings
from hashing.search.exact import search
from utils.errors import UserError

# Each exact method as (method, options); "flat" with and without FAISS, "mih" with its default and with
# substrings of 2 or 3 bits (many tables, so most rows are met in several).
EXACT = {"flat (FAISS)": ("flat", {"use_faiss": True}), "flat (NumPy)": ("flat", {"use_faiss": False}),
         "mih": ("mih", {}), "mih, short substrings": ("mih", "short"), "auto": ("auto", {})}


def build_exact(method, database_bits, ids=None, hash_bit=None):
    name, options = EXACT[method]
    hash_bit = hash_bit or database_bits.shape[1] * 8
    options = {"substrings": hash_bit // 2 - 1} if options == "short" else options
    return HammingIndex.build(database_bits, ids, hash_bit=hash_bit, method=name, **options)


def tied_codes(rng, bits, items, distinct=9, noise=0.03):
    """Packed codes drawn from a few codes with a few bits flipped: many equal distances, as trained codes give."""
    pool = rng.standard_normal((distinct, bits))
    signs = np.sign(pool[rng.integers(distinct, size=items)])
    signs[rng.random(signs.shape) < noise] *= -1
    return pack_signs(signs), pool


def query_codes(rng, pool, bits):
    return pack_signs(np.concatenate([pool[:3], rng.standard_normal((4, bits))]))


def distances_by_unpacking(query_bits, database_bits):
    return (np.unpackbits(query_bits, axis=1)[:, None] != np.unpackbits(database_bits, axis=1)[None]).sum(axis=2)


def brute_force(query_bits, database_bits, ids, k=None, radius=None):
    """Per query: (distances, ids) of the k nearest (or all within radius), sorted by (distance, id) in Python."""
    results = []
    for row in distances_by_unpacking(query_bits, database_bits):
        pairs = sorted((int(d), int(i)) for d, i in zip(row, ids) if radius is None or d <= radius)[:k]
        results.append((np.array([d for d, _ in pairs], dtype=int), np.array([i for _, i in pairs], dtype=int)))
    return results


def assert_rows_equal(actual, expected):
    for (distances, ids), (expected_distances, expected_ids) in zip(actual, expected, strict=True):
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_array_equal(distances, expected_distances)


def scattered_ids(rng, count):
    return rng.permutation(np.arange(count) * 7 + 3)  # not 0..N-1, not in row order


@pytest.mark.parametrize("bits, items", [(12, 300), (48, 1500), (64, 1000), (130, 400)])
@pytest.mark.parametrize("method", EXACT)
def test_exact_methods_rank_like_brute_force_with_ties_by_id(bits, items, method):
    rng = np.random.default_rng(bits + items)
    database_bits, pool = tied_codes(rng, bits, items)
    query_bits = query_codes(rng, pool, bits)
    ids = scattered_ids(rng, items)
    index = build_exact(method, database_bits, ids, bits)
    for k in (1, 10, items // 3, items, items + 5):
        distances, found = index.search(query_bits, k)
        assert distances.dtype == np.int32 and found.dtype == np.int64
        assert distances.shape == found.shape == (len(query_bits), min(k, items))
        assert_rows_equal(zip(distances, found), brute_force(query_bits, database_bits, ids, k=k))


@pytest.mark.parametrize("method", ["mih", "auto"])
def test_index_search_equals_the_query_search(method):
    # --query prints hashing.search.exact.search; an index with ids = database indices must give the same ranking.
    rng = np.random.default_rng(5)
    database_bits, pool = tied_codes(rng, 48, 2000)
    query_bits = query_codes(rng, pool, 48)
    for k in (1, 25, 2000):
        expected = search(query_bits, database_bits, k)
        actual = HammingIndex.build(database_bits, method=method).search(query_bits, k)
        np.testing.assert_array_equal(actual[1], expected[1])
        np.testing.assert_array_equal(actual[0], expected[0])


def test_auto_chooses_by_its_cost_model():
    rng = np.random.default_rng(6)
    small = HammingIndex.build(pack_signs(rng.standard_normal((100, 16))))
    assert small.resolved_method == "flat" and small.exact
    # 16-bit codes: k = 100 among 1,000,000 lie within distance 1, 17 buckets of one table (~260 codes): mih
    short = HammingIndex.build(rng.integers(0, 256, (1_000_000, 2), dtype=np.uint8))
    assert short.resolved_method == "mih" and short.exact
    # 256-bit codes: the 100th neighbour lies near distance 100; reaching it meets more codes than N: flat
    long = HammingIndex.build(rng.integers(0, 256, (100_000, 32), dtype=np.uint8))
    assert long.resolved_method == "flat"
    assert long.backend.method_for(radius=0) == "mih"  # an exact-duplicate search is a lookup


def test_cost_model_counts_by_hand():
    # 8 bits in 2 substrings of 4: covering r = 2 probes substring 0 up to radius 1 (1 + 4 buckets) and
    # substring 1 at radius 0 (1 bucket); each bucket holds N / 16 uniform codes.
    assert mih_work(1600, 8, 2, 2) == (6, 600)
    assert knn_radius(2 ** 16, 16, 1) == 0  # N / 2^16 codes at distance 0 on average
    assert knn_radius(2 ** 16, 16, 17) == 1  # 1 + 16 within distance 1
    assert knn_radius(2 ** 16, 16, 18) == 2


@pytest.mark.parametrize("method", ["flat (FAISS)", "flat (NumPy)", "mih", "mih, short substrings"])
def test_radius_search_equals_brute_force(method):
    rng = np.random.default_rng(7)
    database_bits, pool = tied_codes(rng, 24, 800)
    query_bits = query_codes(rng, pool, 24)
    ids = scattered_ids(rng, 800)
    index = build_exact(method, database_bits, ids)
    for radius in (0, 2, 5, 24, 100):
        results = index.search_radius(query_bits, radius)
        assert all(d.dtype == np.int32 and i.dtype == np.int64 for d, i in results)
        assert_rows_equal(results, brute_force(query_bits, database_bits, ids, radius=radius))


@pytest.mark.parametrize("bits, items, substrings", [(64, 3000, 3), (64, 3000, 7), (70, 800, 5), (9, 300, 2)])
def test_multi_index_tables_alone_equal_brute_force(bits, items, substrings):
    # Row order = id order; substrings that cross a 64-bit word (70 bits) and substrings of unequal widths.
    rng = np.random.default_rng(bits * items)
    database_bits, pool = tied_codes(rng, bits, items, distinct=20, noise=0.1)
    query_bits = query_codes(rng, pool, bits)
    tables = MultiIndexTables(database_bits, bits, substrings)
    for k in (1, 100, items):
        distances, rows, counts = tables.search(query_bits, k, bits)
        assert np.all(counts == k)
        expected = brute_force(query_bits, database_bits, np.arange(items), k=k)
        assert_rows_equal(zip(distances.reshape(-1, k), rows.reshape(-1, k)), expected)


def test_default_substrings_keep_buckets_of_about_a_hundred_rows():
    assert default_substrings(64, 10_000_000) == 4  # 16-bit substrings: 153 rows a bucket
    assert default_substrings(64, 1_000_000) == 5
    assert default_substrings(12, 1_000_000) == 1
    assert default_substrings(256, 10) == 32  # substrings of at least 8 bits
    assert default_substrings(64, 10 ** 12) == 3  # of at most 24 bits


@pytest.mark.parametrize("method", ["flat", "mih"])
def test_add_and_remove_give_the_index_built_from_what_remains(method):
    rng = np.random.default_rng(8)
    database_bits, pool = tied_codes(rng, 32, 600)
    query_bits = query_codes(rng, pool, 32)
    ids = scattered_ids(rng, 600)
    index = HammingIndex.build(database_bits[:300], ids[:300], method=method)
    index.add(database_bits[300:], ids[300:])  # interleaved with the ids held: inserted, not appended
    assert len(index) == 600 and np.all(np.diff(index.ids) > 0)
    removed = ids[rng.choice(600, 250, replace=False)]
    assert index.remove(np.concatenate([removed, [10 ** 9]])) == 250  # an id not held is ignored
    keep = ~np.isin(ids, removed)
    assert_rows_equal(zip(*index.search(query_bits, 40)),
                      brute_force(query_bits, database_bits[keep], ids[keep], k=40))
    rebuilt = HammingIndex.build(database_bits[keep], ids[keep], method=method)
    np.testing.assert_array_equal(index.codes, rebuilt.codes)
    index.add(database_bits[:2])  # default ids continue after the largest
    assert list(index.ids[-2:]) == [ids[keep].max() + 1, ids[keep].max() + 2]


def test_changes_that_would_corrupt_the_index_are_refused():
    index = HammingIndex.build(np.zeros((3, 2), dtype=np.uint8), hash_bit=12)
    with pytest.raises(ValueError, match="already in the index: 1"):
        index.add(np.zeros((1, 2), dtype=np.uint8), [1])
    with pytest.raises(ValueError, match="more than once: 5"):
        index.add(np.zeros((2, 2), dtype=np.uint8), [5, 5])
    with pytest.raises(ValueError, match=">= 0"):
        index.add(np.zeros((1, 2), dtype=np.uint8), [-1])
    with pytest.raises(ValueError, match="beyond bit 12"):
        index.add(np.full((1, 2), 255, dtype=np.uint8))
    with pytest.raises(ValueError, match="pack_signs"):
        index.search(np.zeros((1, 12), dtype=np.float32), 1)
    with pytest.raises(ValueError, match="2 bytes"):
        index.search(np.zeros((1, 3), dtype=np.uint8), 1)
    with pytest.raises(ValueError, match="takes no option"):
        HammingIndex(12, "flat", substrings=2)
    assert len(index) == 3


def test_an_empty_index_finds_nothing():
    index = HammingIndex(16, "mih")
    distances, ids = index.search(np.zeros((2, 2), dtype=np.uint8), 5)
    assert distances.shape == ids.shape == (2, 0)
    assert [len(ids) for _, ids in index.search_radius(np.zeros((2, 2), dtype=np.uint8), 3)] == [0, 0]


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("method, options", [("flat", {}), ("mih", {"substrings": 3}), ("ivf", {"nprobe": 4})])
def test_save_and_load_round_trip(tmp_path, method, options, mmap):
    rng = np.random.default_rng(9)
    database_bits, pool = tied_codes(rng, 36, 500)
    query_bits = query_codes(rng, pool, 36)
    index = HammingIndex.build(database_bits, scattered_ids(rng, 500), hash_bit=36, method=method, **options)
    index.save(tmp_path / "db.index")
    loaded = HammingIndex.load(tmp_path / "db.index", mmap=mmap)
    assert (loaded.hash_bit, loaded.method, loaded.options, len(loaded)) == (36, method, index.options, 500)
    np.testing.assert_array_equal(loaded.codes, index.codes)
    np.testing.assert_array_equal(loaded.ids, index.ids)
    for a, b in zip(loaded.search(query_bits, 30), index.search(query_bits, 30)):
        np.testing.assert_array_equal(a, b)
    as_flat = HammingIndex.load(tmp_path / "db.index", method="flat")
    assert_rows_equal(zip(*as_flat.search(query_bits, 30)), brute_force(query_bits, index.codes, index.ids, k=30))
    empty = HammingIndex(8)
    empty.save(tmp_path / "empty.index")
    assert len(HammingIndex.load(tmp_path / "empty.index")) == 0


def test_ivf_and_hnsw_are_approximate_but_report_true_distances_in_order():
    rng = np.random.default_rng(10)
    database_bits, pool = tied_codes(rng, 64, 3000, distinct=30, noise=0.1)
    query_bits = query_codes(rng, pool, 64)
    true_distances = distances_by_unpacking(query_bits, database_bits)
    exact = brute_force(query_bits, database_bits, np.arange(3000), k=20)
    for method, options in [("ivf", {"nlist": 30, "nprobe": 2}), ("hnsw", {}), ("ivf", {"nlist": 30, "nprobe": 30})]:
        index = HammingIndex.build(database_bits, method=method, **options)
        assert not index.exact
        distances, ids = index.search(query_bits, 20)
        for q in range(len(query_bits)):
            found = ids[q] >= 0
            np.testing.assert_array_equal(distances[q][found], true_distances[q, ids[q][found]])
            assert list(zip(distances[q], ids[q])) == sorted(zip(distances[q], ids[q]))
            if options.get("nprobe") == 30:  # every cluster scanned: the exact distances (tied ids may differ)
                np.testing.assert_array_equal(distances[q], exact[q][0])


def test_hnsw_is_built_deterministically_and_invariant_under_a_hamming_isometry():
    # faiss #5387: XOR-ing every code with one mask keeps every distance, so the results must not change; FAISS's
    # multi-threaded HNSW construction breaks that. The index builds its graph on one thread.
    rng = np.random.default_rng(11)
    database_bits = rng.integers(0, 256, (2000, 1), dtype=np.uint8)
    query_bits = rng.integers(0, 256, (50, 1), dtype=np.uint8)
    mask = np.uint8(0b10110101)
    options = {"neighbors": 16, "ef_construction": 4, "ef_search": 2}  # the issue's settings
    plain = HammingIndex.build(database_bits, method="hnsw", **options).search(query_bits, 10)
    again = HammingIndex.build(database_bits, method="hnsw", **options).search(query_bits, 10)
    masked = HammingIndex.build(database_bits ^ mask, method="hnsw", **options).search(query_bits ^ mask, 10)
    for a, b, c in zip(plain, again, masked):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    with pytest.raises(ValueError, match="no radius search"):
        HammingIndex.build(database_bits, method="hnsw").search_radius(query_bits, 2)


@pytest.fixture
def saved_index(tmp_path):
    path = tmp_path / "db.index"
    HammingIndex.build(np.random.default_rng(12).integers(0, 256, (100, 8), dtype=np.uint8)).save(path)
    return path


def one_line_user_error(path, match):
    with pytest.raises(UserError, match=match) as error:
        HammingIndex.load(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_load_refuses_a_fifo_and_a_folder(tmp_path):
    fifo = tmp_path / "fifo.index"
    os.mkfifo(fifo)
    one_line_user_error(fifo, "FIFO")
    one_line_user_error(tmp_path, "folder")
    one_line_user_error(tmp_path / "absent.index", "does not exist")


def test_load_refuses_a_truncated_file(saved_index):
    data = saved_index.read_bytes()
    saved_index.write_bytes(data[:-1])
    one_line_user_error(saved_index, "is truncated: its header declares 100 codes")
    saved_index.write_bytes(data[:30])
    one_line_user_error(saved_index, "truncated within its header")


def test_load_refuses_a_header_claiming_more_rows_than_the_file_holds(saved_index):
    data = saved_index.read_bytes()
    saved_index.write_bytes(data.replace(b'"rows": 100', b'"rows": 10000000000000'))
    one_line_user_error(saved_index, "is truncated: its header declares 10,000,000,000,000 codes")
    saved_index.write_bytes(data + b"\0")
    one_line_user_error(saved_index, "1 bytes more than that")


def test_load_refuses_other_files_and_damaged_contents(saved_index):
    data = saved_index.read_bytes()
    saved_index.write_bytes(b"PK\x03\x04" + data)
    one_line_user_error(saved_index, "not a Hamming index")
    saved_index.write_bytes(data.replace(b'"method": "auto"', b'"method": "evil"'))
    one_line_user_error(saved_index, "unknown search method")
    ids_start = len(data) - 100 * 8  # the ids are the last 100 x 8 bytes
    ids = np.frombuffer(data[ids_start:], dtype="<i8").copy()
    ids[[3, 4]] = ids[[4, 3]]
    saved_index.write_bytes(data[:ids_start] + ids.tobytes())
    one_line_user_error(saved_index, "ids are not increasing")
