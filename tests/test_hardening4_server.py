"""Hardening round 4 (issue 30), the search server as a public-facing service, over real HTTP on 127.0.0.1: images
decoded only from the project's formats through one function, no blocking and no waiting forever (slow clients,
idle sockets, concurrent heavy uploads with a latency bound for the other requests), only this machine's pages
answered (Host, Origin, symlinked figures), what the page shows is what the run's files say now, and the search
API's and the CLI's smaller promises (ports, k, labels of a query, a documented exception for a missing image)."""
import asyncio
import dataclasses
import http.client
import io
import json
import os
import re
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from PIL import EpsImagePlugin, Image
from torch.utils.data import Subset

import retrieval
from data.base import RetrievalSplits, UnreadableImage, split_labels
from data.files import ImageFileDataset, read_rgb
from data.query_images import raw_image, read_query_image
from hashing.search import server as serve
from hashing.search.index import HammingIndex
from hashing.search.exact import MAX_K
from tests.conftest import SEARCH_RUN
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def start_server(app):
    """(base URL, server) of `app` served by uvicorn as hashing.serve serves it, in a thread."""
    sock = serve.bound_socket("127.0.0.1", 0)
    server = uvicorn.Server(serve.server_config(app))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    return sock.getsockname()[1], server, thread


@pytest.fixture(scope="module")
def served(search_service):
    """(port, SearchService) of the search server over the shared tiny digits run."""
    port, server, thread = start_server(serve.create_app(search_service[2]))
    yield port, search_service[2]
    server.should_exit = True
    thread.join(timeout=10)


