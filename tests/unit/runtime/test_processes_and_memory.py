"""runtime/processes.py and runtime/memory.py: launched processes form one run; peak memory of a block."""

from __future__ import annotations

import pytest
import torch

from llmneo.errors import ConfigError
from llmneo.runtime.memory import PeakMemory, process_memory
from llmneo.runtime.processes import check_processes, shard_cpu_processes


def test_launched_processes_must_share_one_world(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_processes(2)
    with pytest.raises(ConfigError, match=r"2 processes were launched but each sees a world of 1.*ACCELERATE_USE_CPU"):
        check_processes(1)
    monkeypatch.delenv("WORLD_SIZE")
    check_processes(1)


@pytest.mark.parametrize(("kind", "env", "sharded"), [("MULTI_CPU", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, True),
                                                     ("MULTI_CPU", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, False),
                                                     ("MULTI_CPU", {}, False),
                                                     ("FSDP", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, False)])
def test_fsdp2_is_turned_on_only_for_cpu_processes_launched_with_it(monkeypatch, kind, env, sharded):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    state = SimpleNamespace(distributed_type=DistributedType[kind], fsdp_plugin=None)
    assert shard_cpu_processes(SimpleNamespace(state=state)) == sharded
    assert (state.distributed_type == DistributedType.FSDP) == (sharded or kind == "FSDP")
    assert (state.fsdp_plugin is not None and state.fsdp_plugin.fsdp_version == 2) == sharded


def test_the_peak_of_a_block_counts_a_large_allocation():
    size = 256 * 1024 * 1024
    with PeakMemory(cuda=False) as memory:
        block = torch.ones(size // 4, dtype=torch.float32)
        del block
    assert memory.extra_bytes >= 0.9 * size
    assert process_memory("VmHWM") >= memory.peak_bytes
