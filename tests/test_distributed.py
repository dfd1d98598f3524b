"""torchrun with two CPU processes (gloo): DDP training, rank-0-only files, and evaluation that
matches a single-process run of the same checkpoint."""
import subprocess
import sys
from pathlib import Path

import numpy as np

import retrieval
from utils.dist import DistContext, shard_bounds
from utils.runlog import read_run_log

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--dataset", "digits", "--backbone", "small", "--hash_bit", "16", "--subset", "200",
       "--batch_size", "20", "--device", "cpu"]


def test_torchrun_two_processes(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "retrieval.py",
         *RUN, "--epochs", "1", "--output_dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("best mAP@200") == 1  # only rank 0 prints

    record = read_run_log(tmp_path / "digits_small_16.jsonl")
    assert record["world_size"] == 2 and record["finished"]
    first, second = record["rank_fingerprints"]
    assert first == second  # both ranks hold the same parameters and buffers
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "digits_small_16.ckpt", "digits_small_16.codes.npz", "digits_small_16.jsonl", "digits_small_16.last.pt",
        "digits_small_16.metrics.json", "digits_small_16.txt"]

    # A single process re-encodes the checkpoint (the distributed run's codes are moved out of its way).
    distributed_codes = tmp_path / "digits_small_16.codes.npz"
    distributed = dict(np.load(distributed_codes.rename(tmp_path / "distributed.npz")))
    single = retrieval.main(retrieval.get_args_parser().parse_args(RUN + ["--output_dir", str(tmp_path), "--test"]))
    assert single["map"] == record["best"]["map"]
    assert not single["metrics"]["run"]["codes_from_cache"]
    reencoded = np.load(distributed_codes)
    for name in ("query_bits", "database_bits"):
        np.testing.assert_array_equal(reencoded[name], distributed[name])


def test_shards_cover_the_dataset_at_batch_boundaries():
    for items, batch, world in [(200, 20, 2), (105, 10, 4), (7, 20, 3), (0, 5, 2)]:
        bounds = [shard_bounds(items, batch, DistContext(rank, world)) for rank in range(world)]
        covered = [i for start, stop in bounds for i in range(start, stop)]
        assert covered == list(range(items))
        assert all(start % batch == 0 for start, stop in bounds if stop > start)
