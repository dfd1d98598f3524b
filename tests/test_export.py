"""python -m hashing.export (hashing/search/export.py) with a tiny trained digits run and Milvus Lite in a temporary
folder: the collection holds the run's database codes, labels and ids; an interrupted export resumed leaves no
duplicate and no gap; another checkpoint's collection is refused; --verify against a brute-force loop, also with a
deliberately truncated engine answer; the FAISS file; an image folder."""
import os
import shutil

import numpy as np
import pytest
import torch

from hashing.search import export
from tests.fixture_files import write_image

milvus = pytest.importorskip("hashing.search.milvus")
if not milvus.pymilvus_available():
    pytest.skip("pymilvus and milvus-lite are not installed (pip install -r requirements.txt)", allow_module_level=True)


@pytest.fixture(scope="module")
def run(search_service, tmp_path_factory):
    """(checkpoint, service, Milvus Lite file) shared by the module (one engine)."""
    out, _, service = search_service
    return out / "digits_small_16.ckpt", service, str(tmp_path_factory.mktemp("export") / "codes.db")


def export_args(checkpoint, *extra):
    return export.get_args_parser().parse_args(["--checkpoint", str(checkpoint), "--device", "cpu", *extra])


def held_rows(uri, collection, rows):
    with milvus.MilvusBackend(uri=uri, collection=collection) as backend:
        return len(backend), backend.fetch(range(rows + 50))


def test_the_collection_holds_the_runs_database_codes_and_labels(run):
    checkpoint, service, uri = run
    report = export.main(export_args(checkpoint, "--uri", uri, "--batch_size", "64"))
    database = service.codes.database_bits
    count, rows = held_rows(uri, "hyp2_digits_small_16", len(database))
    assert report["written"] == count == len(rows) == len(database) and sorted(rows) == list(range(len(database)))
    np.testing.assert_array_equal(np.stack([rows[i][0] for i in range(len(database))]), database)
    labels = service.codes.database_label_matrix()
    assert [rows[i][1] for i in range(len(database))] == [",".join(map(str, np.flatnonzero(r))) for r in labels]
    again = export.main(export_args(checkpoint, "--uri", uri))
    assert again["written"] == 0 and again["rows"] == len(database)


class Interrupted(Exception):
    pass


def test_an_interrupted_export_resumes_without_duplicate_or_gap(run, monkeypatch, tmp_path):
    checkpoint, service, _ = run
    uri, database = str(tmp_path / "resume.db"), service.codes.database_bits
    real_add, calls = milvus.MilvusBackend.add, []

    def failing_add(self, codes, ids, labels=None, paths=None):
        calls.append(ids[0])
        if len(calls) == 3:  # a batch half written, its second half only: a gap before it
            real_add(self, codes[16:], ids[16:], labels[16:], paths[16:])
            raise Interrupted
        real_add(self, codes, ids, labels, paths)

    monkeypatch.setattr(milvus.MilvusBackend, "add", failing_add)
    with pytest.raises(Interrupted):
        export.main(export_args(checkpoint, "--uri", uri, "--batch_size", "32"))
    count, _ = held_rows(uri, "hyp2_digits_small_16", len(database))
    assert count == 64 + 16
    monkeypatch.setattr(milvus.MilvusBackend, "add", real_add)
    report = export.main(export_args(checkpoint, "--uri", uri, "--batch_size", "32"))
    assert report["resumed_at"] == 64 and report["written"] == len(database) - 64
    count, rows = held_rows(uri, "hyp2_digits_small_16", len(database))
    assert count == len(database) and sorted(rows) == list(range(len(database)))
    np.testing.assert_array_equal(np.stack([rows[i][0] for i in range(len(database))]), database)


def other_checkpoint(checkpoint, folder):
    """A copy of the run with one weight changed: another checkpoint of the same network."""
    for path in checkpoint.parent.glob(checkpoint.stem + ".*"):
        if path.suffix in (".jsonl", ".json"):
            shutil.copy(path, folder / path.name)
    weights = torch.load(checkpoint, weights_only=True)
    first = next(name for name, tensor in weights.items() if tensor.is_floating_point())
    weights[first] = weights[first] + 0.5
    torch.save(weights, folder / checkpoint.name)
    return folder / checkpoint.name


def test_another_checkpoints_collection_is_refused(run, tmp_path, capsys):
    checkpoint, _, uri = run
    export.main(export_args(checkpoint, "--uri", uri))
    with pytest.raises(SystemExit) as stopped:
        export.cli(["--checkpoint", str(other_checkpoint(checkpoint, tmp_path)), "--uri", uri, "--device", "cpu"])
    assert stopped.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "holds the codes of another checkpoint_sha256" in error[0]


def brute_force_average_precisions(codes, rankings):
    """AP (hits normalization) of each query's ranking, by a plain loop."""
    query_labels, database_labels = codes.query_label_matrix(), codes.database_label_matrix()
    values = []
    for q, ranking in enumerate(rankings):
        hits, precision_sum = 0, 0.0
        for rank, item in enumerate(ranking, start=1):
            if item >= 0 and (query_labels[q] & database_labels[item]).any():
                hits += 1
                precision_sum += hits / rank
        values.append(precision_sum / hits if hits else 0.0)
    return np.array(values)


def exact_rankings(codes, k):
    signs_q, signs_d = codes.query_signs(), codes.database_signs()
    return [[i for _, i in sorted((int((row != q).sum()), i) for i, row in enumerate(signs_d))[:k]] for q in signs_q]


