"""Where the frozen teacher lives under each distributed engine, prepared for inference only (no optimizer state,
never saved): replicated under DDP and ZeRO-1/2, sharded under ZeRO-3 and FSDP2 like the student."""

from __future__ import annotations

import logging

from ..models.loading import is_quantized

logger = logging.getLogger(__name__)


def place_teacher(teacher, accelerator):
    """The teacher ready for forward passes on this process."""
    if is_quantized(teacher):  # bitsandbytes placed it when loading
        return teacher
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3:
        return _deepspeed_zero3_for_inference(teacher, plugin)
    if getattr(accelerator, "is_fsdp2", False):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        logger.info("sharding the teacher with FSDP2 for inference")
        return fsdp2_prepare_model(accelerator, teacher).eval()
    return teacher.to(accelerator.device)


def _deepspeed_zero3_for_inference(teacher, plugin):
    """A ZeRO-3 engine without optimizer: each rank holds a partition, gathered layer by layer in forward."""
    import deepspeed

    config = plugin.deepspeed_config
    hidden = getattr(teacher.config, "hidden_size", None)
    zero = {"stage": 3, "stage3_param_persistence_threshold": 10 * hidden if hidden else "auto",
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden) if hidden else "auto"}
    inference = {"zero_optimization": zero, "train_micro_batch_size_per_gpu": config.get(
        "train_micro_batch_size_per_gpu", 1), "bf16": config.get("bf16", {"enabled": False}),
        "fp16": config.get("fp16", {"enabled": False})}
    logger.info("partitioning the teacher with DeepSpeed ZeRO-3 for inference")
    engine, *_ = deepspeed.initialize(model=teacher, config=inference)
    engine.eval()
    return engine
