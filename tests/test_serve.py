"""The search API and page of a trained checkpoint (hashing/search/api.py, hashing/search/server.py): rankings equal --query's
and a brute-force loop, uploads equal the API's encoding, requests never name a file, bad uploads get a 4xx,
errors show no traceback; and the README's example runs as printed."""
import builtins
import io
import re
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

import retrieval
from data.query_images import raw_image
from hashing.search import server as serve
from hashing.search.index import HammingIndex
from tests.conftest import SEARCH_RUN
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
RUN = SEARCH_RUN


@pytest.fixture
def trained(search_service):
    return search_service


@pytest.fixture
def client(trained):
    return TestClient(serve.create_app(trained[2]), base_url="http://127.0.0.1:8000", raise_server_exceptions=False)


def brute_force(query_signs, database_signs, k):
    """(distances, ids) of the k nearest database rows by Hamming distance, ties by index: a plain loop."""
    ranked = []
    for index, row in enumerate(database_signs):
        ranked.append((int(np.sum(row != query_signs)), index))
    ranked.sort()
    return [d for d, _ in ranked[:k]], [i for _, i in ranked[:k]]


def test_a_query_ranks_as_query_and_a_brute_force_loop(trained, client):
    out, _, service = trained
    codes = service.codes
    query_signs, database_signs = codes.query_signs(), codes.database_signs()
    printed = retrieval.main(retrieval.parse_args(RUN + ["--output_dir", str(out), "--query", "digits:7", "digits:31",
                                                         "--num_matches", "12"]))["matches"]
    for number, matches in zip((7, 31), printed):
        answer = client.get(f"/api/search?query_index={number}&k=12").json()
        ids = [result["id"] for result in answer["results"]]
        distances = [result["distance"] for result in answer["results"]]
        assert (distances, ids) == brute_force(query_signs[number], database_signs, 12)
        assert ids == [match["index"] for match in matches["matches"]]
        assert distances == [match["distance"] for match in matches["matches"]]
        relevant = [bool(np.any(service.query_labels[number] & service.database_labels[i])) for i in ids]
        assert [result["relevant"] for result in answer["results"]] == relevant
        assert answer["precision_at_k"] == pytest.approx(sum(relevant) / 12)
        names = service.class_names
        assert answer["results"][0]["labels"] == [names[c] for c in np.flatnonzero(service.database_labels[ids[0]])]


def test_an_upload_ranks_as_the_api_encodes_it(trained, client):
    _, model, service = trained
    image = raw_image(service.splits.query, 5).resize((48, 48))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    answer = client.post("/api/search", files={"image": ("q.png", buffer.getvalue(), "image/png")}, data={"k": "8"})
    assert answer.status_code == 200
    decoded = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    distances, ids = HammingIndex.build(service.codes.database_bits).search(model.encode([decoded]), 8)
    assert [r["id"] for r in answer.json()["results"]] == ids[0].tolist()
    assert [r["distance"] for r in answer.json()["results"]] == distances[0].tolist()
    assert answer.json()["precision_at_k"] is None  # an upload has no labels


def test_the_run_and_the_images_are_served(trained, client):
    info = client.get("/api/run").json()
    assert (info["dataset"], info["backbone"], info["hash_bit"], info["database"]) == ("digits", "small", 16, 200)
    assert info["map"] == pytest.approx(trained[1].metrics["map"]) and info["map_name"] == "mAP@200"
    thumbnail = client.get("/images/database/3")
    assert thumbnail.status_code == 200 and Image.open(io.BytesIO(thumbnail.content)).size == (96, 96)
    page = client.get("/")
    assert page.status_code == 200 and "query-index" in page.text and page.headers["x-frame-options"] == "DENY"


