"""--teachers (teachers.py): the list in its three forms, each member as a one-teacher run's settings, the mixture
weights, and every refusal by its message."""

from __future__ import annotations

import json

import pytest

from llmneo.config import RunConfig, parse_config
from llmneo.errors import ConfigError
from llmneo.runtime.identity import differences, run_identity
from llmneo.teachers import member_config, one_teacher_config, parse_teachers, teacher_weights


def options(tmp_path, **extra) -> dict:
    return {"student_model": str(tmp_path), "dataset": str(tmp_path / "rows.jsonl"), **extra}


def test_the_flag_form_tells_a_server_a_cache_and_a_model_apart(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text("{}")
    members = parse_teachers(f"chat=http://127.0.0.1:8000/v1, code={cache},math={tmp_path}")
    assert members == [{"name": "chat", "server": "http://127.0.0.1:8000/v1"}, {"name": "code", "cache": str(cache)},
                       {"name": "math", "model": str(tmp_path)}]


def test_yaml_json_and_keywords_give_the_same_run(tmp_path):
    listed = [{"name": "a", "model": str(tmp_path), "dtype": "float32"},
              {"name": "b", "server": "http://h:1/v1", "top_k": 8, "server_model": "big"}]
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("teachers:\n" + "".join(f"  - {json.dumps(member)}\n" for member in listed))
    from_yaml = parse_config(["--config", str(yaml_file), "--student_model", str(tmp_path), "--dataset", "x.jsonl"])
    from_json = parse_config(["--teachers", json.dumps(listed), "--student_model", str(tmp_path), "--dataset", "x.jsonl"])
    from_keywords = RunConfig.from_options(**options(tmp_path, teachers=listed, dataset="x.jsonl"))
    assert from_yaml.training.teachers == from_json.training.teachers == from_keywords.training.teachers == listed
    # the run's config.yaml holds the list; read back it is the same run
    again = RunConfig.from_options(**options(tmp_path, teachers=from_yaml.resolved()["distill"]["teachers"],
                                             dataset="x.jsonl"))
    assert again.training.teachers == listed


def test_a_member_is_the_one_teacher_run_with_its_settings(tmp_path):
    config = RunConfig.from_options(**options(tmp_path, teacher_top_k=16, dtype="float32", teachers=[
        {"name": "a", "model": str(tmp_path), "cross_tokenizer": "uld", "chat_template": "plain"},
        {"name": "b", "server": "http://h:1/v1", "server_model": "big", "top_k": 4}]))
    a, b = (member_config(config, member) for member in config.training.teachers)
    assert (a.model.teacher_model, a.training.cross_tokenizer, a.model.teacher_chat_template) == (str(tmp_path), "uld",
                                                                                                   "plain")
    assert (a.training.teacher_server, a.training.teacher_top_k, a.model.teacher_dtype) == (None, 16, "float32")
    assert (b.training.teacher_server, b.training.teacher_server_model, b.training.teacher_top_k) == (
        "http://h:1/v1", "big", 4)
    assert (b.model.teacher_model, b.training.cross_tokenizer, b.training.teachers) == (None, None, None)
    assert config.training.teachers[0]["cross_tokenizer"] == "uld"  # the run's own settings are untouched
    assert one_teacher_config(config, "b", "eval").training.teacher_server_model == "big"
    with pytest.raises(ConfigError, match="several teachers \\(a, b\\): choose one with --teacher NAME"):
        one_teacher_config(config, None, "cache-teacher")
    with pytest.raises(ConfigError, match="--teacher c: not one of the run's teachers \\(a, b\\)"):
        one_teacher_config(config, "c", "cache-teacher")


def test_weights_default_to_equal_shares(tmp_path):
    members = [{"name": name, "model": str(tmp_path)} for name in "abc"]
    config = RunConfig.from_options(**options(tmp_path, teachers=members, teacher_routing="mixture"))
    assert teacher_weights(config) == pytest.approx([1 / 3] * 3)
    given = RunConfig.from_options(**options(tmp_path, teachers=members, teacher_routing="mixture",
                                             teacher_weights="0.5,0.25,0.25"))
    assert teacher_weights(given) == [0.5, 0.25, 0.25]


TWO = [{"name": "a", "model": "/m/a"}, {"name": "b", "model": "/m/b"}]


@pytest.mark.parametrize("extra,message", [
    ({"teachers": "a"}, "'a' is not NAME=PATH_OR_URL"),
    ({"teachers": [{"name": "a b", "model": "/m"}]}, "name must be letters, digits"),
    ({"teachers": [{"name": "a", "model": "/m"}, {"name": "a", "model": "/n"}]}, "the name 'a' is given twice"),
    ({"teachers": [{"name": "a", "modle": "/m"}]}, "teacher a: unknown key 'modle'"),
    ({"teachers": [{"name": "a"}]}, "teacher a: give one of model, server or cache"),
    ({"teachers": [{"name": "a", "model": "/m", "server": "http://h/v1"}]}, "give one of model, server or cache"),
    ({"teachers": TWO, "teacher_model": "/m"}, "teacher_model and teachers both given"),
    ({"teachers": TWO, "cross_tokenizer": "exact"}, "cross_tokenizer and teachers both given"),
    ({"teachers": TWO, "teacher_routing": "mixture", "teacher_weights": "0.6,0.6"}, "must sum to 1, got 0.6,0.6"),
    ({"teachers": TWO, "teacher_routing": "mixture", "teacher_weights": "1"}, "gives 1 weights for 2 teachers"),
    ({"teachers": TWO, "teacher_routing": "mixture", "teacher_weights": "1.5,-0.5"}, "must be >= 0"),
    ({"teachers": TWO, "teacher_routing": "mixture", "teacher_weights": "a,b"}, "numbers separated by commas"),
    ({"teachers": TWO, "teacher_weights": "0.5,0.5"}, "teacher_weights is for teacher_routing mixture"),
    ({"teachers": TWO, "packing": True}, "teacher_routing column .* leave --packing off"),
    ({"teachers": TWO, "loss_impl": "liger"}, "loss_impl liger reads one loaded teacher"),
    ({"teachers": TWO, "method": "lora"}, "teachers is for the kd and neo methods, not lora"),
    ({"teachers": TWO, "teacher_offload": True, "teachers_quantized": True}, "bitsandbytes-quantized"),
    ({"teachers": [{"name": "a", "model": "/m"}, {"name": "s", "server": "http://h/v1", "cross_tokenizer": "exact"}]},
     "teacher s: a served teacher must share the student's tokenizer"),
    ({"teacher_weights": "1"}, "teacher_weights is for --teachers"),
    ({"teacher_offload": True}, "teacher_offload is for --teachers"),
])
def test_each_bad_list_is_refused_by_message(tmp_path, extra, message):
    if extra.pop("teachers_quantized", False):
        extra["teachers"] = [{**member, "quantization": "nf4"} for member in extra["teachers"]]
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_options(**options(tmp_path, **extra))


def test_the_identity_names_the_changed_teacher_and_lets_its_server_move(tmp_path):
    def identity(**extra):
        config = RunConfig.from_options(**options(tmp_path, teacher_routing="mixture", **extra))
        return run_identity(config.resolved(), {"sha256": "rows"})

    served = [{"name": "a", "model": str(tmp_path)}, {"name": "s", "server": "http://h:1/v1", "server_model": "big"}]
    base = identity(teachers=served, teacher_weights="0.5,0.5")
    moved = [served[0], {**served[1], "server": "http://other:2/v1", "server_timeout": 5}]
    assert differences(base, identity(teachers=moved, teacher_weights="0.5,0.5")) == []
    assert differences(base, identity(teachers=served, teacher_weights="0.7,0.3")) == [
        "teachers/a/weight: 0.5 -> 0.7", "teachers/s/weight: 0.5 -> 0.3"]
    other_top_k = [served[0], {**served[1], "top_k": 8}]
    assert differences(base, identity(teachers=other_top_k, teacher_weights="0.5,0.5")) == [
        "teachers/s/top_k: None -> 8"]


def test_another_served_model_behind_a_member_is_named():
    """A served member's fingerprint (teacher/sources.ServedTeacher.identity) is compared within the server's noise;
    another served model, or another answer to the probe, refuses the resume naming the teacher."""
    def identity(model: str, shift: float = 0.0, routes: str = "r") -> dict:
        served = {"served_teacher": {"server_model": model, "probe": [[[5, -0.5 + shift], [7, -1.5]]]},
                  "teacher_top_k": 8}
        return {"options": {}, "data": {"sha256": "rows"},
                "teacher": {"teachers": {"a": {}, "s": served}, "routes_sha256": routes}}

    assert differences(identity("big"), identity("big", shift=0.01)) == []
    assert differences(identity("big"), identity("small")) == ["teacher s: the served teacher: 'big' -> 'small'"]
    assert differences(identity("big"), identity("big", shift=0.3)) == [
        "teacher s: the served teacher 'big': its log-probabilities of the probe differ (another model, or other "
        "weights)"]
    assert differences(identity("big"), identity("big", routes="q")) == [
        "which rows name which teacher (the teacher column's values)"]
