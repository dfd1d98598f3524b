"""Encode a large image collection into a memory-mapped file of packed codes, batch by batch, resuming after an
interruption.

encode_to_file(network, images, transform, output) reads the images (a folder, searched recursively for image
files in sorted order, or a sequence of paths) in DataLoader workers, runs the network, and writes the packed
sign bits (hashing/codes.py) of each batch into rows of OUTPUT, a .npy file of uint8 (N, ceil(n / 8)) that
np.load(OUTPUT, mmap_mode="r") or open_code_file() maps: no array of the whole collection is ever in memory.

Resuming. While it runs, the codes go to OUTPUT.partial and OUTPUT.progress.json records how many rows are
final (written and flushed to disk), the SHA-256 of those rows, and what they were computed from: a SHA-256 of
the image list, of the network's weights and of the transform's description. The rows are checked against their
digest before they are trusted (a record edited to say more rows are done is refused), the partial file is never
followed through a symbolic link, and OUTPUT.lock keeps a second encoder into the same output out (one line). A run that stops (an error, Ctrl-C, a killed process)
leaves both; the same call again checks that the record matches its inputs and continues after the last final
row, so it produces the file an uninterrupted run would have. A record that does not match stops the run with
a message naming what differs (the partial file is kept, not overwritten). The record is written at most every
PROGRESS_SECONDS and when the run stops, so a killed run redoes at most that much work. At the end the
partial file is renamed to OUTPUT; the record stays as the file's provenance, and the same call again returns
the finished file at once. An image file replaced after its row was written is not noticed: the record covers
the list of paths, not their bytes.

Several processes (torchrun; context=): every process of the job makes the same call. The rows still missing are
cut into the batches a single process would use (at multiples of batch_size from row 0) and each process takes a
contiguous share of them, writing its rows in place into the one partial file, so the file is byte for byte a
single process's. Process 0 alone takes the lock, checks the files, creates the partial file and writes the
record; its errors stop every process. The processes go in rounds (a batch each, then a vote on saving): at a
save each flushes its rows and process 0 records every process's runs of final rows (the first `done` rows, the
others under "more", each with its SHA-256). A rerun, with any number of processes, encodes only the rows no run
covers. One machine: the processes share the file through the page cache (a network file system would not).
"""
import contextlib
import fcntl
import hashlib
import itertools
import os
import re
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from data.files import read_rgb, to_rgb
from data.image_cache import decode_workers
from utils.atomic import write_json
from utils.dist import DistContext, all_true, barrier, broadcast_object, gather_objects, shard_bounds
from utils.documents import read_json_file
from utils.errors import UserError
from utils.lock import run_lock
from utils.paths import check_output_target, open_regular
from utils.runlog import progress_bar

from hashing.codes import NonFiniteCodes, pack_signs

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
PROGRESS_SECONDS = 10.0
RECORD_FORMAT = 2  # 2: the record holds the SHA-256 of its final rows (codes_sha256)
DIGEST_ROWS = 1 << 16  # rows hashed at a time when a record is checked against its file
MAX_NPY_HEADER = 1 << 16


class EncodedImages(NamedTuple):
    codes: np.ndarray  # read-only memory map, (N, ceil(hash_bit / 8)) uint8, row i = paths[i]
    paths: list
    hash_bit: int


def image_paths(folder):
    """The image files under `folder` (by suffix, any depth), sorted by path: a fixed order for the rows."""
    folder = Path(folder)
    return sorted(str(path) for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())


class ImageItems(Dataset):
    """Images to encode, as `transform`ed tensors: image file paths (read as RGB; `hint` says what to do with an
    unreadable one) or PIL images."""

    def __init__(self, images, transform, hint="replace it with a readable image and run again to resume"):
        self.images, self.transform, self.hint = images, transform, hint

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = self.images[index]
        image = to_rgb(image) if isinstance(image, Image.Image) else read_rgb(image, hint=self.hint)  # already RGB
        return self.transform(image)


def network_digest(network):
    """SHA-256 of a module's weights and buffers (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def transform_description(transform):
    """repr(transform) without memory addresses, which differ from process to process."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))


def _provenance(paths, network, transform):
    return {"format": RECORD_FORMAT, "rows": len(paths),
            "images_sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest(),
            "network_sha256": network_digest(network), "transform": transform_description(transform)}


def _differences(record, provenance):
    names = {"format": "record format", "rows": "number of images", "images_sha256": "image list",
             "network_sha256": "network weights", "transform": "transform"}
    return [names[key] for key in provenance if record.get(key) != provenance[key]]


