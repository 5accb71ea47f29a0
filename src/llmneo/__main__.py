"""`python -m llmneo COMMAND ...` (and `accelerate launch -m llmneo COMMAND ...`): the same as `llm-neo`."""

import sys

from .cli import main

sys.exit(main())
