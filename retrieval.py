"""Train and evaluate deep hashing networks for multi-label image retrieval with the HyP2 loss.

    python retrieval.py --dataset digits --backbone small --hash_bit 48 --epochs 30    # train
    python retrieval.py --dataset digits --backbone small --hash_bit 48 --test         # re-evaluate
    python retrieval.py --dataset digits --backbone small --hash_bit 48 --query a.png  # search

This file is the command line: the flags, their checks, and main, which wires the parts that
session/ builds from them (session/parts.py: data, network, loss, optimiser; session/training.py: the
training session; session/checkpoint_tasks.py: --test, --query, --export_index; session/files.py: the
run's files and their guards).
The method and every definition: docs/METHOD.md.
"""
import argparse
import dataclasses

import torch

from data import DATASETS, coco
from engine import SELECTION_RULES
from hashing.codetable import check_zeta
from hashing.evaluation.conventions import NORMALIZE, TIES, ZERO_HIT
from hashing.feature_cache import DTYPES
from hashing.search.exact import MAX_K
from hashing.shallow import SHALLOW_HASHERS
from loss import LOSSES, PROXY_LOSSES, CollaborativeExpertsLoss, HierarchicalProxyLoss
from network import TIMM_SHORTCUTS, TORCHVISION_BACKBONES
from session.cached_training import run_with_feature_cache
from session.checkpoint_tasks import run_checkpoint_tasks
from session.files import check_paths, guarded_run_files
from session.parts import (DEFAULT_VAL_SIZE, OPTIMIZERS, backbone_of, make_network_on_every_rank, prepare_run,
                           resolve_backbone)
from session.run import Run
from session.training import report_truncated_images, train
from utils.argtypes import (DefaultsHelpFormatter, checked, finite_float, inference_head, non_negative_float, non_negative_int,
                            int_in_range, positive_int, seed_value)
from utils.checkpoint import NETWORK_BOUNDS, require_checkpoint_file
from utils.config import parse_args_with_config
from utils.device import select_device
from utils.dist import init_distributed, shutdown
from utils.errors import UserError, run_reporting_errors
from utils.reproducibility import seed_everything
from utils.runlog import setup_for_distributed


def get_args_parser(add_help=True):
    """The command line, in groups; add_help=False lets other tools (benchmarks/compare.py) reuse it."""
    parser = argparse.ArgumentParser(
        description="HyP2 loss deep hashing: train a hash network and evaluate mAP@K by Hamming ranking.",
        add_help=add_help, formatter_class=DefaultsHelpFormatter)
    for add_group in (add_recipe_arguments, add_data_arguments, add_model_arguments, add_loss_arguments,
                      add_optimisation_arguments, add_evaluation_arguments, add_output_arguments, add_device_arguments):
        add_group(parser)
    return parser


def add_recipe_arguments(parser):
    group = parser.add_argument_group("recipe")
    group.add_argument("--config", default=None, metavar="YAML",
                       help="read flag values from a recipe file (configs/; keys are flag names without --); a "
                            "flag on the command line wins, and the run log records the resolved values")


