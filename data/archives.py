"""Dataset archives: use the copy in the data root or download it (resumably), verify its md5 (once per process),
and extract it safely (tar: tarfile's "data" filter, so no member may land outside the target folder, no links out
of it or special files; zip: zipfile's name cleaning; either: the unpacked size must fit on the disk) and
atomically (into a temporary folder next to the target, renamed into place only when everything is extracted).

A download goes to NAME.part next to its final name, resuming where an earlier attempt stopped (HTTP Range; a
connection cut mid-way is resumed ATTEMPTS times), and is renamed to its final name only after its md5 matched;
one that does not match is removed."""
import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from utils.errors import UserError
from utils.paths import check_output_target, open_regular
from utils.runlog import progress_bar

CHUNK = 1 << 20
DOWNLOAD_TIMEOUT = 30  # seconds without data before a download counts as failed
ATTEMPTS = 3  # a cut connection is resumed this often before giving up
INTERRUPTIONS = (http.client.IncompleteRead, ConnectionError, TimeoutError)
_verified = {}  # path -> (its stat signature, md5) of the archives this process checked: each is hashed once


@dataclass(frozen=True)
class Archive:
    file_name: str
    md5: str
    url: str

    def describe(self):
        return f"{self.file_name} (md5 {self.md5})"


def md5_of(path):
    """The md5 of the regular file `path` (open_regular: hashing a FIFO or a device would never end)."""
    with open_regular(path, "the archive") as handle:
        print(f"checking the md5 of {path} ({tqdm.format_sizeof(os.fstat(handle.fileno()).st_size, 'B')})")
        return hashlib.file_digest(handle, "md5").hexdigest()


def _signature(path):
    status = os.stat(path)
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def _checked_md5(path):
    """The md5 of the regular file `path`, hashed only when this process has not hashed it as it is now."""
    signature = _signature(path)
    known = _verified.get(str(path))
    if known is None or known[0] != signature:
        known = _verified[str(path)] = (signature, md5_of(path))
    return known[1]


def open_from(url, offset, how_to_fix):
    """The response to GET url from byte `offset` on; None when the server says nothing is left (416)."""
    headers = {"User-Agent": "hyp2-retrieval", **({"Range": f"bytes={offset}-"} if offset else {})}
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=DOWNLOAD_TIMEOUT)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            return None
        raise UserError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, INTERRUPTIONS):
            raise exc.reason from None
        raise UserError(f"cannot download {url} ({exc.reason}); {how_to_fix}") from None


def fetch_rest(url, partial, how_to_fix):
    """Append the rest of `url` to `partial` (start over when the server ignores the Range); ConnectionError
    when the body ends before its announced length."""
    offset = partial.stat().st_size if partial.exists() else 0
    response = open_from(url, offset, how_to_fix)
    if response is None:
        return
    with response:
        if response.status != 206:
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length else None
        with open(partial, "ab" if offset else "wb") as handle, \
                progress_bar(total=total, initial=offset, desc=f"download {partial.name[:-5]}", unit="B",
                             unit_scale=True, leave=True) as bar:
            while chunk := response.read(CHUNK):
                handle.write(chunk)
                bar.update(len(chunk))
    if total is not None and partial.stat().st_size < total:
        raise ConnectionError(f"the connection closed at byte {partial.stat().st_size:,} of {total:,}")


def download(archive, path, how_to_fix):
    """`archive` downloaded to `path` through path.part (resumed when an earlier attempt left one), md5-checked."""
    partial = check_output_target(path.with_name(path.name + ".part"), "the partial download")
    started = time.perf_counter()
    for attempt in range(1, ATTEMPTS + 1):
        try:
            fetch_rest(archive.url, partial, how_to_fix)
            break
        except INTERRUPTIONS as exc:
            if attempt == ATTEMPTS:
                kept = f"rerun to resume from the {tqdm.format_sizeof(partial.stat().st_size, 'B')} in {partial}, " \
                    "or " if partial.exists() else ""
                raise UserError(f"the download of {archive.url} was cut {ATTEMPTS} times ({exc!r}); {kept}"
                                f"{how_to_fix}") from None
            time.sleep(attempt)
    if _checked_md5(partial) != archive.md5:
        partial.unlink()
        raise UserError(f"{archive.url} arrived with another md5 than the published {archive.md5}: removed it; rerun, "
                        f"or get {archive.file_name} elsewhere and put it into {path.parent}")
    os.replace(partial, path)
    _verified[str(path)] = _verified.pop(str(partial))  # a rename keeps the file as it was hashed
    print(f"downloaded {archive.url} to {path} ({tqdm.format_sizeof(path.stat().st_size, 'B')}) "
          f"in {time.perf_counter() - started:.1f}s")


