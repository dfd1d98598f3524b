"""Issue 30 (hardening, round 4), the checkpoint and writer items: a checkpoint's record and weights are checked
before anything is built from them (item 6), writers replace only their own kind of file (item 7), a full disk
under the run lock is one line (item 10), and a checkpoint is rebuilt by one resolution everywhere (item 11)."""
import errno
import io
import json
import zipfile

import pytest
import safetensors.torch
import torch

import hashing.search.api
import retrieval
from hashing.search.index import HammingIndex
from hashing.search.stream import encode_to_file
import utils.lock
from network import build_network
from tests.cli_runs import SMALL_DIGITS_RUN, exit_status, run_small_digits, small_digits_failure
from utils.checkpoint import (NETWORK_FORMAT, read_state_dict, read_train_state, save, save_state_dict,
                              save_train_state)
from utils.errors import UserError
from utils.weights import read_weights_file


class FullDiskFile(io.FileIO):
    """A file on a disk with no space left: every write fails with ENOSPC, as a full tmpfs does."""

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")


# ============ item 10: a full disk under the run lock ============

def test_a_full_disk_when_the_lock_notes_its_holder_is_one_error(tmp_path, monkeypatch):
    def open_on_full_disk(path, mode="r", *args, **kwargs):
        return io.TextIOWrapper(io.BufferedRandom(FullDiskFile(path, "a+")))

    monkeypatch.setattr(utils.lock, "open", open_on_full_disk, raising=False)
    lock = tmp_path / "run.lock"
    with pytest.raises(UserError, match="cannot write the run lock .*No space left on device"):
        with utils.lock.run_lock(lock):
            pass
    assert not lock.exists()
    monkeypatch.undo()
    with utils.lock.run_lock(lock):  # the failed attempt released its lock
        pass