def request(port, method, path, body=None, headers=None, timeout=30):
    """(status, headers, body bytes) of one HTTP request to 127.0.0.1:port."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def multipart(data, filename="photo.jpg", k=None):
    """(body, headers) of a form posting `data` as the field 'image' (and k)."""
    boundary = "h4boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
             "Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n"]
    if k is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{k}\r\n'.encode())
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def post_image(port, data, k=None, headers=None, filename="photo.jpg"):
    body, form_headers = multipart(data, filename, k)
    status, _, answer = request(port, "POST", "/api/search", body, {**form_headers, **(headers or {})})
    return status, answer


def encoded(image, fmt, **options):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


# 1. Images are decoded only from the formats the project needs, through one function.

@pytest.fixture
def eps_opened(monkeypatch):
    """The EPS files Pillow began to parse (before Ghostscript would run on them)."""
    opened = []
    real_open = EpsImagePlugin.EpsImageFile._open
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(1) or real_open(self))
    return opened


def test_only_the_projects_image_formats_are_decoded_anywhere(served, search_service, tmp_path, eps_opened):
    port, _ = served
    picture = Image.new("RGB", (24, 24), "orange")
    others = {"eps": encoded(picture, "EPS"), "ppm": encoded(picture, "PPM"), "tga": encoded(picture, "TGA"),
              "pcx": encoded(picture, "PCX")}
    for name, data in others.items():
        status, answer = post_image(port, data, filename="photo.jpg")
        assert status == 415 and "JPEG, PNG, WebP, BMP, GIF or TIFF" in answer.decode(), name
        (tmp_path / f"x.{name}").write_bytes(data)
        with pytest.raises(UnreadableImage, match=r"\(not a JPEG, PNG, WebP, BMP, GIF or TIFF image\)"):
            read_query_image(tmp_path / f"x.{name}")  # --query
        with pytest.raises(UnreadableImage, match=r"\(not a JPEG"):
            read_rgb(tmp_path / f"x.{name}")  # the data sets' loader
    out = search_service[0]
    with pytest.raises(UserError, match=r"x.eps \(not a JPEG"):
        retrieval.main(retrieval.parse_args(SEARCH_RUN + ["--output_dir", str(out), "--query",
                                                          str(tmp_path / "x.eps")]))
    assert eps_opened == []  # Pillow never parsed the EPS, so it could never have run Ghostscript on it
    for fmt in ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"):
        status, answer = post_image(port, encoded(picture, fmt), k=3)
        assert status == 200 and len(json.loads(answer)["results"]) == 3, fmt


def test_a_16_bit_grey_upload_is_scaled_as_query_reads_it(served, search_service, tmp_path):
    port, service = served
    values = np.linspace(0, 65535, 48 * 48).round().astype(np.uint16).reshape(48, 48)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    expected_grey = np.rint(values / 65535 * 255).astype(np.uint8)  # full scale 65535 -> 255
    assert (np.asarray(read_query_image(path))[..., 0] == expected_grey).all()
    assert (np.asarray(serve.uploaded_image(path.read_bytes()))[..., 0] == expected_grey).all()
    status, answer = post_image(port, path.read_bytes(), k=20)
    expected = Image.fromarray(expected_grey).convert("RGB")
    distances, ids = HammingIndex.build(service.codes.database_bits).search(search_service[1].encode([expected]), 20)
    results = json.loads(answer)["results"]
    assert status == 200 and [r["id"] for r in results] == ids[0].tolist()
    assert [r["distance"] for r in results] == distances[0].tolist()
    model = search_service[1]
    assert (model.encode([Image.open(path)]) == model.encode([expected])).all()  # a PIL image given to the API


# 2. The server never blocks and never waits forever.

def heavy_png(side):
    """A PNG of a few hundred KB that declares side x side 16-bit RGBA pixels (all zero): slow to decode."""
    row = b"\0" + bytes(side * 8)
    compressor = zlib.compressobj(6)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 16, 6, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_heavy_uploads_do_not_delay_other_requests(served):
    port, _ = served
    data = heavy_png(4000)  # 16 megapixels, within MAX_UPLOAD_PIXELS: it is decoded, slowly
    assert len(data) < 400_000
    stop, statuses = time.monotonic() + 8, []

    def uploader():
        while time.monotonic() < stop:
            statuses.append(post_image(port, data, k=3)[0])

    clients = [threading.Thread(target=uploader) for _ in range(2)]
    for client in clients:
        client.start()
    time.sleep(0.5)
    latencies = []
    while time.monotonic() < stop - 1:
        started = time.monotonic()
        assert request(port, "GET", "/api/search?query_index=1&k=5")[0] == 200
        latencies.append(time.monotonic() - started)
        time.sleep(0.02)
    for client in clients:
        client.join()
    assert statuses and set(statuses) == {200}
    latencies.sort()
    # One decode of this image takes about a second here: on the event loop, every other request waited for it.
    assert latencies[len(latencies) // 2] < 0.15 and latencies[int(len(latencies) * 0.9)] < 0.5, latencies


def test_a_connection_that_sends_no_headers_or_no_body_is_closed(served, monkeypatch):
    port, _ = served
    monkeypatch.setattr(serve, "HEADER_TIMEOUT", 0.5)
    monkeypatch.setattr(serve, "BODY_TIMEOUT", 0.5)
    silent, partial, slow_body = (socket.create_connection(("127.0.0.1", port)) for _ in range(3))
    partial.sendall(b"GET /api/run HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never finished
    body, headers = multipart(b"x" * 1000)
    slow_body.sendall(f"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
                      f"Content-Type: {headers['Content-Type']}\r\n\r\n".encode() + body[:100])
    for sock in (silent, partial, slow_body):
        sock.settimeout(5)
    started = time.monotonic()
    assert silent.recv(100) == b"" and partial.recv(100) == b""  # closed by the server
    assert time.monotonic() - started < 3
    answer = b""
    while b"took more than" not in answer and (chunk := slow_body.recv(1000)):  # headers and body may come apart
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"took more than" in answer
    for sock in (silent, partial, slow_body):
        sock.close()


def test_uploads_in_flight_are_capped_and_spool_no_more_than_the_cap(served, monkeypatch, tmp_path):
    port, _ = served
    monkeypatch.setattr(serve, "BODY_TIMEOUT", 8.0)
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(spool))  # where the form parser spools an upload
    body, headers = multipart(os.urandom(9 << 20))
    head = (f"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: {headers['Content-Type']}\r\n\r\n").encode()
    unfinished, busy = [], []
    for _ in range(serve.MAX_UPLOADS + 3):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(head)
        sock.settimeout(0.5)
        try:
            busy.append(read_answer(sock))
            sock.close()
        except socket.timeout:  # taken: send all but the last kilobyte, an unfinished upload
            sock.sendall(body[:len(body) - 1000])
            unfinished.append(sock)
    time.sleep(1)
    spooled = spooled_bytes(spool)
    assert 0 < spooled <= serve.MAX_UPLOADS * serve.MAX_BODY_BYTES
    assert len(unfinished) == serve.MAX_UPLOADS and len(busy) == 3
    assert all(answer.startswith(b"HTTP/1.1 503") and b"busy" in answer for answer in busy), busy
    for sock in unfinished:
        sock.settimeout(15)
        assert read_answer(sock).startswith(b"HTTP/1.1 408")
        sock.close()
    assert request(port, "GET", "/api/run")[0] == 200


def read_answer(sock):
    """What the server sends on `sock` until it closes the connection."""
    answer = sock.recv(4000)
    sock.settimeout(5)
    while answer and not answer.endswith(b"}"):
        more = sock.recv(4000)
        if not more:
            break
        answer += more
    return answer


def spooled_bytes(folder):
    """The bytes in files under `folder` that this process holds open (spooled uploads are unlinked at once)."""
    total = 0
    for descriptor in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{descriptor}").startswith(str(folder)):
                total += os.stat(f"/proc/self/fd/{descriptor}").st_size
        except OSError:
            pass
    return total


def test_oversized_bodies_are_refused_while_they_stream(served):
    port, _ = served
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(10)
    sock.sendall(f"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {serve.MAX_BODY_BYTES + 1}\r\n"
                 "Content-Type: multipart/form-data; boundary=x\r\n\r\n".encode())
    assert read_answer(sock).startswith(b"HTTP/1.1 413")
    sock.close()
    # A body that says nothing of its length is counted as it arrives.
    guarded = serve.capped_body(chunks_of(serve.MAX_BODY_BYTES + 10, 1 << 20))

    async def drain():
        while (await guarded()).get("more_body"):
            pass

    with pytest.raises(serve.ClientError, match="more than"):
        asyncio.run(drain())


def chunks_of(total, size):
    sent = 0

    async def receive():
        nonlocal sent
        sent += size
        return {"type": "http.request", "body": b"\0" * size, "more_body": sent < total}

    return receive


def test_idle_sockets_cannot_lock_others_out(search_service, tmp_path):
    """300 idle sockets against a server limited to 256 file descriptors (ulimit -n 256); --port 0 prints the port
    the server got."""
    checkpoint = search_service[0] / "digits_small_16.ckpt"
    server = subprocess.Popen([sys.executable, "-m", "hashing.serve", "--checkpoint", str(checkpoint), "--port", "0",
                               "--device", "cpu"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)))
    idle = []
    try:
        match = None
        while match is None and (line := server.stdout.readline()):  # the address line, after any note
            match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, f"the server printed no address: {server.stderr.read()}"
        port = int(match.group(1))
        assert port != 0
        assert request(port, "GET", "/api/run")[0] == 200
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", port)))
        started = time.monotonic()
        status, _, body = request(port, "GET", "/api/run", timeout=10)
        assert status == 200 and b"digits" in body and time.monotonic() - started < 5
    finally:
        for sock in idle:
            sock.close()
        server.terminate()
        server.wait(timeout=20)
    assert "Traceback" not in server.stderr.read()


# 3. Only this machine's pages talk to it.

def test_foreign_hosts_and_origins_are_refused(served):
    port, service = served
    status, _, body = request(port, "GET", "/api/run", headers={"Host": "evil.example"})
    assert status == 421 and str(service.model.checkpoint).encode() not in body
    assert request(port, "GET", "/api/run", headers={"Host": f"evil.example:{port}"})[0] == 421
    for host in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", f"LOCALHOST:{port}"):
        assert request(port, "GET", "/api/run", headers={"Host": host})[0] == 200, host
    image = encoded(Image.new("RGB", (32, 32), "grey"), "PNG")
    assert post_image(port, image, headers={"Origin": "http://evil.example"})[0] == 403
    assert post_image(port, image, headers={"Origin": f"http://localhost:{port}"})[0] == 403  # not this Host
    assert post_image(port, image, headers={"Sec-Fetch-Site": "cross-site"})[0] == 403
    assert post_image(port, image, headers={"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"})[0] \
        == 200
    assert post_image(port, image)[0] == 200  # a program on this machine (curl) sends no Origin


def test_figures_are_regular_files_of_the_run_under_a_cap(search_service, tmp_path, monkeypatch):
    _, model, service = search_service
    secret = tmp_path / "secret.txt"
    secret.write_text("not a figure")
    run = tmp_path / "run"
    run.mkdir()
    own = dataclasses.replace(service, model=dataclasses.replace(model, checkpoint=run / "digits_small_16.ckpt"))
    (run / "digits_small_16.topn.png").symlink_to(secret)
    (run / "digits_small_16.pr.png").write_bytes(b"\x89PNG" + bytes(2000))
    (run / "digits_small_16.convergence.png").write_bytes(b"\x89PNG first")
    monkeypatch.setattr(serve, "MAX_FIGURE_BYTES", 1000)
    port, server, thread = start_server(serve.create_app(own))
    try:
        assert request(port, "GET", "/figures/topn")[0] == 404
        assert request(port, "GET", "/figures/pr")[0] == 404  # over the cap
        assert request(port, "GET", "/figures/convergence")[2] == b"\x89PNG first"
        (run / "digits_small_16.convergence.png").write_bytes(b"\x89PNG redrawn")
        assert request(port, "GET", "/figures/convergence")[2] == b"\x89PNG redrawn"  # what the file says now
        assert json.loads(request(port, "GET", "/api/run")[2])["figures"] == ["convergence"]
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# 4. What the page shows is what the run's files say now.

def test_the_codes_cache_is_reused_only_for_the_splits_as_they_are(search_service):
    _, model, service = search_service
    splits = service.splits
    assert model.cached_codes(splits) is not None  # the run's own splits: its cache
    reordered = Subset(splits.database, list(range(len(splits.database)))[::-1])  # as an edited database list
    edited = RetrievalSplits(splits.train, splits.query, reordered)
    assert model.cached_codes(edited) is None
    codes = model.split_codes(edited)
    assert (codes.database_label_matrix() == split_labels(reordered).numpy()).all()
    assert (codes.database_bits == service.codes.database_bits[::-1]).all()


def test_a_missing_database_image_is_a_json_404(search_service, tmp_path):
    _, model, service = search_service
    paths = []
    for index in range(len(service.splits.database)):
        paths.append(tmp_path / f"{index}.png")
        raw_image(service.splits.database, index).save(paths[-1])
    labels = split_labels(service.splits.database).numpy()
    files = ImageFileDataset(paths, labels, transform=None)
    own = dataclasses.replace(service, splits=RetrievalSplits(None, service.splits.query, files))
    paths[7].unlink()
    port, server, thread = start_server(serve.create_app(own))
    try:
        assert request(port, "GET", "/images/database/6")[0] == 200
        status, headers, body = request(port, "GET", "/images/database/7")
        assert status == 404 and headers["content-type"] == "application/json"
        assert json.loads(body)["error"] == "database image 7 cannot be read"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_ports_are_checked_and_k_is_capped_everywhere(served, capsys):
    port, _ = served
    for bad in ("70000", "-1", "http"):
        with pytest.raises(SystemExit):
            serve.get_args_parser().parse_args(["--checkpoint", "x", "--port", bad])
        err = capsys.readouterr().err
        assert "--port: must be an integer from 0 to 65535" in err and len(err.strip().splitlines()[-1]) < 200
    with pytest.raises(SystemExit):
        serve.get_args_parser().parse_args(["--checkpoint", "x", "--k", str(MAX_K + 1)])
    with pytest.raises(SystemExit):
        retrieval.parse_args(SEARCH_RUN + ["--num_matches", str(MAX_K + 1)])
    assert "--num_matches: must be an integer from 1 to 1000" in capsys.readouterr().err
    assert request(port, "GET", f"/api/search?query_index=0&k={MAX_K + 1}")[0] == 400
    assert post_image(port, encoded(Image.new("RGB", (8, 8)), "PNG"), k=MAX_K + 1)[0] == 400
    assert f'max="{MAX_K}"' in request(port, "GET", "/")[2].decode()


# 11. --query prints the query's own labels; the API's documented exception.

def test_query_prints_the_labels_of_a_dataset_item(search_service, capsys):
    out, _, service = search_service
    result = retrieval.main(retrieval.parse_args(SEARCH_RUN + ["--output_dir", str(out), "--query", "digits:7"]))
    own = np.flatnonzero(service.query_labels[7]).tolist()
    assert result["matches"][0]["labels"] == own
    assert f"digits:7 (labels {','.join(map(str, own))}): " in capsys.readouterr().out


def test_a_missing_image_is_the_apis_documented_exception(search_service, tmp_path):
    from hashing.search import api
    model = search_service[1]
    with pytest.raises(api.UnreadableImage, match="absent.jpg does not exist"):
        model.encode([str(tmp_path / "absent.jpg")])
    assert issubclass(api.UnreadableImage, api.UserError) and "UnreadableImage" in api.__doc__


def test_host_names_are_read_as_a_browser_sends_them():
    assert [serve.host_name(h) for h in ("127.0.0.1:8000", "LocalHost", "[::1]:8000", "[::1]", "evil.example:80",
                                         "127.0.0.1.evil.example", "[::1")] == \
        ["127.0.0.1", "localhost", "::1", "::1", "evil.example", "127.0.0.1.evil.example", ""]
    assert set(serve.LOCAL_NAMES) <= set(serve.listening_names("0.0.0.0"))
    assert socket.gethostname().lower() in serve.listening_names("0.0.0.0")
    assert serve.listening_names("127.0.0.1") == tuple(sorted(serve.LOCAL_NAMES))
    assert "192.168.1.5" in serve.listening_names("192.168.1.5")
