"""Backend-agnostic core: Python + numpy only (no mlx, no torch imports)."""
