"""ClassifierTrainer: sequence-classification distillation, KD on the teacher's class logits."""

from __future__ import annotations

import torch

from ..evaluation.classification import evaluate_classifier
from ..losses.classification import classification_distillation_loss
from .base import DistillTrainerBase


class ClassifierTrainer(DistillTrainerBase):
    """CE on each text's class plus KD to the frozen teacher's class logits, divided by the labelled texts of the
    whole optimizer step (``num_items_in_batch``: the Trainer counts unshifted labels here)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.count_items_over_shifted_labels(False)  # one label per text, nothing to shift

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask")}
        outputs = model(**model_inputs)
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(**model_inputs).logits
        parts = classification_distillation_loss(outputs.logits, inputs["labels"], teacher_logits,
                                                 settings=self.loss_settings, num_items=num_items_in_batch)
        loss = self.record_loss(model, parts, num_items_in_batch, inputs["labels"].numel())
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Accuracy, precision, recall, F1 (and agreement and KL with a teacher) on the held-out texts."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        metrics = evaluate_classifier(self.model, dataset, self.eval_collator, teacher=self.teacher,
                                      batch_size=self.args.per_device_eval_batch_size)
        return self.log_evaluation(metrics, metric_key_prefix)
