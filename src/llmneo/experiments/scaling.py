"""`llm-neo scaling`: the same run on growing data subsets, the metric against training tokens (Fig. 4)."""

from __future__ import annotations

from ..report import line_plot, markdown_table
from .cells import run_cell
from .grid import METRICS, base_options, output_dir, write_csv


def scaling(argv: list[str], samples: list[int], metric: str = "kl_to_teacher", output: str | None = None,
            eval_options: dict | None = None) -> list[dict]:
    """Train on ``max_samples`` = each of ``samples``; write scaling.csv, scaling.png and report.md."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric '{metric}'; expected one of {sorted(METRICS)}")
    argv, config = base_options(argv)
    out = output_dir(output, config, "scaling")
    rows = [run_cell([*argv, "--max_samples", str(count)], out / f"n{count}", {"samples": count}, eval_options)
            for count in sorted(samples)]
    write_csv(rows, out / "scaling.csv")
    line_plot([row["trained_answer_tokens"] for row in rows], [row.get(metric) for row in rows], out / "scaling.png",
              f"{metric} against training tokens ({config.training.method})", "answer tokens trained on", metric)
    columns = [("samples", "rows"), ("trained_answer_tokens", "trained answer tokens"), ("perplexity", "held-out PPL"),
               ("top1_agreement", "top-1 agreement"), ("kl_to_teacher", "KL"), ("wall_time_s", "wall time (s)")]
    lines = [f"# Data scaling ({config.training.method})", "", markdown_table(rows, columns), "",
             "![scaling](scaling.png)", ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    return rows
