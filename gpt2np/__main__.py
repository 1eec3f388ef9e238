"""``python -m gpt2np ...``: the same command line as ``gpt2np ...``."""
import sys

from .cli import main

sys.exit(main())