def add_data_arguments(parser):
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="voc2007", choices=list(DATASETS), help="dataset")
    group.add_argument("--data_root", default="./data", help="folder holding the datasets")
    group.add_argument("--subset", type=non_negative_int, default=0,
                       help="use only the first N images of each split (smoke tests); 0 = all")
    group.add_argument("--workers", type=int, default=-1,
                       help="DataLoader worker processes; -1 = 0 for in-memory datasets, else min(8, CPUs)")
    group.add_argument("--cache", action="store_true",
                       help="decode each image once, resized, into a uint8 memory-mapped file under the data root, "
                            "reused by later epochs and runs")
    group.add_argument("--cache_dir", default=None, metavar="DIR",
                       help="with --cache: keep the image cache in DIR instead of under the data root (a read-only "
                            "or shared data root; one DIR may serve several datasets)")
    group.add_argument("--imbalance", type=finite_float, default=1.0, metavar="RHO",
                       help="digits: long-tailed training set whose class frequencies decay exponentially from "
                            "the commonest to the rarest class, RHO times rarer; queries stay balanced; 1 = balanced")
    group.add_argument("--unseen_classes", nargs="+", default=None, metavar="F|CLASS",
                       help="hold classes out of training (docs/METHOD.md §13): a fraction F, 0 < F < 1, of the "
                            "classes drawn with --seed, or class names or indices (comma or space separated); mAP is "
                            "reported by seen-class, unseen-class and all-label relevance")
    group.add_argument("--skip_bad_images", action="store_true",
                       help="check every image once before training and leave out missing or undecodable ones "
                            "(default: stop at the first, naming the file)")
    group.add_argument("--strict_images", action="store_true",
                       help="a truncated image is an error (default: it loads padded, as in the paper's code)")
    group.add_argument("--split", choices=["paper", "random"], default="paper",
                       help="flickr: the paper's fixed split (shipped) or a permutation drawn from --seed")
    group.add_argument("--split_variant", choices=[*coco.VARIANTS, coco.OWN], default=None,
                       help="coco: which published lists fix the queries and training images: hashnet (thuml/HashNet, "
                            "also CSQ's) or deephash (DeepHash-pytorch, also VTS's and DHD's), both shipped, the "
                            "database rebuilt from COCO's annotations; own: coco/train.txt, test.txt, database.txt "
                            f"(default: own when coco/ holds those three, else {coco.DEFAULT_VARIANT})")
    group.add_argument("--allow_query_in_database", action="store_true",
                       help="keep a database that holds query images (each finds itself at rank 1), to reproduce "
                            "a published table made so; refused by default")


def add_model_arguments(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--backbone", default=None, metavar="NAME",
                       help="the backbone: the paper's alexnet, googlenet (inception_v3) or resnet (ResNet-50), small "
                            "(digits), a torchvision model (" + ", ".join(TORCHVISION_BACKBONES) + "), a named timm "
                            "model (" + ", ".join(TIMM_SHORTCUTS) + ") or timm:MODEL for any timm model (default: "
                            "googlenet, or with --test/--query/--export_index the one the --checkpoint records)")
    group.add_argument("--input_size", type=int_in_range(1, NETWORK_BOUNDS["input_size"]), default=None, metavar="PIXELS",
                       help="side of the square input images (default: the backbone's own); vision transformers "
                            "interpolate their position embeddings to it")
    group.add_argument("--hash_bit", type=int_in_range(1, NETWORK_BOUNDS["hash_bit"]), default=48,
                       help="number of hash bits n")
    weights = group.add_mutually_exclusive_group()
    weights.add_argument("--weights", default=None, metavar="PATH",
                         help="the backbone's pretrained weights: a .safetensors file or a state dict; default: "
                              "torchvision's file from the torch hub cache, or timm's from the Hugging Face hub "
                              "cache, downloaded if missing")
    weights.add_argument("--no_pretrained", action="store_true", help="train the backbone from scratch")
    group.add_argument("--freeze_backbone", action="store_true",
                       help="train only the hash layer (or heads) and the loss's parameters; the trunk stays as "
                            "loaded, its BatchNorm statistics included")
    group.add_argument("--trunk_from", default=None, metavar="CKPT",
                       help="start the trunk from this checkpoint of a trained run (its hash layer is left out), "
                            "e.g. to freeze a backbone trained end-to-end: --freeze_backbone --trunk_from R.ckpt")
    group.add_argument("--hasher", default=None, choices=list(SHALLOW_HASHERS),
                       help="no training: fit this shallow hasher (docs/METHOD.md §12) on the frozen trunk's pooled "
                            "features of the training split and evaluate it like a trained run; needs "
                            "--freeze_backbone")
    group.add_argument("--feature_cache", default=None, metavar="DIR",
                       help="with --freeze_backbone (or --test): compute each split's pooled trunk features once "
                            "into DIR (memory-mapped, resumable, keyed by the trunk's weights, the preprocessing and "
                            "the split) and train the hash head on them (docs/METHOD.md §11)")
    group.add_argument("--feature_dtype", choices=DTYPES, default="float32",
                       help="with --feature_cache: how the features are stored (float16 halves the files)")
    group.add_argument("--feature_views", type=int_in_range(1, 64), default=1, metavar="V",
                       help="with --feature_cache: V augmented views of each training image (the training "
                            "transform, seeded), one drawn per image and epoch; 1 = the evaluation transform only")
    group.add_argument("--experts", type=int_in_range(1, NETWORK_BOUNDS["experts"]), default=1, metavar="E",
                       help="E >= 2 hash heads on the shared trunk, trained collaboratively (ECL); 1 = one head")
    group.add_argument("--inference_head", type=inference_head, default=0, metavar="HEAD",
                       help="with --experts: the head whose outputs give the codes, or 'mean' of the heads' "
                            "outputs before the sign")
    group.add_argument("--nested_bits", type=int_in_range(1, NETWORK_BOUNDS["hash_bit"]), nargs="+", default=None,
                       metavar="B", help="nested codes: train the first B bits as a B-bit code for each B listed "
                                         "(ascending, the last = --hash_bit; the loss of every prefix, summed) and "
                                         "evaluate every length (docs/METHOD.md §14)")
    group.add_argument("--nested_weights", type=non_negative_float, nargs="+", default=None, metavar="W",
                       help="with --nested_bits: the weight of each prefix's loss (default 1 each, as Matryoshka)")


