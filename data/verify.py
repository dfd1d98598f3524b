"""Check a dataset against its protocol before training on it:

    python -m data.verify --dataset NAME --data_root DIR [--manifest out.json]
    python -m data.verify --identify FILE [FILE ...]

Reads the dataset's split lists (as training would: shipped split files, the lists in the dataset folder,
VOC's ImageSets) and reports, per split: its size against the protocol's (docs/METHOD.md §4), images listed
twice, images without any label, label rows of the wrong width, missing files; then decodes every image
in DataLoader workers (progress bar) and counts the truncated ones (loaded padded, as in the paper's
code) and the undecodable ones; and identifies the split files by their git blob ids (the paper's,
DeepHash-pytorch's, or unknown). Each problem is one line on stderr; any problem makes the exit status 1.
--manifest writes what was checked as JSON: dataset, protocol, the splits' image paths relative to
--data_root in split order, num_classes and the checks (with every truncated image). --identify names the
published variant of any list file by fingerprint (data/variants.py). It checks offline: it
neither downloads nor extracts archives (VOC), and never writes over the data: --manifest is a new file or an
earlier manifest.
"""
import argparse
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from utils.atomic import write_json
from utils.errors import UserError, run_reporting_errors
from utils.documents import holds_json_object_with
from utils.paths import check_output_target

from . import coco
from .base import DataOptions
from .base import name_some
from .files import check_images, split_problems
from .protocol import PROTOCOL_SIZES, identify
from .registry import DATASETS, get_dataset_spec
from .variants import identify_list

SPLIT_ORDER = ("train", "query", "database")


def check_lines(split, listed, expected_size):
    """(counts, problems) of one split's lines: its size against the protocol's, duplicates, unlabelled rows."""
    problems = []
    if expected_size is not None and len(listed.paths) != expected_size:
        problems.append(f"the {split} split has {len(listed.paths):,} images, the protocol {expected_size:,} "
                        f"(listed in {listed.source})")
    duplicates = [path for path, count in Counter(listed.paths).items() if count > 1]
    if duplicates:
        problems.append(f"{listed.source}: {len(duplicates)} images listed more than once in the {split} split, "
                        f"e.g. {duplicates[0]}")
    unlabelled = np.flatnonzero(listed.labels.sum(axis=1) == 0) if len(listed.paths) else np.array([], int)
    if len(unlabelled):
        problems.append(f"{listed.source}: {len(unlabelled)} images of the {split} split have no label (all-zero "
                        f"row), e.g. {listed.paths[unlabelled[0]]}")
    return {"images": len(listed.paths), "expected": expected_size, "duplicates": len(duplicates),
            "unlabelled": len(unlabelled)}, problems


def check_files(splits):
    """(counts, problems) of the images themselves: missing, truncated (padded), undecodable."""
    every_image = list(dict.fromkeys(path for split in SPLIT_ORDER for path in splits[split].paths))
    present = [path for path in every_image if Path(path).is_file()]
    missing = [path for path in every_image if not Path(path).is_file()]
    verdicts = check_images(present, desc="decoding images")
    truncated = [path for path, verdict in zip(present, verdicts) if verdict == "truncated"]
    unreadable = [verdict.partition(": ")[2] for verdict in verdicts if verdict.startswith("unreadable")]
    problems = []
    if missing:
        problems.append(f"{len(missing):,} of the {len(every_image):,} listed images do not exist, e.g. {missing[0]}")
    if unreadable:
        problems.append(f"{len(unreadable):,} images cannot be decoded, e.g.: {unreadable[0]}")
    return {"images": len(every_image), "missing": len(missing), "truncated": len(truncated),
            "unreadable": len(unreadable), "truncated_images": sorted(truncated)}, problems


def check_split_files(dataset, root, options):
    """(what each split file is, problems): the files this run reads, identified by git blob id."""
    spec = get_dataset_spec(dataset)
    described = dict(spec.describe(root, options)) if spec.describe else {}
    problems = []
    if dataset == "nuswide":
        for file_name, variant in described.items():
            if file_name == "database.txt" and variant != "paper":
                problems.append(f"nus_wide/database.txt is {variant}, not the paper's list (git blob 1d8f3dd): "
                                "the mAP will not be comparable with the paper's (see README, Datasets)")
            elif file_name != "database.txt" and "the paper's" not in variant:
                problems.append(f"nus_wide/{file_name} is not the paper's list ({variant}); delete it to use the "
                                "shipped one")
    elif dataset == "flickr" and options.split == "paper":
        folder = Path(root) / "flickr25k"
        for file_name in ("img.txt", "targets.txt"):  # not read with the shipped split: reported, not a problem
            if (folder / file_name).is_file():
                blob, what = identify(folder / file_name)
                described[f"your {file_name} (unused)"] = f"{what} (git blob {blob})"
    return described, problems


