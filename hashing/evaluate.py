"""Score hash codes produced anywhere under every convention of the ranking metrics (docs/METHOD.md §3.5-§3.7).

    python -m hashing.evaluate result/digits_small_48.codes.npz                 # this project's codes cache
    python -m hashing.evaluate tst_binary.npy trn_binary.npy --query_labels tst_label.npy \\
        --database_labels trn_label.npy --topk 5000                              # DeepHash-pytorch's files

Codes may be real-valued (binarised by sign, 0 -> +1), +-1, {0, 1} or packed bits (uint8 rows of np.packbits,
as this project and FAISS store them); the format is detected (or forced with --format) and printed. Labels are
multi-hot (N, C) arrays or (N,) class indices. The table gives mAP, WAP, NDCG and ACG @K under each of the 18
conventions (normalize x zero_hit x ties) and how far mAP moves between them; --json / --csv write it.
"""
import argparse
import csv
import io
import time
import zipfile
from pathlib import Path

import numpy as np

from utils.atomic import write_json, write_text
from utils.errors import UserError, run_reporting_errors

from .codes import CodeSet, pack_labels
from .conventions import Convention
from .metrics import convention_table

FORMATS = ("auto", "real", "signs", "binary", "packed")
FORMAT_NAMES = {"real": "real-valued (binarised by sign, 0 -> +1)", "signs": "+-1", "binary": "{0, 1}",
                "packed": "packed bits (np.packbits rows)"}
COLUMNS = ("normalize", "zero_hit", "ties", "map", "wap", "ndcg", "acg", "skipped_queries")


def load_array(path, flag):
    """A .npy file (or the single array of a .npz) as a numpy array; a one-line error when unreadable."""
    try:
        with open(path, "rb") as handle:
            loaded = np.load(io.BytesIO(handle.read()), allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{flag} {path}: no such file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"{flag} {path}: not a readable .npy/.npz array ({exc})") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        if len(loaded.files) != 1:
            raise UserError(f"{flag} {path}: a .npz with several arrays ({', '.join(loaded.files)}); pass one .npy")
        return loaded[loaded.files[0]]
    return loaded


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


def code_bits(codes, code_format, hash_bit, flag):
    """Packed sign bits (N, ceil(n / 8)) of codes in the given format, and n."""
    if codes.ndim != 2:
        raise UserError(f"{flag}: codes must be a 2-D (items, bits) array, got shape {codes.shape}")
    if code_format == "packed":
        if codes.dtype != np.uint8:
            raise UserError(f"{flag}: packed codes must be uint8 rows, got {codes.dtype}")
        hash_bit = hash_bit or 8 * codes.shape[1]
        if not 8 * codes.shape[1] - 7 <= hash_bit <= 8 * codes.shape[1]:
            raise UserError(f"--hash_bit {hash_bit} does not fit packed rows of {codes.shape[1]} bytes")
        return codes, hash_bit
    if not np.issubdtype(codes.dtype, np.number) or np.issubdtype(codes.dtype, np.complexfloating):
        raise UserError(f"{flag}: codes must be real numbers, got {codes.dtype}")
    bad = ~np.isfinite(codes).all(axis=1)
    if bad.any():
        raise UserError(f"{flag}: codes contain NaN or infinite values (first in row {int(np.argmax(bad))})")
    positive = codes > 0 if code_format == "binary" else codes >= 0
    return np.packbits(positive, axis=1), codes.shape[1]


def label_matrix(labels, flag, num_classes=None):
    """(N, C) multi-hot labels from a multi-hot array or a vector of class indices."""
    if labels.ndim == 1:
        if not np.issubdtype(labels.dtype, np.integer) or labels.min(initial=0) < 0:
            raise UserError(f"{flag}: a 1-D label file must hold non-negative class indices")
        width = num_classes or int(labels.max(initial=0)) + 1
        return np.eye(width, dtype=np.uint8)[labels]
    if labels.ndim != 2:
        raise UserError(f"{flag}: labels must be (items, classes) or (items,), got shape {labels.shape}")
    return labels


def _class_count(query_labels, database_labels):
    return max(int(side.max(initial=0)) + 1 for side in (query_labels, database_labels) if side.ndim == 1)


