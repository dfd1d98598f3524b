"""Datasets in the list format: NUS-WIDE, ImageNet-100, a user's own data, and MS-COCO's own lists (data/coco.py).

A folder holds train.txt, test.txt (the queries) and database.txt; each line is an image path
(relative to the folder, or absolute) followed by C labels 0/1, all separated by whitespace:

    images/0001_2124494179.jpg 0 1 0 0 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0

C is read from the lines and must be the same on every line of the three files (and equal to the
dataset's class count for nuswide/coco/imagenet). Empty lines are skipped; anything else that does not
fit is an error naming the file and line.

NUS-WIDE's train.txt and test.txt ship in data/splits/ (the paper's, data/protocol.py): a nus_wide/ folder
needs only database.txt and the images; its own train.txt/test.txt, if present, are used instead.
"""
from functools import partial
from pathlib import Path

import numpy as np

from utils.errors import UserError
from utils.paths import read_text_file

from .base import DataOptions, DatasetSpec
from .files import LabelledPaths, file_splits
from .protocol import MAX_LIST_BYTES, identify, nuswide_database_variant, shipped_bytes

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


def parse_list(lines, source, base, num_classes=0, classes_from=None, problems=None):
    """LabelledPaths of a list file's lines: paths resolved against the folder `base`, (N, C) labels with
    C = num_classes when given (classes_from names its origin for the message). A bad line raises
    UserError, or, when a `problems` list is given, is recorded there and left out."""
    paths, rows = [], []
    width, width_source = (num_classes, classes_from) if num_classes else (None, None)
    for line_number, line in enumerate(lines, start=1):
        tokens = line.split()
        if not tokens:
            continue
        try:
            rows.append(parse_label_row(tokens[1:], source, line_number, width, width_source))
        except UserError as exc:
            if problems is None:
                raise
            problems.append(str(exc))
            continue
        paths.append(str(Path(base) / tokens[0]))
        if width is None:
            width, width_source = len(rows[0]), f"line {line_number}"
    if not rows and problems is None:
        raise UserError(f"{source} lists no images")
    labels = np.array(rows, dtype=np.float32).reshape(len(rows), width or 0)
    return LabelledPaths(paths, labels, str(source))


def read_list(list_file, num_classes=0, classes_from=None, problems=None):
    """parse_list of a list file, paths relative to its folder."""
    list_file = Path(list_file)
    lines = read_text_file(list_file, "the list", MAX_LIST_BYTES, missing=(
        f"the list format needs {', '.join(LIST_FILES.values())} in {list_file.parent} (see README, Datasets)")
    ).splitlines()
    return parse_list(lines, list_file, list_file.parent, num_classes, classes_from, problems)


def shipped_list(name, base, num_classes, classes_from, problems=None):
    """A list shipped in data/splits/ (the paper's), paths relative to the dataset folder `base`."""
    lines = shipped_bytes(name).decode().splitlines()
    return parse_list(lines, f"data/splits/{name}.gz (shipped)", base, num_classes, classes_from, problems)


def list_splits(name, subfolder, num_classes, root, seed=0, options=None, problems=None):
    """The three splits of a list-format folder, with the same C in all of them. NUS-WIDE's train.txt and
    test.txt are the shipped (paper's) lists unless the folder holds its own."""
    del seed, options  # the lists fix the splits
    folder = Path(root) / subfolder
    if not folder.is_dir():
        shipped = [file_name for file_name in LIST_FILES.values() if (name, file_name) in SHIPPED_LISTS]
        needed = [file_name for file_name in LIST_FILES.values() if file_name not in shipped]
        raise UserError(f"no folder {folder}: it should hold {', '.join(needed)} and the images they list"
                        + (f" ({' and '.join(shipped)} ship in data/splits/)" if shipped else "")
                        + " (see README, Datasets); or pass --data_root")
    splits, classes_from = {}, f"--dataset {name}"
    for split, file_name in LIST_FILES.items():
        shipped = SHIPPED_LISTS.get((name, file_name))
        if shipped and not (folder / file_name).exists():
            splits[split] = shipped_list(shipped, folder, num_classes, classes_from, problems)
        else:
            splits[split] = read_list(folder / file_name, num_classes, classes_from, problems)
        if splits[split].labels.shape[1]:
            num_classes, classes_from = splits[split].labels.shape[1], file_name
    return splits


def build(name, subfolder, num_classes, root, seed, preprocessing, options=DataOptions()):
    splits = list_splits(name, subfolder, num_classes, root)
    return file_splits(name, splits, preprocessing, cache_dir=options.cache_folder(Path(root) / subfolder),
                       options=options)


def describe_nuswide(root, options=None):
    """What the run log records of the NUS-WIDE lists in use: where train/test come from and which
    database.txt variant the folder holds (docs/METHOD.md §4)."""
    del options  # the lists fix the split
    folder = Path(root) / "nus_wide"
    described = {file_name: "shipped (the paper's)" if not (folder / file_name).exists()
                 else identify(folder / file_name)[1] for file_name in ("train.txt", "test.txt")}
    database = folder / "database.txt"
    described["database.txt"] = nuswide_database_variant(database) if database.is_file() else "missing"
    return described


def list_spec(name, subfolder, num_classes, default_topk, summary, describe=None):
    return DatasetSpec(name=name, num_classes=num_classes, default_topk=default_topk,
                       build=partial(build, name, subfolder, num_classes),
                       list_splits=partial(list_splits, name, subfolder, num_classes), summary=summary,
                       describe=describe)


SHIPPED_LISTS = {("nuswide", "train.txt"): "nuswide21_train.txt", ("nuswide", "test.txt"): "nuswide21_test.txt"}
SPECS = [
    list_spec("nuswide", "nus_wide", 21, 5000, "NUS-WIDE (21 most frequent concepts), lists in DATA_ROOT/nus_wide; "
              "train.txt and test.txt ship (the paper's)", describe=describe_nuswide),
    list_spec("imagenet", "imagenet", 100, 1000, "ImageNet-100 (single label), lists in DATA_ROOT/imagenet"),
    list_spec("list", "", 0, 0, "your own data: DATA_ROOT/train.txt, test.txt, database.txt (path l1 ... lC)"),
]
