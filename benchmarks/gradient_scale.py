"""How large each loss's gradient on the codes is at initialisation, on one batch of digits (docs/STUDIES.md,
"Losses compared on digits under one recipe": why a shared SGD learning rate suits some losses and not others).

    python -m benchmarks.gradient_scale --hash_bit 24

For the small network at its seeded initialisation (training mode) and the first --batch_size training
mosaics, prints per loss the summed norm of the per-sample gradients dL/dx_i, its ratio to HyP²'s, and
the effective number of samples that gradient trains, (Σ‖g_i‖)² / Σ‖g_i‖² (= the batch size when every
sample gets the same share).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import get_dataset_spec  # noqa: E402
from hashing import codetable  # noqa: E402
from loss import LOSSES, build_loss  # noqa: E402
from network import build_network  # noqa: E402


def gradient_norms(loss_name, codes, labels, hash_bit, seed):
    """Per-sample ‖dL/dx_i‖ of one loss at the given codes."""
    criterion = build_loss(loss_name, labels.shape[1], hash_bit, seed=seed,
                           **({"zeta": codetable.zeta(hash_bit, labels.shape[1])} if LOSSES[loss_name].uses_zeta
                              else {}))
    codes = codes.detach().clone().requires_grad_(True)
    criterion(codes, labels).backward()
    return codes.grad.norm(dim=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hash_bit", type=int, default=24)
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    torch.manual_seed(options.seed)
    train = get_dataset_spec("digits").build(None, options.seed, 32).train
    images, labels = map(torch.stack, zip(*(train[i] for i in range(options.batch_size))))
    codes = build_network("small", options.hash_bit).train()(images)
    norms = {name: gradient_norms(name, codes, labels, options.hash_bit, options.seed) for name in LOSSES}
    reference = norms["hyp2"].sum()
    print(f"{'loss':<13} {'sum |dL/dx_i|':>14} {'x hyp2':>7} {'effective samples':>18}")
    for name, norm in norms.items():
        effective = (norm.sum() ** 2 / norm.pow(2).sum().clamp(min=1e-30)).item()
        print(f"{name:<13} {norm.sum().item():>14.3f} {(norm.sum() / reference).item():>7.1f} "
              f"{effective:>12.1f}/{options.batch_size}")
    return norms


if __name__ == "__main__":
    main()
