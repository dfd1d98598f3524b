"""hashing/search/backend.py: the SearchBackend interface, tested once for every backend against a brute-force
loop: add (in two batches, ids interleaved), search, search_radius, remove, len, nbytes, and the save/load
round trip of its search structure (arrays/restore). Exact backends must equal brute force to the last tie;
approximate ones return true distances in order and a recall floor. Milvus is tested when
hashing.search.milvus and pymilvus are installed."""
import importlib.util
import os
import struct

import numpy as np
import pytest

from hashing.codes import pack_signs
from hashing.search.backend import BACKENDS, SearchBackend, faiss_available, open_backend, register_backend
from hashing.search.flat import faiss_flat_index
from hashing.search.index import ALIGNMENT, MAGIC, HammingIndex
from hashing.search.mih import MultiIndexTables
from utils.errors import UserError

BITS = 40


def milvus_missing():
    return importlib.util.find_spec("pymilvus") is None or importlib.util.find_spec("hashing.search.milvus") is None


# (method, options, exact, recall floor of an approximate one)
BACKEND_CASES = {
    "flat (NumPy)": ("flat", {"use_faiss": False}, True, None),
    "flat (FAISS)": ("flat", {"use_faiss": True}, True, None),
    "mih": ("mih", {}, True, None),
    "mih, 3 substrings": ("mih", {"substrings": 3}, True, None),
    "auto": ("auto", {}, True, None),
    "ivf": ("ivf", {"nlist": 8, "nprobe": 4}, False, 0.5),
    "hnsw": ("hnsw", {}, False, 0.5),
    "milvus (Milvus Lite, BIN_FLAT)": pytest.param(("milvus", {}, True, None), marks=pytest.mark.skipif(
        milvus_missing(), reason="hashing.search.milvus or pymilvus is not installed")),
}


def new_backend(method, options, tmp_path):
    """An empty backend; Milvus's is a new collection in a Milvus Lite file under tmp_path."""
    if method != "milvus":
        return open_backend(method, BITS, **options)
    from hashing.search import milvus
    record = {"checkpoint_sha256": "0" * 64, "hash_bit": BITS, "source": "interface test", "source_sha256": "1" * 64,
              "rows": 900}
    return milvus.MilvusBackend.create(str(tmp_path / "codes.db"), "interface", record, label_length=8)


def clustered_codes(rng, items, centres=12, noise=0.06):
    """Packed BITS-bit codes around a few centres: many tied distances, as a trained network's codes give."""
    pool = np.sign(rng.standard_normal((centres, BITS)))
    signs = pool[rng.integers(centres, size=items)]
    signs[rng.random(signs.shape) < noise] *= -1
    return pack_signs(signs), pool


def distance_matrix(queries, codes):
    """Hamming distances by comparing unpacked bits (no popcount, no packed words)."""
    return (np.unpackbits(queries, axis=1)[:, None, :BITS] != np.unpackbits(codes, axis=1)[None, :, :BITS]).sum(-1)


def brute_force(queries, codes, ids, k=None, radius=None):
    """Per query, (distances, ids) sorted by (distance, id)."""
    results = []
    for row in distance_matrix(queries, codes):
        order = np.lexsort((ids, row))
        order = order[row[order] <= radius] if radius is not None else order[:k]
        results.append((row[order], ids[order]))
    return results


def check_search(backend, exact, recall_floor, queries, codes, ids, k):
    distances, found = backend.search(queries, k)
    assert distances.dtype == np.int32 and found.dtype == np.int64
    assert distances.shape == found.shape == (len(queries), min(k, len(ids)))
    expected = brute_force(queries, codes, ids, k=k)
    if exact:
        for row in range(len(queries)):
            np.testing.assert_array_equal(found[row], expected[row][1])
            np.testing.assert_array_equal(distances[row], expected[row][0])
        return
    true = distance_matrix(queries, codes)
    row_of = {int(i): r for r, i in enumerate(ids)}
    for q in range(len(queries)):
        assert all(true[q, row_of[int(i)]] == d for i, d in zip(found[q], distances[q]) if i >= 0)
        assert list(distances[q]) == sorted(distances[q])
    if k < len(ids) // 4:  # an approximate search is for a few nearest, not a ranking of everything
        recall = np.mean([len(np.intersect1d(f, e[1])) / len(e[1]) for f, e in zip(found, expected)])
        assert recall >= recall_floor


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """FAISS's OpenMP threads are slow to meet while other tests hold the CPUs."""
    faiss = pytest.importorskip("faiss")
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture
def data():
    rng = np.random.default_rng(28)
    codes, pool = clustered_codes(rng, 900)
    ids = rng.permutation(900).astype(np.int64) * 3 + 5
    queries = pack_signs(np.concatenate([pool[:4], np.sign(rng.standard_normal((4, BITS)))]))
    return codes, ids, queries


