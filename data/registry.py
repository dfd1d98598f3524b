"""Registry of datasets by --dataset name, and the splits of one, as a run builds them."""
from pathlib import Path

from torch.utils.data import Subset

from utils.errors import UserError

from . import cifar, coco, digits, fashion, flickr, lists, voc
from .base import DataOptions

DATASETS = {spec.name: spec for spec in [digits.SPEC, voc.VOC2007, voc.VOC2012, flickr.SPEC, *lists.SPECS, coco.SPEC,
                                         cifar.SPEC, *fashion.SPECS]}


def get_dataset_spec(name):
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def check_available(name, root, options=DataOptions(), seed=0):
    """Stop (UserError) when a dataset's files are not under `root`, after fetching them as a run would (a VOC or
    CIFAR-10 archive is downloaded and extracted): a harness calls it once before a grid of runs, instead of
    meeting the same error in every cell. Reads the split lists, opens no image; nothing for digits."""
    spec = get_dataset_spec(name)
    if spec.list_splits is not None:
        spec.list_splits(Path(root), seed, options)
    elif spec.fetch is not None:
        spec.fetch(root)


def build_splits(name, root, seed, preprocessing, options=DataOptions(), subset=0):
    """The RetrievalSplits of dataset `name` under `root`, as a run with these settings builds them: each
    split cut to its first `subset` items when subset > 0. UserError for a split that is empty."""
    splits = get_dataset_spec(name).build(Path(root), seed, preprocessing, options)
    if subset:
        splits = type(splits)(*(Subset(part, range(min(subset, len(part)))) for part in splits))
    empty = [part_name for part_name, part in splits._asdict().items() if len(part) == 0]
    if empty:
        raise UserError(f"the {empty[0]} split of --dataset {name} is empty; check the data under --data_root {root} "
                        "(see README, Datasets)")
    return splits
