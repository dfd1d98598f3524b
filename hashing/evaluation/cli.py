"""Score hash codes produced anywhere under every convention of the ranking metrics (docs/METHOD.md §3.5-§3.7).

    python -m hashing.evaluate result/digits_small_48.codes.npz                 # this project's codes cache
    python -m hashing.evaluate tst_binary.npy trn_binary.npy --query_labels tst_label.npy \\
        --database_labels trn_label.npy --topk 5000                              # DeepHash-pytorch's files

Codes may be real-valued (binarised by sign, 0 -> +1), +-1, {0, 1} or packed bits (uint8 rows of np.packbits,
as this project and FAISS store them); the format is detected (or forced with --format) and printed. Labels are
multi-hot (N, C) arrays (a value > 0 marks a class; NaN and negative values are refused) or (N,) class indices
(counted as the classes present: the metrics depend only on which items share one). The table gives mAP, WAP,
NDCG and ACG @K under each of the 18 conventions (normalize x zero_hit x ties) and how far mAP moves between them;
--json / --csv write it (a new file, or an earlier table of this command: never an input or another kind of file).
"""
import argparse
import csv
import io
import time
from pathlib import Path

import numpy as np

from utils.argtypes import seed_value
from utils.atomic import write_json, write_text
from utils.errors import UserError, run_reporting_errors
from utils.documents import holds_json_object_with
from utils.paths import check_output_target, load_arrays, starts_with_line

from hashing import cache as codes_cache
from hashing.codes import CodeSet, pack_labels
from hashing.evaluation.conventions import Convention
from hashing.evaluation.metrics import convention_table

FORMATS = ("auto", "real", "signs", "binary", "packed")
FORMAT_NAMES = {"real": "real-valued (binarised by sign, 0 -> +1)", "signs": "+-1", "binary": "{0, 1}",
                "packed": "packed bits (np.packbits rows)"}
COLUMNS = ("normalize", "zero_hit", "ties", "map", "wap", "ndcg", "acg", "skipped_queries")
# What an input may hold (unpacked .npz members included), as for the codes cache.
MAX_INPUT_BYTES = codes_cache.MAX_CODES_BYTES
NUMBER_KINDS = "biuf"  # bool, signed and unsigned integers, floats: not complex, dates, strings or records


def load_array(path, flag):
    """A .npy file (or the single array of a .npz) as a numpy array, under the reader rule (utils/paths.py
    load_arrays: a regular file whose arrays hold what their headers declare); a one-line error otherwise."""
    arrays = load_arrays(path, flag, MAX_INPUT_BYTES)
    if len(arrays) != 1:
        raise UserError(f"{flag} {path}: a .npz with several arrays ({', '.join(arrays)}); pass one .npy")
    return next(iter(arrays.values()))


def detect_format(query, database):
    """The format of a pair of code arrays (see FORMATS), judged on both together."""
    values = np.unique(np.concatenate([np.unique(query), np.unique(database)]))
    if query.dtype == np.uint8 and values.max(initial=0) > 1:
        return "packed"
    if np.isin(values, (-1, 1)).all():
        return "signs"
    if np.isin(values, (0, 1)).all():
        return "binary"
    return "real"


def check_codes(codes, flag):
    """Refuse arrays that are no (items, bits) matrix of real numbers, before anything reads their values."""
    if codes.dtype.kind not in NUMBER_KINDS:
        raise UserError(f"{flag}: codes must be real numbers, got {codes.dtype}")
    if codes.ndim != 2:
        raise UserError(f"{flag}: codes must be a 2-D (items, bits) array, got shape {codes.shape}")
    if codes.shape[1] == 0:
        raise UserError(f"{flag}: codes of 0 bits (shape {codes.shape}); a code needs at least one bit")


