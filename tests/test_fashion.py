"""Fashion-MNIST (data/fashion.py): the idx reader against torchvision's and against damaged files of our own,
where the files are found, the single-label protocol, the multi-label mosaics of real items, --cache and --subset."""
import gzip
import shutil
import struct
import urllib.error

import numpy as np
import pytest
import torch

import retrieval
from cli_runs import exit_status
from data import fashion, verify
from data.base import DataOptions
from data.registry import build_splits
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from utils.errors import UserError

DEBIAN_FILES = [fashion.DEBIAN_FOLDER / f"{stem}.gz" for stem in fashion.FILES.values()]
needs_debian_files = pytest.mark.skipif(not all(path.is_file() for path in DEBIAN_FILES),
                                        reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")


def write_idx(path, array, magic=None, compress=False):
    """An idx file of uint8 `array` written by hand: big-endian magic (0x08 = unsigned byte, then the number of
    dimensions), each dimension as a big-endian uint32, then the bytes."""
    magic = 0x800 + array.ndim if magic is None else magic
    data = struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + np.ascontiguousarray(array, np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def unique_images(count, first):
    """(count, 28, 28) uint8 images, image i carrying first + i in its first two pixels (so each is unique)."""
    rng = np.random.default_rng(first)
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    codes = np.arange(first, first + count)
    images[:, 0, 0], images[:, 0, 1] = codes // 256, codes % 256
    return images


def image_code(images):
    return images[..., 0, 0].astype(np.int64) * 256 + images[..., 0, 1]


def fixture_arrays(per_class_train=500, per_class_test=100):
    """The four arrays of a small Fashion-MNIST: unique images (training codes below 10,000, test codes above)."""
    train_labels = np.random.default_rng(1).permutation(np.repeat(np.arange(10), per_class_train)).astype(np.uint8)
    test_labels = np.random.default_rng(2).permutation(np.repeat(np.arange(10), per_class_test)).astype(np.uint8)
    return {"train_images": unique_images(len(train_labels), 0), "train_labels": train_labels,
            "test_images": unique_images(len(test_labels), 10_000), "test_labels": test_labels}


def write_fixture(folder, arrays, compress=False):
    for key, stem in fashion.FILES.items():
        write_idx(folder / (f"{stem}.gz" if compress else stem), arrays[key], compress=compress)
    return folder


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    arrays = fixture_arrays()
    root = tmp_path_factory.mktemp("fashion")
    write_fixture(root / "FashionMNIST" / "raw", arrays, compress=True)
    return root, arrays


@pytest.fixture
def no_debian_no_download(monkeypatch, tmp_path):
    """No Debian folder, and a download that fails as it does offline."""
    monkeypatch.setattr(fashion, "DEBIAN_FOLDER", tmp_path / "no-debian-package")

    def offline(self):
        raise urllib.error.URLError("no network in this test")
    monkeypatch.setattr("torchvision.datasets.FashionMNIST.download", offline)


@needs_debian_files
def test_reader_equals_torchvision_on_the_real_files(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"  # torchvision reads the uncompressed files of its raw/ folder
    raw.mkdir(parents=True)
    for path in DEBIAN_FILES:
        with gzip.open(path) as source, open(raw / path.stem, "wb") as target:
            shutil.copyfileobj(source, target)
    from torchvision.datasets import FashionMNIST
    ours = fashion.load(tmp_path, offline=True)
    for part, train in (("train", True), ("test", False)):
        theirs = FashionMNIST(str(tmp_path), train=train)
        assert np.array_equal(ours[f"{part}_images"], theirs.data.numpy())
        assert np.array_equal(ours[f"{part}_labels"], theirs.targets.numpy())
    assert len(ours["train_images"]) == 60_000 and len(ours["test_images"]) == 10_000


def test_reader_equals_torchvision_on_our_fixture(fixture_root, tmp_path):
    root, arrays = fixture_root
    write_fixture(tmp_path / "FashionMNIST" / "raw", arrays)  # uncompressed: what torchvision reads
    from torchvision.datasets import FashionMNIST
    theirs = FashionMNIST(str(tmp_path), train=False)
    ours = fashion.load(root, offline=True)  # from the .gz files
    assert np.array_equal(ours["test_images"], theirs.data.numpy()) and np.array_equal(ours["test_images"],
                                                                                       arrays["test_images"])
    assert np.array_equal(ours["test_labels"], theirs.targets.numpy())


@pytest.mark.parametrize("damage", ["truncated", "wrong magic", "huge declared size", "not gzip"])
def test_damaged_file_is_one_line_naming_it_and_both_ways_to_get_it(tmp_path, damage):
    images = unique_images(20, 0)
    path = tmp_path / "t10k-images-idx3-ubyte"
    if damage == "truncated":
        path.write_bytes(write_idx(path, images).read_bytes()[:-100])
    elif damage == "wrong magic":
        write_idx(path, images, magic=0x801 + 0x100)
    elif damage == "huge declared size":  # 16 bytes declaring 4 x 10^9 pixels: refused, nothing allocated
        path.write_bytes(struct.pack(">4I", 0x803, 5_000_000, 28, 28))
    else:
        path = tmp_path / "t10k-images-idx3-ubyte.gz"
        path.write_bytes(b"not a gzip stream at all")
    with pytest.raises(UserError) as raised:
        fashion.read_idx(path, 3, root=tmp_path)
    message = str(raised.value)
    assert "\n" not in message and str(path) in message
    assert "apt-get install dataset-fashion-mnist" in message and str(tmp_path / "FashionMNIST" / "raw") in message
    expected = {"truncated": "declares 20 x 28 x 28", "wrong magic": "magic number 0x901",
                "huge declared size": "declares 5000000 x 28 x 28", "not gzip": "cannot read"}[damage]
    assert expected in message


def test_files_found_in_debian_folder_when_data_root_lacks_them(fixture_root, tmp_path, monkeypatch):
    _, arrays = fixture_root
    debian = write_fixture(tmp_path / "debian", arrays, compress=True)
    monkeypatch.setattr(fashion, "DEBIAN_FOLDER", debian)
    found = fashion.fetch(tmp_path / "empty_root", offline=True)
    assert found["train_images"] == debian / "train-images-idx3-ubyte.gz"
    assert np.array_equal(fashion.load(tmp_path / "empty_root", offline=True)["train_labels"], arrays["train_labels"])
    direct = write_fixture(tmp_path / "direct", arrays)  # the four files directly in --data_root win over Debian's
    assert fashion.fetch(direct, offline=True)["test_labels"] == direct / "t10k-labels-idx1-ubyte"


def test_no_files_anywhere_is_one_line_with_both_ways(tmp_path, no_debian_no_download, capsys):
    with pytest.raises(UserError) as raised:
        fashion.fetch(tmp_path)  # tries torchvision's download, which fails here
    message = str(raised.value)
    assert "\n" not in message and "train-images-idx3-ubyte" in message
    assert "apt-get install dataset-fashion-mnist" in message and str(tmp_path / "FashionMNIST" / "raw") in message
    assert "could not download Fashion-MNIST" in capsys.readouterr().out
    code, _, err = exit_status(retrieval.cli, ["--dataset", "fashion_mnist", "--backbone", "small", "--data_root",
                                               str(tmp_path), "--output_dir", str(tmp_path / "out")], capsys)
    assert code != 0 and "apt-get install dataset-fashion-mnist" in err and len(err.strip().splitlines()) == 1


def test_single_label_protocol_counts_disjointness_and_seed(fixture_root):
    root, arrays = fixture_root
    splits = build_splits("fashion_mnist", root, 0, Preprocessing(28))
    assert (len(splits.train), len(splits.query), len(splits.database)) == (5000, 1000, 5000)
    codes = {name: image_code(part.images[:, 0].numpy()) for name, part in splits._asdict().items()}
    labels = {name: part.labels.numpy() for name, part in splits._asdict().items()}
    assert np.array_equal(labels["query"].sum(axis=0), [100] * 10) and np.array_equal(labels["train"].sum(axis=0),
                                                                                      [500] * 10)
    assert (labels["query"].sum(axis=1) == 1).all()  # one-hot
    assert (codes["query"] >= 10_000).all() and (codes["train"] < 10_000).all()  # queries: test items only
    assert not set(codes["query"]) & set(codes["train"]) and set(codes["train"]) <= set(codes["database"])
    # each image keeps its own label: the fixture's label of the item with that code
    assert np.array_equal(labels["query"].argmax(axis=1), arrays["test_labels"][codes["query"] - 10_000])
    train, test = arrays["train_labels"], arrays["test_labels"]
    query, train_rows = fashion.single_label_protocol(train, test, seed=0, query_per_class=30, train_per_class=40)
    again, other = fashion.single_label_protocol(train, test, seed=0, query_per_class=30, train_per_class=40), \
        fashion.single_label_protocol(train, test, seed=1, query_per_class=30, train_per_class=40)
    assert np.array_equal(np.bincount(test[query]), [30] * 10) and np.array_equal(np.bincount(train[train_rows]),
                                                                                  [40] * 10)
    assert np.array_equal(again[0], query) and np.array_equal(again[1], train_rows)
    assert not np.array_equal(other[0], query) and not np.array_equal(other[1], train_rows)


def test_mosaic_labels_are_the_classes_of_the_items_drawn(fixture_root):
    _, arrays = fixture_root
    (images, labels, layout), (query_images, query_labels, query_layout) = fashion.generate_mosaics(arrays, 3, 300, 80)
    assert images.shape == (300, 1, 56, 56) and query_images.shape == (80, 1, 56, 56)
    for mosaics, rows, cells, source in ((images, labels, layout, "train"), (query_images, query_labels,
                                                                              query_layout, "test")):
        occupied = (cells >= 0).sum(axis=1)
        assert occupied.min() == 1 and occupied.max() == 4
        for mosaic, label, cell_items in zip(mosaics, rows, cells):
            expected = np.zeros(10)
            for cell, item in enumerate(cell_items):
                pixels = mosaic[0, 28 * (cell // 2):28 * (cell // 2 + 1), 28 * (cell % 2):28 * (cell % 2 + 1)]
                if item < 0:
                    assert not pixels.any()
                    continue
                assert np.array_equal(pixels, arrays[f"{source}_images"][item])  # the item itself, in its cell
                expected[arrays[f"{source}_labels"][item]] = 1
            assert np.array_equal(label, expected)
            assert len(set(cell_items[cell_items >= 0])) == (cell_items >= 0).sum()  # distinct items


def test_mosaic_queries_and_database_share_no_item_and_follow_the_seed(fixture_root):
    _, arrays = fixture_root

    def item_codes(mosaics):  # the codes of the items in the occupied cells, read from the pixels
        cells = mosaics[:, 0].reshape(-1, 2, 28, 2, 28).transpose(0, 1, 3, 2, 4).reshape(-1, 28, 28)
        return set(image_code(cells[cells.any(axis=(1, 2))]))
    (database, _, _), (query, _, _) = fashion.generate_mosaics(arrays, 0, 400, 100)
    database_items, query_items = item_codes(database), item_codes(query)
    assert query_items and database_items and not query_items & database_items
    assert all(code >= 10_000 for code in query_items) and all(code < 10_000 for code in database_items)
    (same, _, _), (same_query, _, _) = fashion.generate_mosaics(arrays, 0, 400, 100)
    (other, _, _), (other_query, _, _) = fashion.generate_mosaics(arrays, 1, 400, 100)
    assert np.array_equal(same, database) and np.array_equal(same_query, query)
    assert not np.array_equal(other, database) and not np.array_equal(other_query, query)


def test_mosaic_splits_subset_and_cache(fixture_root, tmp_path, monkeypatch):
    root, _ = fixture_root
    monkeypatch.setattr(fashion, "MOSAIC_DATABASE", 600)
    monkeypatch.setattr(fashion, "MOSAIC_QUERY", 50)
    monkeypatch.setattr(fashion, "MOSAIC_TRAIN", 200)
    splits = build_splits("fashion_mosaic", root, 0, Preprocessing(32))
    assert (len(splits.train), len(splits.query), len(splits.database)) == (200, 50, 600)
    assert torch.equal(splits.train.images, splits.database.images[:200])  # training = first database mosaics
    image, label = splits.query[0]
    grey = image * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    assert image.shape == (3, 32, 32) and torch.allclose(grey[0], grey[1], atol=1e-5) and label.sum() >= 1
    small = build_splits("fashion_mosaic", root, 0, Preprocessing(32), subset=30)
    assert [len(part) for part in small] == [30, 30, 30]
    assert torch.equal(small.query[5][1], splits.query[5][1])
    options = DataOptions(cache=True, cache_dir=str(tmp_path / "cache"))
    built = build_splits("fashion_mosaic", root, 0, Preprocessing(32), options)
    [cache_file] = (tmp_path / "cache").glob("fashion_mosaic_seed0_*.npz")
    monkeypatch.setattr(fashion, "generate_mosaics", lambda *args: pytest.fail("the cache was not used"))
    again = build_splits("fashion_mosaic", root, 0, Preprocessing(32), options)
    assert torch.equal(again.database.images, built.database.images) and torch.equal(again.query.labels,
                                                                                     splits.query.labels)
    assert cache_file.is_file()


def test_cli_trains_on_fashion_mosaic_with_subset(fixture_root, tmp_path, monkeypatch, capsys):
    root, _ = fixture_root
    monkeypatch.setattr(fashion, "MOSAIC_DATABASE", 400)
    monkeypatch.setattr(fashion, "MOSAIC_QUERY", 40)
    code, out, _ = exit_status(retrieval.cli, ["--dataset", "fashion_mosaic", "--backbone", "small", "--hash_bit",
                                               "16", "--epochs", "1", "--subset", "60", "--batch_size", "20",
                                               "--data_root", str(root), "--output_dir", str(tmp_path)], capsys)
    assert code == 0 and "{'train': 60, 'query': 40, 'database': 60}" in out and "best mAP@60" in out


@needs_debian_files
def test_verify_checks_the_real_files(tmp_path, capsys):
    code, out, _ = exit_status(verify.main, ["--dataset", "fashion_mosaic", "--data_root", str(tmp_path)], capsys)
    assert code == 0 and "the content Debian installs" in out and "database 20,000" in out


def test_verify_reports_a_damaged_file(fixture_root, tmp_path, no_debian_no_download, capsys):
    write_fixture(tmp_path, fixture_root[1])
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x03\xe8" + bytes(10))
    code, _, err = exit_status(verify.main, ["--dataset", "fashion_mnist", "--data_root", str(tmp_path)], capsys)
    assert code == 1 and "t10k-labels-idx1-ubyte declares 1000 = 1,000 bytes but holds 10" in err


def test_convergence_study_takes_a_dataset_and_given_recipes(tmp_path, capsys):
    from benchmarks import digits_study
    options = digits_study.parse(["--dataset", "fashion_mosaic", "--losses", "dhn", "--recipe", "dhn=sgd_0.01",
                                  "--output_dir", str(tmp_path)])
    scores = digits_study.search(options)  # nothing to search: the recipe is given
    assert scores == {"dhn": {"sgd_0.01": None}} and digits_study.best_recipe(scores, "dhn") == "sgd_0.01"
    args = digits_study.run_args(options, "final", "dhn", 16, 0, "sgd_0.01")
    assert args.dataset == "fashion_mosaic" and args.lr == 0.01 and args.optimizer == "sgd"
    assert "fashion_mosaic_study" in args.output_dir
    rows = digits_study.summary_rows(options, scores, {("dhn", bits): [] for bits in options.bits})
    text = digits_study.render_markdown(options, scores, rows, "python -m ...")
    assert "given: `sgd_0.01`" in text and "no search" in text and "Search (seed 0" not in text
    # a given recipe is chosen: named alone, and looked up under --collect (not "not chosen yet (1/3 ...)")
    assert digits_study.chosen_recipe(scores, "dhn") == "sgd_0.01"
    assert digits_study.recipe_label(options, scores, "dhn") == "`sgd_0.01`"
    collecting = digits_study.parse(["--losses", "dhn", "--recipe", "dhn=sgd_0.01", "--collect"])
    assert digits_study.final_recipe(collecting, scores, "dhn") == "sgd_0.01"
    code, _, err = exit_status(digits_study.cli, ["--recipe", "dhn=sgd_0.7"], capsys)
    assert code == 2 and "expected LOSS=RECIPE" in err
