"""Processes started by a launcher (accelerate launch, torchrun) must form one distributed run."""

from __future__ import annotations

import os

from ..errors import ConfigError


def check_processes(world_size: int) -> None:
    """Refuse launched processes that each see a world of their own: each would train alone into the same run
    directory."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and world_size != launched:
        raise ConfigError(
            f"{launched} processes were launched but each sees a world of {world_size}: they do not form one "
            "distributed run. On a machine without GPUs set ACCELERATE_USE_CPU=true (gloo); on GPUs check the "
            "accelerate config")


def shard_cpu_processes(accelerator) -> bool:
    """FSDP2 across CPU processes (gloo). `accelerate launch` with the FSDP2 config sets ACCELERATE_USE_FSDP and
    FSDP_VERSION=2 for every process, but accelerate (to 1.16) turns FSDP on only for accelerator devices, so CPU
    processes would silently fall back to replicated DDP. PyTorch's fully_shard runs on CPU: turn accelerate's own
    FSDP2 path on for them, with the plugin read from the launcher's environment as on GPUs. True when it did."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and os.environ.get("FSDP_VERSION") == "2"
    if not asked or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    state.fsdp_plugin = FullyShardedDataParallelPlugin()
    state.distributed_type = DistributedType.FSDP
    return True