def code_bits(codes, code_format, hash_bit, flag):
    """Packed sign bits (N, ceil(n / 8)) of codes in the given format, and n."""
    if code_format == "packed":
        if codes.dtype != np.uint8:
            raise UserError(f"{flag}: packed codes must be uint8 rows, got {codes.dtype}")
        hash_bit = hash_bit or 8 * codes.shape[1]
        if not 8 * codes.shape[1] - 7 <= hash_bit <= 8 * codes.shape[1]:
            raise UserError(f"--hash_bit {hash_bit} does not fit packed rows of {codes.shape[1]} bytes")
        if hash_bit % 8 and (codes[:, -1] & ((1 << (8 - hash_bit % 8)) - 1)).any():
            raise UserError(f"{flag}: bits beyond --hash_bit {hash_bit} are set: these are not {hash_bit}-bit codes")
        return codes, hash_bit
    bad = ~np.isfinite(codes).all(axis=1)
    if bad.any():
        raise UserError(f"{flag}: codes contain NaN or infinite values (first in row {int(np.argmax(bad))})")
    positive = codes > 0 if code_format == "binary" else codes >= 0
    return np.packbits(positive, axis=1), codes.shape[1]


def check_labels(labels, flag):
    """Refuse labels that are not numbers, NaN or negative (a value > 0 marks a class, 0 its absence: NaN and
    -1 would silently count as absent), and multi-hot rows of 0 classes."""
    if labels.dtype.kind not in NUMBER_KINDS:
        raise UserError(f"{flag}: labels must be numbers, got {labels.dtype}")
    if labels.ndim not in (1, 2):
        raise UserError(f"{flag}: labels must be (items, classes) or (items,), got shape {labels.shape}")
    if labels.ndim == 2 and labels.shape[1] == 0:
        raise UserError(f"{flag}: labels of 0 classes (shape {labels.shape})")
    rows = labels.reshape(len(labels), -1)
    for bad, what in ((lambda: ~np.isfinite(rows), "NaN or infinite"), (lambda: rows < 0, "negative")):
        found = bad().any(axis=1)
        if found.any():
            raise UserError(f"{flag}: labels are {what} (first in row {int(np.argmax(found))}); multi-hot labels are "
                            "0 (absent) or 1 (present), class indices 0, 1, 2, ...")
    if labels.ndim == 1 and labels.dtype.kind not in "iu":
        raise UserError(f"{flag}: a 1-D label file must hold non-negative integer class indices, got {labels.dtype}")


