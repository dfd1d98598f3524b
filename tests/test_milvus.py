"""The Milvus backend (hashing/search/milvus.py) on the real engine, Milvus Lite, in a temporary folder: rankings equal a
brute-force loop (and the exact index) to the last tie, the engine's raw answers have the exact distance multiset at
every k, radius search and removal; and --verify's figures (hashing/search/export_verify.py) on a hand-worked case."""
import os

import numpy as np
import pytest

from hashing.codes import CodeSet
from hashing.search.backend import open_backend
from hashing.search.index import HammingIndex
from utils.errors import UserError

milvus = pytest.importorskip("hashing.search.milvus")
if not milvus.pymilvus_available():
    pytest.skip("pymilvus and milvus-lite are not installed (pip install -r requirements.txt)", allow_module_level=True)

from hashing.search.export_verify import compare_with_exact, recall_by_distance_level  # noqa: E402

BITS = 16
RECORD = {"checkpoint_sha256": "0" * 64, "hash_bit": BITS, "source": "fixture", "source_sha256": "1" * 64,
          "rows": 1500}


def tied_codes(rng, rows):
    """16-bit codes with heavy ties: each byte is one of 4 values."""
    return rng.choice(np.array([0, 1, 3, 255], np.uint8), size=(rows, 2))


def brute_force(queries, database, k):
    """(distances, ids) of the k nearest rows by Hamming distance, ties by id: a plain loop."""
    distances, ids = [], []
    for query in queries:
        ranked = sorted((int(np.unpackbits(query ^ row).sum()), index) for index, row in enumerate(database))[:k]
        distances.append([d for d, _ in ranked])
        ids.append([i for _, i in ranked])
    return np.array(distances), np.array(ids)


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    """(backend of a 1,500-code collection in a Milvus Lite file, its codes, queries): one engine per module."""
    rng = np.random.default_rng(0)
    codes, queries = tied_codes(rng, 1500), tied_codes(rng, 25)
    uri = str(tmp_path_factory.mktemp("milvus") / "codes.db")
    backend = milvus.MilvusBackend.create(uri, "fixture", RECORD, label_length=8)
    backend.add(codes, np.arange(len(codes)))
    yield backend, codes, queries
    backend.close()


@pytest.mark.parametrize("k", [1, 7, 60, 400])
def test_search_equals_a_brute_force_loop_and_the_exact_index_to_the_last_tie(lite, k):
    backend, codes, queries = lite
    distances, ids = backend.search(queries, k)
    expected = brute_force(queries, codes, k)
    assert distances.dtype == np.int32 and ids.dtype == np.int64
    np.testing.assert_array_equal(distances, expected[0])
    np.testing.assert_array_equal(ids, expected[1])
    exact = HammingIndex.build(codes, method="flat").search(queries, k)
    np.testing.assert_array_equal(ids, exact[1])


@pytest.mark.parametrize("k", [1, 9, 100])
def test_the_engines_own_answer_has_the_exact_distances_at_every_k(lite, k):
    backend, codes, queries = lite
    distances, ids = backend.search_raw(queries, k)
    expected_distances, _ = brute_force(queries, codes, k)
    np.testing.assert_array_equal(np.sort(distances, axis=1), expected_distances)  # the multiset, rank by rank
    true = np.unpackbits(codes[ids] ^ queries[:, None, :], axis=-1).sum(axis=-1)
    np.testing.assert_array_equal(true, distances)  # each id is at the distance the engine says
    assert all(len(set(row)) == k for row in ids.tolist())


def test_radius_search_and_removal(lite, tmp_path):
    backend, codes, queries = lite
    for (distances, ids), query in zip(backend.search_radius(queries[:5], 3), queries[:5]):
        found = [(d, i) for i, d in enumerate(np.unpackbits(codes ^ query, axis=1).sum(axis=1).tolist()) if d <= 3]
        assert list(zip(distances.tolist(), ids.tolist())) == sorted(found)
    other = milvus.MilvusBackend.create(backend.uri, "removal", {**RECORD, "rows": 10}, 8)
    other.add(codes[:10], np.arange(10))
    assert other.remove([2, 3, 99]) == 2 and len(other) == 8
    assert 2 not in other.search(codes[2:3], 8)[1][0].tolist()
    other.close()


def test_the_registry_opens_a_collection_and_checks_its_bits(lite):
    backend, codes, queries = lite
    opened = open_backend("milvus", BITS, uri=backend.uri, collection="fixture")
    assert opened.exact and len(opened) == len(codes) and opened.index_type == "BIN_FLAT"
    opened.close()
    with pytest.raises(UserError, match="16-bit codes, not 24-bit"):
        open_backend("milvus", 24, uri=backend.uri, collection="fixture")
    with pytest.raises(UserError, match="no collection absent"):
        milvus.MilvusBackend(uri=backend.uri, collection="absent")
    empty = open_backend("milvus", 24, uri=backend.uri, collection="made_empty")  # by bits: created empty
    assert len(empty) == 0 and empty.hash_bit == 24 and empty.search(np.zeros((2, 3), np.uint8), 5)[1].shape == (2, 0)
    empty.close()


def test_another_checkpoints_or_code_lengths_collection_is_refused(lite):
    backend, _, _ = lite
    for change in ({"checkpoint_sha256": "f" * 64}, {"hash_bit": 24}, {"source_sha256": "2" * 64}):
        with pytest.raises(UserError, match="holds the codes of another " + next(iter(change))):
            milvus.MilvusBackend.create(backend.uri, "fixture", {**RECORD, **change}, 8)


