"""PASCAL VOC: labels from the annotation XML, the paper's splits, and the archive path (md5, safe and
atomic extraction, download, offline message), on a small VOCdevkit tree written here."""
import hashlib
import shutil
import tarfile
import urllib.error

import numpy as np
import pytest
import torch

from data import DataOptions, archives, get_dataset_spec, voc
from fixture_files import add_tar_member, tar_folder, write_voc_tree
from utils.errors import UserError

# VOC class order: aeroplane 0, bicycle 1, bird 2, boat 3, bottle 4, bus 5, car 6, cat 7, chair 8, cow 9,
# diningtable 10, dog 11, horse 12, motorbike 13, person 14, pottedplant 15, sheep 16, sofa 17, train 18,
# tvmonitor 19
TRAINVAL = {
    "000005": [("chair", 0), ("chair", 1), ("person", 1)],   # difficult objects count too
    "000007": [("car", 0)],
    "000009": [("horse", 0), ("person", 0), ("tvmonitor", 0)],
}
TEST = {"000001": [("dog", 0), ("aeroplane", 0)], "000004": [("sheep", 0)]}
EXPECTED = {"000005": [8, 14], "000007": [6], "000009": [12, 14, 19], "000001": [0, 11], "000004": [16]}


def multi_hot(ids):
    rows = np.zeros((len(ids), 20), dtype=np.float32)
    for row, image_id in enumerate(ids):
        rows[row, EXPECTED[image_id]] = 1
    return rows


@pytest.fixture
def voc2007_root(tmp_path):
    write_voc_tree(tmp_path, 2007, {"trainval": TRAINVAL, "test": TEST})
    return tmp_path


