"""The MLX backend: the twin of `cuda_backend/`, file for file (DESIGN §2-3)."""