def _read_record(path):
    """The progress record at `path`, or None when there is none; UserError when it is unreadable."""
    if not path.exists():
        return None
    fix = "delete it and its .partial file to encode from the start"
    record = read_json_file(path, "progress record", 1 << 20, fix=fix)
    try:
        counts = isinstance(record, dict) and all(isinstance(record.get(key), int) for key in ("done", "rows",
                                                                                                "hash_bit"))
        if not counts or not 0 <= record["done"] <= record["rows"] or record["hash_bit"] < 1:
            raise ValueError
        _recorded_runs(record)
        return record
    except ValueError:
        raise UserError(f"progress record {path} is unreadable; delete it and its .partial file to encode from "
                        "the start") from None


def _recorded_runs(record):
    """The runs of final rows a record lists, [(start, stop, SHA-256 of their bytes)] in order: the first `done`
    rows, then the runs under "more" (those the other processes of a torchrun encoding finished). ValueError when
    they are malformed, overlap or lie outside the file."""
    runs, more = [(0, record["done"], record.get("codes_sha256"))], record.get("more", [])
    if not isinstance(more, list):
        raise ValueError
    for run in more:
        if not (isinstance(run, list) and len(run) == 3 and all(isinstance(value, int) for value in run[:2])
                and isinstance(run[2], str) and runs[-1][1] <= run[0] < run[1] <= record["rows"]):
            raise ValueError
        runs.append(tuple(run))
    return runs


def open_code_file(path, mode="r", shape=None):
    """The (N, B) uint8 array of a .npy code file as a memory map (mode "r" or "r+"), after checking that it is
    a regular file whose header declares a C-ordered uint8 matrix (of `shape`, when given) that the file holds
    exactly. UserError otherwise."""
    try:
        with open_regular(path, "code file") as handle:  # checked on the descriptor that is read
            size = os.fstat(handle.fileno()).st_size
            version = np.lib.format.read_magic(handle)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy version {version}")
            found_shape, fortran_order, dtype = read_header(handle, max_header_size=MAX_NPY_HEADER)
            offset = handle.tell()
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"code file {path} is not a readable .npy file ({exc}); delete it or pass another") from None
    if dtype != np.uint8 or fortran_order or len(found_shape) != 2 or (shape is not None and found_shape != shape):
        raise UserError(f"code file {path} holds {dtype} {found_shape}, not uint8 codes of shape "
                        f"{shape or '(N, B)'}; delete it or pass another")
    if size != offset + found_shape[0] * found_shape[1]:
        raise UserError(f"code file {path} has {size:,} bytes, but its header declares {found_shape[0]:,} x "
                        f"{found_shape[1]} bytes of codes after {offset} bytes of header: it is damaged; encode again")
    if found_shape[0] * found_shape[1] == 0:
        return np.zeros(found_shape, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode=mode, offset=offset, shape=found_shape)


def _rows_digest(codes, rows):
    """The running SHA-256 of the first `rows` rows of a code file (C-ordered uint8 rows, so their bytes in order)."""
    digest = hashlib.sha256()
    for start in range(0, rows, DIGEST_ROWS):
        digest.update(np.ascontiguousarray(codes[start:min(rows, start + DIGEST_ROWS)]))
    return digest


def _check_final_rows(record, codes, path, record_path):
    """The final runs of rows `record` lists, [start, stop, running digest] with adjacent runs joined, after
    checking each against the digest it recorded: UserError when they differ (the record was edited, the file
    replaced or damaged), so a forged "done" never passes unencoded rows off as codes."""
    runs = []
    for start, stop, expected in _recorded_runs(record):
        own, joined = hashlib.sha256(), runs[-1] if runs and runs[-1][1] == start else None
        for first in range(start, stop, DIGEST_ROWS):
            rows = np.ascontiguousarray(codes[first:min(stop, first + DIGEST_ROWS)])
            own.update(rows)
            if joined is not None:
                joined[2].update(rows)
        if own.hexdigest() != expected:
            which = f"{stop:,} rows" if start == 0 else f"rows {start:,} to {stop - 1:,}"
            raise UserError(f"progress record {record_path} says {which} of {path} are final, but they are not the "
                            "rows it recorded (the record was edited, or the file replaced or damaged); delete both "
                            "to encode from the start")
        if joined is not None:
            joined[1] = stop
        else:
            runs.append([start, stop, own])
    return runs


