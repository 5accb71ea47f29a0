"""Run integrity: a run directory belongs to one run, resume only what matches, merge only what finished, and
nothing that is silently wrong (issue 16). Each test reproduces one everyday mistake and asserts the refusal or the
correct result by message and by file contents."""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from conftest import checkout_env, run_flags, save_model
from llmneo import cli
from llmneo.config import parse_config
from llmneo.demo.tiny import build_tiny_llama
from llmneo.errors import ConfigError, NonFiniteError
from llmneo.losses.divergences import kl_from_log_probs
from llmneo.pipeline import distill

STEPS = {"max_steps": 6, "save_strategy": "steps", "save_steps": 2, "logging_steps": 1}


class Interrupted(Exception):
    pass


class InterruptAfter(TrainerCallback):
    """Stops the run (as a crash would) right after optimizer step ``step``."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupted(f"stopped after step {self.step}")


def run_config(models_dir, train_file, out, **extra):
    return parse_config(run_flags(models_dir, train_file, out, **{**STEPS, **extra}))


def adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def summary_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [entry for entry in lines if "train_runtime" in entry]


@pytest.fixture(scope="module")
def finished(models_dir, train_file, tmp_path_factory):
    """An uninterrupted run: 6 steps, checkpoints every 2."""
    out = tmp_path_factory.mktemp("integrity") / "finished"
    distill(run_config(models_dir, train_file, out))
    return out


def interrupted_run(models_dir, train_file, out, step=3):
    with pytest.raises(Interrupted):
        distill(run_config(models_dir, train_file, out), [InterruptAfter(step)])
    return out


# ---- 1. a finished run is never overwritten without a word --------------------------------------------------------

@pytest.mark.e2e
def test_a_directory_holding_a_run_is_refused_and_overwrite_clears_it(models_dir, train_file, tmp_path, finished):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = adapter(run)
    with pytest.raises(ConfigError, match=r"output_dir .*run already holds a finished neo run \(6 steps, .*\): choose "
                                          r"another --output_dir, pass --overwrite_output_dir true"):
        distill(run_config(models_dir, train_file, run, learning_rate=0.05))
    for name, weight in adapter(run).items():
        assert torch.equal(weight, before[name])  # nothing was touched
    (run / "eval.json").write_text("{}")  # a stale file that would contradict the new model card
    distill(run_config(models_dir, train_file, run, learning_rate=0.05, overwrite_output_dir="true"))
    assert not (run / "eval.json").exists()
    assert not torch.equal(adapter(run)["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"],
                           before["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


@pytest.mark.e2e
def test_an_interrupted_run_is_named_by_its_step(models_dir, train_file, tmp_path):
    run = interrupted_run(models_dir, train_file, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"already holds an interrupted neo run \(newest complete checkpoint at "
                                          r"step 2, started .*\)"):
        distill(run_config(models_dir, train_file, run))


# ---- 2 + 6 + 7. resume only the same run; summaries equal the uninterrupted run's ---------------------------------

@pytest.mark.e2e
def test_resume_refuses_other_settings_and_data_naming_each(models_dir, train_file, tmp_path):
    run = interrupted_run(models_dir, train_file, tmp_path / "run")
    cases = [({"learning_rate": 0.02}, r"learning_rate: 0\.01 -> 0\.02"),
             ({"alpha": 0.3}, r"alpha: 0\.5 -> 0\.3"),
             ({"max_samples": 40}, r"training data: 48 rows / \d+ answer tokens of .* -> 40 rows"),
             ({"learning_rate": 0.02, "temperature": 2.0}, r"learning_rate: 0\.01 -> 0\.02; temperature: 1\.0 -> 2\.0")]
    for extra, message in cases:
        with pytest.raises(ConfigError, match=r"cannot resume .*checkpoint-2: it belongs to a run with other settings "
                                              r"\(.*" + message):
            distill(run_config(models_dir, train_file, run, resume_from_checkpoint="latest", **extra))


@pytest.mark.e2e
def test_resume_with_an_allowed_change_equals_the_uninterrupted_run(models_dir, train_file, tmp_path, finished):
    run = interrupted_run(models_dir, train_file, tmp_path / "run")
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "loss": 1.2')  # torn last line: the process died writing
    summary = distill(run_config(models_dir, train_file, run, resume_from_checkpoint="latest", logging_steps=2))
    assert summary.steps == 6
    for name, weight in adapter(finished).items():
        torch.testing.assert_close(adapter(run)[name], weight, rtol=1e-6, atol=1e-6)
    expected, got = summary_lines(finished), summary_lines(run)
    assert len(got) == 1 and len(expected) == 1
    assert got[0]["train_loss"] == pytest.approx(expected[0]["train_loss"], rel=1e-6)
    assert summary.final_metrics["train_loss"] == pytest.approx(expected[0]["train_loss"], rel=1e-5)
    card = (run / "README.md").read_text()
    assert f"| final train_loss | {summary.final_metrics['train_loss']} |" in card


@pytest.mark.e2e
def test_resuming_a_finished_run_keeps_its_summary(models_dir, train_file, tmp_path, finished):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    expected = summary_lines(finished)[0]["train_loss"]
    summary = distill(run_config(models_dir, train_file, run, resume_from_checkpoint="latest"))
    assert summary.final_metrics["train_loss"] == pytest.approx(expected, rel=1e-5)
    assert summary.final_metrics["train_loss"] != 0.0
    lines = summary_lines(run)
    assert len(lines) == 1 and lines[0]["train_loss"] == pytest.approx(expected, rel=1e-6)


def test_a_torn_line_in_the_middle_of_metrics_is_an_error(tmp_path):
    from llmneo.runtime.layout import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ConfigError, match=r"metrics.jsonl line 2 is not valid JSON .*: the file is damaged"):
        read_metrics(path)
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}]


# ---- 3. one process per run directory -------------------------------------------------------------------------------

class StopAfter(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def wait_for(condition, seconds=120.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.e2e
def test_a_second_process_is_refused_and_a_killed_holder_does_not_block_resume(models_dir, train_file, tmp_path):
    run = tmp_path / "run"
    options = {"max_steps": 100000, "save_strategy": "steps", "save_steps": 2, "save_total_limit": 2}
    flags = ["distill", *run_flags(models_dir, train_file, run, **options)]
    command = [sys.executable, "-m", "llmneo", *flags]
    # stderr goes to a file: an unread pipe fills and blocks the holder; checkpoints rotate (limit 2), so the test
    # waits for any complete one rather than checkpoint-2, which a fast machine deletes between two polls
    holder_log = open(tmp_path / "holder.stderr", "w")
    holder = subprocess.Popen(command, env=checkout_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                              stderr=holder_log, text=True)
    try:
        lock = run / ".llmneo.lock"
        alive = lambda: holder.poll() is None or pytest.fail((tmp_path / "holder.stderr").read_text())  # noqa: E731
        assert wait_for(lambda: alive() and lock.is_file() and f'"pid": {holder.pid}' in lock.read_text())
        assert wait_for(lambda: alive() and any(run.glob("checkpoint-*/llmneo_checkpoint_complete")))
        started = time.time()
        with pytest.raises(ConfigError, match=f"is in use by another llm-neo process \\(llm-neo distill with pid "
                                              f"{holder.pid} on host "):
            distill(parse_config(run_flags(models_dir, train_file, run, **options)))
        assert time.time() - started < 5  # refused at once, before any data or model is loaded
        second = subprocess.run(command, env=checkout_env(OMP_NUM_THREADS="1"), capture_output=True, text=True)
        assert second.returncode == 1
        assert f"is in use by another llm-neo process (llm-neo distill with pid {holder.pid} on host " in second.stderr
    finally:
        holder.kill()
        holder.wait()
        holder_log.close()
    assert holder.returncode == -9
    from llmneo.runtime.checkpoints import checkpoint_step
    from llmneo.runtime.resume import resolve_checkpoint

    resumed_from = checkpoint_step(resolve_checkpoint(run, "latest"))
    summary = distill(parse_config(run_flags(models_dir, train_file, run, resume_from_checkpoint="latest", **options)),
                      [StopAfter(resumed_from + 2)])
    assert summary.steps >= resumed_from + 2


def test_the_lock_is_exclusive_and_released(tmp_path):
    from llmneo.runtime.lock import DirectoryLock

    with DirectoryLock(tmp_path, "first"):
        script = f"from llmneo.runtime.lock import DirectoryLock\nwith DirectoryLock({str(tmp_path)!r}, 'second'): pass"
        refused = subprocess.run([sys.executable, "-c", script], env=checkout_env(), capture_output=True, text=True)
        assert refused.returncode == 1 and f"(first with pid {os.getpid()} on host" in refused.stderr
    with DirectoryLock(tmp_path, "again"):
        pass


# ---- 4. merge, eval and export only what finished, into the base it was trained on ----------------------------------

@pytest.mark.e2e
def test_merge_eval_and_export_refuse_an_unfinished_run(models_dir, train_file, tmp_path, capsys):
    run = interrupted_run(models_dir, train_file, tmp_path / "run")
    for command in (["merge", str(run), "--output", str(tmp_path / "merged")], ["eval", str(run)],
                    ["export-lora", str(run), "--output", str(tmp_path / "plain")]):
        assert cli.main(command) == 1
        error = capsys.readouterr().err
        assert f"{run} holds a run that did not finish (interrupted at step 2): resume it with" in error, error
        verb = "merge" if command[0] == "eval" else command[0]
        assert f"checkpoint-2 explicitly (llm-neo {verb} {run / 'checkpoint-2'} --output DIR)" in error
    assert not (tmp_path / "merged").exists() and not (tmp_path / "plain").exists()
    assert cli.main(["merge", str(run / "checkpoint-2"), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.num_hidden_layers == 2


@pytest.mark.e2e
def test_merge_refuses_a_base_whose_weights_changed(models_dir, train_file, tmp_path, tokenizer, capsys):
    student = save_model(tmp_path / "student", AutoModelForCausalLM.from_pretrained(models_dir["student"]), tokenizer)
    run = tmp_path / "run"
    distill(parse_config(run_flags({**models_dir, "student": student}, train_file, run)))
    assert cli.main(["merge", str(run), "--output", str(tmp_path / "ok")]) == 0
    shutil.rmtree(student)
    save_model(Path(student), build_tiny_llama(tokenizer, hidden_size=32, seed=99), tokenizer)  # same shapes
    assert cli.main(["merge", str(run), "--output", str(tmp_path / "wrong")]) == 1
    assert "is not the base the adapter in" in capsys.readouterr().err
    assert not (tmp_path / "wrong").exists()


# ---- 5. a non-finite teacher is an error, not a perfect match ---------------------------------------------------------

def test_kl_keeps_nan_and_zero_probabilities_give_zero():
    log_p = torch.tensor([[math.log(0.5), math.log(0.5), -math.inf], [float("nan"), 0.0, 0.0]])
    log_q = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]), -1)
    kl = kl_from_log_probs(log_p, log_q)
    assert torch.isfinite(kl[0]) and kl[0] > 0
    assert torch.isnan(kl[1])


@pytest.fixture
def nan_teacher(models_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(models_dir["teacher"])
    with torch.no_grad():
        model.get_output_embeddings().weight[7] = float("nan")
    return save_model(tmp_path / "nan-teacher", model, AutoTokenizer.from_pretrained(models_dir["teacher"]))


@pytest.mark.e2e
def test_eval_and_cache_refuse_a_nonfinite_teacher(models_dir, train_file, tmp_path, nan_teacher, capsys):
    from llmneo.evaluation.evaluate import EvalRequest, evaluate_target

    with pytest.raises(NonFiniteError, match=r"the teacher's logits on the held-out rows are not finite \(NaN or inf\) "
                                             r"at \d+ answer positions of rows \[0, 1, 2"):
        evaluate_target(EvalRequest(target=models_dir["student"], dataset=train_file, teacher_model=nan_teacher),
                        write=False)
    cache_dir = tmp_path / "cache"
    flags = ["cache-teacher", "--cache_dir", str(cache_dir), *run_flags(models_dir, train_file, tmp_path / "unused",
                                                                         teacher=nan_teacher)]
    assert cli.main(flags) == 1
    assert "the teacher's logits on training rows are not finite" in capsys.readouterr().err
    assert not json.loads((cache_dir / "manifest.json").read_text())["complete"]


# ---- 8. a cache is complete only when every shard is there ------------------------------------------------------------

@pytest.mark.e2e
def test_an_interrupted_cache_repair_is_not_complete(models_dir, train_file, tmp_path):
    from llmneo.teacher.cache import TeacherCache, read_manifest
    from llmneo.teacher.capture import _start_manifest

    cache_dir = tmp_path / "cache"
    assert cli.main(["cache-teacher", "--cache_dir", str(cache_dir), "--shard_rows", "8", "--top_k", "8",
                     *run_flags(models_dir, train_file, tmp_path / "unused")]) == 0
    (cache_dir / "shard-00003.safetensors").unlink()
    manifest = read_manifest(cache_dir)
    _start_manifest(cache_dir, manifest["fingerprint"], manifest["settings"])  # the repair, killed right after this
    assert not read_manifest(cache_dir)["complete"]
    with pytest.raises(ConfigError, match=r"is incomplete \(40 of 48 rows\)"):
        TeacherCache(cache_dir)
    tampered = read_manifest(cache_dir)
    (cache_dir / "manifest.json").write_text(json.dumps({**tampered, "complete": True}))
    with pytest.raises(ConfigError, match=r"is incomplete \(40 of 48 rows\)"):
        TeacherCache(cache_dir)


# ---- 9. runs that would train nothing -------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--learning_rate", "0"], r"learning_rate must be > 0, got 0.0: a run with it would train nothing"),
    (["--learning_rate=-1e-4"], r"learning_rate must be > 0, got -0.0001"),
    (["--learning_rate", "nan"], r"learning_rate must be > 0, got nan"),
    (["--lora_alpha", "0"], r"lora_alpha must be > 0, got 0.0"),
    (["--max_steps", "-1", "--num_train_epochs", "-1"], r"nothing to train: max_steps -1 and num_train_epochs -1"),
    (["--lora_dropout", "1.0"], r"lora_dropout must be in \[0, 1\), got 1.0"),
    (["--per_device_train_batch_size", "0"], r"per_device_train_batch_size must be >= 1, got 0"),
    (["--gradient_accumulation_steps", "0"], r"gradient_accumulation_steps must be >= 1, got 0"),
    (["--max_samples", "0"], r"max_samples must be >= 1, got 0"),
])
def test_settings_that_train_nothing_are_refused(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(["--student_model", "s", "--teacher_model", "t", "--dataset", "d.jsonl", *flags])


# ---- 10. commands never write onto an existing file ----------------------------------------------------------------

@pytest.mark.e2e
def test_outputs_onto_existing_files_are_refused(models_dir, tmp_path, finished, capsys):
    target = tmp_path / "taken"
    target.write_text("someone's notes")
    for command in (["merge", str(finished)], ["prune-layers", models_dir["teacher"], "--keep", "1"],
                    ["export-lora", str(finished)], ["import-gguf", str(tmp_path / "x.gguf")]):
        assert cli.main([*command, "--output", str(target)]) == 1
        assert f"--output {target} is an existing file" in capsys.readouterr().err
    assert target.read_text() == "someone's notes"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert cli.main(["merge", str(finished), "--output", str(tmp_path / "full")]) == 1
    assert "already exists and is not empty" in capsys.readouterr().err


# ---- messages instead of tracebacks ----------------------------------------------------------------------------------

def test_a_missing_local_looking_model_path_is_named_at_once(train_file, tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    started = time.time()
    with pytest.raises(ConfigError, match="student model path models/smollm2-135 does not exist"):
        distill(parse_config(["--method", "lora", "--student_model", "models/smollm2-135", "--dataset", train_file,
                              "--output_dir", str(tmp_path / "run")]))
    assert time.time() - started < 5


def test_eval_of_a_folder_that_is_neither_run_nor_model(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    assert cli.main(["eval", str(tmp_path / "notes"), "--dataset", "d.jsonl"]) == 1
    assert "is neither a run directory (config.yaml) nor a model directory (config.json)" in capsys.readouterr().err


def test_output_dir_that_is_a_file(models_dir, train_file, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"file is a file, not a directory"):
        distill(parse_config(run_flags(models_dir, train_file, tmp_path / "file")))


def test_output_dir_that_is_not_writable(models_dir, train_file, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    target = locked / "run" if os.geteuid() != 0 else Path("/proc/llmneo-test/run")  # root writes anywhere but /proc
    with pytest.raises(ConfigError, match="is not writable by this user|cannot create .*llmneo-test"):
        distill(parse_config(run_flags(models_dir, train_file, target)))


def test_yaml_with_a_python_tag_is_refused(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("student_model: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match=r"run.yaml is not valid YAML for llm-neo \(could not determine a "
                                          r"constructor for the tag"):
        parse_config(["--config", str(config_file)])


def test_target_modules_that_match_nothing(models_dir, train_file, tmp_path):
    with pytest.raises(ConfigError, match=r"target_modules 'wq,wk' matches no layer of the student; its linear "
                                          r"layers are named .*q_proj"):
        distill(parse_config(run_flags(models_dir, train_file, tmp_path / "run", target_modules="wq,wk")))


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", "", "the file is empty: it has no rows"),
    ("header.csv", "text,label\n", r"the file has no rows \(only a header\)"),
])
def test_data_files_without_rows_are_named(models_dir, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(Exception, match=f"file {path}: {message}"):
        distill(parse_config(run_flags(models_dir, str(path), tmp_path / "run")))


def test_skip_bad_rows_skips_malformed_json_lines_and_rows_are_lines(tokenizer, tmp_path):
    from llmneo.config import DataArguments
    from llmneo.data.loading import build_dataset

    good = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there."}]}
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join([json.dumps(good), "", '{"conversations": [', json.dumps(good), ""]) + "\n")
    with pytest.raises(Exception, match=r"rows.jsonl, row 3: malformed JSON: Expecting value"):
        build_dataset(DataArguments(dataset=str(path)), tokenizer, seed=0)
    dataset, report = build_dataset(DataArguments(dataset=str(path), skip_bad_rows=True), tokenizer, seed=0)
    assert len(dataset) == 2 and report.rows_used == 2
    assert report.skipped == [f"file {path}, row 3: malformed JSON: Expecting value"]
    missing = tmp_path / "missing.jsonl"  # Arrow reads it: the row number is still the line the editor shows
    missing.write_text("\n".join([json.dumps(good), "", "", json.dumps({"conversations": [{"from": "human"}]})]) + "\n")
    with pytest.raises(Exception, match=r"missing.jsonl, row 4, field 'conversations\[0\]\.value'"):
        build_dataset(DataArguments(dataset=str(missing)), tokenizer, seed=0)


def test_a_hub_id_is_refused_at_once_when_the_hub_is_offline(train_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.time()
    with pytest.raises(ConfigError, match=r"student model someorg/no-such-model is not a local path, and the hub is "
                                          r"offline \(HF_HUB_OFFLINE\) with no copy of it in the hub cache"):
        distill(parse_config(["--method", "lora", "--student_model", "someorg/no-such-model", "--dataset", train_file,
                              "--output_dir", str(tmp_path / "run")]))
    assert time.time() - started < 5


@pytest.mark.e2e
def test_disk_full_names_the_file_and_the_checkpoint(models_dir, train_file, tmp_path, monkeypatch):
    import errno

    from llmneo.errors import DiskFullError
    from llmneo.runtime import checkpoints

    write = checkpoints.write_atomically

    def full_at_step_4(path, data):
        if "checkpoint-4" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write(path, data)

    monkeypatch.setattr(checkpoints, "write_atomically", full_at_step_4)
    run = tmp_path / "run"
    with pytest.raises(DiskFullError, match=r"disk full writing .*checkpoint-4/.*; the last complete checkpoint is "
                                            r"checkpoint-2: free some space, then resume with"):
        distill(run_config(models_dir, train_file, run))
    monkeypatch.setattr(checkpoints, "write_atomically", write)
    summary = distill(run_config(models_dir, train_file, run, resume_from_checkpoint="latest"))
    assert summary.steps == 6


@pytest.mark.e2e
def test_cache_teacher_holds_its_directory(models_dir, train_file, tmp_path, capsys):
    from llmneo.runtime.lock import DirectoryLock

    cache_dir = tmp_path / "cache"
    flags = ["cache-teacher", "--cache_dir", str(cache_dir), *run_flags(models_dir, train_file, tmp_path / "unused")]
    with DirectoryLock(cache_dir, "llm-neo cache-teacher"):
        assert cli.main(flags) == 1
        assert f"{cache_dir} is in use by another llm-neo process (llm-neo cache-teacher with pid {os.getpid()}" in \
            capsys.readouterr().err
        assert not (cache_dir / "manifest.json").exists()
    assert cli.main(flags) == 0