# ============ item 11: a checkpoint is rebuilt by one resolution (the CLI, the API, the server) ============

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(output folder, result) of a short digits run: a plain checkpoint (the small backbone records nothing)."""
    out = tmp_path_factory.mktemp("trained")
    return out, run_small_digits(["--epochs", "1", "--output_dir", str(out), "--no_progress"])


def test_test_rebuilds_a_plain_checkpoint_from_its_run_log(trained, capsys):
    out, result = trained
    code, printed, _ = exit_status(retrieval.cli, ["--dataset", "digits", "--subset", "200", "--test", "--device",
                                                   "cpu", "--checkpoint", str(out / "digits_small_16.ckpt"),
                                                   "--output_dir", str(out), "--no_progress"], capsys)
    assert code == 0 and f"mAP@200: {result['map']:.4f}  (digits, small, 16 bits" in printed
    model = hashing.search.api.load_checkpoint(out / "digits_small_16.ckpt", device="cpu")
    assert (model.backbone.name, model.hash_bit) == ("small", 16)


def test_a_flag_that_contradicts_the_run_log_is_one_line(trained, capsys):
    out, _ = trained
    code, _, err = exit_status(retrieval.cli, ["--dataset", "digits", "--test", "--hash_bit", "32", "--checkpoint",
                                               str(out / "digits_small_16.ckpt"), "--output_dir", str(out)], capsys)
    assert code == 1 and err.count("\n") == 1 and "--hash_bit 32 contradicts --checkpoint" in err


# ============ item 6: a checkpoint's record is checked before anything is built ============

def described_checkpoint(path, record, state=None):
    """A self-describing checkpoint holding `record` (as save_state_dict writes it) and `state` (default: the
    small network's, 16 bits)."""
    state = build_network("small", 16).state_dict() if state is None else state
    save({"format": NETWORK_FORMAT, "backbone": record, "state_dict": state}, path)
    return path


@pytest.fixture
def nothing_is_built(monkeypatch):
    def build(*args, **kwargs):
        raise AssertionError("a network was built from a record that was not checked")

    monkeypatch.setattr(hashing.search.api, "build_network", build)


@pytest.mark.parametrize("field, value, expected", [
    ("input_size", 64000, "input_size 64000 is not an integer from 1 to 2048"),
    ("hash_bit", 4000000, "hash_bit 4000000 is not an integer from 1 to 8192"),
    ("experts", 100000, "experts 100000 is not an integer from 1 to 64"),
    ("hash_bit", "16", "hash_bit '16' is not an integer"),
    ("hash_bit", 16.5, "hash_bit 16.5 is not an integer"),
    ("experts", True, "experts True is not an integer")])
def test_a_record_out_of_bounds_is_refused_before_anything_is_built(tmp_path, nothing_is_built, field, value,
                                                                     expected):
    record = {"name": "vit_b_32", "source": "torchvision", "input_size": 224, "hash_bit": 16, "experts": 1,
              field: value}
    checkpoint = described_checkpoint(tmp_path / "crafted.ckpt", record)
    with pytest.raises(UserError, match=expected):
        hashing.search.api.load_checkpoint(checkpoint, device="cpu")


@pytest.mark.parametrize("flag, value", [("--hash_bit", "8193"), ("--experts", "65"), ("--input_size", "2049")])
def test_a_run_cannot_write_a_checkpoint_its_own_test_would_refuse(capsys, flag, value):
    with pytest.raises(SystemExit):
        retrieval.parse_args(SMALL_DIGITS_RUN + [flag, value])
    assert f"argument {flag}: must be an integer from 1 to {int(value) - 1}, got '{value}'" in capsys.readouterr().err


def test_a_run_log_out_of_bounds_is_refused_before_anything_is_built(tmp_path, nothing_is_built):
    torch.save(build_network("small", 16).state_dict(), tmp_path / "run.ckpt")
    (tmp_path / "run.jsonl").write_text('{"event": "start", "args": {"dataset": "digits", "backbone": "small", '
                                        '"hash_bit": [16]}}\n')
    with pytest.raises(UserError, match=r"the run log of .*run.ckpt: hash_bit \[16\] is not an integer"):
        hashing.search.api.load_checkpoint(tmp_path / "run.ckpt", device="cpu")


def vit_shaped_state(tokens, bits=16, width=768):
    """The tensors that tell a vit_b_32 network's shape (not a whole network: the check reads only these)."""
    return {"trunk.encoder.pos_embedding": torch.zeros(1, tokens, width),
            "hash_layer.weight": torch.zeros(bits, width), "hash_layer.bias": torch.zeros(bits)}


@pytest.mark.parametrize("record, state, expected", [
    ({"input_size": 2048}, vit_shaped_state(50), "position embedding has 50 tokens, not the 4096 patches"),
    ({"hash_bit": 4096}, vit_shaped_state(50), "it gives 16 bits, not 4096"),
    ({"experts": 64}, vit_shaped_state(50), "it has 1 heads, not 64")])
def test_the_network_a_record_describes_is_compared_with_the_weights_before_it_is_built(
        tmp_path, capsys, nothing_is_built, record, state, expected):
    record = {"name": "vit_b_32", "source": "torchvision", "input_size": 224, "hash_bit": 16, "experts": 1, **record}
    checkpoint = described_checkpoint(tmp_path / "crafted.ckpt", record, state)
    with pytest.raises(UserError, match=expected):
        hashing.search.api.load_checkpoint(checkpoint, device="cpu")
    code, _, err = exit_status(retrieval.cli, ["--dataset", "digits", "--test", "--checkpoint", str(checkpoint),
                                               "--output_dir", str(tmp_path)], capsys)
    assert code == 1 and err.count("\n") == 1 and expected in err


def deflated(state, path):
    """`state` saved by torch.save, then its archive rewritten with compressed members (which torch.load reads)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
    return path


def test_a_deflated_pt_file_that_would_inflate_past_the_cap_is_refused_unread(tmp_path, monkeypatch):
    bomb = {"hash_layer.weight": torch.zeros(5000, 4000)}  # 80 MB of zeros in a file of ~80 kB
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("torch.load inflated a zip bomb"))
    checkpoint = deflated(bomb, tmp_path / "bomb.ckpt")
    assert checkpoint.stat().st_size < 1 << 20
    with pytest.raises(UserError, match=r"bomb.ckpt unpacks to 76.3 MiB from 0.\d MiB"):
        read_state_dict(checkpoint)
    with pytest.raises(UserError, match="weights file .*bomb.pt unpacks to"):
        read_weights_file(deflated(bomb, tmp_path / "bomb.pt"))
    with pytest.raises(UserError, match="training state .*bomb.last.pt unpacks to"):
        read_train_state(deflated({"network": bomb}, tmp_path / "bomb.last.pt"), {})


def test_a_small_deflated_checkpoint_still_loads(tmp_path):
    state = build_network("small", 16).state_dict()
    loaded = read_state_dict(deflated(state, tmp_path / "small.ckpt"))
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())


def test_non_finite_weights_are_refused_in_every_format_naming_the_file_and_tensor(tmp_path):
    state = build_network("small", 16).state_dict()
    state["hash_layer.weight"][3, 1] = float("nan")
    safetensors.torch.save_file(state, tmp_path / "nan.safetensors")
    with pytest.raises(UserError, match=r"nan.safetensors holds NaN or infinite values \(1 tensors, e.g. "
                                        r"hash_layer.weight\): it is damaged; point --weights to a good copy"):
        read_weights_file(tmp_path / "nan.safetensors")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(UserError, match=r"nan.pt holds NaN .*hash_layer.weight\): it is damaged; point --weights"):
        read_weights_file(tmp_path / "nan.pt")
    save_train_state(tmp_path / "nan.last.pt", {"network": state, "epoch": 1}, {})
    with pytest.raises(UserError, match=r"nan.last.pt holds NaN .*hash_layer.weight\).*start without --resume"):
        read_train_state(tmp_path / "nan.last.pt", {})


# ============ item 7: writers replace only their own files ============

def stream_inputs(tmp_path):
    """(network, images, transform) of a tiny encoding: 12 random 8x8 PNG images, 16 bits."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms import v2
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16))
    return network, folder, v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def interrupt_after(network, calls):
    def hook(module, inputs):
        hook.calls += 1
        if hook.calls == calls:
            raise RuntimeError("interrupted")
    hook.calls = 0
    return network.register_forward_pre_hook(hook)