def _check_target_files(files, paths, inputs=()):
    """The writer rule for the four files of an encoding, and its folder, before anything is read or locked: none
    is an image or one of `inputs` ([(what, path)], the files the caller read)."""
    output, partial, record_path, lock_path = files
    if not output.parent.is_dir():
        raise UserError(f"the folder of the code file {output} does not exist; create it or choose another output")
    if partial.is_symlink():  # opened for writing in place, so never followed to another file
        raise UserError(f"partial code file {partial} is a symbolic link, which is never followed; delete it")
    listed = set(paths)
    for what, path in (("code file", output), ("partial code file", partial), ("progress record", record_path),
                       ("encoding lock", lock_path)):  # the lock is emptied and removed: never an image
        check_output_target(path, what, inputs)
        if str(path) in listed:
            raise UserError(f"{what} {path} is one of the images to encode; choose another output")


class EncodingFiles(NamedTuple):
    output: Path
    partial: Path
    record: Path
    lock: Path

    @classmethod
    def of(cls, output):
        output = Path(output)
        return cls(output, *(output.with_name(output.name + suffix) for suffix in (".partial", ".progress.json",
                                                                                   ".lock")))


def _image_list(images):
    if isinstance(images, (str, Path)):
        if not Path(images).is_dir():
            raise UserError(f"images {images} is not a folder; pass a folder of images or a list of image paths")
        paths = image_paths(images)
    else:
        paths = [str(path) for path in images]
    if not paths:
        raise UserError(f"no images to encode in {images} (looked for {', '.join(sorted(IMAGE_SUFFIXES))} files)")
    return paths


def encode_to_file(network, images, transform, output, batch_size=64, device=None, workers=None, context=None,
                   inputs=()):
    """Encode `images` (a folder or a sequence of image paths) with `network` after `transform` (an RGB PIL
    image -> (C, H, W) tensor) into the .npy code file `output`, resuming an interrupted run of the same call.
    Returns EncodedImages(codes: read-only memory map, paths, hash_bit). device: None = the network's;
    workers: DataLoader processes decoding images (None = a few, 0 = in this process); context: the
    utils.dist.DistContext of a torchrun job whose every process makes this same call, each then encoding its
    share of the batches into the same file (None: this process alone); inputs: [(what, path)] of the files the
    caller read (a checkpoint, a list of the images), which none of the encoding's files may be."""
    context = context or DistContext()
    paths, files = _image_list(images), EncodingFiles.of(output)
    provenance = _provenance(paths, network, transform)
    with contextlib.ExitStack() as held:  # process 0's lock and partial file, until the file is finished
        plan, resumed = _on_main(context, lambda: _prepare(provenance, paths, files, held, inputs))
        if plan["provenance"] != provenance:
            raise UserError(f"process {context.rank} of the torchrun job was given another "
                            f"{', '.join(_differences(plan['provenance'], provenance))} than process 0; start every "
                            "process with the same arguments")
        if plan["finished"]:
            return EncodedImages(open_code_file(files.output), paths, plan["hash_bit"])
        writer = _SharedCodeFile(context, files, provenance, plan["hash_bit"], *(resumed or ([], None)))
        held.callback(writer.close)
        workers = decode_workers() if workers is None else workers
        return _encode(network, paths, transform, writer, plan["missing"], (batch_size, workers),
                       device or _device_of(network))


def _on_main(context, prepare):
    """(what process 0's prepare() returned to share with every process, what it keeps to itself): process 0's
    UserError stops every process with its message, rather than leaving them waiting."""
    if not context.enabled:
        return prepare()
    shared, kept, error = None, None, None
    if context.is_main:
        try:
            shared, kept = prepare()
        except UserError as exc:
            error = str(exc)
    shared, error = broadcast_object(context, (shared, error))
    if error is not None:
        raise UserError(error)
    return shared, kept


