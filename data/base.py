"""What every dataset module provides: a DatasetSpec for the registry and the three retrieval splits."""
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
from torch.utils.data import Dataset, Subset

from utils.errors import UserError


class RetrievalSplits(NamedTuple):
    """Train, query and database datasets; each item is (image tensor, multi-hot float label tensor)."""
    train: Dataset
    query: Dataset
    database: Dataset


@dataclass(frozen=True)
class DataOptions:
    """How a dataset is read (the data flags of the command line)."""
    cache: bool = False  # --cache: decode each image once into a memory-mapped uint8 file
    skip_bad_images: bool = False  # leave out missing or undecodable images instead of stopping
    strict_images: bool = False  # a truncated image is an error instead of being padded (the paper's loader pads)
    split: str = "paper"  # "paper": the paper's fixed split where one is shipped (flickr); "random": seeded
    imbalance: float = 1.0  # --imbalance: ratio of the commonest to the rarest class (long-tailed variants)
    cache_dir: Optional[str] = None  # where --cache writes (e.g. when the data root is read-only); None: in the data
    offline: bool = False  # read only what is on disk: no download, no archive extraction (python -m data.verify)
    split_variant: Optional[str] = None  # --split_variant: coco's published list family (data/coco.py)
    allow_query_in_database: bool = False  # --allow_query_in_database: keep a database that holds query images

    @classmethod
    def from_flags(cls, flags):
        """The options a run's data flags give (a mapping such as vars(args) or a run log's "args"); a flag
        it lacks keeps its default, so runs logged before a flag existed read as they ran."""
        names = ("cache", "skip_bad_images", "strict_images", "split", "imbalance", "cache_dir", "split_variant",
                 "allow_query_in_database")
        return cls(**{name: flags[name] for name in names if name in flags})

    def cache_folder(self, dataset_folder):
        """Where --cache keeps a dataset's image cache: cache_dir, else dataset_folder/cache; None without --cache.
        One cache_dir may serve several datasets: a cache file's name carries the dataset and its image list."""
        if not self.cache:
            return None
        return Path(self.cache_dir) if self.cache_dir else Path(dataset_folder) / "cache"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int  # 0: read from the data (the generic list format)
    default_topk: int  # K of mAP@K when --retrieve is 0; 0 means the whole database
    build: Callable[..., RetrievalSplits]  # build(root, seed, preprocessing, options=DataOptions()) -> RetrievalSplits
    summary: str
    in_memory: bool = False  # in-memory datasets gain nothing from DataLoader worker processes
    # list_splits(root, seed, options, problems=None) -> {"train"|"query"|"database": LabelledPaths}, without
    # opening an image (what `python -m data.verify` checks; bad lines go to `problems` where the format allows
    # skipping them); None for in-memory datasets
    list_splits: Optional[Callable[..., dict]] = None
    describe: Optional[Callable[..., dict]] = None  # describe(root, options) -> what the run log records of the files
    class_names: tuple = ()  # the classes in label order, where the dataset names them
    options: tuple = ()  # DataOptions fields beyond the common ones that its build() honours (digits: "imbalance")
    fetch: Optional[Callable[..., object]] = None  # fetch(root): an in-memory dataset's files, downloaded if needed
    # check_files(root, options, seed) -> (manifest record with "summary" lines, problems): what data.verify checks
    # of an in-memory dataset read from files (fashion_mnist: the idx files); None: nothing to check
    check_files: Optional[Callable[..., tuple]] = None

    def with_classes_of(self, splits):
        """This spec, with num_classes taken from the built splits when the dataset leaves it to the data."""
        return self if self.num_classes else replace(self, num_classes=label_width(splits.train))


def split_labels(dataset):
    """The (N, C) float label tensor of a dataset, through Subset wrappers (their indices applied)."""
    if isinstance(dataset, Subset):
        return split_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    return torch.as_tensor(dataset.labels, dtype=torch.float32)


def label_width(dataset):
    """C of a dataset's (N, C) labels, read from its .labels (through Subset wrappers)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset.labels.shape[1]


class ArrayImageDataset(Dataset):
    """Images held in memory as a uint8 (N, 3, H, W) tensor, transformed a whole batch at a time.

    `transform` maps a uint8 batch to a float batch; DataLoader calls __getitems__ with a batch of
    indices, so per-sample Python overhead disappears.
    """

    def __init__(self, images, labels, transform):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} label rows")
        self.images = torch.as_tensor(images)
        self.labels = torch.as_tensor(labels, dtype=torch.float32)
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(self.images[index:index + 1])[0], self.labels[index]

    def __getitems__(self, indices):
        indices = torch.as_tensor(indices, dtype=torch.long)
        images = self.transform(self.images[indices])
        return list(zip(images.unbind(0), self.labels[indices].unbind(0)))


class WithIndices(Dataset):
    """A dataset whose items also carry their index, (image, label, index), for a loss that keeps state per training
    item (DPSH's and DHN's memory of codes). Batched reads (__getitems__) stay batched, so the images are the same."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return (*self.dataset[index], index)

    def __getitems__(self, indices):
        batched = getattr(self.dataset, "__getitems__", None)
        items = batched(indices) if batched else [self.dataset[index] for index in indices]
        return [(*item, index) for item, index in zip(items, indices)]


class UnreadableImage(UserError):
    """An image file that cannot be decoded.

    It is usually raised in a DataLoader worker, and the DataLoader re-raises it in the main process
    as UnreadableImage(the worker's whole traceback); the user needs only its last line.
    """

    def __init__(self, message):
        if "Original Traceback" in message:
            last_line = message.rstrip().splitlines()[-1]
            message = last_line.partition(f"{type(self).__name__}: ")[2] or last_line
        super().__init__(message)


NAMED_EXAMPLES = 3


def name_some(paths, count=NAMED_EXAMPLES):
    """'a, b, c and 4 more': the first `count` of the sorted `paths`."""
    paths = sorted(paths)
    more = f" and {len(paths) - count} more" if len(paths) > count else ""
    return ", ".join(map(str, paths[:count])) + more
