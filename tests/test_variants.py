"""data.variants and `python -m data.verify --identify`: each published list is named by its fingerprint; a
moved copy of a COCO list still is; a shuffled, edited or truncated copy is not."""
import gzip
from pathlib import Path

import pytest

from data import coco, verify
from data.variants import NOT_PUBLISHED, identify_list
from tests.cli_runs import exit_status
from tests.fixture_files import write_list_folder

SPLITS = Path(__file__).resolve().parents[1] / "data" / "splits"
SHIPPED_VARIANTS = {"coco_hashnet_test.txt": "COCO, HashNet lists", "coco_hashnet_train.txt": "COCO, HashNet lists",
                    "coco_deephash_test.txt": "COCO, DeepHash-pytorch lists",
                    "coco_deephash_train.txt": "COCO, DeepHash-pytorch lists",
                    "nuswide21_train.txt": "NUS-WIDE, the paper's lists",
                    "nuswide21_test.txt": "NUS-WIDE, the paper's lists",
                    "flickr25k_img.txt": "Flickr-25k, the paper's split",
                    "flickr25k_targets.txt": "Flickr-25k, the paper's split",
                    "flickr25k_permutation.json": "Flickr-25k, the paper's split"}


def unpacked(name, folder):
    path = Path(folder) / name
    path.write_bytes(gzip.decompress((SPLITS / f"{name}.gz").read_bytes()))
    return path


@pytest.mark.parametrize("name", sorted(SHIPPED_VARIANTS))
def test_each_shipped_file_is_named(name, tmp_path):
    assert identify_list(unpacked(name, tmp_path))[0] == SHIPPED_VARIANTS[name]


def test_a_hashnet_list_moved_to_another_folder_is_still_named(tmp_path):
    lines = unpacked("coco_hashnet_test.txt", tmp_path).read_text().splitlines()
    moved = tmp_path / "moved.txt"
    moved.write_text("".join("/data/coco/" + "/".join(line.split(" ", 1)[0].split("/")[-2:]) + " "
                             + line.split(" ", 1)[1] + "\n" for line in lines))
    assert identify_list(moved) == ("COCO, HashNet lists", "the queries, test.txt; HashNet's caffe test0-7.txt "
                                                          "hold the same")


@pytest.mark.parametrize("change", ["shuffled", "edited", "truncated"])
@pytest.mark.parametrize("name", ["coco_deephash_train.txt", "nuswide21_test.txt"])
def test_a_changed_copy_is_not_a_published_variant(name, change, tmp_path):
    lines = unpacked(name, tmp_path).read_text().splitlines(keepends=True)
    if change == "shuffled":
        lines[0], lines[1] = lines[1], lines[0]
    elif change == "edited":
        path, labels = lines[5].split(" ", 1)
        lines[5] = path + " " + ("1" if labels[0] == "0" else "0") + labels[1:]
    else:
        lines = lines[:-1]
    copy = tmp_path / "copy.txt"
    copy.write_text("".join(lines))
    variant, blob = identify_list(copy)
    assert variant == NOT_PUBLISHED and blob.startswith("git blob ")


def test_identify_prints_one_line_per_file(tmp_path, capsys):
    named = unpacked("coco_deephash_test.txt", tmp_path)
    other = tmp_path / "mine.txt"
    other.write_text("img/a.jpg 0 1\n")  # `git hash-object` of it: ccb144b
    code, out, _ = exit_status(verify.main, ["--identify", str(named), str(other)], capsys)
    assert code == 0 and out.splitlines() == [
        f"{named}: COCO, DeepHash-pytorch lists (DeepHash-pytorch data/coco/test.txt)",
        f"{other}: not a published variant (git blob ccb144b5fd02893c39070c59ec007a007c68a7fe)"]


def test_verify_without_a_dataset_or_files_is_one_line(capsys):
    code, _, err = exit_status(verify.main, [], capsys)
    assert code == 1 and err == "error: python -m data.verify needs --dataset NAME (or --identify FILE ...)\n"


def test_a_run_on_own_coco_lists_records_what_each_file_is(tmp_path):
    rows = {"train.txt": [("train2014/COCO_train2014_000000000009.jpg", [1] + [0] * 79)],
            "test.txt": [("val2014/COCO_val2014_000000000042.jpg", [1] + [0] * 79)],
            "database.txt": [("train2014/COCO_train2014_000000000009.jpg", [1] + [0] * 79)]}
    write_list_folder(tmp_path / "coco", rows)
    (tmp_path / "coco" / "test.txt").write_bytes(gzip.decompress((SPLITS / "coco_hashnet_test.txt.gz").read_bytes()))
    described = coco.describe(tmp_path)
    assert described["split_variant"] == "own"
    assert described["coco/test.txt"].startswith("COCO, HashNet lists (thuml/HashNet pytorch/data/coco/test.txt)")
    assert described["coco/train.txt"].startswith("not a published variant (git blob ")