def test_requests_for_paths_are_404_and_open_no_file(client, monkeypatch):
    opened = []
    real_open = builtins.open

    def recording_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recording_open)
    monkeypatch.setattr(Path, "read_bytes", lambda self: opened.append(str(self)) or b"")
    for url in ["/images/database/../../../etc/passwd", "/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
                "/images/database/%2Fetc%2Fpasswd", "/images//etc/passwd", "/images/database/-1",
                "/images/database/200", "/images/train/0", "/images/query/abc",
                "/figures/..%2F..%2Fdigits_small_16.ckpt", "/figures/%2Fetc%2Fpasswd", "/figures/topn.png",
                "/etc/passwd", "/api/search?query_index=200", "/api/search?query_index=..%2F1"]:
        response = client.get(url)
        assert response.status_code in (400, 404), url
        assert "Traceback" not in response.text
    assert opened == []


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_oversized_uploads_bombs_and_text_get_a_4xx(client):
    cases = [
        (b"\x89PNG" + b"0" * (serve.MAX_UPLOAD_BYTES + 1), 413, "more than"),
        (png_bytes(Image.new("1", (8000, 8000))), 413, "pixels"),  # 64 megapixels in a few kilobytes
        (b"just some text, not an image\n", 415, "not an image"),
    ]
    for data, status, reason in cases:
        response = client.post("/api/search", files={"image": ("upload", data, "application/octet-stream")})
        assert response.status_code == status and reason in response.json()["error"]
    assert client.post("/api/search", data={"k": "3"}).status_code == 400  # no image field
    assert client.get("/api/search?query_index=0&k=0").status_code == 400


def test_a_server_error_shows_no_traceback(trained, monkeypatch):
    def failing(*args):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(trained[2], "search_query", failing)
    response = TestClient(serve.create_app(trained[2]), base_url="http://127.0.0.1:8000",
                          raise_server_exceptions=False).get("/api/search?query_index=0")
    assert response.status_code == 500 and "secret" not in response.text and "Traceback" not in response.text


def test_a_port_in_use_is_one_line_and_the_default_host_is_local(tmp_path, capsys):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port}.*--port"):
        serve.bound_socket("127.0.0.1", port)
    taken.close()
    assert serve.get_args_parser().parse_args(["--checkpoint", "x"]).host == "127.0.0.1"
    with pytest.raises(SystemExit):
        serve.cli(["--checkpoint", str(tmp_path / "absent.ckpt"), "--host", "0.0.0.0"])
    err = capsys.readouterr().err
    assert "warning: --host 0.0.0.0" in err and "error: no checkpoint at" in err and "Traceback" not in err


def test_the_readme_example_runs_as_printed(trained, tmp_path, monkeypatch):
    out = trained[0]
    example = re.search(r"<!-- api-example -->\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert len(example.strip().splitlines()) <= 12
    (tmp_path / "result").mkdir()
    for suffix in (".ckpt", ".jsonl", ".metrics.json", ".codes.npz"):
        (tmp_path / "result" / f"digits_small_48{suffix}").write_bytes((out / f"digits_small_16{suffix}").read_bytes())
    monkeypatch.chdir(tmp_path)  # a fresh clone: no image of the user's, only the run's files in result/
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["ids"].shape == (3, 5) and (tmp_path / "result" / "digits.index").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["result"]  # writes only under the gitignored result/
    assert "/result/*" in (ROOT / ".gitignore").read_text().splitlines()
    assert namespace["ids"].tolist() == trained[2].index.search(trained[2].codes.query_bits[:3], 5)[1].tolist()


def test_the_api_reads_the_data_options_as_the_run_did(trained):
    from data.base import DataOptions
    from session.parts import data_options
    model = trained[1]
    flags = retrieval.parse_args(RUN + ["--cache", "--cache_dir", "/elsewhere", "--strict_images"])
    model_of_that_run = type(model)(**{**vars(model), "run": vars(flags)})
    assert DataOptions.from_flags(model_of_that_run.data_settings()) == data_options(flags)
    assert data_options(flags).cache_dir == "/elsewhere" and data_options(flags).strict_images
