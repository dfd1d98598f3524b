"""Issue 23, the data side: data.verify's manifest never lands on the data or a device; every reader of split
files, hierarchies, images and the image cache takes regular files of a sane size (a FIFO would block, a device
or a gzip bomb would be read without bound); data.verify agrees with training (empty lists, query/train overlap,
offline VOC); and the silent results (padded images under --strict_images, grey TIFFs, starved classes,
unnamed truncated images) are named."""
import errno
import gzip
import json
import os
import stat
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from data import DataOptions, digits, get_dataset_spec, image_cache, protocol, verify
from data.base import UnreadableImage
from data.files import (ImageFileDataset, decode_rgb, file_splits, truncated_paths,
                        truncation_note)
from data.hierarchy_files import read_hierarchy
from data.lists import list_splits as read_list_splits
from data.query_images import read_query_image
from tests.cli_runs import exit_status
from tests.fixture_files import small_list_folder
from tests.test_flickr import RANDOM, small_protocol, write_official  # noqa: F401 (a fixture)
from tests.test_hardening_evaluate import deadline
from tests.test_protocol import truncated_jpeg
from utils.errors import UserError

LIST_SPLITS = {"train": "train.txt", "query": "test.txt", "database": "database.txt"}


def run_verify(argv, capsys):
    return exit_status(verify.main, argv, capsys)


def make_fifo(path):
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


# ============ data loss: the manifest never lands on the data or a device ============

@pytest.mark.parametrize("target", ["train.txt", "images/003.png"])
def test_the_manifest_never_lands_on_a_split_list_or_an_image(tmp_path, capsys, monkeypatch, target):
    folder = small_list_folder(tmp_path / "data")
    monkeypatch.setattr(verify, "check_images", lambda *a, **k: pytest.fail("the images were decoded first"))
    before = (folder / target).read_bytes()
    code, _, err = run_verify(["--dataset", "list", "--data_root", str(folder), "--manifest", str(folder / target)],
                              capsys)
    assert code == 1 and f"--manifest {folder / target} exists and is not an earlier manifest of data.verify" in err
    assert (folder / target).read_bytes() == before


def test_an_earlier_manifest_is_replaced_and_a_device_or_fifo_never(tmp_path, capsys):
    folder = small_list_folder(tmp_path / "data")
    argv = ["--dataset", "list", "--data_root", str(folder), "--manifest"]
    assert run_verify(argv + [str(tmp_path / "m.json")], capsys)[0] == 0
    assert run_verify(argv + [str(tmp_path / "m.json")], capsys)[0] == 0
    nodes = [(make_fifo(tmp_path / "fifo"), stat.S_ISFIFO, "a FIFO")]
    if os.geteuid() == 0:
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        nodes.append((tmp_path / "null", stat.S_ISCHR, "a character device"))
    for node, still, kind in nodes:
        with deadline(10):
            code, _, err = run_verify(argv + [str(node)], capsys)
        assert code == 1 and f"--manifest {node} is {kind}" in err and still(os.stat(node).st_mode)


# ============ hangs and unbounded reads ============

def test_a_hierarchy_file_that_is_a_fifo_or_dev_zero_is_refused_unread(tmp_path):
    fifo = make_fifo(tmp_path / "levels.csv")
    with deadline(10), pytest.raises(UserError, match=f"--hierarchy_file {fifo} is a FIFO"):
        read_hierarchy(str(fifo), 10)
    (tmp_path / "zero.csv").symlink_to("/dev/zero")
    with deadline(10), pytest.raises(UserError, match="zero.csv is a character device, not a regular file"):
        read_hierarchy(str(tmp_path / "zero.csv"), 10)


def test_a_huge_hierarchy_file_is_refused_unread(tmp_path):
    (tmp_path / "big.csv").write_bytes(b"class,level1\n" + b"x" * (2 * 2 ** 20))
    with pytest.raises(UserError, match="big.csv is 2.0 MiB, more than the 1.0 MiB"):
        read_hierarchy(str(tmp_path / "big.csv"), 10)


