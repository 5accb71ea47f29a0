"""experiments/grid.py, compare.py, scaling.py: what the experiment commands share, checked without training."""

from __future__ import annotations

import csv

import pytest

from llmneo.experiments.compare import _learning_rate
from llmneo.experiments.grid import best, write_csv
from llmneo.experiments.scaling import scaling


def test_the_best_cell_follows_the_metric_direction():
    rows = [{"kl_to_teacher": 0.5, "top1_agreement": 0.4}, {"kl_to_teacher": 0.3, "top1_agreement": 0.2},
            {"kl_to_teacher": None}]
    assert best(rows, "kl_to_teacher") is rows[1] and best(rows, "top1_agreement") is rows[0]


def test_rows_with_different_keys_round_trip_through_the_csv(tmp_path):
    write_csv([{"rank": 8, "kl": 0.5}, {"rank": 32, "ppl": 9.0}], tmp_path / "grid.csv")
    with open(tmp_path / "grid.csv", encoding="utf-8") as handle:
        assert list(csv.DictReader(handle)) == [{"rank": "8", "kl": "0.5", "ppl": ""},
                                                {"rank": "32", "kl": "", "ppl": "9.0"}]


def test_each_method_family_gets_its_own_learning_rate():
    rates = {"full": 3e-5, "adapter": 1e-3}
    assert _learning_rate("kd", rates) == ["--learning_rate", "3e-05"]
    assert _learning_rate("neo", rates) == ["--learning_rate", "0.001"]
    assert _learning_rate("lora", {}) == []


def test_scaling_refuses_an_unknown_metric_before_training():
    with pytest.raises(ValueError, match="unknown metric 'speed'"):
        scaling([], [10], metric="speed")
