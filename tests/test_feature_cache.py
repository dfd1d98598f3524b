"""The feature cache of a frozen trunk (session/feature_cache.py, --feature_cache; docs/METHOD.md §11)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from data.base import ArrayImageDataset
from data.transforms import BatchTransform, Preprocessing
from hashing.search.api import load_checkpoint
from network import build_network
from hashing import feature_cache
from session.cached_training import FeatureDataset
from hashing.feature_cache import CacheSettings, cached_features, feature_key, key_digest, trunk_digest
from tests.cli_runs import run_small_digits, small_digits_failure
from utils import paths
from utils.errors import UserError


def tiny_dataset(train=False, items=24, seed=0, preprocessing=Preprocessing(16)):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (items, 3, 16, 16), dtype=torch.uint8, generator=generator)
    labels = torch.nn.functional.one_hot(torch.arange(items) % 4, 4).float()
    return ArrayImageDataset(images, labels, BatchTransform(preprocessing, train=train))


def small_network(seed=0):
    torch.manual_seed(seed)
    return build_network("small", 8).eval()


def settings(folder, **changes):
    return CacheSettings(Path(folder), **{"batch_size": 5, **changes})


def brute_force_features(network, dataset):
    """The trunk's features straight from SmallHashNet's layers, on the whole split at once."""
    network.eval()
    with torch.no_grad():
        return network.features(dataset.transform(dataset.images)).numpy()


def test_cached_features_are_the_trunk_outputs_and_are_reused(tmp_path):
    network, dataset = small_network(), tiny_dataset()
    split = cached_features(network, "hash_layer", dataset, "tiny", settings(tmp_path))
    assert split.features.shape == (24, 128) and split.views == 1
    np.testing.assert_allclose(split.features, brute_force_features(network, dataset), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(split.labels, dataset.labels.numpy())
    modified = split.path.stat().st_mtime_ns
    again = cached_features(network, "hash_layer", dataset, "tiny", settings(tmp_path))
    assert again.path == split.path and split.path.stat().st_mtime_ns == modified  # read, not recomputed
    half = cached_features(network, "hash_layer", dataset, "tiny", settings(tmp_path, dtype="float16"))
    assert half.features.dtype == np.float16 and half.path != split.path
    np.testing.assert_allclose(half.features.astype(np.float32), split.features, rtol=2e-3, atol=2e-3)
    assert half.path.stat().st_size < 0.6 * split.path.stat().st_size


def test_key_changes_with_weights_preprocessing_and_split_but_not_the_head(tmp_path):
    network, dataset, base = small_network(), tiny_dataset(), settings(tmp_path)
    key = key_digest(feature_key(trunk_digest(network, "hash_layer"), dataset, base))
    other_weights = key_digest(feature_key(trunk_digest(small_network(seed=1), "hash_layer"), dataset, base))
    other_normalisation = tiny_dataset(preprocessing=Preprocessing(16, mean=(0.5, 0.5, 0.5)))
    other_split = tiny_dataset(seed=1)
    reordered = Subset(dataset, list(reversed(range(len(dataset)))))
    keys = {key, other_weights,
            key_digest(feature_key(trunk_digest(network, "hash_layer"), other_normalisation, base)),
            key_digest(feature_key(trunk_digest(network, "hash_layer"), other_split, base)),
            key_digest(feature_key(trunk_digest(network, "hash_layer"), reordered, base)),
            key_digest(feature_key(trunk_digest(network, "hash_layer"), dataset, settings(tmp_path, dtype="float16")))}
    assert len(keys) == 6
    with torch.no_grad():
        network.hash_layer.weight.add_(1.0)  # a trained head keeps its trunk's cache
    assert key_digest(feature_key(trunk_digest(network, "hash_layer"), dataset, base)) == key
    experts = build_network("small", 8, experts=2)
    plain = build_network("small", 8)
    plain.load_state_dict(  # the same trunk weights: the digest ignores the heads and the wrapper
        {name.removeprefix("trunk."): value for name, value in experts.state_dict().items()
                           if name.startswith("trunk.")}, strict=False)
    assert trunk_digest(plain, "hash_layer") == trunk_digest(experts, "hash_layer")


@pytest.fixture
def built(tmp_path):
    network, dataset = small_network(), tiny_dataset()
    split = cached_features(network, "hash_layer", dataset, "tiny", settings(tmp_path))
    return network, dataset, split.path, split.path.with_suffix(".json")


def refused(built, tmp_path, what):
    network, dataset, npy, _ = built
    with pytest.raises(UserError) as error:
        cached_features(network, "hash_layer", dataset, "tiny", settings(tmp_path))
    message = str(error.value)
    assert str(npy.name) in message and "\n" not in message, message
    assert what in message, message


def edit_header(path, **changes):
    header = json.loads(path.read_text())
    path.write_text(json.dumps({**header, **changes}))


def test_a_stale_key_is_refused_naming_the_file(built, tmp_path):
    edit_header(built[3], trunk_sha256="0" * 64)
    refused(built, tmp_path, "trunk weights")


def test_a_header_of_another_split_is_refused(built, tmp_path):
    edit_header(built[3], split_sha256="1" * 64, preprocessing="Resize(8)")
    refused(built, tmp_path, "preprocessing, split")


def test_a_truncated_file_is_refused(built, tmp_path):
    npy = built[2]
    npy.write_bytes(npy.read_bytes()[:-7])
    refused(built, tmp_path, "truncated")


def test_a_changed_shape_or_row_count_is_refused(built, tmp_path):
    edit_header(built[3], shape=[1, 24, 64])
    refused(built, tmp_path, "damaged")


def test_changed_rows_are_refused(built, tmp_path):
    npy = built[2]
    data = bytearray(npy.read_bytes())
    data[-3] ^= 0xFF
    npy.write_bytes(bytes(data))
    refused(built, tmp_path, "not those its header")


def test_a_missing_header_is_refused(built, tmp_path):
    built[3].unlink()
    refused(built, tmp_path, "no header")


def interrupted_build(monkeypatch, folder, dataset, cache_settings, batches):
    calls, original = [0], feature_cache.trunk_batch

    def stopping(*args):
        calls[0] += 1
        if calls[0] > batches:
            raise KeyboardInterrupt
        return original(*args)
    with monkeypatch.context() as patch:
        patch.setattr(feature_cache, "trunk_batch", stopping)
        with pytest.raises(KeyboardInterrupt):
            cached_features(small_network(), "hash_layer", dataset, "tiny", cache_settings)
    header = json.loads(next(Path(folder).glob("*.json")).read_text())
    per_view = -(-len(dataset) // cache_settings.batch_size)
    full_views, rest = divmod(batches, per_view)
    assert header["done"] == full_views * len(dataset) + rest * cache_settings.batch_size  # final rows recorded


@pytest.mark.parametrize("views", [1, 3])
def test_resume_after_an_interruption_gives_the_uninterrupted_file(tmp_path, monkeypatch, views):
    dataset = tiny_dataset(train=views > 1)  # views > 1: random flips, seeded per (seed, view, item)
    whole = cached_features(small_network(), "hash_layer", dataset, "tiny", settings(tmp_path / "whole", views=views))
    interrupted_build(monkeypatch, tmp_path / "resumed", dataset, settings(tmp_path / "resumed", views=views),
                      batches=7 if views > 1 else 2)  # 7 batches of 5: into the second view
    resumed = cached_features(small_network(), "hash_layer", dataset, "tiny", settings(tmp_path / "resumed",
                                                                                      views=views))
    assert resumed.path.name == whole.path.name
    assert resumed.path.read_bytes() == whole.path.read_bytes()
    assert resumed.path.with_suffix(".json").read_text() == whole.path.with_suffix(".json").read_text()


def test_views_are_seeded_augmentations_drawn_per_epoch(tmp_path):
    dataset = tiny_dataset(train=True, items=32)
    split = cached_features(small_network(), "hash_layer", dataset, "tiny", settings(tmp_path, views=4, seed=3))
    assert split.features.shape == (4, 32, 128) and split.views == 4
    unflipped = brute_force_features(small_network(), tiny_dataset(items=32))
    flipped = brute_force_features(small_network(), ArrayImageDataset(
        dataset.images.flip(-1), dataset.labels, BatchTransform(Preprocessing(16), train=False)))
    for view in range(4):  # every row is the image or its mirror image, and both occur
        is_flip = np.isclose(split.features[view], flipped, rtol=1e-4, atol=1e-5).all(axis=1)
        is_plain = np.isclose(split.features[view], unflipped, rtol=1e-4, atol=1e-5).all(axis=1)
        assert (is_flip | is_plain).all() and is_flip.any() and is_plain.any()
    assert not np.array_equal(split.features[0], split.features[1])
    other_seed = cached_features(small_network(), "hash_layer", dataset, "tiny", settings(tmp_path, views=4, seed=4))
    assert not np.array_equal(other_seed.features, split.features)

    class Epoch:
        epoch = 1
    items = FeatureDataset(split, seed=3)
    items.sampler = Epoch()
    first = torch.stack([item[0] for item in items.__getitems__(list(range(32)))])
    chosen = np.random.default_rng([3, 1]).integers(4, size=32)
    np.testing.assert_array_equal(first.numpy(), split.features[chosen, np.arange(32)])
    Epoch.epoch = 2
    second = torch.stack([item[0] for item in items.__getitems__(list(range(32)))])
    assert not torch.equal(first, second)


def checkpoint_state(folder):
    state = torch.load(next(Path(folder).glob("*.ckpt")), weights_only=True)
    return state.get("state_dict", state)


def test_a_head_selected_on_validation_from_the_cache_equals_one_with_the_frozen_trunk(tmp_path):
    common = ["--epochs", "2", "--freeze_backbone", "--no_progress", "--data_root", str(tmp_path / "data"),
              "--select", "val", "--val_size", "50"]
    in_loop = run_small_digits(common + ["--output_dir", str(tmp_path / "loop")])
    cached = run_small_digits(common + ["--output_dir", str(tmp_path / "cached"),
                                        "--feature_cache", str(tmp_path / "features")])
    loop_state, cached_state = checkpoint_state(tmp_path / "loop"), checkpoint_state(tmp_path / "cached")
    for name in loop_state:
        torch.testing.assert_close(cached_state[name], loop_state[name], rtol=1e-5, atol=1e-6, msg=name)
    assert cached["map"] == pytest.approx(in_loop["map"], abs=1e-6)
    assert cached["selection"] == in_loop["selection"]
    names = sorted(path.name.split("-")[0] for path in (tmp_path / "features").glob("*.npy"))
    # the validation database is the remaining training split read without augmentation: one file for both
    assert names == ["digits_small_database", "digits_small_query", "digits_small_train",
                     "digits_small_validation_query"]


def test_a_head_trained_from_the_cache_equals_one_trained_with_the_frozen_trunk(tmp_path):
    common = ["--epochs", "2", "--freeze_backbone", "--no_progress", "--data_root", str(tmp_path / "data")]
    in_loop = run_small_digits(common + ["--output_dir", str(tmp_path / "loop")])
    cached = run_small_digits(common + ["--output_dir", str(tmp_path / "cached"),
                                        "--feature_cache", str(tmp_path / "features")])
    loop_state, cached_state = checkpoint_state(tmp_path / "loop"), checkpoint_state(tmp_path / "cached")
    assert loop_state.keys() == cached_state.keys()
    for name in loop_state:
        torch.testing.assert_close(cached_state[name], loop_state[name], rtol=1e-5, atol=1e-6, msg=name)
    assert cached["map"] == pytest.approx(in_loop["map"], abs=1e-6)
    tested = run_small_digits(["--test", "--no_progress", "--data_root", str(tmp_path / "data"), "--output_dir",
                               str(tmp_path / "cached"), "--feature_cache", str(tmp_path / "features")])
    assert tested["map"] == pytest.approx(in_loop["map"], abs=1e-6)
    cached_files = sorted((tmp_path / "features").glob("*.npy"))
    model = load_checkpoint(next((tmp_path / "cached").glob("*.ckpt")))
    queries = model.splits(data_root=tmp_path / "data").query
    np.testing.assert_array_equal(model.encode(queries, feature_cache=tmp_path / "features"), model.encode(queries))
    assert sorted((tmp_path / "features").glob("*.npy")) == cached_files  # the run's query features, reused


@pytest.mark.parametrize("flags, message", [
    (["--feature_cache", "FC"], "add --freeze_backbone"),
    (["--feature_views", "2"], "add --feature_cache"),
    (["--feature_cache", "FC", "--query", "digits:0"], "--query"),
])
def test_flags_that_cannot_work_are_refused(tmp_path, capsys, flags, message):
    flags = [str(tmp_path / "fc") if flag == "FC" else flag for flag in flags]
    code, err = small_digits_failure(flags + ["--output_dir", str(tmp_path)], capsys)
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1, err


def test_frozen_experts_train_every_head():
    """--experts with --freeze_backbone: the trunk in evaluation mode, the heads training, one code per head."""
    network = build_network("small", 8, experts=3)
    network.eval()
    network.heads.train()
    images = torch.randn(4, 3, 32, 32)
    outputs = network(images)
    assert outputs.shape == (4, 3, 8)
    with torch.no_grad():
        features = network.trunk(images)
    torch.testing.assert_close(outputs[:, 2], network.heads[2](features))
    network.heads.eval()
    assert network(images).shape == (4, 8)


def test_the_benchmark_measures_both_epochs_and_the_sizes(tmp_path):
    from benchmarks import bench_feature_cache
    options = bench_feature_cache.get_args_parser().parse_args(
        ["--backbones", "small", "--images", "16", "--batch_size", "8", "--repeats", "1", "--output_dir",
         str(tmp_path)])
    [row] = bench_feature_cache.main(options)
    assert row["trunk_seconds"] > 0 and row["cache_seconds"] > 0 and row["features"] == 128
    header = 128  # the .npy header of a small array, padded to a multiple of 64 bytes
    assert row["bytes_float32"] == pytest.approx(128 * 4 + header / 16)
    assert row["bytes_float16"] == pytest.approx(128 * 2 + header / 16)
    assert "| small | 32 | 128 |" in (tmp_path / "bench_feature_cache.md").read_text()


def test_a_closure_transform_is_described_by_what_it_closes_over():
    from data.fashion import as_rgb_transform
    from hashing.feature_cache import describe_transform
    small, large = (describe_transform(as_rgb_transform(Preprocessing(size), False)) for size in (32, 64))
    assert "size=32" in small and "size=64" in large and " at 0x" not in small
    assert describe_transform(as_rgb_transform(Preprocessing(32), True)) != small  # the flip is part of it


def test_a_symbolic_link_in_place_of_the_cache_is_refused(built, tmp_path):
    npy = built[2]
    target = tmp_path / "elsewhere.npy"
    npy.rename(target)
    npy.symlink_to(target)
    refused(built, tmp_path, "symbolic link")


def test_a_fifo_in_place_of_the_cache_is_refused(built, tmp_path):
    npy = built[2]
    npy.unlink()
    os.mkfifo(npy)
    refused(built, tmp_path, "FIFO")


@pytest.mark.parametrize("mode", ["r", "r+"])
def test_the_cache_reader_maps_the_file_it_checked(tmp_path, monkeypatch, mode):
    """A file put in place of the checked one between the check and the mapping is never the one mapped."""
    path, other = tmp_path / "checked.npy", tmp_path / "other.npy"
    np.save(path, np.full((3, 4), 1.0, dtype=np.float32))
    np.save(other, np.full((3, 4), 2.0, dtype=np.float32))
    read_header = paths._npy_header

    def replaced_after_the_check(handle, what):
        fields = read_header(handle, what)
        other.replace(path)
        return fields

    monkeypatch.setattr(paths, "_npy_header", replaced_after_the_check)
    mapped = paths.open_npy_memmap(path, "feature cache", "float32", (3, 4), mode)
    assert (np.asarray(mapped) == 1.0).all()
