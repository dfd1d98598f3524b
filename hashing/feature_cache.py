"""The feature cache of a frozen trunk (--freeze_backbone --feature_cache DIR; docs/METHOD.md §11).

A frozen trunk gives the same pooled features for an image in every epoch, so they are computed once per split
into DIR and the hash head trains on them (session/cached_training.py). cached_features(network, hash_layer,
dataset, name, settings) computes or reuses the FeatureSplit of a dataset; session.feature_cache.split_features
does so for a run's split, and hashing.search.api's CheckpointModel.encode(split, feature_cache=DIR) too.

Files. A split's features are DIR/{dataset}_{backbone}_{split}-{key digest}.npy, a .npy array of float32 or
float16 (--feature_dtype) of shape (V, N, D): V views (--feature_views, training split only; 1 = the evaluation
transform), N items in split order, D trunk features. Next to it {same}.json records the key, the shape, how
many rows (of the V * N, view by view) are final and the SHA-256 of those rows. The key is what the features
depend on: the trunk's weights (a SHA-256 of its state_dict without the hash head, so a trained head reuses the
cache of its trunk), the preprocessing (the split's transform described), the split (data/fingerprint.py:
labels, order, images), the views, their seed (V > 1) and the dtype. Its digest names the files, so another
key never meets this file (and a file of this digest under another name is reused); a header whose key, shape or
digest does not match is refused, naming the file.

Resuming. Rows are filled in order; the header is rewritten atomically (after the rows reach the disk) every
PROGRESS_SECONDS and when the run stops, so an interrupted build continues after its last final row and ends
with the file an uninterrupted build writes. DIR/{same}.lock keeps a second builder out. Views V > 1 draw
their augmentation from a generator seeded per (seed, view, item), so no batch order or resume changes them.
"""
import contextlib
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from data.base import split_labels
from data.fingerprint import split_fingerprint
from hashing.search.stream import network_digest, transform_description
from network import trunk_only
from utils.atomic import write_json
from utils.documents import read_json_file
from utils.errors import UserError
from utils.lock import run_lock
from utils.paths import check_output_target, open_npy_memmap
from utils.runlog import progress_bar

FORMAT = 1
DTYPES = ("float32", "float16")  # --feature_dtype
PROGRESS_SECONDS = 10.0
MAX_HEADER_BYTES = 1 << 20
KEY_NAMES = {"format": "cache format", "trunk_sha256": "trunk weights", "preprocessing": "preprocessing",
             "split_sha256": "split (its images, labels or order)", "views": "number of views", "seed": "view seed",
             "dtype": "dtype"}


class FeatureSplit(NamedTuple):
    """A split's cached trunk features: read-only memory map (N, D), or (V, N, D) for a training split of V > 1
    views; labels (N, C) float32 multi-hot, row i = item i of the split; path: the .npy file."""
    features: np.ndarray
    labels: np.ndarray
    path: Path

    @property
    def views(self):
        return 1 if self.features.ndim == 2 else self.features.shape[0]


@dataclasses.dataclass(frozen=True)
class CacheSettings:
    """Where and how a split's features are cached (the flags' part of the key, and how to compute them)."""
    folder: Path
    dtype: str = "float32"
    views: int = 1
    seed: int = 0
    batch_size: int = 64
    workers: int = 0
    device: torch.device = torch.device("cpu")


def trunk_digest(network, hash_layer):
    """SHA-256 of the trunk's weights and buffers: the network without its hash layer (or --experts heads)."""
    with trunk_only(network, hash_layer) as trunk:
        return network_digest(trunk)


def describe_transform(transform):
    """The transform in words: its repr where it has one (torchvision's), else its class and settings; a
    closure (data/fashion.py's) by what it closes over."""
    closure = getattr(transform, "__closure__", None)
    if closure:
        return f"{transform.__qualname__}({', '.join(describe_transform(cell.cell_contents) for cell in closure)})"
    if type(transform).__repr__ is object.__repr__:
        return f"{type(transform).__name__}({vars(transform)})"
    return transform_description(transform)


