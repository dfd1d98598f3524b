"""One training epoch of a frozen trunk's hash head from the feature cache vs. with the trunk in the loop
(--freeze_backbone with and without --feature_cache; docs/METHOD.md §11), and the cache's size per image.

    python -m benchmarks.bench_feature_cache                          # resnet18 and vit_b_16, 256 images
    python -m benchmarks.bench_feature_cache --images 32 --repeats 1  # a smoke run

Each backbone has random weights (no download) and reads digits mosaics resized to its own input size. The
features are cached once (float32 and float16; the float32 build is timed), then the two epochs are timed
interleaved, --repeats times each, in this process (engine.train_one_epoch with the trunk frozen, the same
batches and loss); the table gives their medians and the ratio. The machine is shared and noisy: compare within
one run of this script.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.base import WithIndices  # noqa: E402
from data.registry import build_splits  # noqa: E402
from engine import HashingObjective, Trainer, train_one_epoch  # noqa: E402
from loss import HyP2Loss  # noqa: E402
from network import build_network, get_backbone, hash_head, trunk_and_head_parameters  # noqa: E402
from session.cached_training import FeatureDataset, fed_with_features  # noqa: E402
from hashing.feature_cache import CacheSettings, cached_features  # noqa: E402
from utils.argtypes import positive_int  # noqa: E402
from utils.atomic import write_text  # noqa: E402
from utils.errors import run_reporting_errors  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "vit_b_16"], help="backbone names")
    parser.add_argument("--images", type=positive_int, default=256, help="training images (digits mosaics)")
    parser.add_argument("--batch_size", type=positive_int, default=32, help="images per step")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed epochs of each kind, interleaved")
    parser.add_argument("--hash_bit", type=positive_int, default=48, help="code length")
    parser.add_argument("--output_dir", default="./result", help="folder of bench_feature_cache.md")
    return parser


def frozen_trainer(network, spec, num_classes):
    """A Trainer of the hash head alone (the trunk frozen, as session.parts does for --freeze_backbone)."""
    trunk, head = trunk_and_head_parameters(network, spec.hash_layer)
    for parameter in trunk:
        parameter.requires_grad_(False)
    objective = HashingObjective(network, HyP2Loss(num_classes, network_bits(network, spec)))
    optimizer = torch.optim.SGD([{"params": head, "lr": 0.01}, {"params": list(objective.criterion.parameters()),
                                                                  "lr": 0.01}], momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
    return Trainer(objective, objective, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False),
                   trainable_head=hash_head(network, spec.hash_layer))


def network_bits(network, spec):
    return hash_head(network, spec.hash_layer).out_features


def loader(dataset, batch_size):
    return DataLoader(WithIndices(dataset), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


def measure(name, options, folder):
    spec = get_backbone(name)
    train = build_splits("digits", folder, 0, spec.preprocessing).train
    images = Subset(train, range(min(options.images, len(train))))
    torch.manual_seed(0)
    network = build_network(spec, options.hash_bit)
    splits, build_seconds = {}, {}
    for dtype in ("float32", "float16"):
        started = time.perf_counter()
        splits[dtype] = cached_features(network, spec.hash_layer, images, f"bench_{name}",
                                        CacheSettings(Path(folder) / "features", dtype, batch_size=options.batch_size))
        build_seconds[dtype] = time.perf_counter() - started
    sizes = {dtype: split.path.stat().st_size / len(images) for dtype, split in splits.items()}
    split = splits["float32"]
    features = FeatureDataset(split)
    trainer = frozen_trainer(network, spec, features.labels.shape[1])
    device = torch.device("cpu")
    seconds = {"trunk": [], "cache": []}
    for repeat in range(1, options.repeats + 1):  # interleaved, so a load change hits both
        seconds["trunk"].append(train_one_epoch(trainer, loader(images, options.batch_size), device, repeat).seconds)
        with fed_with_features(network, spec.hash_layer):
            seconds["cache"].append(train_one_epoch(trainer, loader(features, options.batch_size), device,
                                                    repeat).seconds)
    trunk, cache = (statistics.median(seconds[kind]) for kind in ("trunk", "cache"))
    return {"backbone": name, "input_size": spec.input_size, "features": split.features.shape[-1],
            "build_seconds": build_seconds["float32"], "trunk_seconds": trunk, "cache_seconds": cache,
            "ratio": trunk / cache if cache > 0 else float("inf"),
            "bytes_float32": sizes["float32"], "bytes_float16": sizes["float16"]}


def render(rows, options):
    lines = [f"# One training epoch of a frozen trunk's hash head: {options.images} images, batch "
             f"{options.batch_size}, CPU ({torch.get_num_threads()} threads), median of {options.repeats}", "",
             "| backbone | input | features D | epoch, trunk in the loop (s) | epoch from the cache (s) | speed-up | "
             "building the cache, once (s) | cache per image, float32 / float16 (bytes) |", "|" + "---|" * 8]
    for row in rows:
        lines.append(f"| {row['backbone']} | {row['input_size']} | {row['features']} | {row['trunk_seconds']:.2f} | "
                     f"{row['cache_seconds']:.3f} | {row['ratio']:.0f}x | {row['build_seconds']:.1f} | "
                     f"{row['bytes_float32']:.0f} / {row['bytes_float16']:.0f} |")
    return "\n".join(lines) + "\n"


def main(options):
    with tempfile.TemporaryDirectory(prefix="bench_feature_cache.") as folder:
        rows = [measure(name, options, folder) for name in options.backbones]
    table, path = render(rows, options), Path(options.output_dir) / "bench_feature_cache.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, table)
    print(f"{table}\n{len(rows)} backbone(s) measured; table in {path}")
    return rows


if __name__ == "__main__":
    run_reporting_errors(lambda: main(get_args_parser().parse_args()))
