"""The parts of `gpu_check.py`: what each one runs (subprocess commands or in-process checks) and how its result is
judged. Tiny models and data are built locally (`prepare`), so nothing needs the hub; the parts at reference
shapes call the benchmarks. Only the standard library is imported at module level: `gpu_check.py` installs the
carried wheels before anything heavier is imported."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
ACCELERATE = [PY, "-m", "accelerate.commands.launch"]
LLMNEO = [PY, "-m", "llmneo"]
PART_BUDGET_S = 540  # one device call is at most 10 minutes; every part must fit in one
EQUAL_LOSS_REL = 1e-3  # engine runs against the plain run (fp32: only reduction order differs)
EQUAL_WEIGHT_ABS = 1e-3


class CheckFailed(Exception):
    """A step ran but its result is wrong; the message says what was measured."""


@dataclass
class Step:
    """One check of a part: a subprocess (``argv``) or an in-process function (``call``), then its ``judge``."""

    part: str
    name: str
    argv: list[str] | None = None
    call: Callable[[], dict] | None = None
    judge: Callable[[str], dict] | None = None  # the step's stdout -> figures; raises CheckFailed
    timeout: int = 300
    modules: tuple[str, ...] = ()  # imports the step needs (resolved by the dry run)
    env: dict = field(default_factory=dict)
    table: bool = False  # the step prints a Markdown table worth keeping in results.md


@dataclass
class Workspace:
    """Where the tiny models, data and runs of one gpu_check invocation live (not under --out)."""

    root: Path

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def student(self) -> str:
        return str(self.path("models", "student"))

    @property
    def teacher(self) -> str:
        return str(self.path("models", "teacher"))

    @property
    def train(self) -> str:
        return str(self.path("data", "train.jsonl"))

    def run(self, name: str) -> Path:
        return self.path("runs", name)


def prepare(work: Workspace) -> None:
    """Tiny Llamas (hidden 64 and 128: bitsandbytes-friendly widths), their tokenizer, chat and labelled rows."""
    from llmneo.demo.tiny import build_tiny_llama, build_tokenizer, corpus_rows, corpus_texts

    if (work.path("models", "teacher", "config.json")).is_file():
        return
    tokenizer = build_tokenizer(corpus_texts())
    for name, hidden, seed in (("student", 64, 1), ("teacher", 128, 2)):
        model = build_tiny_llama(tokenizer, hidden_size=hidden, num_heads=4, seed=seed)
        model.save_pretrained(work.path("models", name))
        tokenizer.save_pretrained(work.path("models", name))
    work.path("data").mkdir(parents=True, exist_ok=True)
    _write_jsonl(work.path("data", "train.jsonl"), corpus_rows()[:64])
    texts = [text for text in corpus_texts() if len(text) < 120]
    labelled = [{"text": t, "label": "question" if t.rstrip().endswith("?") else "statement"} for t in texts]
    _write_jsonl(work.path("data", "classes-train.jsonl"), labelled[:96])
    _write_jsonl(work.path("data", "classes-test.jsonl"), labelled[96:144])


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


# --- commands -----------------------------------------------------------------------------------------------------


def distill_flags(work: Workspace, name: str, method: str = "neo", **extra) -> list[str]:
    """A short tiny-model run (fp32 unless ``bf16``) into runs/<name>, replacing an earlier one."""
    flags = {"method": method, "student_model": work.student, "dataset": work.train, "lora_r": 8,
             "max_steps": 5, "per_device_train_batch_size": 4, "logging_steps": 1, "learning_rate": 1e-3,
             "disable_tqdm": "true", "seed": 0, "max_length": 128, "save_strategy": "no",
             "overwrite_output_dir": "true", "output_dir": str(work.run(name)), "report_to": "none"}
    if method in ("kd", "neo"):
        flags["teacher_model"] = work.teacher
    flags.update(extra)
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))]


def launched(config: str, flags: list[str], mixed_precision: str = "no") -> list[str]:
    """`accelerate launch` of one process with a shipped config (its process count and precision overridden)."""
    return [*ACCELERATE, "--config_file", str(ROOT / "configs" / "accelerate" / config), "--num_processes", "1",
            "--mixed_precision", mixed_precision, "--main_process_port", "29531", "-m", "llmneo", "distill", *flags]


def benchmark(script: str, *args: str) -> list[str]:
    return [PY, str(ROOT / "benchmarks" / script), *args]


# --- judges -------------------------------------------------------------------------------------------------------


def metrics_lines(run_dir: Path) -> list[dict]:
    from llmneo.runtime.layout import read_metrics

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise CheckFailed(f"{path} was not written")
    return read_metrics(path)


def run_finished(run_dir: Path) -> bool:
    from llmneo.runtime.run_dir import run_status

    return run_dir.is_dir() and run_status(run_dir)[0] == "finished"


def finished_run(run_dir: Path, expected_steps: int = 5) -> dict:
    """A run that finished its steps with finite losses: its last losses and step count."""
    if not run_finished(run_dir):
        raise CheckFailed(f"{run_dir.name}: the run did not finish")
    steps = [line for line in metrics_lines(run_dir) if "loss" in line]
    bad = [line["step"] for line in steps if not math.isfinite(line["loss"])]
    if bad or len(steps) != expected_steps:
        raise CheckFailed(f"{run_dir.name}: {len(steps)} logged steps (expected {expected_steps}), non-finite at {bad}")
    figures = {"steps": len(steps), "last loss": round(steps[-1]["loss"], 5)}
    figures.update({key: round(steps[-1][key], 5) for key in ("ce_loss", "kd_loss") if key in steps[-1]})
    return figures


def equal_to(reference: Path, candidate: Path) -> dict:
    """The candidate run logged the reference run's losses and saved its adapter, within the engine tolerance."""
    figures = finished_run(candidate)
    pairs = [(a, b) for a, b in zip(metrics_lines(reference), metrics_lines(candidate), strict=False) if "loss" in a]
    loss_rel = max(abs(a[key] - b[key]) / max(abs(a[key]), 1e-8) for a, b in pairs for key in ("loss", "ce_loss",
                                                                                                  "kd_loss") if key in a)
    weight_abs = max_weight_difference(reference / "adapter", candidate / "adapter")
    figures.update({"max loss rel diff": f"{loss_rel:.2e}", "max adapter abs diff": f"{weight_abs:.2e}"})
    if loss_rel > EQUAL_LOSS_REL or weight_abs > EQUAL_WEIGHT_ABS:
        raise CheckFailed(f"differs from the plain run: losses {loss_rel:.2e} (limit {EQUAL_LOSS_REL}), adapter "
                          f"{weight_abs:.2e} (limit {EQUAL_WEIGHT_ABS})")
    return figures


