"""PASCAL VOC 2007 and 2012 as multi-label retrieval datasets (20 classes).

Folder: DATA_ROOT/VOCdevkit/VOC{year}/ with JPEGImages/, Annotations/ and ImageSets/Main/{split}.txt,
as the official archives extract. When it is missing, the archives are taken from DATA_ROOT (md5
checked) or downloaded, then extracted. An image's label is the set of its objects' classes in
Annotations/{id}.xml, every object counted (also those marked difficult), as in the paper's code.
Splits (paper): VOC2007 train = database = trainval (5,011), query = test (4,952); VOC2012 train =
database = train (5,717), query = val (5,823).
"""
import xml.etree.ElementTree as ElementTree
from functools import partial
from pathlib import Path

import numpy as np

from utils.errors import UserError
from utils.paths import MiB, read_file_bytes, read_text_file

from .archives import Archive, ensure_extracted
from .base import DataOptions, DatasetSpec
from .files import LabelledPaths, file_splits
from .protocol import MAX_LIST_BYTES

CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
           "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
CLASS_INDEX = {name: index for index, name in enumerate(CLASSES)}

VOC_HOST = "http://host.robots.ox.ac.uk/pascal/VOC"
ARCHIVES = {
    "2007": [Archive("VOCtrainval_06-Nov-2007.tar", "c52e279531787c972589f7e41ab4ae64",
                     f"{VOC_HOST}/voc2007/VOCtrainval_06-Nov-2007.tar"),
             Archive("VOCtest_06-Nov-2007.tar", "b6e924de25625d8de591ea690078ad9f",
                     f"{VOC_HOST}/voc2007/VOCtest_06-Nov-2007.tar")],
    "2012": [Archive("VOCtrainval_11-May-2012.tar", "6cd6e144f989b92b3379bac3b3de84fd",
                     f"{VOC_HOST}/voc2012/VOCtrainval_11-May-2012.tar")],
}
SPLITS = {"2007": ("trainval", "test"), "2012": ("train", "val")}  # (train = database, query)
MAX_ANNOTATION_BYTES = 1 * MiB  # an Annotations/*.xml file is about 1 kB


def read_image_ids(voc_dir, split):
    path = Path(voc_dir) / "ImageSets" / "Main" / f"{split}.txt"
    ids = [line.split()[0] for line in read_text_file(path, "the VOC split file", MAX_LIST_BYTES, missing=(
        f"{voc_dir} is incomplete: delete it and rerun to extract the official archives again")).splitlines()
        if line.strip()]
    if not ids:
        raise UserError(f"the VOC split file {path} lists no images; {voc_dir} is damaged: delete it and rerun to "
                        "extract the official archives again")
    return ids


def read_labels(annotation_file):
    """The 20-class multi-hot label of one Annotations/*.xml file."""
    content = read_file_bytes(annotation_file, "the VOC annotation", MAX_ANNOTATION_BYTES)
    try:
        names = [obj.findtext("name", "").strip() for obj in ElementTree.fromstring(content).iter("object")]
    except ElementTree.ParseError as exc:
        raise UserError(f"cannot read the VOC annotation {annotation_file} ({exc})") from None
    label = np.zeros(len(CLASSES), dtype=np.float32)
    for name in names:
        if name not in CLASS_INDEX:
            raise UserError(f"{annotation_file}: object class {name!r} is not one of the 20 VOC classes")
        label[CLASS_INDEX[name]] = 1
    return label


def read_split(voc_dir, split):
    """Image paths and labels of one ImageSets/Main split."""
    ids = read_image_ids(voc_dir, split)
    paths = [str(Path(voc_dir) / "JPEGImages" / f"{image_id}.jpg") for image_id in ids]
    labels = np.stack([read_labels(Path(voc_dir) / "Annotations" / f"{image_id}.xml") for image_id in ids])
    return LabelledPaths(paths, labels, str(Path(voc_dir) / "ImageSets" / "Main" / f"{split}.txt"))


def list_splits(year, root, seed=0, options=None, problems=None):
    """The official splits (train = database); extracts the archives first if needed. A bad annotation
    stops it, whether or not a `problems` list is given."""
    del seed, problems  # the official splits are fixed
    folder = Path("VOCdevkit") / f"VOC{year}"
    if options is not None and options.offline and not (Path(root) / folder).is_dir():
        raise UserError(offline_problem(year, Path(root), folder))
    voc_dir = ensure_extracted(Path(root), folder, ARCHIVES[year])
    train_split, query_split = SPLITS[year]
    train = read_split(voc_dir, train_split)
    return {"train": train, "query": read_split(voc_dir, query_split), "database": train}


def offline_problem(year, root, folder):
    """What is missing when VOC{year} is not extracted and nothing may be downloaded or extracted."""
    archives = [archive.file_name for archive in ARCHIVES[year]]
    present = [name for name in archives if (root / name).is_file()]
    found = (f"{' and '.join(present)} {'are' if len(present) > 1 else 'is'} in {root}: a training run checks "
             "and extracts it" if present else f"{' and '.join(archives)} {'are' if len(archives) > 1 else 'is'} "
             f"not in {root} either: a training run downloads and extracts them")
    return (f"{root / folder} does not exist: data.verify checks what is on disk and neither downloads nor extracts; "
            f"{found} (or extract the official archives there yourself)")


def build(year, root, seed, preprocessing, options=DataOptions()):
    voc_dir = Path(root) / "VOCdevkit" / f"VOC{year}"
    return file_splits(f"voc{year}", list_splits(year, root), preprocessing, cache_dir=options.cache_folder(voc_dir),
                       options=options)


VOC2007 = DatasetSpec(
    name="voc2007", num_classes=20, default_topk=5011, build=partial(build, "2007"), class_names=CLASSES,
    list_splits=partial(list_splits, "2007"),
    summary="PASCAL VOC2007: trainval 5,011 = train = database, test 4,952 queries")
VOC2012 = DatasetSpec(
    name="voc2012", num_classes=20, default_topk=5717, build=partial(build, "2012"), class_names=CLASSES,
    list_splits=partial(list_splits, "2012"),
    summary="PASCAL VOC2012: train 5,717 = database, val 5,823 queries")
