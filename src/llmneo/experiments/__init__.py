"""The paper's experiments as commands: compare (Table I), sweep (Fig. 2), scaling (Fig. 4), and evaluation."""
