"""python -m data.download against a local HTTP server on 127.0.0.1 (never another host): a complete fetch and
unpack, a resume after a cut connection, a wrong checksum refused and removed, a 404 as one line."""
import hashlib
import http.server
import io
import pickle
import re
import tarfile
import threading
import zipfile

import numpy as np
import pytest

from data import coco, download
from data.archives import Archive
from tests.cli_runs import exit_status
from tests.fixture_files import shipped_coco_rows, write_coco_annotations


class Files(http.server.BaseHTTPRequestHandler):
    """GET /NAME of `served` ({name: bytes}), honouring "Range: bytes=N-"; a name in `cut` ({name: n}) sends only
    its first n bytes the first time (the full length announced), then closes the connection."""
    served, cut, requests = {}, {}, []

    def do_GET(self):
        name = self.path.lstrip("/")
        self.requests.append((name, self.headers.get("Range")))
        if name not in self.served:
            self.send_error(404, "Not Found")
            return
        body = self.served[name]
        start = int(re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "bytes=0-")).group(1))
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        limit = self.cut.pop(name, None)
        self.wfile.write(body[start:limit] if limit is not None else body[start:])
        if limit is not None:
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    Files.served, Files.cut, Files.requests = {}, {}, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def cifar_archive():
    """cifar-10-python.tar.gz of six tiny batches in the python format."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in cifar_batches():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def cifar_batches():
    rng = np.random.default_rng(0)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        batch = {b"labels": list(range(10)) * 2, b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8)}
        yield name, pickle.dumps(batch)


def serve_as(monkeypatch, name, server, files, unpack=None):
    """SOURCES[name] pointed at the local server, serving `files` ({file name: bytes}) with their md5s."""
    Files.served.update(files)
    archives = tuple(Archive(file_name, hashlib.md5(data).hexdigest(), f"{server}/{file_name}")
                     for file_name, data in files.items())
    monkeypatch.setitem(download.SOURCES, name, download.Fetchable(archives, unpack or download.SOURCES[name].unpack))
    return archives


def test_cifar10_is_downloaded_checked_and_extracted(tmp_path, server, monkeypatch, capsys):
    data = cifar_archive()
    serve_as(monkeypatch, "cifar10", server, {"cifar-10-python.tar.gz": data})
    code, out, _ = exit_status(download.main, ["cifar10", "--data_root", str(tmp_path)], capsys)
    assert code == 0 and f"cifar10: ready in {tmp_path / 'cifar-10-batches-py'}" in out
    assert (tmp_path / "cifar-10-python.tar.gz").read_bytes() == data
    assert sorted(path.name for path in (tmp_path / "cifar-10-batches-py").iterdir()) == sorted(
        name for name, _ in cifar_batches())
    assert not list(tmp_path.glob("*.part"))
    code, out, _ = exit_status(download.main, ["cifar10", "--data_root", str(tmp_path)], capsys)
    assert code == 0 and "is already there (md5 checked)" in out and len(Files.requests) == 1


def test_a_cut_connection_is_resumed_from_where_it_stopped(tmp_path, server, monkeypatch, capsys):
    data = cifar_archive()
    serve_as(monkeypatch, "cifar10", server, {"cifar-10-python.tar.gz": data})
    Files.cut["cifar-10-python.tar.gz"] = len(data) // 3
    code, _, _ = exit_status(download.main, ["cifar10", "--data_root", str(tmp_path)], capsys)
    assert code == 0 and (tmp_path / "cifar-10-python.tar.gz").read_bytes() == data
    assert Files.requests == [("cifar-10-python.tar.gz", None), ("cifar-10-python.tar.gz", f"bytes={len(data) // 3}-")]


def test_a_partial_file_left_by_an_earlier_run_is_resumed(tmp_path, server, monkeypatch, capsys):
    data = b"0123456789" * 1000
    serve_as(monkeypatch, "coco", server, {"blob.bin": data}, unpack=lambda root, archives: root)
    (tmp_path / "blob.bin.part").write_bytes(data[:2500])
    code, _, _ = exit_status(download.main, ["coco", "--data_root", str(tmp_path)], capsys)
    assert code == 0 and (tmp_path / "blob.bin").read_bytes() == data
    assert Files.requests == [("blob.bin", "bytes=2500-")]


def test_a_wrong_checksum_is_refused_and_the_file_removed(tmp_path, server, monkeypatch, capsys):
    Files.served["cifar-10-python.tar.gz"] = b"not the archive"
    monkeypatch.setitem(download.SOURCES, "cifar10", download.Fetchable(
        (Archive("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", f"{server}/cifar-10-python.tar.gz"),),
        download.SOURCES["cifar10"].unpack))
    code, _, err = exit_status(download.main, ["cifar10", "--data_root", str(tmp_path)], capsys)
    assert code == 1 and err.count("\n") == 1
    assert "arrived with another md5 than the published c58f30108f718f92721af3b95e74349a: removed it" in err
    assert list(tmp_path.iterdir()) == []


def test_a_404_is_one_line(tmp_path, server, monkeypatch, capsys):
    monkeypatch.setitem(download.SOURCES, "voc2007", download.Fetchable(
        (Archive("VOCtest_06-Nov-2007.tar", "b6e924de25625d8de591ea690078ad9f", f"{server}/gone.tar"),),
        download.SOURCES["voc2007"].unpack))
    code, _, err = exit_status(download.main, ["voc2007", "--data_root", str(tmp_path)], capsys)
    assert code == 1 and err == f"error: cannot download {server}/gone.tar: HTTP 404 Not Found\n"
    assert list(tmp_path.iterdir()) == []


def test_a_fifo_in_place_of_the_archive_is_refused_without_blocking(tmp_path, monkeypatch, capsys):
    import os
    os.mkfifo(tmp_path / "cifar-10-python.tar.gz")  # hashing it would wait for a writer forever
    monkeypatch.setitem(download.SOURCES, "cifar10", download.Fetchable(
        (Archive("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "http://127.0.0.1:9/unused"),),
        download.SOURCES["cifar10"].unpack))
    code, _, err = exit_status(download.main, ["cifar10", "--data_root", str(tmp_path)], capsys)
    assert code == 1 and err.count("\n") == 1 and "is a FIFO" in err


def zipped(members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_coco_images_and_annotations_are_unpacked_and_labels_built(tmp_path, server, monkeypatch, capsys):
    rows = shipped_coco_rows("hashnet", "deephash")
    annotations = write_coco_annotations(tmp_path / "made", rows)
    serve_as(monkeypatch, "coco", server, {
        "train2014.zip": zipped({"train2014/COCO_train2014_000000000009.jpg": b"jpeg"}),
        "val2014.zip": zipped({"val2014/COCO_val2014_000000000042.jpg": b"jpeg"}),
        "annotations_trainval2014.zip": zipped({f"annotations/{path.name}": path.read_bytes()
                                                for path in annotations.iterdir()})})
    monkeypatch.setattr(coco, "LABELLED_IMAGES", len(rows))
    root = tmp_path / "root"
    code, out, _ = exit_status(download.main, ["coco", "--data_root", str(root)], capsys)
    assert code == 0 and f"coco: ready in {root / 'coco'}" in out
    assert (root / "coco" / "train2014" / "COCO_train2014_000000000009.jpg").read_bytes() == b"jpeg"
    assert (root / "coco" / "val2014" / "COCO_val2014_000000000042.jpg").is_file()
    assert (root / "coco" / "labels.txt").read_text().count("\n") == len(rows)
    assert sorted(path.name for path in (root / "coco").iterdir()) == ["annotations", "labels.txt", "train2014",
                                                                        "val2014"]


@pytest.mark.parametrize("name, says", [("nuswide", "DATA_ROOT/nus_wide/images/NAME.jpg"),
                                        ("flickr", "DATA_ROOT/flickr25k/mirflickr/im1.jpg")])
def test_what_cannot_be_fetched_says_what_to_get(name, says, tmp_path, capsys):
    code, _, err = exit_status(download.main, [name, "--data_root", str(tmp_path)], capsys)
    assert code == 1 and says in err and err.count("\n") == 1


def test_fashion_mnist_is_torchvision_s_own_download(tmp_path, monkeypatch, capsys):
    import torchvision.datasets
    calls = []
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", lambda root, train, download: calls.append(
        (root, train, download)))
    code, out, _ = exit_status(download.main, ["fashion_mnist", "--data_root", str(tmp_path)], capsys)
    assert code == 0 and calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]


def test_each_archive_is_hashed_once_per_process(tmp_path, server, monkeypatch, capsys):
    from data import archives
    data = cifar_archive()
    serve_as(monkeypatch, "cifar10", server, {"cifar-10-python.tar.gz": data})
    monkeypatch.setattr(archives, "_verified", {})
    hashed = []
    md5_of = archives.md5_of
    monkeypatch.setattr(archives, "md5_of", lambda path: hashed.append(path) or md5_of(path))
    code, _, _ = exit_status(download.main, ["cifar10", "--data_root", str(tmp_path)], capsys)
    assert code == 0 and len(hashed) == 1  # downloaded and checked, then extracted without hashing it again
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # changed since
    code, _, err = exit_status(download.main, ["cifar10", "--data_root", str(tmp_path)], capsys)
    assert code == 1 and len(hashed) == 2 and "cifar-10-python.tar.gz has md5" in err


def test_a_zip_that_does_not_fit_on_the_disk_is_refused(tmp_path, server, monkeypatch, capsys):
    import shutil
    from data import archives
    serve_as(monkeypatch, "coco", server, {"train2014.zip": zipped({"train2014/a.jpg": b"jpeg" * 100}),
                                           "val2014.zip": zipped({"val2014/b.jpg": b"jpeg"}),
                                           "annotations_trainval2014.zip": zipped({"annotations/x.json": b"{}"})})
    monkeypatch.setattr(archives.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 5, 5))
    code, _, err = exit_status(download.main, ["coco", "--data_root", str(tmp_path)], capsys)
    assert code == 1 and err.count("\n") == 1 and "train2014.zip unpacks to 400B, but its disk has only 5.00B" in err
    assert sorted(path.name for path in (tmp_path / "coco").iterdir()) == []  # no staging folder left


def test_zip_members_may_not_escape(tmp_path):
    from data import archives
    (tmp_path / "evil.zip").write_bytes(zipped({"../escaped.txt": b"x", "/abs.txt": b"y", "inside/ok.txt": b"z"}))
    (tmp_path / "out").mkdir()
    archives.extract(tmp_path / "evil.zip", tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists() and (tmp_path / "out" / "inside" / "ok.txt").read_bytes() == b"z"
    assert sorted(str(path.relative_to(tmp_path / "out")) for path in (tmp_path / "out").rglob("*.txt")) == [
        "abs.txt", "escaped.txt", "inside/ok.txt"]
