"""Every place llm-neo relies on transformers.Trainer's private state, in one module.

Each hook below names the private attribute or method it uses; tests/unit/training/test_trainer_hooks.py fails
when transformers stops providing one of them (pyproject.toml bounds transformers below 6 for the same reason).

- ``_run_epoch``: a run resumed at the checkpoint of its last step must not run one more step;
- ``_save_checkpoint`` / ``_get_output_dir``: checkpoints get llm-neo's extra files and completion marker before
  older ones rotate away (``after_checkpoint``);
- ``_tr_loss`` / ``_total_loss_scalar``: the step losses summed so far, so that a resumed run's ``train_loss``
  covers the whole run;
- ``_train_batch_size``: the Trainer sizes its dataloader from it when the micro-batch changes;
- ``_loss_shifts_labels``: whether ``num_items_in_batch`` counts labels after the causal shift;
- ``_get_num_items_in_batch``: an optimizer step's items counted again when its batches are replaced (on-policy);
- ``create_accelerator_and_postprocess`` / ``is_fsdp_enabled``: FSDP2 across CPU processes, which accelerate does
  not turn on by itself (runtime/processes.py: ``shard_cpu_processes``).
"""

from __future__ import annotations

from pathlib import Path

from transformers import Trainer

from ..runtime.processes import shard_cpu_processes


class TrainerHooks(Trainer):
    """The private Trainer hooks, each behind a public method or a documented override."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if shard_cpu_processes(self.accelerator):
            self.is_fsdp_enabled = True

    def _run_epoch(self, *args, **kwargs):
        # The Trainer would run one more step when resumed at a checkpoint of its last step.
        if self.state.max_steps > 0 and self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint without its rotation, then ``after_checkpoint`` (which rotates)."""
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            self.after_checkpoint(Path(self._get_output_dir(trial=trial)), limit)

    def after_checkpoint(self, run_dir: Path, save_total_limit: int | None) -> None:
        """Called once a checkpoint of the current step is written, before any older one is removed."""

    def save_checkpoint_now(self) -> None:
        """Save (and mark complete) a checkpoint of the current step, outside the Trainer's schedule."""
        self.model.zero_grad(set_to_none=True)
        self._save_checkpoint(self.model, trial=None)

    def logged_loss_sum(self) -> float:
        """Step losses this process summed since training started: logged ones plus the last, unlogged steps."""
        unlogged = getattr(self, "_tr_loss", None)
        return getattr(self, "_total_loss_scalar", 0.0) + (float(unlogged.item()) if unlogged is not None else 0.0)

    def logged_steps_loss(self) -> float:
        """Step losses summed over the logged steps (what the Trainer divides for ``train_loss``)."""
        return self._total_loss_scalar

    def set_micro_batch(self, micro_batch: int, accumulation: int) -> None:
        """Train with ``micro_batch`` rows per device and ``accumulation`` micro-batches per optimizer step."""
        self.args.per_device_train_batch_size, self.args.gradient_accumulation_steps = micro_batch, accumulation
        self._train_batch_size = self.args.train_batch_size  # the Trainer sizes its dataloader from this

    def count_items(self, batches: list[dict], device):
        """``num_items_in_batch`` of an optimizer step's micro-batches, counted as the Trainer counts them."""
        return self._get_num_items_in_batch(batches, device)

    def count_items_over_shifted_labels(self, shifted: bool = True) -> None:
        """Whether the Trainer counts ``num_items_in_batch`` over ``labels[:, 1:]`` (token level) or all labels
        (one label per text)."""
        self._loss_shifts_labels = shifted
