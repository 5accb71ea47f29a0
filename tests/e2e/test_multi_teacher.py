"""Several teachers through `llm-neo distill`, `cache-teacher` and `eval`: a mixture weighted (1, 0) and column
routing with every row naming one teacher each train exactly that teacher's one-teacher run; a SIGKILLed run
resumes to the uninterrupted one; a changed teacher refuses the resume by name; bad rows by message."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import checkout_env, run_flags, write_jsonl
from killer import KILLER
from llmneo import cli
from llmneo.demo.tiny import corpus_rows

pytestmark = pytest.mark.e2e


def routed_rows(tmp_path, teacher_of) -> str:
    """The tiny corpus's first 48 rows, each naming its teacher (``teacher_of``: row index -> name or None)."""
    return write_jsonl(tmp_path / "routed.jsonl", [{**row, "teacher": teacher_of(i)}
                                                   for i, row in enumerate(corpus_rows()[:48])])


def teachers(models_dir, char_teacher) -> str:
    return json.dumps([{"name": "same", "model": models_dir["teacher"]},
                       {"name": "char", "model": char_teacher, "cross_tokenizer": "exact"}])


def several(models_dir, data, out, char_teacher, **extra) -> list[str]:
    """`distill` flags of a neo run over the two teachers (run_flags' one teacher taken out)."""
    flags = run_flags(models_dir, data, out, max_length=256, **extra)
    at = flags.index("--teacher_model")
    return ["distill", *flags[:at], *flags[at + 2:], "--teachers", teachers(models_dir, char_teacher)]


def adapter(run_dir) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def logged(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "kd_loss" in json.loads(line)]