def max_weight_difference(left: Path, right: Path) -> float:
    from safetensors.torch import load_file

    a, b = (load_file(str(path / "adapter_model.safetensors")) for path in (left, right))
    if a.keys() != b.keys():
        raise CheckFailed(f"adapter tensors differ: {sorted(a.keys() ^ b.keys())[:4]}")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def fidelity(run_dir: Path, expected_steps: int = 5) -> dict:
    """The quantized-teacher run logged a finite, non-negative KL(unquantized || quantized teacher)."""
    figures = finished_run(run_dir, expected_steps)
    logged = [line["teacher_fidelity_kl"] for line in metrics_lines(run_dir) if "teacher_fidelity_kl" in line]
    if not logged or not (math.isfinite(logged[0]) and logged[0] >= 0):
        raise CheckFailed(f"teacher_fidelity_kl logged as {logged}")
    return {**figures, "teacher_fidelity_kl": f"{logged[0]:.3e}"}


def markdown_table(stdout: str) -> dict:
    rows = [line for line in stdout.splitlines() if line.startswith("|")]
    if len(rows) < 3:
        raise CheckFailed("no table printed")
    failures = [row for row in rows if "out of memory" in row]
    return {"table rows": len(rows) - 2, **({"out of memory rows": len(failures)} if failures else {})}


