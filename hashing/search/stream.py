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
"""
import fcntl
import hashlib
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
from utils.documents import read_json_file
from utils.errors import UserError
from utils.lock import run_lock
from utils.paths import check_output_target, require_regular_file
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
        return record
    except ValueError:
        raise UserError(f"progress record {path} is unreadable; delete it and its .partial file to encode from "
                        "the start") from None


def open_code_file(path, mode="r", shape=None):
    """The (N, B) uint8 array of a .npy code file as a memory map (mode "r" or "r+"), after checking that it is
    a regular file whose header declares a C-ordered uint8 matrix (of `shape`, when given) that the file holds
    exactly. UserError otherwise."""
    path = require_regular_file(path, "code file")
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
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
    """The running digest of the rows `record` says are final in `path`, after checking them against the digest it
    recorded: UserError when they differ (the record was edited, the file replaced or damaged), so a forged "done"
    never passes unencoded rows off as codes."""
    digest = _rows_digest(codes, record["done"])
    if record.get("codes_sha256") != digest.hexdigest():
        raise UserError(f"progress record {record_path} says {record['done']:,} rows of {path} are final, but they are "
                        "not the rows it recorded (the record was edited, or the file replaced or damaged); delete "
                        "both to encode from the start")
    return digest


def _check_target_files(output, partial, record_path, lock_path, paths):
    """The writer rule for the four files of an encoding, and its folder, before anything is read or locked."""
    if not output.parent.is_dir():
        raise UserError(f"the folder of the code file {output} does not exist; create it or choose another output")
    if partial.is_symlink():  # opened for writing in place, so never followed to another file
        raise UserError(f"partial code file {partial} is a symbolic link, which is never followed; delete it")
    listed = set(paths)
    for what, path in (("code file", output), ("partial code file", partial), ("progress record", record_path),
                       ("encoding lock", lock_path)):  # the lock is emptied and removed: never an image
        check_output_target(path, what)
        if str(path) in listed:
            raise UserError(f"{what} {path} is one of the images to encode; choose another output")


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


def encode_to_file(network, images, transform, output, batch_size=64, device=None, workers=None):
    """Encode `images` (a folder or a sequence of image paths) with `network` after `transform` (an RGB PIL
    image -> (C, H, W) tensor) into the .npy code file `output`, resuming an interrupted run of the same call.
    Returns EncodedImages(codes: read-only memory map, paths, hash_bit). device: None = the network's;
    workers: DataLoader processes decoding images (None = a few, 0 = in this process)."""
    if isinstance(images, (str, Path)):
        if not Path(images).is_dir():
            raise UserError(f"images {images} is not a folder; pass a folder of images or a list of image paths")
        paths = image_paths(images)
    else:
        paths = [str(path) for path in images]
    if not paths:
        raise UserError(f"no images to encode in {images} (looked for {', '.join(sorted(IMAGE_SUFFIXES))} files)")
    output = Path(output)
    partial, record_path = output.with_name(output.name + ".partial"), output.with_name(output.name + ".progress.json")
    lock_path = output.with_name(output.name + ".lock")
    _check_target_files(output, partial, record_path, lock_path, paths)
    with run_lock(lock_path, elsewhere="output"):  # one encoder per output
        return _resume_or_start(network, paths, transform, (output, partial, record_path), batch_size, device,
                                workers)


def _resume_or_start(network, paths, transform, files, batch_size, device, workers):
    """encode_to_file under its lock: the finished file, or the encoding resumed or started."""
    output, partial, record_path = files
    provenance = _provenance(paths, network, transform)
    record = _read_record(record_path)
    differs = _differences(record, provenance) if record is not None else []

    if output.exists():
        if record is None or differs or record["done"] != len(paths):
            why = "has no progress record" if record is None else \
                f"was encoded from another {', '.join(differs)}" if differs else "is incomplete"
            raise UserError(f"code file {output} exists and {why}; delete it or choose another output")
        codes = open_code_file(output, shape=(len(paths), -(-record["hash_bit"] // 8)))
        _check_final_rows(record, codes, output, record_path)
        print(f"{output} already holds the {len(paths):,} codes of these images; nothing to do")
        return EncodedImages(codes, paths, record["hash_bit"])
    handle = None
    if partial.exists():
        handle = _lock(os.fdopen(os.open(partial, os.O_RDWR | os.O_NOFOLLOW), "r+b"), partial)
        if record is not None and differs:
            handle.close()
            raise UserError(f"{partial} is a partial encoding of another {', '.join(differs)} (see {record_path}); "
                            "delete both files to encode these images from the start")
        if record is None:  # left before its record was first written: no row is final
            handle.close()
            partial.unlink()
            handle = None
    workers = decode_workers() if workers is None else workers
    return _encode(network, paths, transform, files, provenance,
                   (record, handle) if handle is not None else (None, None), (batch_size, workers),
                   device or _device_of(network))


def _encode(network, paths, transform, files, provenance, resumed, loading, device):
    """The encoding loop of encode_to_file; resumed = (record, locked handle of the partial file) or Nones."""
    output, partial, record_path = files
    record, handle = resumed
    done = record["done"] if record is not None else 0
    hash_bit = record["hash_bit"] if record is not None else None
    codes, digest = None, hashlib.sha256()
    if record is not None:
        codes = open_code_file(partial, "r+", shape=(len(paths), -(-hash_bit // 8)))
        try:
            digest = _check_final_rows(record, codes, partial, record_path)
        except UserError:
            handle.close()
            raise
    started, saved_at, encoded = time.perf_counter(), time.monotonic(), 0
    batch_size, workers = loading
    loader = DataLoader(ImageItems(paths[done:], transform), batch_size=batch_size, num_workers=workers)

    def save_progress():
        if codes is not None:
            codes.flush()  # the rows reach the disk before the record says they are final
            write_json(record_path, {**provenance, "hash_bit": hash_bit, "done": done,
                                     "codes_sha256": digest.hexdigest()})

    network.eval()
    try:
        with torch.inference_mode(), progress_bar(total=len(paths), initial=done, desc="encoding images",
                                                  unit="img") as bar:
            for images in loader:
                bits, width = _packed_batch(network, images, device, paths[done:done + len(images)])
                if codes is None:  # the first batch tells the code length
                    hash_bit = width
                    handle = _create_code_file(partial, (len(paths), bits.shape[1]))
                    codes = open_code_file(partial, "r+", shape=(len(paths), bits.shape[1]))
                    save_progress()
                elif width != hash_bit:
                    raise ValueError(f"the network gave {width} bits after {hash_bit}")
                codes[done:done + len(bits)] = bits
                digest.update(np.ascontiguousarray(bits))
                done += len(bits)
                encoded += len(bits)
                bar.update(len(bits))
                if time.monotonic() - saved_at >= PROGRESS_SECONDS:
                    save_progress()
                    saved_at = time.monotonic()
    finally:
        save_progress()
        if handle is not None:
            handle.close()
    partial.replace(output)
    print(f"encoded {encoded:,} images into {output} ({len(paths):,} codes of {hash_bit} bits"
          f"{f', {len(paths) - encoded:,} from an interrupted run' if encoded < len(paths) else ''}) "
          f"in {time.perf_counter() - started:.1f}s")
    return EncodedImages(open_code_file(output), paths, hash_bit)
