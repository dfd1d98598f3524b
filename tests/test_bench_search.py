"""benchmarks/bench_search.py at a tiny size: every method measured, the exact ones agreeing with the flat scan."""
import faiss
import pytest

from benchmarks import bench_search
from hashing.search import mih
from utils.errors import UserError


@pytest.fixture
def restored_threads(monkeypatch):
    monkeypatch.setattr(mih, "THREADS", mih.THREADS)
    threads = faiss.omp_get_max_threads()
    yield
    faiss.omp_set_num_threads(threads)


def test_the_search_benchmark_writes_its_table(tmp_path, capsys, restored_threads):
    # One thread: FAISS's OpenMP threads are slow to meet while other tests hold the CPUs.
    args = bench_search.get_args_parser().parse_args(["--sizes", "3000", "--queries", "20", "--single", "3", "--k",
                                                      "10", "--threads", "1", "--methods", "flat", "mih", "ivf",
                                                      "hnsw", "--output_dir", str(tmp_path)])
    bench_search.main(args)
    table = (tmp_path / "bench_search_64bit.md").read_text()
    assert "(1 threads)" in table and "(mih: 1 threads)" in table
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith(("| uniform", "| clustered"))]
    assert [(row[0].strip(), row[2].strip()) for row in rows] == [
        (codes, method) for codes in ("uniform", "clustered") for method in ("flat", "mih", "ivf", "hnsw")]
    for row in rows:
        exact, recall, same = row[3].strip(), float(row[8]), float(row[9])
        assert (exact == "yes") == (row[2].strip() in ("flat", "mih"))
        if exact == "yes":
            assert recall == 1.0 and same == 1.0
        assert 0.0 <= recall <= 1.0
    assert table in capsys.readouterr().out


def test_the_benchmark_needs_the_flat_scan_as_reference(tmp_path):
    args = bench_search.get_args_parser().parse_args(["--methods", "mih", "--output_dir", str(tmp_path)])
    with pytest.raises(UserError, match="must include flat"):
        bench_search.main(args)