def test_a_forged_done_in_the_progress_record_is_refused(tmp_path):
    network, images, transform = stream_inputs(tmp_path)
    output = tmp_path / "codes.npy"
    hook = interrupt_after(network, 2)
    with pytest.raises(RuntimeError, match="interrupted"):
        encode_to_file(network, images, transform, output, batch_size=4, workers=0)
    hook.remove()
    record_path = tmp_path / "codes.npy.progress.json"
    record = json.loads(record_path.read_text())
    assert record["done"] == 4
    record_path.write_text(json.dumps({**record, "done": 12}))  # rows 4 to 11 were never written
    with pytest.raises(UserError, match=r"says 12 rows of .*codes.npy.partial are final, but they are not the rows"):
        encode_to_file(network, images, transform, output, batch_size=4, workers=0)
    assert not output.exists()
    record_path.write_text(json.dumps(record))
    finished = encode_to_file(network, images, transform, output, batch_size=4, workers=0)
    with open(output, "r+b") as handle:  # a finished file whose rows were changed afterwards
        handle.seek(-1, io.SEEK_END)
        handle.write(bytes([finished.codes[-1, -1] ^ 1]))
    with pytest.raises(UserError, match="says 12 rows of .*codes.npy are final, but they are not the rows"):
        encode_to_file(network, images, transform, output, batch_size=4, workers=0)


