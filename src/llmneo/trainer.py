"""NeoTrainer: transformers.Trainer whose loss joins CE on the labels and KD to a frozen teacher."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer import rotate_checkpoints
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .atomic import write_atomically
from .data.packing import packed_model_inputs, packed_row_index
from .data.tokenize import IGNORE_INDEX
from .errors import DataError, NonFiniteError
from .evaluation.metrics import evaluate_against_teacher
from .lm_head import capture_final_hidden, output_head
from .teacher.placement import place_teacher
from .losses.chunked import distillation_loss
from .losses.divergences import forward_kl
from .losses.fused import fused_distillation_loss
from .losses.liger import liger_distillation_loss
from .teacher.online import teacher_final_hidden, teacher_logits

logger = logging.getLogger(__name__)

CHECKPOINT_COMPLETE = "llmneo_checkpoint_complete"  # written last into every checkpoint folder

HEAD_LOSSES = {"fused": fused_distillation_loss, "liger": liger_distillation_loss}


class NeoTrainer(Trainer):
    """Trainer for the four methods. With ``teacher=None`` the loss is CE only and no teacher is ever called.

    The loss of a micro-batch is its sum over answer tokens divided by the answer tokens of the whole optimizer
    step (``num_items_in_batch``, counted by the Trainer over ``labels[:, 1:]`` and across ranks), so it is
    already scaled for gradient accumulation.

    ``loss_impl`` (see losses/backends.py) picks how the loss is computed: ``fused`` and ``liger`` take both
    models' final hidden states and never build their full logits; ``naive`` takes the logits. With a
    ``teacher_cache`` (teacher/cache.py) the teacher side is the cached top-k rows of the batch's ``row_id``s.
    """

    loss_is_scaled_for_ga = True

    def __init__(self, *args, teacher=None, alpha=0.5, temperature=1.0, kd_chunk_size=1024, kd_vocab_size=None,
                 divergence=forward_kl, loss_impl="fused", teacher_cache=None, cache_tail="bucket", eval_collator=None,
                 nonfinite_policy="stop", max_bad_steps=10, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = place_teacher(teacher, self.accelerator) if teacher is not None else None
        self.alpha, self.temperature = alpha, temperature
        self.kd_chunk_size, self.kd_vocab_size, self.divergence = kd_chunk_size, kd_vocab_size, divergence
        self.loss_impl, self.teacher_cache, self.cache_tail = loss_impl, teacher_cache, cache_tail
        self.eval_collator = eval_collator or self.data_collator  # evaluation reads padded rows
        self.nonfinite_policy, self.max_bad_steps, self.bad_steps = nonfinite_policy, max_bad_steps, 0
        self._step_finite, self._step_rows = True, []
        if loss_impl != "naive" and self._parameters_sharded():
            logger.warning("FSDP2 / ZeRO-3 shard the lm_head weights that the %s loss reads outside the forward "
                           "pass: using the naive loss", loss_impl)
            self.loss_impl = "naive"
        # Our compute_loss uses num_items_in_batch whatever the model's forward signature says.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self._term_sums = {"ce_loss": 0.0, "kd_loss": 0.0}
        self._answer_tokens_seen = 0  # this rank's, kept as a tensor until read
        self._term_last_step = 0

    def _parameters_sharded(self) -> bool:
        plugin = self.accelerator.state.deepspeed_plugin
        return self.is_fsdp_enabled or (plugin is not None and plugin.zero_stage == 3)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Evaluation that keeps the logits (prediction_loss_only off) needs the model's own outputs.
        wants_logits = return_outputs and not self.args.prediction_loss_only
        if self.loss_impl == "naive" or wants_logits:
            parts, outputs = self._naive_loss(model, inputs, num_items_in_batch)
        else:
            parts, outputs = self._head_loss(model, inputs, num_items_in_batch)
        loss = self._record(model, parts, num_items_in_batch, (inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
        return (loss, outputs) if return_outputs else loss

    def _record(self, model, parts, num_items_in_batch, items) -> torch.Tensor:
        """Adds a training micro-batch's CE and KD terms and ``items`` (tokens it trained on) to the running sums;
        returns the loss to back-propagate."""
        scale = self._rank_scale(num_items_in_batch)
        if model.training:  # kept as tensors: no device sync until the next log
            self._term_sums["ce_loss"] += parts.ce * scale
            self._term_sums["kd_loss"] += parts.kd * scale
            self._answer_tokens_seen += items
        return parts.loss * scale

    def _loss_settings(self, num_items_in_batch) -> dict:
        settings = {"alpha": self.alpha, "temperature": self.temperature, "num_items": num_items_in_batch,
                    "chunk_size": self.kd_chunk_size, "kd_vocab_size": self.kd_vocab_size, "divergence": self.divergence}
        return {**settings, "tail_mode": self.cache_tail} if self.teacher_cache is not None else settings

    @staticmethod
    def _answer_tokens_per_row(inputs) -> list[int]:
        answers = inputs["labels"][:, 1:] != IGNORE_INDEX
        if "position_ids" not in inputs:
            return answers.sum(1).tolist()
        row = packed_row_index(inputs["position_ids"])[:-1]  # the row each prediction belongs to
        return torch.bincount(row[answers[0]], minlength=len(inputs["row_id"])).tolist()

    def _cached_teacher(self, inputs) -> dict:
        """The batch's cached top-k rows, after checking they cover exactly its answer positions."""
        row_ids = inputs["row_id"].tolist()
        counts = self._answer_tokens_per_row(inputs)
        for row, count in zip(row_ids, counts, strict=True):
            cached = self.teacher_cache.row_answer_tokens(row)
            if cached != count:
                raise DataError(f"teacher cache {self.teacher_cache.cache_dir} holds {cached} answer tokens for "
                                f"training row {row} but the batch has {count}: it was captured from other data")
        return {"teacher_topk": self.teacher_cache.rows(row_ids).to(self.args.device)}

    @staticmethod
    def _model_inputs(inputs, model) -> dict:
        """The forward inputs of a batch: padded rows, or one packed row (positions and row boundaries)."""
        if "position_ids" in inputs:
            return packed_model_inputs(inputs, model)
        return {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask")}

    def _teacher_side(self, inputs, hidden_states: bool) -> dict:
        """The batch's KD target: cached top-k rows, or the teacher's final hidden states (for the fused and Liger
        heads) or logits (for the naive loss); nothing for CE-only methods."""
        if self.teacher_cache is not None:
            return self._cached_teacher(inputs)
        if self.teacher is None:
            return {}
        teacher_inputs = self._model_inputs(inputs, self.teacher)
        if hidden_states:
            return {"teacher_hidden": teacher_final_hidden(self.teacher, **teacher_inputs),
                    "teacher_weight": output_head(self.teacher).weight}
        return {"teacher_logits": teacher_logits(self.teacher, **teacher_inputs)}

    def _naive_loss(self, model, inputs, num_items_in_batch):
        outputs = model(**self._model_inputs(inputs, model), use_cache=False)
        parts = distillation_loss(outputs.logits, inputs["labels"], **self._teacher_side(inputs, hidden_states=False),
                                  **self._loss_settings(num_items_in_batch))
        return parts, outputs

    def _head_loss(self, model, inputs, num_items_in_batch):
        with capture_final_hidden(model) as student:
            outputs = model(**self._model_inputs(inputs, model), use_cache=False)
        parts = HEAD_LOSSES[self.loss_impl](student.hidden, output_head(model).weight, inputs["labels"],
                                            **self._teacher_side(inputs, hidden_states=True),
                                            **self._loss_settings(num_items_in_batch))
        return parts, outputs

    def answer_tokens_seen(self) -> int:
        """Answer tokens trained on so far, over all ranks."""
        seen = torch.as_tensor(self._answer_tokens_seen, device=self.args.device)
        return int(self.accelerator.gather(seen).sum().item())

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """llm-neo's offline metrics on the held-out rows (perplexity; with a loaded teacher also top-1 agreement
        and KL to it), logged like the training metrics, in place of the Trainer's loss-only evaluation."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        metrics = evaluate_against_teacher(self.model, dataset, self.eval_collator, teacher=self.teacher,
                                           batch_size=self.args.per_device_eval_batch_size,
                                           kd_vocab_size=self.kd_vocab_size, chunk_size=self.kd_chunk_size)
        return self._log_eval(metrics, metric_key_prefix)

    def _log_eval(self, metrics: dict, prefix: str) -> dict:
        metrics = {f"{prefix}_{key}": round(value, 6) for key, value in metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_finite = torch.isfinite(loss).all() & self._step_finite  # a tensor: no sync per micro-batch
        if "row_id" in inputs:
            self._step_rows.append(inputs["row_id"].detach())
        return loss

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if not getattr(optimizer.step, "_guarded", False):
            optimizer.step = self._guarded_step(optimizer.step)
        return optimizer

    def _guarded_step(self, step):
        """The optimizer's step, run only when the step's loss and gradients are finite (see nonfinite_policy)."""

        def guarded(*args, **kwargs):
            grads = [torch.isfinite(p.grad).all() for p in self.model.parameters() if p.grad is not None]
            finite = bool(torch.stack([torch.as_tensor(self._step_finite, device=self.args.device), *grads]).all())
            rows = torch.cat(self._step_rows).tolist() if self._step_rows else []
            self._step_finite, self._step_rows = True, []
            if finite:
                return step(*args, **kwargs)
            self.bad_steps += 1
            where = f"step {self.state.global_step + 1} (training rows {rows})"
            if self.nonfinite_policy == "stop" or self.bad_steps > self.max_bad_steps:
                raise NonFiniteError(f"non-finite loss or gradient at {where}; {self.bad_steps} bad step(s) in this "
                                     f"run (policy {self.nonfinite_policy}, max_bad_steps {self.max_bad_steps})")
            logger.warning("non-finite loss or gradient at %s: update skipped (%d of at most %d)", where,
                           self.bad_steps, self.max_bad_steps)
            self.model.zero_grad(set_to_none=True)
            return None

        guarded._guarded = True
        return guarded

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, then a completion marker, and only then the rotation of older checkpoints:
        a kill during a save leaves an unmarked folder that resuming skips, and never costs the previous one."""
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            run_dir = self._get_output_dir(trial=trial)
            folder = Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            write_atomically(folder / CHECKPOINT_COMPLETE, f"{self.state.global_step}\n".encode())
            rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)

    def _rank_scale(self, num_items_in_batch) -> int:
        # DDP averages gradients over ranks while num_items counts every rank's tokens: undo the average.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            return self.accelerator.num_processes
        return 1

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self.model.training:
            steps = max(self.state.global_step - self._term_last_step, 1)
            for key, total in self._term_sums.items():
                value = torch.as_tensor(total, dtype=torch.float32, device=self.args.device) / steps
                logs[key] = round(self.accelerator.gather(value).mean().item(), 6)
                self._term_sums[key] = 0.0
            self._term_last_step = self.state.global_step
        super().log(logs, *args, **kwargs)


class MetricsJsonlCallback(TrainerCallback):
    """Appends every log event (step, loss, ce_loss, kd_loss, learning_rate, ...) to ``metrics.jsonl``."""

    def __init__(self, path: str):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")
