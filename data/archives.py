"""Dataset archives: use the copy in the data root or download it, verify its md5, and extract it
safely (tarfile's "data" filter: no member may land outside the target folder, no links out of it or
special files; and the unpacked size must fit on the disk) and atomically (into a temporary folder
next to the target, renamed into place only when everything is extracted)."""
import hashlib
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from utils.atomic import atomic_write
from utils.errors import UserError
from utils.runlog import progress_bar

CHUNK = 1 << 20
DOWNLOAD_TIMEOUT = 30  # seconds without data before a download counts as failed


@dataclass(frozen=True)
class Archive:
    file_name: str
    md5: str
    url: str

    def describe(self):
        return f"{self.file_name} (md5 {self.md5})"


def md5_of(path):
    print(f"checking the md5 of {path} ({tqdm.format_sizeof(Path(path).stat().st_size, 'B')})")
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


def download(url, path):
    """Stream `url` to `path` through a temporary file, so a failed download leaves no file behind."""
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
        size = int(response.headers.get("Content-Length") or 0) or None

        def copy(handle):
            with progress_bar(total=size, desc=f"download {Path(path).name}", unit="B", unit_scale=True,
                          leave=True) as bar:
                while chunk := response.read(CHUNK):
                    handle.write(chunk)
                    bar.update(len(chunk))

        atomic_write(path, copy, binary=True)
    print(f"downloaded {url} to {path} ({tqdm.format_sizeof(Path(path).stat().st_size, 'B')}) "
          f"in {time.perf_counter() - started:.1f}s")


def check_disk_space(members, archive_path, destination):
    """Refuse an archive whose files would not fit on the disk: tarfile's "data" filter checks where each
    member goes and what it is, not how much it unpacks to."""
    needed = sum(member.size for member in members if member.isfile())
    free = shutil.disk_usage(destination).free
    if needed > free:
        raise UserError(f"{archive_path} unpacks to {tqdm.format_sizeof(needed, 'B')}, but its disk has only "
                        f"{tqdm.format_sizeof(free, 'B')} free; free disk space or choose another --data_root")


def extract(archive_path, destination):
    """Extract every member of a (possibly compressed) tar archive into `destination`.

    tarfile's "data" filter refuses members that would land outside `destination` ('..', links pointing
    out of it) and special files, strips a leading '/' from absolute names, and drops unsafe permission
    bits.
    """
    started = time.perf_counter()
    try:
        with tarfile.open(archive_path) as tar:
            members = tar.getmembers()
            check_disk_space(members, archive_path, destination)
            bar = progress_bar(members, desc=f"extract {Path(archive_path).name}", unit="file", leave=True)
            tar.extractall(destination, members=bar, filter="data")
    except tarfile.FilterError as exc:
        raise UserError(f"{archive_path}: {exc}; refusing to extract it. Replace the archive with the official "
                        "one") from None
    except (tarfile.TarError, EOFError) as exc:
        raise UserError(f"cannot extract {archive_path} ({exc}): the file is damaged; delete it and rerun") from None
    except OSError as exc:
        raise UserError(f"cannot extract {archive_path} into {destination} ({exc})") from None
    files = sum(member.isfile() for member in members)
    print(f"extracted {archive_path} ({files:,} files) in {time.perf_counter() - started:.1f}s")


def fetch(archive, root, how_to_fix):
    """The md5-verified path of `archive` in `root`, downloaded if it is not there yet."""
    path = Path(root) / archive.file_name
    downloaded = False
    if not path.exists():
        try:
            download(archive.url, path)
            downloaded = True
        except (urllib.error.URLError, OSError) as exc:
            raise UserError(f"cannot download {archive.url} ({getattr(exc, 'reason', exc)}); {how_to_fix}") from None
    found = md5_of(path)
    if found != archive.md5:
        if downloaded:
            path.unlink()
        raise UserError(f"{path} has md5 {found}, expected {archive.md5}: the file is incomplete or not the "
                        f"official archive; {'retry' if downloaded else 'delete or replace it'}")
    return path


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