@pytest.mark.parametrize("case", BACKEND_CASES.values(), ids=list(BACKEND_CASES))
def test_every_backend_keeps_the_interface(case, data, tmp_path):
    backend = new_backend(case[0], case[1], tmp_path)
    try:
        check_the_interface(backend, case, data)
    finally:
        if hasattr(backend, "close"):
            backend.close()


def check_the_interface(backend, case, data):
    method, options, exact, recall_floor = case
    codes, ids, queries = data
    assert isinstance(backend, SearchBackend) and backend.name == method and backend.exact == exact
    assert len(backend) == 0 and backend.search(queries, 5)[1].shape == (len(queries), 0)
    first = ids < np.median(ids)  # two batches whose ids interleave with none of the first's order
    backend.add(codes[first], ids[first])
    backend.search(queries, 3)  # the search structure exists before the second batch arrives
    backend.add(codes[~first], ids[~first])
    assert len(backend) == 900
    for k in (1, 10, 60, 2000):
        check_search(backend, exact, recall_floor, queries, codes, ids, k)
    if exact:
        for radius in (0, 3, 9, BITS):
            results = backend.search_radius(queries, radius)
            expected = brute_force(queries, codes, ids, radius=radius)
            for (distances, found), (true_distances, true_ids) in zip(results, expected, strict=True):
                np.testing.assert_array_equal(found, true_ids)
                np.testing.assert_array_equal(distances, true_distances)
    gone = ids[::4]
    assert backend.remove(np.concatenate([gone, [10 ** 9]])) == len(gone)
    assert backend.remove(gone) == 0
    keep = ~np.isin(ids, gone)
    assert len(backend) == keep.sum()
    check_search(backend, exact, recall_floor, queries, codes[keep], ids[keep], 25)
    assert backend.nbytes is None or backend.nbytes >= codes[keep].nbytes
    if backend.store is None:  # a remote backend keeps its codes itself
        return
    np.testing.assert_array_equal(backend.store.ids, np.sort(ids[keep]))
    again = open_backend(method, BITS, **options)
    assert again.restore(backend.store.codes.copy(), backend.store.ids.copy(), backend.arrays())
    for a, b in zip(again.search(queries, 25), backend.search(queries, 25)):
        if exact:
            np.testing.assert_array_equal(a, b)


def test_a_backend_registered_elsewhere_is_opened_by_name(data):
    @register_backend
    class Everything(SearchBackend):  # a toy: returns every code at distance 0
        name = "test-everything"
        exact = False

        def __init__(self, hash_bit, **options):
            super().__init__(hash_bit, **options)
            self.ids = []

        def add(self, codes, ids):
            self.ids += list(ids)

        def remove(self, ids):
            before = len(self.ids)
            self.ids = [i for i in self.ids if i not in set(ids)]
            return before - len(self.ids)

        def search(self, queries, k):
            found = np.array([sorted(self.ids)[:k]] * len(queries), dtype=np.int64)
            return np.zeros(found.shape, np.int32), found

        def search_radius(self, queries, radius):
            return [self.search(queries[:1], len(self.ids))] * len(queries)

        def __len__(self):
            return len(self.ids)

    try:
        backend = open_backend("test-everything", 8)
        backend.add(None, [4, 2])
        assert backend.search(np.zeros((1, 1), np.uint8), 5)[1].tolist() == [[2, 4]]
    finally:
        del BACKENDS["test-everything"]
    with pytest.raises(ValueError, match="unknown search method 'test-everything'"):
        open_backend("test-everything", 8)


def test_multi_index_tables_changed_in_place_equal_tables_built_afresh(data):
    codes, ids, _ = data
    ids = ids.copy()
    ids[-1] = 2 ** 40  # an id beyond int32 arrives with the second batch
    tables = MultiIndexTables(codes[:500], BITS, 4, ids[:500])
    assert tables.positions.dtype == np.int32  # 4 bytes an id while they fit
    tables.add(codes[500:], ids[500:])
    assert tables.positions.dtype == np.int64
    assert tables.remove(ids[::3]) == len(ids[::3])
    keep = ~np.isin(ids, ids[::3])
    distances, found, _ = tables.search(codes[-1:], 900, BITS)
    assert distances[list(found).index(2 ** 40)] == 0
    fresh = MultiIndexTables(codes[keep], BITS, 4, ids[keep])
    np.testing.assert_array_equal(tables.offsets, fresh.offsets)
    for j in range(4):  # the same ids in every bucket (their order within a bucket is free)
        for start, end in zip(fresh.offsets[fresh.offset_starts[j]:fresh.offset_starts[j + 1] - 1],
                              fresh.offsets[fresh.offset_starts[j] + 1:fresh.offset_starts[j + 1]]):
            assert sorted(tables.positions[j, start:end]) == sorted(fresh.positions[j, start:end])


