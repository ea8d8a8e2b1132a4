"""`python -m lockstep` runs the CLI."""

# Guarded: worker processes started with "spawn" (the chaos runner's) import the parent's main
# module under another name and must neither catch signals nor run the CLI again.
if __name__ == "__main__":
    from lockstep.entry import main

    main()
