"""CIFAR-10 in the mini protocol of deep hashing papers (single label, as one-hot rows).

Folder DATA_ROOT/cifar-10-batches-py/ (torchvision's python format: data_batch_1..5 and test_batch);
when missing, cifar-10-python.tar.gz is taken from DATA_ROOT (md5 checked) or downloaded and extracted.
The 60,000 images are pooled and split per class with --seed: 100 queries and 500 training images per
class, so 1,000 queries, 5,000 train, and a database of every image that is not a query (59,000).
The images stay in memory (180 MB) and are resized to the network's input size batch by batch.
"""
import pickle
from pathlib import Path

import numpy as np

from utils.errors import UserError
from utils.paths import MiB, open_regular

from .archives import Archive, ensure_extracted
from .base import ArrayImageDataset, DatasetSpec, RetrievalSplits
from .transforms import BatchTransform

ARCHIVES = [Archive("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")]
FOLDER = "cifar-10-batches-py"
BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
NUM_CLASSES = 10
QUERY_PER_CLASS, TRAIN_PER_CLASS = 100, 500
MAX_BATCH_BYTES = 64 * MiB  # a batch of 10,000 images is 31 MB


# The only globals a CIFAR-10 batch refers to: how numpy pickles an array. Anything else (os.system, eval, ...)
# would run code while unpickling, so a crafted batch file is refused instead (see README, Threat model).
ARRAY_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                 ("numpy", "ndarray"), ("numpy", "dtype")}


class BatchUnpickler(pickle.Unpickler):
    """Unpickles builtin containers, bytes, str, numbers and numpy arrays; refuses every other global."""

    def find_class(self, module, name):
        if (module, name) not in ARRAY_GLOBALS:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: not part of a CIFAR-10 batch")
        return super().find_class(module, name)


def read_batch(path):
    """uint8 (N, 3, 32, 32) images and int64 (N,) classes of one pickled CIFAR-10 batch."""
    try:
        with open_regular(path, "the CIFAR-10 batch", MAX_BATCH_BYTES) as handle:
            batch = BatchUnpickler(handle, encoding="bytes").load()
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        classes = np.asarray(batch[b"labels"], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"cannot read the CIFAR-10 batch {path} ({type(exc).__name__}: {exc}); delete "
                        f"{Path(path).parent} to extract the archive again") from None
    if len(images) != len(classes) or classes.min() < 0 or classes.max() >= NUM_CLASSES:
        raise UserError(f"{path} is not a CIFAR-10 batch ({len(images)} images, {len(classes)} labels)")
    return images, classes


def mini_protocol(classes, seed, query_per_class=QUERY_PER_CLASS, train_per_class=TRAIN_PER_CLASS):
    """(query, train, database) index arrays: per class, a seeded draw of queries and training images;
    the database is everything but the queries."""
    rng = np.random.default_rng(seed)
    query, train = [], []
    for label in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(classes == label))
        if len(members) < query_per_class + train_per_class:
            raise UserError(f"CIFAR-10 class {label} has {len(members)} images, the mini protocol needs "
                            f"{query_per_class + train_per_class}")
        query.append(members[:query_per_class])
        train.append(members[query_per_class:query_per_class + train_per_class])
    query, train = np.sort(np.concatenate(query)), np.sort(np.concatenate(train))
    return query, train, np.setdiff1d(np.arange(len(classes)), query)


def extracted_folder(root):
    """DATA_ROOT/cifar-10-batches-py, extracted from the archive (taken from DATA_ROOT or downloaded) if needed."""
    return ensure_extracted(Path(root), FOLDER, ARCHIVES)


def build(root, seed, preprocessing, options=None):
    del options  # held in memory already, decoded from the batches
    folder = extracted_folder(root)
    images, classes = (np.concatenate(parts) for parts in zip(*(read_batch(folder / name) for name in BATCHES)))
    labels = np.eye(NUM_CLASSES, dtype=np.float32)[classes]
    query, train, database = mini_protocol(classes, seed)
    return RetrievalSplits(
        train=ArrayImageDataset(images[train], labels[train], BatchTransform(preprocessing, train=True)),
        query=ArrayImageDataset(images[query], labels[query], BatchTransform(preprocessing, train=False)),
        database=ArrayImageDataset(images[database], labels[database], BatchTransform(preprocessing, train=False)))


SPEC = DatasetSpec(
    name="cifar10", num_classes=NUM_CLASSES, default_topk=5000, build=build, in_memory=True, fetch=extracted_folder,
    summary="CIFAR-10 mini protocol: per class 100 queries and 500 train; database = all but the queries (59,000)")
