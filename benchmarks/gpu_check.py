"""Verify every GPU path of llm-neo in one command: each part's checks run, and every figure and pass/fail comes
back as results.json and results.md in --out.

    python3 benchmarks/gpu_check.py --parts smoke,qlora,recipe,pytest --out "$OUT"    # on the GPU machine
    python benchmarks/gpu_check.py --dry-run                                            # anywhere: resolves everything

Parts: smoke, loss_head, throughput, cache, served_teacher, on_policy, on_policy_vllm, qlora, recipe, zero, fsdp, pytest
(benchmarks/gpu_parts.py; served_teacher and on_policy_vllm need vLLM's GPU build installed there). Each part
fits in one device call (at most 9 minutes on one H100); --budget_s stops starting new steps before the call's
limit, so what ran is always written. When the wheelhouse (scripts/gpu_wheelhouse.sh) is present, its wheels are
installed with --no-index --no-deps into --site first and put on the path of this process and of every step.
The dry run, on a machine without CUDA, checks that each step's command parses (llm-neo options, benchmark
arguments, accelerate and DeepSpeed configs, the GPU tests' collection) and that each import resolves here or is
pinned in scripts/gpu_wheels.txt, then prints what would run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_parts  # noqa: E402  (standard library only: safe before the wheels are installed)
from gpu_parts import PARTS, ROOT, CheckFailed, Step, Workspace  # noqa: E402

PINS = ROOT / "scripts" / "gpu_wheels.txt"
WHEELHOUSE_LIMIT_MIB = 60
LOG_TAIL = 100_000  # characters of each stream kept per step in steps.log
PROVIDERS = {"liger_kernel": "liger-kernel"}  # import name -> distribution name, where they differ


def pinned_packages() -> dict[str, str]:
    """Distribution name -> version, from scripts/gpu_wheels.txt (``name==version`` lines, # comments)."""
    pins = {}
    for line in PINS.read_text().splitlines():
        spec = line.split("#")[0].strip()
        if spec:
            name, _, version = spec.partition("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def install_wheelhouse(wheels: Path, site: Path) -> list[str]:
    """Install the carried wheels (and the DeepSpeed sdist, its ops left to JIT) into ``site``; put it and the
    checkout's src/ first on the path of this process and of its children."""
    files = sorted([*wheels.glob("*.whl"), *wheels.glob("*.tar.gz")]) if wheels.is_dir() else []
    marker = site / ".llmneo-wheelhouse"  # a warm machine's next call skips the install (DeepSpeed builds ~20 s)
    names = "\n".join(path.name for path in files)
    if files and not (marker.is_file() and marker.read_text() == names):
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
                   "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, files)]
        subprocess.run(command, check=True, env={**os.environ, "DS_BUILD_OPS": "0"})
        marker.write_text(names)
    paths = [str(site)] if files else []
    paths.append(str(ROOT / "src"))
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    sys.path[:0] = paths
    return [path.name for path in files]


class Report:
    """Every step's outcome, written to results.json and results.md after each step (a cut-off call keeps what
    ran)."""

    def __init__(self, out: Path, header: dict):
        self.out, self.header, self.rows = out, header, []
        out.mkdir(parents=True, exist_ok=True)

    def add(self, step: Step, status: str, seconds: float, figures: dict | None = None, detail: str = "",
            table: str = "") -> None:
        self.rows.append({"part": step.part, "check": step.name, "status": status, "seconds": round(seconds, 1),
                          "figures": figures or {}, "detail": detail, "table": table})
        print(f"[{status}] {step.part}: {step.name} ({seconds:.0f} s) {figures or ''} {detail[-400:]}", flush=True)
        self.write()

    def write(self) -> None:
        (self.out / "results.json").write_text(json.dumps({**self.header, "checks": self.rows}, indent=1) + "\n")
        (self.out / "results.md").write_text(self.markdown())

    def markdown(self) -> str:
        lines = ["# gpu_check", "", *[f"- {key}: {value}" for key, value in self.header.items()], "",
                 "| part | check | status | s | figures |", "|---|---|---|---|---|"]
        for row in self.rows:
            figures = ", ".join(f"{key} {value}" for key, value in row["figures"].items())
            detail = row["detail"].strip().splitlines()[-1][:200] if row["detail"].strip() else ""
            lines.append(f"| {row['part']} | {row['check']} | {row['status']} | {row['seconds']} | "
                         f"{figures or detail} |")
        for row in self.rows:
            if row["table"]:
                lines += ["", f"## {row['part']}: {row['check']}", "", row["table"]]
        return "\n".join(lines) + "\n"

    def failed(self) -> bool:
        return any(row["status"] == "fail" for row in self.rows)


def run_step(step: Step, seconds_left: float, logs: Path) -> tuple[str, dict, str, str]:
    """(status, figures, detail, table) of one step, run within ``seconds_left``."""
    stdout = ""
    try:
        if step.call is not None:
            return "pass", step.call(), "", ""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **step.env}
        result = subprocess.run(step.argv, cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=max(1, min(step.timeout, seconds_left)))
        stdout = result.stdout
        log_step(logs, step, stdout, result.stderr, f"rc {result.returncode}")
        if result.returncode != 0:
            return "fail", {}, f"exit {result.returncode}: {(result.stderr or result.stdout)[-1500:]}", ""
        return "pass", step.judge(stdout) if step.judge else {}, "", printed_table(stdout) if step.table else ""
    except subprocess.TimeoutExpired as timeout:
        # A benchmark prints its rows as they finish: the rows of a step cut off by the budget are kept.
        stdout, stderr = (_text(stream) for stream in (timeout.stdout, timeout.stderr))
        log_step(logs, step, stdout, stderr, "timed out")
        return "fail", {}, f"timed out after {min(step.timeout, seconds_left):.0f} s", printed_table(stdout) if step.table else ""
    except CheckFailed as failure:
        return "fail", {}, str(failure), ""
    except Exception as error:  # one broken check must not hide the others' results
        return "fail", {}, f"{type(error).__name__}: {error}", ""


def _text(stream: bytes | str | None) -> str:
    return stream.decode(errors="replace") if isinstance(stream, bytes) else stream or ""


def printed_table(stdout: str) -> str:
    return "\n".join(line for line in stdout.splitlines() if line.startswith(("|", "preset", "device")))


def log_step(logs: Path, step: Step, stdout: str, stderr: str, outcome: str) -> None:
    with logs.open("a") as log:  # one file for all steps: a device call brings back at most 8 files
        log.write(f"\n===== {step.part}: {step.name}\n$ {' '.join(step.argv)}\n{stdout[-LOG_TAIL:]}\n"
                  f"--- stderr ({outcome})\n{stderr[-LOG_TAIL:]}\n")


def run_parts(parts: list[str], work: Workspace, report: Report, budget_s: float) -> None:
    started = time.monotonic()
    logs = report.out / "steps.log"
    gpu_parts.prepare(work)
    for part in parts:
        part_started = time.monotonic()
        for step in PARTS[part](work):
            left = min(budget_s - (time.monotonic() - started), gpu_parts.PART_BUDGET_S - (time.monotonic() - part_started))
            if left < 20:
                report.add(step, "not run", 0.0, detail="the call's or the part's time budget was spent")
                continue
            step_started = time.monotonic()
            status, figures, detail, table = run_step(step, left, logs)
            report.add(step, status, time.monotonic() - step_started, figures, detail, table)


# --- dry run ------------------------------------------------------------------------------------------------------


def dry_run(parts: list[str], work: Workspace, wheels: Path) -> list[str]:
    """Problems that would stop a step on the day (empty when every step resolves); prints each step's plan."""
    pins, problems = pinned_packages(), []
    problems += check_wheelhouse(wheels, pins)
    gpu_parts.prepare(work)
    for part in parts:
        for step in PARTS[part](work):
            print(f"{part}: {step.name}\n    {' '.join(step.argv) if step.argv else step.call.__qualname__ + '()'}")
            problems += [f"{part}: {step.name}: {problem}" for problem in resolve_step(step, pins)]
    return problems


def check_wheelhouse(wheels: Path, pins: dict[str, str]) -> list[str]:
    if not wheels.is_dir():
        print(f"wheelhouse {wheels} is absent here (scripts/gpu_wheelhouse.sh {wheels} makes it); pinned: "
              + ", ".join(f"{name}=={version}" for name, version in pins.items()))
        return []
    files = [*wheels.glob("*.whl"), *wheels.glob("*.tar.gz")]
    names = {file.name.split("-")[0].lower().replace("_", "-") for file in files}
    missing = [name for name in pins if name.replace("_", "-") not in names]
    size = sum(file.stat().st_size for file in files) / 2**20
    problems = [f"wheelhouse {wheels} lacks {missing}"] if missing else []
    if size > WHEELHOUSE_LIMIT_MIB:
        problems.append(f"wheelhouse {wheels} holds {size:.1f} MiB, over {WHEELHOUSE_LIMIT_MIB} MiB")
    print(f"wheelhouse {wheels}: {len(files)} files, {size:.1f} MiB")
    return problems


def resolve_step(step: Step, pins: dict[str, str]) -> list[str]:
    import importlib.util

    problems = [f"imports {module}, which is neither installed here nor pinned in {PINS.name}"
                for module in step.modules if importlib.util.find_spec(module) is None
                and PROVIDERS.get(module, module).replace("_", "-") not in pins]
    if step.call is not None:
        return problems
    try:
        resolve_command(step.argv)
    except SystemExit as exit_:  # argparse reports bad arguments by exiting
        problems.append(f"arguments rejected (exit {exit_.code})")
    except Exception as error:
        problems.append(f"{type(error).__name__}: {error}")
    return problems


def resolve_command(argv: list[str]) -> None:
    """Parse a step's command the way it will run, without running it."""
    args = argv[1:]
    if args[:2] == ["-m", "accelerate.commands.launch"]:
        resolve_launch(args[2:])
    elif args[:2] == ["-m", "llmneo"]:
        resolve_llmneo(args[2:])
    elif args[:2] == ["-m", "pytest"]:
        collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *args[2:]], cwd=ROOT,
                                   capture_output=True, text=True, env={**os.environ, "CI": ""})
        if collected.returncode != 0:  # 5: nothing collected; others: a test module failed to import
            raise RuntimeError(f"pytest collection (exit {collected.returncode}): {collected.stdout[-600:]}"
                               f"{collected.stderr[-600:]}")
    elif args[0].endswith(".py"):
        resolve_benchmark(Path(args[0]), args[1:])
    else:
        raise RuntimeError(f"unknown command {argv}")


