"""What compare, sweep and scaling share: the base run's options, and the CSV of their cells."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from ..config import parse_config

logger = logging.getLogger(__name__)

DEFAULT_EVAL_RATIO = "0.1"
# metric -> whether larger is better
METRICS = {"kl_to_teacher": False, "perplexity": False, "top1_agreement": True}


def base_options(argv: list[str]) -> tuple[list[str], object]:
    """The distill options every cell starts from (checked once), with held-out rows ensured for evaluation."""
    config = parse_config(argv)
    if not (config.data.eval_split or config.data.eval_ratio):
        logger.info("no --eval_split or --eval_ratio given: holding out %s of the rows for evaluation",
                    DEFAULT_EVAL_RATIO)
        argv = [*argv, "--eval_ratio", DEFAULT_EVAL_RATIO]
        config = parse_config(argv)
    return argv, config


def output_dir(requested: str | None, config, suffix: str) -> Path:
    path = Path(requested) if requested else Path(f"{config.training.output_dir.rstrip('/')}-{suffix}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_csv(rows: list[dict], path: Path) -> Path:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def best(rows: list[dict], metric: str) -> dict:
    larger_is_better = METRICS[metric]
    scored = [row for row in rows if isinstance(row.get(metric), (int, float))]
    return max(scored, key=lambda row: row[metric] if larger_is_better else -row[metric])