def base_dataset(dataset):
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def feature_key(trunk_sha256, dataset, settings):
    """What the features of `dataset` depend on (module docstring); its JSON digest names the files."""
    views = settings.views
    return {"format": FORMAT, "trunk_sha256": trunk_sha256,
            "preprocessing": describe_transform(base_dataset(dataset).transform),
            "split_sha256": split_fingerprint(dataset), "views": views, "seed": settings.seed if views > 1 else None,
            "dtype": settings.dtype}


def key_digest(key):
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


class SeededView(Dataset):
    """View `view` of a dataset with a random training transform: item i drawn with torch's generator seeded
    from (seed, view, i), whatever the batch order, the workers or an interruption before it."""

    def __init__(self, dataset, seed, view):
        self.dataset, self.seed, self.view = dataset, seed, view

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([self.seed, self.view, index]).generate_state(1)[0]))
            return self.dataset[index]


def trunk_batch(trunk, images, device):
    """The trunk's pooled features (B, D) of a batch, as float32 on the CPU."""
    features = trunk(images.to(device))
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or len(features) != len(images):
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"the trunk must return pooled (batch, features) outputs, got {shape}")
    return features.float().cpu()


def _read_header(path, npy):
    """The header at `path`, or None when neither it nor the .npy file exists; UserError for a damaged one."""
    fix = "delete it and its .npy file to compute the features again"
    if not path.exists():
        if npy.exists():
            raise UserError(f"feature cache {npy} has no header {path.name}: it is damaged (stopped while it was "
                            "created?); delete it to compute the features again")
        return None
    header = read_json_file(path, "feature cache header", MAX_HEADER_BYTES, fix=fix)
    shape = header.get("shape") if isinstance(header, dict) else None
    valid = (isinstance(shape, list) and len(shape) == 3 and all(isinstance(n, int) and n >= 1 for n in shape)
             and isinstance(header.get("done"), int) and 0 <= header["done"] <= shape[0] * shape[1]
             and isinstance(header.get("sha256"), str))
    if not valid:
        raise UserError(f"feature cache header {path} is damaged (no valid shape, done and sha256); {fix}")
    return header


def _rows_digest(rows, count):
    digest = hashlib.sha256()
    for start in range(0, count, 1 << 14):
        digest.update(np.ascontiguousarray(rows[start:min(count, start + (1 << 14))]))
    return digest


def _open_checked(header, key, files, mode, count):
    """The cache's memory map (V * N rows) after checking its header against `key`, the file's size against
    the header's shape and its final rows against their recorded digest; the running digest of those rows."""
    npy, header_path = files
    fix = f"delete {npy.name} and {header_path.name} to compute the features again"
    differs = [KEY_NAMES[name] for name in key if header.get(name) != key[name]]
    if differs:
        raise UserError(f"feature cache {npy} was built from another {', '.join(differs)} (see {header_path}): it "
                        f"is never reused for these features; {fix}")
    if header["shape"][:2] != [key["views"], count]:
        raise UserError(f"feature cache header {header_path} records the shape {header['shape']}, not {key['views']} "
                        f"view(s) of {count:,} items: it is damaged; {fix}")
    features = open_npy_memmap(npy, "feature cache", key["dtype"], header["shape"], mode, fix=fix)
    rows = features.reshape(-1, features.shape[-1])
    digest = _rows_digest(rows, header["done"])
    if digest.hexdigest() != header["sha256"]:
        raise UserError(f"feature cache {npy}: its first {header['done']:,} rows are not those its header "
                        f"{header_path} recorded (edited, replaced or damaged); {fix}")
    return features, digest


