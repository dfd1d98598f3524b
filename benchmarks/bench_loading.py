"""Time and memory of one training epoch's data loading on a VOC-like folder: lazy decoding in the
DataLoader workers, the --cache memory-mapped file, and the paper's way (decode every image into a list
of PIL images first, then transform per item).

    python benchmarks/bench_loading.py --make /tmp/voc_like --images 2000   # VOCdevkit tree of 500x375 JPEGs
    python benchmarks/bench_loading.py --root /tmp/voc_like                 # every variant, one process each

Each variant runs in a fresh process (so peak memory is its own) and iterates the voc2007 training set
once (batch 100, shuffled, --workers processes, images resized to --size and normalised as in
training). Memory is the peak over the run of the summed proportional set size (PSS) of the process and
its DataLoader workers, sampled every 50 ms from /proc (Linux), so pages shared by forked workers count
once. The file-backed part (mapped libraries and, with the cache, the resident pages of the cache
file) is shown apart: the kernel can drop those pages at any time.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

VARIANTS = ["lazy", "cache_build", "cached", "paper"]


def make_folder(root, count, seed=0):
    """A VOCdevkit/VOC2007 tree: `count` trainval JPEGs of 500x375 with 1-3 objects, and 100 test images."""
    from data.voc import CLASSES
    from fixture_files import write_voc_tree
    rng = np.random.default_rng(seed)

    def images(prefix, n):
        return {f"{prefix}{i:06d}": [(CLASSES[c], 0) for c in rng.choice(20, rng.integers(1, 4), replace=False)]
                for i in range(n)}
    write_voc_tree(root, 2007, {"trainval": images("1", count), "test": images("9", 100)}, width=500, height=375,
                   seed=seed)
    jpegs = list((Path(root) / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg"))
    print(f"wrote {len(jpegs)} JPEGs of 500x375 ({sum(p.stat().st_size for p in jpegs) / 1e6:.0f} MB) under {root}")


def tree_pss_kb(pid):
    """Summed PSS (kB) of `pid` and all its descendants: (all of it, the file-backed part)."""
    total, file_backed, pending = 0, 0, [pid]
    while pending:
        current = pending.pop()
        try:
            for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                elif line.startswith("Pss_File:"):
                    file_backed += int(line.split()[1])
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total, file_backed


class PeakMemory:
    """Peak summed PSS of this process and its children, and the file-backed part at that moment."""

    def __init__(self):
        self.peak_kb = self.file_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            total, file_backed = tree_pss_kb(os.getpid())
            if total > self.peak_kb:
                self.peak_kb, self.file_kb = total, file_backed
            self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class DecodedList:
    """The paper's dataset: every image opened and converted to RGB up front, transformed per item."""

    def __init__(self, paths, labels, transform):
        self.images = [_open_rgb(path) for path in paths]
        self.labels = labels
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(self.images[index]), self.labels[index]


def _open_rgb(path):
    from PIL import Image
    return Image.open(path).convert("RGB")


def run_variant(variant, root, size, workers):
    import torch
    from torch.utils.data import DataLoader

    from data import DataOptions, get_dataset_spec
    from data.transforms import image_transform

    spec = get_dataset_spec("voc2007")
    timings = {}
    with PeakMemory() as memory:
        started = time.perf_counter()
        if variant == "paper":
            lazy = spec.build(root, 0, size)
            train = DecodedList(lazy.train.paths, lazy.train.labels, image_transform(size, train=True))
        else:
            if variant == "cache_build":
                for old in (Path(root) / "VOCdevkit" / "VOC2007" / "cache").glob("*.npy"):
                    old.unlink()
            train = spec.build(root, 0, size, DataOptions(cache=variant != "lazy")).train
        timings["prepare_s"] = time.perf_counter() - started
        loader = DataLoader(train, batch_size=100, shuffle=True, num_workers=workers,
                            generator=torch.Generator().manual_seed(0))
        started = time.perf_counter()
        seen = sum(len(images) for images, _ in loader)
        timings["epoch_s"] = time.perf_counter() - started
    return {"variant": variant, "images": seen, **timings, "peak_pss_mb": memory.peak_kb / 1024,
            "file_backed_mb": memory.file_kb / 1024,
            "main_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make", metavar="DIR", help="write a VOC-like folder and exit")
    parser.add_argument("--images", type=int, default=2000, help="trainval images to write with --make")
    parser.add_argument("--root", metavar="DIR", help="data root holding VOCdevkit/VOC2007")
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process (JSON line out)")
    parser.add_argument("--size", type=int, default=224, help="input size (224 AlexNet/ResNet, 448 GoogLeNet)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    args = parser.parse_args()
    if args.make:
        make_folder(args.make, args.images)
        return
    if not args.root:
        parser.error("pass --root DIR (make one with --make DIR)")
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.root, args.size, args.workers)))
        return

    print(f"voc2007 trainval under {args.root}, {args.size}x{args.size}, batch 100, {args.workers} workers, "
          f"{os.cpu_count()} CPUs")
    print(f"{'variant':<12} {'prepare':>9} {'epoch':>8} {'peak PSS':>10} {'file-backed':>12} {'main maxRSS':>12}")
    for variant in VARIANTS:
        output = subprocess.run([sys.executable, __file__, "--root", args.root, "--variant", variant,
                                 "--size", str(args.size), "--workers", str(args.workers)],
                                capture_output=True, text=True, check=True).stdout
        row = json.loads(output.strip().splitlines()[-1])
        print(f"{variant:<12} {row['prepare_s']:>8.1f}s {row['epoch_s']:>7.1f}s {row['peak_pss_mb']:>7.0f} MB "
              f"{row['file_backed_mb']:>9.0f} MB {row['main_maxrss_mb']:>9.0f} MB", flush=True)


if __name__ == "__main__":
    main()
