"""`python -m bench.streaming` runs the streaming benchmark (see the package's docstring)."""

import sys

# Guarded as lockstep/__main__.py is: a process started with "spawn" imports the parent's main
# module under another name and must not run the benchmark again.
if __name__ == "__main__":
    from bench.streaming.cli import main

    sys.exit(main())
