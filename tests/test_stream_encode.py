"""hashing/search/stream.py: streamed encoding into a memory-mapped code file equals encoding in memory, and a run
interrupted after some batches resumes to the identical file; mismatched resumes and bad files are refused."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from data.files import read_rgb
from hashing.search import stream
from hashing.codes import CodeSet, pack_signs
from hashing.search.stream import encode_to_file, image_paths, open_code_file
from utils.errors import UserError

BITS = 20  # 3 bytes a code, 4 padding bits
TRANSFORM = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """40 small PNG images in two sub-folders, and a file that is no image."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(40):
        sub = root / ("a" if i % 3 else "b")
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(sub / f"{i:03d}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def make_network(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, BITS))


def in_memory_codes(network, paths):
    with torch.no_grad():
        outputs = network(torch.stack([TRANSFORM(read_rgb(path)) for path in paths]))
    return pack_signs(outputs)


def counting_calls(network, fail_on=None):
    """A list that counts the network's forward calls; the call number `fail_on` raises (an interruption)."""
    calls = []

    def hook(module, inputs):
        calls.append(len(inputs[0]))
        if len(calls) == fail_on:
            raise RuntimeError("interrupted")
    network.register_forward_pre_hook(hook)
    return calls


def interrupted_run(folder, output, batch_size, fail_on):
    """Encode into `output` until the forward call `fail_on` raises; returns the progress record's path."""
    network = make_network()
    counting_calls(network, fail_on=fail_on)
    with pytest.raises(RuntimeError, match="interrupted"):
        encode_to_file(network, folder, TRANSFORM, output, batch_size=batch_size, workers=0)
    return output.with_name(output.name + ".progress.json")


def test_streamed_codes_equal_in_memory_codes(folder, tmp_path, capsys):
    network = make_network()
    result = encode_to_file(network, folder, TRANSFORM, tmp_path / "codes.npy", batch_size=7, workers=0)
    paths = image_paths(folder)
    assert result.paths == paths and len(paths) == 40 and all(p.endswith(".png") for p in paths)
    assert isinstance(result.codes, np.memmap) and result.hash_bit == BITS
    expected = in_memory_codes(network, paths)
    np.testing.assert_array_equal(result.codes, expected)
    np.testing.assert_array_equal(np.load(tmp_path / "codes.npy"), expected)  # a plain .npy file
    labels = np.zeros((40, 1))
    with torch.no_grad():
        outputs = network(torch.stack([TRANSFORM(read_rgb(path)) for path in paths]))
    np.testing.assert_array_equal(CodeSet.from_outputs(outputs[:1], labels[:1], outputs, labels).database_bits,
                                  result.codes)
    assert "encoded 40 images" in capsys.readouterr().out
    assert not (tmp_path / "codes.npy.partial").exists()
    assert json.loads((tmp_path / "codes.npy.progress.json").read_text())["done"] == 40

    calls = counting_calls(network)  # the same call again: the finished file, no network pass
    again = encode_to_file(network, [str(p) for p in paths], TRANSFORM, tmp_path / "codes.npy", workers=0)
    assert calls == [] and "nothing to do" in capsys.readouterr().out
    np.testing.assert_array_equal(again.codes, expected)


def test_an_interrupted_run_resumes_to_the_identical_file(folder, tmp_path, capsys):
    reference = encode_to_file(make_network(), folder, TRANSFORM, tmp_path / "reference.npy", batch_size=6,
                               workers=0)
    record = json.loads(interrupted_run(folder, tmp_path / "codes.npy", batch_size=6, fail_on=4).read_text())
    assert record["done"] == 18 and not (tmp_path / "codes.npy").exists()

    network = make_network()  # a new process: same weights, no hook
    calls = counting_calls(network)
    result = encode_to_file(network, folder, TRANSFORM, tmp_path / "codes.npy", batch_size=6, workers=0)
    assert sum(calls) == 40 - 18  # only the rows that were not final
    assert (tmp_path / "codes.npy").read_bytes() == (tmp_path / "reference.npy").read_bytes()
    np.testing.assert_array_equal(result.codes, reference.codes)
    assert "22 images" in capsys.readouterr().out.splitlines()[-1]


def test_rows_written_after_the_last_record_are_redone(folder, tmp_path, monkeypatch):
    # A killed process leaves rows written after its last record; they are not trusted but computed again.
    encode_to_file(make_network(), folder, TRANSFORM, tmp_path / "reference.npy", batch_size=5, workers=0)
    monkeypatch.setattr(stream, "PROGRESS_SECONDS", 0.0)  # a record after every batch: keep the one at 10 rows
    record_path, earlier = tmp_path / "codes.npy.progress.json", []
    network = make_network()
    network.register_forward_pre_hook(lambda module, inputs: earlier.append(record_path.read_bytes())
                                      if record_path.exists() else None)
    counting_calls(network, fail_on=6)
    with pytest.raises(RuntimeError, match="interrupted"):
        encode_to_file(network, folder, TRANSFORM, tmp_path / "codes.npy", batch_size=5, workers=0)
    at_10 = next(record for record in earlier if json.loads(record)["done"] == 10)
    assert json.loads(record_path.read_text())["done"] == 25
    record_path.write_bytes(at_10)  # as if killed before the records after it were written
    partial = np.load(tmp_path / "codes.npy.partial", mmap_mode="r+")
    partial[10:25] = 255  # rows beyond the record: garbage
    partial.flush()
    del partial
    network = make_network()
    calls = counting_calls(network)
    encode_to_file(network, folder, TRANSFORM, tmp_path / "codes.npy", batch_size=5, workers=0)
    assert sum(calls) == 30
    assert (tmp_path / "codes.npy").read_bytes() == (tmp_path / "reference.npy").read_bytes()


def test_a_resume_with_other_inputs_is_refused(folder, tmp_path):
    interrupted_run(folder, tmp_path / "codes.npy", batch_size=8, fail_on=2)
    with pytest.raises(UserError, match="partial encoding of another network weights") as error:
        encode_to_file(make_network(seed=1), folder, TRANSFORM, tmp_path / "codes.npy", workers=0)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="number of images, image list"):
        encode_to_file(make_network(), image_paths(folder)[:-1], TRANSFORM, tmp_path / "codes.npy", workers=0)
    with pytest.raises(UserError, match="transform"):
        encode_to_file(make_network(), folder, v2.Compose([TRANSFORM, v2.Resize(8)]), tmp_path / "codes.npy",
                       workers=0)
    assert (tmp_path / "codes.npy.partial").exists()  # kept: it is the user's work