def _prepare(provenance, paths, files, held, inputs):
    """Process 0, before any encoding: check the files, take the lock (held until `held` closes), and find what is
    left to do. Returns ({finished, hash_bit, missing rows, provenance}, (final runs, locked partial file) or
    None)."""
    _check_target_files(files, paths, inputs)
    held.enter_context(run_lock(files.lock, elsewhere="output"))  # one encoding per output
    record = _read_record(files.record)
    differs = _differences(record, provenance) if record is not None else []
    plan = {"finished": False, "hash_bit": None, "missing": [(0, len(paths))], "provenance": provenance}
    if files.output.exists():
        if record is None or differs or record["done"] != len(paths):
            why = "has no progress record" if record is None else \
                f"was encoded from another {', '.join(differs)}" if differs else "is incomplete"
            raise UserError(f"code file {files.output} exists and {why}; delete it or choose another output")
        _check_final_rows(record, open_code_file(files.output, shape=_shape(len(paths), record["hash_bit"])),
                          files.output, files.record)
        print(f"{files.output} already holds the {len(paths):,} codes of these images; nothing to do")
        return {**plan, "finished": True, "hash_bit": record["hash_bit"]}, None
    if not files.partial.exists():
        return plan, None
    handle = held.enter_context(_lock(os.fdopen(os.open(files.partial, os.O_RDWR | os.O_NOFOLLOW), "r+b"),
                                      files.partial))
    if record is not None and differs:
        raise UserError(f"{files.partial} is a partial encoding of another {', '.join(differs)} (see "
                        f"{files.record}); delete both files to encode these images from the start")
    if record is None:  # left before its record was first written: no row is final
        handle.close()
        files.partial.unlink()
        return plan, None
    codes = open_code_file(files.partial, "r+", shape=_shape(len(paths), record["hash_bit"]))
    runs = _check_final_rows(record, codes, files.partial, files.record)
    return {**plan, "hash_bit": record["hash_bit"], "missing": _gaps(runs, len(paths))}, (runs, handle)


