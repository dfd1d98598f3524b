"""Given class hierarchies for hierarchical proxies (--hierarchy_file, docs/METHOD.md §8.1).

A hierarchy file is a CSV with a header row `class,level1[,level2...]` and one row per class, in the
dataset's class order: the class's name, then the name of its group at each coarse level. Group
indices follow the order in which the names first appear. data/hierarchies/ ships the ones that exist:
voc.csv (person / animal / vehicle / indoor), coco.csv (COCO's 12 supercategories, in the alphabetical
class order of the deep-hashing lists, data/coco.py) and digits.csv (parity); `--hierarchy_file voc` names a shipped one.
"""
import csv
from pathlib import Path
from typing import NamedTuple

from utils.paths import MiB, read_text_file

SHIPPED = Path(__file__).resolve().parent / "hierarchies"
MAX_BYTES = 1 * MiB  # a class per row: COCO's 80 classes take 2 kB


class GivenHierarchy(NamedTuple):
    name: str            # the file's stem, for run names (hyp2_hpl-voc)
    levels: list         # per coarse level, the (C,) class -> group index list
    level_names: list    # per coarse level, the group names in index order


def resolve_path(text):
    """A path as given, else the shipped hierarchy of that name (voc, coco, digits)."""
    path = Path(text)
    if not path.exists() and (SHIPPED / f"{text}.csv").exists():
        return SHIPPED / f"{text}.csv"
    return path


def read_hierarchy(text, num_classes, class_names=()):
    """The GivenHierarchy in file `text` (or the shipped one of that name) for a dataset of `num_classes`
    classes; `class_names`, when the dataset has them, must match the class column. UserError when the file is
    missing, not a regular file (a FIFO would block, /dev/zero never end), over MAX_BYTES or not UTF-8;
    ValueError naming the file and line for anything else."""
    path = resolve_path(text)
    shipped = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.csv")))
    content = read_text_file(path, "--hierarchy_file", MAX_BYTES, missing=f"give a CSV file or one of {shipped}")
    try:
        rows = [[cell.strip() for cell in row] for row in csv.reader(content.splitlines())
                if any(cell.strip() for cell in row)]
    except csv.Error as exc:
        raise ValueError(f"{path} is not a CSV file ({exc})") from None
    if not rows or rows[0][0].lower() != "class" or len(rows[0]) < 2:
        raise ValueError(f"{path}: the first line must be the header class,level1[,level2...]")
    width, body = len(rows[0]), rows[1:]
    if len(body) != num_classes:
        raise ValueError(f"{path}: {len(body)} classes, but the dataset has {num_classes}; one row per class")
    levels, level_names = [[] for _ in range(width - 1)], [[] for _ in range(width - 1)]
    for line, row in enumerate(body, start=2):
        if len(row) != width or not all(row):
            raise ValueError(f"{path}, line {line}: expected {width} non-empty fields like the header, got {row}")
        if class_names and row[0] != class_names[line - 2]:
            raise ValueError(f"{path}, line {line}: class {row[0]!r}, but class {line - 2} of the dataset is "
                             f"{class_names[line - 2]!r}; list the classes in the dataset's order")
        for level, group in enumerate(row[1:]):
            if group not in level_names[level]:
                level_names[level].append(group)
            levels[level].append(level_names[level].index(group))
    for level, names in enumerate(level_names, start=1):
        if not 2 <= len(names) < num_classes:
            raise ValueError(f"{path}: level {level} has {len(names)} groups; a coarse level needs 2 to "
                             f"{num_classes - 1}")
    return GivenHierarchy(path.stem, levels, level_names)
