"""``llmneo.NeoTrainer``: a distillation run with TRL's trainer shape, taking what a Python user already holds.

    trainer = NeoTrainer(model=student, teacher_model=teacher, args=NeoTrainingArguments(output_dir="runs/x"),
                         train_dataset=rows, processing_class=tokenizer, peft_config=LoraConfig(r=8))
    summary = trainer.train()

Models, tokenizers and datasets may be objects or paths; ``args`` is the run's options as a ``NeoTrainingArguments``
(transformers' TrainingArguments plus the distillation settings), a ``RunConfig``, or a dict; any other option goes
in as a keyword (``max_length=256``, ``teacher_server=URL``). ``train()`` runs what ``llm-neo distill`` runs and
writes the same run directory. A loaded model is recorded by the directory it was loaded from while its weights there
are unchanged (so ``llm-neo eval``/``merge``/``generate`` of the run read that directory), else by a fingerprint.
"""

from __future__ import annotations

from .adapters.lora import adapter_options
from .config import NeoTrainingArguments, RunConfig, flat_options, training_sections
from .in_memory import is_in_memory, model_name, models_in_memory
from .pipeline import RunSummary, distill


class NeoTrainer:
    """One distillation run (method, loss, teacher source and the rest from ``args`` and ``options``)."""

    def __init__(self, model, *, teacher_model=None, args=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, teacher_processing_class=None, callbacks=(),
                 shared_tokenizer: bool = False, **options):
        """``shared_tokenizer``: a teacher saved nowhere reads ``processing_class`` (TRL's assumption); a teacher
        with a directory always reads its own, which the run checks against the student's."""
        self.callbacks = tuple(callbacks)
        self.in_memory: dict[str, tuple] = {}
        chosen = {**options_of(args), **options}
        if peft_config is not None:
            chosen.update(adapter_options(peft_config))
        chosen["student_model"] = self._name(model, "student", processing_class)
        if teacher_model is not None:
            unsaved = processing_class if shared_tokenizer else None
            chosen["teacher_model"] = self._name(teacher_model, "teacher", teacher_processing_class, unsaved)
        if train_dataset is not None:
            chosen["dataset"] = train_dataset
        if eval_dataset is not None:
            chosen["eval_split"] = eval_dataset
        self.config = RunConfig.from_options(**chosen)

    def _name(self, model, role: str, tokenizer, unsaved_tokenizer=None) -> str:
        """The name the run records for ``model`` (a path stays a path); objects are handed to the loaders, with
        ``unsaved_tokenizer`` as the tokenizer of a model saved nowhere when none is given."""
        if isinstance(model, str):
            name, obj = model, None
        else:
            name, obj = model_name(model, role), model
        if tokenizer is None and is_in_memory(name):
            tokenizer = unsaved_tokenizer
        if obj is not None or tokenizer is not None:
            self.in_memory[name] = (obj, tokenizer)
        return name

    def train(self) -> RunSummary:
        """Train and write the run directory, as ``llm-neo distill`` does."""
        with models_in_memory(self.in_memory):
            return distill(self.config, self.callbacks)


def options_of(args) -> dict:
    """The options ``args`` sets: a dict as it is; a RunConfig's sections; a NeoTrainingArguments' fields."""
    if args is None:
        return {}
    if isinstance(args, dict):
        return dict(args)
    if isinstance(args, RunConfig):
        return flat_options(args.to_dict())
    if isinstance(args, NeoTrainingArguments):
        return flat_options(training_sections(args))
    raise TypeError(f"args must be a NeoTrainingArguments, a RunConfig or a dict of options, got {type(args).__name__}")
