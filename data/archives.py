"""Dataset archives: use the copy in the data root or download it, verify its md5, and extract it
safely (no member may land outside the target folder) and atomically (into a temporary folder next
to the target, renamed into place only when everything is extracted)."""
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
    digest = hashlib.md5()
    with open(path, "rb") as handle, tqdm(total=Path(path).stat().st_size, desc=f"md5 {Path(path).name}",
                                          unit="B", unit_scale=True, leave=False, dynamic_ncols=True) as bar:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def download(url, path):
    """Stream `url` to `path` through a temporary file, so a failed download leaves no file behind."""
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
        size = int(response.headers.get("Content-Length") or 0) or None

        def copy(handle):
            with tqdm(total=size, desc=f"download {Path(path).name}", unit="B", unit_scale=True,
                      dynamic_ncols=True) as bar:
                while chunk := response.read(CHUNK):
                    handle.write(chunk)
                    bar.update(len(chunk))

        atomic_write(path, copy, binary=True)
    print(f"downloaded {url} to {path} ({tqdm.format_sizeof(Path(path).stat().st_size, 'B')}) "
          f"in {time.perf_counter() - started:.1f}s")


def checked_members(tar, archive_path, destination):
    """The members of `tar`, refusing the whole archive if any would be written outside `destination`
    (absolute names, '..') or is anything but a plain file or folder (links, devices)."""
    destination = Path(destination).resolve()
    members = tar.getmembers()
    for member in members:
        target = (destination / member.name).resolve()
        if not (member.isfile() or member.isdir()) or not target.is_relative_to(destination):
            raise UserError(f"{archive_path}: member {member.name!r} is not a plain file or folder inside the "
                            "archive's folder; refusing to extract it. Replace the archive with the official one")
    return members


def extract(archive_path, destination):
    """Extract every member of a (possibly compressed) tar archive into `destination`."""
    started = time.perf_counter()
    try:
        with tarfile.open(archive_path) as tar:
            members = checked_members(tar, archive_path, destination)
            with tqdm(total=sum(m.size for m in members), desc=f"extract {Path(archive_path).name}", unit="B",
                      unit_scale=True, dynamic_ncols=True) as bar:
                for member in members:
                    tar.extract(member, destination, filter="data")
                    bar.update(member.size)
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
