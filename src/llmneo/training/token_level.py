"""NeoTrainer: token-level distillation of a causal LM (CE on the answer tokens plus KD to the teacher's
next-token distributions), for the four methods sft, lora, kd and neo."""

from __future__ import annotations

import torch

from ..data.packing import packed_model_inputs, packed_row_index
from ..errors import DataError
from ..data.vocabulary import byte_lengths
from ..evaluation.cross_tokenizer import evaluate_aligned
from ..evaluation.metrics import evaluate_against_teacher
from ..lm_head import capture_final_hidden, output_head
from ..losses.backends import LOSS_FUNCTIONS, READS_HIDDEN_STATES, choose_loss_impl, impl_for_call
from ..losses.contract import answer_mask
from ..losses.cross_vocab import cross_tokenizer_parts, cross_vocab_kd_sum
from ..losses.cross_vocab_cached import cached_cross_vocab_kd_sum
from ..losses.topk import TopKRows
from ..teacher.online import rows_at, teacher_final_hidden, teacher_logits
from .base import DistillationTrainer


class NeoTrainer(DistillationTrainer):
    """``NeoTrainer(model, args, teacher=..., teacher_cache=..., kd_vocab_size=...)``; everything else comes from
    ``args`` (NeoTrainingArguments). With ``teacher=None`` and no cache the loss is CE only.

    ``args.loss_impl`` (losses/backends.py) picks how the loss is computed: ``fused`` and ``liger`` take both
    models' final hidden states and never build their full logits; ``naive`` takes the logits. With a
    ``teacher_cache`` (teacher/cache.py) the teacher side is the cached top-k rows of the batch's ``row_id``s. With
    a ``vocab_map`` (data/vocabulary.py; ``args.cross_tokenizer`` set) the teacher has its own tokenizer: it reads
    its own rows of the batch and the KD term is computed at the aligned boundaries (losses/cross_vocab.py), or
    the cache, captured across tokenizers, holds its top-k there (losses/cross_vocab_cached.py).
    """

    def __init__(self, *args, teacher_cache=None, vocab_map=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher_cache = teacher_cache
        self.vocab_map = vocab_map.to(self.args.device) if vocab_map is not None else None
        self.byte_lengths = byte_lengths(self.processing_class) if self.processing_class is not None else None
        self.loss_impl = choose_loss_impl(self.args.loss_impl, self.loss_settings.divergence, self.model, self.teacher,
                                          self.loss_settings.kd_vocab_size, self.parameters_sharded())
        self._loss_shifts_labels = True  # the Trainer counts num_items_in_batch over labels[:, 1:]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Evaluation that keeps the logits (prediction_loss_only off) needs the model's own outputs.
        impl = impl_for_call(self.loss_impl, needs_logits=return_outputs and not self.args.prediction_loss_only)
        hidden_states = impl in READS_HIDDEN_STATES
        with capture_final_hidden(model, active=hidden_states) as student:
            outputs = model(**self._model_inputs(inputs, model), use_cache=False)
        student_side = (student.hidden, output_head(model).weight) if hidden_states else (outputs.logits,)
        if self.vocab_map is not None:
            parts = self._across_tokenizers(impl, student_side, inputs, num_items_in_batch)
        else:
            parts = LOSS_FUNCTIONS[impl](*student_side, inputs["labels"], **self._teacher_side(inputs, hidden_states),
                                         settings=self.loss_settings, num_items=num_items_in_batch)
        loss = self.record_loss(model, parts, num_items_in_batch, answer_mask(inputs["labels"]).sum())
        return (loss, outputs) if return_outputs else loss

    def _across_tokenizers(self, impl: str, student_side: tuple, inputs, num_items):
        """CE on all of the student's answer tokens plus the KD term at the batch's aligned boundaries."""
        labels = inputs["labels"]
        ce_only = LOSS_FUNCTIONS[impl](*student_side, labels, settings=self.loss_settings, num_items=num_items)
        student_weight = student_side[1] if len(student_side) == 2 else None
        mode = self.args.cross_tokenizer
        if self.teacher_cache is not None:
            rows, positions, topk = self._cached_alignment(inputs)
            kd_sum = cached_cross_vocab_kd_sum(student_side[0][rows, positions], topk, self.vocab_map, mode,
                                               self.loss_settings, student_weight)
        else:
            rows = inputs["aligned_row"]
            teacher_rows, teacher_weight = rows_at(self.teacher, inputs["teacher_input_ids"],
                                                   inputs["teacher_attention_mask"], rows, inputs["aligned_teacher"])
            kd_sum = cross_vocab_kd_sum(student_side[0][rows, inputs["aligned_student"]], teacher_rows, self.vocab_map,
                                        mode, self.loss_settings, student_weight, teacher_weight)
        return cross_tokenizer_parts(ce_only, kd_sum, num_items if num_items is not None else answer_mask(labels).sum(),
                                     self.loss_settings)

    def _cached_alignment(self, inputs) -> tuple[torch.Tensor, torch.Tensor, TopKRows]:
        """From a cache across tokenizers, the batch's aligned boundaries as (row, student position) pairs in the
        padded batch, after checking that each is an answer position of its row, and the teacher's top-k there."""
        row_ids, answers = inputs["row_id"].tolist(), answer_mask(inputs["labels"])
        left = self.processing_class is not None and self.processing_class.padding_side == "left"
        rows, positions = [], []
        for index, (row, found) in enumerate(zip(row_ids, self.teacher_cache.student_positions(row_ids), strict=True)):
            shift = answers.shape[1] + 1 - int(inputs["attention_mask"][index].sum()) if left else 0
            found = found.to(answers.device) + shift
            if found.numel() and (int(found.max()) >= answers.shape[1] or not bool(answers[index, found].all())):
                raise DataError(f"teacher cache {self.teacher_cache.cache_dir}: the aligned boundaries it holds for "
                                f"training row {row} are not answer positions of that row: it was captured from other "
                                "data")
            rows.append(torch.full_like(found, index))
            positions.append(found)
        topk = self.teacher_cache.rows(row_ids).to(answers.device)
        return torch.cat(rows), torch.cat(positions), topk

    @staticmethod
    def _model_inputs(inputs, model) -> dict:
        """The forward inputs of a batch: padded rows, or one packed row (positions and row boundaries)."""
        if "position_ids" in inputs:
            return packed_model_inputs(inputs, model)
        return {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask")}

    def _teacher_side(self, inputs, hidden_states: bool) -> dict:
        """The batch's KD target: cached top-k rows, or the teacher's final hidden states (for the fused and Liger
        heads) or logits (for the reference loss); nothing for CE-only methods."""
        if self.teacher_cache is not None:
            return self._cached_teacher(inputs)
        if self.teacher is None:
            return {}
        teacher_inputs = self._model_inputs(inputs, self.teacher)
        if hidden_states:
            return {"teacher_hidden": teacher_final_hidden(self.teacher, **teacher_inputs),
                    "teacher_weight": output_head(self.teacher).weight}
        return {"teacher_logits": teacher_logits(self.teacher, **teacher_inputs)}

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
    def _answer_tokens_per_row(inputs) -> list[int]:
        answers = answer_mask(inputs["labels"])
        if "position_ids" not in inputs:
            return answers.sum(1).tolist()
        row = packed_row_index(inputs["position_ids"])[:-1]  # the row each prediction belongs to
        return torch.bincount(row[answers[0]], minlength=len(inputs["row_id"])).tolist()

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """llm-neo's offline metrics on the held-out rows (perplexity; with a loaded teacher also top-1 agreement
        and KL to it), logged like the training metrics, in place of the Trainer's loss-only evaluation."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        same_tokens = self.teacher if self.vocab_map is None else None  # a teacher on the student's own tokens
        metrics = evaluate_against_teacher(self.model, dataset, self.eval_collator, teacher=same_tokens,
                                           batch_size=self.args.per_device_eval_batch_size,
                                           kd_vocab_size=self.loss_settings.kd_vocab_size,
                                           chunk_size=self.loss_settings.chunk_size,
                                           byte_lengths=self.byte_lengths)
        if self.vocab_map is not None and self.teacher is not None:
            metrics.update(evaluate_aligned(self.model, self.teacher, dataset, self.eval_collator, self.vocab_map,
                                            self.args.per_device_eval_batch_size, self.loss_settings.chunk_size))
        return self.log_evaluation(metrics, metric_key_prefix)
