"""Fetch a data set into --data_root, resumable and checked against its published md5.

    python -m data.download NAME [--data_root ./data]

For VOC2007, VOC2012, COCO 2014 (images and annotations), CIFAR-10 and Fashion-MNIST. Each archive is downloaded
as a training run downloads it (data/archives.py: into NAME.part next to its final name, resuming where an earlier
attempt stopped, then checked against its published md5 and only then renamed to its final name; a file that fails
the check is removed), then extracted as a run would (VOC, CIFAR-10; COCO: into coco/, and coco/labels.txt built
from the annotations). NUS-WIDE's images and MIRFlickr-25k cannot be fetched unattended: NAME prints
what to get and where to put it.
"""
import argparse
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from utils.errors import UserError, run_reporting_errors

from . import cifar, coco, voc
from .archives import Archive, ensure_extracted, extract, fetch
from .coco_lists import build_labels

COCO_HOST = "http://images.cocodataset.org"
COCO_ARCHIVES = (Archive("train2014.zip", "0da8c0bd3d6becc4dcb32757491aca88", f"{COCO_HOST}/zips/train2014.zip"),
                 Archive("val2014.zip", "a3d79f5ed8d289b7a7554ce06a5782b3", f"{COCO_HOST}/zips/val2014.zip"),
                 Archive("annotations_trainval2014.zip", "0a379cfc70b0e71301e0f377548639bd",
                         f"{COCO_HOST}/annotations/annotations_trainval2014.zip"))
COCO_FOLDERS = ("train2014", "val2014", "annotations")  # the folder each of COCO_ARCHIVES holds, in order


@dataclass(frozen=True)
class Fetchable:
    archives: tuple  # Archive: downloaded into the data root
    unpack: Callable  # unpack(root, archives): extract them as a run needs them


def unpack_coco(root, archives):
    """train2014/, val2014/ and annotations/ in DATA_ROOT/coco (each extracted in a staging folder, then moved
    into place), then coco/labels.txt from the annotations."""
    folder = Path(root) / coco.FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for archive, name in zip(archives, COCO_FOLDERS):
        if (folder / name).exists():  # extracted before: a 13 GB archive is not unpacked again to be thrown away
            continue
        staging = Path(tempfile.mkdtemp(dir=folder, prefix=".extract.", suffix=".partial"))
        try:
            extract(fetch(archive, root), staging)
            if (staging / name).is_dir():
                (staging / name).rename(folder / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if not (folder / coco.LABELS_FILE).exists():
        build_labels(folder / "annotations", root)
    return folder


def fetch_fashion_mnist(root, archives):
    """torchvision's own download of Fashion-MNIST (its mirrors and md5s), into DATA_ROOT/FashionMNIST."""
    del archives
    from torchvision.datasets import FashionMNIST
    for train in (True, False):
        FashionMNIST(str(root), train=train, download=True)
    return Path(root) / "FashionMNIST"


SOURCES = {
    "voc2007": Fetchable(tuple(voc.ARCHIVES["2007"]),
                         lambda root, archives: ensure_extracted(root, Path("VOCdevkit") / "VOC2007", archives)),
    "voc2012": Fetchable(tuple(voc.ARCHIVES["2012"]),
                         lambda root, archives: ensure_extracted(root, Path("VOCdevkit") / "VOC2012", archives)),
    "coco": Fetchable(COCO_ARCHIVES, unpack_coco),
    "cifar10": Fetchable(tuple(cifar.ARCHIVES), lambda root, archives: ensure_extracted(root, cifar.FOLDER, archives)),
    "fashion_mnist": Fetchable((), fetch_fashion_mnist),
}
BY_HAND = {
    "nuswide": "NUS-WIDE cannot be fetched unattended: its images are Flickr photos that NUS distributes on request "
               "(https://lms.comp.nus.edu.sg/wp-content/uploads/2019/research/nuswide/NUS-WIDE.html). Put them as "
               "DATA_ROOT/nus_wide/images/NAME.jpg (the names in the lists) and the paper's 193,734-line "
               "database.txt in DATA_ROOT/nus_wide/; train.txt and test.txt ship. Check with python -m data.verify "
               "--dataset nuswide.",
    "flickr": "MIRFlickr-25k needs its licence accepted first: download mirflickr25k.zip from "
              "https://press.liacs.nl/mirflickr/ and extract it so that the images are DATA_ROOT/flickr25k/mirflickr/"
              "im1.jpg ... im25000.jpg; the paper's labels and split ship. Check with python -m data.verify "
              "--dataset flickr.",
}


def download(name, root):
    """Fetch and unpack data set `name` under `root`, or UserError with what to do by hand."""
    if name in BY_HAND:
        raise UserError(BY_HAND[name])
    source = SOURCES[name]
    Path(root).mkdir(parents=True, exist_ok=True)
    for archive in source.archives:  # all of them before any is unpacked (the md5 is checked once)
        fetch(archive, root)
    where = source.unpack(Path(root), source.archives)
    print(f"{name}: ready in {where}")
    return where


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m data.download", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=[*SOURCES, *BY_HAND], help="the data set")
    parser.add_argument("--data_root", default="./data", help="folder holding the datasets")
    args = parser.parse_args(argv)
    return run_reporting_errors(lambda: download(args.name, args.data_root))


if __name__ == "__main__":
    main()