@pytest.mark.parametrize("mmap", [False, True])
def test_saved_multi_index_tables_are_loaded_not_rebuilt_and_stay_exact(tmp_path, data, mmap):
    codes, ids, queries = data
    index = HammingIndex.build(codes, ids, hash_bit=BITS, method="mih", substrings=4)
    index.save(tmp_path / "db.index")
    loaded = HammingIndex.load(tmp_path / "db.index", mmap=mmap)
    assert loaded.backend.tables is not None and loaded.backend.tables.substrings == 4  # before any search
    loaded.add(codes[:3] ^ np.uint8(0x10), [1, 2, 10 ** 6])
    loaded.remove(ids[:100])
    all_codes = np.concatenate([codes, codes[:3] ^ np.uint8(0x10)])
    all_ids = np.concatenate([ids, [1, 2, 10 ** 6]])
    keep = ~np.isin(all_ids, ids[:100])
    expected = brute_force(queries, all_codes[keep], all_ids[keep], k=30)
    distances, found = loaded.search(queries, 30)
    for row, (true_distances, true_ids) in enumerate(expected):
        np.testing.assert_array_equal(found[row], true_ids)
        np.testing.assert_array_equal(distances[row], true_distances)
    as_flat = HammingIndex.load(tmp_path / "db.index", method="flat")  # another method: the tables are unused
    np.testing.assert_array_equal(as_flat.search(queries, 30)[1], index.search(queries, 30)[1])


