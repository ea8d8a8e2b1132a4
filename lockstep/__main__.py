"""`python -m lockstep` runs the CLI."""

from lockstep.cli import app

# Guarded: worker processes started with "spawn" (the chaos runner's) import the parent's main
# module under another name and must not run the CLI again.
if __name__ == "__main__":
    app(prog_name="lockstep")
