"""MIRFlickr-25k: built from the official annotation files or read from img.txt + targets.txt, and split
by a seeded permutation that is saved next to the data and reused."""
import json

import numpy as np
import pytest

from data import DataOptions, flickr, get_dataset_spec
from fixture_files import write_image
from utils.errors import UserError

# Image number -> its annotation files, for 30 images; 7 and 19 have none and must be dropped.
ANNOTATED = {
    1: ["sky", "clouds", "clouds_r1"], 2: ["dog", "dog_r1", "animals"], 3: ["people", "female"],
    4: ["night"], 5: ["water", "sea", "sea_r1"], 6: ["tree"], 8: ["indoor", "food"], 9: ["car", "transport"],
    10: ["flower", "plant_life", "flower_r1"], 11: ["portrait", "people", "male", "male_r1"], 12: ["lake"],
    13: ["river", "river_r1"], 14: ["baby", "baby_r1"], 15: ["bird", "bird_r1"], 16: ["structures"],
    17: ["sunset", "sky"], 18: ["night_r1", "night"], 20: ["tree_r1", "tree"], 21: ["people_r1", "people"],
    22: ["female_r1", "female"], 23: ["portrait_r1", "portrait"], 24: ["car_r1", "car"], 25: ["animals"],
    26: ["sky"], 27: ["water"], 28: ["clouds"], 29: ["indoor"], 30: ["structures", "sky"],
}
SEVENTEEN_COLUMNS = ["sky", "sunset"]  # image 17's labels, by name
RANDOM = DataOptions(split="random")  # these tests are of the seeded split over the user's labels


@pytest.fixture
def small_protocol(monkeypatch):
    monkeypatch.setattr(flickr, "QUERY_SIZE", 5)
    monkeypatch.setattr(flickr, "TRAIN_SIZE", 10)


def write_official(root):
    folder = root / "flickr25k"
    rng = np.random.default_rng(0)
    for number in range(1, 31):
        write_image(folder / "mirflickr" / f"im{number}.jpg", rng, 20, 16)
    (folder / "annotations").mkdir()
    for name in flickr.LABELS:
        numbers = [n for n, labels in ANNOTATED.items() if name in labels]
        (folder / "annotations" / f"{name}.txt").write_text("".join(f"{n}\n" for n in numbers))
    return folder


def label_names(row):
    return sorted(flickr.LABELS[i] for i in np.flatnonzero(row))


def test_38_labels_are_the_24_concepts_and_14_relevant_files():
    assert len(flickr.LABELS) == 38 and len(set(flickr.LABELS)) == 38
    assert sum(name.endswith("_r1") for name in flickr.LABELS) == 14


def test_official_annotations(tmp_path, small_protocol):
    write_official(tmp_path)
    splits = get_dataset_spec("flickr").build(tmp_path, seed=0, preprocessing=16, options=RANDOM)
    everything = {}
    for part in splits:
        for path, row in zip(part.paths, part.labels.numpy()):
            everything[path.rsplit("/", 1)[1]] = label_names(row)
    assert len(everything) == 28 and "im7.jpg" not in everything and "im19.jpg" not in everything
    assert everything == {f"im{n}.jpg": sorted(labels) for n, labels in ANNOTATED.items()}
    assert everything["im17.jpg"] == SEVENTEEN_COLUMNS
    assert (len(splits.query), len(splits.train), len(splits.database)) == (5, 10, 13)
    query, train, database = (set(part.paths) for part in splits)
    assert not (query & train) and not (query & database) and not (train & database)  # the paper's code


def test_split_is_saved_reused_and_seeded(tmp_path, small_protocol):
    folder = write_official(tmp_path)
    first = get_dataset_spec("flickr").build(tmp_path, seed=3, preprocessing=16, options=RANDOM)
    saved = json.loads((folder / "split_seed3.json").read_text())
    assert saved["seed"] == 3 and len(saved["order"]) == 28
    assert [p.rsplit("/", 1)[1] for p in first.query.paths] == [n.rsplit("/", 1)[1] for n in saved["order"][:5]]

    # A saved split is used as it is: reversing the file reverses the split.
    saved["order"].reverse()
    (folder / "split_seed3.json").write_text(json.dumps(saved))
    reused = get_dataset_spec("flickr").build(tmp_path, seed=3, preprocessing=16, options=RANDOM)
    assert [p.rsplit("/", 1)[1] for p in reused.query.paths] == [n.rsplit("/", 1)[1] for n in saved["order"][:5]]

    # Without the file the same seed draws the same split again; another seed another one.
    (folder / "split_seed3.json").unlink()
    spec = get_dataset_spec("flickr")
    assert spec.build(tmp_path, seed=3, preprocessing=16, options=RANDOM).query.paths == first.query.paths
    assert spec.build(tmp_path, seed=4, preprocessing=16, options=RANDOM).query.paths != first.query.paths


def test_saved_split_of_other_images_is_refused(tmp_path, small_protocol):
    folder = write_official(tmp_path)
    (folder / "split_seed0.json").write_text(json.dumps({"seed": 0, "order": ["mirflickr/im1.jpg"]}))
    with pytest.raises(UserError, match=r"split_seed0\.json lists other images \(1\) than .* holds \(28\)"):
        get_dataset_spec("flickr").build(tmp_path, seed=0, preprocessing=16, options=RANDOM)


def test_prepared_img_and_targets_files(tmp_path, small_protocol):
    folder = write_official(tmp_path)
    numbers = [30, 2, 17, 5, 11, 1, 3, 4, 6, 8, 9, 10, 12, 13, 14, 15, 16, 18]
    rows = []
    for n in numbers:
        row = ["1" if name in ANNOTATED[n] else "0" for name in flickr.LABELS]
        rows.append(" ".join(row))
    bom = "\ufeff"  # as Windows editors save them; not part of the first name or label
    (folder / "img.txt").write_text(bom + "".join(f"im{n}.jpg\n" for n in numbers), encoding="utf-8")
    (folder / "targets.txt").write_text(bom + "\n".join(rows) + "\n", encoding="utf-8")
    splits = get_dataset_spec("flickr").build(tmp_path, seed=0, preprocessing=16, options=RANDOM)
    read = {path.rsplit("/", 1)[1]: label_names(row) for part in splits for path, row in zip(part.paths, part.labels.numpy())}
    assert read == {f"im{n}.jpg": sorted(ANNOTATED[n]) for n in numbers}
    assert len(splits.database) == len(numbers) - 15

    rows[3] = rows[3][:-2]  # 37 labels on line 4
    (folder / "targets.txt").write_text("\n".join(rows) + "\n")
    with pytest.raises(UserError, match=r"targets\.txt line 4: 37 labels, but MIRFlickr-25k has 38"):
        get_dataset_spec("flickr").build(tmp_path, seed=0, preprocessing=16, options=RANDOM)


def test_bad_annotation_line_and_missing_folder(tmp_path, small_protocol):
    folder = write_official(tmp_path)
    (folder / "annotations" / "sky.txt").write_text("1\n17\nim26\n")
    with pytest.raises(UserError, match=r"sky\.txt line 3: expected an image number 1\.\.25000, got 'im26'"):
        get_dataset_spec("flickr").build(tmp_path, seed=0, preprocessing=16, options=RANDOM)
    with pytest.raises(UserError, match=r"no MIRFlickr-25k images in .*elsewhere/flickr25k/mirflickr: put the images"):
        get_dataset_spec("flickr").build(tmp_path / "elsewhere", seed=0, preprocessing=16, options=RANDOM)