def resolve_launch(args: list[str]) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(args[args.index("--config_file") + 1])
    if config.distributed_type == "DEEPSPEED":
        ds_file = ROOT / config.deepspeed_config["deepspeed_config_file"]
        json.loads(ds_file.read_text())
    resolve_llmneo(args[args.index("-m") + 2:])


def resolve_llmneo(args: list[str]) -> None:
    from llmneo.cli import HANDLERS
    from llmneo.config import parse_config

    if args[0] not in HANDLERS:
        raise RuntimeError(f"llm-neo has no command {args[0]}")
    if args[0] == "distill":
        parse_config(without_gpu_only_flags(args[1:]))


def without_gpu_only_flags(args: list[str]) -> list[str]:
    """The options with ``--bf16 true`` dropped where CUDA is absent (TrainingArguments refuses bf16 there; the
    rest of the command still parses as it will on the day)."""
    import torch

    if torch.cuda.is_available() or "--bf16" not in args:
        return args
    at = args.index("--bf16")
    return args[:at] + args[at + 2:]


def resolve_benchmark(script: Path, args: list[str]) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"benchmark_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.parse_args(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    parser.add_argument("--out", default="runs/gpu-check", help="results.json, results.md and steps.log (every step's output)")
    parser.add_argument("--work", default="/tmp/llmneo-gpu-check", help="tiny models, data and runs (not brought back)")
    parser.add_argument("--wheels", default=str(ROOT / "gpu-wheels"), help="the wheelhouse, installed first if present")
    parser.add_argument("--site", default="/tmp/llmneo-gpu-site", help="where the wheelhouse is installed")
    parser.add_argument("--budget_s", type=float, default=570, help="start no step after this many seconds")
    parser.add_argument("--dry-run", dest="dry_run", action="store_true", help="resolve every step; run nothing")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    if unknown := [part for part in parts if part not in PARTS]:
        parser.error(f"unknown part(s) {unknown}; parts are {', '.join(PARTS)}")
    work = Workspace(Path(args.work))
    if args.dry_run:
        sys.path.insert(0, str(ROOT / "src"))
        problems = dry_run(parts, work, Path(args.wheels))
        print("\n".join(["dry run: problems", *problems]) if problems else f"dry run: {len(parts)} parts resolve")
        return 1 if problems else 0
    installed = install_wheelhouse(Path(args.wheels), Path(args.site))
    report = Report(Path(args.out), {"parts": args.parts, "wheels installed": ", ".join(installed) or "none",
                                     "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
    run_parts(parts, work, report, args.budget_s)
    print(report.markdown())
    return 1 if report.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