def assert_same_adapter(ours, reference) -> None:
    for name, weight in adapter(reference).items():
        torch.testing.assert_close(adapter(ours)[name], weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("routing", ["mixture", "column"])
def test_one_teacher_of_the_list_trains_that_teachers_run(models_dir, char_teacher, tmp_path, routing):
    """Mixture (1, 0), and column with every row naming "same": the adapter of `--teacher_model same` (1e-6)."""
    data = routed_rows(tmp_path, lambda i: "same")
    alone = tmp_path / "alone"
    assert cli.main(["distill", *run_flags(models_dir, data, alone, max_length=256)]) == 0
    listed = tmp_path / "listed"
    extra = {"teacher_routing": routing, **({"teacher_weights": "1,0"} if routing == "mixture" else {})}
    assert cli.main(several(models_dir, data, listed, char_teacher, **extra)) == 0
    assert_same_adapter(listed, alone)
    ours, theirs = logged(listed), logged(alone)
    assert [line["kd_loss"] for line in ours] == pytest.approx([line["kd_loss"] for line in theirs], rel=1e-6)
    assert [line["kd_loss/same"] for line in ours] == [line["kd_loss"] for line in ours]
    if routing == "column":
        assert all(line["teacher_rows/same"] == 1 and line["kd_loss/char"] == 0 for line in ours)
    else:
        assert all("kd_loss/char" not in line for line in ours)  # weight 0: not run


STEPS = {"max_steps": 6, "save_strategy": "steps", "save_steps": 2, "logging_steps": 1}


@pytest.mark.parametrize("routing", ["mixture", "column"])
def test_a_killed_run_resumes_to_the_uninterrupted_one(models_dir, char_teacher, tmp_path, routing):
    data = routed_rows(tmp_path, lambda i: ["same", "char", None][i % 3])
    extra = {**STEPS, "teacher_routing": routing, **({"teacher_weights": "0.3,0.7"} if routing == "mixture" else {})}
    straight = tmp_path / "straight"
    assert cli.main(several(models_dir, data, straight, char_teacher, **extra)) == 0
    lines = logged(straight)
    for line in lines:  # the combined term and each teacher's beside it
        expected = (0.3 * line["kd_loss/same"] + 0.7 * line["kd_loss/char"] if routing == "mixture"
                    else line["kd_loss/same"] + line["kd_loss/char"])
        assert line["kd_loss"] == pytest.approx(expected, rel=1e-5) and line["kd_loss/char"] > 0
    if routing == "column":
        shares = [line["teacher_rows/same"] + line["teacher_rows/char"] + line["teacher_rows/none"] for line in lines]
        assert shares == pytest.approx([1.0] * 6) and sum(line["teacher_rows/none"] for line in lines) > 0
    card = (straight / "README.md").read_text()  # the last logged terms, each teacher's beside the combined one
    assert all(f"final {key} | {lines[-1][key]} |" in card for key in ("kd_loss", "kd_loss/same", "kd_loss/char"))
    killed = tmp_path / "killed"
    result = subprocess.run([sys.executable, "-c", KILLER, "step", "3",
                             *several(models_dir, data, killed, char_teacher, **extra)],
                            capture_output=True, text=True, env=checkout_env(OMP_NUM_THREADS="1"))
    assert result.returncode == -9, result.stderr[-2000:]
    resume = [*several(models_dir, data, killed, char_teacher, **extra), "--resume_from_checkpoint", "latest"]
    assert cli.main(resume) == 0
    assert_same_adapter(killed, straight)
    assert [line["loss"] for line in logged(killed)] == pytest.approx([line["loss"] for line in lines], rel=1e-6)


def test_a_changed_teacher_refuses_the_resume_by_name(models_dir, char_teacher, tmp_path, capsys):
    data = routed_rows(tmp_path, lambda i: "same")
    own_char = tmp_path / "char"  # a copy whose weights the test rewrites
    import shutil
    shutil.copytree(char_teacher, own_char)
    listed = json.dumps([{"name": "same", "model": models_dir["teacher"]},
                         {"name": "char", "model": str(own_char), "cross_tokenizer": "exact"}])

    def flags(weights: str) -> list[str]:
        base = several(models_dir, data, tmp_path / "run", char_teacher, **{**STEPS, "max_steps": 2,
                                                                            "teacher_routing": "mixture"})
        return [*base[:-1], listed, "--teacher_weights", weights]

    assert cli.main(flags("0.5,0.5")) == 0
    capsys.readouterr()
    assert cli.main([*flags("0.6,0.4"), "--max_steps", "4", "--resume_from_checkpoint", "latest"]) == 1
    assert "teachers/char/weight: 0.5 -> 0.4" in capsys.readouterr().err
    weights = own_char / "model.safetensors"
    tensors = load_file(weights)
    tensors = {name: value + 0.01 if name.endswith("norm.weight") else value for name, value in tensors.items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    assert cli.main([*flags("0.5,0.5"), "--max_steps", "4", "--resume_from_checkpoint", "latest"]) == 1
    assert f"the teacher char {own_char}: its weights changed since the checkpoint" in capsys.readouterr().err


def test_bad_rows_and_lists_are_refused_by_message(models_dir, char_teacher, tmp_path, capsys):
    data = routed_rows(tmp_path, lambda i: "maths" if i == 4 else "same")
    out = tmp_path / "run"
    assert cli.main(several(models_dir, data, out, char_teacher)) == 1
    err = capsys.readouterr().err
    assert f"file {data}, row 5, field 'teacher': names teacher 'maths', which is not one of --teachers (same, char)" \
        in err and "Traceback" not in err and not (out / "adapter").exists()
    assert cli.main([*several(models_dir, data, out, char_teacher), "--skip_bad_rows", "true"]) == 0
    assert "47 rows used, 1 skipped" in (out / "README.md").read_text()
    both = json.dumps([{"name": "a", "model": char_teacher, "cross_tokenizer": "exact"},
                       {"name": "b", "model": char_teacher, "cross_tokenizer": "uld"}])
    flags = several(models_dir, data, tmp_path / "two", char_teacher, teacher_routing="mixture")
    assert cli.main([*flags[:-1], both]) == 1
    assert "teachers a and b both read their own rendering of each row" in capsys.readouterr().err


def test_cache_teacher_of_one_teacher_and_eval_against_each(models_dir, char_teacher, tmp_path, capsys):
    """`cache-teacher --teacher same` captures that teacher of the list; the run reads it as that teacher's cache
    (every id kept: the online run's terms, 1e-4); `eval` reports each loaded teacher's figures; `generate
    --teacher same` answers as that teacher's model does."""
    data = routed_rows(tmp_path, lambda i: ["same", "char"][i % 2])
    online = tmp_path / "online"
    assert cli.main(several(models_dir, data, online, char_teacher, eval_ratio=0.2)) == 0
    cache = tmp_path / "cache"
    capture = several(models_dir, data, tmp_path / "unused", char_teacher, eval_ratio=0.2)[1:]
    assert cli.main(["cache-teacher", "--cache_dir", str(cache), "--top_k", "100000", "--cache_dtype", "float32",
                     "--teacher", "same", *capture]) == 0
    cached = tmp_path / "cached"
    listed = json.dumps([{"name": "same", "cache": str(cache), "model": models_dir["teacher"]},
                         {"name": "char", "model": char_teacher, "cross_tokenizer": "exact"}])
    flags = several(models_dir, data, cached, char_teacher, eval_ratio=0.2)
    assert cli.main([*flags[:-1], listed]) == 0
    ours, theirs = logged(cached), logged(online)
    assert [line["kd_loss/same"] for line in ours] == pytest.approx([line["kd_loss/same"] for line in theirs],
                                                                    rel=1e-4)
    assert cli.main(["eval", str(online), "--bootstrap", "0", "--on_policy", "--on_policy_max_new_tokens", "4"]) == 0
    report = json.loads((online / "eval.json").read_text())
    assert set(report["teachers"]) == {"same", "char"} and "on_policy" not in report
    for name in ("same", "char"):  # the student's answers scored by each teacher
        assert math.isfinite(report["teachers"][name]["on_policy"]["on_policy_reverse_kl"])
    assert math.isfinite(report["teachers"]["same"]["held_out"]["kl_to_teacher"])
    assert math.isfinite(report["teachers"]["char"]["held_out"]["aligned_kl"])
    assert "kl_to_teacher" not in report["held_out"] and report["held_out"]["bits_per_byte"] > 0
    assert cli.main(["eval", str(online), "--bootstrap", "0", "--teacher", "char"]) == 0
    assert set(json.loads((online / "eval.json").read_text())["teachers"]) == {"char"}
    capsys.readouterr()
    assert cli.main(["eval", str(online), "--teacher", "maths"]) == 1
    assert "eval --teacher maths: not one of the run's teachers (same, char)" in capsys.readouterr().err
    prompt = ["generate", "--prompt", "Why is the sky blue?", "--max_new_tokens", "6"]
    assert cli.main([*prompt, models_dir["teacher"]]) == 0
    alone = capsys.readouterr().out
    assert cli.main([*prompt, str(online), "--teacher", "same"]) == 0 and capsys.readouterr().out == alone
    assert cli.main([*prompt, str(online), "--teacher"]) == 1
    assert "generate: the run has several teachers (same, char): choose one with --teacher NAME" \
        in capsys.readouterr().err
    assert cli.main([*prompt, str(online), "--teacher", "maths"]) == 1
    assert "generate --teacher maths: not one of the run's teachers (same, char)" in capsys.readouterr().err


@pytest.mark.parametrize("routing", ["column", "mixture"])
def test_on_policy_steps_score_the_students_answers_with_each_rows_teachers(models_dir, char_teacher, tmp_path,
                                                                           routing):
    """Rollouts of rows naming either teacher (the character-level one renders the student's answers itself)."""
    data = routed_rows(tmp_path, lambda i: ["same", "char"][i % 2])
    out = tmp_path / "run"
    assert cli.main(several(models_dir, data, out, char_teacher, teacher_routing=routing, max_steps=4,
                            on_policy_fraction=0.5, rollout_max_new_tokens=8, on_policy_loss="sampled",
                            temperature=1.0)) == 0
    lines = logged(out)
    assert [line["on_policy"] for line in lines] == [0, 1, 0, 1]
    for line in lines:
        assert math.isfinite(line["kd_loss/same"]) and math.isfinite(line["kd_loss/char"])
        if line["on_policy"]:
            assert line["ce_loss"] == 0 and line["rollout_tokens"] > 0
        if routing == "column":  # every row names one (shuffled batches: the shares vary)
            assert line["teacher_rows/same"] + line["teacher_rows/char"] == 1 and line["teacher_rows/none"] == 0
    # a row naming no teacher has no teacher to score its answers: refused by row before training
    none = routed_rows(tmp_path, lambda i: None if i == 2 else "same")
    assert cli.main(several(models_dir, none, tmp_path / "none", char_teacher, on_policy_fraction=0.5)) == 1
