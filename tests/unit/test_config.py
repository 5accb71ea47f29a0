"""Config from YAML + flags, the CLI surface, and the vocabulary check before the first step."""

import dataclasses
import logging
import re
import typing

import pytest
import yaml

from conftest import run_flags
from llmneo import cli
from llmneo.config import CONFIG_CLASSES, RunConfig, declared_ranges, option_names, parse_config
from llmneo.errors import ConfigError, VocabularyError
from llmneo.models.vocabulary_check import check_vocabularies
from llmneo.models.loading import load_student, load_tokenizer
from llmneo.teacher.loading import load_teacher
from llmneo.pipeline import distill
from llmneo.training import TokenDistillTrainer


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_flags_override_yaml_and_method_defaults(tmp_path):
    config_file = write_yaml(tmp_path / "run.yaml", {
        "student_model": "s", "teacher_model": "t", "dataset": "d.jsonl", "alpha": 0.2, "lora_r": 16,
        "training": {"num_train_epochs": 2},
    })
    config = parse_config(["--config", config_file, "--alpha", "0.7"])
    assert config.training.alpha == 0.7 and config.adapter.lora_r == 16 and config.training.num_train_epochs == 2
    assert config.adapter.lora_alpha == 32.0  # 2 * r
    assert config.training.learning_rate == 2e-4 and config.training.lr_scheduler_type == "cosine"
    assert config.training.warmup_steps == 0.1 and config.training.max_grad_norm == 1.0
    full = parse_config(["--config", config_file, "--method", "kd"])
    assert full.training.learning_rate == 2e-5
    floor = parse_config(["--config", config_file, "--min_lr_ratio", "0.1"])
    assert floor.training.lr_scheduler_type == "cosine_with_min_lr"
    assert floor.training.lr_scheduler_kwargs == {"min_lr_rate": 0.1}


@pytest.mark.parametrize("flags, message", [
    (["--alpha", "1.5"], r"alpha must be in \[0, 1\], got 1.5"),
    (["--temperature", "0"], r"temperature must be > 0, got 0.0"),
    (["--lora_r", "0"], r"lora_r must be > 0, got 0"),
    (["--method", "neo", "--teacher_model", ""], None),
])
def test_impossible_values_are_rejected(tmp_path, flags, message):
    base = ["--student_model", "s", "--teacher_model", "t", "--dataset", "d.jsonl"]
    if message is None:
        config = parse_config(base + flags)  # an empty string is a value; only a missing teacher is an error
        assert config.model.teacher_model == ""
        with pytest.raises(ConfigError, match="method neo needs teacher_model"):
            parse_config(["--student_model", "s", "--dataset", "d.jsonl"])
        return
    with pytest.raises(ConfigError, match=message):
        parse_config(base + flags)


def test_unknown_yaml_key_and_flag_suggest_the_right_name(tmp_path):
    config_file = write_yaml(tmp_path / "run.yaml", {"student_model": "s", "dataset": "d", "temprature": 2})
    with pytest.raises(ConfigError, match=r"run.yaml: unknown option 'temprature' \(did you mean 'temperature'\?\)"):
        parse_config(["--config", config_file])
    with pytest.raises(ConfigError, match=r"command line: unknown option 'kd_chunk' \(did you mean 'kd_chunk_size'\?\)"):
        parse_config(["--student_model", "s", "--dataset", "d", "--method", "lora", "--kd_chunk", "8"])


def test_cli_prints_config_errors_without_traceback(tmp_path, capsys):
    config_file = write_yaml(tmp_path / "run.yaml", {"student_model": "s", "dataset": "d", "alpah": 0.5})
    assert cli.main(["distill", "--config", config_file]) == 1
    assert "llm-neo distill: error:" in capsys.readouterr().err


