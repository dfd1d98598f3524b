"""python -m data.verify: each class of bad input is reported on one line and makes the exit status 1;
a clean folder passes and its manifest lists the splits in order, relative to --data_root."""
import json

from data import verify
from tests.cli_runs import exit_status
from tests.fixture_files import small_list_folder
from tests.test_protocol import nuswide_folder, truncated_jpeg


def run_verify(argv, capsys):
    return exit_status(verify.main, argv, capsys)


def test_clean_folder_passes_and_writes_the_manifest(tmp_path, capsys):
    folder = small_list_folder(tmp_path / "data")  # 16 train = database, 8 queries, 4 labels
    (folder / "images/005.png").write_bytes(truncated_jpeg())  # truncated images load: counted, not a problem
    manifest = tmp_path / "manifest.json"
    code, out, err = run_verify(["--dataset", "list", "--data_root", str(folder), "--manifest", str(manifest)],
                                capsys)
    assert code == 0 and err == "" and "OK: list under" in out
    assert "24 images: 23 decode, 1 truncated" in out
    record = json.loads(manifest.read_text())
    lines = {name: [line.split()[0] for line in (folder / name).read_text().splitlines()]
             for name in ("train.txt", "test.txt", "database.txt")}
    assert record["splits"] == {"train": lines["train.txt"], "query": lines["test.txt"],
                                "database": lines["database.txt"]}
    assert record["dataset"] == "list" and record["num_classes"] == 4 and record["checks"]["files"]["truncated"] == 1


def test_every_bad_input_class_is_reported(tmp_path, capsys):
    folder = small_list_folder(tmp_path / "data")
    train = (folder / "train.txt").read_text().splitlines()
    train[1] = train[1].split()[0] + " 0 0 0 0"  # no label
    train[2] += " 1"  # 5 labels
    train.append(train[0])  # listed twice
    (folder / "train.txt").write_text("\n".join(train) + "\n")
    (folder / "images/020.png").unlink()
    (folder / "images/021.png").write_bytes(b"not an image")
    code, _, err = run_verify(["--dataset", "list", "--data_root", str(folder)], capsys)
    problems = err.strip().splitlines()
    assert code == 1 and len(problems) == 6 and all(line.startswith("error: ") for line in problems)
    assert f"{folder}/train.txt line 3: 5 labels, but line 1 has 4" in problems[0]
    assert "1 images listed more than once in the train split, e.g. " + str(folder / "images/000.png") in err
    assert "1 images of the train split have no label (all-zero row), e.g. " + str(folder / "images/001.png") in err
    assert "1 of the 24 listed images do not exist, e.g. " + str(folder / "images/020.png") in err
    assert "1 images cannot be decoded, e.g.: cannot read image " + str(folder / "images/021.png") in err
    assert problems[-1].startswith("error: 5 problems: --data_root")


def test_nuswide_sizes_and_an_unknown_database_list_are_protocol_mismatches(tmp_path, capsys):
    nuswide_folder(tmp_path)
    code, out, err = run_verify(["--dataset", "nuswide", "--data_root", str(tmp_path)], capsys)
    assert code == 1 and "nuswide, protocol: paper, 21 classes: train 16 (protocol 10,500)" in out
    assert "the query split has 8 images, the protocol 2,100" in err
    assert "nus_wide/train.txt is not the paper's list (unknown); delete it to use the shipped one" in err
    assert "nus_wide/database.txt is unknown (git blob " in err and "not the paper's list" in err


def test_in_memory_dataset_is_refused_in_one_line(capsys):
    code, _, err = run_verify(["--dataset", "digits"], capsys)
    assert code == 1 and err.strip() == ("error: --dataset digits is held in memory (no image files to verify); "
                                         "data.verify checks file datasets")
