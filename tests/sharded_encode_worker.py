"""`python -m hashing.encode` as one process of a torchrun job that is cut short, for tests/test_stream_sharded.py:
the process of rank STOP_RANK dies (os._exit, as if killed) before its batch number STOP_AFTER + 1, and every
process saves the progress record after each batch.

    torchrun --nproc_per_node 2 -m tests.sharded_encode_worker STOP_RANK STOP_AFTER [hashing.encode flags]
"""
import os
import sys

from hashing import encode
from hashing.search import stream


def stop_after(rank, batches):
    packed, done = stream._packed_batch, []

    def packed_or_die(*args):
        if int(os.environ["RANK"]) == rank and len(done) == batches:
            os._exit(3)
        done.append(True)
        return packed(*args)
    stream._packed_batch = packed_or_die


if __name__ == "__main__":
    stream.PROGRESS_SECONDS = 0.0
    stop_after(int(sys.argv[1]), int(sys.argv[2]))
    encode.cli(sys.argv[3:])
