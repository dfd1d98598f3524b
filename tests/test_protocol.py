"""The paper's data protocol (issue 10): the shipped split files, the Flickr-25k split they fix, truncated
images, and which NUS-WIDE database.txt a user holds. Expected values are the paper repository's facts
(git blob ids, docs/METHOD.md §4) or are recomputed here from the raw files with gzip and json."""
import gzip
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import retrieval
from data import DataOptions, get_dataset_spec, protocol
from data.base import UnreadableImage
from data.files import ImageFileDataset
from tests.fixture_files import small_list_folder
from tests.test_bad_input import SMALL, cli, listed
from utils.runlog import read_run_log

SPLITS = Path(__file__).resolve().parents[1] / "data" / "splits"
PAPER_BLOBS = {  # the paper repository's files (JerryXu0129/HyP2-Loss e9c1c24), as git names them
    "flickr25k_img.txt": "e3eb7e735954d7a8d597ea9fec969ea6670ee55d",
    "flickr25k_targets.txt": "96c483fc130404c10d1ec53fd8b6ffd925956466",
    "flickr25k_permutation.json": "7df29b9b754e32eb7522c0d71e5a842ec5634931",
    "nuswide21_train.txt": "20f16d48c5d71412ab118563ab0edb3fd8a4e975",
    "nuswide21_test.txt": "371be57ca9dd7b0d98323cbc4dee9f1191224b5b",
}


def raw(name):
    return gzip.decompress((SPLITS / f"{name}.gz").read_bytes())


def tiny_jpeg():
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), 128, np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def truncated_jpeg():
    """A 64x64 JPEG cut in the middle of its scan data: PIL fails on it unless LOAD_TRUNCATED_IMAGES."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()[:len(buffer.getvalue()) // 2]


@pytest.fixture(scope="module")
def paper_flickr(tmp_path_factory):
    """DATA_ROOT with flickr25k/mirflickr/ holding a tiny JPEG under each of the paper's 24,581 names."""
    root = tmp_path_factory.mktemp("flickr_root")
    images = root / "flickr25k" / "mirflickr"
    images.mkdir(parents=True)
    content = tiny_jpeg()
    for name in raw("flickr25k_img.txt").decode().split():
        (images / name).write_bytes(content)
    return root


