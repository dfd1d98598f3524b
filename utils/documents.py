"""The one reader of the JSON and YAML files a run reads back (README, Threat model): the run log, .metrics.json,
the codes cache's key, index headers, the encoding progress record, the image cache's truncated.json, saved
splits and recipe files.

A file is read under the reader rule of utils/paths (a regular file, a size cap), then its nesting depth is
measured before it is parsed: a line of `[` x 100,000 would otherwise end the parser in a RecursionError, which is
no ValueError and so escaped every caller. Anything unreadable is a UserError naming the file and what to do.
"""
import json

import numpy as np
import yaml

from .errors import UserError
from .paths import MiB, read_text_file

# The files of this project nest a handful of levels; parsers recurse once a level (Python's limit is 1,000).
MAX_NESTING = 64
MAX_METRICS_BYTES = 16 << 20  # a run's .metrics.json (a few hundred kB at most)
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'"[]{}')))  # what the depth scan deletes
_SCAN_CHUNK = 1 << 20


def nesting_depth(text):
    """How deep the brackets of JSON (or flow-style YAML) text nest outside double-quoted strings: a linear scan in
    bounded memory (C-speed byte operations, then numpy). Escaped backslashes and quotes are dropped first (pairs
    from the left, as a parser reads them), then everything but quotes and brackets; a bracket after an odd number
    of quotes is inside a string. Stray closing brackets can only lower the figure where a parser stops anyway."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    data = data.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    marks = np.frombuffer(data, dtype=np.uint8)
    depth = peak = quotes = 0
    for start in range(0, len(marks), _SCAN_CHUNK):
        part = marks[start:start + _SCAN_CHUNK]
        is_quote = part == ord('"')
        outside = (np.cumsum(is_quote) + quotes) % 2 == 0
        steps = outside & ((part == ord("[")) | (part == ord("{")))
        running = np.cumsum(steps.astype(np.int8) - (outside & ((part == ord("]")) | (part == ord("}")))),
                            dtype=np.int64) + depth
        peak, depth, quotes = max(peak, int(running.max())), int(running[-1]), quotes + int(is_quote.sum())
    return peak


def check_nesting(text, what, fix):
    """UserError when `text` nests deeper than MAX_NESTING."""
    depth = nesting_depth(text)
    if depth > MAX_NESTING:
        raise UserError(f"{what} is unreadable (it nests {depth:,} levels deep, more than the {MAX_NESTING} any file "
                        f"of this project holds: it is damaged or crafted); {fix}")


def parse_json(text, what, fix="restore it or delete it"):
    """The value of JSON `text` (str or bytes); UserError naming `what` (the file) and `fix` when it nests too
    deep or is not JSON."""
    check_nesting(text, what, fix)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise UserError(f"{what} is unreadable (not JSON: {reason}); {fix}") from None


def read_json_file(path, what, max_bytes, missing="check the path", fix="restore it or delete it"):
    """The value of the JSON file at `path`: a regular file of at most `max_bytes` (utils.paths.read_text_file),
    nested at most MAX_NESTING deep; UserError naming `what`, the file and `fix` otherwise."""
    return parse_json(read_text_file(path, what, max_bytes, missing), f"{what} {path}", fix)


def load_yaml(text, what, loader=yaml.SafeLoader, fix="correct it"):
    """The value of YAML `text` under `loader` (a SafeLoader); UserError naming `what` for text that is not YAML or
    nests too deep (flow brackets are measured before parsing; block nesting is cut short by the parser's own
    recursion, which is caught)."""
    check_nesting(text, what, fix)
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 (a SafeLoader or subclass)
    except RecursionError:
        raise UserError(f"{what} is unreadable (it nests deeper than Python's recursion limit: it is damaged or "
                        f"crafted); {fix}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(exc, "problem", None) or exc
        raise UserError(f"{what} is not valid YAML{line}: {problem}") from None


def holds_json_object_with(path, keys, max_bytes=64 * MiB):
    """Whether `path` holds a JSON object with every one of `keys`: how a writer recognises its earlier output."""
    try:
        value = read_json_file(path, "file", max_bytes)
    except UserError:
        return False
    return isinstance(value, dict) and all(key in value for key in keys)