def test_verify_agrees_with_a_brute_force_loop_and_sees_a_truncated_answer(run, monkeypatch, capsys):
    checkpoint, service, uri = run
    export.main(export_args(checkpoint, "--uri", uri))
    codes, k = service.codes, 20
    report = export.main(export_args(checkpoint, "--uri", uri, "--verify", "--k", str(k)))
    assert report["recall_by_distance_level"] == 1 and report["queries_short"] == 0
    assert report["map_evaluator"] == pytest.approx(brute_force_average_precisions(codes, exact_rankings(codes, k))
                                                    .mean())
    assert "up to the order of tied codes" in capsys.readouterr().out
    real_search = milvus.MilvusBackend.search_raw

    def truncated(self, queries, k):
        distances, ids = real_search(self, queries, k)
        ids[:, -1] = -1
        return distances, ids

    monkeypatch.setattr(milvus.MilvusBackend, "search_raw", truncated)
    short = export.main(export_args(checkpoint, "--uri", uri, "--verify", "--k", str(k)))
    assert short["recall_by_distance_level"] == pytest.approx((k - 1) / k)
    assert short["queries_short"] == len(codes.query_bits)
    with milvus.MilvusBackend(uri=uri, collection="hyp2_digits_small_16") as backend:
        rankings = real_search(backend, codes.query_bits, k)[1][:, :-1]
    assert short["map_engine"] == pytest.approx(brute_force_average_precisions(codes, rankings).mean())
    assert "misses true neighbours" in capsys.readouterr().out


def test_the_faiss_file_holds_the_database_codes(run, tmp_path):
    faiss = pytest.importorskip("faiss")
    checkpoint, service, _ = run
    export.main(export_args(checkpoint, "--to", "faiss", "--output", str(tmp_path / "codes.faiss")))
    index = faiss.read_index_binary(str(tmp_path / "codes.faiss"))
    stored = faiss.vector_to_array(index.xb).reshape(index.ntotal, -1)
    np.testing.assert_array_equal(stored, service.codes.database_bits)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(export.UserError, match="notes.txt"):
        export.main(export_args(checkpoint, "--to", "faiss", "--output", str(tmp_path / "notes.txt")))
    with pytest.raises(export.UserError, match="is also the checkpoint"):
        export.main(export_args(checkpoint, "--to", "faiss", "--output", str(checkpoint)))
    os.mkfifo(tmp_path / "pipe.faiss")
    with pytest.raises(export.UserError, match="is a FIFO"):
        export.main(export_args(checkpoint, "--to", "faiss", "--output", str(tmp_path / "pipe.faiss")))


def test_an_image_folder_is_exported_with_its_paths(run, tmp_path):
    checkpoint, service, _ = run
    rng = np.random.default_rng(0)
    paths = [tmp_path / "images" / f"{name}.png" for name in ("b", "a", "sub/c")]
    for path in paths:
        write_image(path, rng)
    uri = str(tmp_path / "images.db")
    export.main(export_args(checkpoint, "--uri", uri, "--images", str(tmp_path / "images"), "--workers", "0",
                            "--collection", "photos"))
    _, rows = held_rows(uri, "photos", 3)
    ordered = sorted(str(path) for path in paths)
    assert [rows[i][2] for i in range(3)] == ordered
    np.testing.assert_array_equal(np.stack([rows[i][0] for i in range(3)]), service.model.encode(ordered))


def test_flag_mistakes_are_one_line(run, capsys):
    checkpoint, _, _ = run
    for argv, message in ((["--to", "milvus"], "need --uri"), (["--verify", "--uri", "x.db", "--images", "."],
                                                                "not with --images")):
        with pytest.raises(SystemExit) as stopped:
            export.cli(["--checkpoint", str(checkpoint), *argv])
        assert stopped.value.code == 1 and message in capsys.readouterr().err


def test_the_search_page_on_the_collection_answers_as_on_the_exact_index(run):
    from starlette.testclient import TestClient

    from hashing.search import server as serve
    checkpoint, service, uri = run
    export.main(export_args(checkpoint, "--uri", uri))
    args = serve.get_args_parser().parse_args(["--checkpoint", str(checkpoint), "--index", f"milvus:{uri}"])
    index = serve.open_index(service.model, args)
    on_milvus = serve.SearchService.for_model(service.model, index=index)
    clients = [TestClient(serve.create_app(s), base_url="http://127.0.0.1:8000") for s in (service, on_milvus)]
    for query, k in ((0, 10), (7, 50), (31, 200)):
        exact, engine = (client.get(f"/api/search?query_index={query}&k={k}").json() for client in clients)
        assert engine == exact and len(engine["results"]) == k
    index.close()
    with pytest.raises(SystemExit):
        serve.get_args_parser().parse_args(["--checkpoint", str(checkpoint), "--index", "elastic:x"])


def test_the_search_page_refuses_a_collection_it_cannot_search_in_one_line(run, tmp_path, capsys):
    from hashing.search import server as serve
    checkpoint, _, _ = run
    for uri, message in ((tmp_path / "empty.db", "has no collection hyp2_digits_small_16"),
                         (tmp_path / "codes.txt", "ending in .db")):
        with pytest.raises(SystemExit) as stopped:
            serve.cli(["--checkpoint", str(checkpoint), "--index", f"milvus:{uri}", "--port", "0"])
        error = capsys.readouterr().err.strip().splitlines()
        assert stopped.value.code == 1 and len(error) == 1 and message in error[0]
