"""Build coco/labels.txt from COCO's official annotations and check the shipped lists against them:

    python -m data.coco_lists --annotations DIR [--data_root ./data]

DIR holds instances_train2014.json and instances_val2014.json (from annotations_trainval2014.zip). Every image with
at least one instance annotation gets a row of 80 labels 0/1, the categories in alphabetical order of their names
(the column order of both published list families, data/coco.py); images without any are dropped (122,218 of the
123,287 remain). Rows are sorted by image path. Every image a shipped list names must be there with the same labels,
and each variant's rebuilt database must count 117,218; otherwise nothing is written.
"""
import argparse
from pathlib import Path

import numpy as np

from utils.atomic import atomic_write
from utils.documents import read_json_file
from utils.errors import UserError, run_reporting_errors
from utils.paths import MiB, check_output_target, open_regular
from utils.runlog import progress_bar

from . import coco
from .coco_paths import image_key, keyed_lines
from .protocol import shipped_bytes

ANNOTATION_FILES = ("instances_train2014.json", "instances_val2014.json")
MAX_ANNOTATION_BYTES = 2048 * MiB  # instances_train2014.json is about 330 MB


def read_annotations(path):
    """The JSON object of one instances_*.json, with its images, annotations and categories."""
    document = read_json_file(path, "the annotation file", MAX_ANNOTATION_BYTES, fix="download it again",
                              missing="pass --annotations DIR holding COCO's instances_*2014.json")
    if not isinstance(document, dict) or not all(isinstance(document.get(key), list)
                                                 for key in ("images", "annotations", "categories")):
        raise UserError(f"the annotation file {path} has no images, annotations and categories lists: is it COCO's "
                        "instances file?")
    return document


def category_columns(document, path):
    """{category id: label column}: the column of its name in coco.CLASS_NAMES."""
    names = {category["id"]: category["name"] for category in document["categories"]}
    if sorted(names.values()) != sorted(coco.CLASS_NAMES):
        raise UserError(f"the annotation file {path} has {len(names)} categories, not COCO's 80 (e.g. "
                        f"{sorted(set(names.values()) ^ set(coco.CLASS_NAMES))[:3]} differ)")
    return {category_id: coco.CLASS_NAMES.index(name) for category_id, name in names.items()}


def image_names(document, path):
    """{image id: 'train2014/COCO_train2014_N.jpg'}: each file name under the folder its name says."""
    names = {}
    for image in document["images"]:
        file_name = str(image.get("file_name", ""))
        key = image_key(f"{file_name.split('_')[1] if file_name.count('_') >= 2 else ''}/{file_name}")
        if key is None:
            raise UserError(f"the annotation file {path}: image {image.get('id')} has the file name {file_name!r}, "
                            "not a COCO-2014 one")
        names[image["id"]] = key
    return names


def label_rows(annotation_dir):
    """{image path: 80 bools}, sorted by path, of every annotated image in the annotation files."""
    rows = {}
    for file_name in ANNOTATION_FILES:
        path = Path(annotation_dir) / file_name
        document = read_annotations(path)
        columns, names = category_columns(document, path), image_names(document, path)
        for annotation in progress_bar(document["annotations"], desc=f"labels of {file_name}", unit="object"):
            image, category = annotation.get("image_id"), annotation.get("category_id")
            if image not in names or category not in columns:
                raise UserError(f"the annotation file {path}: annotation {annotation.get('id')} names image {image} "
                                f"and category {category}, which it does not list")
            rows.setdefault(names[image], np.zeros(len(coco.CLASS_NAMES), dtype=bool))[columns[category]] = True
    return dict(sorted(rows.items()))


def shipped_problems(rows, expected_labelled):
    """One line per way the shipped lists disagree with the rows: images they name that are not there, other
    labels, a rebuilt database of the wrong size."""
    problems = []
    if len(rows) != expected_labelled:
        problems.append(f"{len(rows):,} labelled images, not the {expected_labelled:,} of COCO 2014")
    for variant, (_, query_file, train_file) in coco.VARIANTS.items():
        for file_name in (query_file, train_file):
            absent, differ = [], []
            for line in keyed_lines(shipped_bytes(file_name).decode(), file_name):
                key, labels = line.split(" ", 1)
                if key not in rows:
                    absent.append(key)
                elif labels.split() != ["1" if value else "0" for value in rows[key]]:
                    differ.append(key)
            if absent or differ:
                problems.append(f"data/splits/{file_name}.gz: {len(absent):,} images not annotated, {len(differ):,} "
                                f"with other labels (e.g. {(absent + differ)[0]})")
    return problems


def write_labels(rows, path):
    atomic_write(path, lambda handle: handle.writelines(
        f"{key} {' '.join('1' if value else '0' for value in row)}\n" for key, row in rows.items()))


def is_labels_file(path):
    with open_regular(path, "labels file", MAX_ANNOTATION_BYTES) as handle:
        return image_key(handle.readline(200).split(b" ")[0].decode(errors="replace")) is not None


def build_labels(annotation_dir, data_root, expected_labelled=None):
    """Write DATA_ROOT/coco/labels.txt from the annotations once they agree with the shipped lists."""
    target = Path(data_root) / coco.FOLDER / coco.LABELS_FILE
    check_output_target(target, "the labels file", earlier_output=("an earlier labels.txt of data.coco_lists",
                                                                    is_labels_file))
    rows = label_rows(annotation_dir)
    problems = shipped_problems(rows, expected_labelled or coco.LABELLED_IMAGES)
    if problems:
        raise UserError("; ".join(problems) + f": {annotation_dir} does not hold COCO 2014's complete annotations "
                                              "(nothing written)")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_labels(rows, target)
    print(f"{len(rows):,} labelled images (each variant's database: {len(rows) - 5000:,}); the shipped HashNet and "
          f"DeepHash-pytorch lists agree with the annotations; wrote {target}")
    return target


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m data.coco_lists", description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotations", required=True, metavar="DIR",
                        help="folder holding instances_train2014.json and instances_val2014.json")
    parser.add_argument("--data_root", default="./data", help="labels.txt goes to DATA_ROOT/coco/")
    args = parser.parse_args(argv)
    return run_reporting_errors(lambda: build_labels(args.annotations, args.data_root))


if __name__ == "__main__":
    main()
