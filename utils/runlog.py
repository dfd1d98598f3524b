"""How a run reports: printing on rank 0 only, progress bars, and the run's files and append-only logs.

- setup_for_distributed(is_main, progress): called once per process. print() is silenced on every rank
  but 0 (as torchvision's references do); print(..., force=True) still prints. Progress bars are off on
  other ranks, with --no_progress, and whenever stderr is not a terminal.
- RunLog: {run}.txt (every line the run printed about itself, for people) and {run}.jsonl (one JSON
  object per event, for scripts and plots), both appended to as the run goes, so a run that dies leaves
  every finished epoch on record. read_run_log() folds the events back into one record.
"""
import builtins
import datetime
import json
import sys

from tqdm import tqdm

from .errors import UserError
from .documents import parse_json
from .paths import open_regular

MAX_EVENT_LOG_BYTES = 64 << 20  # a 100-epoch run writes ~50 kB
MAX_EVENT_BYTES = 8 << 20  # one event (a line); the start event holds the flags and the --config file (1 MiB)

_progress_enabled = True


_print_enabled = True


def rank_zero_print(*args, force=False, **kwargs):
    """builtins.print after setup_for_distributed: prints on the main process only, or with force=True.
    A module-level function (not a closure), so libraries that look builtins up by module and name, as
    numba does when it is imported, find it."""
    if _print_enabled or force:
        rank_zero_print.builtin_print(*args, **kwargs)


rank_zero_print.builtin_print = builtins.print


def setup_for_distributed(is_main, progress=True):
    """print() only on the main process (force=True overrides); progress bars per `progress`."""
    global _progress_enabled, _print_enabled
    _progress_enabled = is_main and progress
    _print_enabled = is_main
    if builtins.print is not rank_zero_print:
        rank_zero_print.builtin_print = getattr(builtins.print, "builtin_print", builtins.print)
        builtins.print = rank_zero_print


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar that disappears when done; off per setup_for_distributed and when stderr is no terminal."""
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=None if _progress_enabled else True, **kwargs)


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


class RunLog:
    """The run's printed lines and events, appended to {run}.txt and {run}.jsonl (when enabled)."""

    def __init__(self, files, enabled=True):
        self.files = files
        self.enabled = enabled

    def start(self, record, resumed_after=None, best=None):
        """Begin the logs with the run's record (args, sizes, settings). A new run replaces the previous
        run's logs; a resumed run appends to them, and its "resume" event drops the epochs logged after
        `resumed_after` (they were not saved in the training state)."""
        now = datetime.datetime.now().isoformat(timespec="seconds")
        if resumed_after is None or not self.enabled or not self.files.event_log.exists():
            if self.enabled:
                for path in (self.files.text_log, self.files.event_log):
                    path.write_text("")
            self.event("start", **record, time=now)
        if resumed_after is not None:
            self.event("resume", **record, resumed_after=resumed_after, best=best, time=now)

    def say(self, text, file=None):
        """Print a line (on rank 0) and keep it in {run}.txt."""
        print(text, file=file)
        self._append(self.files.text_log, text)

    def event(self, kind, **fields):
        self._append(self.files.event_log, json.dumps({"event": kind, **fields}))

    def _append(self, path, line):
        if self.enabled:
            try:
                with open(path, "a") as handle:
                    handle.write(line + "\n")
            except OSError as exc:  # a full disk: one line, not a traceback (the lines before it are kept)
                raise UserError(f"could not write {path} ({exc.strerror or exc}); free disk space or choose another "
                                "--output_dir") from None


def read_run_log(path):
    """One record from a {run}.jsonl event log: the start event's fields, "epochs" (the entries of the
    epochs in effect: a resume drops those after its epoch), "best", "finished" and "train_seconds".
    An unreadable line (a run killed while writing it, or damage: not UTF-8, not a JSON object, longer than
    MAX_EVENT_BYTES or nested deeper than utils.documents allows, a resume or epoch event without its epoch number)
    is ignored; the values themselves are the reader's to check. The log is streamed a line at a time.
    UserError when the log is missing, not a regular file or over MAX_EVENT_LOG_BYTES."""
    record = {"epochs": [], "best": None, "finished": False, "train_seconds": 0.0}
    with open_regular(path, "event log", MAX_EVENT_LOG_BYTES) as handle:  # a FIFO or a device would block or never end
        for event in _events(handle, path):
            _fold_event(record, event)
    return record


def _events(handle, path):
    """The JSON objects of an event log's lines, skipping unreadable ones."""
    while line := handle.readline(MAX_EVENT_BYTES + 1):
        if len(line) > MAX_EVENT_BYTES:  # skip the rest of an overlong line without holding it
            while not line.endswith(b"\n") and (line := handle.readline(MAX_EVENT_BYTES)):
                pass
            continue
        try:
            event = parse_json(line.decode("utf-8", errors="replace"), f"event log {path}")
        except UserError:
            continue
        if isinstance(event, dict):
            yield event


def _fold_event(record, event):
    kind = event.pop("event", None)
    if kind in ("resume", "epoch") and not isinstance(event.get("resumed_after" if kind == "resume" else "epoch"), int):
        return
    if kind == "start":
        record.update(event)
    elif kind == "resume":
        resumed_after = event.pop("resumed_after")
        record.update(event)
        record["epochs"] = [e for e in record["epochs"] if e["epoch"] <= resumed_after]
    elif kind == "epoch":
        record["epochs"].append(event)
        record["train_seconds"] = event.get("train_seconds")
    elif kind == "best":
        record["best"] = event
    elif kind == "finish":
        record.update(event, finished=True)