def add_hyperparameter_flags(group, owner, loss_class):
    for hyperparameter in loss_class.HYPERPARAMETERS:
        kind = finite_float if isinstance(hyperparameter.default, float) else int
        group.add_argument(f"--{hyperparameter.dest(owner)}", type=kind, default=hyperparameter.default,
                           help=f"{owner}: {hyperparameter.help}")


def add_loss_arguments(parser):
    """--loss and one flag per hyper-parameter of every loss (published defaults), ζ, and the hierarchy."""
    group = parser.add_argument_group("loss (each loss's flags are used only by that loss)")
    group.add_argument("--loss", default="hyp2", choices=list(LOSSES), help="training loss")
    group.add_argument("--zeta", type=checked(check_zeta), default=None,
                       help="override the threshold zeta of the code table")
    group.add_argument("--codetable", default=None, metavar="XLSX",
                       help="read zeta from the paper's codetable.xlsx (cross-check with the built-in table)")
    for name, loss_class in LOSSES.items():
        add_hyperparameter_flags(group, name, loss_class)
    group = parser.add_argument_group("hierarchical proxies (HPL) on top of " + ", ".join(PROXY_LOSSES))
    group.add_argument("--hierarchy", type=non_negative_int, default=0, metavar="K",
                       help="number of coarse clusters of the class proxies; 0 = no hierarchy")
    group.add_argument("--hierarchy_file", default=None, metavar="CSV",
                       help="a given class hierarchy (class,level1[,level2...]), or a shipped one: voc, coco, digits")
    add_hyperparameter_flags(group, "hierarchy", HierarchicalProxyLoss)
    group = parser.add_argument_group("collaborative experts (ECL) with --experts E >= 2; weights 0 = off")
    add_hyperparameter_flags(group, "ecl", CollaborativeExpertsLoss)


