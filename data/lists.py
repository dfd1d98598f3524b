"""Datasets in the list format: NUS-WIDE, MS-COCO, ImageNet-100 and a user's own data.

A folder holds train.txt, test.txt (the queries) and database.txt; each line is an image path
(relative to the folder, or absolute) followed by C labels 0/1, all separated by whitespace:

    images/0001_2124494179.jpg 0 1 0 0 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0

C is read from the lines and must be the same on every line of the three files (and equal to the
dataset's class count for nuswide/coco/imagenet). Empty lines are skipped; anything else that does not
fit is an error naming the file and line.
"""
from functools import partial
from pathlib import Path

import numpy as np

from utils.errors import UserError

from .base import DatasetSpec
from .files import LabelledPaths, file_splits, require_files

LIST_FILES = {"train": "train.txt", "query": "test.txt", "database": "database.txt"}


def parse_label_row(tokens, source, line_number, width=None, width_source=None):
    """One 0/1 label row from text tokens; `width`, when known, is the required length and
    `width_source` says where it comes from (for the message)."""
    if width is not None and len(tokens) != width:
        raise UserError(f"{source} line {line_number}: {len(tokens)} labels, but {width_source} has {width}")
    if not tokens or any(token not in ("0", "1") for token in tokens):
        raise UserError(f"{source} line {line_number}: expected labels 0 or 1 after the image path, got "
                        f"{' '.join(tokens[:8]) or 'nothing'}{' ...' if len(tokens) > 8 else ''}")
    return [token == "1" for token in tokens]


def read_list(list_file, num_classes=0, classes_from=None):
    """Paths (resolved against the list's folder) and (N, C) labels of one list file; C must equal
    num_classes when that is given (classes_from names its origin for the message)."""
    list_file = Path(list_file)
    try:
        lines = list_file.read_text(encoding="utf-8-sig").splitlines()  # -sig: drop a BOM (Windows editors)
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {list_file} ({getattr(exc, 'strerror', None) or exc}); the list format "
                        f"needs {', '.join(LIST_FILES.values())} in {list_file.parent} (see README, Datasets)") from None
    paths, rows = [], []
    width, width_source = (num_classes, classes_from) if num_classes else (None, None)
    for line_number, line in enumerate(lines, start=1):
        tokens = line.split()
        if not tokens:
            continue
        rows.append(parse_label_row(tokens[1:], list_file, line_number, width, width_source))
        paths.append(str(list_file.parent / tokens[0]))
        if width is None:
            width, width_source = len(rows[0]), f"line {line_number}"
    if not rows:
        raise UserError(f"{list_file} lists no images")
    return LabelledPaths(paths, np.array(rows, dtype=np.float32))


def read_folder(folder, num_classes=0, classes_from=None, allow_missing=False):
    """The three splits of a list-format folder, with the same C in all of them."""
    splits = {}
    for split, file_name in LIST_FILES.items():
        splits[split] = read_list(Path(folder) / file_name, num_classes, classes_from)
        require_files(splits[split].paths, Path(folder) / file_name, allow_missing)
        num_classes, classes_from = splits[split].labels.shape[1], file_name
    return splits


def build(name, subfolder, num_classes, root, seed, input_size, cache=False, skip_bad_images=False):
    del seed  # the lists fix the splits
    folder = Path(root) / subfolder
    if not folder.is_dir():
        raise UserError(f"no folder {folder}: it should hold {', '.join(LIST_FILES.values())} and the images "
                        "they list (see README, Datasets); or pass --data_root")
    splits = read_folder(folder, num_classes, f"--dataset {name}", skip_bad_images)
    return file_splits(name, splits["train"], splits["query"], splits["database"], input_size,
                       cache_dir=folder / "cache" if cache else None, skip_unreadable=skip_bad_images)


def list_spec(name, subfolder, num_classes, default_topk, summary):
    return DatasetSpec(name=name, num_classes=num_classes, default_topk=default_topk,
                       build=partial(build, name, subfolder, num_classes), summary=summary)


SPECS = [
    list_spec("nuswide", "nus_wide", 21, 5000, "NUS-WIDE (21 most frequent concepts), lists in DATA_ROOT/nus_wide"),
    list_spec("coco", "coco", 80, 5000, "MS-COCO (80 classes), lists in DATA_ROOT/coco"),
    list_spec("imagenet", "imagenet", 100, 1000, "ImageNet-100 (single label), lists in DATA_ROOT/imagenet"),
    list_spec("list", "", 0, 0, "your own data: DATA_ROOT/train.txt, test.txt, database.txt (path l1 ... lC)"),
]