def cached_features(network, hash_layer, dataset, name, settings):
    """The FeatureSplit of `dataset` through the trunk of `network` (the part before `hash_layer`), computed into
    settings.folder, or reused from there when its key matches, or resumed after an interruption."""
    folder = Path(settings.folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--feature_cache {folder} cannot be created ({exc.strerror or exc}); choose another "
                        "folder") from None
    key = feature_key(trunk_digest(network, hash_layer), dataset, settings)
    digest = key_digest(key)[:16]
    existing = sorted(folder.glob(f"*-{digest}.json"))  # the same features under another name (the API's, a split's)
    stem = existing[0].stem if existing else f"{name}-{digest}"
    npy, header_path = folder / f"{stem}.npy", folder / f"{stem}.json"
    for what, path in (("feature cache", npy), ("feature cache header", header_path)):
        check_output_target(path, what)
        if path.is_symlink():  # written in place, so never followed to another file
            raise UserError(f"{what} {path} is a symbolic link, which is never followed; delete it")
    with run_lock(folder / f"{stem}.lock", elsewhere="--feature_cache"):
        header = _read_header(header_path, npy)
        total = settings.views * len(dataset)
        if header is None or header["done"] < total:
            _compute(network, hash_layer, dataset, (npy, header_path), key, header, settings)
            header = _read_header(header_path, npy)
        features, _ = _open_checked(header, key, (npy, header_path), "r", len(dataset))
    labels = split_labels(dataset).numpy()
    return FeatureSplit(features[0] if settings.views == 1 else features, labels, npy)


def _view_loaders(dataset, settings, done):
    """A loader of the items still to compute, for every view not yet complete after `done` final rows."""
    count = len(dataset)
    for view in range(done // count, settings.views):
        items = dataset if settings.views == 1 else SeededView(dataset, settings.seed, view)
        yield DataLoader(Subset(items, range(max(0, done - view * count), count)), batch_size=settings.batch_size,
                         num_workers=settings.workers)


def _compute(network, hash_layer, dataset, files, key, header, settings):
    """Fill the cache's rows after its last final one, view by view, committing the header as it goes."""
    npy, header_path = files
    features, digest = (_open_checked(header, key, files, "r+", len(dataset)) if header is not None
                        else (None, hashlib.sha256()))
    done = header["done"] if header is not None else 0
    total, started = settings.views * len(dataset), time.perf_counter()
    state = {"features": features, "done": done, "saved": time.monotonic()}

    def save_progress():
        if state["features"] is not None:
            state["features"].flush()  # the rows reach the disk before the header says they are final
            write_json(header_path, {**key, "shape": list(state["features"].shape), "done": state["done"],
                                     "sha256": digest.hexdigest()})
            state["saved"] = time.monotonic()

    was_training = network.training
    network.eval()
    try:
        with contextlib.ExitStack() as stack:
            trunk = stack.enter_context(trunk_only(network, hash_layer))
            stack.enter_context(torch.random.fork_rng(devices=[]))  # the run's random numbers stay untouched
            stack.enter_context(torch.inference_mode())
            bar = stack.enter_context(progress_bar(total=total, initial=done, desc=f"caching {npy.name}",
                                                   unit="img"))
            for loader in _view_loaders(dataset, settings, done):
                for images, *_ in loader:
                    batch = trunk_batch(trunk, images, settings.device).numpy().astype(key["dtype"])
                    if state["features"] is None:
                        state["features"] = _create(npy, (settings.views, len(dataset), batch.shape[1]), key)
                        save_progress()
                    rows = state["features"].reshape(-1, batch.shape[1])
                    rows[state["done"]:state["done"] + len(batch)] = batch
                    digest.update(np.ascontiguousarray(batch))
                    state["done"] += len(batch)
                    bar.update(len(batch))
                    if time.monotonic() - state["saved"] >= PROGRESS_SECONDS:
                        save_progress()
    finally:
        save_progress()
        network.train(was_training)
    print(f"cached {state['done'] - done:,} feature rows of {len(dataset):,} images x {settings.views} view(s) "
          f"into {npy} ({key['dtype']}, {npy.stat().st_size / 2 ** 20:.1f} MiB) in "
          f"{time.perf_counter() - started:.1f}s")


def _create(path, shape, key):
    """A new .npy file of `shape` in the key's dtype (rows not yet written), as a writable memory map."""
    try:
        return np.lib.format.open_memmap(path, mode="w+", dtype=key["dtype"], shape=shape)
    except OSError as exc:
        raise UserError(f"cannot write the feature cache {path} ({exc.strerror or exc}); free disk space or choose "
                        "another --feature_cache folder") from None
