"""`python -m <pack> ...` from the folder that holds the pack: the command-line runner (cli.py)."""
import sys

from .runner.cli import main

sys.exit(main(prog=f"python -m {__package__}"))
