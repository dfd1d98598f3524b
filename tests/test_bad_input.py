"""Issue 6's bad-input list, one test per item: each ends with a clear message and a non-zero exit
status, never a traceback. (Checkpoints, disks and folders: see also test_reliability.py.)"""
import pytest
import torch

import retrieval
from network import build_network
from tests.cli_runs import exit_status
from tests.fixture_files import small_list_folder
from utils.runlog import read_run_log

SMALL = ["--backbone", "small", "--hash_bit", "16", "--batch_size", "8", "--epochs", "1", "--device", "cpu"]


def cli(argv, capsys):
    """Exit status, stdout and stderr of the CLI; a clean exit is status 0."""
    return exit_status(retrieval.cli, argv, capsys)


def listed(tmp_path, argv=()):
    return ["--dataset", "list", "--data_root", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"),
            *SMALL, *argv]


def test_missing_dataset_folder(tmp_path, capsys):
    code, _, err = cli(["--dataset", "nuswide", "--data_root", str(tmp_path), *SMALL], capsys)
    assert code == 1 and f"no folder {tmp_path}/nus_wide" in err and "--data_root" in err


def test_corrupt_image_fails_naming_the_file_by_default(tmp_path, capsys):
    folder = small_list_folder(tmp_path / "data")
    (folder / "images/003.png").write_bytes(b"not a png")
    code, _, err = cli(listed(tmp_path), capsys)
    assert code == 1 and f"cannot read image {folder}/images/003.png" in err


def test_corrupt_and_missing_images_are_skipped_and_counted_on_request(tmp_path, capsys):
    folder = small_list_folder(tmp_path / "data")  # 16 train = database images, 8 queries
    (folder / "images/003.png").write_bytes(b"not a png")
    (folder / "images/020.png").unlink()
    code, out, err = cli(listed(tmp_path, ["--skip_bad_images"]), capsys)
    assert code == 0
    assert "--skip_bad_images left out 2 of 24 images that are missing or cannot be decoded" in err
    assert "{'train': 15, 'query': 7, 'database': 15}" in out


def test_label_rows_of_the_wrong_length(tmp_path, capsys):
    folder = small_list_folder(tmp_path / "data")
    lines = (folder / "test.txt").read_text().splitlines()
    lines[2] += " 0"
    (folder / "test.txt").write_text("\n".join(lines) + "\n")
    code, _, err = cli(listed(tmp_path), capsys)
    assert code == 1 and f"{folder}/test.txt line 3: 5 labels, but" in err


def test_empty_split(tmp_path, capsys):
    folder = small_list_folder(tmp_path / "data")
    (folder / "test.txt").write_text("\n")
    code, _, err = cli(listed(tmp_path), capsys)
    assert code == 1 and f"{folder}/test.txt lists no images" in err


def test_split_emptied_by_skipping(tmp_path, capsys):
    folder = small_list_folder(tmp_path / "data")
    for index in range(16, 24):  # every query image
        (folder / f"images/{index:03d}.png").write_bytes(b"")
    code, _, err = cli(listed(tmp_path, ["--skip_bad_images"]), capsys)
    assert code == 1 and "the query split of --dataset list is empty" in err


@pytest.mark.parametrize("value, message", [
    ("0", "--hash_bit: must be an integer from 1 to 8192, got '0'"),
    ("-8", "--hash_bit: must be an integer from 1 to 8192, got '-8'"),
    ("4.5", "--hash_bit: must be an integer from 1 to 8192, got '4.5'"),
    ("300", "--hash_bit 300: no best-known code distance"),
])
def test_hash_bit_not_positive_or_outside_the_code_table(tmp_path, capsys, value, message):
    argv = ["--dataset", "digits", "--backbone", "small", "--hash_bit", value, "--device", "cpu",
            "--output_dir", str(tmp_path)]
    code, _, err = cli(argv, capsys)
    assert code in (1, 2) and message in err


def test_retrieve_larger_than_the_database_is_clamped(tmp_path, capsys):
    small_list_folder(tmp_path / "data")
    code, out, err = cli(listed(tmp_path, ["--retrieve", "1000"]), capsys)
    assert code == 0 and "--retrieve 1000 exceeds the database (16 items); using K = 16" in err
    assert "mAP@16" in out


def test_test_with_no_checkpoint(tmp_path, capsys):
    small_list_folder(tmp_path / "data")
    code, _, err = cli(listed(tmp_path, ["--test"]), capsys)
    assert code == 1 and f"no checkpoint at {tmp_path}/out/list_small_16.ckpt" in err


def test_truncated_checkpoint(tmp_path, capsys):
    small_list_folder(tmp_path / "data")
    (tmp_path / "out").mkdir()
    path = tmp_path / "out" / "list_small_16.ckpt"
    torch.save(build_network("small", 16).state_dict(), path)
    path.write_bytes(path.read_bytes()[:-300])
    code, _, err = cli(listed(tmp_path, ["--test"]), capsys)
    assert code == 1 and f"cannot read checkpoint {path}" in err


def test_output_folder_not_writable(tmp_path, capsys):
    small_list_folder(tmp_path / "data")
    (tmp_path / "out").write_text("a file where the folder should be")
    code, _, err = cli(listed(tmp_path), capsys)
    assert code == 1 and f"--output_dir {tmp_path}/out is not a writable folder" in err


def test_out_of_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    small_list_folder(tmp_path / "data")
    assert cli(listed(tmp_path), capsys)[0] == 0
    out = tmp_path / "out"
    # The logs belong to the new run; every result and state file must keep its bytes.
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.suffix not in (".txt", ".jsonl")}

    def full_disk(fd):  # checkpoints are serialised in memory, then written: the disk fills while writing
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("utils.atomic.os.fsync", full_disk)
    code, _, err = cli(listed(tmp_path, ["--epochs", "2", "--overwrite"]), capsys)
    # The first file due is the training state after epoch 1; it and every other file stay as they were.
    assert code == 1 and f"could not write {out}/list_small_16.last.pt (No space left on device); " \
                         "the previous file is intact" in err
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.suffix not in (".txt", ".jsonl")} == before


def test_skipping_nothing_changes_nothing(tmp_path, capsys):
    """Checking the images must not draw from the global RNG, or the network would start elsewhere."""
    small_list_folder(tmp_path / "data")
    runs = []
    for flags in ([], ["--skip_bad_images"]):
        out = tmp_path / ("checked" if flags else "plain")
        assert cli(["--dataset", "list", "--data_root", str(tmp_path / "data"), "--output_dir", str(out),
                    *SMALL, *flags], capsys)[0] == 0
        runs.append(read_run_log(out / "list_small_16.jsonl")["epochs"])
    assert [e["loss"] for e in runs[0]] == [e["loss"] for e in runs[1]]
