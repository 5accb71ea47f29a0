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
