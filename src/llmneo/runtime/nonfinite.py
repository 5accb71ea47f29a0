"""The non-finite guard (``--nonfinite_policy stop|skip``): an optimizer step runs only when its loss and gradients
are finite; otherwise the step is skipped and counted, or training stops naming the step and its training rows."""

from __future__ import annotations

import logging

import torch

from ..errors import NonFiniteError

logger = logging.getLogger(__name__)


class NonFiniteGuard:
    """Watches each micro-batch's loss (without a device sync) and guards the optimizer's step."""

    def __init__(self, policy: str = "stop", max_bad_steps: int = 10):
        self.policy, self.max_bad_steps, self.bad_steps = policy, max_bad_steps, 0
        self._finite, self._rows = True, []

    def observe(self, loss: torch.Tensor, row_ids: torch.Tensor | None = None) -> None:
        """Note one micro-batch of the current step: its loss and, when known, its training rows."""
        self._finite = torch.isfinite(loss).all() & self._finite  # a tensor: no sync per micro-batch
        if row_ids is not None:
            self._rows.append(row_ids.detach())

    def guard(self, optimizer_step, model: torch.nn.Module, device, next_step):
        """``optimizer_step`` wrapped: run when finite, else apply the policy (``next_step()`` names the step)."""
        if getattr(optimizer_step, "_guarded", False):
            return optimizer_step

        def guarded(*args, **kwargs):
            if self._step_is_finite(model, device):
                return optimizer_step(*args, **kwargs)
            self._bad_step(next_step())
            model.zero_grad(set_to_none=True)
            return None

        guarded._guarded = True
        return guarded

    def _step_is_finite(self, model, device) -> bool:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        sharded = any(hasattr(grad, "to_local") for grad in grads)  # FSDP2: each process holds a shard
        checks = [torch.isfinite(grad.to_local() if hasattr(grad, "to_local") else grad).all() for grad in grads]
        finite = torch.stack([torch.as_tensor(self._finite, device=device), *checks]).all().to(torch.int32)
        if sharded and torch.distributed.is_initialized():  # a NaN in one shard must stop every process's step
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        finite = bool(finite)
        self._rows_of_step = torch.cat(self._rows).tolist() if self._rows else []
        self._finite, self._rows = True, []
        return finite

    def _bad_step(self, step: int) -> None:
        self.bad_steps += 1
        where = f"step {step} (training rows {self._rows_of_step})"
        if self.policy == "stop" or self.bad_steps > self.max_bad_steps:
            raise NonFiniteError(f"non-finite loss or gradient at {where}; {self.bad_steps} bad step(s) in this "
                                 f"run (policy {self.policy}, max_bad_steps {self.max_bad_steps})")
        logger.warning("non-finite loss or gradient at %s: update skipped (%d of at most %d)", where,
                       self.bad_steps, self.max_bad_steps)


def check_finite_rows(values: torch.Tensor, rows: torch.Tensor, what: str) -> None:
    """``values``: (N, V) logits of N answer positions; ``rows[i]``: the data row position i belongs to. Non-finite
    logits would make a KL or a cached distribution silently wrong: name the rows instead."""
    finite = torch.isfinite(values).all(-1)
    if not bool(finite.all()):
        bad = sorted(set(rows[~finite].tolist()))
        raise NonFiniteError(f"{what} are not finite (NaN or inf) at {int((~finite).sum())} answer positions of "
                             f"rows {bad[:20]}{' ...' if len(bad) > 20 else ''}")