def test_distill_help_lists_every_option_with_its_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["distill", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse may wrap after a hyphen
    for name in option_names():
        assert f"--{name}" in text, name
    for cls in CONFIG_CLASSES[:-1]:
        for field in dataclasses.fields(cls):
            help_text = " ".join(field.metadata["help"].split()).replace("%%", "%").replace("- ", "-")
            assert help_text in text, field.name


def test_every_own_field_has_help():
    for cls in CONFIG_CLASSES:
        own = {f.name for f in dataclasses.fields(cls)}
        if cls is CONFIG_CLASSES[-1]:
            own = {f.name for f in dataclasses.fields(cls) if f.name in cls.__dataclass_fields__}
        for name in own:
            assert cls.__dataclass_fields__[name].metadata.get("help"), f"{cls.__name__}.{name} has no help"


def test_padding_only_vocab_difference_is_aligned(models_dir, caplog):
    tokenizer = load_tokenizer(models_dir["student"])
    config = parse_config(["--student_model", models_dir["student"], "--teacher_model", models_dir["teacher_padded"],
                           "--dataset", "d.jsonl"])
    student, teacher = load_student(config.model), load_teacher(config.model)
    with caplog.at_level(logging.WARNING):
        size = check_vocabularies(tokenizer, load_tokenizer(models_dir["teacher_padded"]), student, teacher)
    assert size == len(tokenizer) == teacher.config.vocab_size - 16
    assert re.search(rf"differ only by padding \(student {size}, teacher {size + 16}\)", caplog.text)


def test_vocabulary_check_reads_the_full_shape_of_a_zero3_partitioned_head(models_dir):
    """ZeRO-3 leaves each process an empty lm_head weight and records the full shape in ``ds_shape``."""
    import torch

    from llmneo.lm_head import fused_head_unsupported_reason

    tokenizer = load_tokenizer(models_dir["student"])
    config = parse_config(["--student_model", models_dir["student"], "--teacher_model", models_dir["teacher_padded"],
                           "--dataset", "d.jsonl"])
    student, teacher = load_student(config.model), load_teacher(config.model)
    for model in (student, teacher):
        weight = model.get_output_embeddings().weight
        full_shape, weight.data = weight.shape, torch.empty(0)
        weight.ds_shape = full_shape
    assert check_vocabularies(tokenizer, load_tokenizer(models_dir["teacher_padded"]), student, teacher) == len(tokenizer)
    assert fused_head_unsupported_reason(student) == "its lm_head weight is sharded (FSDP2 or ZeRO-3)"


@pytest.mark.e2e
def test_padded_teacher_trains(models_dir, train_file, tmp_path):
    summary = distill(parse_config(run_flags(models_dir, train_file, tmp_path, teacher=models_dir["teacher_padded"])))
    assert summary.steps == 3


def test_different_tokenizer_is_rejected_before_the_first_step(models_dir, train_file, tmp_path, monkeypatch):
    monkeypatch.setattr(TokenDistillTrainer, "train", lambda *a, **k: pytest.fail("training started"))
    flags = run_flags(models_dir, train_file, tmp_path, teacher=models_dir["teacher_other_tokenizer"])
    with pytest.raises(VocabularyError, match=r"teacher and student tokenizers differ on \d+ of \d+ shared ids.*"
                                              r"add --cross_tokenizer exact \(or uld, hybrid\)"):
        distill(parse_config(flags))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_missing_model_path_is_named(train_file, tmp_path):
    flags = ["--method", "lora", "--student_model", str(tmp_path / "no-such-model"), "--dataset", train_file,
             "--output_dir", str(tmp_path / "run")]
    with pytest.raises(ConfigError, match=r"student model path .*no-such-model does not exist"):
        distill(parse_config(flags))


def test_shipped_configs_parse(tmp_path):
    from pathlib import Path

    for path in sorted(Path(__file__).parents[2].glob("configs/*.yaml")):
        config = parse_config(["--config", str(path), "--bf16", "false"])  # bf16 needs a GPU
        assert config.model.student_model and config.data.dataset, path


def test_the_options_reference_lists_every_own_option():
    from pathlib import Path

    reference = (Path(__file__).parents[2] / "docs" / "options.md").read_text()
    for cls in CONFIG_CLASSES[:-1]:
        for field in dataclasses.fields(cls):
            assert f"| `{field.name}` |" in reference, field.name


def range_ends():
    """(option, value, refused) at both ends of every declared range: an open end and a value just past a closed end
    are refused; a closed end is taken."""
    cases = []
    for section in CONFIG_CLASSES:
        types = typing.get_type_hints(section)
        for name, rule in declared_ranges(section):
            step = 1 if int in (types[name], *typing.get_args(types[name])) else 1e-3
            for end, open_end, past in ((rule.low, rule.low_open, rule.low - step), (rule.high, rule.high_open, None)):
                if end is None:
                    continue
                cases.append((name, end, open_end))
                if not open_end:
                    cases.append((name, past if past is not None else end + step, True))
    return cases


@pytest.mark.parametrize("name, value, refused", range_ends())
def test_every_declared_range_is_checked_at_both_ends(name, value, refused):
    """A range off by one (> for >=, a missing upper end) would take a value it must refuse, or the reverse."""
    flags = ["--student_model", "s", "--teacher_model", "t", "--dataset", "d.jsonl", f"--{name}", str(value)]
    if not refused:
        parse_config(flags)
        return
    with pytest.raises(ConfigError, match=rf"^{name} must be (in [\[(]|>)"):
        parse_config(flags)


def test_stray_positional_argument_is_rejected():
    with pytest.raises(ConfigError, match=r"unexpected argument\(s\) \['oops'\]"):
        parse_config(["--student_model", "s", "--dataset", "d", "--method", "lora", "oops"])


@pytest.mark.parametrize("flags, message", [
    (["--teacher_model", "t"], "give one teacher: teacher_server, teacher_model or teacher_cache"),
    (["--teacher_cache", "c"], "give one teacher: teacher_server, teacher_model or teacher_cache"),
    (["--method", "lora"], "teacher_server is for the kd and neo methods, not lora"),
    (["--cross_tokenizer", "exact"], "a served teacher must share the student's tokenizer"),
    (["--loss_impl", "liger"], r"loss_impl liger needs a loaded teacher's hidden states .*, not a teacher_server: use"),
    (["--teacher_top_k", "0"], "teacher_top_k must be >= 1, got 0"),
    (["--teacher_server_retries", "-1"], "teacher_server_retries must be >= 0, got -1"),
    (["--teacher_server_timeout", "0"], "teacher_server_timeout must be > 0"),
    (["--dataloader_num_workers", "2"], "leave dataloader_num_workers at 0"),
])
def test_served_teacher_options_are_checked(flags, message):
    base = ["--student_model", "s", "--dataset", "d.jsonl", "--teacher_server", "http://127.0.0.1:1/v1"]
    with pytest.raises(ConfigError, match=message):
        parse_config(base + flags)


def test_a_served_teacher_is_a_teacher():
    config = parse_config(["--student_model", "s", "--dataset", "d.jsonl", "--teacher_server", "http://h:1/v1"])
    assert config.training.teacher_server == "http://h:1/v1" and config.training.teacher_top_k == 64


@pytest.mark.parametrize("flags,message", [
    (["--on_policy_fraction", "1.5"], r"on_policy_fraction must be in \[0, 1\], got 1.5"),
    (["--on_policy_fraction", "0.5", "--method", "lora"], "on_policy_fraction is for the kd and neo methods"),
    (["--on_policy_fraction", "0.5", "--teacher_cache", "c"], "does not work with a teacher_cache"),
    (["--on_policy_fraction", "0.5", "--packing", "true"], "does not work with packing"),
    (["--on_policy_fraction", "0.5", "--rollout_max_new_tokens", "0"], "rollout_max_new_tokens must be >= 1, got 0"),
    (["--on_policy_fraction", "0.5", "--rollout_top_p", "0"], r"rollout_top_p must be in \(0, 1\], got 0"),
    (["--on_policy_fraction", "0.5", "--rollout_temperature", "-1"], r"rollout_temperature must be 0 \(greedy\) or >= 0.001"),
    (["--on_policy_fraction", "0.5", "--rollout_temperature", "1e-45"], r"rollout_temperature must be 0 \(greedy\) or >= 0.001.*got 1e-45"),
    (["--on_policy_fraction", "0.5", "--on_policy_loss", "sampled", "--temperature", "2"],
     "on_policy_loss sampled is the reverse-KL estimator at T = 1: --temperature 2.0 is refused"),
])
def test_on_policy_options_are_checked(flags, message):
    base = ["--student_model", "s", "--dataset", "d.jsonl", "--teacher_model", "t"]
    if "--teacher_cache" in flags:
        base = base[:-2]
    with pytest.raises(ConfigError, match=message):
        parse_config(base + flags)


ROLLOUT_SERVER = ["--rollout_server", "http://127.0.0.1:1/v1"]


@pytest.mark.parametrize("flags,message", [
    (ROLLOUT_SERVER, "rollout_server generates on-policy rollouts: set --on_policy_fraction"),
    ([*ROLLOUT_SERVER, "--on_policy_fraction", "1", "--method", "kd"],
     "method kd trains every weight \\(there is no adapter to send\\): use --method neo"),
    ([*ROLLOUT_SERVER, "--on_policy_fraction", "1", "--adapter", "dora"], "vLLM serves no DoRA adapter"),
    ([*ROLLOUT_SERVER, "--on_policy_fraction", "1", "--peft_options", '{"use_dora": true}'], "vLLM serves no DoRA"),
    ([*ROLLOUT_SERVER, "--on_policy_fraction", "1", "--rollout_sync_steps", "0"], "rollout_sync_steps must be >= 1"),
    ([*ROLLOUT_SERVER, "--on_policy_fraction", "1", "--rollout_server_timeout", "0"], "rollout_server_timeout must be > 0"),
    ([*ROLLOUT_SERVER, "--on_policy_fraction", "1", "--rollout_server_retries", "-1"], "rollout_server_retries must be >= 0"),
])
def test_rollout_server_options_are_checked(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(["--student_model", "s", "--dataset", "d.jsonl", "--teacher_model", "t", *flags])


def test_a_rollout_server_run_with_moslora_or_pissa_is_taken():
    """MoSLoRA (mixer folded) and PiSSA (converted to rank 2r) have a plain-LoRA form vLLM serves."""
    for adapter in ("moslora", "pissa", "rslora"):
        config = parse_config(["--student_model", "s", "--dataset", "d.jsonl", "--teacher_model", "t", *ROLLOUT_SERVER,
                               "--on_policy_fraction", "1", "--adapter", adapter])
        assert config.training.rollout_sync_steps == 1 and config.training.rollout_server_timeout == 300


@pytest.mark.parametrize("flags, named", [
    (["--teacher_model", "t", "--cross_tokenizer", "exact"], "cross_tokenizer exact"),
    (["--teacher_model", "t", "--on_policy_fraction", "0.5"], "on_policy_fraction"),
    (["--teacher_cache", "c"], "a teacher_cache"),
])
def test_liger_is_refused_once_for_every_other_teacher_signal(flags, named):
    with pytest.raises(ConfigError, match=rf"loss_impl liger needs a loaded teacher's hidden states on the student's "
                                          rf"own tokens \(it is for --task causal_lm\), not {named}"):
        parse_config(["--student_model", "s", "--dataset", "d.jsonl", "--loss_impl", "liger", *flags])
    parse_config(["--student_model", "s", "--dataset", "d.jsonl", "--loss_impl", "liger", "--teacher_model", "t"])


def test_local_paths_are_recorded_absolute_and_hub_ids_and_split_names_as_given(tmp_path, monkeypatch):
    """A run's config.yaml must name its models and data wherever eval, merge or generate run from."""
    (tmp_path / "models" / "student").mkdir(parents=True)
    for name in ("a.jsonl", "b1.jsonl", "held.jsonl"):
        (tmp_path / name).write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    config = parse_config(["--student_model", "models/student", "--teacher_model", "org/teacher",
                           "--dataset", "a.jsonl, b*.jsonl,org/data", "--eval_split", "held.jsonl,test"])
    assert config.model.student_model == str(tmp_path / "models" / "student")
    assert config.model.teacher_model == "org/teacher"  # nothing of that name here: a hub id
    assert config.data.dataset == f"{tmp_path / 'a.jsonl'},{tmp_path / 'b*.jsonl'},org/data"
    assert config.data.eval_split == f"{tmp_path / 'held.jsonl'},test"


def test_keyword_options_equal_the_command_line(tmp_path):
    """RunConfig.from_options takes the command line's option names with Python values, over a YAML file over a
    recipe, and resolves the same defaults."""
    config_file = write_yaml(tmp_path / "run.yaml", {"alpha": 0.2, "training": {"num_train_epochs": 2}})
    flags = ["--recipe", "sst2", "--config", config_file, "--student_model", "s", "--teacher_model", "t",
             "--dataset", "d.jsonl", "--lora_r", "8", "--learning_rate", "1e-3", "--bf16", "false"]
    from_flags = parse_config(flags)
    from_keywords = RunConfig.from_options(recipe="sst2", config=config_file, student_model="s", teacher_model="t",
                                           dataset="d.jsonl", lora_r=8, learning_rate=1e-3, bf16=False)
    assert from_keywords.to_dict() == from_flags.to_dict()
    assert from_keywords.training.alpha == 0.2 and from_keywords.training.temperature == 2.0  # YAML, recipe


def test_a_config_round_trips_through_yaml(tmp_path):
    config = RunConfig.from_options(student_model="s", teacher_model="t", dataset="d.jsonl", lora_r=8, alpha=0.3,
                                    divergence="jsd", max_steps=5)
    again = RunConfig.from_yaml(config.to_yaml(tmp_path / "config.yaml"))
    assert again.to_dict() == config.to_dict()
    assert RunConfig.from_yaml(tmp_path / "config.yaml", alpha=0.9).training.alpha == 0.9


@pytest.mark.parametrize("options, message", [
    ({"lora_rr": 8}, r"RunConfig.from_options: unknown option 'lora_rr' \(did you mean 'lora_r'\?\)"),
    ({"alpha": "0.5"}, r"alpha must be a number, got '0.5' \(str\)"),
    ({"lora_r": 8.0}, r"lora_r must be an integer, got 8.0 \(float\)"),
    ({"packing": 1}, r"packing must be True or False, got 1 \(int\)"),
    ({"lora_r": True}, r"lora_r must be an integer, got True \(bool\)"),
    ({"divergence": "kl"}, r"divergence must be one of \['forward_kl', .*'akl'\], got 'kl' \(str\)"),
    ({"alpha": 1.5}, r"alpha must be in \[0, 1\], got 1.5"),
    ({"recipe": "sst3"}, r"unknown recipe 'sst3'; expected one of \['sst2'\]"),
])
def test_keyword_options_are_checked_as_flags_are(options, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_options(**{"student_model": "s", "teacher_model": "t", "dataset": "d.jsonl", **options})


def test_an_integer_is_taken_where_a_number_is_declared():
    config = RunConfig.from_options(student_model="s", teacher_model="t", dataset="d.jsonl", temperature=2, alpha=0)
    assert (config.training.temperature, config.training.alpha) == (2, 0)


def test_rows_given_as_objects_stand_in_the_config_by_name():
    import datasets

    rows = [{"text": "a b c"}, {"text": "d e f"}]
    config = RunConfig.from_options(student_model="s", method="sft", dataset=datasets.Dataset.from_list(rows),
                                    eval_split=rows)
    assert config.data.dataset.startswith("memory:train-") and config.data.eval_split.startswith("memory:eval-")
