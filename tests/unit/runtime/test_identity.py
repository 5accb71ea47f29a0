"""runtime/identity.py: what makes a run the same run, and how a difference is named."""

from __future__ import annotations

import pytest

from llmneo.errors import ConfigError
from llmneo.runtime.identity import check_resume, differences, identity_bytes, run_identity
from llmneo.runtime.layout import IDENTITY_FILE

DATA = {"dataset": "train.jsonl", "rows": 8, "answer_tokens": 100, "sha256": "a"}


def identity(teacher=None, **options):
    sections = {"distill": {"alpha": 0.5, "max_steps": 10, **options}, "training": {"logging_steps": 5}}
    return run_identity(sections, DATA, teacher)


def test_resumable_options_are_not_part_of_the_identity():
    assert "logging_steps" not in identity()["options"] and identity()["options"]["alpha"] == 0.5


def test_each_changed_option_is_named_with_both_values():
    assert differences(identity(), identity(alpha=0.3)) == ["alpha: 0.5 -> 0.3"]


@pytest.mark.parametrize(("before", "after", "allowed"), [(10, 20, True), (10, 5, False), (10, -1, True)])
def test_max_steps_may_only_grow(before, after, allowed):
    assert (differences(identity(max_steps=before), identity(max_steps=after)) == []) == allowed


def test_other_data_is_named_by_rows_and_answer_tokens():
    other = run_identity({"distill": {"alpha": 0.5, "max_steps": 10}}, {**DATA, "rows": 9, "sha256": "b"})
    (change,) = differences(identity(), other)
    assert change == ("training data: 8 rows / 100 answer tokens of train.jsonl -> 9 rows / 100 answer tokens of "
                      "train.jsonl")


def test_a_teacher_signal_identity_is_compared_too():
    assert differences(identity({"cache": "x"}), identity({"cache": "x"})) == []
    assert differences(identity({"cache": "x"}), identity({"cache": "y"})) == [
        "teacher signal: {'cache': 'x'} -> {'cache': 'y'}"]
    assert "teacher" not in identity()  # a signal that adds nothing leaves the identity as before


def test_check_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    (tmp_path / IDENTITY_FILE).write_bytes(identity_bytes(identity()))
    check_resume(tmp_path, identity())
    with pytest.raises(ConfigError, match=r"cannot resume .*: it belongs to a run with other settings \(alpha: 0.5 -> "
                                          r"0.3\)"):
        check_resume(tmp_path, identity(alpha=0.3))


def with_models(**models):
    return run_identity({"distill": {"alpha": 0.5, "max_steps": 10}}, DATA, None, models)


def test_weights_rewritten_at_the_same_path_are_named_by_role_and_path():
    teacher = {"path": "/models/t", "sha256": "1"}
    assert differences(with_models(teacher=teacher), with_models(teacher=dict(teacher))) == []
    assert differences(with_models(teacher=teacher, student={"path": "/s", "sha256": "2"}),
                       with_models(teacher={**teacher, "sha256": "3"}, student={"path": "/s", "sha256": "4"})) == [
        "the student /s: its weights changed since the checkpoint",
        "the teacher /models/t: its weights changed since the checkpoint"]


def test_models_that_cannot_be_compared_are_not_called_changed():
    teacher = {"path": "/models/t", "sha256": "1"}
    assert differences(identity(), with_models(teacher=teacher)) == []  # a checkpoint of an older llm-neo
    assert differences(with_models(teacher=teacher), with_models(teacher=None)) == []  # unreadable now
    # another path: the teacher_model option names it already
    assert differences(with_models(teacher=teacher), with_models(teacher={"path": "/other", "sha256": "1"})) == []


def test_a_relative_path_of_an_older_run_is_the_same_absolute_path_from_where_it_is_resumed(tmp_path, monkeypatch):
    """Runs recorded before paths were stored absolute hold them relative to where they ran; resumed from there,
    the same paths are not a change, and other paths still are."""
    monkeypatch.chdir(tmp_path)
    saved = run_identity({"model": {"student_model": "models/student"}, "data": {"dataset": "a.jsonl, b.jsonl"}}, {})
    same = run_identity({"model": {"student_model": str(tmp_path / "models" / "student")},
                         "data": {"dataset": f"{tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'}"}}, {})
    other = run_identity({"model": {"student_model": str(tmp_path / "models" / "other")},
                          "data": {"dataset": f"{tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'}"}}, {})
    assert differences(saved, same) == []
    assert differences(saved, other) == [f"student_model: 'models/student' -> '{tmp_path / 'models' / 'other'}'"]


def test_where_the_rollout_server_is_may_change_which_engine_samples_may_not():
    on_policy = {"on_policy_fraction": 1.0, "rollout_sync_steps": 1}
    served = identity(**on_policy, rollout_server="http://127.0.0.1:8001/v1", rollout_adapter_dir="/a")
    moved = identity(**on_policy, rollout_server="http://10.0.0.2:9000/v1", rollout_adapter_dir="/b",
                     rollout_server_timeout=60)
    assert differences(served, moved) == []
    assert differences(served, identity(**on_policy)) == ["rollout_engine: 'vllm' -> 'transformers'"]
    assert differences(served, identity(**{**on_policy, "rollout_sync_steps": 2}, rollout_server="http://h/v1")) == [
        "rollout_sync_steps: 1 -> 2"]
    assert "rollout_engine" not in identity()["options"]  # off-policy runs sample nothing
