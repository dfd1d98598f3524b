"""The standalone evaluator (python -m hashing.evaluate): every input format gives the same figures, which are
those of hashing.evaluation.metrics; mistakes are one-line errors; the table goes to JSON and CSV."""
import csv
import json

import numpy as np
import pytest

from hashing import cache as codes_cache
from hashing.evaluation import cli as evaluate
from hashing.codes import CodeSet
from hashing.evaluation.metrics import map_at_k, ndcg_at_k


@pytest.fixture
def outputs():
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 4, 60)
    labels = np.eye(4)[classes]
    real = labels @ rng.standard_normal((4, 12)) + 0.8 * rng.standard_normal((60, 12))
    return real[:15], labels[:15], real[15:], labels[15:], classes


def save(folder, name, array):
    path = folder / f"{name}.npy"
    np.save(path, array)
    return str(path)


def run_files(folder, query, database, query_labels, database_labels, extra=()):
    argv = [save(folder, "q", query), save(folder, "d", database), "--query_labels", save(folder, "ql", query_labels),
            "--database_labels", save(folder, "dl", database_labels), "--topk", "20", *extra]
    return evaluate.cli(argv)


def test_every_input_format_gives_the_same_table(outputs, tmp_path, capsys):
    query, query_labels, database, database_labels, classes = outputs
    reference = run_files(tmp_path, query, database, query_labels, database_labels)
    assert "real-valued" in capsys.readouterr().out
    signs = (np.where(query >= 0, 1, -1), np.where(database >= 0, 1, -1))
    variants = {
        "+-1": signs,
        "{0, 1}": ((signs[0] > 0).astype(np.uint8), (signs[1] > 0).astype(np.float32)),
        "packed": (np.packbits(signs[0] > 0, axis=1), np.packbits(signs[1] > 0, axis=1)),
    }
    for name, (q, d) in variants.items():
        extra = ["--hash_bit", "12"] if name == "packed" else []
        assert run_files(tmp_path, q, d, query_labels, database_labels, extra)["rows"] == reference["rows"], name
        assert name in capsys.readouterr().out
    # class indices instead of one-hot rows
    assert run_files(tmp_path, query, database, classes[:15], classes[15:])["rows"] == reference["rows"]
    # this project's codes cache
    cache_file = tmp_path / "run.codes.npz"
    codes_cache.save(cache_file, CodeSet.from_outputs(query, query_labels, database, database_labels), {"k": 1})
    assert evaluate.cli([str(cache_file), "--topk", "20"])["rows"] == reference["rows"]


def test_table_rows_are_the_metrics_of_hashing_metrics(outputs, tmp_path):
    query, query_labels, database, database_labels, _ = outputs
    result = run_files(tmp_path, query, database, query_labels, database_labels, ["--json", str(tmp_path / "t.json"),
                                                                                  "--csv", str(tmp_path / "t.csv")])
    assert len(result["rows"]) == 18
    for row in result["rows"]:
        options = dict(normalize=row["normalize"], zero_hit=row["zero_hit"], ties=row["ties"])
        assert row["map"] == pytest.approx(map_at_k(query, query_labels, database, database_labels, 20, **options))
        assert row["ndcg"] == pytest.approx(ndcg_at_k(query, query_labels, database, database_labels, 20, **options))
    maps = [row["map"] for row in result["rows"]]
    assert result["sensitivity"]["map_range"] == pytest.approx(max(maps) - min(maps))
    assert json.loads((tmp_path / "t.json").read_text())["rows"] == result["rows"]
    with open(tmp_path / "t.csv") as handle:
        written = list(csv.DictReader(handle))
    assert [float(r["map"]) for r in written] == pytest.approx(maps)


@pytest.mark.parametrize("mistake, message", [
    ("nan", "NaN"), ("rows", "label rows"), ("width", "same width"), ("bits", "bits"), ("missing", "does not exist")])
def test_mistakes_are_one_line_errors(outputs, tmp_path, capsys, mistake, message):
    query, query_labels, database, database_labels, _ = outputs
    if mistake == "nan":
        query = query.copy()
        query[3, 2] = np.nan
    elif mistake == "rows":
        database_labels = database_labels[:-1]
    elif mistake == "width":
        database_labels = database_labels[:, :3]
    elif mistake == "bits":
        database = database[:, :10]
    with pytest.raises(SystemExit) as stopped:
        if mistake == "missing":
            evaluate.cli([str(tmp_path / "none.npy"), str(tmp_path / "none2.npy"), "--query_labels", "x",
                          "--database_labels", "y"])
        else:
            run_files(tmp_path, query, database, query_labels, database_labels)
    assert stopped.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and error.count("\n") == 1