def codes_from_arrays(arrays, code_format="auto", hash_bit=None):
    """A CodeSet and the detected format from (query codes, query labels, database codes, database labels)."""
    query, query_labels, database, database_labels = arrays
    code_format = detect_format(query, database) if code_format == "auto" else code_format
    query_bits, hash_bit = code_bits(query, code_format, hash_bit, "query codes")
    database_bits, database_bit = code_bits(database, code_format, hash_bit, "database codes")
    if query_bits.shape[1] != database_bits.shape[1] or hash_bit != database_bit:
        raise UserError(f"query codes have {hash_bit} bits but database codes {database_bit}")
    one_d = [side for side in (query_labels, database_labels) if side.ndim == 1]
    num_classes = _class_count(query_labels, database_labels) if one_d else None
    query_labels = label_matrix(query_labels, "query labels", num_classes)
    database_labels = label_matrix(database_labels, "database labels", num_classes)
    for side, codes, labels in (("query", query_bits, query_labels), ("database", database_bits, database_labels)):
        if len(codes) != len(labels):
            raise UserError(f"{len(codes)} {side} codes but {len(labels)} {side} label rows: they must match")
    if query_labels.shape[1] != database_labels.shape[1]:
        raise UserError(f"query labels have {query_labels.shape[1]} classes but database labels "
                        f"{database_labels.shape[1]}: they must have the same width")
    if len(query_bits) == 0 or len(database_bits) == 0:
        raise UserError("there must be at least one query and one database item")
    return CodeSet(query_bits, pack_labels(query_labels), database_bits, pack_labels(database_labels), hash_bit,
                   query_labels.shape[1]), code_format


def load_codes(args):
    """(CodeSet, description of the format) from the command line's files."""
    if len(args.codes) == 1 and args.codes[0].endswith(".npz") and not args.query_labels:
        try:
            with np.load(args.codes[0], allow_pickle=False) as stored:
                codes = CodeSet(stored["query_bits"], stored["query_labels"], stored["database_bits"],
                                stored["database_labels"], int(stored["hash_bit"]), int(stored["num_classes"]))
        except FileNotFoundError:
            raise UserError(f"{args.codes[0]}: no such file") from None
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise UserError(f"{args.codes[0]}: not a codes cache of this project ({exc}); pass QUERY_CODES "
                            "DATABASE_CODES --query_labels F --database_labels F instead") from None
        return codes, "this project's codes cache (packed bits)"
    if len(args.codes) != 2 or not (args.query_labels and args.database_labels):
        raise UserError("pass one .codes.npz, or QUERY_CODES DATABASE_CODES with --query_labels and "
                        "--database_labels")
    arrays = (load_array(args.codes[0], "QUERY_CODES"), load_array(args.query_labels, "--query_labels"),
              load_array(args.codes[1], "DATABASE_CODES"), load_array(args.database_labels, "--database_labels"))
    codes, code_format = codes_from_arrays(arrays, args.format, args.hash_bit)
    return codes, FORMAT_NAMES[code_format]


def sensitivity(rows):
    """How far mAP moves: over all conventions, and over the tie rules for each (normalize, zero_hit)."""
    maps = [row["map"] for row in rows]
    by_rule = {}
    for row in rows:
        by_rule.setdefault((row["normalize"], row["zero_hit"]), []).append(row["map"])
    return {"map_range": max(maps) - min(maps),
            "largest_tie_rule_spread": max(max(values) - min(values) for values in by_rule.values())}


def format_table(rows):
    """The table as aligned text, the paper's convention marked with *."""
    lines = [f"{'normalize':9} {'zero_hit':8} {'ties':6}  {'mAP':>7} {'WAP':>7} {'NDCG':>7} {'ACG':>7}  skipped"]
    for row in rows:
        mark = "*" if Convention(row["normalize"], row["zero_hit"], row["ties"]).is_default else " "
        lines.append(f"{row['normalize']:9} {row['zero_hit']:8} {row['ties']:6}{mark} {row['map']:7.4f} "
                     f"{row['wap']:7.4f} {row['ndcg']:7.4f} {row['acg']:7.4f}  {row['skipped_queries']:7d}")
    return "\n".join(lines)


def csv_text(rows):
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def get_args_parser():
    parser = argparse.ArgumentParser(description="Score hash codes under every mAP convention, with graded metrics.")
    parser.add_argument("codes", nargs="+", metavar="CODES",
                        help="a .codes.npz of this project, or QUERY_CODES DATABASE_CODES (.npy)")
    parser.add_argument("--query_labels", default=None, metavar="NPY", help="query labels (multi-hot or indices)")
    parser.add_argument("--database_labels", default=None, metavar="NPY", help="database labels")
    parser.add_argument("--topk", type=int, default=0, help="K; 0 or less = the whole database")
    parser.add_argument("--format", choices=FORMATS, default="auto", help="code format (default: detected)")
    parser.add_argument("--hash_bit", type=int, default=None, help="code length of packed codes (default 8 x bytes)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the database shuffle of ties=random")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the table and the inputs as JSON")
    parser.add_argument("--csv", default=None, metavar="PATH", help="write the table as CSV")
    return parser


def main(args):
    started = time.perf_counter()
    codes, described = load_codes(args)
    rows = convention_table(codes, args.topk, args.seed)
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


if __name__ == "__main__":
    cli()