def damage_saved_tables(path, codes, ids):
    """Make the first table's first bucket of a saved index end far outside the codes."""
    raw = bytearray(path.read_bytes())
    length = struct.unpack("<I", raw[len(MAGIC):len(MAGIC) + 4])[0]
    offsets_start = -(-(len(MAGIC) + 4 + length + codes.size + 8 * len(ids)) // ALIGNMENT) * ALIGNMENT
    offsets_start = -(-(offsets_start + 8) // ALIGNMENT) * ALIGNMENT  # after the one-number "substrings" array
    raw[offsets_start + 8:offsets_start + 16] = struct.pack("<q", 10 ** 12)
    path.write_bytes(bytes(raw))


def test_damaged_saved_tables_are_rebuilt_from_the_codes(tmp_path, data):
    codes, ids, queries = data
    HammingIndex.build(codes, ids, hash_bit=BITS, method="mih", substrings=4).save(tmp_path / "db.index")
    damage_saved_tables(tmp_path / "db.index", codes, ids)
    loaded = HammingIndex.load(tmp_path / "db.index")
    assert loaded.backend.tables is None  # refused, rebuilt at the first search
    for (distances, found), (true_distances, true_ids) in zip(zip(*loaded.search(queries, 20)),
                                                              brute_force(queries, codes, ids, k=20)):
        np.testing.assert_array_equal(found, true_ids)


def test_a_format_1_file_still_loads(tmp_path, data):
    codes, ids, queries = data
    order = np.argsort(ids)
    header = b'{"format": 1, "hash_bit": 40, "method": "mih", "options": {"substrings": null}, "rows": 900}'
    header += b" " * (-(len(MAGIC) + 4 + len(header)) % ALIGNMENT)
    (tmp_path / "old.index").write_bytes(MAGIC + struct.pack("<I", len(header)) + header + codes[order].tobytes() +
                                         ids[order].astype("<i8").tobytes())
    loaded = HammingIndex.load(tmp_path / "old.index")
    np.testing.assert_array_equal(loaded.ids, ids[order])
    np.testing.assert_array_equal(loaded.search(queries, 10)[1],
                                  np.array([found for _, found in brute_force(queries, codes, ids, k=10)]))


def test_substrings_of_24_bits_or_more_are_refused():
    with pytest.raises(UserError, match=r"option substrings must be an integer from 3 to 48 \(substrings of at most "
                                        "23 bits"):
        HammingIndex(48, "mih", substrings=2)  # two 24-bit substrings: 0.5 s a query over a single code
    with pytest.raises(ValueError, match="option substrings must be from 3 to 64"):
        open_backend("mih", 64, substrings=2)  # two 32-bit substrings
    HammingIndex(46, "mih", substrings=2)  # 23-bit substrings are allowed


def test_encode_takes_a_single_image_path_or_image(tmp_path):
    from PIL import Image

    from hashing.search.api import UnreadableImage, _as_dataset

    path = tmp_path / "one.png"
    Image.new("RGB", (5, 4), (200, 10, 30)).save(path)
    for single in (str(path), path, Image.open(path)):
        items = _as_dataset(single, lambda image: np.asarray(image))
        assert len(items) == 1 and items[0].shape == (4, 5, 3) and tuple(items[0][0, 0]) == (200, 10, 30)
    (tmp_path / "folder").mkdir()
    Image.new("RGB", (5, 4)).save(tmp_path / "folder" / "a.png")
    assert len(_as_dataset(tmp_path / "folder", lambda image: image)) == 1
    with pytest.raises(UnreadableImage, match="absent.jpg does not exist"):
        _as_dataset(str(tmp_path / "absent.jpg"), lambda image: image)[0]


def test_the_cost_fit_recovers_known_coefficients_and_auto_reads_its_file(tmp_path, monkeypatch):
    from benchmarks import fit_search_cost
    from hashing.search import auto, mih

    monkeypatch.setattr(mih, "THREADS", mih.THREADS)  # main() sets one thread
    known = {"flat_fixed": 2e-5, "flat_per_word": 7e-10, "mih_fixed": 4e-5, "mih_per_bucket": 3e-8,
             "mih_per_candidate": 5e-9}
    rows = [{"bits": bits, "size": size, "substrings": auto.default_substrings(bits, size), "k": k}
            for bits in (32, 64, 128) for size in (10 ** 4, 10 ** 5, 10 ** 6) for k in (1, 100)]
    for row in rows:
        flat, multi = fit_search_cost.features(row)
        row["flat"] = known["flat_fixed"] + known["flat_per_word"] * flat[1]
        row["mih"] = known["mih_fixed"] + known["mih_per_bucket"] * multi[1] + known["mih_per_candidate"] * multi[2]
    fitted = fit_search_cost.fit(rows)
    assert all(fitted[name] == pytest.approx(value, rel=1e-6) for name, value in known.items())
    args = fit_search_cost.get_args_parser().parse_args(
        ["--bits", "16", "32", "--sizes", "300", "3000", "--k", "5", "--radii", "1", "--queries", "3", "--budget",
         "0.05", "--output", str(tmp_path / "cost.json"), "--table", str(tmp_path / "cost.md")])
    fit_search_cost.main(args)
    assert (tmp_path / "cost.md").read_text().count("\n| ") == 8 + 1  # the header and 8 measurements
    monkeypatch.setattr(auto, "COST_FILE", tmp_path / "cost.json")
    auto.coefficients.cache_clear()
    try:
        assert set(auto.coefficients()) == set(auto.DEFAULT_COEFFICIENTS)
        assert auto.coefficients() != auto.DEFAULT_COEFFICIENTS
        (tmp_path / "cost.json").write_text('{"coefficients": {"flat_fixed": -1}}')
        auto.coefficients.cache_clear()
        with pytest.raises(UserError, match="lacks the coefficients flat_fixed, .*fit_search_cost.py again"):
            auto.coefficients()
    finally:
        auto.coefficients.cache_clear()


def test_the_cost_fit_refuses_its_outputs_before_measuring(tmp_path, monkeypatch):
    from benchmarks import fit_search_cost

    monkeypatch.setattr(fit_search_cost, "measure", lambda args: pytest.fail("measured before checking the outputs"))
    same = str(tmp_path / "cost.json")
    fifo = tmp_path / "fifo.md"
    os.mkfifo(fifo)
    for output, table, message in ((same, same, "--table .*cost.json is also --output"),
                                   (same, str(fifo), "--table .*fifo.md is a FIFO")):
        args = fit_search_cost.get_args_parser().parse_args(["--output", output, "--table", table])
        with pytest.raises(UserError, match=message):
            fit_search_cost.main(args)


@pytest.mark.skipif(not faiss_available(), reason="needs FAISS")
def test_auto_with_damaged_saved_tables_builds_its_faiss_copy_once(tmp_path, data, monkeypatch):
    from hashing.search import flat

    codes, ids, queries = data
    index = HammingIndex.build(codes, ids, hash_bit=BITS, method="auto")
    index.backend.built()
    index.save(tmp_path / "db.index")
    damage_saved_tables(tmp_path / "db.index", codes, ids)
    builds = []
    monkeypatch.setattr(flat, "faiss_flat_index", lambda bits: builds.append(len(bits)) or faiss_flat_index(bits))
    loaded = HammingIndex.load(tmp_path / "db.index")
    assert loaded.backend.tables is None and builds == [len(codes)]
    np.testing.assert_array_equal(loaded.search(queries, 20)[1], index.search(queries, 20)[1])