def add_optimisation_arguments(parser):
    group = parser.add_argument_group("optimisation")
    group.add_argument("--batch_size", type=positive_int, default=100, help="mini-batch size")
    group.add_argument("--epochs", type=positive_int, default=100, help="training epochs")
    group.add_argument("--lr", type=non_negative_float, default=0,
                       help="network learning rate (the hash layer's, with --backbone_lr_mult); 0 = the backbone's "
                            "default")
    group.add_argument("--rate", type=non_negative_float, default=0.02, help="learning rate of the proxies")
    group.add_argument("--optimizer", default="sgd", choices=list(OPTIMIZERS),
                       help="optimiser of the network and the proxies: the paper's SGD, RMSprop / Adam (torch's "
                            "defaults besides --lr and --weight_decay) as other losses' papers use, or AdamW as "
                            "transformer recipes use")
    group.add_argument("--momentum", type=non_negative_float, default=0.9,
                       help="SGD momentum (the paper's 0.9; --optimizer sgd only)")
    group.add_argument("--weight_decay", type=non_negative_float, default=5e-4,
                       help="weight decay of every optimiser (the paper's 5e-4)")
    group.add_argument("--backbone_lr_mult", type=non_negative_float, default=1.0, metavar="M",
                       help="the trunk's learning rate as a fraction of --lr (the hash layer's); 1 = one network "
                            "group, as the paper")
    group.add_argument("--scheduler", default="step", choices=["step", "cosine"],
                       help="learning-rate schedule, stepped per epoch: the paper's StepLR (--lr_step, --lr_gamma) "
                            "or cosine decay to 0 at the last epoch")
    group.add_argument("--warmup_epochs", type=non_negative_int, default=0,
                       help="epochs of linear learning-rate warm-up before the schedule")
    group.add_argument("--lr_step", type=positive_int, default=10,
                       help="multiply the learning rates by --lr_gamma every N epochs (the paper's 10)")
    group.add_argument("--lr_gamma", type=non_negative_float, default=0.5,
                       help="learning-rate decay factor of each --lr_step (the paper's 0.5)")
    group.add_argument("--clip_grad", type=non_negative_float, default=0.0, metavar="NORM",
                       help="clip the gradients' global norm to NORM; 0 = no clipping (the paper's)")
    group.add_argument("--seed", type=seed_value, default=0,
                       help="random seed (data split, init, batches), 0 to 2**32-1")
    group.add_argument("--amp", nargs="?", const="auto", choices=["auto", "bf16", "fp16"], default=None,
                       help="mixed precision on CUDA (bf16 if supported, else fp16 with loss scaling); "
                            "ignored on the CPU")
    group.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                       help="continue an interrupted run from its training state (default "
                            "OUTPUT_DIR/{run}.last.pt, written after every epoch)")


def add_evaluation_arguments(parser):
    group = parser.add_argument_group("evaluation")
    group.add_argument("--retrieve", "--topk", dest="retrieve", type=non_negative_int, default=0,
                       help="K of mAP@K; 0 = the dataset's default (--topk is the same flag, DeepHash-pytorch's name)")
    group.add_argument("--map_normalize", choices=NORMALIZE, default="hits",
                       help="what AP@K divides by: the hits in the top K (the paper's), min(R, K) or R, all relevant "
                            "items (docs/METHOD.md §3.5)")
    group.add_argument("--zero_hit", choices=ZERO_HIT, default="zero",
                       help="a query whose AP denominator is 0 scores 0 (the paper's) or is left out of the mean")
    group.add_argument("--ties", choices=TIES, default="index",
                       help="order of items at equal Hamming distance: database index (the paper's), aware = exact "
                            "expectation over all orders, random = one shuffle seeded by --seed")
    group.add_argument("--eval_every", type=positive_int, default=5, help="evaluate every N epochs (and at the end)")
    group.add_argument("--select", default="test", choices=SELECTION_RULES,
                       help="which evaluated epoch's checkpoint is kept: test = best mAP on the test queries (the "
                            "paper's rule), val = best mAP on a validation split held out from the training set, "
                            "then evaluated once on the test queries, last = the last epoch")
    group.add_argument("--val_size", type=positive_int, default=None,
                       help=f"--select val: training items held out (seeded) as validation queries "
                            f"(default {DEFAULT_VAL_SIZE})")
    group.add_argument("--test", action="store_true", help="evaluate the saved checkpoint instead of training")
    group.add_argument("--top_n", type=positive_int, nargs="+", default=None, metavar="N",
                       help="N of precision@top-N (default: 100, 200, ..., 1000, or ten steps up to a smaller database)")
    group.add_argument("--plots", action="store_true",
                       help="draw the figures (top-N, PR, convergence, t-SNE) as OUTPUT_DIR/{run}.*.png")
    group.add_argument("--plot_format", choices=["png", "pdf", "svg"], default="png",
                       help="file format of the --plots figures")
    group.add_argument("--query", nargs="+", default=None, metavar="IMAGE",
                       help="search the database with these images using the saved checkpoint; DATASET:N is the "
                            "N-th image of the query split (e.g. digits:0)")
    group.add_argument("--prefix_bits", type=int_in_range(1, NETWORK_BOUNDS["hash_bit"]), default=None, metavar="B",
                       help="--test, --query, --export_index: use the first B bits of the checkpoint's codes (any "
                            "B up to its --hash_bit; default: the whole code, and --test also every --nested_bits "
                            "length)")
    group.add_argument("--num_matches", type=int_in_range(1, MAX_K), default=10,
                       help=f"matches printed per --query image (at most {MAX_K})")
    group.add_argument("--export_index", default=None, metavar="PATH",
                       help="write the database codes as a FAISS IndexBinaryFlat to PATH")


