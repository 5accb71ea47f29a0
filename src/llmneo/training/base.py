"""DistillTrainerBase: what the token-level and the classification trainers share on top of transformers.Trainer.

It places the frozen teacher, reads the loss settings from ``args`` (NeoTrainingArguments), keeps the CE and KD
terms it logs, guards each optimizer step against non-finite values (runtime/nonfinite.py), marks checkpoints
complete before rotating older ones (runtime/checkpoints.py), and offers the public methods the planner and the
pipeline use instead of the Trainer's private state (which only trainer_hooks.py touches). Subclasses supply
``compute_loss`` and ``evaluate``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from ..config import NeoTrainingArguments
from ..losses.contract import LossParts, LossSettings
from ..runtime.checkpoints import checkpoint_step, mark_complete_and_rotate
from ..runtime.nonfinite import NonFiniteGuard
from ..teacher.placement import place_teacher
from .trainer_hooks import TrainerHooks
from ..runtime.layout import LOSS_SUM_FILE

TERMS = ("ce_loss", "kd_loss")

class DistillTrainerBase(TrainerHooks):
    """A Trainer whose loss joins CE on the labels and KD to a frozen teacher (CE only with ``teacher=None``).

    The loss of a micro-batch is its sum over trained items (answer tokens, or labelled texts) divided by those of
    the whole optimizer step (``num_items_in_batch``, counted by the Trainer across ranks), so it is already scaled
    for gradient accumulation.
    """

    loss_is_scaled_for_ga = True

    def __init__(self, *args, teacher=None, kd_vocab_size: int | None = None, eval_collator=None,
                 checkpoint_files: dict[str, bytes] | None = None, **kwargs):
        """``checkpoint_files``: name -> content written into every checkpoint before it is marked complete (the
        run's identity, the adapter kind)."""
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, NeoTrainingArguments):
            raise TypeError(f"{type(self).__name__} reads its distillation settings from NeoTrainingArguments, "
                            f"got {type(self.args).__name__}")
        self.teacher = place_teacher(teacher, self.accelerator) if teacher is not None else None
        self.loss_settings = LossSettings.from_args(self.args, kd_vocab_size)
        self.eval_collator = eval_collator or self.data_collator  # evaluation reads padded rows
        self.guard = NonFiniteGuard(self.args.nonfinite_policy, self.args.max_bad_steps)
        self.model_accepts_loss_kwargs = True  # our compute_loss uses num_items_in_batch whatever forward says
        self.checkpoint_files = dict(checkpoint_files or {})
        self._loss_sum_before = 0.0  # step losses summed by the run this one resumes
        self.reset_loss_terms()

    def parameters_sharded(self) -> bool:
        """Whether each process holds only a shard of the weights (FSDP, ZeRO-3): saving gathers them first."""
        plugin = self.accelerator.state.deepspeed_plugin
        return self.is_fsdp_enabled or (plugin is not None and plugin.zero_stage == 3)

    # ---- the terms of the loss, as logged ------------------------------------------------------------------------

    def reset_loss_terms(self) -> None:
        """Forget the CE/KD sums and tokens counted so far (e.g. after a probe that was not training)."""
        self._term_sums = dict.fromkeys(TERMS, 0.0)
        self._items_seen = 0  # this rank's, kept as a tensor until read
        self._term_last_step = 0

    def loss_terms(self) -> dict:
        """The CE and KD terms summed over the micro-batches trained since the last log."""
        return dict(self._term_sums)

    def record_loss(self, model, parts: LossParts, num_items_in_batch, items) -> torch.Tensor:
        """Add a training micro-batch's terms and ``items`` (what it trained on) to the sums; return the loss to
        back-propagate."""
        scale = self._rank_scale(num_items_in_batch)
        if model.training:  # kept as tensors: no device sync until the next log
            self._term_sums["ce_loss"] += parts.ce * scale
            self._term_sums["kd_loss"] += parts.kd * scale
            for key, value in parts.terms.items():  # e.g. each teacher's own term beside kd_loss
                self._term_sums[key] = self._term_sums.get(key, 0.0) + value * scale
            self._items_seen += items
        return parts.loss * scale

    def _rank_scale(self, num_items_in_batch) -> int:
        # DDP averages gradients over ranks while num_items counts every rank's tokens: undo the average.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            return self.accelerator.num_processes
        return 1

    def items_seen(self) -> int:
        """Items (answer tokens or texts) trained on so far, over all ranks."""
        seen = torch.as_tensor(self._items_seen, device=self.args.device)
        return int(self.accelerator.gather(seen).sum().item())

    def train(self, resume_from_checkpoint=None, **kwargs):
        """The Trainer's train(); after a resume, ``train_loss`` covers every step of the run, not only the resumed
        part (the step losses summed before are read from the checkpoint)."""
        self._loss_sum_before = _read_loss_sum(resume_from_checkpoint)
        if isinstance(resume_from_checkpoint, (str, Path)):  # the first log after it averages its own steps only
            self._term_last_step = checkpoint_step(resume_from_checkpoint)
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        if self._loss_sum_before:  # the same condition as the logged summary's (log)
            output = output._replace(training_loss=self._run_train_loss(),
                                     metrics={**output.metrics, "train_loss": self._run_train_loss()})
        return output

    def _loss_sum(self) -> float:
        """Step losses summed over the whole run so far (this process's share of the last, unlogged steps)."""
        return self._loss_sum_before + self.logged_loss_sum()

    def _run_train_loss(self) -> float:
        return (self._loss_sum_before + self.logged_steps_loss()) / max(self.state.global_step, 1)

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "train_loss" in logs and self._loss_sum_before:  # the end-of-train summary of a resumed run
            logs["train_loss"] = self._run_train_loss()
        if "loss" in logs and self.model.training:
            steps = max(self.state.global_step - self._term_last_step, 1)
            for key, total in self._term_sums.items():
                value = torch.as_tensor(total, dtype=torch.float32, device=self.args.device) / steps
                logs[key] = significant(self.accelerator.gather(value).mean().item())
                self._term_sums[key] = 0.0
            self._term_last_step = self.state.global_step
        super().log(logs, *args, **kwargs)

    def log_evaluation(self, metrics: dict, prefix: str) -> dict:
        metrics = {f"{prefix}_{key}": significant(value) for key, value in metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ---- steps: the non-finite guard ------------------------------------------------------------------------------

    @property
    def bad_steps(self) -> int:
        """Optimizer steps skipped for non-finite values (policy skip)."""
        return self.guard.bad_steps

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.guard.observe(loss, inputs.get("row_id"))
        return loss

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        optimizer.step = self.guard.guard(optimizer.step, self.model, self.args.device,
                                          lambda: self.state.global_step + 1)
        return optimizer

    # ---- checkpoints ---------------------------------------------------------------------------------------------

    def after_checkpoint(self, run_dir: Path, save_total_limit: int | None) -> None:
        """The checkpoint's extra files and completion marker, and only then the rotation of older checkpoints."""
        loss_sum = json.dumps({"step": self.state.global_step, "loss_sum": self._loss_sum()}).encode()
        mark_complete_and_rotate(run_dir, self.state.global_step, save_total_limit, self.state.best_model_checkpoint,
                                 {**self.checkpoint_files, LOSS_SUM_FILE: loss_sum})


def significant(value: float, digits: int = 7) -> float:
    """A logged figure to ``digits`` significant digits: small KD terms keep their precision (six decimals left
    a 0.016 loss two-digit-exact to 1e-4 relative); NaN and inf stay what they are."""
    return float(f"{value:.{digits}g}")


def _read_loss_sum(checkpoint) -> float:
    path = Path(checkpoint) / LOSS_SUM_FILE if isinstance(checkpoint, (str, Path)) else None
    return float(json.loads(path.read_text(encoding="utf-8"))["loss_sum"]) if path and path.is_file() else 0.0