def test_git_blob_id_is_gits_object_name():
    # `git hash-object` of an empty file and of "hello\n", well-known values
    assert protocol.git_blob_id(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert protocol.git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_shipped_files_are_the_papers_bytes():
    for name, blob in PAPER_BLOBS.items():
        content = raw(name)
        assert hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest() == blob, name
        assert protocol.shipped_bytes(name) == content
    assert len(raw("nuswide21_train.txt").decode().splitlines()) == 10500
    assert len(raw("nuswide21_test.txt").decode().splitlines()) == 2100


def test_damaged_shipped_file_is_refused(tmp_path, monkeypatch):
    (tmp_path / "flickr25k_img.txt.gz").write_bytes(gzip.compress(b"im1.jpg\n"))
    monkeypatch.setattr(protocol, "SPLITS_DIR", tmp_path)
    with pytest.raises(protocol.UserError, match=r"flickr25k_img\.txt\.gz is damaged .*`git checkout -- data/splits`"):
        protocol.shipped_bytes("flickr25k_img.txt")


def test_flickr_default_split_is_the_papers_permutation(paper_flickr):
    names = raw("flickr25k_img.txt").decode().split()
    targets = [[int(v) for v in line.split()] for line in raw("flickr25k_targets.txt").decode().splitlines()]
    perm = json.loads(raw("flickr25k_permutation.json"))
    # 24,581 lines: img.txt and targets.txt end without a newline, so `wc -l` counts 24,580
    assert len(names) == len(targets) == len(perm) == 24581 and sorted(perm) == list(range(24581))

    splits = get_dataset_spec("flickr").build(paper_flickr, seed=7, preprocessing=16)  # the seed plays no part
    expected = {"query": perm[:1000], "train": perm[1000:5000], "database": perm[5000:]}
    for split, rows in expected.items():
        dataset = getattr(splits, split)
        assert [Path(p).name for p in dataset.paths] == [names[row] for row in rows], split
        np.testing.assert_array_equal(dataset.labels.numpy(), np.array([targets[row] for row in rows]))
    assert (len(splits.query), len(splits.train), len(splits.database)) == (1000, 4000, 19581)
    assert not set(splits.train.paths) & set(splits.database.paths)


def test_random_split_is_explicit_and_needs_the_users_labels(paper_flickr):
    with pytest.raises(protocol.UserError, match="img.txt \\+ targets.txt or the annotation files"):
        get_dataset_spec("flickr").list_splits(paper_flickr, 0, DataOptions(split="random"))


def test_truncated_image_loads_padded_and_is_counted_or_fails_when_strict(tmp_path):
    path = tmp_path / "cut.jpg"
    path.write_bytes(truncated_jpeg())
    with pytest.raises(OSError, match="truncated"):  # what PIL alone does, without the paper's setting
        Image.open(path).load()
    dataset = ImageFileDataset([str(path), str(path)], np.zeros((2, 1)), transform=np.asarray)
    assert dataset[1][0].shape == (64, 64, 3)
    assert dataset.truncated.tolist() == [0, 1] and dataset.truncated_paths() == {str(path)}
    strict = ImageFileDataset([str(path)], np.zeros((1, 1)), transform=np.asarray, strict=True)
    with pytest.raises(UnreadableImage, match=f"{path} is truncated .*--strict_images"):
        strict[0]
    with pytest.raises(OSError, match="truncated"):  # the setting did not leak out of the decode
        Image.open(path).load()


def test_cli_counts_truncated_images_and_strict_images_stops(tmp_path, capsys):
    folder = small_list_folder(tmp_path / "data")
    (folder / "images/003.png").write_bytes(truncated_jpeg())  # PIL identifies images by their content
    code, out, _ = cli(listed(tmp_path, ["--workers", "1"]), capsys)
    assert code == 0 and "1 truncated image was padded, as the paper's loader does" in out
    record = read_run_log(tmp_path / "out" / "list_small_16.jsonl")
    assert record["truncated_images"] == [f"{folder}/images/003.png"] and record["truncated_image_count"] == 1
    code, _, err = cli(listed(tmp_path, ["--strict_images", "--overwrite"]), capsys)
    assert code == 1 and f"{folder}/images/003.png is truncated" in err and "--strict_images" in err


def nuswide_folder(root):
    """A small NUS-WIDE-like list folder (21 labels: the fixture's 4, padded with zeros)."""
    folder = small_list_folder(root / "nus_wide")
    for file_name in ("train.txt", "test.txt", "database.txt"):
        lines = [line + " 0" * 17 for line in (folder / file_name).read_text().splitlines()]
        (folder / file_name).write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize("blob, variant", [
    ("1d8f3dd2214d19fe038b91f2aab68bfe3d84fd01", "paper"),
    ("23c314cf90f8ed2648c957d302435ad7ccf9ce48", "DeepHash-pytorch nuswide_21"),
])
def test_nuswide_database_variant_of_the_known_blob_ids(tmp_path, monkeypatch, blob, variant):
    content = (nuswide_folder(tmp_path) / "database.txt").read_bytes()
    real = protocol.git_blob_id  # stands for the 193,734-line file of that id, which cannot ship here
    monkeypatch.setattr(protocol, "git_blob_id", lambda data: blob if data == content else real(data))
    assert get_dataset_spec("nuswide").describe(tmp_path)["database.txt"] == variant


def test_unknown_nuswide_database_is_named_in_the_run_header_and_log(tmp_path, capsys):
    content = (nuswide_folder(tmp_path / "data") / "database.txt").read_bytes()
    blob = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
    variant = f"unknown (git blob {blob})"
    argv = ["--dataset", "nuswide", "--data_root", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"),
            *SMALL]
    code, out, _ = cli(argv, capsys)
    assert code == 0 and f"database.txt {variant}" in out
    assert read_run_log(tmp_path / "out" / "nuswide_small_16.jsonl")["data_files"]["database.txt"] == variant


def test_nuswide_uses_the_shipped_train_and_test_lists_when_the_folder_has_none(tmp_path):
    folder = tmp_path / "nus_wide"
    folder.mkdir()
    (folder / "database.txt").write_text("images/a.jpg" + " 0" * 20 + " 1\n")
    splits = get_dataset_spec("nuswide").list_splits(tmp_path)
    train_lines = raw("nuswide21_train.txt").decode().splitlines()
    assert len(splits["train"].paths) == 10500 and len(splits["query"].paths) == 2100
    assert splits["train"].paths[0] == str(folder / train_lines[0].split()[0])
    assert splits["train"].labels[0].tolist() == [float(v) for v in train_lines[0].split()[1:]]
    assert retrieval.get_args_parser().parse_args([]).split == "paper"


def test_split_random_is_for_flickr_only(capsys):
    code, _, err = cli(["--dataset", "voc2007", "--split", "random", *SMALL], capsys)
    assert code == 1 and "--split random applies to --dataset flickr only" in err
