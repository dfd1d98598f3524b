"""Registry of datasets by --dataset name."""
from . import cifar, digits, flickr, lists, voc

DATASETS = {spec.name: spec for spec in [digits.SPEC, voc.VOC2007, voc.VOC2012, flickr.SPEC, *lists.SPECS, cifar.SPEC]}


def get_dataset_spec(name):
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]
