"""A run's splits in the feature cache (--feature_cache; hashing/feature_cache.py, docs/METHOD.md §11).

    from session.feature_cache import split_features
    train = split_features(run, network, "train")  # FeatureSplit: features (N, D) or (V, N, D), labels (N, C)

run is the session.run.Run after session.parts.prepare_run (its flags, splits, backbone and device); network
the hash network whose trunk computes the features, as it is now (pretrained, or a checkpoint's weights).
"""
from pathlib import Path

from data.image_cache import decode_workers
from data.validation import without_augmentation
from hashing.feature_cache import CacheSettings, cached_features
from network import file_label
from utils.dist import barrier

from .files import dataset_label

SPLITS = ("train", "query", "database")


def split_features(run, network, split_name):
    """The FeatureSplit of the run's split `split_name` (train, query or database) through the trunk of `network`
    as it is now (pretrained, or a checkpoint's), cached under --feature_cache with --feature_dtype; the training
    split in --feature_views views (1: read without augmentation). Needs run.splits (session.parts.prepare_run).
    Under torchrun the main process computes, the others then read."""
    views = run.args.feature_views if split_name == "train" else 1
    return dataset_features(run, network, split_dataset(run, split_name, views), split_name, views)


def split_dataset(run, split_name, views=1):
    """The run's split `split_name` as its trunk features are computed: the training split of one view read
    without augmentation (with the query split's transform)."""
    if split_name not in SPLITS:
        raise ValueError(f"unknown split {split_name!r}; one of {', '.join(SPLITS)}")
    split = getattr(run.splits, split_name)
    return without_augmentation(split, run.splits.query) if split_name == "train" and views == 1 else split


def dataset_features(run, network, dataset, split_name, views=1):
    """The FeatureSplit of any `dataset` of the run (e.g. a --select val part), named after `split_name`."""
    args = run.args
    workers = args.workers if args.workers >= 0 else (0 if run.spec.in_memory else decode_workers())
    settings = CacheSettings(Path(args.feature_cache), args.feature_dtype, views, args.seed, args.batch_size,
                             workers, run.device)
    name = f"{dataset_label(args)}_{file_label(run.backbone.name)}_{split_name}"
    if not run.context.is_main:
        barrier(run.context)
    features = cached_features(network, run.backbone.hash_layer, dataset, name, settings)
    if run.context.is_main:
        barrier(run.context)
    return features