def _shape(rows, hash_bit):
    return rows, -(-hash_bit // 8)


def _gaps(runs, rows):
    """The [start, stop) ranges of rows that no run covers, in order."""
    gaps, start = [], 0
    for first, stop, _ in sorted(runs):
        if first > start:
            gaps.append((start, first))
        start = max(start, stop)
    return gaps + [(start, rows)] if start < rows else gaps


def _batches(missing, batch_size):
    """The batches (start, stop) that encode the rows `missing`, cut where a single process cuts them (at multiples
    of batch_size from row 0), so every process computes each row in the batch a single process would."""
    for start, stop in missing:
        while start < stop:
            end = min(stop, (start // batch_size + 1) * batch_size)
            yield start, end
            start = end


def _batch_count(missing, batch_size):
    return sum(-(-stop // batch_size) - start // batch_size for start, stop in missing)


class _ShardRows:
    """The batch sampler of one process's share: the row numbers of batches [first, stop) of _batches()."""

    def __init__(self, missing, batch_size, first, stop):
        self.missing, self.batch_size, self.first, self.stop = missing, batch_size, first, stop

    def __len__(self):
        return self.stop - self.first

    def __iter__(self):
        return (list(range(*rows)) for rows in self.batches())

    def batches(self):
        return itertools.islice(_batches(self.missing, self.batch_size), self.first, self.stop)


def _lock(handle, path):
    """Hold an exclusive lock on an open file until it is closed: two runs never write the same file."""
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(f"another process is encoding into {path}; wait for it or choose another output") from None
    return handle


def _create_code_file(path, shape):
    """A new .npy file of uint8 `shape` (its rows not yet written), open and locked."""
    handle = _lock(open(path, "x+b"), path)  # O_EXCL: a symbolic link put there is not followed either
    np.lib.format.write_array_header_1_0(handle, {"descr": "|u1", "fortran_order": False, "shape": shape})
    handle.truncate(handle.tell() + shape[0] * shape[1])
    handle.flush()
    return handle


class _SharedCodeFile:
    """The partial code file as the processes of one encoding write it, each its batches at their rows, keeping the
    running digest of each run of rows it finished. Process 0 alone creates the file, writes the progress record
    (what every process finished, gathered) and finally renames the file; the others only write rows."""

    def __init__(self, context, files, provenance, hash_bit, runs, handle):
        self.context, self.files, self.provenance, self.hash_bit = context, files, provenance, hash_bit
        self.rows, self.handle, self.encoded, self.encoded_by_all, self.final = provenance["rows"], handle, 0, 0, []
        self.runs = {run[1]: run for run in runs}  # [start, stop, running digest] by the row they end at
        self.codes = None if hash_bit is None else open_code_file(files.partial, "r+", _shape(self.rows, hash_bit))

    def create(self, width):
        """The first batches of a new encoding: process 0 creates the file for codes of its batch's `width` bits,
        which every process then opens."""
        if self.context.is_main:
            self.handle = _create_code_file(self.files.partial, _shape(self.rows, width))
        self.hash_bit = broadcast_object(self.context, width)
        self.codes = open_code_file(self.files.partial, "r+", _shape(self.rows, self.hash_bit))
        self.save()

    def write(self, start, bits, width):
        if width != self.hash_bit:
            raise ValueError(f"the network gave {width} bits after {self.hash_bit}")
        self.codes[start:start + len(bits)] = bits
        run = self.runs.pop(start, None) or [start, start, hashlib.sha256()]
        run[1] += len(bits)
        run[2].update(np.ascontiguousarray(bits))
        self.runs[run[1]] = run
        self.encoded += len(bits)

    def save(self):
        """Flush this process's rows, then (process 0) record every process's final runs: a collective call."""
        if self.codes is None:
            return
        self.codes.flush()  # the rows reach the disk before the record says they are final
        mine = [(start, stop, digest.hexdigest()) for start, stop, digest in self.runs.values() if stop > start]
        everyone = gather_objects(self.context, (mine, self.encoded))
        self.final, self.encoded_by_all = sorted(run for runs, _ in everyone for run in runs), \
            sum(count for _, count in everyone)
        if self.context.is_main:
            first = self.final[0] if self.final and self.final[0][0] == 0 else (0, 0, hashlib.sha256().hexdigest())
            more = [list(run) for run in self.final if run is not first]
            write_json(self.files.record, {**self.provenance, "hash_bit": self.hash_bit, "done": first[1],
                                           "codes_sha256": first[2], **({"more": more} if more else {})})

    def finish(self):
        """Process 0: the record of the whole file, then the file renamed to the output; every process waits."""
        if self.context.is_main:
            if sum(stop - start for start, stop, _ in self.final) != self.rows:  # a share left undone: a bug
                raise RuntimeError(f"only {self.final} of the {self.rows} rows of {self.files.partial} are final")
            if [run[:2] for run in self.final] != [(0, self.rows)]:  # not one run, whose digest is the file's
                digest = _rows_digest(self.codes, self.rows).hexdigest()
                write_json(self.files.record, {**self.provenance, "hash_bit": self.hash_bit, "done": self.rows,
                                               "codes_sha256": digest})
            self.close()
            self.files.partial.replace(self.files.output)
        barrier(self.context)

    def close(self):
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def _device_of(network):
    parameter = next(network.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _packed_batch(network, images, device, paths):
    outputs = network(images.to(device))
    if not isinstance(outputs, torch.Tensor) or outputs.ndim != 2 or len(outputs) != len(images):
        shape = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
        raise ValueError(f"the network must return (batch, bits) outputs in eval mode, got {shape}")
    try:
        return pack_signs(outputs.float().cpu()), outputs.shape[1]
    except NonFiniteCodes as exc:
        raise UserError(f"{exc}, for images {paths[0]} to {paths[-1]}: the network is broken (NaN weights?); "
                        "its codes would mean nothing") from None


def _encode(network, paths, transform, writer, missing, loading, device):
    """The encoding loop of encode_to_file: this process's share of the batches of the `missing` rows, in as many
    rounds as every other process (a round: one batch each, and a collective vote on saving the record)."""
    context, (batch_size, workers) = writer.context, loading
    count = _batch_count(missing, batch_size)
    shard = _ShardRows(missing, batch_size, *shard_bounds(count, 1, context))
    loader = DataLoader(ImageItems(paths, transform), batch_sampler=shard, num_workers=workers)
    batches, rounds = zip(shard.batches(), loader), -(-count // context.world_size)
    started, saved_at = time.perf_counter(), time.monotonic()
    network.eval()
    try:
        with torch.inference_mode(), progress_bar(total=sum(b - a for a, b in shard.batches()), unit="img",
                                                  desc="encoding images") as bar:
            for _ in range(rounds):
                (start, stop), images = next(batches, ((None, None), None))
                bits, width = (None, None) if images is None else \
                    _packed_batch(network, images, device, paths[start:stop])
                if writer.codes is None:  # the first batch tells the code length
                    writer.create(width)
                if bits is not None:
                    writer.write(start, bits, width)
                    bar.update(len(bits))
                if not all_true(context, time.monotonic() - saved_at < PROGRESS_SECONDS, device):
                    writer.save()
                    saved_at = time.monotonic()
    except BaseException:
        if not context.enabled:  # the others may be gone: a torchrun job keeps its last collective record
            writer.save()
        raise
    writer.save()
    writer.finish()
    if context.is_main:
        encoded, world = writer.encoded_by_all, context.world_size
        print(f"encoded {encoded:,} images into {writer.files.output} ({len(paths):,} codes of {writer.hash_bit} bits"
              f"{f', {len(paths) - encoded:,} from an interrupted run' if encoded < len(paths) else ''}) "
              f"{f'in {world} processes ' if world > 1 else ''}in {time.perf_counter() - started:.1f}s")
    return EncodedImages(open_code_file(writer.files.output), paths, writer.hash_bit)
