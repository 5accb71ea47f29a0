"""The paper's experiments as commands: compare (Table I), sweep (Fig. 2) and scaling (Fig. 4), each cell a run."""