def test_bad_inputs_and_outputs_are_one_line_errors(folder, tmp_path):
    network = make_network()
    (tmp_path / "empty").mkdir()
    (tmp_path / "taken.npy").write_bytes(b"someone's file")
    for images, output, match in [(tmp_path / "empty", tmp_path / "a.npy", "no images to encode"),
                                  (folder / "notes.txt", tmp_path / "a.npy", "not a folder"),
                                  (folder, tmp_path / "taken.npy", "exists and has no progress record"),
                                  (folder, tmp_path, "folder")]:
        with pytest.raises(UserError, match=match) as error:
            encode_to_file(network, images, TRANSFORM, output, workers=0)
        assert "\n" not in str(error.value)


def test_open_code_file_follows_the_reader_rules(tmp_path):
    np.save(tmp_path / "codes.npy", np.arange(12, dtype=np.uint8).reshape(4, 3))
    np.testing.assert_array_equal(open_code_file(tmp_path / "codes.npy")[3], [9, 10, 11])
    data = (tmp_path / "codes.npy").read_bytes()
    (tmp_path / "short.npy").write_bytes(data[:-1])
    (tmp_path / "floats.npy").write_bytes(b"")
    np.save(tmp_path / "floats.npy", np.zeros((4, 3), dtype=np.float32))
    os.mkfifo(tmp_path / "fifo.npy")
    for name, match in [("short.npy", "declares 4 x 3 bytes"), ("floats.npy", "not uint8 codes"),
                        ("fifo.npy", "FIFO"), ("missing.npy", "does not exist")]:
        with pytest.raises(UserError, match=match):
            open_code_file(tmp_path / name)
    with pytest.raises(UserError, match="of shape"):
        open_code_file(tmp_path / "codes.npy", shape=(5, 3))


def test_a_network_with_nan_weights_is_refused(folder, tmp_path):
    network = make_network()
    with torch.no_grad():
        network[1].weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN or infinite, for images"):
        encode_to_file(network, folder, TRANSFORM, tmp_path / "codes.npy", workers=0)


def test_progress_is_recorded_while_running(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "PROGRESS_SECONDS", 0.0)  # a record after every batch
    network = make_network()
    records = []

    def hook(module, inputs):
        record = tmp_path / "codes.npy.progress.json"
        records.append(json.loads(record.read_text())["done"] if record.exists() else None)
    network.register_forward_pre_hook(hook)
    encode_to_file(network, folder, TRANSFORM, tmp_path / "codes.npy", batch_size=10, workers=0)
    assert records == [None, 10, 20, 30]


def test_an_unreadable_progress_record_is_a_one_line_error(folder, tmp_path):
    record_path = interrupted_run(folder, tmp_path / "codes.npy", batch_size=8, fail_on=2)
    record = json.loads(record_path.read_text())
    for damaged in ("{not json", json.dumps({**record, "done": 41}), json.dumps({**record, "hash_bit": "20"})):
        record_path.write_text(damaged)
        with pytest.raises(UserError, match="progress record .* is unreadable"):
            encode_to_file(make_network(), folder, TRANSFORM, tmp_path / "codes.npy", workers=0)
