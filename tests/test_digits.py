import numpy as np

from data import digits, get_dataset_spec


def test_sizes_shapes_and_labels():
    train_images, train_labels, query_images, query_labels = digits.generate(seed=0)
    assert train_images.shape == (4000, 3, 32, 32) and train_images.dtype == np.uint8
    assert query_images.shape == (500, 3, 32, 32)
    assert train_labels.shape == (4000, 10) and query_labels.shape == (500, 10)
    for labels in (train_labels, query_labels):
        per_image = labels.sum(axis=1)
        assert per_image.min() == 1 and per_image.max() == 3
        assert set(np.unique(labels)) == {0.0, 1.0}
    assert (train_labels.sum(axis=0) > 300).all()  # every class appears often
    assert np.array_equal(train_images[:, 0], train_images[:, 2])  # gray over three channels


def test_each_label_has_its_digit_in_the_image():
    images, labels, _, _ = digits.generate(seed=1, train_size=50, query_size=1)
    cells = images[:, 0].reshape(50, 2, 16, 2, 16).transpose(0, 1, 3, 2, 4).reshape(50, 4, 16, 16)
    non_empty = (cells.reshape(50, 4, -1).max(axis=2) > 0).sum(axis=1)
    np.testing.assert_array_equal(non_empty, labels.sum(axis=1))


def test_deterministic_in_the_seed():
    first, second, other = digits.generate(3), digits.generate(3), digits.generate(4)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not np.array_equal(first[0], other[0])


def test_query_digits_come_from_a_disjoint_pool():
    images, targets = digits.load_source_digits()
    train_pool, query_pool = digits.split_pools(targets, np.random.default_rng([0, 0]))
    assert not set(train_pool) & set(query_pool)
    assert len(train_pool) + len(query_pool) == len(targets)
    rng = np.random.default_rng(0)
    mosaics, _ = digits.make_mosaics(images, targets, query_pool, 200, rng)
    query_scans = {images[i].tobytes() for i in query_pool}
    train_only = {images[i].tobytes() for i in train_pool} - query_scans
    used = set()
    for mosaic in mosaics[:, 0, ::2, ::2]:  # undo the 2x upscale
        for r in (0, 8):
            for c in (0, 8):
                cell = mosaic[r:r + 8, c:c + 8]
                if cell.any():
                    used.add(cell.tobytes())
    assert used <= query_scans and not used & train_only


def test_registered_with_whole_database_default():
    spec = get_dataset_spec("digits")
    assert spec.num_classes == 10 and spec.default_topk == 0
    splits = spec.build(root=None, seed=0, preprocessing=32)
    image, label = splits.train[0]
    assert image.shape == (3, 32, 32) and image.dtype.is_floating_point
    assert len(splits.database) == 4000 and len(splits.query) == 500
