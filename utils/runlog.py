"""The record of a run: result/{run}.txt for people and result/{run}.json for scripts and plots.

Both files are rewritten atomically after every epoch, so a run that dies leaves complete files that
describe every finished epoch.
"""
import datetime
from pathlib import Path

from .atomic import write_json, write_text


class RunLog:
    def __init__(self, prefix, args, info=None, enabled=True):
        """prefix: path without suffix (result/voc2007_googlenet_48); args: the run's flags."""
        self.prefix = Path(prefix)
        self.enabled = enabled
        self.lines = []
        self.record = {
            "args": dict(args),
            **(info or {}),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "epochs": [],
            "best": None,
            "train_seconds": 0.0,
            "finished": False,
        }

    @property
    def text_path(self):
        return self.prefix.with_suffix(".txt")

    @property
    def json_path(self):
        return self.prefix.with_suffix(".json")

    def line(self, text):
        self.lines.append(text)

    def epoch(self, epoch, loss, lr, train_seconds, map_at_k=None):
        entry = {"epoch": epoch, "loss": loss, "lr": lr, "train_seconds": train_seconds}
        if map_at_k is not None:
            entry["map"] = map_at_k
        self.record["epochs"].append(entry)
        self.record["train_seconds"] = train_seconds

    def best(self, map_at_k, epoch, checkpoint):
        self.record["best"] = {"map": map_at_k, "epoch": epoch, "checkpoint": checkpoint}

    def finish(self):
        self.record["finished"] = True
        self.save()

    def save(self):
        if not self.enabled:
            return
        write_json(self.json_path, self.record)
        write_text(self.text_path, "\n".join(self.lines) + "\n")
