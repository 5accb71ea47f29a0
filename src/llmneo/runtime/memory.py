"""Peak memory of a block of code: CUDA max allocated on a GPU, the process's peak RSS on CPU."""

from __future__ import annotations

import gc
import logging
import resource
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


class PeakMemory:
    """Peak memory of a block: CUDA max allocated on a GPU, the process's peak RSS on CPU (reset at entry where
    Linux allows it, so each block is measured on its own). ``extra_bytes`` is the peak above the level at entry."""

    def __init__(self, cuda: bool | None = None):
        self.cuda = torch.cuda.is_available() if cuda is None else cuda  # False: measure the process on CPU

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_bytes = torch.cuda.memory_allocated()
        else:
            gc.collect()
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                logger.warning("cannot reset the peak RSS here: peaks are since the process started")
            self.start_bytes = process_memory("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            self.peak_bytes = process_memory("VmHWM")
        self.extra_bytes = self.peak_bytes - self.start_bytes


def process_memory(field: str) -> int:
    """A memory line of /proc/self/status in bytes (VmRSS: now, VmHWM: peak); the rusage peak where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