def test_a_collection_not_written_by_the_export_is_refused(lite):
    backend, _, _ = lite
    backend.client.create_collection("plain", dimension=8)  # pymilvus's quick setup: float vectors, no record
    with pytest.raises(UserError, match="was not written by hashing.export"):
        milvus.MilvusBackend(uri=backend.uri, collection="plain")
    assert len(backend) == 1500  # the shared client still works


def test_milvus_lite_refuses_ivf_with_a_clear_line(lite):
    backend, _, _ = lite
    with pytest.raises(UserError, match="Milvus Lite builds BIN_FLAT only"):
        milvus.MilvusBackend.create(backend.uri, "ivf", RECORD, 8, index_type="BIN_IVF_FLAT")


def test_a_bad_uri_or_collection_name_is_one_line(tmp_path):
    with pytest.raises(UserError, match="ending in .db"):
        milvus.MilvusBackend(uri=str(tmp_path / "codes.sqlite"), collection="x")
    with pytest.raises(UserError, match="folder .* does not exist"):
        milvus.MilvusBackend(uri=str(tmp_path / "missing" / "codes.db"), collection="x")
    (tmp_path / "folder.db").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        milvus.MilvusBackend(uri=str(tmp_path / "folder.db"), collection="x")
    with pytest.raises(UserError, match="collection name"):
        milvus.MilvusBackend(uri=str(tmp_path / "codes.db"), collection="1; drop")
    os.mkfifo(tmp_path / "pipe.db")
    with pytest.raises(UserError, match="is a FIFO"):
        milvus.MilvusBackend(uri=str(tmp_path / "pipe.db"), collection="x")
    (tmp_path / "weights.db").write_bytes(b"PK\x03\x04 a checkpoint")
    with pytest.raises(UserError, match="weights.db exists and is not a Milvus Lite database"):
        milvus.MilvusBackend(uri=str(tmp_path / "weights.db"), collection="x")
    assert (tmp_path / "weights.db").read_bytes() == b"PK\x03\x04 a checkpoint"


# ---------- --verify's figures on a hand-worked case ----------

def hand_made_codes():
    """4-bit codes. The query is ++++; database 0..4 lie at distances 0, 1, 1, 2, 4 and share a label with it
    for items 1, 3 and 4 only. Two copies of the query."""
    database = np.array([[1, 1, 1, 1], [1, 1, 1, -1], [1, 1, -1, 1], [1, -1, -1, 1], [-1, -1, -1, -1]], float)
    database_labels = np.array([[0, 1], [1, 0], [0, 1], [1, 1], [1, 0]])
    query = np.array([[1, 1, 1, 1], [1, 1, 1, 1]], float)
    return CodeSet.from_outputs(query, np.array([[1, 0], [1, 0]]), database, database_labels)


def test_verify_counts_recall_by_distance_level_and_the_engines_map():
    codes = hand_made_codes()
    # exact top 3: items 0 (d 0), 1 (d 1), 2 (d 1): relevance 0, 1, 0, so the evaluator's AP@3 is 1/2.
    # query 0: the tied items 1 and 2 swapped: a correct top 3 (recall 1), AP 1/3 (relevant at rank 3);
    # query 1: truncated (item 2 missing): recall 2/3, AP 1/2 (relevant at rank 2).
    engine_ids = np.array([[0, 2, 1], [0, 1, -1]])
    report = compare_with_exact((None, engine_ids), codes, 3)
    assert report["recall_by_distance_level"] == pytest.approx((1 + 2 / 3) / 2)
    assert report["queries_short"] == 1
    assert report["map_engine"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert report["map_evaluator"] == pytest.approx(1 / 2)
    assert "misses true neighbours for 1 of 2" in report["verdict"]
    full = compare_with_exact((None, np.array([[0, 2, 1], [0, 1, 2]])), codes, 3)
    assert full["recall_by_distance_level"] == 1 and "up to the order of tied codes" in full["verdict"]


def test_a_wrong_neighbour_or_a_repeated_id_does_not_count():
    codes = hand_made_codes()
    # item 3 is at distance 2, not 1; a repeated id counts once: each answer matches 2 of the 3 distance slots
    report = compare_with_exact((None, np.array([[0, 3, 1], [0, 1, 1]])), codes, 3)
    assert report["recall_by_distance_level"] == pytest.approx(2 / 3)
    assert report["map_engine"] == pytest.approx(((1 / 2 + 2 / 3) / 2 + 1 / 2) / 2)  # relevance 011, then 01-
    assert recall_by_distance_level(np.array([[0, 1, 1]]), np.array([[1, 1, 0]]), 4) == pytest.approx([1.0])


def test_the_milvus_benchmark_writes_its_table(tmp_path):
    from benchmarks import bench_milvus
    args = bench_milvus.get_args_parser().parse_args(["--size", "600", "--queries", "6", "--single", "2", "--k", "10",
                                                      "--insert_batch", "250", "--output_dir", str(tmp_path)])
    rows = bench_milvus.main(args)
    assert [row["engine"] for row in rows] == ["HammingIndex (flat)", "Milvus Lite (BIN_FLAT)"]
    assert all(row["recall"] == 1 for row in rows)  # both exact: a correct top k at every query
    assert "| Milvus Lite (BIN_FLAT) | 600 |" in (tmp_path / "bench_milvus_64bit.md").read_text()
