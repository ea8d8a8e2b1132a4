"""`python -m lockstep` runs the CLI."""

from lockstep.cli import app

app(prog_name="lockstep")
