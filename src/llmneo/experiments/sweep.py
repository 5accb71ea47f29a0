"""`llm-neo sweep`: a rank x learning-rate grid (the paper's Fig. 2), resumable cell by cell."""

from __future__ import annotations

import math

from ..report import Axis, heatmap, markdown_table
from .cells import run_cell
from .grid import METRICS, base_options, best, output_dir, write_csv


def cell_name(rank: int, learning_rate: float) -> str:
    return f"r{rank}_lr{learning_rate:g}"


def sweep(argv: list[str], ranks: list[int], learning_rates: list[float], metric: str = "kl_to_teacher",
          output: str | None = None, eval_options: dict | None = None) -> dict:
    """Train every (rank, lr) cell not finished yet; write sweep.csv, sweep_heatmap.png, report.md; name the best."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric '{metric}'; expected one of {sorted(METRICS)}")
    argv, config = base_options(argv)
    out = output_dir(output, config, "sweep")
    rows = []
    for rank in ranks:
        for learning_rate in learning_rates:
            cell_argv = [*argv, "--lora_r", str(rank), "--lora_alpha", str(2 * rank), "--learning_rate",
                         str(learning_rate)]
            rows.append(run_cell(cell_argv, out / cell_name(rank, learning_rate),
                                 {"rank": rank, "learning_rate": learning_rate}, eval_options))
    write_csv(rows, out / "sweep.csv")
    grid = [[next(row.get(metric, math.nan) for row in rows if row["rank"] == rank and row["learning_rate"] == lr)
             for lr in learning_rates] for rank in ranks]
    heatmap(grid, Axis("LoRA rank", ranks), Axis("learning rate", [f"{lr:g}" for lr in learning_rates]),
            out / "sweep_heatmap.png", f"{metric} ({'higher' if METRICS[metric] else 'lower'} is better)")
    winner = best(rows, metric)
    columns = [("rank", "rank"), ("learning_rate", "lr"), ("perplexity", "held-out PPL"),
               ("top1_agreement", "top-1 agreement"), ("kl_to_teacher", "KL"), ("wall_time_s", "wall time (s)")]
    lines = [f"# Rank x learning-rate sweep ({config.training.method})", "",
             f"Best by {metric}: rank {winner['rank']}, lr {winner['learning_rate']:g} ({metric} = {winner[metric]:.4g}).",
             "", markdown_table(rows, columns), "", "![sweep heatmap](sweep_heatmap.png)", ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    return {"rows": rows, "grid": grid, "best": winner}
