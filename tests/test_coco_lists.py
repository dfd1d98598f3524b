"""python -m data.coco_lists: COCO's annotation files to labels.txt, checked against the shipped lists."""
from pathlib import Path

import numpy as np
import pytest

from data import coco, coco_lists
from data.base import DataOptions
from tests.cli_runs import exit_status
from tests.fixture_files import shipped_coco_rows, write_coco_annotations
from utils.errors import UserError

PERSON, ZEBRA, AIRPLANE = 49, 79, 0  # alphabetical columns: airplane first, zebra last, person the 50th


def hand_rows(*columns):
    return " ".join("1" if column in columns else "0" for column in range(80))


def test_labels_of_a_hand_made_annotation_fixture(tmp_path):
    rows = {"val2014/COCO_val2014_000000000042.jpg": hand_rows(PERSON, ZEBRA),
            "train2014/COCO_train2014_000000000009.jpg": hand_rows(AIRPLANE)}
    folder = write_coco_annotations(tmp_path / "annotations", rows,
                                    unlabelled=["train2014/COCO_train2014_000000000001.jpg"])
    labels = coco_lists.label_rows(folder)
    assert list(labels) == ["train2014/COCO_train2014_000000000009.jpg", "val2014/COCO_val2014_000000000042.jpg"]
    assert np.flatnonzero(labels["val2014/COCO_val2014_000000000042.jpg"]).tolist() == [49, 79]
    assert np.flatnonzero(labels["train2014/COCO_train2014_000000000009.jpg"]).tolist() == [0]
    assert coco.CLASS_NAMES[PERSON] == "person" and coco.CLASS_NAMES[ZEBRA] == "zebra"


@pytest.fixture(scope="module")
def published_rows():
    return {**shipped_coco_rows("hashnet", "deephash"),
            "val2014/COCO_val2014_000000999991.jpg": hand_rows(PERSON)}


def test_labels_file_from_annotations_agreeing_with_the_shipped_lists(tmp_path, published_rows, monkeypatch, capsys):
    folder = write_coco_annotations(tmp_path / "annotations", published_rows,
                                    unlabelled=["val2014/COCO_val2014_000000999990.jpg"])
    target = coco_lists.build_labels(folder, tmp_path / "root", expected_labelled=len(published_rows))
    expected = "".join(f"{name} {published_rows[name]}\n" for name in sorted(published_rows))
    assert target == tmp_path / "root" / "coco" / "labels.txt" and target.read_text() == expected
    assert f"{len(published_rows):,} labelled images" in capsys.readouterr().out
    monkeypatch.setattr(coco, "DATABASE_SIZE", len(published_rows) - 5000)
    splits = coco.list_splits(tmp_path / "root", options=DataOptions(split_variant="hashnet"))
    assert len(splits["database"].paths) == len(published_rows) - 5000


def test_annotations_that_disagree_with_a_shipped_list_write_nothing(tmp_path, published_rows):
    query = next(iter(shipped_coco_rows("deephash")))  # the first DeepHash-pytorch query, in its test.txt
    changed = dict(published_rows)
    changed[query] = hand_rows(ZEBRA) if published_rows[query] != hand_rows(ZEBRA) else hand_rows(AIRPLANE)
    del changed[next(iter(shipped_coco_rows("hashnet")))]
    folder = write_coco_annotations(tmp_path / "annotations", changed)
    with pytest.raises(UserError) as refused:
        coco_lists.build_labels(folder, tmp_path / "root", expected_labelled=len(changed))
    message = str(refused.value)
    assert "coco_hashnet_test.txt.gz: 1 images not annotated, 0 with other labels" in message
    assert f"coco_deephash_test.txt.gz: 0 images not annotated, 1 with other labels (e.g. {query})" in message
    assert not (tmp_path / "root" / "coco").exists()


def test_an_incomplete_annotation_set_is_refused_by_count(tmp_path, published_rows, capsys):
    folder = write_coco_annotations(tmp_path / "annotations", published_rows)
    code, _, err = exit_status(coco_lists.main, ["--annotations", str(folder), "--data_root", str(tmp_path)], capsys)
    assert code == 1 and err.count("\n") == 1
    assert f"error: {len(published_rows):,} labelled images, not the 122,218 of COCO 2014" in err


def test_missing_annotations_are_one_line(tmp_path, capsys):
    code, _, err = exit_status(coco_lists.main, ["--annotations", str(tmp_path)], capsys)
    assert code == 1 and err.strip() == (f"error: the annotation file {Path(tmp_path) / 'instances_train2014.json'} "
                                         "does not exist: pass --annotations DIR holding COCO's instances_*2014.json")
