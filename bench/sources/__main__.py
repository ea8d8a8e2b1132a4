"""`python -m bench.sources` runs the change-stream sources benchmark (see the package's docstring)."""

import sys

# Guarded as lockstep/__main__.py is: a process started with "spawn" imports the parent's main
# module under another name and must not run the benchmark again.
if __name__ == "__main__":
    from bench.sources.cli import main

    sys.exit(main())
