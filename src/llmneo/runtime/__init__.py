"""Small runtime helpers: atomic writes, memory measurement, the micro-batch planner, checkpoints, resuming, the
non-finite guard and the launched-processes check."""
