"""--hasher NAME: a shallow hasher (hashing/shallow.py) on the frozen trunk's pooled features, in place of a trained
network. It is fitted on the training split's features alone (the query and database splits are encoded only after
fit() has returned), saved as the run's checkpoint with a digest of the trunk it was fitted on, and its codes go
through the same evaluation, metrics file and codes cache as a trained network's."""
import copy
import time

import torch
from torch.utils.data import DataLoader, Subset

from hashing.codes import CodeSet
from hashing.shallow import load_shallow_hasher, save_shallow_hasher
from utils.checkpoint import content_digest
from utils.errors import UserError
from utils.runlog import progress_bar


def evaluation_view(train, query):
    """The training split with the query split's (evaluation) transform: the hasher fits on the features the
    trunk gives un-augmented images, as the queries and the database are encoded."""
    if isinstance(train, Subset):  # --subset
        return Subset(evaluation_view(train.dataset, query.dataset if isinstance(query, Subset) else query),
                      train.indices)
    view = copy.copy(train)
    view.transform = query.transform
    return view


@torch.inference_mode()
def trunk_features(run, network, dataset, desc):
    """(features (N, D) float32, labels (N, C)) of `dataset`: the inputs of the network's hash layer, i.e. the
    trunk's pooled features, computed with the whole network in evaluation mode (BatchNorm statistics as loaded)."""
    captured = []
    hook = network.get_submodule(run.backbone.hash_layer).register_forward_pre_hook(
        lambda _module, inputs: captured.append(inputs[0].flatten(1).float().cpu()))
    network.eval()
    labels = []
    try:
        loader = DataLoader(dataset, batch_size=run.args.batch_size, shuffle=False)
        for images, targets in progress_bar(loader, desc=desc, unit="batch"):
            network(images.to(run.device))
            labels.append(targets.float())
    finally:
        hook.remove()
    return torch.cat(captured), torch.cat(labels)


def trunk_digest(network, hash_layer):
    """SHA-256 of the trunk's weights (every tensor but the hash layer's): a fitted hasher is used with its trunk."""
    return content_digest({name: tensor for name, tensor in network.state_dict().items()
                           if not name.startswith(f"{hash_layer}.")})


def hasher_codes(run, network, hasher):
    """The CodeSet of the query set and the database under a fitted hasher."""
    query = trunk_features(run, network, run.splits.query, "trunk features (queries)")
    database = trunk_features(run, network, run.splits.database, "trunk features (database)")
    return CodeSet.from_outputs(hasher.encode(query[0]), query[1], hasher.encode(database[0]), database[1])


def fit_hasher(run, network, hasher):
    """Fit `hasher` on the training split's trunk features with --seed; returns the seconds taken. Saved as the
    run's checkpoint (with the trunk's digest and backbone) when the run saves."""
    if run.context.world_size > 1:
        raise UserError("--hasher fits in one process: run it without torchrun")
    args = run.args
    started = time.perf_counter()
    features, _ = trunk_features(run, network, evaluation_view(run.splits.train, run.splits.query),
                                 "trunk features (training split)")
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
