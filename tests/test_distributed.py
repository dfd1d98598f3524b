"""torchrun with two CPU processes (gloo): DDP training, rank-0-only files, and evaluation that
matches a single-process run of the same checkpoint, with splits so small that rank 1 gets no batch."""
import subprocess
import sys
from pathlib import Path

import numpy as np

import retrieval
from tests.fixture_files import write_list_folder
from utils.dist import DistContext, shard_bounds
from utils.runlog import read_run_log

ROOT = Path(__file__).resolve().parents[1]


def test_torchrun_two_processes(tmp_path):
    # 3 queries and 16 database items in batches of 20: one batch each, so rank 1's shards are empty
    rows = [(f"images/{i:02d}.png", [int(i % 3 == 0), int(i % 2 == 0), int(i % 3 != 0)]) for i in range(19)]
    write_list_folder(tmp_path / "data", {"train.txt": rows[:16], "database.txt": rows[:16], "test.txt": rows[16:]})
    out = tmp_path / "out"
    run = ["--dataset", "list", "--data_root", str(tmp_path / "data"), "--backbone", "small", "--hash_bit", "16",
           "--batch_size", "20", "--workers", "0", "--device", "cpu", "--output_dir", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "retrieval.py",
         *run, "--epochs", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("best mAP@16") == 1  # only rank 0 prints

    record = read_run_log(out / "list_small_16.jsonl")
    assert record["world_size"] == 2 and record["finished"]
    first, second = record["rank_fingerprints"]
    assert first == second  # both ranks hold the same parameters and buffers
    assert sorted(p.name for p in out.iterdir()) == [
        "list_small_16.ckpt", "list_small_16.codes.npz", "list_small_16.jsonl", "list_small_16.last.pt",
        "list_small_16.metrics.json", "list_small_16.txt"]

    # A single process re-encodes the checkpoint (the distributed run's codes are moved out of its way).
    distributed_codes = out / "list_small_16.codes.npz"
    distributed = dict(np.load(distributed_codes.rename(tmp_path / "distributed.npz")))
    assert distributed["query_bits"].shape[0] == 3 and distributed["database_bits"].shape[0] == 16
    single = retrieval.main(retrieval.get_args_parser().parse_args(run + ["--test"]))
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
