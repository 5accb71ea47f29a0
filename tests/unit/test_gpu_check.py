"""benchmarks/gpu_check.py on a machine without CUDA: the dry run resolves every part, it names what would fail
on the day, and the runner records each step's outcome in results.json / results.md."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import checkout_env

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import gpu_check  # noqa: E402
import gpu_parts  # noqa: E402
from gpu_parts import CheckFailed, Step  # noqa: E402


@pytest.mark.e2e
def test_dry_run_resolves_every_part(tmp_path):
    result = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--dry-run", "--work",
                             str(tmp_path / "work"), "--wheels", str(tmp_path / "no-wheelhouse")],
                            capture_output=True, text=True, env=checkout_env(CI=""), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"dry run: {len(gpu_parts.PARTS)} parts resolve" in result.stdout
    for part in gpu_parts.PARTS:
        assert f"\n{part}: " in result.stdout
    for needed in ("accelerate.commands.launch --config_file", "zero3.yaml", "fsdp2.yaml", "--recipe sst2",
                   "--student_quantization nf4", "loss_head.py --tokens 8192 16384", "-m gpu"):
        assert needed in result.stdout
    assert (tmp_path / "work" / "models" / "teacher" / "config.json").is_file()  # the tiny models were built


def test_dry_run_names_a_bad_argument_and_an_import_nobody_provides(tmp_path):
    pins = gpu_check.pinned_packages()
    bad_benchmark = Step("x", "bad", argv=gpu_parts.benchmark("throughput.py", "--shapes", "4by2048"))
    assert gpu_check.resolve_step(bad_benchmark, pins) == ["arguments rejected (exit 2)"]
    bad_option = Step("x", "bad", argv=[*gpu_parts.LLMNEO, "distill", "--student_model", "s", "--dataset", "d",
                                        "--method", "neo", "--teacher_model", "t", "--alpha", "2"])
    assert gpu_check.resolve_step(bad_option, pins) == ["ConfigError: alpha must be in [0, 1], got 2.0"]
    unprovided = Step("x", "call", call=lambda: {}, modules=("bitsandbytes", "no_such_module_anywhere"))
    assert gpu_check.resolve_step(unprovided, pins) == [
        "imports no_such_module_anywhere, which is neither installed here nor pinned in gpu_wheels.txt"]


def test_wheel_pins_cover_what_the_gpu_machine_lacks():
    pins = gpu_check.pinned_packages()
    assert {"bitsandbytes", "deepspeed", "liger-kernel", "datasets"} <= set(pins)
    assert all(version.count(".") >= 1 for version in pins.values())


def test_wheelhouse_check_names_missing_pins_and_size(tmp_path, monkeypatch):
    (tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl").write_bytes(b"0" * 2048)
    (tmp_path / "deepspeed-0.19.8.tar.gz").write_bytes(b"0" * 10)
    pins = {"bitsandbytes": "0.50.2", "deepspeed": "0.19.8", "liger-kernel": "0.8.5"}
    assert gpu_check.check_wheelhouse(tmp_path, pins) == [f"wheelhouse {tmp_path} lacks ['liger-kernel']"]
    monkeypatch.setattr(gpu_check, "WHEELHOUSE_LIMIT_MIB", 0.001)
    assert gpu_check.check_wheelhouse(tmp_path, {"bitsandbytes": "0.50.2"})[0].endswith("over 0.001 MiB")


def failing_judge(stdout):
    raise CheckFailed(f"wrong figure in {stdout.strip()}")


def test_each_outcome_is_recorded_in_results_json_and_md(tmp_path):
    report = gpu_check.Report(tmp_path / "out", {"parts": "demo"})
    steps = [Step("demo", "call passes", call=lambda: {"figure": 1.5}),
             Step("demo", "table", argv=[sys.executable, "-c", "print('| a |\\n|---|\\n| 1 |')"],
                  judge=gpu_parts.markdown_table, table=True),
             Step("demo", "judge refuses", argv=[sys.executable, "-c", "print(7)"], judge=failing_judge),
             Step("demo", "exits 3", argv=[sys.executable, "-c", "import sys; sys.exit('boom')"]),
             Step("demo", "too slow", argv=[sys.executable, "-c", "import time; time.sleep(30)"], timeout=1),
             Step("demo", "cut off after a row", table=True, timeout=3, argv=[sys.executable, "-uc",
                  "import time; print('| a |\\n|---|\\n| 1 |', flush=True); time.sleep(30)"])]
    for step in steps:
        status, figures, detail, table = gpu_check.run_step(step, 60, tmp_path / "steps.log")
        report.add(step, status, 0.1, figures, detail, table)
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["checks"]
    assert [row["status"] for row in rows] == ["pass", "pass", "fail", "fail", "fail", "fail"]
    assert rows[0]["figures"] == {"figure": 1.5} and rows[1]["figures"] == {"table rows": 1}
    assert rows[2]["detail"] == "wrong figure in 7"
    assert rows[3]["detail"].startswith("exit 1: boom") and rows[4]["detail"] == "timed out after 1 s"
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| demo | judge refuses | fail | 0.1 | wrong figure in 7 |" in markdown
    assert "## demo: table\n\n| a |" in markdown
    assert rows[5]["detail"] == "timed out after 3 s" and rows[5]["table"] == "| a |\n|---|\n| 1 |"  # rows kept
    assert report.failed() and "$ " in (tmp_path / "steps.log").read_text()


def fake_run(path: Path, losses: list[float], lora_b: float) -> Path:
    (path / "adapter").mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"status": "finished"}))
    (path / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": loss, "kd_loss": loss / 2}) + "\n"
                                                for i, loss in enumerate(losses)))
    save_file({"lora_A": torch.ones(2, 2), "lora_B": torch.full((2, 2), lora_b)},
              str(path / "adapter" / "adapter_model.safetensors"))
    return path


def test_engine_runs_are_judged_against_the_plain_run(tmp_path):
    plain = fake_run(tmp_path / "plain", [3.0, 2.5, 2.0, 1.8, 1.7], 0.1)
    close = fake_run(tmp_path / "close", [3.0, 2.5, 2.0005, 1.8, 1.7], 0.1002)
    figures = gpu_parts.equal_to(plain, close)
    assert figures["max loss rel diff"] == "2.50e-04" and figures["max adapter abs diff"] == "2.00e-04"
    far = fake_run(tmp_path / "far", [3.0, 2.5, 2.0, 1.8, 1.7], 0.2)
    with pytest.raises(CheckFailed, match="adapter 1.00e-01"):
        gpu_parts.equal_to(plain, far)
    short = fake_run(tmp_path / "short", [3.0, 2.5], 0.1)
    with pytest.raises(CheckFailed, match="2 logged steps \\(expected 5\\)"):
        gpu_parts.equal_to(plain, short)
    nan = fake_run(tmp_path / "nan", [3.0, float("nan"), 2.0, 1.8, 1.7], 0.1)
    with pytest.raises(CheckFailed, match="non-finite at \\[2\\]"):
        gpu_parts.finished_run(nan)