def test_a_gzip_bomb_among_the_shipped_splits_is_refused_uninflated(tmp_path, monkeypatch):
    monkeypatch.setattr(protocol, "SPLITS_DIR", tmp_path)
    (tmp_path / "nuswide21_train.txt.gz").write_bytes(gzip.compress(bytes(64 * 2 ** 20), compresslevel=1))
    tracemalloc.start()
    with pytest.raises(UserError, match="nuswide21_train.txt.gz holds more than 4.0 MiB .decompressed.*git checkout"):
        protocol.shipped_bytes("nuswide21_train.txt")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 * 2 ** 20
    make_fifo(tmp_path / "nuswide21_test.txt.gz")
    with deadline(10), pytest.raises(UserError, match="nuswide21_test.txt.gz is a FIFO"):
        protocol.shipped_bytes("nuswide21_test.txt")


@pytest.mark.parametrize("dataset, fifo", [("list", "test.txt"), ("nuswide", "nus_wide/database.txt"),
                                           ("voc2007", "VOCdevkit/VOC2007/ImageSets/Main/test.txt"),
                                           ("voc2007", "VOCdevkit/VOC2007/Annotations/000001.xml"),
                                           ("flickr", "flickr25k/img.txt")])
def test_split_files_that_are_fifos_are_refused_without_blocking(tmp_path, capsys, dataset, fifo):
    from tests.test_protocol import nuswide_folder
    from tests.fixture_files import write_voc_tree
    root = tmp_path / "data"
    if dataset == "list":
        small_list_folder(root)
    elif dataset == "nuswide":
        nuswide_folder(root)
    elif dataset == "voc2007":
        write_voc_tree(root, "2007", {"trainval": {"000001": [("cat", 0)]}, "test": {"000002": [("dog", 0)]}})
    else:
        write_official(root)
        (root / "flickr25k" / "targets.txt").write_text("")
    make_fifo(root / fifo)
    argv = ["--dataset", dataset, "--data_root", str(root)] + (["--split", "random"] if dataset == "flickr" else [])
    with deadline(20):
        code, _, err = run_verify(argv, capsys)
    assert code == 1 and f"{root / fifo} is a FIFO (named pipe), not a regular file" in err


def test_images_and_query_images_that_are_fifos_or_devices_are_unreadable_not_hangs(tmp_path):
    fifo = make_fifo(tmp_path / "photo.jpg")
    with deadline(10):
        with pytest.raises(UnreadableImage, match="photo.jpg is a FIFO"):
            decode_rgb(fifo)
        with pytest.raises(UnreadableImage, match="query image .*photo.jpg is a FIFO"):
            read_query_image(fifo)
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    with deadline(10), pytest.raises(UnreadableImage, match="zero.png is a character device"):
        decode_rgb(tmp_path / "zero.png")


def test_a_cifar_batch_that_is_a_fifo_is_refused(tmp_path):
    from data import cifar
    with deadline(10), pytest.raises(UserError, match="data_batch_1 is a FIFO"):
        cifar.read_batch(make_fifo(tmp_path / "data_batch_1"))


