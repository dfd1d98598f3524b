"""--hasher NAME: a shallow hasher (hashing/shallow.py) on the frozen trunk's pooled features, in place of a trained
network. It is fitted on the training split's features alone (the query and database splits are encoded only after
fit() has returned), saved as the run's checkpoint with a digest of the trunk it was fitted on, and its codes go
through the same evaluation, metrics file and codes cache as a trained network's."""
import time

import torch
from torch.utils.data import DataLoader

from hashing.codes import CodeSet
from hashing.feature_cache import trunk_batch, trunk_digest
from hashing.shallow import load_shallow_hasher, save_shallow_hasher
from network import trunk_only
from utils.errors import UserError
from utils.runlog import progress_bar

from .feature_cache import split_dataset, split_features


def hasher_features(run, network, split_name):
    """(features (N, D), labels (N, C)) of the run's split `split_name` through the frozen trunk: the training
    split with the evaluation transform (the hasher fits on un-augmented images, as the queries and the database
    are encoded). From --feature_cache when given (session/feature_cache.py), else computed in memory alike."""
    if run.args.feature_cache:
        split = split_features(run, network, split_name)
        return split.features, split.labels
    return trunk_features(run, network, split_dataset(run, split_name), split_name)


@torch.inference_mode()
def trunk_features(run, network, dataset, split_name):
    """(features, labels) of `dataset` through the trunk (network.trunk_only), the network in evaluation mode."""
    features, labels = [], []
    network.eval()
    with trunk_only(network, run.backbone.hash_layer) as trunk:
        loader = DataLoader(dataset, batch_size=run.args.batch_size, shuffle=False)
        for images, targets in progress_bar(loader, desc=f"trunk features ({split_name})", unit="batch"):
            features.append(trunk_batch(trunk, images, run.device))
            labels.append(targets.float())
    return torch.cat(features), torch.cat(labels)


def hasher_codes(run, network, hasher):
    """The CodeSet of the query set and the database under a fitted hasher."""
    query, database = (hasher_features(run, network, name) for name in ("query", "database"))
    return CodeSet.from_outputs(hasher.encode(query[0]), query[1], hasher.encode(database[0]), database[1])


def fit_hasher(run, network, hasher):
    """Fit `hasher` on the training split's trunk features with --seed; returns the seconds taken. Saved as the
    run's checkpoint (with the trunk's digest and backbone) when the run saves."""
    if run.context.world_size > 1:
        raise UserError("--hasher fits in one process: run it without torchrun")
    args = run.args
    started = time.perf_counter()
    features, _ = hasher_features(run, network, "train")
    hasher.fit(features, seed=args.seed)
    seconds = time.perf_counter() - started
    if run.writes:
        save_shallow_hasher(hasher, run.files.checkpoint, record={
            "backbone": args.backbone, "input_size": run.input_size,
            "trunk_sha256": trunk_digest(network, run.backbone.hash_layer)})
    return seconds


def saved_hasher(run, network):
    """The hasher saved as the run's checkpoint, refused when it was fitted on another trunk or code length."""
    path, args = run.files.checkpoint, run.args
    hasher = load_shallow_hasher(path)
    record = hasher.record or {}
    if hasher.name != args.hasher or hasher.hash_bit != args.hash_bit:
        raise UserError(f"{path} holds a {hasher.hash_bit}-bit {hasher.name} hasher, not --hasher {args.hasher} "
                        f"with --hash_bit {args.hash_bit}: pass those flags")
    if record.get("backbone") != args.backbone or record.get("trunk_sha256") != trunk_digest(
            network, run.backbone.hash_layer):
        raise UserError(f"{path} was fitted on the features of another trunk ({record.get('backbone')}, "
                        "other weights): give the --backbone, --trunk_from/--weights and --seed it was fitted with")
    return hasher
