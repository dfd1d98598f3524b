"""Fetch a data set into --data_root, resumable and checked against its published md5.

    python -m data.download NAME [--data_root ./data]

For VOC2007, VOC2012, COCO 2014 (images and annotations), CIFAR-10 and Fashion-MNIST. Each archive is downloaded
into NAME.part next to its final name, resuming where an earlier attempt stopped (HTTP Range), then checked
against its published md5 and only then renamed to its final name; a file that fails the check is removed. Then
it is extracted as a training run would (VOC, CIFAR-10: data/archives.py; COCO: into coco/, and coco/labels.txt
built from the annotations). NUS-WIDE's images and MIRFlickr-25k cannot be fetched unattended: NAME prints
what to get and where to put it.
"""
import argparse
import http.client
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torchvision.datasets.utils import check_integrity, extract_archive
from tqdm import tqdm

from utils.errors import UserError, run_reporting_errors
from utils.paths import check_output_target, require_regular_file
from utils.runlog import progress_bar

from . import cifar, coco, voc
from .archives import CHUNK, DOWNLOAD_TIMEOUT, Archive, ensure_extracted
from .coco_lists import build_labels

COCO_HOST = "http://images.cocodataset.org"
COCO_ARCHIVES = (Archive("train2014.zip", "0da8c0bd3d6becc4dcb32757491aca88", f"{COCO_HOST}/zips/train2014.zip"),
                 Archive("val2014.zip", "a3d79f5ed8d289b7a7554ce06a5782b3", f"{COCO_HOST}/zips/val2014.zip"),
                 Archive("annotations_trainval2014.zip", "0a379cfc70b0e71301e0f377548639bd",
                         f"{COCO_HOST}/annotations/annotations_trainval2014.zip"))
COCO_FOLDERS = ("train2014", "val2014", "annotations")  # the folder each of COCO_ARCHIVES holds, in order
ATTEMPTS = 3  # a cut connection is resumed this often before giving up
INTERRUPTIONS = (http.client.IncompleteRead, ConnectionError, TimeoutError)


@dataclass(frozen=True)
class Fetchable:
    archives: tuple  # Archive: downloaded into the data root
    unpack: Callable  # unpack(root, archives): extract them as a run needs them


def download_resumable(archive, root):
    """root/archive.file_name, downloaded (resuming its .part file) and md5-checked; an existing one is checked."""
    path = Path(root) / archive.file_name
    if path.exists():
        require_regular_file(path, "the downloaded archive")  # hashing a FIFO or a device would never end
        if not check_integrity(str(path), archive.md5):
            raise UserError(f"{path} exists but its md5 is not {archive.md5}: it is incomplete or another file; "
                            "delete it and rerun")
        print(f"{path} is already there (md5 checked)")
        return path
    partial = check_output_target(path.with_name(path.name + ".part"), "the partial download")
    for attempt in range(1, ATTEMPTS + 1):
        try:
            fetch_rest(archive.url, partial)
            break
        except INTERRUPTIONS as exc:
            if attempt == ATTEMPTS:
                raise UserError(f"the download of {archive.url} was cut {ATTEMPTS} times ({exc!r}); rerun to resume "
                                f"from the {tqdm.format_sizeof(partial.stat().st_size, 'B')} in {partial}") from None
            time.sleep(attempt)
    if not check_integrity(str(partial), archive.md5):
        partial.unlink()
        raise UserError(f"{archive.url} arrived with another md5 than the published {archive.md5}: removed it; rerun, "
                        f"or get {archive.file_name} elsewhere and put it into {root}")
    os.replace(partial, path)
    return path


def open_from(url, offset):
    """The response to GET url from byte `offset` on; None when the server says nothing is left (416)."""
    headers = {"User-Agent": "hyp2-retrieval", **({"Range": f"bytes={offset}-"} if offset else {})}
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=DOWNLOAD_TIMEOUT)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            return None
        raise UserError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, INTERRUPTIONS):
            raise exc.reason from None
        raise UserError(f"cannot download {url} ({exc.reason}); check the network or fetch it by hand") from None


def fetch_rest(url, partial):
    """Append the rest of `url` to `partial` (start over when the server ignores the Range); ConnectionError
    when the body ends before its announced length."""
    offset = partial.stat().st_size if partial.exists() else 0
    response = open_from(url, offset)
    if response is None:
        return
    with response:
        if response.status != 206:
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length else None
        with open(partial, "ab" if offset else "wb") as handle, \
                progress_bar(total=total, initial=offset, desc=f"download {partial.name[:-5]}", unit="B",
                             unit_scale=True, leave=True) as bar:
            while chunk := response.read(CHUNK):
                handle.write(chunk)
                bar.update(len(chunk))
    if total is not None and partial.stat().st_size < total:
        raise ConnectionError(f"the connection closed at byte {partial.stat().st_size:,} of {total:,}")


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
            extract_archive(str(Path(root) / archive.file_name), str(staging))
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
    for archive in source.archives:
        download_resumable(archive, root)
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
