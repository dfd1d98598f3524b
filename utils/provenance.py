"""Which code and environment produced a run: the git commit of this checkout and whether its tree had
uncommitted changes, the versions of the numerical libraries, the device, the thread count and the full
command line. Recorded in the run's start event and its .metrics.json, so a figure can be traced back."""
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

CODE_ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "torchvision", "numpy", "numba")


def _git(*arguments):
    result = subprocess.run(["git", "-C", str(CODE_ROOT), *arguments], capture_output=True, text=True, timeout=20,
                            check=True)
    return result.stdout.strip()


def code_version():
    """{"commit": full hash, "dirty": bool} of the checkout this code runs from, or {"commit": None,
    "dirty": None, "note": "not a git checkout"} (an unpacked archive, no git installed)."""
    try:
        commit = _git("rev-parse", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "note": "not a git checkout"}
    return {"commit": commit, "dirty": dirty}


def library_versions():
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine() or 'cpu'} CPU"


def provenance(device, argv=None):
    """What run logs and metrics files record of the code and environment that produced them."""
    return {"code": code_version(), "versions": library_versions(), "device_name": device_name(device),
            "threads": torch.get_num_threads(), "command": shlex.join(sys.argv if argv is None else argv)}


def describe_provenance(record):
    """One line: 'code 1a2b3c4d (uncommitted changes), torch 2.14.1, ... , 2 threads'."""
    code = record["code"]
    if code["commit"] is None:
        described = f"code: {code['note']}"
    else:
        described = f"code {code['commit'][:10]}" + (" (uncommitted changes)" if code["dirty"] else "")
    versions = ", ".join(f"{name} {version}" for name, version in record["versions"].items() if version)
    return f"{described}; {versions}; {record['device_name']}, {record['threads']} threads"
