"""`python -m targan_cli` is the `targan` command (torchrun launches it this way)."""

from targan_cli.cli import main

if __name__ == "__main__":
    main()