def one_hot_rows(indices, width, flag):
    """Packed one-hot rows (N, ceil(width / 8)) of class indices below `width`, without an (N, width) matrix."""
    if indices.max(initial=0) >= width:
        raise UserError(f"{flag}: class index {int(indices.max())}, but the other label file has {width} classes")
    rows = np.zeros((len(indices), -(-width // 8)), dtype=np.uint8)
    rows[np.arange(len(indices)), indices // 8] = np.right_shift(0x80, indices % 8).astype(np.uint8)
    return rows


def packed_label_rows(query_labels, database_labels):
    """(query rows, database rows, number of classes) of packed labels. Multi-hot rows are packed as they are;
    when both files hold class indices, the classes present are numbered 0..K-1 first: the metrics depend only on
    which items share a class, so an index of 66,000 costs no 66,000 columns."""
    if query_labels.ndim == database_labels.ndim == 1:
        classes, inverse = np.unique(np.concatenate([query_labels, database_labels]), return_inverse=True)
        rows = one_hot_rows(inverse, len(classes), "labels")
        return rows[:len(query_labels)], rows[len(query_labels):], len(classes)
    if query_labels.ndim == database_labels.ndim and query_labels.shape[1] != database_labels.shape[1]:
        raise UserError(f"query labels have {query_labels.shape[1]} classes but database labels "
                        f"{database_labels.shape[1]}: they must have the same width")
    width = (query_labels if query_labels.ndim == 2 else database_labels).shape[1]
    packed = [one_hot_rows(labels, width, flag) if labels.ndim == 1 else pack_labels(labels)
              for labels, flag in ((query_labels, "--query_labels"), (database_labels, "--database_labels"))]
    return packed[0], packed[1], width


def codes_from_arrays(arrays, code_format="auto", hash_bit=None):
    """A CodeSet and the detected format from (query codes, query labels, database codes, database labels)."""
    query, query_labels, database, database_labels = arrays
    check_codes(query, "QUERY_CODES")
    check_codes(database, "DATABASE_CODES")
    check_labels(query_labels, "--query_labels")
    check_labels(database_labels, "--database_labels")
    code_format = detect_format(query, database) if code_format == "auto" else code_format
    query_bits, hash_bit = code_bits(query, code_format, hash_bit, "QUERY_CODES")
    database_bits, database_bit = code_bits(database, code_format, hash_bit, "DATABASE_CODES")
    if query_bits.shape[1] != database_bits.shape[1] or hash_bit != database_bit:
        raise UserError(f"query codes have {hash_bit} bits but database codes {database_bit}")
    for side, codes, labels in (("query", query_bits, query_labels), ("database", database_bits, database_labels)):
        if len(codes) != len(labels):
            raise UserError(f"{len(codes)} {side} codes but {len(labels)} {side} label rows: they must match")
    query_rows, database_rows, num_classes = packed_label_rows(query_labels, database_labels)
    return CodeSet(query_bits, query_rows, database_bits, database_rows, hash_bit, num_classes), code_format


def load_codes(args):
    """(CodeSet, description of the format) from the command line's files."""
    if len(args.codes) == 1 and args.codes[0].endswith(".npz") and not args.query_labels:
        arrays = load_arrays(args.codes[0], "CODES", MAX_INPUT_BYTES)
        try:
            codes = CodeSet.from_stored(arrays)
        except ValueError as exc:
            raise UserError(f"{args.codes[0]}: not a codes cache of this project ({exc}); pass QUERY_CODES "
                            "DATABASE_CODES --query_labels F --database_labels F instead") from None
        check_scorable(codes, f"{args.codes[0]}: ")
        return codes, "this project's codes cache (packed bits)"
    if len(args.codes) != 2 or not (args.query_labels and args.database_labels):
        raise UserError("pass one .codes.npz, or QUERY_CODES DATABASE_CODES with --query_labels and "
                        "--database_labels")
    arrays = (load_array(args.codes[0], "QUERY_CODES"), load_array(args.query_labels, "--query_labels"),
              load_array(args.codes[1], "DATABASE_CODES"), load_array(args.database_labels, "--database_labels"))
    codes, code_format = codes_from_arrays(arrays, args.format, args.hash_bit)
    check_scorable(codes)
    return codes, FORMAT_NAMES[code_format]


def check_scorable(codes, source=""):
    """Refuse a problem without a query, a database item, or any query sharing a label with the database: every
    convention's figure would be 0 or a mean over no query."""
    if len(codes.query_bits) == 0 or len(codes.database_bits) == 0:
        raise UserError(f"{source}there must be at least one query and one database item")
    database_classes = np.bitwise_or.reduce(codes.database_labels, axis=0)
    if not (codes.query_labels & database_classes).any():
        raise UserError(f"{source}no query shares a label with any database item (are the labels all zero, or of "
                        "another dataset?): there is nothing to score; check the label files")


def without_empty_means(rows, num_queries):
    """The rows with None for a mean over no query (every query left out under zero_hit="skip"), which the
    metrics report as 0."""
    for row in rows:
        if row["skipped_queries"] == num_queries:
            row["map"] = row["wap"] = None
        if row["ndcg_skipped_queries"] == num_queries:
            row["ndcg"] = None
    return rows


def sensitivity(rows):
    """How far mAP moves: over all conventions, and over the tie rules for each (normalize, zero_hit)."""
    maps = [row["map"] for row in rows if row["map"] is not None]
    by_rule = {}
    for row in rows:
        if row["map"] is not None:
            by_rule.setdefault((row["normalize"], row["zero_hit"]), []).append(row["map"])
    return {"map_range": max(maps) - min(maps),
            "largest_tie_rule_spread": max(max(values) - min(values) for values in by_rule.values())}


def format_table(rows):
    """The table as aligned text, the paper's convention marked with *, — for a mean over no query."""
    def figure(value):
        return f"{'—':>7}" if value is None else f"{value:7.4f}"

    lines = [f"{'normalize':9} {'zero_hit':8} {'ties':6}  {'mAP':>7} {'WAP':>7} {'NDCG':>7} {'ACG':>7}  skipped"]
    for row in rows:
        mark = "*" if Convention(row["normalize"], row["zero_hit"], row["ties"]).is_default else " "
        lines.append(f"{row['normalize']:9} {row['zero_hit']:8} {row['ties']:6}{mark} {figure(row['map'])} "
                     f"{figure(row['wap'])} {figure(row['ndcg'])} {figure(row['acg'])}  {row['skipped_queries']:7d}")
    return "\n".join(lines)


def csv_text(rows):
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def check_outputs(args):
    """The writer rule for --json and --csv, before any work: each is absent or an earlier output of this command
    (never an input, the other output, a device or another kind of file)."""
    inputs = list(zip(("QUERY_CODES", "DATABASE_CODES") if len(args.codes) == 2 else ("CODES",), args.codes))
    inputs += [(flag, path) for flag, path in (("--query_labels", args.query_labels),
                                               ("--database_labels", args.database_labels)) if path]
    if args.json:
        check_output_target(args.json, "--json", inputs, earlier_output=(
            "an earlier --json table of hashing.evaluate",
            lambda path: holds_json_object_with(path, ("inputs", "sensitivity", "rows"))))
    if args.csv:
        check_output_target(args.csv, "--csv", inputs + [("--json", args.json)], earlier_output=(
            "an earlier --csv table of hashing.evaluate", lambda path: starts_with_line(path, ",".join(COLUMNS))))


def get_args_parser():
    parser = argparse.ArgumentParser(description="Score hash codes under every mAP convention, with graded metrics.")
    parser.add_argument("codes", nargs="+", metavar="CODES",
                        help="a .codes.npz of this project, or QUERY_CODES DATABASE_CODES (.npy)")
    parser.add_argument("--query_labels", default=None, metavar="NPY", help="query labels (multi-hot or indices)")
    parser.add_argument("--database_labels", default=None, metavar="NPY", help="database labels")
    parser.add_argument("--topk", type=int, default=0, help="K; 0 or less = the whole database")
    parser.add_argument("--format", choices=FORMATS, default="auto", help="code format (default: detected)")
    parser.add_argument("--hash_bit", type=int, default=None, help="code length of packed codes (default 8 x bytes)")
    parser.add_argument("--seed", type=seed_value, default=0, help="seed of the database shuffle of ties=random")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the table and the inputs as JSON")
    parser.add_argument("--csv", default=None, metavar="PATH", help="write the table as CSV")
    return parser


def main(args):
    started = time.perf_counter()
    check_outputs(args)
    codes, described = load_codes(args)
    try:
        table = convention_table(codes, args.topk, args.seed)
    except ValueError as exc:  # more counts per query than the graded metrics hold (hashing/evaluation/metrics.py)
        raise UserError(f"cannot score these codes: {exc}") from None
    rows = without_empty_means(table, len(codes.query_bits))
    spread = sensitivity(rows)
    k = rows[0]["map_topk"]
    print(f"{len(codes.query_bits)} queries x {len(codes.database_bits)} database items, {codes.hash_bit} bits, "
          f"{codes.num_classes} classes; codes: {described}; K = {k}")
    print(format_table(rows))
    print(f"convention sensitivity: mAP moves by {spread['map_range']:.4f} over the conventions, by up to "
          f"{spread['largest_tie_rule_spread']:.4f} between tie rules (* = the paper's convention); "
          f"{time.perf_counter() - started:.1f}s")
    result = {"inputs": [str(Path(name)) for name in args.codes], "format": described, "hash_bit": codes.hash_bit,
              "num_queries": len(codes.query_bits), "num_database": len(codes.database_bits), "map_topk": k,
              "seed": args.seed, "sensitivity": spread, "rows": rows}
    if args.json:
        write_json(args.json, result)
    if args.csv:
        write_text(args.csv, csv_text(rows))
    return result


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    return run_reporting_errors(lambda: main(args))

