"""MIRFlickr-25k as a multi-label retrieval dataset (38 labels).

Folder DATA_ROOT/flickr25k/ with the images in mirflickr/ (im1.jpg ... im25000.jpg).

--split paper (the default) is the paper's fixed split (docs/METHOD.md §4), from the files that ship in
data/splits/: img.txt (24,581 image names), targets.txt (their 38 labels) and the permutation perm;
query = perm[:1000], train = perm[1000:5000], database = perm[5000:] (19,581). Only the images are needed.

--split random draws a permutation from --seed instead, over labels in either form:
- prepared (the paper's): img.txt (one image name per line, relative to mirflickr/) and targets.txt
  (38 labels 0/1 per line, same order);
- official: annotations/ with the 38 files of mirflickr25k_annotations_v080.zip that list image
  numbers: the 24 concept files and the 14 *_r1 ("relevant") files. Labels follow the alphabetical
  order of the file names; images with no label are dropped (24,581 remain).
The permutation is drawn once and saved as flickr25k/split_seed{seed}.json (image names in permuted
order), which later runs reuse.
"""
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from utils.atomic import write_json
from utils.documents import read_json_file
from utils.errors import UserError
from utils.paths import read_text_file
from utils.runlog import warn

from .base import DataOptions, DatasetSpec
from .files import LabelledPaths, file_splits
from .lists import parse_label_row
from .protocol import MAX_LIST_BYTES, shipped_bytes

FOLDER = "flickr25k"
IMAGES = "mirflickr"
CONCEPTS = ("animals", "baby", "bird", "car", "clouds", "dog", "female", "flower", "food", "indoor", "lake", "male",
            "night", "people", "plant_life", "portrait", "river", "sea", "sky", "structures", "sunset", "transport",
            "tree", "water")
RELEVANT = ("baby", "bird", "car", "clouds", "dog", "female", "flower", "male", "night", "people", "portrait", "river",
            "sea", "tree")
LABELS = tuple(sorted(CONCEPTS + tuple(f"{name}_r1" for name in RELEVANT)))
NUM_IMAGES = 25000
MAX_SAVED_SPLIT_BYTES = 16 << 20  # a saved split names 25,000 images (~0.4 MB)
QUERY_SIZE, TRAIN_SIZE = 1000, 4000  # query = order[:1000], train = order[1000:5000], database = the rest


def read_prepared(folder):
    """(names relative to folder, labels) from img.txt and targets.txt."""
    img_txt, targets_txt = folder / "img.txt", folder / "targets.txt"
    return parse_prepared(*(read_text_file(path, "the Flickr list", MAX_LIST_BYTES) for path in (img_txt, targets_txt)),
                          img_txt, targets_txt)


def parse_prepared(img_text, targets_text, img_txt, targets_txt):
    """(names relative to the flickr25k folder, labels) from the texts of img.txt and targets.txt."""
    names = [line.strip() for line in img_text.splitlines() if line.strip()]
    refuse_duplicates(img_text, img_txt)
    target_lines = [line for line in targets_text.splitlines() if line.strip()]
    if len(names) != len(target_lines):
        raise UserError(f"{img_txt} lists {len(names)} images but {targets_txt} has {len(target_lines)} label lines")
    labels = np.array([parse_label_row(line.split(), targets_txt, number, len(LABELS), "MIRFlickr-25k")
                       for number, line in enumerate(target_lines, start=1)], dtype=np.float32)
    return [f"{IMAGES}/{name}" for name in names], labels


def refuse_duplicates(img_text, img_txt):
    """An image listed twice would be split like two images: it could be a query and a training image at once."""
    lines_of = defaultdict(list)
    for number, line in enumerate(img_text.splitlines(), start=1):
        if line.strip():
            lines_of[line.strip()].append(number)
    repeated = [(name, numbers) for name, numbers in lines_of.items() if len(numbers) > 1]
    if repeated:
        examples = ", ".join(f"{name} (lines {', '.join(map(str, numbers))})" for name, numbers in repeated[:3])
        raise UserError(f"{img_txt} lists {len(repeated)} image{'s' if len(repeated) > 1 else ''} more than once: "
                        f"{examples}{' ...' if len(repeated) > 3 else ''}; list each image once (with its "
                        "labels on the same line of targets.txt)")


def read_annotations(folder):
    """(names relative to folder, labels) of the images with at least one label, from annotations/."""
    labels = np.zeros((NUM_IMAGES, len(LABELS)), dtype=np.float32)
    for column, label in enumerate(LABELS):
        path = folder / "annotations" / f"{label}.txt"
        lines = read_text_file(path, "the annotation file", MAX_LIST_BYTES, missing=(
            "annotations/ needs the 38 label files of mirflickr25k_annotations_v080.zip (24 concepts and 14 *_r1)")
        ).splitlines()
        for number, line in enumerate(lines, start=1):
            if line.strip():
                if not line.strip().isdigit() or not 1 <= int(line) <= NUM_IMAGES:
                    raise UserError(f"{path} line {number}: expected an image number 1..{NUM_IMAGES}, got {line.strip()!r}")
                labels[int(line) - 1, column] = 1
    labelled = np.flatnonzero(labels.any(axis=1))
    return [f"{IMAGES}/im{index + 1}.jpg" for index in labelled], labels[labelled]


