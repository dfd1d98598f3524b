"""python -m hashing.encode under torchrun (2 CPU processes, gloo): the processes share the batches and write the
file one process writes, byte for byte; an encoding cut short on one process resumes, in one process or in two, to
the same file, re-encoding only the rows that were not final; another image list and a second job are refused."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hashing import encode
from hashing.search import stream
from hashing.search.api import load_checkpoint
from hashing.search.stream import encode_to_file, image_paths
from network import build_network
from tests.cli_runs import exit_status
from utils.errors import UserError
from utils.lock import run_lock

ROOT = Path(__file__).resolve().parents[1]
IMAGES, BATCH = 50, 8  # 7 batches: process 0 encodes batches 0-3 (rows 0-31), process 1 batches 4-6 (rows 32-49)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """50 small PNG images in two sub-folders, and a checkpoint of the `small` network whose BatchNorm statistics
    are not the defaults (so a process encoding in training mode would give other codes)."""
    root = tmp_path_factory.mktemp("collection")
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        sub = root / "images" / ("a" if i % 3 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(sub / f"{i:03d}.png")
    torch.manual_seed(0)
    network = build_network("small", 16)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    torch.save(network.state_dict(), root / "small.ckpt")
    return root


def model_of(collection):
    return load_checkpoint(collection / "small.ckpt", backbone="small", hash_bit=16, device="cpu")


def reference(collection, tmp_path):
    """The code file one process writes, after checking it against the in-memory encoding of the API."""
    model = model_of(collection)
    result = encode_to_file(model.network, collection / "images", model.transform, tmp_path / "reference.npy",
                            batch_size=BATCH, workers=0)
    np.testing.assert_array_equal(result.codes, model.encode(image_paths(collection / "images")))
    return (tmp_path / "reference.npy").read_bytes()


def flags(collection, output, images=None):
    return ["--checkpoint", str(collection / "small.ckpt"), "--backbone", "small", "--hash_bit", "16",
            "--images", str(images or collection / "images"), "--output", str(output),
            "--batch_size", str(BATCH), "--workers", "0", "--device", "cpu"]


def torchrun(collection, output, *, images=None, stop=None):
    """python -m hashing.encode in 2 processes (or tests.sharded_encode_worker, which stops process stop[0] after
    stop[1] batches); the finished process."""
    module = ["-m", "hashing.encode"] if stop is None else ["-m", "tests.sharded_encode_worker", *map(str, stop)]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *module, *flags(collection, output, images)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def counting_rows(network):
    rows = []
    network.register_forward_pre_hook(lambda module, inputs: rows.append(len(inputs[0])))
    return rows


def test_two_processes_write_the_file_of_one(collection, tmp_path):
    expected = reference(collection, tmp_path)
    finished = torchrun(collection, tmp_path / "codes.npy")
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert (tmp_path / "codes.npy").read_bytes() == expected
    assert finished.stdout.count("encoded 50 images into") == 1 and "in 2 processes" in finished.stdout
    record = json.loads((tmp_path / "codes.npy.progress.json").read_text())
    assert record["done"] == IMAGES and "more" not in record
    assert sorted(path.name for path in tmp_path.glob("codes*")) == ["codes.npy", "codes.npy.progress.json"]


def refuses_other_inputs(collection, output, record):
    """A partial file of a sharded run refuses another image list, other weights and a forged run of final rows."""
    model, images = model_of(collection), image_paths(collection / "images")
    with pytest.raises(UserError, match="partial encoding of another number of images, image list"):
        encode_to_file(model.network, images[1:], model.transform, output, workers=0)
    with pytest.raises(UserError, match="partial encoding of another network weights"):
        encode_to_file(build_network("small", 16), images, model.transform, output, workers=0)
    record_path = output.with_name(output.name + ".progress.json")
    forged = {**record, "more": [[32, 48, record["more"][0][2]]]}  # rows 40-47 were never written
    record_path.write_text(json.dumps(forged))
    with pytest.raises(UserError, match="says rows 32 to 47 of .*codes.npy.partial are final, but they are not"):
        encode_to_file(model.network, images, model.transform, output, workers=0)
    for more in (5, None):  # not a list of runs: refused, not a TypeError
        record_path.write_text(json.dumps({**record, "more": more}))
        with pytest.raises(UserError, match="progress record .* is unreadable"):
            encode_to_file(model.network, images, model.transform, output, workers=0)
    record_path.write_text(json.dumps(record))


def test_a_run_cut_short_on_one_process_resumes_in_one_process(collection, tmp_path):
    expected = reference(collection, tmp_path)
    stopped = torchrun(collection, tmp_path / "codes.npy", stop=(1, 1))  # process 1 dies before its 2nd batch
    assert stopped.returncode != 0 and not (tmp_path / "codes.npy").exists()
    record = json.loads((tmp_path / "codes.npy.progress.json").read_text())
    assert record["done"] == 8 and [run[:2] for run in record["more"]] == [[32, 40]]  # the first round of each
    refuses_other_inputs(collection, tmp_path / "codes.npy", record)

    model = model_of(collection)
    rows = counting_rows(model.network)
    result = encode_to_file(model.network, collection / "images", model.transform, tmp_path / "codes.npy",
                            batch_size=BATCH, workers=0)
    assert rows == [8, 8, 8, 8, 2] and result.hash_bit == 16  # rows 8-31 and 40-49, cut as one process cuts
    assert (tmp_path / "codes.npy").read_bytes() == expected
    assert json.loads((tmp_path / "codes.npy.progress.json").read_text())["done"] == IMAGES


def test_a_one_process_partial_resumes_in_two_and_other_jobs_are_refused(collection, tmp_path, monkeypatch):
    expected = reference(collection, tmp_path)
    model = model_of(collection)
    monkeypatch.setattr(stream, "PROGRESS_SECONDS", 0.0)
    record_path = tmp_path / "codes.npy.progress.json"

    def ctrl_c_after_24_rows(module, inputs):
        if record_path.exists() and json.loads(record_path.read_text())["done"] == 24:
            raise KeyboardInterrupt
    model.network.register_forward_pre_hook(ctrl_c_after_24_rows)
    with pytest.raises(KeyboardInterrupt):
        encode_to_file(model.network, collection / "images", model.transform, tmp_path / "codes.npy",
                       batch_size=BATCH, workers=0)

    with run_lock(tmp_path / "codes.npy.lock"):  # a second job while this one holds the lock
        held = torchrun(collection, tmp_path / "codes.npy")
    printed = [line for line in held.stderr.splitlines() if line.startswith("error:")]
    assert held.returncode == 1 and len(printed) == 1 and "codes.npy.lock is held by process" in printed[0]

    resumed = torchrun(collection, tmp_path / "codes.npy")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "encoded 26 images" in resumed.stdout and "24 from an interrupted run" in resumed.stdout
    assert (tmp_path / "codes.npy").read_bytes() == expected


def test_one_process_encodes_a_list_file_in_its_order(collection, tmp_path, capsys):
    paths = image_paths(collection / "images")
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join(reversed(paths)) + "\n\n")
    code, out, _ = exit_status(encode.cli, flags(collection, tmp_path / "codes.npy", listed), capsys)
    assert code == 0 and "encoded 50 images" in out
    np.testing.assert_array_equal(np.load(tmp_path / "codes.npy"), model_of(collection).encode(paths)[::-1])
    code, _, err = exit_status(encode.cli, flags(collection, tmp_path / "other.npy", tmp_path / "absent.txt"), capsys)
    assert code == 1 and err.count("\n") == 1 and "--images list" in err and "absent.txt" in err
    for suffix in (".lock", ".partial"):  # the lock is emptied and removed, an unrecorded partial file removed
        (tmp_path / f"out.npy{suffix}").write_text(listed.read_text())
        code, _, err = exit_status(encode.cli, flags(collection, tmp_path / "out.npy", tmp_path / f"out.npy{suffix}"),
                                   capsys)
        assert code == 1 and err.count("\n") == 1 and f"out.npy{suffix} is also --images" in err
        assert (tmp_path / f"out.npy{suffix}").read_text() == listed.read_text()


def test_the_missing_rows_are_cut_into_the_batches_of_one_process():
    missing = [(3, 20), (24, 26), (40, 50)]
    batches = list(stream._batches(missing, 8))
    assert batches == [(3, 8), (8, 16), (16, 20), (24, 26), (40, 48), (48, 50)]
    assert stream._batch_count(missing, 8) == len(batches)
    assert stream._gaps([[0, 3, None], [20, 24, None], [26, 40, None]], 50) == missing


def test_one_image_path_is_one_image(collection):
    model = model_of(collection)
    path = image_paths(collection / "images")[5]
    np.testing.assert_array_equal(model.encode(path), model.encode([path, path])[:1])
    assert model.encode(Path(path)).shape == (1, 2)
    with pytest.raises(UserError, match="missing.png"):
        model.encode(str(collection / "missing.png"))


def test_the_api_refuses_an_encoding_file_that_is_its_checkpoint(collection, tmp_path):
    checkpoint = tmp_path / "codes.npy.partial"  # an unrecorded partial file would be removed
    checkpoint.write_bytes((collection / "small.ckpt").read_bytes())
    model = load_checkpoint(checkpoint, backbone="small", hash_bit=16, device="cpu")
    with pytest.raises(UserError, match="codes.npy.partial is also the checkpoint"):
        model.encode_to_file(collection / "images", tmp_path / "codes.npy")
    assert checkpoint.read_bytes() == (collection / "small.ckpt").read_bytes()
