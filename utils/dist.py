"""Multi-process training with torch.distributed, launched by torchrun (NCCL on CUDA, gloo on CPU).

Without torchrun's environment everything here degrades to a single process: rank 0 of 1.
"""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .checkpoint import content_digest


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def launched_by_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_distributed(device_type):
    """Join the process group torchrun set up; a plain `python retrieval.py` stays single-process."""
    if not launched_by_torchrun():
        return DistContext()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistContext(rank, world_size, local_rank)


def shutdown(context):
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context):
    if context.enabled:
        dist.barrier()


def broadcast_object(context, obj):
    """Rank 0's `obj` on every rank."""
    if not context.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_true(context, flag, device):
    """Whether `flag` holds on every rank (one tiny all-reduce)."""
    if not context.enabled:
        return bool(flag)
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def sum_over_ranks(context, values, device):
    """Element-wise sums of a list of numbers over all ranks (float64)."""
    if not context.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def shard_bounds(num_items, batch_size, context):
    """[start, stop) of this rank's contiguous shard, cut at multiples of batch_size.

    Cutting at batch boundaries makes every rank see exactly the batches a single process would,
    so distributed evaluation reproduces single-process codes.
    """
    batches = -(-num_items // batch_size)
    per_rank = -(-batches // context.world_size)
    start = min(context.rank * per_rank * batch_size, num_items)
    return start, min(start + per_rank * batch_size, num_items)


def gather_rows(context, rows, device):
    """Concatenate every rank's (n_r, d) float32 CPU tensor in rank order.

    Ranks may hold different n_r; a rank with nothing passes an empty (0, 0) tensor.
    """
    if not context.enabled:
        return rows
    shape = torch.tensor(rows.shape, dtype=torch.int64, device=device)
    shapes = [torch.zeros(2, dtype=torch.int64, device=device) for _ in range(context.world_size)]
    dist.all_gather(shapes, shape)
    counts = [int(s[0].item()) for s in shapes]
    width = int(max(s[1].item() for s in shapes))
    padded = torch.zeros((max(counts), width), dtype=torch.float32, device=device)
    if len(rows):  # an empty (0, 0) tensor has no width to copy into the (0, width) rows
        padded[:len(rows)] = rows.to(device, torch.float32)
    parts = [torch.empty_like(padded) for _ in range(context.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts)]).cpu()


def sync_buffers(context, module):
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank, so all ranks hold one model."""
    if context.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def state_fingerprint(module):
    """SHA-256 of every parameter and buffer (content_digest), to check that ranks hold the same model."""
    return content_digest(module.state_dict())


def gather_objects(context, obj):
    if not context.enabled:
        return [obj]
    gathered = [None] * context.world_size
    dist.all_gather_object(gathered, obj)
    return gathered
