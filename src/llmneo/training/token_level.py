"""TokenDistillTrainer: token-level distillation of a causal LM (CE on the answer tokens plus KD to the teacher's
next-token distributions), for the four methods sft, lora, kd and neo."""

from __future__ import annotations

from ..data.packing import forward_inputs
from ..data.vocabulary import byte_lengths
from ..lm_head import capture_final_hidden, output_head
from ..losses.backends import READS_HIDDEN_STATES, choose_loss_impl, impl_for_call
from ..losses.contract import answer_mask
from ..losses.targets import StudentSide
from ..rollouts import ROLLOUT
from ..teacher.placement import place_teacher
from ..teacher.signal import NoTeacher, TeacherSignal
from .base import DistillTrainerBase
from .on_policy import OnPolicy


class TokenDistillTrainer(DistillTrainerBase):
    """``TokenDistillTrainer(model, args, signal=...)``; everything else comes from ``args`` (NeoTrainingArguments).

    ``signal`` (teacher/signal.py) is where the KD targets come from; without one the loss is CE only.
    ``args.loss_impl`` (losses/backends.py) picks how the loss is computed: ``fused`` and ``liger`` take the
    student's final hidden states and never build its full logits; ``naive`` takes the logits.
    """

    def __init__(self, *args, signal: TeacherSignal | None = None, **kwargs):
        signal = signal if signal is not None else NoTeacher()
        super().__init__(*args, kd_vocab_size=signal.kd_vocab_size, **kwargs)
        self.signal = signal
        self.signal.place(lambda teacher: place_teacher(teacher, self.accelerator), self.args.device)
        self.teacher = signal.teacher
        self.byte_lengths = byte_lengths(self.processing_class) if self.processing_class is not None else None
        self.loss_impl = choose_loss_impl(self.args.loss_impl, self.loss_settings.divergence, self.model,
                                          signal.loaded_teachers(), self.loss_settings.kd_vocab_size,
                                          self.parameters_sharded())
        self.count_items_over_shifted_labels()
        self.on_policy = OnPolicy.from_args(self.args, self.processing_class, self.model)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """An on-policy step's micro-batches are the student's answers to their prompts, counted again."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.on_policy is None or not batches:
            return batches, num_items
        step = self.state.global_step
        rows = [row for batch in batches if "row_id" in batch for row in batch["row_id"].tolist()]
        last = step + 1 >= self.state.max_steps  # rows collated ahead then belong to no step
        self.signal.planned(rows, self.on_policy.is_step(step), last or self.on_policy.is_step(step + 1))
        if not self.on_policy.is_step(step):
            return batches, num_items
        batches = self.on_policy.batches(self.model, batches, step)
        return batches, self.count_items(batches, device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Evaluation that keeps the logits (prediction_loss_only off) needs the model's own outputs.
        impl = impl_for_call(self.loss_impl, needs_logits=return_outputs and not self.args.prediction_loss_only)
        hidden_states = impl in READS_HIDDEN_STATES
        with capture_final_hidden(model, active=hidden_states) as captured:
            outputs = model(**forward_inputs(inputs, model), use_cache=False)
        student = (StudentSide(impl, captured.hidden, output_head(model).weight) if hidden_states
                   else StudentSide(impl, outputs.logits))
        if ROLLOUT in inputs:  # the student's own answers (get_batch_samples)
            parts = self.on_policy.parts(self.signal, inputs, student, self.loss_settings, num_items_in_batch)
        else:
            parts = self.signal.targets(inputs, student).loss(student, inputs["labels"], self.loss_settings,
                                                              num_items_in_batch)
        loss = self.record_loss(model, parts, num_items_in_batch, answer_mask(inputs["labels"]).sum())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self.model.training:
            steps = max(self.state.global_step - self._term_last_step, 1)
            logs.update(self.signal.log_figures(steps))
            if self.on_policy is not None:
                logs.update(self.on_policy.figures(steps))
        super().log(logs, *args, **kwargs)

    def after_checkpoint(self, run_dir, save_total_limit) -> None:
        self.signal.at_checkpoint()  # before the checkpoint counts as complete
        super().after_checkpoint(run_dir, save_total_limit)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """llm-neo's offline metrics on the held-out rows (perplexity; what the teacher signal adds: top-1 agreement
        and KL to a loaded teacher), logged like the training metrics, in place of the Trainer's loss-only
        evaluation."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        return self.log_evaluation(self.signal.evaluate(self, dataset), metric_key_prefix)
