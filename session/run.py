"""The Run: what one invocation of retrieval.py decided, once, and every stage reads.

Run.plan(args) decides from the flags whether this invocation trains (else --test, --query and
--export_index use the saved checkpoint) and whether it saves files (not --no_save), and names its
files; main adds the device, processes and backbone, and session.parts.prepare_run the data, K and loaders.
The dataclass is frozen: a stage that needs another decision (--test under other data settings saves
nothing) makes a new Run with dataclasses.replace, so no stage re-derives a decision from the flags.
"""
import argparse
from dataclasses import dataclass

import torch

from data import DatasetSpec, RetrievalSplits
from data.unseen import ClassSplit
from engine import Loaders
from hashing.evaluation.conventions import Convention
from network import BackboneSpec
from utils.dist import DistContext
from utils.runlog import RunLog

from .files import RunFiles


@dataclass(frozen=True)
class Run:
    args: argparse.Namespace  # the parsed command line
    files: RunFiles
    trains: bool  # train a network (else --test/--query/--export_index work with the saved checkpoint)
    saves: bool  # the run keeps files (not --no_save); the same on every process
    device: torch.device = torch.device("cpu")
    context: DistContext = DistContext()
    # ---- the data, set by session.parts.prepare_run ----
    spec: DatasetSpec = None
    splits: RetrievalSplits = None
    loaders: Loaders = None
    topk: int = 0  # K of mAP@K
    backbone: BackboneSpec = None  # the network's backbone, at --input_size (network.get_backbone)
    log: RunLog = RunLog(None, enabled=False)
    convention: Convention = Convention()  # how mAP@K is computed (--map_normalize, --zero_hit, --ties)
    validation: Loaders = None  # --select val: the validation queries and their database (train unused)
    validation_topk: int = 0  # K of the validation mAP: K clamped to the validation database
    class_split: ClassSplit = None  # --unseen_classes: the seen and unseen classes (data/unseen.py); None: all seen
    data_identity: dict = None  # what --resume checks the data against (session.training.data_identity)

    @classmethod
    def plan(cls, args):
        return cls(args=args, files=RunFiles.for_args(args), trains=not (args.test or args.query or args.export_index),
                   saves=not args.no_save)

    @property
    def writes(self):
        """This process writes the run's files: it saves, and it is the main process."""
        return self.saves and self.context.is_main

    @property
    def logs(self):
        """This process keeps the training logs ({run}.txt, {run}.jsonl)."""
        return self.writes and self.trains

    @property
    def input_size(self):
        """Side of the square images the network takes."""
        return self.backbone.input_size

    @property
    def select(self):
        return self.args.select

    @property
    def selection_score_name(self):
        """What --select compares: the validation mAP under --select val, else the test-query mAP."""
        return f"val mAP@{self.validation_topk}" if self.select == "val" else self.test_map_name

    @property
    def test_map_name(self):
        """What training reports of the test queries: map_name, by the seen classes under --unseen_classes."""
        return ("seen-class " if self.class_split is not None else "") + self.map_name

    @property
    def map_name(self):
        """'mAP@K', followed by the convention in brackets when it is not the paper's."""
        described = self.convention.describe()
        return f"mAP@{self.topk}" + (f" ({described})" if described else "")