def test_voc2007_labels_and_splits(voc2007_root):
    splits = get_dataset_spec("voc2007").build(voc2007_root, seed=0, preprocessing=64)
    np.testing.assert_array_equal(splits.train.labels.numpy(), multi_hot(["000005", "000007", "000009"]))
    np.testing.assert_array_equal(splits.query.labels.numpy(), multi_hot(["000001", "000004"]))
    assert splits.database.paths == splits.train.paths
    assert [p.rsplit("/", 1)[1] for p in splits.query.paths] == ["000001.jpg", "000004.jpg"]
    image, label = splits.query[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    np.testing.assert_array_equal(label.numpy(), multi_hot(["000001"])[0])


def test_voc2012_uses_train_and_val(tmp_path):
    write_voc_tree(tmp_path, 2012, {"train": {"2008_000002": [("bus", 0)]},
                                    "val": {"2008_000003": [("cat", 0), ("sofa", 0)]},
                                    "trainval": {"2008_000002": [("bus", 0)], "2008_000003": [("cat", 0), ("sofa", 0)]}})
    splits = get_dataset_spec("voc2012").build(tmp_path, seed=0, preprocessing=32)
    assert len(splits.train) == len(splits.database) == 1 and len(splits.query) == 1
    assert splits.train.labels[0].nonzero().flatten().tolist() == [5]
    assert splits.query.labels[0].nonzero().flatten().tolist() == [7, 17]


def test_unknown_class_names_the_file(voc2007_root):
    xml = voc2007_root / "VOCdevkit" / "VOC2007" / "Annotations" / "000007.xml"
    xml.write_text(xml.read_text().replace("<name>car</name>", "<name>spaceship</name>"))
    with pytest.raises(UserError, match=r"000007\.xml: object class 'spaceship'"):
        get_dataset_spec("voc2007").build(voc2007_root, seed=0, preprocessing=32)


def test_cache_gives_the_same_images_and_is_shared_and_reused(voc2007_root):
    spec = get_dataset_spec("voc2007")
    lazy = spec.build(voc2007_root, seed=0, preprocessing=48)
    rng_state = torch.get_rng_state()
    cached = spec.build(voc2007_root, seed=0, preprocessing=48, options=DataOptions(cache=True))
    # Building the cache leaves the global RNG alone, so a run that builds it trains like one that reuses it.
    assert torch.equal(torch.get_rng_state(), rng_state)
    cache_files = list((voc2007_root / "VOCdevkit" / "VOC2007" / "cache").glob("*.npy"))
    assert len(cache_files) == 1  # train, query and database in one file, each image once
    assert np.load(cache_files[0], mmap_mode="r").shape == (5, 3, 48, 48)
    for part in ("query", "database"):
        for index in range(len(getattr(lazy, part))):
            assert torch.equal(getattr(cached, part)[index][0], getattr(lazy, part)[index][0])
            assert torch.equal(getattr(cached, part)[index][1], getattr(lazy, part)[index][1])
    stamp = cache_files[0].stat().st_mtime_ns
    spec.build(voc2007_root, seed=0, preprocessing=48, options=DataOptions(cache=True))
    assert cache_files[0].stat().st_mtime_ns == stamp
    assert sorted(p.name for p in cache_files[0].parent.iterdir()) == sorted(  # no temporary file left behind
        [cache_files[0].name, cache_files[0].with_suffix(".truncated.json").name])


def test_cached_training_flips_some_images(voc2007_root):
    splits = get_dataset_spec("voc2007").build(voc2007_root, seed=0, preprocessing=32, options=DataOptions(cache=True))
    plain = torch.stack([splits.database[i][0] for i in range(3)])
    seen = torch.stack([torch.stack([splits.train[i][0] for i in range(3)]) for _ in range(12)])
    flipped = (seen == plain.flip(-1)).flatten(2).all(-1)
    assert flipped.any() and (~flipped).any()
    assert ((seen == plain).flatten(2).all(-1) | flipped).all()


# --- archives ---------------------------------------------------------------------------------------

@pytest.fixture
def voc_archive(tmp_path, monkeypatch):
    """A VOC2012-style archive of the fixture tree in DATA_ROOT (no extracted folder), registered with
    its real md5."""
    source = tmp_path / "source"
    write_voc_tree(source, 2012, {"train": TRAINVAL, "val": TEST})
    root = tmp_path / "root"
    root.mkdir()
    tar_path = tar_folder(source / "VOCdevkit", root / "fixture.tar", "VOCdevkit")
    md5 = hashlib.md5(tar_path.read_bytes()).hexdigest()
    monkeypatch.setitem(voc.ARCHIVES, "2012", [archives.Archive("fixture.tar", md5, "http://unreachable/fixture.tar")])
    return root, tar_path


def test_archive_in_data_root_is_verified_and_extracted(voc_archive):
    root, _ = voc_archive
    splits = get_dataset_spec("voc2012").build(root, seed=0, preprocessing=32)
    np.testing.assert_array_equal(splits.query.labels.numpy(), multi_hot(["000001", "000004"]))
    assert sorted(p.name for p in root.iterdir()) == ["VOCdevkit", "fixture.tar"]  # no staging folder left


def test_archive_with_wrong_md5_is_refused(voc_archive, monkeypatch):
    root, _ = voc_archive
    monkeypatch.setitem(voc.ARCHIVES, "2012", [archives.Archive("fixture.tar", "0" * 32, "http://unreachable/")])
    with pytest.raises(UserError, match=r"fixture\.tar has md5 [0-9a-f]{32}, expected 0{32}"):
        get_dataset_spec("voc2012").build(root, seed=0, preprocessing=32)
    assert sorted(p.name for p in root.iterdir()) == ["fixture.tar"]


@pytest.mark.parametrize("member, kind, target", [
    ("../escaped.txt", tarfile.REGTYPE, ""),
    ("VOCdevkit/VOC2012/link", tarfile.SYMTYPE, "../../../escaped.txt"),
])
def test_archive_members_may_not_escape(voc_archive, monkeypatch, member, kind, target):
    root, tar_path = voc_archive
    add_tar_member(tar_path, member, kind=kind, link_target=target)
    md5 = hashlib.md5(tar_path.read_bytes()).hexdigest()
    monkeypatch.setitem(voc.ARCHIVES, "2012", [archives.Archive("fixture.tar", md5, "http://unreachable/")])
    with pytest.raises(UserError, match="refusing to extract"):
        get_dataset_spec("voc2012").build(root, seed=0, preprocessing=32)
    assert sorted(p.name for p in root.iterdir()) == ["fixture.tar"]  # nothing extracted, no staging left
    assert not (root.parent / "escaped.txt").exists()


def test_absolute_member_names_stay_inside_the_data_root(voc_archive, monkeypatch, tmp_path):
    """tarfile's "data" filter strips the leading '/', so the member lands in the staging folder and is
    dropped with it; only VOCdevkit/VOC2012 is moved into the data root."""
    root, tar_path = voc_archive
    outside = tmp_path / "absolute.txt"
    add_tar_member(tar_path, str(outside), kind=tarfile.REGTYPE, link_target="")
    md5 = hashlib.md5(tar_path.read_bytes()).hexdigest()
    monkeypatch.setitem(voc.ARCHIVES, "2012", [archives.Archive("fixture.tar", md5, "http://unreachable/")])
    get_dataset_spec("voc2012").build(root, seed=0, preprocessing=32)
    assert not outside.exists()
    assert sorted(p.name for p in root.iterdir()) == ["VOCdevkit", "fixture.tar"]


def test_archive_that_does_not_fit_on_the_disk_is_refused(voc_archive, monkeypatch):
    root, _ = voc_archive
    monkeypatch.setattr(archives.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 5, 5))
    with pytest.raises(UserError, match=r"fixture\.tar unpacks to .*B, but its disk has only 5\.00B free; free disk space"):
        get_dataset_spec("voc2012").build(root, seed=0, preprocessing=32)
    assert sorted(p.name for p in root.iterdir()) == ["fixture.tar"]


def test_missing_archive_is_downloaded(voc_archive, monkeypatch):
    root, tar_path = voc_archive
    mirror = root.parent / "mirror"
    mirror.mkdir()
    tar_path.rename(mirror / "fixture.tar")
    (md5,) = [a.md5 for a in voc.ARCHIVES["2012"]]
    monkeypatch.setitem(voc.ARCHIVES, "2012", [archives.Archive("fixture.tar", md5, (mirror / "fixture.tar").as_uri())])
    splits = get_dataset_spec("voc2012").build(root, seed=0, preprocessing=32)
    assert len(splits.train) == 3
    assert (root / "fixture.tar").read_bytes() == (mirror / "fixture.tar").read_bytes()


def test_offline_message_names_archives_md5s_and_folder(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(archives.urllib.request, "urlopen", offline)
    with pytest.raises(UserError) as error:
        get_dataset_spec("voc2007").build(tmp_path, seed=0, preprocessing=32)
    message = str(error.value)
    assert "\n" not in message and "Name or service not known" in message
    for name, md5 in [("VOCtrainval_06-Nov-2007.tar", "c52e279531787c972589f7e41ab4ae64"),
                      ("VOCtest_06-Nov-2007.tar", "b6e924de25625d8de591ea690078ad9f")]:
        assert f"{name} (md5 {md5})" in message
    assert f"into {tmp_path} and rerun" in message and str(tmp_path / "VOCdevkit" / "VOC2007") in message
    assert list(tmp_path.iterdir()) == []  # no partial download left
