"""Every backbone measured: parameters, GFLOPs of one image's forward pass at its input size
(torch.utils.flop_counter on the meta device), CPU forward+backward milliseconds per image at batch 8, the
peak memory of that, and the per-run time estimate of `benchmarks.reproduce --dry_run` on VOC2007.

    python -m benchmarks.bench_backbones                         # every named backbone, markdown table
    python -m benchmarks.bench_backbones --backbones resnet18 dinov2_vits14 --repeats 3

Each backbone is timed in a process of its own (random weights, no download), so its peak resident memory
is its own; timings are medians over --repeats after one warm-up step, with torch's default thread count
(stated in the table). The machine is shared and noisy: compare backbones within one run of this script.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import reproduce  # noqa: E402
from loss import HyP2Loss  # noqa: E402
from network import backbone_names, build_network, get_backbone  # noqa: E402
from utils.argtypes import positive_int  # noqa: E402
from utils.atomic import write_text  # noqa: E402
from utils.errors import run_reporting_errors  # noqa: E402
from utils.runlog import progress_bar  # noqa: E402
from utils.timing import peak_memory_bytes  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=[n for n in backbone_names() if n != "small"],
                        help="backbone names (timm:MODEL too)")
    parser.add_argument("--batch_size", type=positive_int, default=8, help="images per timed step")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed steps per backbone (after a warm-up)")
    parser.add_argument("--output_dir", default="./result", help="folder of bench_backbones.md")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # measure one backbone, print JSON
    return parser


def measure(name, batch_size, repeats):
    """The figures of one backbone, in this process."""
    spec = get_backbone(name)
    torch.manual_seed(0)
    network = build_network(spec, 48).train()
    criterion = HyP2Loss(20, 48)
    images = torch.randn(batch_size, 3, spec.input_size, spec.input_size)
    labels = (torch.rand(batch_size, 20) < 0.15).float()
    seconds = []
    for step in range(repeats + 1):
        started = time.perf_counter()
        criterion(network(images), labels).backward()
        network.zero_grad(set_to_none=True)
        if step:  # the first step warms up the allocator and kernels
            seconds.append(time.perf_counter() - started)
    compute, decoding = reproduce.estimate_seconds("voc2007", backbone=name)
    pre = spec.preprocessing
    return {"backbone": name, "source": spec.source, "input_size": pre.size, "mean": pre.mean, "std": pre.std,
            "interpolation": pre.interpolation, "recipe": spec.recipe or "", "weights": weights_source(spec),
            "parameters": sum(p.numel() for p in network.parameters()), "gflops": reproduce.forward_flops(name) / 1e9,
            "ms_per_image": 1000 * statistics.median(seconds) / batch_size,
            "peak_memory_bytes": peak_memory_bytes(torch.device("cpu")),
            "voc2007_run_compute_minutes": compute / 60, "voc2007_run_decoding_minutes": decoding / 60,
            "threads": torch.get_num_threads()}


def weights_source(spec):
    if spec.hub_id:
        return f"Hugging Face hub `{spec.hub_id}`"
    if spec.imagenet_weights is not None:
        return f"torchvision `{spec.imagenet_weights}`"
    return "none (random)"


def measure_in_subprocess(name, options):
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_backbones", "--one", name, "--batch_size",
                             str(options.batch_size), "--repeats", str(options.repeats)],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if result.returncode:
        return {"backbone": name, "error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def render(rows, options):
    threads = next((row["threads"] for row in rows if "threads" in row), "?")
    lines = [f"# Backbones: size, cost, speed ({threads} CPU threads, batch {options.batch_size}, median of "
             f"{options.repeats})", "",
             "| backbone | weights | input | mean / std | recipe | params (M) | GFLOPs | CPU fwd+bwd ms/image | "
             "peak memory (GiB) | VOC2007 run: compute / decoding (min, estimate) |", "|" + "---|" * 10]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['backbone']} | error: {row['error']} |" + " |" * 8)
            continue
        normalisation = "ImageNet" if tuple(row["mean"]) == (0.485, 0.456, 0.406) else \
            f"{tuple(round(v, 3) for v in row['mean'])} / {tuple(round(v, 3) for v in row['std'])}"
        memory = row["peak_memory_bytes"] / 2 ** 30 if row["peak_memory_bytes"] else float("nan")
        lines.append(f"| {row['backbone']} | {row['weights']} | {row['input_size']} ({row['interpolation']}) | "
                     f"{normalisation} | {row['recipe'] or '—'} | {row['parameters'] / 1e6:.1f} | {row['gflops']:.2f} "
                     f"| {row['ms_per_image']:.0f} | {memory:.2f} | {row['voc2007_run_compute_minutes']:.0f} / "
                     f"{row['voc2007_run_decoding_minutes']:.0f} |")
    return "\n".join(lines) + "\n"


def main(options):
    if options.one:
        print(json.dumps(measure(options.one, options.batch_size, options.repeats)))
        return None
    rows = []
    for name in progress_bar(options.backbones, desc="backbones", unit="backbone"):
        rows.append(measure_in_subprocess(name, options))
    table = render(rows, options)
    path = Path(options.output_dir) / "bench_backbones.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, table)
    print(table)
    failed = [row["backbone"] for row in rows if "error" in row]
    print(f"{len(rows) - len(failed)} of {len(rows)} backbones measured; table in {path}"
          + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return rows


def cli(argv=None):
    options = get_args_parser().parse_args(argv)
    run_reporting_errors(lambda: main(options))


if __name__ == "__main__":
    cli()
