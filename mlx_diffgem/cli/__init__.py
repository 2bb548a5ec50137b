"""The `diffgem` command: one module per subcommand, each with add_parser and run."""

from .main import main

__all__ = ["main"]
