"""Training and --test on cached trunk features (--feature_cache; docs/METHOD.md §11).

The splits' features come from session/feature_cache.py; the loaders then carry features instead of images,
built by session.parts.make_loaders (the same sampler, seed, batch size and last-batch rule, so the batches are
those of a run with the frozen trunk in the loop), and the network's forward runs its hash head alone
(network.head_outputs) while the run lasts. Its state_dict stays the whole network's: the checkpoints are
those of a normal run, usable without the cache.
"""
import argparse
import contextlib
import dataclasses
import functools

import numpy as np
import torch
from torch.utils.data import Dataset

from data.base import RetrievalSplits
from data.validation import hold_out_validation
from hashing.search.api import CLI_HINT
from network import head_outputs
from utils.checkpoint import load_network_weights

from .checkpoint_tasks import run_checkpoint_tasks
from .feature_cache import dataset_features, split_features
from .parts import make_loaders, validation_size
from .training import report_truncated_images, train


class FeatureDataset(Dataset):
    """A FeatureSplit as (features, label) items. With V > 1 views, item i in epoch e is view choice_e[i], drawn
    for every item with a generator seeded from (seed, e); the epoch is the training sampler's (`sampler`)."""

    def __init__(self, split, seed=0):
        self.split, self.seed = split, seed
        self.labels = torch.as_tensor(np.asarray(split.labels, dtype=np.float32))
        self.sampler, self.epoch, self.choice = None, None, None

    def __len__(self):
        return len(self.labels)

    def _rows(self, indices):
        features = self.split.features
        if features.ndim == 2:
            return features[indices]
        epoch = self.sampler.epoch if self.sampler is not None else 0
        if epoch != self.epoch:
            self.choice = np.random.default_rng([self.seed, epoch]).integers(features.shape[0], size=len(self))
            self.epoch = epoch
        return features[self.choice[indices], indices]

    def __getitems__(self, indices):
        indices = np.asarray(indices, dtype=np.int64)
        features = torch.from_numpy(np.asarray(self._rows(indices), dtype=np.float32))
        return list(zip(features.unbind(0), self.labels[indices].unbind(0)))

    def __getitem__(self, index):
        return self.__getitems__([index])[0]


@contextlib.contextmanager
def fed_with_features(network, hash_layer):
    """`network` taking its trunk's features instead of images for the duration of the block (its head alone
    runs); parameters, state_dict and modes are untouched."""
    network.forward = functools.partial(head_outputs, network, hash_layer)
    try:
        yield network
    finally:
        del network.forward


def feature_loaders(run, train, query, database):
    """make_loaders over feature datasets, in this process (the features are memory-mapped)."""
    in_process = dataclasses.replace(run, args=argparse.Namespace(**{**vars(run.args), "workers": 0}))
    loaders = make_loaders(in_process, RetrievalSplits(train, query, database))
    train.sampler = loaders.train.sampler
    return loaders


def validation_loaders(run, network):
    """--select val: the validation queries and their database as cached features (the validation split drawn
    again from the whole training split, as session.parts.validation_splits drew it)."""
    whole = run.splits._replace(train=run.splits.train.dataset)  # validation_splits left the rest as a Subset
    validation = hold_out_validation(whole, validation_size(run.args), run.args.seed)
    query, database = (FeatureDataset(dataset_features(run, network, part, f"validation_{name}"))
                       for name, part in (("query", validation.query), ("database", validation.database)))
    return feature_loaders(run, database, query, database)


def run_with_feature_cache(run, network):
    """Train (--freeze_backbone) or run the checkpoint's tasks (--test, --export_index) on cached features: the
    trunk runs once per split and image, when its features are not in --feature_cache yet."""
    if not run.trains:  # the checkpoint's trunk keys the cache
        load_network_weights(network, run.files.checkpoint, hint=CLI_HINT)
    names = ("train", "query", "database") if run.trains else ("query", "database")
    features = {name: FeatureDataset(split_features(run, network, name), run.args.seed) for name in names}
    loaders = feature_loaders(run, features.get("train", features["database"]), features["query"],
                              features["database"])
    run = dataclasses.replace(run, loaders=loaders)
    if run.validation is not None:
        run = dataclasses.replace(run, validation=validation_loaders(run, network))
    with fed_with_features(network, run.backbone.hash_layer):
        if run.trains:
            return train(run, network)
        result = run_checkpoint_tasks(run, network)
    report_truncated_images(run)
    return result
