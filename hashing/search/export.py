"""`python -m hashing.export`: a checkpoint's database codes into Milvus or a FAISS file, and the check of an engine's
answers against the exact ranking.

    python -m hashing.export --checkpoint CKPT --to milvus --uri result/codes.db          # Milvus Lite
    python -m hashing.export --checkpoint CKPT --to milvus --uri http://HOST:19530 --token USER:PW
    python -m hashing.export --checkpoint CKPT --to milvus --uri URI --images DIR        # a folder of images
    python -m hashing.export --checkpoint CKPT --to faiss --output result/digits.faiss   # as --export_index
    python -m hashing.export --checkpoint CKPT --verify --uri URI [--k 100]

What is exported: the run's database split (ids = database indices, with their labels and image paths), or with
--images every image file under DIR in sorted path order (ids = positions in that order, no labels). Milvus:
the codes are encoded batch by batch and upserted by id, so an interrupted export run again continues after the
longest run of ids 0..m-1 already held (hashing/search/milvus.py done_prefix) and rewrites nothing twice; a
collection whose record names another checkpoint, code length or source is refused. --verify: see
verify_collection (the figures: hashing/search/export_verify.py).
"""
import argparse
import hashlib
import os
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from data.fingerprint import split_fingerprint
from data.image_cache import decode_workers
from data.query_images import item_names, unwrap_subset
from utils.argtypes import int_in_range, positive_int
from utils.errors import UserError, run_reporting_errors
from utils.paths import check_output_target
from utils.runlog import progress_bar

from hashing.cache import file_sha256
from hashing.codes import pack_signs
from hashing.search.api import load_checkpoint
from hashing.search.exact import is_binary_index, write_index
from hashing.search.export_verify import compare_with_exact
from hashing.search.milvus import DEFAULT_NPROBE, INDEX_TYPES, MAX_LIMIT, MilvusBackend, collection_name
from hashing.search.stream import ImageItems, image_paths


class Source(NamedTuple):
    """What an export encodes: `items` (a Dataset of image tensors, or of (image, labels) pairs), one image path
    per row ("" when the dataset holds its images in memory), and what identifies it in a collection's record."""
    items: object
    paths: list
    name: str
    digest: str
    num_classes: int = 0


def database_source(model, data_root=None, splits=None):
    database = (splits or model.splits(data_root)).database
    base, _ = unwrap_subset(database)
    names = item_names(database)
    paths = [names(i) for i in range(len(database))] if hasattr(base, "paths") else [""] * len(database)
    return Source(database, paths, f"{model.dataset} database", split_fingerprint(database, file_status=False),
                  int(base.labels.shape[1]))


def images_source(model, folder):
    if not Path(folder).is_dir():
        raise UserError(f"--images {folder} is not a folder; pass a folder of images")
    paths = image_paths(folder)
    if not paths:
        raise UserError(f"--images {folder} holds no image files")
    return Source(ImageItems(paths, model.transform), paths, "images",
                  hashlib.sha256("\n".join(paths).encode()).hexdigest())


def source_record(model, source):
    """The record a collection of `source`'s codes carries (hashing/search/milvus.py)."""
    return {"checkpoint_sha256": file_sha256(model.checkpoint), "hash_bit": model.hash_bit, "source": source.name,
            "source_sha256": source.digest, "rows": len(source.paths)}


def label_strings(labels):
    """'2,7' per multi-hot row: the class indices of each item."""
    return [",".join(map(str, np.flatnonzero(row))) for row in np.asarray(labels)]


def encoded_batches(model, source, start, batch_size, workers):
    """(first row, packed codes, label strings) of the source's rows from `start` on, a batch at a time."""
    rows = Subset(source.items, range(start, len(source.paths)))
    loader = DataLoader(rows, batch_size=batch_size, shuffle=False, num_workers=workers)
    with torch.inference_mode():
        for batch in loader:
            pixels, labels = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) else (batch, None)
            codes = pack_signs(model.network(pixels.to(model.device)).float().cpu())
            yield start, codes, label_strings(labels) if labels is not None else None
            start += len(codes)


