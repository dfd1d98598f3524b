"""Issue 23, the evaluation side: python -m hashing.evaluate and the codes it reads (hashing/cache.py) never
write over an input or a device, never block on a FIFO or read without bound, hold every integer width of
the evaluation at its boundaries (or refuse the input), and turn every unusable input into one line."""
import contextlib
import io
import json
import math
import os
import signal
import stat
import tracemalloc
import zipfile

import numpy as np
import pytest

from hashing import cache as codes_cache
from hashing.evaluation import cli as evaluate
from hashing.evaluation import fused
from hashing.evaluation import metrics
from hashing.codes import CodeSet, hamming_distances, word_columns
from hashing.evaluation.conventions import Convention
from tests.cli_runs import exit_status


class Blocked(BaseException):
    """Raised by deadline(): not an OSError (as TimeoutError is), which the readers under test would catch."""


@contextlib.contextmanager
def deadline(seconds):
    """Fail instead of hanging: SIGALRM interrupts a blocking open() or read()."""
    def expired(signum, frame):
        raise Blocked(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def save(folder, name, array):
    path = folder / f"{name}.npy"
    np.save(path, array)
    return str(path)


def small_problem():
    """4 queries and 10 database items, 16 bits, 3 classes (one-hot)."""
    rng = np.random.default_rng(0)
    codes = rng.choice([-1.0, 1.0], size=(14, 16))
    labels = np.eye(3)[rng.integers(0, 3, 14)]
    return codes[:4], labels[:4], codes[4:], labels[4:]


def files_of(folder, problem):
    query, query_labels, database, database_labels = problem
    return [save(folder, "q", query), save(folder, "d", database), "--query_labels", save(folder, "ql", query_labels),
            "--database_labels", save(folder, "dl", database_labels)]


def evaluate_status(argv, capsys):
    return exit_status(evaluate.cli, argv, capsys)


def cache_file(folder, problem=None, name="run.codes.npz"):
    path = folder / name
    codes_cache.save(path, CodeSet.from_outputs(*(problem or small_problem())), {"k": 1})
    return path


# ============ data loss: an output never lands on an input, another run's file or a device ============

@pytest.mark.parametrize("flag, target", [("--json", "q.npy"), ("--csv", "dl.npy"), ("--json", "ql.npy")])
def test_json_and_csv_never_land_on_an_input_array(tmp_path, capsys, flag, target):
    argv = files_of(tmp_path, small_problem())
    before = (tmp_path / target).read_bytes()
    code, _, err = evaluate_status(argv + [flag, str(tmp_path / target)], capsys)
    assert code == 1 and f"{flag} {tmp_path / target} is also" in err and err.count("\n") == 1
    assert (tmp_path / target).read_bytes() == before


def test_json_never_lands_on_the_codes_cache_it_reads_or_on_another_runs(tmp_path, capsys):
    scored, other = cache_file(tmp_path), cache_file(tmp_path, name="other.codes.npz")
    before = {path: path.read_bytes() for path in (scored, other)}
    code, _, err = evaluate_status([str(scored), "--json", str(scored)], capsys)
    assert code == 1 and "is also CODES" in err
    code, _, err = evaluate_status([str(scored), "--csv", str(other)], capsys)
    assert code == 1 and f"--csv {other} exists and is not an earlier --csv table of hashing.evaluate" in err
    assert {path: path.read_bytes() for path in (scored, other)} == before


def test_an_earlier_table_is_replaced_and_one_path_is_not_both_outputs(tmp_path, capsys):
    argv = files_of(tmp_path, small_problem()) + ["--json", str(tmp_path / "t.json"), "--csv", str(tmp_path / "t.csv")]
    assert evaluate_status(argv, capsys)[0] == 0
    assert evaluate_status(argv, capsys)[0] == 0  # the earlier outputs are this command's: replaced
    assert json.loads((tmp_path / "t.json").read_text())["num_queries"] == 4
    code, _, err = evaluate_status(files_of(tmp_path, small_problem()) + ["--json", str(tmp_path / "same"), "--csv",
                                                                           str(tmp_path / "same")], capsys)
    assert code == 1 and "is also --json" in err and not (tmp_path / "same").exists()


def test_outputs_onto_a_fifo_or_a_device_node_are_refused(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    nodes = [(fifo, stat.S_ISFIFO, "a FIFO")]
    if os.geteuid() == 0:  # a copy of /dev/null, as the issue made it
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        nodes.append((tmp_path / "null", stat.S_ISCHR, "a character device"))
    for node, still, kind in nodes:
        for flag in ("--json", "--csv"):
            with deadline(10):
                code, _, err = evaluate_status(files_of(tmp_path, small_problem()) + [flag, str(node)], capsys)
            assert code == 1 and f"{flag} {node} is {kind}" in err and still(os.stat(node).st_mode)


# ============ hangs and unbounded reads: inputs are regular files of a sane size ============

def test_a_fifo_as_codes_is_refused_without_blocking(tmp_path, capsys):
    argv = files_of(tmp_path, small_problem())
    os.unlink(argv[0])
    os.mkfifo(argv[0])
    with deadline(10):
        code, _, err = evaluate_status(argv, capsys)
    assert code == 1 and f"QUERY_CODES {argv[0]} is a FIFO (named pipe), not a regular file" in err
    fifo_npz = tmp_path / "fifo.codes.npz"
    os.mkfifo(fifo_npz)
    with deadline(10):
        code, _, err = evaluate_status([str(fifo_npz)], capsys)
        assert codes_cache.read(fifo_npz) is None  # the run's own cache: unusable, so it is recomputed
    assert code == 1 and "is a FIFO" in err


def test_codes_linked_to_dev_zero_are_refused_unread(tmp_path, capsys):
    argv = files_of(tmp_path, small_problem())
    os.unlink(argv[2 + 1])  # the query labels
    os.symlink("/dev/zero", argv[3])
    with deadline(10):
        code, _, err = evaluate_status(argv, capsys)
    assert code == 1 and f"--query_labels {argv[3]} is a character device, not a regular file" in err


def lying_npy(shape, dtype="|u1", data=b"\0" * 8):
    """A tiny .npy whose header declares `shape`."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": dtype, "fortran_order": False, "shape": shape})
    return out.getvalue() + data


def test_a_header_declaring_more_than_the_file_holds_is_refused_before_allocating(tmp_path, capsys):
    argv = files_of(tmp_path, small_problem())
    content = lying_npy((40_000, 40_000_000))  # 1.6e12 elements in a 136-byte file
    assert len(content) <= 200
    with open(argv[1], "wb") as handle:
        handle.write(content)
    tracemalloc.start()
    code, _, err = evaluate_status(argv, capsys)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert code == 1 and "declares a uint8 array of shape (40000, 40000000) (1,600,000,000,000 bytes) but holds " \
                         "only 8 bytes" in err
    assert peak < 10 * 2 ** 20


def test_a_codes_cache_member_declaring_more_than_it_holds_is_refused(tmp_path, capsys):
    path = cache_file(tmp_path)
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    members["query_bits.npy"] = lying_npy((10 ** 6, 10 ** 6))
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    code, _, err = evaluate_status([str(path)], capsys)
    assert code == 1 and "array 'query_bits', declares a uint8 array of shape (1000000, 1000000)" in err
    assert codes_cache.read(path) is None


def test_a_zip_bomb_in_a_codes_cache_is_refused_uninflated(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "MAX_INPUT_BYTES", 64 * 2 ** 20)  # the mechanism at a cap a test can exceed
    path = tmp_path / "bomb.codes.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("query_bits.npy", "w") as member:
            member.write(lying_npy((100 * 2 ** 20,), data=b""))
            for _ in range(100):
                member.write(bytes(2 ** 20))  # 100 MiB of zeros, 100 kB deflated
    assert path.stat().st_size < 2 ** 20
    tracemalloc.start()
    code, _, err = evaluate_status([str(path)], capsys)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert code == 1 and "unpacks to 100.0 MiB, more than the 64.0 MiB" in err and peak < 10 * 2 ** 20


def test_class_indices_are_not_expanded_into_a_one_hot_matrix(tmp_path, capsys):
    rng = np.random.default_rng(1)
    classes = rng.choice([3, 17, 65_999], size=50)  # 1-D indices: 528-byte files
    query, database = rng.choice([-1.0, 1.0], size=(10, 16)), rng.choice([-1.0, 1.0], size=(40, 16))
    argv = [save(tmp_path, "q", query), save(tmp_path, "d", database), "--query_labels",
            save(tmp_path, "ql", classes[:10]), "--database_labels", save(tmp_path, "dl", classes[10:]), "--topk", "0"]
    assert os.path.getsize(argv[3]) == 128 + 80
    tracemalloc.start()
    code, out, _ = evaluate_status(argv, capsys)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert code == 0 and peak < 20 * 2 ** 20  # a one-hot of 66,000 columns: 3.3 MB, of 66,000 x 66,000: 4.4 GB
    one_hot = np.eye(3)[np.searchsorted([3, 17, 65_999], classes)]
    expected = metrics.map_at_k(query, one_hot[:10], database, one_hot[10:])
    row = next(line for line in out.splitlines() if line.startswith("hits      zero     index *"))
    assert float(row.split()[4]) == pytest.approx(expected, abs=5e-5)


def crafted_cache(folder, **changes):
    """A codes cache with some of its arrays replaced (or removed, with None)."""
    path = cache_file(folder)
    with np.load(path) as stored:
        arrays = dict(stored)
    for name, value in changes.items():
        if value is None:
            del arrays[name]
        else:
            arrays[name] = np.asarray(value)
    np.savez(path, **arrays)
    return path


def test_a_crafted_cache_with_a_huge_hash_bit_is_refused(tmp_path, capsys):
    path = crafted_cache(tmp_path, hash_bit=200_000)
    tracemalloc.start()
    code, _, err = evaluate_status([str(path)], capsys)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert code == 1 and "hash_bit 200000 does not fit packed rows of 2 bytes" in err and peak < 10 * 2 ** 20
    assert codes_cache.read(path) is None


# ============ integer widths of the evaluation, at their boundaries ============

def brute_force(query_bits, query_labels, database_bits, database_labels, hash_bit, num_classes, k):
    """Per query: AP (over the hits in the top k), NDCG@k with gain 2^g - 1 and ACG@k, in Python integers and
    floats from the unpacked bits; ties by database index."""
    q_codes = np.unpackbits(query_bits, axis=1, count=hash_bit).astype(int)
    d_codes = np.unpackbits(database_bits, axis=1, count=hash_bit).astype(int)
    q_labels = np.unpackbits(query_labels, axis=1, count=num_classes).astype(int)
    d_labels = np.unpackbits(database_labels, axis=1, count=num_classes).astype(int)
    figures = []
    for q in range(len(q_codes)):
        distances = [int(np.sum(q_codes[q] != d)) for d in d_codes]
        grades = [int(np.sum(q_labels[q] & d)) for d in d_labels]
        order = sorted(range(len(d_codes)), key=lambda i: (distances[i], i))[:k]
        hits, precision_sum = 0, 0.0
        for t, item in enumerate(order, start=1):
            if grades[item]:
                hits += 1
                precision_sum += hits / t
        dcg = sum((2 ** grades[item] - 1) / math.log2(t + 1) for t, item in enumerate(order, start=1))
        ideal = sum((2 ** g - 1) / math.log2(t + 1) for t, g in enumerate(sorted(grades, reverse=True)[:k], start=1))
        figures.append({"map": precision_sum / hits if hits else 0.0, "ndcg": dcg / ideal if ideal else 0.0,
                        "acg": sum(grades[item] for item in order) / k})
    return {name: float(np.mean([f[name] for f in figures])) for name in ("map", "ndcg", "acg")}


def packed(rows, width):
    matrix = np.zeros((len(rows), width), dtype=bool)
    for row, ones in enumerate(rows):
        matrix[row, list(ones)] = True
    return np.packbits(matrix, axis=1)


@pytest.fixture(params=["numpy", "fused"])
def path(request, monkeypatch):
    """Both evaluation paths: NumPy, and the fused kernel wherever it accepts the problem."""
    if request.param == "fused":
        if not fused.available():
            pytest.skip("numba is not installed")
        monkeypatch.setattr(fused, "MIN_PAIRS", 0)
    else:
        monkeypatch.setattr(fused, "enabled", False)
    return request.param


def check_against_brute_force(codes, k):
    expected = brute_force(codes.query_bits, codes.query_labels, codes.database_bits, codes.database_labels,
                           codes.hash_bit, codes.num_classes, k)
    for ties in ("index", "aware"):  # distinct distances: every tie rule gives the same figures
        got = metrics.ranking_metrics_of_codes(codes, k, Convention(ties=ties))
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-12), (name, ties)
    assert metrics.map_of_codes(codes, k) == pytest.approx(expected["map"], rel=1e-12)
    return expected


@pytest.mark.parametrize("hash_bit", [255, 256, 65_535, 65_536, 65_544])
def test_hamming_distances_hold_at_every_width(hash_bit):
    query = packed([()], hash_bit)
    database = packed([range(hash_bit), range(hash_bit - 1)], hash_bit)
    distances = hamming_distances(word_columns(query), word_columns(database), hash_bit)
    assert distances.tolist() == [[hash_bit, hash_bit - 1]]


@pytest.mark.parametrize("hash_bit", [32_767, 32_768, 65_544])
def test_codes_over_the_16_bit_boundaries_keep_their_ranking(path, hash_bit):
    # item 0 at the largest distance, irrelevant; item 1 at distance 100, relevant: mAP 1, not 0.5
    codes = CodeSet(packed([()], hash_bit), packed([[0]], 2), packed([range(hash_bit), range(100)], hash_bit),
                    packed([[1], [0]], 2), hash_bit, 2)
    assert check_against_brute_force(codes, 2)["map"] == 1.0
    curves = metrics.metrics_of_codes(codes, 2, top_ns=[1])["precision_recall"]
    assert curves["recall"][99] == 0.0 and curves["recall"][100] == 1.0  # the radius histograms too


@pytest.mark.parametrize("num_classes", [255, 256, 300])
def test_shared_label_counts_hold_at_256_labels(path, num_classes):
    everything = range(num_classes)
    codes = CodeSet(packed([()], 16), packed([everything], num_classes), packed([(), (0,)], 16),
                    packed([(), everything], num_classes), 16, num_classes)
    assert check_against_brute_force(codes, 2)["map"] == 0.5  # the item sharing every label is relevant


@pytest.mark.parametrize("shared", [(62, 61, 1), (63, 62, 0), (64, 2, 1), (127, 128, 3), (129, 128, 127)])
def test_ndcg_holds_for_queries_sharing_many_labels(path, shared):
    # item i at distance i shares shared[i] labels with the query, which has max(shared) labels (up to 62 the
    # fused kernel serves the problem): the ideal order differs from the ranking
    codes = CodeSet(packed([()], 8), packed([range(max(shared))], 130),
                    packed([range(i) for i in range(len(shared))], 8), packed([range(g) for g in shared], 130), 8, 130)
    if path == "fused":
        assert (metrics._problem(codes).fused_query is not None) == (max(shared) <= 62)
    expected = check_against_brute_force(codes, len(shared))
    assert 0 < expected["ndcg"] <= 1


# ============ silent wrong results of the CLI ============

def test_nan_labels_are_refused(tmp_path, capsys):
    query, query_labels, database, database_labels = small_problem()
    database_labels = database_labels.copy()
    database_labels[2, 1] = np.nan
    code, _, err = evaluate_status(files_of(tmp_path, (query, query_labels, database, database_labels)), capsys)
    assert code == 1 and "--database_labels" in err and "NaN or infinite (first in row 2)" in err


def test_negative_labels_are_refused(tmp_path, capsys):
    query, query_labels, database, database_labels = small_problem()
    code, _, err = evaluate_status(files_of(tmp_path, (query, query_labels - 1, database, database_labels)), capsys)
    assert code == 1 and "--query_labels" in err and "negative" in err


def test_all_zero_labels_have_nothing_to_score(tmp_path, capsys):
    query, query_labels, database, database_labels = small_problem()
    code, out, err = evaluate_status(files_of(tmp_path, (query, 0 * query_labels, database, database_labels)), capsys)
    assert code == 1 and "no query shares a label with any database item" in err and "nothing to score" in err
    assert "0.0000" not in out


def test_a_convention_that_leaves_out_every_query_shows_no_figure(tmp_path, capsys):
    # K = 1 and the nearest item is irrelevant: under normalize=hits, zero_hit=skip no query remains
    query, database = np.ones((2, 8)), np.vstack([np.ones(8), -np.ones(8)])
    query_labels, database_labels = np.array([[1, 0], [1, 0]]), np.array([[0, 1], [1, 0]])
    argv = files_of(tmp_path, (query, query_labels, database, database_labels)) + ["--topk", "1", "--json",
                                                                                   str(tmp_path / "t.json")]
    code, out, _ = evaluate_status(argv, capsys)
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("hits      skip     index"))
    assert row.split()[3:7] == ["—", "—", "0.0000", "0.0000"] and row.split()[-1] == "2"
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    skipped = next(r for r in rows if (r["normalize"], r["zero_hit"], r["ties"]) == ("hits", "skip", "index"))
    assert skipped["map"] is None and skipped["wap"] is None and skipped["skipped_queries"] == 2


# ============ tracebacks that became one-line errors ============

@pytest.mark.parametrize("case, message", [
    ("zero_bits", "QUERY_CODES: codes of 0 bits"),
    ("string_labels", "--query_labels: labels must be numbers, got <U1"),
    ("structured_codes", "QUERY_CODES: codes must be real numbers, got [('a', '<f8'), ('b', '<f8')]"),
    ("datetime_codes", "QUERY_CODES: codes must be real numbers, got datetime64[D]"),
    ("complex_codes", "QUERY_CODES: codes must be real numbers, got complex128"),
    ("float_class_indices", "--query_labels: a 1-D label file must hold non-negative integer class indices"),
    ("zero_classes", "--query_labels: labels of 0 classes"),
])
def test_unusable_arrays_are_one_line_errors(tmp_path, capsys, case, message):
    query, query_labels, database, database_labels = small_problem()
    if case == "zero_bits":
        query, database = query[:, :0], database[:, :0]
    elif case == "string_labels":
        query_labels = np.array([["1", "0", "0"]] * 4)
    elif case == "structured_codes":
        query = np.zeros(4, dtype=[("a", "<f8"), ("b", "<f8")])[:, None].repeat(16, axis=1)
    elif case == "datetime_codes":
        query = np.zeros((4, 16), dtype="datetime64[D]")
    elif case == "complex_codes":
        query = query + 1j
    elif case == "float_class_indices":
        query_labels, database_labels = np.array([0.5, 1, 2, 0]), np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    elif case == "zero_classes":
        query_labels, database_labels = query_labels[:, :0], database_labels[:, :0]
    code, _, err = evaluate_status(files_of(tmp_path, (query, query_labels, database, database_labels)), capsys)
    assert code == 1 and err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_a_negative_seed_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        evaluate.cli(files_of(tmp_path, small_problem()) + ["--seed", "-1"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "--seed: must be an integer >= 0, got '-1'" in err and "Traceback" not in err


@pytest.mark.parametrize("changes, message", [
    ({"hash_bit": 0}, "hash_bit 0 does not fit packed rows of 2 bytes"),
    ({"hash_bit": -7}, "hash_bit -7 does not fit packed rows of 2 bytes"),
    ({"hash_bit": [16, 16]}, "hash_bit is not one integer"),
    ({"hash_bit": "16"}, "hash_bit is not one integer"),
    ({"num_classes": 9}, "num_classes 9 does not fit packed rows of 1 bytes"),
    ({"query_bits": np.zeros(8, dtype=np.uint8)}, "query_bits must be a 2-D uint8 array, got shape (8,)"),
    ({"query_bits": np.full((4, 2), 255, dtype=np.uint8), "hash_bit": 12}, "padding bits"),
    ({"database_labels": None}, "database_labels"),
])
def test_a_crafted_codes_cache_is_a_one_line_error(tmp_path, capsys, changes, message):
    path = crafted_cache(tmp_path, **changes)
    code, _, err = evaluate_status([str(path)], capsys)
    assert code == 1 and err.startswith(f"error: {path}: not a codes cache of this project") and message in err, err
    assert err.count("\n") == 1
    assert codes_cache.read(path) is None


def test_a_codes_cache_with_an_empty_database_is_a_one_line_error(tmp_path, capsys):
    path = crafted_cache(tmp_path, database_bits=np.zeros((0, 2), dtype=np.uint8),
                         database_labels=np.zeros((0, 1), dtype=np.uint8))
    code, _, err = evaluate_status([str(path)], capsys)
    assert code == 1 and err == f"error: {path}: there must be at least one query and one database item\n"
