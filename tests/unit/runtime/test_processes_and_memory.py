"""runtime/processes.py and runtime/memory.py: launched processes form one run; peak memory of a block."""

from __future__ import annotations

import pytest
import torch

from llmneo.errors import ConfigError
from llmneo.runtime.memory import PeakMemory, process_memory
from llmneo.runtime.processes import check_processes


def test_launched_processes_must_share_one_world(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_processes(2)
    with pytest.raises(ConfigError, match=r"2 processes were launched but each sees a world of 1.*ACCELERATE_USE_CPU"):
        check_processes(1)
    monkeypatch.delenv("WORLD_SIZE")
    check_processes(1)


def test_the_peak_of_a_block_counts_a_large_allocation():
    size = 256 * 1024 * 1024
    with PeakMemory(cuda=False) as memory:
        block = torch.ones(size // 4, dtype=torch.float32)
        del block
    assert memory.extra_bytes >= 0.9 * size
    assert process_memory("VmHWM") >= memory.peak_bytes