def test_the_partial_file_is_never_followed_through_a_symlink(tmp_path):
    network, images, transform = stream_inputs(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("someone's file")
    (tmp_path / "codes.npy.partial").symlink_to(victim)
    with pytest.raises(UserError, match="partial code file .* is a symbolic link, which is never followed"):
        encode_to_file(network, images, transform, tmp_path / "codes.npy", workers=0)
    (tmp_path / "codes.npy.partial").unlink()
    (tmp_path / "codes.npy.partial").symlink_to(tmp_path / "absent")  # a dangling link: O_EXCL would fail
    with pytest.raises(UserError, match="is a symbolic link"):
        encode_to_file(network, images, transform, tmp_path / "codes.npy", workers=0)
    assert victim.read_text() == "someone's file" and not (tmp_path / "absent").exists()


def test_a_second_encoder_into_one_output_stops_with_one_line(tmp_path):
    network, images, transform = stream_inputs(tmp_path)
    output = tmp_path / "codes.npy"
    second = []

    def start_a_second_encoder(module, inputs):  # while the first has not yet created its partial file
        if not second:
            with pytest.raises(UserError) as error:
                encode_to_file(network, images, transform, output, workers=0)
            second.append(str(error.value))
    handle = network.register_forward_pre_hook(start_a_second_encoder)
    encode_to_file(network, images, transform, output, batch_size=4, workers=0)
    handle.remove()
    assert "codes.npy.lock is held by process" in second[0] and "\n" not in second[0]
    assert not (tmp_path / "codes.npy.lock").exists()


def test_a_missing_output_folder_is_one_line(tmp_path):
    network, images, transform = stream_inputs(tmp_path)
    with pytest.raises(UserError, match=r"the folder of the code file .*missing/codes.npy does not exist"):
        encode_to_file(network, images, transform, tmp_path / "missing" / "codes.npy", workers=0)
    assert not (tmp_path / "missing").exists()


def test_an_image_where_the_encodings_lock_would_be_is_refused_untouched(tmp_path):
    network, folder, transform = stream_inputs(tmp_path)
    output = folder / "codes.npy"
    lock = output.with_name(output.name + ".lock")
    image = (folder / "00.png").read_bytes()
    lock.write_bytes(image)  # the lock would be emptied and removed when the encoding ends
    with pytest.raises(UserError, match=r"encoding lock .*codes.npy.lock is one of the images to encode"):
        encode_to_file(network, sorted(map(str, folder.glob("*.png"))) + [str(lock)], transform, output, workers=0)
    assert lock.read_bytes() == image


@pytest.mark.parametrize("name, content", [("train.txt", b"0.png 1 0\n"), ("photo.png", b"\x89PNG\r\n\x1a\n..."),
                                           ("recipe.yaml", b"epochs: 1\n")])
def test_overwrite_never_replaces_a_file_of_another_kind_with_a_checkpoint(tmp_path, capsys, name, content):
    target = tmp_path / name
    target.write_bytes(content)
    config = ["--config", str(target)] if name.endswith(".yaml") else []
    code, err = small_digits_failure(config + ["--epochs", "1", "--checkpoint", str(target), "--overwrite",
                                               "--output_dir", str(tmp_path / "out")], capsys)
    expected = "is also --config" if config else "exists and is not a checkpoint (torch.save's format)"
    assert code == 1 and err.count("\n") == 1 and f"--checkpoint {target} " in err and expected in err
    assert target.read_bytes() == content


def test_overwrite_still_replaces_the_runs_own_checkpoint(trained, tmp_path, capsys):
    out, _ = trained
    copy = tmp_path / "mine.ckpt"
    copy.write_bytes((out / "digits_small_16.ckpt").read_bytes())
    before = copy.stat().st_ino
    code, _, _ = exit_status(retrieval.cli, SMALL_DIGITS_RUN + ["--epochs", "1", "--checkpoint", str(copy),
                                                                "--overwrite", "--output_dir", str(tmp_path),
                                                                "--no_progress"], capsys)
    assert code == 0 and copy.stat().st_ino != before  # written anew (the same bytes: same seed, same result)


def test_an_index_is_saved_only_over_an_index(tmp_path):
    import numpy as np
    index = HammingIndex.build(np.arange(24, dtype=np.uint8).reshape(12, 2))
    notes = tmp_path / "notes.txt"
    notes.write_text("someone's notes")
    with pytest.raises(UserError, match="index file .*notes.txt exists and is not a Hamming index file"):
        index.save(notes)
    assert notes.read_text() == "someone's notes"
    index.save(tmp_path / "codes.index")
    index.save(tmp_path / "codes.index")  # an earlier index is replaced
    assert len(HammingIndex.load(tmp_path / "codes.index")) == 12


def test_the_run_lock_is_never_followed_through_a_symlink(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("someone's file")
    (tmp_path / "run.lock").symlink_to(victim)
    with pytest.raises(UserError, match="run lock .*run.lock is a symbolic link, which is never followed"):
        with utils.lock.run_lock(tmp_path / "run.lock"):
            pass
    assert victim.read_text() == "someone's file"