def test_an_image_cache_that_is_a_fifo_is_rebuilt(tmp_path, capsys):
    folder = small_list_folder(tmp_path / "data", count=6)
    splits = read_list_splits("list", "", 0, folder)
    first = file_splits("list", splits, 16, cache_dir=tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache").glob("*.npy")
    make_fifo(cache_file)
    with deadline(60):
        again = file_splits("list", splits, 16, cache_dir=tmp_path / "cache")
    assert "is unusable" in capsys.readouterr().err and cache_file.is_file()
    assert torch.equal(again.query[0][0], first.query[0][0])


# ============ data.verify agrees with training ============

@pytest.mark.parametrize("emptied", [["train.txt"], ["train.txt", "test.txt", "database.txt"]])
def test_verify_refuses_empty_lists_as_training_does(tmp_path, capsys, emptied):
    folder = small_list_folder(tmp_path / "data")
    for name in emptied:
        (folder / name).write_text("")
    code, out, err = run_verify(["--dataset", "list", "--data_root", str(folder)], capsys)
    assert code == 1 and "OK" not in out
    assert f"the train split is empty ({folder}/train.txt lists no images)" in err
    with pytest.raises(UserError, match="train.txt lists no images"):
        get_dataset_spec("list").build(folder, 0, 16)


def test_duplicate_flickr_image_names_are_refused_naming_them(tmp_path, small_protocol, capsys):
    folder = write_official(tmp_path)
    numbers = list(range(1, 19)) + [3, 5]  # im3 and im5 twice: the seeded split could put them on both sides
    rows = [" ".join(["1"] + ["0"] * 37)] * len(numbers)
    (folder / "img.txt").write_text("".join(f"im{n}.jpg\n" for n in numbers))
    (folder / "targets.txt").write_text("\n".join(rows) + "\n")
    message = f"{folder}/img.txt lists 2 images more than once: im3.jpg (lines 3, 19), im5.jpg (lines 5, 20)"
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        get_dataset_spec("flickr").build(tmp_path, seed=0, preprocessing=16, options=RANDOM)
    code, _, err = run_verify(["--dataset", "flickr", "--data_root", str(tmp_path), "--split", "random"], capsys)
    assert code == 1 and message in err


def test_query_images_that_are_also_training_images_are_refused(tmp_path, capsys):
    folder = small_list_folder(tmp_path / "data")
    train = (folder / "train.txt").read_text().splitlines()
    queries = (folder / "test.txt").read_text().splitlines()
    (folder / "test.txt").write_text("\n".join(queries + train[2:4]) + "\n")
    message = (f"2 query images are also training images (e.g. {folder}/images/002.png, {folder}/images/003.png): "
               "a query must not be trained on")
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        get_dataset_spec("list").build(folder, 0, 16)
    code, _, err = run_verify(["--dataset", "list", "--data_root", str(folder)], capsys)
    assert code == 1 and message in err


def test_verify_of_a_voc_root_checks_offline(tmp_path, capsys, monkeypatch):
    from data import archives
    monkeypatch.setattr(archives, "download", lambda *a: pytest.fail("data.verify tried to download"))
    monkeypatch.setattr(archives, "extract", lambda *a: pytest.fail("data.verify tried to extract"))
    code, _, err = run_verify(["--dataset", "voc2007", "--data_root", str(tmp_path)], capsys)
    assert code == 1 and f"{tmp_path}/VOCdevkit/VOC2007 does not exist: data.verify checks what is on disk" in err
    assert "neither downloads nor extracts" in err and "VOCtrainval_06-Nov-2007.tar" in err
    assert list(tmp_path.iterdir()) == []


# ============ silent wrong results ============

def cached_list_splits(tmp_path, strict=False):
    folder = tmp_path / "data"
    splits = read_list_splits("list", "", 0, folder)
    return file_splits("list", splits, 16, cache_dir=tmp_path / "cache", options=DataOptions(strict_images=strict))


def test_strict_images_refuses_an_image_the_cache_holds_padded(tmp_path):
    folder = small_list_folder(tmp_path / "data", count=6)
    (folder / "images/001.png").write_bytes(truncated_jpeg())
    padded = cached_list_splits(tmp_path)
    assert truncated_paths(padded) == [f"{folder}/images/001.png"]  # the cached splits still know it
    with pytest.raises(UnreadableImage, match=f"the image cache .* holds 1 image that was truncated and padded when "
                                              f"it was built: {folder}/images/001.png; --strict_images"):
        cached_list_splits(tmp_path, strict=True)


def test_the_truncation_note_names_the_first_files_and_the_api_lists_all(tmp_path):
    paths = [str(tmp_path / f"im{i}.jpg") for i in (5, 3, 9, 1)]
    for path in paths:
        with open(path, "wb") as handle:
            handle.write(truncated_jpeg())
    dataset = ImageFileDataset(paths, np.zeros((4, 1)), transform=np.asarray)
    for index in range(4):
        dataset[index]
    assert truncated_paths([dataset]) == sorted(paths)
    note = truncation_note(truncated_paths([dataset]))
    assert note == (f"4 truncated images were padded, as the paper's loader does (--strict_images makes them an "
                    f"error): {tmp_path}/im1.jpg, {tmp_path}/im3.jpg, {tmp_path}/im5.jpg and 1 more")
    assert truncation_note([]) == ""


def test_the_manifest_lists_every_truncated_image(tmp_path, capsys):
    folder = small_list_folder(tmp_path / "data")
    for name in ("images/020.png", "images/004.png"):
        (folder / name).write_bytes(truncated_jpeg())
    code, out, _ = run_verify(["--dataset", "list", "--data_root", str(folder), "--manifest",
                               str(tmp_path / "m.json")], capsys)
    assert code == 0 and "2 truncated (they load padded, as in the paper's code)" in out
    assert f"truncated images: {folder}/images/004.png, {folder}/images/020.png\n" in out
    files = json.loads((tmp_path / "m.json").read_text())["checks"]["files"]
    assert files["truncated"] == 2 and files["truncated_images"] == ["images/004.png", "images/020.png"]


@pytest.mark.parametrize("mode, values, expected", [
    ("F", [0.0, 128.0, 255.0], [0, 128, 255]),      # float, 0-255: as it is
    ("F", [0.0, 0.5, 1.0], [0, 128, 255]),          # float, 0-1: x 255
    ("I", [0, 128, 255], [0, 128, 255]),            # 32-bit integer, 0-255: as it is
    ("I", [0, 32896, 65535], [0, 128, 255]),        # 32-bit integer, 16-bit range: / 257
    ("I;16", [0, 32896, 65535], [0, 128, 255]),     # 16-bit: / 257
])
def test_grey_tiffs_keep_their_range(tmp_path, mode, values, expected):
    dtype = {"F": np.float32, "I": np.int32, "I;16": np.uint16}[mode]
    pixels = np.array([values], dtype=dtype)
    image = Image.fromarray(pixels)
    assert image.mode == mode
    image.save(tmp_path / "grey.tif")
    decoded, _ = decode_rgb(tmp_path / "grey.tif")
    assert np.asarray(decoded)[0, :, 0].tolist() == expected


def test_an_imbalance_that_leaves_a_class_without_training_images_is_refused():
    with pytest.raises(UserError, match=r"--imbalance 1e\+06 leaves classes 5, 6, 7, 8, 9 without a training \(and "
                                        r"database\) mosaic: .* below 1600"):
        digits.build(None, 0, 32, DataOptions(imbalance=1e6))
    assert digits.class_budgets(1599, 800).min() == 1 and digits.class_budgets(1600, 800).min() == 0


# ============ tracebacks that became one-line errors ============

def test_a_flickr_img_txt_that_is_not_utf8_is_one_line(tmp_path, small_protocol, capsys):
    folder = write_official(tmp_path)
    (folder / "img.txt").write_bytes(b"im1.jpg\nim\xe92.jpg\n")
    (folder / "targets.txt").write_text("\n".join([" ".join(["1"] + ["0"] * 37)] * 2) + "\n")
    code, _, err = run_verify(["--dataset", "flickr", "--data_root", str(tmp_path), "--split", "random"], capsys)
    assert code == 1 and f"{folder}/img.txt is not UTF-8 text (line 2 holds the byte 0xe9); save it as UTF-8" in err


@pytest.mark.parametrize("content", ['{"order": 5}', '{"order": [1, 2]}', '[1, 2]', '{"order": "im1.jpg"}',
                                     '{"order": [["im1.jpg"]]}', '"text"'])
def test_a_saved_split_of_the_wrong_types_is_one_line(tmp_path, small_protocol, content):
    folder = write_official(tmp_path)
    (folder / "split_seed0.json").write_text(content)
    with pytest.raises(UserError, match="split_seed0.json is not a saved split .* delete it to draw it again"):
        get_dataset_spec("flickr").build(tmp_path, seed=0, preprocessing=16, options=RANDOM)


def fail_cache_files_under(folder, monkeypatch):
    """The image cache's files cannot be created under `folder`, as on a read-only file system."""
    real_mkstemp = image_cache.tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):
        if str(dir).startswith(str(folder)):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(image_cache.tempfile, "mkstemp", read_only)


def test_a_cache_on_a_read_only_data_root_says_so_and_a_cache_folder_elsewhere_works(tmp_path, monkeypatch):
    folder = small_list_folder(tmp_path / "data", count=6)
    fail_cache_files_under(folder, monkeypatch)
    with pytest.raises(UserError, match=f"--cache: cannot write the image cache into {folder}/cache "
                                        r"\(Read-only file system\): the data root is read-only; put the cache in a "
                                        "writable folder with --cache_dir DIR, or drop --cache"):
        get_dataset_spec("list").build(folder, 0, 16, DataOptions(cache=True))
    elsewhere = DataOptions(cache=True, cache_dir=str(tmp_path / "elsewhere"))
    splits = get_dataset_spec("list").build(folder, 0, 16, elsewhere)
    assert len(list((tmp_path / "elsewhere").glob("list_16px_*.npy"))) == 1 and len(splits.query) == 2
