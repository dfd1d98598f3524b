"""COCO-2014 image paths in the forms the published lists write them, reduced to one key, and a list's lines
keyed by it: how data/coco.py matches lists with images and data/variants.py fingerprints lists."""
import re

from utils.errors import UserError

IMAGE_NAME = re.compile(r"(?:^|/)((?:train|val)2014/COCO_(?:train|val)2014_\d+\.jpg)$")


def image_key(path):
    """'train2014/COCO_train2014_000000566612.jpg' of any path form the lists use (absolute, ./data/coco/...,
    relative), or None for a path that names no COCO-2014 image."""
    match = IMAGE_NAME.search(str(path).replace("\\", "/"))
    return match.group(1) if match else None


def keyed_lines(text, source):
    """The lines of a COCO list with each image path reduced to its image_key (UserError naming the line
    otherwise) and the labels single-spaced; empty lines dropped."""
    lines = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        path, _, labels = line.strip().partition(" ")
        if not path:
            continue
        key = image_key(path)
        if key is None:
            raise UserError(f"{source} line {line_number}: {path} is not a COCO-2014 image path "
                            "(train2014/COCO_train2014_NNNNNNNNNNNN.jpg or val2014/...)")
        lines.append(f"{key} {' '.join(labels.split())}")
    return lines