def export_milvus(model, source, args):
    """Write `source`'s codes into the collection; resume where an interrupted export stopped."""
    rows = len(source.paths)
    collection = args.collection or collection_name(model.checkpoint)
    label_length = len(",".join(map(str, range(max(source.num_classes, 1)))))
    started = time.perf_counter()
    with MilvusBackend.create(args.uri, collection, source_record(model, source), label_length, args.token,
                              args.milvus_index, args.nlist, args.nprobe, args.shards) as backend:
        done = backend.done_prefix(rows)
        with progress_bar(total=rows, initial=done, desc="exporting codes", unit="img") as bar:
            for first, codes, labels in encoded_batches(model, source, done, args.batch_size, args.workers):
                ids = np.arange(first, first + len(codes))
                backend.add(codes, ids, labels, source.paths[first:first + len(codes)])
                bar.update(len(codes))
        held = backend.count()
        if held != rows or backend.done_prefix(rows) != rows:
            raise UserError(f"collection {collection} at {args.uri} holds {held:,} rows after the export, not the "
                            f"{rows:,} of {source.name}: drop it and export again")
        print(f"wrote {rows - done:,} codes of {model.hash_bit} bits ({source.name}; {done:,} already there) into "
              f"collection {collection} at {args.uri} ({backend.index_type}, {held:,} rows) in "
              f"{time.perf_counter() - started:.1f}s")
    return {"collection": collection, "written": rows - done, "resumed_at": done, "rows": held}


def export_faiss(model, source, args):
    """Write `source`'s codes as a FAISS IndexBinaryFlat file (what retrieval.py --export_index writes)."""
    if args.output is None:
        raise UserError("--to faiss needs --output FILE (the FAISS index to write)")
    output = check_output_target(args.output, "FAISS index", inputs=[("the checkpoint", model.checkpoint)],
                                 earlier_output=("a FAISS binary index", is_binary_index))
    started = time.perf_counter()
    chunks = [codes for _, codes, _ in encoded_batches(model, source, 0, args.batch_size, args.workers)]
    write_index(np.concatenate(chunks), output)
    print(f"wrote the FAISS index of {len(source.paths):,} codes of {model.hash_bit} bits ({source.name}) to "
          f"{output} in {time.perf_counter() - started:.1f}s")
    return {"output": str(output), "rows": len(source.paths)}


def database_collection(model, uri, collection=None, token=None, nprobe=DEFAULT_NPROBE, data_root=None, splits=None):
    """The MilvusBackend of the collection holding `model`'s run's database codes (ids = database indices), after
    checking that its record names this checkpoint, bits and split and that it holds every row: what the search
    page and --verify search. splits: the run's splits where the caller has built them (else from data_root).

        from hashing.search.export import database_collection
        backend = database_collection(model, "result/codes.db")     # model = hashing.search.api.load_checkpoint(...)
        distances, ids = backend.search(model.encode(["photo.jpg"]), k=10)
    """
    source = database_source(model, data_root, splits)
    collection = collection or collection_name(model.checkpoint)
    backend = MilvusBackend(uri=uri, collection=collection, token=token, nprobe=nprobe)
    backend.check_record(source_record(model, source))
    held = len(backend)
    if held != len(source.paths):
        backend.close()
        raise UserError(f"collection {collection} at {uri} holds {held:,} of the {len(source.paths):,} database "
                        "codes: finish the export first (the same export command resumes it)")
    return backend


