"""Two processes under `accelerate launch` with the shipped DDP config on CPU (gloo): the same training as one
process with doubled accumulation, the same teacher cache as one process, and a clear error when the launched
processes do not form one run."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import checkout_env, run_flags

DDP_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "accelerate" / "ddp.yaml"
FSDP2_CONFIG = DDP_CONFIG.with_name("fsdp2.yaml")
SGD = {"optim": "sgd", "warmup_steps": 0, "lr_scheduler_type": "constant"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(args: list[str], processes: int, cpu: bool = True, config: Path = DDP_CONFIG) -> subprocess.CompletedProcess:
    env = checkout_env(OMP_NUM_THREADS="1")
    if cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--num_processes", str(processes), "--mixed_precision", "no", "--main_process_port",
               str(free_port()), "-m", "llmneo", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.e2e
def test_two_processes_equal_one_with_doubled_accumulation(models_dir, train_file, tmp_path):
    two = launch(["distill", *run_flags(models_dir, train_file, tmp_path / "two", per_device_train_batch_size=2,
                                        gradient_accumulation_steps=2, **SGD)], processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("run written to") == 1  # one report, from the main process
    one = launch(["distill", *run_flags(models_dir, train_file, tmp_path / "one", per_device_train_batch_size=2,
                                        gradient_accumulation_steps=4, **SGD)], processes=1)
    assert one.returncode == 0, one.stderr[-3000:]
    two_lines, one_lines = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert len(two_lines) == len(one_lines) == 4  # three steps and the summary
    for two_line, one_line in zip(two_lines, one_lines, strict=True):
        for key in ("loss", "ce_loss", "kd_loss", "grad_norm", "epoch"):
            if key in one_line:
                assert two_line[key] == pytest.approx(one_line[key], rel=1e-4, abs=1e-7), key
    adapters = [load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("two", "one")]
    assert adapters[0].keys() == adapters[1].keys()
    for name, weight in adapters[1].items():
        torch.testing.assert_close(adapters[0][name], weight, rtol=1e-5, atol=1e-6)


@pytest.mark.e2e
def test_two_fsdp2_processes_equal_one_process(models_dir, train_file, tmp_path):
    """The student and the teacher each sharded over two CPU processes (gloo) train as one unsharded process with
    doubled accumulation, and the saved adapter loads and merges."""
    two = launch(["distill", *run_flags(models_dir, train_file, tmp_path / "two", per_device_train_batch_size=2,
                                        gradient_accumulation_steps=2, **SGD)], processes=2, config=FSDP2_CONFIG)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "sharding the teacher with FSDP2 for inference" in two.stderr
    one = launch(["distill", *run_flags(models_dir, train_file, tmp_path / "one", per_device_train_batch_size=2,
                                        gradient_accumulation_steps=4, **SGD)], processes=1)
    assert one.returncode == 0, one.stderr[-3000:]
    two_lines, one_lines = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert len(two_lines) == len(one_lines) == 4
    for two_line, one_line in zip(two_lines, one_lines, strict=True):
        for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
            if key in one_line:
                assert two_line[key] == pytest.approx(one_line[key], rel=1e-5), key
    adapters = [load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("two", "one")]
    assert adapters[0].keys() == adapters[1].keys()
    for name, weight in adapters[1].items():
        torch.testing.assert_close(adapters[0][name], weight, rtol=0, atol=1e-6)
    merged = {}
    for run in ("two", "one"):
        result = subprocess.run([sys.executable, "-m", "llmneo", "merge", str(tmp_path / run), "--output",
                                 str(tmp_path / f"merged-{run}")], env=checkout_env(), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        merged[run] = load_file(tmp_path / f"merged-{run}" / "model.safetensors")
    for name, weight in merged["one"].items():
        torch.testing.assert_close(merged["two"][name], weight, rtol=0, atol=1e-6)


@pytest.mark.e2e
def test_two_process_cache_equals_one_process_cache(models_dir, train_file, tmp_path):
    caches = {}
    for processes in (2, 1):
        cache_dir = tmp_path / f"cache-{processes}"
        result = launch(["cache-teacher", "--cache_dir", str(cache_dir), "--shard_rows", "8", "--top_k", "16",
                         *run_flags(models_dir, train_file, tmp_path / "unused")], processes=processes)
        assert result.returncode == 0, result.stderr[-3000:]
        caches[processes] = json.loads((cache_dir / "manifest.json").read_text())
        assert caches[processes]["complete"] and not list(cache_dir.glob("manifest.part-*"))
    assert caches[2]["shards"] == caches[1]["shards"] and len(caches[1]["shards"]) == 6
    for entry in caches[1]["shards"]:
        assert (tmp_path / "cache-2" / entry["file"]).read_bytes() == (tmp_path / "cache-1" / entry["file"]).read_bytes()


@pytest.mark.e2e
def test_processes_that_do_not_form_one_run_are_refused(models_dir, train_file, tmp_path):
    result = launch(["distill", *run_flags(models_dir, train_file, tmp_path / "run")], processes=2, cpu=False)
    assert result.returncode != 0
    assert "2 processes were launched but each sees a world of 1" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("path", sorted(DDP_CONFIG.parent.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.distributed_type in ("MULTI_GPU", "FSDP", "DEEPSPEED")
    if config.distributed_type == "DEEPSPEED":
        ds_file = DDP_CONFIG.parent.parent.parent / config.deepspeed_config["deepspeed_config_file"]
        stage = json.loads(ds_file.read_text())["zero_optimization"]["stage"]
        assert f"zero{stage}" in path.name
    if config.distributed_type == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
