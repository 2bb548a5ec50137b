"""Module paths of release 0.1.0 that moved in 0.2.0 (CHANGELOG.md).

For one release the old path still imports, as the new module itself, with a
DeprecationWarning that names the new path; no copy of the moved code stays behind.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import warnings

MOVED = {
    **{
        f"mlx_diffgem.{name}": f"mlx_diffgem.mlx_backend.{name}"
        for name in (
            "backend",
            "cache",
            "canvas",
            "model",
            "quantize",
            "sampling",
            "convert",
            "_blas",
        )
    },
    **{
        f"mlx_diffgem.{name}": f"mlx_diffgem.serve.{name}"
        for name in ("server", "engine", "openai_schema")
    },
    "mlx_diffgem.infill_cli": "mlx_diffgem.cli.infill",
    "mlx_diffgem.terminal": "mlx_diffgem.cli.terminal",
}


class MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old path as its new module (the same module object)."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; the old path goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        pass  # the new module is already executed