def verify_collection(model, args):
    """--verify: search the collection with the run's queries and compare with the exact ranking."""
    splits = model.splits(args.data_root)
    codes = model.split_codes(splits)
    with database_collection(model, args.uri, args.collection, args.token, args.nprobe, splits=splits) as backend:
        report = compare_with_exact(backend.search_raw(codes.query_bits, args.k), codes, args.k)
        report.update(collection=backend.collection, index_type=backend.index_type)
    print(f"{report['collection']} ({report['index_type']}, {len(codes.database_bits):,} codes) vs the exact ranking, "
          f"{report['queries']:,} queries, k={report['k']}: recall@k by distance level "
          f"{report['recall_by_distance_level']:.4f}, mAP@k {report['map_engine']:.4f} from the engine's rankings vs "
          f"{report['map_evaluator']:.4f} from the evaluator's: {report['verdict']}")
    return report


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the trained checkpoint (its run's files next to it)")
    parser.add_argument("--to", choices=("milvus", "faiss"), default="milvus", help="where the codes go")
    parser.add_argument("--uri", default=None,
                        help="Milvus: FILE.db (Milvus Lite, embedded) or http://HOST:19530 (a server or cluster)")
    parser.add_argument("--token", default=os.environ.get("MILVUS_TOKEN"),
                        help="Milvus server credentials, USER:PASSWORD or an API key (default: $MILVUS_TOKEN)")
    parser.add_argument("--collection", default=None, help="the Milvus collection (default: hyp2_ and the "
                        "checkpoint's file name)")
    parser.add_argument("--output", default=None, help="--to faiss: the index file to write")
    parser.add_argument("--images", default=None, metavar="DIR",
                        help="export the images under DIR (sorted paths) instead of the run's database split")
    parser.add_argument("--milvus_index", choices=tuple(INDEX_TYPES), default="BIN_FLAT",
                        help="BIN_FLAT: exact; BIN_IVF_FLAT: approximate, a Milvus server only")
    parser.add_argument("--nlist", type=int_in_range(1, 65536), default=None,
                        help="BIN_IVF_FLAT clusters (default: about sqrt of the rows)")
    parser.add_argument("--nprobe", type=int_in_range(1, 65536), default=DEFAULT_NPROBE,
                        help="BIN_IVF_FLAT clusters searched per query")
    parser.add_argument("--shards", type=int_in_range(1, 64), default=None,
                        help="shards of a new collection on a cluster (default: the server's)")
    parser.add_argument("--verify", action="store_true",
                        help="compare the collection's answers to the run's queries with the exact ranking")
    parser.add_argument("--k", type=int_in_range(1, MAX_LIMIT), default=100, help="--verify: results per query")
    parser.add_argument("--batch_size", type=positive_int, default=256, help="images encoded per batch")
    parser.add_argument("--workers", type=int_in_range(0, 64), default=None,
                        help="processes decoding images (default: a few)")
    parser.add_argument("--data_root", default=None, help="where the run's dataset is (default: the run's)")
    parser.add_argument("--dataset", default=None, help="the dataset, where the checkpoint has no run files")
    parser.add_argument("--backbone", default=None, help="the backbone, where the checkpoint does not say")
    parser.add_argument("--hash_bit", type=positive_int, default=None, help="the bits, where the checkpoint does not say")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return parser


def check_flags(args):
    if (args.to == "milvus" or args.verify) and not args.uri:
        raise UserError("--to milvus and --verify need --uri FILE.db (Milvus Lite) or http://HOST:19530")
    if args.verify and args.images:
        raise UserError("--verify compares with the run's queries and database split, not with --images")
    if args.to == "faiss" and args.uri and not args.verify:
        raise UserError("--to faiss writes --output FILE; --uri is for --to milvus")
    if args.workers is None:
        args.workers = decode_workers() if args.images else 0


def main(args):
    check_flags(args)
    model = load_checkpoint(args.checkpoint, dataset=args.dataset, backbone=args.backbone, hash_bit=args.hash_bit,
                            device=args.device)
    if args.verify:
        return verify_collection(model, args)
    source = images_source(model, args.images) if args.images else database_source(model, args.data_root)
    return (export_milvus if args.to == "milvus" else export_faiss)(model, source, args)


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    return run_reporting_errors(lambda: main(args), interrupted_hint=": run the same command again to resume")