def fetch(archive, root, how_to_fix=None):
    """The md5-verified path of `archive` in `root`, downloaded if it is not there yet."""
    path = Path(root) / archive.file_name
    how_to_fix = how_to_fix or f"check the network, or get {archive.describe()} elsewhere and put it into {root}"
    if not path.exists():
        download(archive, path, how_to_fix)
        return path
    found = _checked_md5(path)
    if found != archive.md5:
        raise UserError(f"{path} has md5 {found}, expected {archive.md5}: the file is incomplete or not the "
                        "official archive; delete or replace it")
    print(f"{path} is already there (md5 checked)")
    return path


def check_disk_space(needed, archive_path, destination):
    """Refuse an archive whose files would not fit on the disk: tarfile's "data" filter checks where each
    member goes and what it is, not how much it unpacks to."""
    free = shutil.disk_usage(destination).free
    if needed > free:
        raise UserError(f"{archive_path} unpacks to {tqdm.format_sizeof(needed, 'B')}, but its disk has only "
                        f"{tqdm.format_sizeof(free, 'B')} free; free disk space or choose another --data_root")


def _extract_tar(archive_path, destination, bar):
    with tarfile.open(archive_path) as tar:
        members = tar.getmembers()
        check_disk_space(sum(member.size for member in members if member.isfile()), archive_path, destination)
        tar.extractall(destination, members=bar(members), filter="data")
        return sum(member.isfile() for member in members)


def _extract_zip(archive_path, destination, bar):
    """zipfile drops a leading '/', '..' parts and drive letters from each name, so no member lands outside."""
    with zipfile.ZipFile(archive_path) as archive:
        members = archive.infolist()
        check_disk_space(sum(member.file_size for member in members), archive_path, destination)
        for member in bar(members):
            archive.extract(member, destination)
        return sum(not member.is_dir() for member in members)


def extract(archive_path, destination):
    """Extract every member of a zip file or a (possibly compressed) tar archive into `destination`.

    tarfile's "data" filter refuses members that would land outside `destination` ('..', links pointing
    out of it) and special files, strips a leading '/' from absolute names, and drops unsafe permission
    bits.
    """
    started = time.perf_counter()
    unpack = _extract_zip if Path(archive_path).suffix == ".zip" else _extract_tar
    try:
        files = unpack(archive_path, destination, lambda members: progress_bar(
            members, desc=f"extract {Path(archive_path).name}", unit="file", leave=True))
    except tarfile.FilterError as exc:
        raise UserError(f"{archive_path}: {exc}; refusing to extract it. Replace the archive with the official "
                        "one") from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"cannot extract {archive_path} ({exc}): the file is damaged; delete it and rerun") from None
    except OSError as exc:
        raise UserError(f"cannot extract {archive_path} into {destination} ({exc})") from None
    print(f"extracted {archive_path} ({files:,} files) in {time.perf_counter() - started:.1f}s")


def ensure_extracted(root, folder, archives):
    """root/folder, extracted from `archives` (taken from root or downloaded) if it does not exist yet.

    The archives are extracted together into a temporary folder in root, and only its `folder` is
    moved into place, so an interrupted or failed extraction never leaves a partial root/folder.
    """
    root, target = Path(root), Path(root) / folder
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    how_to_fix = (f"put {' and '.join(a.describe() for a in archives)} into {root} and rerun, "
                  f"or extract {'them' if len(archives) > 1 else 'it'} there yourself so that {target} exists")
    paths = [fetch(archive, root, how_to_fix) for archive in archives]
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}.", suffix=".partial"))
    try:
        for path in paths:
            extract(path, staging)
        extracted = staging / folder
        if not extracted.is_dir():
            raise UserError(f"{', '.join(map(str, paths))} did not contain {folder}; "
                            "replace them with the official archives")
        target.parent.mkdir(parents=True, exist_ok=True)
        extracted.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
