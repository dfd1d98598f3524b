"""Registry of datasets by --dataset name."""
from . import digits
from .base import DatasetSpec


def _not_yet(name):
    def build(root, seed, input_size):
        raise NotImplementedError(
            f"dataset {name!r} is not available in this version yet; use --dataset digits")
    return build


_PAPER_DATASETS = [
    # name, classes, default K of mAP@K (METHODS.md section 3)
    ("voc2007", 20, 5011), ("voc2012", 20, 5717), ("flickr", 38, 1000), ("nuswide", 21, 5000),
]

DATASETS = {spec.name: spec for spec in [
    digits.SPEC,
    *(DatasetSpec(name, classes, topk, _not_yet(name), summary="paper dataset")
      for name, classes, topk in _PAPER_DATASETS),
]}


def get_dataset_spec(name):
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]
