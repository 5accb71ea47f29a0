"""training/trainer_hooks.py relies on private transformers.Trainer state: each test here fails when transformers
stops providing (or reading) the hook, before a run would silently lose what the hook does."""

from __future__ import annotations

import inspect

import pytest
from transformers import Trainer

from llmneo.training.trainer_hooks import TrainerHooks


def reads(method: str, attribute: str) -> bool:
    return f"self.{attribute}" in inspect.getsource(getattr(Trainer, method))


def test_run_epoch_is_the_per_epoch_loop_with_the_state_it_reads():
    assert "_run_epoch" in vars(TrainerHooks)
    assert "should_training_stop" in inspect.getsource(Trainer._run_epoch)


def test_save_checkpoint_takes_model_and_trial_and_rotates_by_save_total_limit():
    assert list(inspect.signature(Trainer._save_checkpoint).parameters) == ["self", "model", "trial"]
    assert "save_total_limit" in inspect.getsource(Trainer._save_checkpoint)
    assert list(inspect.signature(Trainer._get_output_dir).parameters) == ["self", "trial"]


@pytest.mark.parametrize(("method", "attribute"), [("_run_epoch", "_tr_loss"),
                                                    ("_maybe_log_save_evaluate", "_total_loss_scalar"),
                                                    ("_finalize_training", "_total_loss_scalar")])
def test_the_step_loss_sums_are_kept_where_logged_loss_sum_reads_them(method, attribute):
    assert reads(method, attribute)


def test_the_dataloader_is_sized_from_train_batch_size():
    assert reads("get_train_dataloader", "_train_batch_size")


def test_num_items_in_batch_reads_whether_the_loss_shifts_labels():
    assert reads("_get_num_items_in_batch", "_loss_shifts_labels")


def test_every_trainer_reaches_the_private_state_through_the_hooks():
    from llmneo.training.base import DistillTrainerBase
    from llmneo.training.classifier import ClassifierTrainer
    from llmneo.training.token_level import TokenDistillTrainer

    for trainer in (TokenDistillTrainer, ClassifierTrainer):
        assert issubclass(trainer, DistillTrainerBase) and issubclass(trainer, TrainerHooks)
        overridden = {name for klass in trainer.__mro__[:trainer.__mro__.index(TrainerHooks)] for name in vars(klass)}
        assert not overridden & {"_run_epoch", "_save_checkpoint"}, trainer


def test_fsdp_is_read_from_the_accelerator_right_after_it_is_created():
    # shard_cpu_processes turns FSDP on after super().create_accelerator_and_postprocess(): it must set the same flag
    assert "self.is_fsdp_enabled = " in inspect.getsource(Trainer.create_accelerator_and_postprocess)
    assert "create_accelerator_and_postprocess" in vars(TrainerHooks)


@pytest.mark.parametrize(("value", "logged"), [(0.0159534567, 0.01595346), (123456.789, 123456.8), (1.5e-9, 1.5e-9)])
def test_logged_figures_keep_seven_significant_digits(value, logged):
    from llmneo.training.base import significant

    assert significant(value) == logged
    assert significant(float("nan")) != significant(float("nan"))  # NaN stays NaN
