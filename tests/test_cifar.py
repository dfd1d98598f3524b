"""CIFAR-10 from torchvision's python-format batches, split by the seeded mini protocol."""
import numpy as np
import pytest

from data import cifar, get_dataset_spec
from fixture_files import write_cifar_batch
from utils.errors import UserError


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """Six batches of 1,000 random images, 100 per class each: 600 per class, the protocol's minimum."""
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    batches = {}
    for name in cifar.BATCHES:
        rows = rng.integers(0, 256, size=(1000, 3072), dtype=np.uint8)
        classes = rng.permutation(np.repeat(np.arange(10), 100))
        write_cifar_batch(root / "cifar-10-batches-py" / name, rows, classes)
        batches[name] = (rows, classes)
    # One recognisable image: red = its column index, green 100, blue 0.
    rows, classes = batches["test_batch"]
    rows[0] = np.concatenate([np.tile(np.arange(32), 32), np.full(1024, 100), np.zeros(1024)])
    write_cifar_batch(root / "cifar-10-batches-py" / "test_batch", rows, classes)
    return root, batches


def test_mini_protocol_sizes_and_disjointness_at_full_scale():
    classes = np.random.default_rng(1).permutation(np.repeat(np.arange(10), 6000))
    query, train, database = cifar.mini_protocol(classes, seed=0)
    assert (len(query), len(train), len(database)) == (1000, 5000, 59000)
    assert np.array_equal(np.bincount(classes[query]), [100] * 10)
    assert np.array_equal(np.bincount(classes[train]), [500] * 10)
    assert not set(query) & set(database) and set(train) <= set(database) and set(train).isdisjoint(query)
    again, other = cifar.mini_protocol(classes, seed=0), cifar.mini_protocol(classes, seed=1)
    assert np.array_equal(again[0], query) and not np.array_equal(other[0], query)


def test_reads_the_batches_as_one_hot_images(cifar_root):
    root, batches = cifar_root
    splits = get_dataset_spec("cifar10").build(root, seed=0, preprocessing=32)
    assert (len(splits.query), len(splits.train), len(splits.database)) == (1000, 5000, 5000)
    all_rows = np.concatenate([batches[name][0] for name in cifar.BATCHES])
    all_classes = np.concatenate([batches[name][1] for name in cifar.BATCHES])
    class_of = {row.tobytes(): cls for row, cls in zip(all_rows, all_classes)}
    marked = []
    for part in splits:
        assert part.labels.sum(1).eq(1).all()
        for image, label in zip(part.images.numpy(), part.labels.numpy()):
            assert class_of[image.tobytes()] == label.argmax()
            if (image[1] == 100).all():
                marked.append(image)
    (image,) = marked[:1]
    assert (image[0] == np.arange(32)[None, :]).all() and (image[2] == 0).all()
    image, label = splits.query[0]
    assert image.shape == (3, 32, 32) and float(label.sum()) == 1.0


def test_corrupt_batch_is_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in cifar.BATCHES:
        (folder / name).write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"cannot read the CIFAR-10 batch .*data_batch_1"):
        get_dataset_spec("cifar10").build(tmp_path, seed=0, preprocessing=32)


class RunsCode:
    """A pickle payload that would call os.system when unpickled by pickle.load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_batch_file_does_not_run_code(tmp_path):
    import pickle
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    payload = {b"data": RunsCode(marker), b"labels": [0]}
    for name in cifar.BATCHES:
        (folder / name).write_bytes(pickle.dumps(payload))
    with pytest.raises(UserError, match=r"data_batch_1 .*refused to load posix.system"):
        get_dataset_spec("cifar10").build(tmp_path, seed=0, preprocessing=32)
    assert not marker.exists()
