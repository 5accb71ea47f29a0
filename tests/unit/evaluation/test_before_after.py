"""evaluation/before_after.py: the starting point is measured once and kept, so a resumed run reports the same."""

from __future__ import annotations

import json
from types import SimpleNamespace

from llmneo.evaluation.before_after import compare_with_before, measure_before
from llmneo.runtime.layout import BEFORE_FILE


class FakeTrainer:
    def __init__(self):
        self.evaluations = 0

    def evaluate(self, metric_key_prefix="eval"):
        self.evaluations += 1
        return {f"{metric_key_prefix}_perplexity": 40.0}

    def is_world_process_zero(self):
        return True


def config(tmp_path, task="classification"):
    return SimpleNamespace(training=SimpleNamespace(output_dir=str(tmp_path)), data=SimpleNamespace(task=task))


def test_without_held_out_rows_nothing_is_measured(tmp_path):
    assert measure_before(FakeTrainer(), config(tmp_path), None, None, None) is None
    assert compare_with_before(FakeTrainer(), None, None, {}) == (None, None)


def test_the_starting_point_is_written_once_and_read_back_on_resume(tmp_path):
    trainer = FakeTrainer()
    before = measure_before(trainer, config(tmp_path), None, held_out=[1], resume=None)
    assert before == {"metrics": {"perplexity": 40.0}, "samples": {}}
    assert json.loads((tmp_path / BEFORE_FILE).read_text()) == before
    (tmp_path / BEFORE_FILE).write_text(json.dumps({"metrics": {"perplexity": 41.0}, "samples": {}}))
    resumed = measure_before(trainer, config(tmp_path), None, held_out=[1], resume="checkpoint-2")
    assert resumed["metrics"] == {"perplexity": 41.0} and trainer.evaluations == 1
