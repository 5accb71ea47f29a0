"""The cross-tokenizer experiment's results page (used by cross_tokenizer.py's publish stage)."""

from __future__ import annotations

from pathlib import Path

from llmneo.report import markdown_table

COMMAND = "python examples/smollm2/cross_tokenizer.py"
TEACHERS = ("SmolLM2-135M-Instruct", "Gemma-3-270M", "pruned student")
CORPUS_NAMES = {"sharegpt": "ShareGPT (chat, held-out answers)", "python-docs": "Python 3.11 docs (plain text)"}


def teacher_rows(results: dict, corpus: str) -> list[dict]:
    rows = []
    for name in TEACHERS:
        entry = results.get(f"{corpus}/{name}")
        if entry:
            metrics = entry["held_out"]
            rows.append({"model": name, "bpb": round(metrics["bits_per_byte"], 4),
                         "ppl": round(metrics["perplexity"], 2), "tokens": metrics["answer_tokens"],
                         "bytes": metrics["answer_bytes"],
                         "per_token": round(metrics["answer_bytes"] / metrics["answer_tokens"], 2)})
    return rows


def arm_rows(results: dict, corpus: str, arms: dict, cached: set, top_k: int) -> list[dict]:
    rows = []
    for name in ("before", *arms):
        entry = results.get(f"{corpus}/{name}")
        if not entry:
            continue
        metrics, train = entry["held_out"], entry.get("train", {})
        method, teacher, extra = arms.get(name, ("—", None, []))
        rows.append({"run": "student before" if name == "before" else name, "method": method,
                     "teacher": {"smollm2": "SmolLM2-135M-Instruct", "gemma": "Gemma-3-270M"}.get(teacher, "—"),
                     "mode": (" ".join(extra[1::2]) + (f", cached top-{top_k}" if name in cached else "")
                              if extra else ("one tokenizer" if teacher else "—")),
                     "bpb": round(metrics["bits_per_byte"], 4), "ppl": round(metrics["perplexity"], 2),
                     "kl": round(metrics["aligned_kl"], 4), "agree": round(metrics["aligned_top1_agreement"], 3),
                     "coverage": _percent(train.get("aligned_coverage")),
                     "mass": _percent(train.get("teacher_mapped_mass")),
                     "steps": entry.get("steps", "—"), "wall": _wall(entry)})
    return rows


def _wall(entry: dict) -> str:
    if "wall_time_s" not in entry:
        return "—"
    wall = f"{entry['wall_time_s']:.0f}"
    return f"{wall} + {entry['capture_s']:.0f} capture" if "capture_s" in entry else wall


def _percent(value) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "—"


def answer_lines(results: dict, prompts: list[str]) -> list[str]:
    lines = []
    for index, prompt in enumerate(prompts):
        lines += [f"**{prompt}**", ""]
        for key, entry in results.items():
            if key.startswith("sharegpt/") and "answers" in entry:
                answer = " ".join(entry["answers"][index].split()) or "(empty)"
                lines.append(f"- *{key.split('/', 1)[1]}*: {answer}")
        lines.append("")
    return lines


def write_report(paths, size: dict, arms: dict, cached: set, prompts: list[str], results: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Distilling across tokenizers: Gemma-3-270M and SmolLM2 into the pruned SmolLM2 (CPU)", "",
             f"Reproduce: `{COMMAND}` (after `python examples/smollm2/heal.py --stages prepare`). Numbers below are "
             "written by its publish stage from `results.json`.", "",
             "## Which teacher is stronger", "",
             "Held-out bits per byte (answer-token NLL in bits over the answer text's UTF-8 bytes; chat markers are "
             "no text) compares models whose tokenizers differ. Perplexity is per token of each model's own "
             "tokenizer and is not comparable across them.", ""]
    columns = [("model", "model"), ("bpb", "bits per byte"), ("ppl", "PPL (own tokens)"), ("tokens", "answer tokens"),
               ("bytes", "answer bytes"), ("per_token", "bytes per token")]
    for corpus in ("sharegpt", "python-docs"):
        rows = teacher_rows(results, corpus)
        if rows:
            lines += [f"**{CORPUS_NAMES[corpus]}**", "", markdown_table(rows, columns), ""]
    lines += ["## Healing the pruned student at an equal token budget", "",
              f"Every run: the greedy 20-of-30-layer SmolLM2 student, LoRA rank {size['rank']} (α {2 * size['rank']}) "
              f"on every linear layer, learning rate {size['learning_rate']:g}, batch {size['batch']}, max_length "
              f"{size['max_length']}, one epoch over the same rows, seed 0. `neo` mixes CE and KD with α 0.5, T 1, "
              "forward KL; `lora` is CE only. Held-out metrics are on rows no run trained on; the aligned KL and "
              "agreement are measured against Gemma-3-270M at aligned boundaries for every student (so they show "
              "how close each student came to Gemma, whichever teacher it had). Coverage: the share of the "
              "student's training answer tokens at aligned boundaries with Gemma's tokenization; mapped mass: "
              "Gemma's probability on tokens with the same bytes in both vocabularies, at those boundaries "
              "(first batch; for a cached run, on its cached top-k only, so a lower bound). A cached run's wall time "
              "is its training plus the one capture of Gemma's top-k, which every later run on those rows reuses.",
              ""]
    columns = [("run", "run"), ("teacher", "teacher"), ("mode", "KD across tokenizers"), ("bpb", "held-out bits/byte"),
               ("ppl", "held-out PPL"), ("kl", "aligned KL(Gemma‖student)"), ("agree", "aligned top-1 agreement"),
               ("coverage", "aligned coverage"), ("mass", "mapped mass"), ("steps", "steps"), ("wall", "wall time (s)")]
    for corpus in ("sharegpt", "python-docs"):
        rows = arm_rows(results, corpus, arms, cached, size["top_k"])
        if rows:
            train = size["train"] if corpus == "sharegpt" else size["docs_train"]
            lines += [f"**{CORPUS_NAMES[corpus]}**: {train} training rows", "", markdown_table(rows, columns), ""]
    lines += ["## Answers (greedy, 64 new tokens, ShareGPT runs)", "", *answer_lines(results, prompts)]
    path = out_dir / "cross-tokenizer-cpu.md"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path
