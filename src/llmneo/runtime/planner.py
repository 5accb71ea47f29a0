"""`--auto_micro_batch`: the largest micro-batch that fits, found by a short probe, at unchanged rows per step.

The probe runs the real loss forward and backward on the longest training rows at micro-batch sizes that divide
the rows of one optimizer step per device (micro-batch × accumulation), smallest first, and keeps the largest
whose peak memory stays within the budget (90% of the GPU, or of the memory available on CPU, unless given).
Gradient accumulation is then set so that an optimizer step sees the same rows as before: the loss, normalised
by the answer tokens of the whole step, is unchanged; only speed and memory move. Optimizer states are created
at the first step, after the probe, so the budget keeps a margin.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import torch

from .memory import PeakMemory, process_memory

logger = logging.getLogger(__name__)

BUDGET_FRACTION = 0.9


@dataclass
class MicroBatchPlan:
    micro_batch: int
    accumulation: int
    tokens_per_micro_batch: int
    peak_bytes: int
    probed: dict  # micro-batch -> peak bytes (None: out of memory)


def memory_budget(budget_gib: float | None) -> int:
    if budget_gib is not None:
        return int(budget_gib * 2**30)
    if torch.cuda.is_available():
        return int(BUDGET_FRACTION * torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    return int(BUDGET_FRACTION * available) + process_memory("VmRSS")


def _probe(trainer, rows: list[dict]) -> int | None:
    """Peak bytes of one forward and backward of the loss on ``rows``; None when it runs out of memory."""
    batch = {key: value.to(trainer.args.device) for key, value in trainer.data_collator(rows).items()}
    model = trainer.model
    model.train()
    try:
        with PeakMemory() as memory:
            trainer.compute_loss(model, batch).backward()
    except torch.OutOfMemoryError:
        return None
    finally:
        model.zero_grad(set_to_none=True)
        trainer.reset_loss_terms()  # the probe is not training
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return memory.peak_bytes


def plan_micro_batch(trainer, dataset, budget_gib: float | None = None) -> MicroBatchPlan:
    """Probe, choose, and set the trainer's micro-batch and accumulation."""
    args = trainer.args
    step_rows = args.per_device_train_batch_size * args.gradient_accumulation_steps
    longest = sorted(range(len(dataset)), key=lambda i: -len(dataset[i]["input_ids"]))
    budget, probed, chosen = memory_budget(budget_gib), {}, None
    for size in (size for size in range(1, step_rows + 1) if step_rows % size == 0):
        rows = [dataset[longest[i % len(longest)]] for i in range(size)]
        peak = _probe(trainer, rows)
        probed[size] = peak
        if peak is None or peak > budget:
            break
        chosen = (size, peak, sum(len(row["input_ids"]) for row in rows))
    if chosen is None:
        raise torch.OutOfMemoryError(f"auto_micro_batch: even one row of {len(dataset[longest[0]]['input_ids'])} "
                                     f"tokens needs more than the {budget / 2**30:.1f} GiB budget")
    size, peak, tokens = chosen
    trainer.set_micro_batch(size, step_rows // size)
    plan = MicroBatchPlan(size, step_rows // size, tokens, peak, probed)
    logger.info("auto_micro_batch: micro-batch %d x accumulation %d (%d tokens per micro-batch, peak %.2f GiB of a "
                "%.2f GiB budget; probed %s)", size, plan.accumulation, tokens, peak / 2**30, budget / 2**30,
                {k: (f"{v / 2**30:.2f} GiB" if v else "out of memory") for k, v in probed.items()})
    return plan
