"""Issue 30, the harnesses and the docs: a long-tail study continued with more epochs, `reproduce` without the
data, `digits_study --collect` with nothing run, `bench_search` without --methods, and the pair losses' memory of
the training set's codes (DeepHash-pytorch's DPSH and DHN)."""
import json

import pytest

import retrieval
from benchmarks import longtail_study
from session.files import RunFiles


# ============ 10b: the long-tail study continued with other --epochs ============

def finish_like_a_run(args):
    """What a finished retrieval.py run leaves that the study reads: its event log (the start event records the
    args as the run saw them, `resume` included) and its metrics."""
    files = RunFiles.for_args(args)
    files.event_log.parent.mkdir(parents=True, exist_ok=True)
    events = [{"event": "start", "args": vars(args)},
              {"event": "epoch", "epoch": args.epochs, "map": 0.5, "train_seconds": 1.0},
              {"event": "best", "map": 0.5, "epoch": args.epochs},
              {"event": "finish", "test_map": 0.5}]
    files.event_log.write_text("".join(json.dumps(event) + "\n" for event in events))
    files.metrics.write_text(json.dumps({"map": 0.5, "long_tail": {"buckets": {"tail": {"map": 0.25}}}}))


def test_a_long_tail_cell_resumed_with_more_epochs_counts_as_done(tmp_path, monkeypatch, capsys):
    options = longtail_study.get_args_parser().parse_args(["--studies", "hpl", "--seeds", "0", "--epochs", "2",
                                                           "--output_dir", str(tmp_path)])
    first = longtail_study.cell_args(options, "hpl", "HyP² (no hierarchy)", 1.0, 0)
    state = RunFiles.for_args(first).last
    state.parent.mkdir(parents=True)
    state.write_bytes(b"state")  # the training state an earlier `--epochs 1` study left
    monkeypatch.setattr(retrieval, "main", finish_like_a_run)
    assert longtail_study.main(["--studies", "hpl", "--seeds", "0", "--epochs", "2", "--output_dir",
                                str(tmp_path)]) == []
    out = capsys.readouterr().out
    assert out.count("mAP 0.5000, tail 0.2500") == 4 and "4/4 cells done" in out
    assert "| HyP² (no hierarchy) | 0.5000 | 0.2500 | 1 |" in (tmp_path / "longtail_study.md").read_text()