def split_order(folder, names, seed):
    """The image names in the permuted order of `seed`: read from the saved split file, or drawn
    and saved there."""
    split_file = folder / f"split_seed{seed}.json"
    if split_file.exists():
        order = read_saved_order(split_file)
        if sorted(order) != sorted(names):
            raise UserError(f"the saved split {split_file} lists other images ({len(order)}) than {folder} holds "
                            f"({len(names)}); delete it to draw a new split with --seed {seed}")
        return order
    canonical = sorted(names, key=lambda name: (len(name), name))  # im2 before im10
    order = [canonical[i] for i in np.random.default_rng(seed).permutation(len(canonical))]
    try:
        write_json(split_file, {"seed": seed, "query": QUERY_SIZE, "train": TRAIN_SIZE, "order": order})
    except OSError as exc:
        warn(f"cannot save the split to {split_file} ({exc.strerror}); it is drawn from --seed {seed} again next time")
    return order


def read_saved_order(split_file):
    """The image names of a saved split file: a JSON object whose "order" is a list of names."""
    saved = read_json_file(split_file, "the saved split", MAX_SAVED_SPLIT_BYTES, fix="delete it to draw it again")
    order = saved.get("order") if isinstance(saved, dict) else None
    if not isinstance(order, list) or not all(isinstance(name, str) for name in order):
        raise UserError(f"{split_file} is not a saved split (it needs \"order\": a list of image names); delete it "
                        "to draw it again")
    return order


def paper_split(folder):
    """{"train", "query", "database": LabelledPaths} of the paper's split, from the shipped files."""
    names, labels = parse_prepared(shipped_bytes("flickr25k_img.txt").decode(),
                                   shipped_bytes("flickr25k_targets.txt").decode(),
                                   "data/splits/flickr25k_img.txt.gz", "data/splits/flickr25k_targets.txt.gz")
    perm = np.array(json.loads(shipped_bytes("flickr25k_permutation.json")))
    source = "data/splits/flickr25k_img.txt.gz (the paper's split, shipped)"

    def part(rows):
        return LabelledPaths([str(folder / names[row]) for row in rows], labels[rows], source)

    return cut(perm, part)


def list_splits(root, seed=0, options=DataOptions(), problems=None):
    """The paper's split (options.split == "paper") or a seeded one (see the module's docstring); a bad
    line stops it, whether or not a `problems` list is given."""
    del problems
    folder = Path(root) / FOLDER
    if not (folder / IMAGES).is_dir():
        raise UserError(f"no MIRFlickr-25k images in {folder / IMAGES}: put the images of mirflickr25k.zip there "
                        "(im1.jpg ... im25000.jpg; see README, Datasets), or pass --data_root")
    if options.split == "paper":
        return paper_split(folder)
    return random_split(folder, seed)


def random_split(folder, seed):
    """--split random: labels from img.txt + targets.txt or annotations/, a permutation drawn from seed."""
    if (folder / "img.txt").exists():
        names, labels = read_prepared(folder)
        listed_in = folder / "img.txt"
    elif (folder / "annotations").is_dir():
        names, labels = read_annotations(folder)
        listed_in = folder / "annotations"
    else:
        raise UserError(f"no MIRFlickr-25k in {folder}: it needs the images in {folder / IMAGES} and either "
                        f"img.txt + targets.txt or the annotation files in {folder / 'annotations'} "
                        "(see README, Datasets); or pass --data_root")
    paths = [str(folder / name) for name in names]
    row_of = {name: row for row, name in enumerate(names)}
    rows = np.array([row_of[name] for name in split_order(folder, names, seed)])

    def part(selected):
        return LabelledPaths([paths[row] for row in selected], labels[selected], str(listed_in))

    return cut(rows, part)


def cut(order, part):
    """The three splits of a permutation of rows, as the paper's code cuts it; part(rows) -> LabelledPaths."""
    return {"train": part(order[QUERY_SIZE:QUERY_SIZE + TRAIN_SIZE]), "query": part(order[:QUERY_SIZE]),
            "database": part(order[QUERY_SIZE + TRAIN_SIZE:])}


def build(root, seed, preprocessing, options=DataOptions()):
    folder = Path(root) / FOLDER
    return file_splits("flickr", list_splits(root, seed, options), preprocessing, cache_dir=options.cache_folder(folder),
                       options=options)


def describe(root, options=DataOptions()):
    """What the run log records of the split in use."""
    if options.split == "paper":
        return {"split": "paper (the paper's img.txt, targets.txt and permutation, shipped in data/splits)"}
    return {"split": "random (seeded, saved in flickr25k/split_seed{seed}.json)"}


SPEC = DatasetSpec(
    name="flickr", num_classes=len(LABELS), default_topk=1000, build=build, list_splits=list_splits,
    describe=describe, class_names=LABELS,
    summary="MIRFlickr-25k: the paper's fixed split (1,000 queries, 4,000 train, 19,581 database), shipped")