def add_output_arguments(parser):
    group = parser.add_argument_group("output")
    group.add_argument("--output_dir", default="./result", help="folder for checkpoints and logs")
    group.add_argument("--checkpoint", default=None,
                       help="checkpoint to write/test (default: OUTPUT_DIR/{dataset}_{backbone}_{hash_bit}[_{loss}].ckpt)")
    group.add_argument("--no_save", action="store_true", help="write no checkpoint or log")
    group.add_argument("--overwrite", action="store_true",
                       help="start a new training even though OUTPUT_DIR holds this run's checkpoint or training "
                            "state (replaced as the new run writes its own); without it such a run stops and "
                            "suggests --resume")
    group.add_argument("--no_progress", action="store_true",
                       help="no progress bars (they are off anyway when stderr is not a terminal)")


def add_device_arguments(parser):
    group = parser.add_argument_group("device and distributed (launch with torchrun for several processes)")
    group.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    group.add_argument("--cuda", type=non_negative_int, default=0, help="GPU id when running on CUDA")


def check_flags(args):
    """Combinations of flags that cannot work, refused before any work is done."""
    if args.plots and args.no_save:
        raise UserError("--plots writes figures and --no_save writes nothing: drop one of them")
    if args.val_size is not None and args.select != "val":
        raise UserError(f"--val_size is used by --select val only (this run has --select {args.select}): "
                        "drop it or add --select val")
    if args.cache_dir and not args.cache:
        raise UserError("--cache_dir says where --cache keeps the image cache: add --cache, or drop --cache_dir")
    if args.split != "paper" and args.dataset != "flickr":
        raise UserError(f"--split {args.split} applies to --dataset flickr only; --dataset {args.dataset} has one "
                        "protocol (see README, Datasets)")
    if args.split_variant and args.dataset != "coco":
        raise UserError(f"--split_variant applies to --dataset coco only; --dataset {args.dataset} has one list "
                        "family (see docs/DATASETS.md)")
    if args.hierarchy and args.hierarchy_file:
        raise UserError("--hierarchy K clusters the proxies and --hierarchy_file gives the groups: use one of them")
    check_feature_cache_flags(args)
    if args.inference_head != 0 and args.experts == 1:
        raise UserError(f"--inference_head {args.inference_head} needs --experts E >= 2 (one head has nothing to "
                        "choose from)")
    check_hasher_flags(args)
    if args.inference_head not in ("mean", 0) and args.inference_head >= args.experts:
        raise UserError(f"--inference_head {args.inference_head}: the heads are 0 to {args.experts - 1}, or mean")
    check_nested_flags(args)


def check_nested_flags(args):
    """--nested_bits, --nested_weights and --prefix_bits before the checkpoint is read (check_code_lengths after)."""
    nested = args.nested_bits
    if nested and nested != sorted(set(nested)):
        raise UserError(f"--nested_bits {' '.join(map(str, nested))}: the lengths must be distinct and ascending, "
                        "e.g. --nested_bits 16 32 64")
    if args.nested_weights and (not nested or len(args.nested_weights) != len(nested)):
        raise UserError(f"--nested_weights gives {len(args.nested_weights)} weights: it needs --nested_bits and one "
                        "weight per length")
    if nested and args.zeta is not None:
        raise UserError("--zeta sets one threshold, but with --nested_bits each prefix length takes its own from the "
                        "code table: drop --zeta")
    if nested and args.experts > 1:
        raise UserError("--nested_bits trains prefixes of one code; --experts E >= 2 trains E codes: use one of them")
    if args.prefix_bits and args.plots:
        raise UserError("--plots draws the figures of the run's whole code: drop --prefix_bits (or --plots)")
    if args.prefix_bits and not (args.test or args.query or args.export_index):
        raise UserError("--prefix_bits chooses the code length of a saved checkpoint: add --test, --query or "
                        "--export_index (training uses --nested_bits)")


