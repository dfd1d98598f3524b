"""The list format (nuswide, coco, imagenet, list): good folders read exactly, malformed ones stop with
the file and line, and the CLI trains and tests on a folder of PNGs."""
import numpy as np
import pytest

import retrieval
from data import get_dataset_spec
from fixture_files import small_list_folder, write_list_folder
from utils.errors import UserError

GOOD = {
    "train.txt": [("img/a.png", [1, 0, 0]), ("img/b.png", [0, 1, 1]), ("img/c.png", [0, 0, 1]),
                  ("img/d.png", [1, 1, 0])],
    "test.txt": [("img/q1.png", [1, 0, 1]), ("img/q2.png", [0, 1, 0])],
    "database.txt": [("img/a.png", [1, 0, 0]), ("img/b.png", [0, 1, 1]), ("img/c.png", [0, 0, 1]),
                     ("img/d.png", [1, 1, 0]), ("img/e.png", [0, 0, 1])],
}


def test_good_folder_is_read_exactly(tmp_path):
    write_list_folder(tmp_path, GOOD)
    (tmp_path / "test.txt").write_text("\n" + (tmp_path / "test.txt").read_text() + "\n\n")  # blank lines are fine
    splits = get_dataset_spec("list").build(tmp_path, seed=0, preprocessing=24)
    assert splits.query.paths == [str(tmp_path / "img/q1.png"), str(tmp_path / "img/q2.png")]
    np.testing.assert_array_equal(splits.query.labels.numpy(), [[1, 0, 1], [0, 1, 0]])
    np.testing.assert_array_equal(splits.train.labels.numpy(), [[1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 1, 0]])
    assert len(splits.database) == 5 and splits.database.paths[4].endswith("img/e.png")
    image, label = splits.database[4]
    assert image.shape == (3, 24, 24) and label.tolist() == [0, 0, 1]
    assert get_dataset_spec("list").with_classes_of(splits).num_classes == 3


@pytest.mark.parametrize("file_name, text, message", [
    ("test.txt", "img/q1.png 1 0 1\nimg/q2.png 0 2 0\n", r"test\.txt line 2: expected labels 0 or 1 .* got 0 2 0"),
    ("train.txt", "img/a.png 1 0 1\n\nimg/b.png 0 1\n", r"train\.txt line 3: 2 labels, but line 1 has 3"),
    ("database.txt", "img/a.png 1 0 0 0\n", r"database\.txt line 1: 4 labels, but test\.txt has 3"),
    ("train.txt", "img/a.png\n", r"train\.txt line 1: expected labels 0 or 1 after the image path, got nothing"),
    ("train.txt", "img/missing.png 1 0 0\nimg/a.png 0 1 0\n", r"1 of the 2 images listed in .*train\.txt do not "
                                                               r"exist, e.g. .*img/missing\.png"),
    ("train.txt", "", r"train\.txt lists no images"),
])
def test_malformed_lists_name_file_and_line(tmp_path, file_name, text, message):
    write_list_folder(tmp_path, GOOD)
    (tmp_path / file_name).write_text(text)
    with pytest.raises(UserError, match=message):
        get_dataset_spec("list").build(tmp_path, seed=0, preprocessing=24)


def test_missing_list_file_and_folder(tmp_path):
    write_list_folder(tmp_path, GOOD)
    (tmp_path / "database.txt").unlink()
    with pytest.raises(UserError, match=r"database\.txt does not exist: the list format needs train\.txt, test\.txt, "
                                        r"database\.txt"):
        get_dataset_spec("list").build(tmp_path, seed=0, preprocessing=24)
    with pytest.raises(UserError, match=r"no folder .*nus_wide: it should hold database\.txt and the images they list "
                                        r"\(train\.txt and test\.txt ship in data/splits/\)"):
        get_dataset_spec("nuswide").build(tmp_path, seed=0, preprocessing=24)


def test_named_list_datasets_read_their_folder_and_check_the_class_count(tmp_path):
    write_list_folder(tmp_path / "nus_wide", {name: [(path, labels * 7) for path, labels in rows]
                                              for name, rows in GOOD.items()})  # 21 labels
    splits = get_dataset_spec("nuswide").build(tmp_path, seed=0, preprocessing=24)
    assert splits.train.labels.shape == (4, 21) and splits.train.paths[0] == str(tmp_path / "nus_wide/img/a.png")
    write_list_folder(tmp_path / "coco", GOOD)
    with pytest.raises(UserError, match=r"coco/train\.txt line 1: 3 labels, but --dataset coco has 80"):
        get_dataset_spec("coco").build(tmp_path, seed=0, preprocessing=24)
    assert get_dataset_spec("imagenet").default_topk == 1000 and get_dataset_spec("coco").default_topk == 5000


def test_cli_trains_and_tests_on_a_list_folder(tmp_path, capsys):
    folder = small_list_folder(tmp_path / "mine")
    common = ["--dataset", "list", "--data_root", str(folder), "--backbone", "small", "--hash_bit", "16",
              "--batch_size", "8", "--epochs", "2", "--eval_every", "1", "--device", "cpu", "--workers", "0",
              "--output_dir", str(tmp_path / "out")]
    trained = retrieval.main(retrieval.get_args_parser().parse_args(common))
    out = capsys.readouterr().out
    assert "list / small / 16 bits: {'train': 16, 'query': 8, 'database': 16}" in out
    assert trained["topk"] == 16  # K = the whole database
    tested = retrieval.main(retrieval.get_args_parser().parse_args(common + ["--test"]))
    assert tested["map"] == trained["map"]


def test_unreadable_image_is_one_line_naming_the_file(tmp_path, capsys):
    folder = small_list_folder(tmp_path / "mine")
    (folder / "images" / "003.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit):
        retrieval.cli(["--dataset", "list", "--data_root", str(folder), "--backbone", "small", "--epochs", "1",
                       "--batch_size", "4", "--device", "cpu", "--workers", "1", "--no_save"])
    err = capsys.readouterr().err
    last = err.split("\r")[-1]  # after the progress bar
    assert last.startswith(f"error: cannot read image {folder / 'images' / '003.png'} (")
    assert last.strip().count("\n") == 0 and "Traceback" not in err
