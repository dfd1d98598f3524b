"""`python -m hashing.encode`: encode an image collection with a trained checkpoint into a .npy file of packed codes,
resumably (hashing/search/stream.py). Under `torchrun --nproc_per_node N` the N processes share the batches and
write into the same file, which is byte for byte the file one process writes.

    python -m hashing.encode --checkpoint result/digits_small_48.ckpt --images photos/ --output photos.npy
    torchrun --standalone --nproc_per_node 4 -m hashing.encode --checkpoint ... --images photos/ --output photos.npy
"""
import argparse
from pathlib import Path

import torch

from utils.argtypes import non_negative_int, positive_int
from utils.device import select_device
from utils.dist import init_distributed, shutdown
from utils.errors import run_reporting_errors
from utils.paths import GiB, read_text_file
from utils.runlog import setup_for_distributed

from hashing.search.api import load_checkpoint
from hashing.search.stream import encode_to_file

MAX_LIST_BYTES = 4 * GiB


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the trained checkpoint (its run's files next to it)")
    parser.add_argument("--images", required=True,
                        help="a folder of images (searched recursively; rows in sorted path order) or a text file "
                             "of image paths, one a line (rows in its order)")
    parser.add_argument("--output", required=True,
                        help="the .npy code file to write; OUTPUT.partial, .progress.json and .lock go next to it")
    parser.add_argument("--backbone", default=None, help="the backbone, where the checkpoint does not say")
    parser.add_argument("--hash_bit", type=positive_int, default=None,
                        help="the bits, where the checkpoint does not say")
    parser.add_argument("--batch_size", type=positive_int, default=64,
                        help="images per batch (resume with the same value to get the file of one uninterrupted run)")
    parser.add_argument("--workers", type=non_negative_int, default=None,
                        help="image-decoding processes of each encoding process (default: a few; 0: none)")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu, cuda or cuda:N (under torchrun each process takes the GPU of its local rank)")
    return parser


def listed_images(images):
    """The folder `images`, or the image paths its text file lists (one a line, blank lines skipped)."""
    if Path(images).is_dir():
        return images
    text = read_text_file(images, "--images list", MAX_LIST_BYTES, missing="pass a folder or a text file of paths")
    return [line.strip() for line in text.splitlines() if line.strip()]


def main(args):
    device = select_device(args.device)
    context = init_distributed(device.type)
    if context.enabled and device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
    setup_for_distributed(context.is_main)
    try:
        model = load_checkpoint(args.checkpoint, backbone=args.backbone, hash_bit=args.hash_bit, device=device)
        return encode_to_file(model.network, listed_images(args.images), model.transform, args.output,
                              batch_size=args.batch_size, device=device, workers=args.workers, context=context,
                              inputs=[("--checkpoint", args.checkpoint), ("--images", args.images)])
    finally:
        shutdown(context)


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    run_reporting_errors(lambda: main(args), interrupted_hint=": run the same command again to resume")


if __name__ == "__main__":
    cli()