def check_code_lengths(args):
    """With the network's --hash_bit known (the checkpoint's, for --test): the longest nested length is the code,
    and a prefix is at most the code."""
    if args.nested_bits and args.nested_bits[-1] != args.hash_bit:
        raise UserError(f"--nested_bits {' '.join(map(str, args.nested_bits))}: the last length must be the code's "
                        f"--hash_bit {args.hash_bit}")
    if args.prefix_bits and args.prefix_bits > args.hash_bit:
        raise UserError(f"--prefix_bits {args.prefix_bits}: the checkpoint's codes have {args.hash_bit} bits; pass "
                        f"at most {args.hash_bit}")


def check_hasher_flags(args):
    """--hasher fits on a frozen trunk's features: what training or a network's outputs need is refused."""
    if args.trunk_from and (args.weights or args.no_pretrained):
        raise UserError("--trunk_from gives the trunk's weights: drop --weights / --no_pretrained")
    if not args.hasher:
        return
    if not args.freeze_backbone:
        raise UserError(f"--hasher {args.hasher} fits on the frozen trunk's features: add --freeze_backbone")
    refused = [flag for flag, given in (("--experts", args.experts > 1), ("--resume", args.resume is not None),
                                        ("--query", args.query), ("--select val", args.select == "val"),
                                        ("--feature_views", args.feature_views > 1)) if given]
    if refused:
        raise UserError(f"--hasher {args.hasher} fits once, with one head and no training: drop {refused[0]}")


def check_feature_cache_flags(args):
    if not args.feature_cache:
        if args.feature_views != 1 or args.feature_dtype != "float32":
            raise UserError("--feature_views and --feature_dtype shape the --feature_cache: add --feature_cache DIR, "
                            "or drop them")
        return
    if args.query:
        raise UserError("--query images are not in the --feature_cache: drop one of them")
    trains = not (args.test or args.export_index)
    if trains and not args.freeze_backbone:
        raise UserError("--feature_cache trains on the features of a frozen trunk: add --freeze_backbone")


# ============ main ============

def run_command(run):
    """Build the parts this invocation needs, then train, or run the saved checkpoint's tasks."""
    seed_everything(run.args.seed)
    if run.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    run = prepare_run(run)
    network = make_network_on_every_rank(run)
    if run.args.feature_cache and not run.args.hasher:  # a hasher reads the cache itself (session/shallow.py)
        return run_with_feature_cache(run, network)
    if run.trains:
        return train(run, network)
    result = run_checkpoint_tasks(run, network)
    report_truncated_images(run)
    return result


def main(args):
    check_flags(args)
    args = resolve_backbone(args)
    check_code_lengths(args)
    run = dataclasses.replace(Run.plan(args), backbone=backbone_of(args))
    check_paths(run)
    if not run.trains:
        require_checkpoint_file(run.files.checkpoint)
    device = select_device(args.device, args.cuda)
    context = init_distributed(device.type)
    if context.enabled and device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
    setup_for_distributed(context.is_main, progress=not args.no_progress)
    run = dataclasses.replace(run, device=device, context=context)
    try:
        with guarded_run_files(run):
            return run_command(run)
    finally:
        shutdown(context)


def parse_args(argv=None):
    """The flags of `argv` (default sys.argv), with a --config file's values under them."""
    return parse_args_with_config(get_args_parser(), argv)


def cli(argv=None):
    run_reporting_errors(lambda: main(parse_args(argv)))


if __name__ == "__main__":
    cli()