def pytest_summary(stdout: str) -> dict:
    counts = {word: int(number) for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", stdout)}
    if not counts.get("passed"):
        raise CheckFailed(f"no GPU test passed: {counts}")
    return counts


# --- in-process checks --------------------------------------------------------------------------------------------


def environment() -> dict:
    """Versions of everything the GPU paths use, and the GPU itself."""
    import importlib.metadata

    import torch

    if not torch.cuda.is_available():
        raise CheckFailed("CUDA is not available")
    figures = {"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
               "memory GiB": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
    for name in ("torch", "transformers", "peft", "accelerate", "datasets", "pyarrow", "triton", "bitsandbytes", "deepspeed",
                 "liger-kernel"):
        try:
            figures[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            figures[name] = "missing"
    return figures


def merged_equals_adapter(work: Workspace, run: str) -> Callable[[], dict]:
    """The merged model (full weights, unquantized base) gives the logits of the unquantized base with the
    trained adapter attached unmerged."""

    def check() -> dict:
        import torch
        from transformers import AutoModelForCausalLM

        from llmneo.adapters.store import load_adapter

        merged = AutoModelForCausalLM.from_pretrained(str(work.path("merged", run))).cuda().eval()
        if merged.dtype != torch.float32:
            raise CheckFailed(f"merge --dtype float32 wrote {merged.dtype} weights")
        attached = load_adapter(AutoModelForCausalLM.from_pretrained(work.student), work.run(run) / "adapter")
        attached = attached.cuda().eval()
        ids = torch.randint(5, merged.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
        with torch.no_grad():
            difference = float((merged(input_ids=ids).logits - attached(input_ids=ids).logits).abs().max())
        if difference > 1e-3:
            raise CheckFailed(f"merged logits differ from base + adapter by {difference:.2e}")
        return {"max logit diff": f"{difference:.2e}"}

    return check


# --- the parts ----------------------------------------------------------------------------------------------------


def smoke(work: Workspace) -> list[Step]:
    return [Step("smoke", "environment", call=environment, modules=("torch", "bitsandbytes", "deepspeed",
                                                                    "liger_kernel")),
            Step("smoke", "neo 5 steps, bf16, CUDA", argv=[*LLMNEO, "distill", *distill_flags(work, "smoke", bf16="true")],
                 judge=lambda _: finished_run(work.run("smoke")))]


def loss_head(work: Workspace) -> list[Step]:
    return [Step("loss_head", "KD head at Llama shapes (naive, fused, liger)", timeout=420, table=True,
                 argv=benchmark("loss_head.py", "--tokens", "8192", "16384"), judge=markdown_table,
                 modules=("liger_kernel",))]


def throughput(work: Workspace) -> list[Step]:
    return [Step("throughput", "training throughput, llama preset, every lever row", timeout=PART_BUDGET_S, table=True,
                 argv=benchmark("throughput.py", "--preset", "llama", "--shapes", "4x2048,16x512", "--steps", "6"),
                 judge=markdown_table, modules=("liger_kernel",))]


def cache(work: Workspace) -> list[Step]:
    return [Step("cache", "teacher cache: capture and student phase, llama preset", timeout=480, table=True,
                 argv=benchmark("cache_throughput.py", "--preset", "llama"), judge=markdown_table)]


def served_teacher(work: Workspace) -> list[Step]:
    return [Step("served_teacher", "served teacher (vLLM GPU build): capture at 1/4/16 in flight, student step, "
                 "llama preset", timeout=PART_BUDGET_S, table=True,
                 argv=benchmark("served_teacher.py", "--preset", "llama", "--vllm_python", PY), judge=markdown_table)]


def on_policy(work: Workspace) -> list[Step]:
    return [Step("on_policy", "on-policy steps: rollout and training tokens/s, llama preset, 256 new tokens",
                 timeout=PART_BUDGET_S, table=True, argv=benchmark("on_policy.py", "--preset", "llama"),
                 judge=markdown_table)]


def on_policy_vllm(work: Workspace) -> list[Step]:
    return [Step("on_policy_vllm", "on-policy steps with rollouts on vLLM (GPU build) synced by the adapter, beside the "
                 "transformers engine, llama preset", timeout=PART_BUDGET_S, table=True,
                 argv=benchmark("on_policy.py", "--preset", "llama", "--vllm", "--vllm_python", PY),
                 judge=markdown_table)]


def qlora(work: Workspace) -> list[Step]:
    bnb = ("bitsandbytes",)
    steps = []
    for kind in ("nf4", "int8"):
        name = f"qlora-{kind}"
        steps.append(Step("qlora", f"neo with a {kind} student and a {kind} teacher (fidelity KL logged)",
                          argv=[*LLMNEO, "distill", *distill_flags(work, name, student_quantization=kind,
                                                                   teacher_quantization=kind, bf16="true")],
                          judge=lambda _, name=name: fidelity(work.run(name)), modules=bnb))
    steps += [Step("qlora", "merge the nf4-trained adapter into the unquantized student",
                   argv=[*LLMNEO, "merge", str(work.run("qlora-nf4")), "--output", str(work.path("merged", "qlora-nf4")),
                         "--dtype", "float32"],  # the fp32 reference below: a bf16 merge differs from it by rounding
                   modules=bnb),
              Step("qlora", "merged model equals unquantized base + adapter", call=merged_equals_adapter(work, "qlora-nf4"))]
    return steps


def recipe(work: Workspace) -> list[Step]:
    classes = {"task": "classification", "dataset": str(work.path("data", "classes-train.jsonl")),
               "eval_split": str(work.path("data", "classes-test.jsonl")), "per_device_train_batch_size": 8}
    teacher_run = work.run("recipe-teacher")
    return [Step("recipe", "tiny teacher fine-tuned as a classifier (sft)",
                 argv=[*LLMNEO, "distill", *distill_flags(work, "recipe-teacher", "sft", student_model=work.teacher,
                                                          max_steps=24, **classes)],
                 judge=lambda _: finished_run(teacher_run, 24)),
            Step("recipe", "--recipe sst2 with its 4-bit teacher", modules=("bitsandbytes",),
                 argv=[*LLMNEO, "distill", "--recipe", "sst2",
                       *distill_flags(work, "recipe-sst2", teacher_model=str(teacher_run / "model"), max_steps=12,
                                      learning_rate=5e-3, lora_r=4, **classes)],  # the recipe's r
                 judge=lambda _: fidelity(work.run("recipe-sst2"), 12))]


def plain_run(work: Workspace, part: str) -> list[Step]:
    """The single-GPU reference of the engine checks (fp32), unless an earlier part of this call made it."""
    plain = work.run("plain")
    if run_finished(plain):
        return []
    return [Step(part, "plain single-GPU neo run (fp32, the reference)", argv=[*LLMNEO, "distill",
                                                                               *distill_flags(work, "plain")],
                 judge=lambda _: finished_run(plain))]


def zero(work: Workspace) -> list[Step]:
    plain = work.run("plain")
    steps = plain_run(work, "zero")
    for stage in (1, 2, 3):
        name = f"zero{stage}"
        note = " (teacher on the ZeRO-3 inference engine)" if stage == 3 else ""
        steps.append(Step("zero", f"ZeRO-{stage} through accelerate launch equals the plain run{note}",
                          argv=launched(f"zero{stage}.yaml", distill_flags(work, name)), modules=("deepspeed",),
                          judge=lambda _, name=name: equal_to(plain, work.run(name))))
    return steps


def fsdp(work: Workspace) -> list[Step]:
    plain = work.run("plain")
    return [*plain_run(work, "fsdp"),
            Step("fsdp", "FSDP2 (student and teacher sharded) equals the plain run",
                 argv=launched("fsdp2.yaml", distill_flags(work, "fsdp2")),
                 judge=lambda _: equal_to(plain, work.run("fsdp2")))]


def gpu_tests(work: Workspace) -> list[Step]:
    return [Step("pytest", "pytest -m gpu", timeout=480, judge=pytest_summary,
                 argv=[PY, "-m", "pytest", "-m", "gpu", "-rs", "-p", "no:cacheprovider", str(ROOT / "tests")])]


PARTS = {"smoke": smoke, "loss_head": loss_head, "throughput": throughput, "cache": cache,
         "served_teacher": served_teacher, "on_policy": on_policy, "on_policy_vllm": on_policy_vllm, "qlora": qlora,
         "recipe": recipe, "zero": zero, "fsdp": fsdp, "pytest": gpu_tests}
