"""Where a loop's time goes: seconds spent waiting for the data loader against the rest (compute), and
the peak memory, in the manner of torchvision's references/classification/utils.py MetricLogger."""
import sys
import time

import torch


class TimedIterable:
    """Iterates `iterable`, adding the seconds each next() waited to `wait_seconds`."""

    def __init__(self, iterable):
        self.iterable = iterable
        self.wait_seconds = 0.0

    def __len__(self):
        return len(self.iterable)

    def __iter__(self):
        iterator = iter(self.iterable)
        while True:
            started = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            self.wait_seconds += time.perf_counter() - started
            yield item


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device):
    """CUDA: the peak of memory allocated on `device` since reset_peak_memory. CPU: the process's peak
    resident set size (never reset), or None where the platform does not report it."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux kilobytes