def verify(dataset, root, options=DataOptions(), seed=0):
    """(manifest record, problems) of a dataset under root."""
    spec = get_dataset_spec(dataset)
    if spec.check_files is not None:
        return spec.check_files(Path(root), options, seed)
    if spec.list_splits is None:
        raise UserError(f"--dataset {dataset} is held in memory (no image files to verify); "
                        "data.verify checks file datasets")
    line_problems = []
    splits = spec.list_splits(Path(root), seed, options, problems=line_problems)
    expected = PROTOCOL_SIZES.get(dataset, {}) if options.split == "paper" else {}
    checks, problems = {"label_rows": len(line_problems)}, list(line_problems)
    for split in SPLIT_ORDER:
        checks[split], found = check_lines(split, splits[split], expected.get(split))
        problems += found
    problems += split_problems(splits, options.allow_query_in_database)
    checks["files"], found = check_files(splits)
    problems += found
    checks["files"]["truncated_images"] = [os.path.relpath(path, root) for path in checks["files"]["truncated_images"]]
    checks["split_files"], found = check_split_files(dataset, Path(root), options)
    problems += found
    widths = {splits[split].labels.shape[1] for split in SPLIT_ORDER if len(splits[split].paths)}
    record = {"dataset": dataset, "protocol": protocol_name(dataset, options, seed),
              "splits": {split: [os.path.relpath(path, root) for path in splits[split].paths] for split in SPLIT_ORDER},
              "num_classes": spec.num_classes or (widths.pop() if len(widths) == 1 else None), "checks": checks}
    return record, problems


def protocol_name(dataset, options, seed):
    """The split protocol checked: the paper's, a seeded random Flickr split, or a user's lists."""
    if dataset == "flickr" and options.split == "random":
        return f"random split (seed {seed})"
    return "paper" if dataset in PROTOCOL_SIZES else "your lists"


def report(record, problems, root):
    """Print the summary lines; the problems go to stderr, one line each."""
    for line in record.get("summary") or summary_lines(record, root):  # "summary": DatasetSpec.check_files's own
        print(line)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)


def summary_lines(record, root):
    """What a file dataset's check found: split sizes, images, split files."""
    checks = record["checks"]
    sizes = ", ".join(f"{split} {checks[split]['images']:,}" + (f" (protocol {checks[split]['expected']:,})"
                                                               if checks[split]["expected"] else "")
                      for split in SPLIT_ORDER)
    yield f"{record['dataset']}, protocol: {record['protocol']}, {record['num_classes']} classes: {sizes}"
    files = checks["files"]
    intact = files["images"] - files["missing"] - files["unreadable"] - files["truncated"]
    yield (f"{files['images']:,} images: {intact:,} decode, {files['truncated']:,} truncated (they load padded, as "
           f"in the paper's code), {files['unreadable']:,} undecodable, {files['missing']:,} missing")
    if files["truncated_images"]:
        listed = " (--manifest lists them all)" if len(files["truncated_images"]) > 3 else ""
        yield f"truncated images: {name_some(os.path.join(root, path) for path in files['truncated_images'])}{listed}"
    for file_name, what in checks["split_files"].items():
        yield f"{file_name}: {what}"


def identify_files(paths):
    """Print the published variant of each list file; {path: [variant, which file]}."""
    found = {}
    for path in paths:
        found[path] = list(identify_list(path))
        print(f"{path}: {found[path][0]} ({found[path][1]})")
    return found


def get_args_parser():
    parser = argparse.ArgumentParser(prog="python -m data.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=list(DATASETS), help="the dataset to check (required unless --identify)")
    parser.add_argument("--identify", nargs="+", metavar="FILE",
                        help="only name the published variant of each list file, by fingerprint (data/variants.py)")
    parser.add_argument("--split_variant", choices=[*coco.VARIANTS, coco.OWN], default=None,
                        help="coco: the list family to check (default as training: own lists if present, else "
                             f"{coco.DEFAULT_VARIANT})")
    parser.add_argument("--allow_query_in_database", action="store_true",
                        help="do not count query images in the database as a problem")
    parser.add_argument("--data_root", default="./data", help="folder holding the datasets")
    parser.add_argument("--manifest", default=None, metavar="JSON", help="write what was checked to this file")
    parser.add_argument("--split", choices=["paper", "random"], default="paper", help="flickr: which split")
    parser.add_argument("--seed", type=int, default=0, help="the seed of --split random")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)

    def run():
        if args.identify:
            return identify_files(args.identify)
        if not args.dataset:
            raise UserError("python -m data.verify needs --dataset NAME (or --identify FILE ...)")
        if args.manifest:  # before any work, and never over the data: a new file or an earlier manifest
            check_output_target(args.manifest, "--manifest", earlier_output=(
                "an earlier manifest of data.verify",
                lambda path: holds_json_object_with(path, ("dataset", "protocol", "splits", "checks"))))
        options = DataOptions(split=args.split, offline=True, split_variant=args.split_variant,
                              allow_query_in_database=args.allow_query_in_database)
        record, problems = verify(args.dataset, args.data_root, options, args.seed)
        report(record, problems, args.data_root)
        if args.manifest:
            write_json(args.manifest, record)
            print(f"manifest written to {args.manifest}")
        if problems:
            raise UserError(f"{len(problems)} problem{'s' if len(problems) > 1 else ''}: --data_root "
                            f"{args.data_root} does not hold --dataset {args.dataset} as its protocol needs")
        print(f"OK: {args.dataset} under {args.data_root} matches its protocol")
        return record

    return run_reporting_errors(run)


if __name__ == "__main__":
    main()
