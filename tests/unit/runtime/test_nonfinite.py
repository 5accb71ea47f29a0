"""runtime/nonfinite.py: an optimizer step runs only when its loss and gradients are finite."""

from __future__ import annotations

import pytest
import torch

from llmneo.errors import NonFiniteError
from llmneo.runtime.nonfinite import NonFiniteGuard, check_finite_rows


def guarded_step(policy="stop", max_bad_steps=10):
    model = torch.nn.Linear(2, 1)
    calls = []
    guard = NonFiniteGuard(policy, max_bad_steps)
    step = guard.guard(lambda: calls.append(1), model, "cpu", lambda: 7)
    return guard, model, step, calls


def backward(model, value: float):
    model.zero_grad()
    (model(torch.ones(1, 2)).sum() * value).backward()


def test_a_finite_step_runs():
    guard, model, step, calls = guarded_step()
    backward(model, 1.0)
    guard.observe(torch.tensor(1.0), torch.tensor([3, 4]))
    step()
    assert calls == [1] and guard.bad_steps == 0


def test_stop_names_the_step_and_its_rows():
    guard, model, step, calls = guarded_step("stop")
    backward(model, 1.0)
    guard.observe(torch.tensor(float("nan")), torch.tensor([3, 4]))
    with pytest.raises(NonFiniteError, match=r"non-finite loss or gradient at step 7 \(training rows \[3, 4\]\)"):
        step()
    assert calls == []


def test_skip_drops_updates_with_infinite_gradients_until_the_limit():
    guard, model, step, calls = guarded_step("skip", max_bad_steps=1)
    backward(model, float("inf"))
    guard.observe(torch.tensor(1.0))
    step()
    assert calls == [] and guard.bad_steps == 1 and model.weight.grad is None  # the gradients were dropped
    backward(model, float("inf"))
    with pytest.raises(NonFiniteError, match="2 bad step"):
        step()


def test_guarding_twice_wraps_once():
    guard, model, step, _ = guarded_step()
    assert guard.guard(step, model, "cpu", lambda: 1) is step


def test_check_finite_rows_names_the_rows():
    values = torch.zeros(3, 4)
    values[1, 2] = float("inf")
    check_finite_rows(torch.zeros(3, 4), torch.tensor([0, 0, 1]), "teacher logits")
    with pytest.raises(NonFiniteError, match=r"teacher logits are not finite \(NaN or inf\) at 1 answer positions of "
                                             r"rows \[5\]"):
        check_finite_rows(values, torch.tensor([4, 5, 5]), "teacher logits")
