"""The trained drafter's own layers in MLX (twin of adapter_torch.py, same weights)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_diffgem.mlx_backend.model import MLP, RMSNorm


def _rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate-half RoPE; x [B, h, C, D], cos/sin [C, D]."""
    half = x.shape[-1] // 2
    rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class AdapterLayer(nn.Module):
    def __init__(self, c: Any):
        super().__init__()
        H, inner = c.hidden_size, c.num_heads * c.head_dim
        self.heads, self.head_dim = c.num_heads, c.head_dim
        self.input_norm = RMSNorm(H, c.rms_norm_eps)
        self.q_proj = nn.Linear(H, inner, bias=False)
        self.k_proj = nn.Linear(H, inner, bias=False)
        self.v_proj = nn.Linear(H, inner, bias=False)
        self.o_proj = nn.Linear(inner, H, bias=False)
        self.mlp_norm = RMSNorm(H, c.rms_norm_eps)
        self.mlp = MLP(H, c.intermediate_size)

    def _heads(self, x: mx.array) -> mx.array:
        B, C, _ = x.shape
        return x.reshape(B, C, self.heads, -1).transpose(0, 2, 1, 3)

    def __call__(self, h: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        B, C, _ = h.shape
        x = self.input_norm(h)
        q = _rope(self._heads(self.q_proj(x)), cos, sin)
        k = _rope(self._heads(self.k_proj(x)), cos, sin)
        v = self._heads(self.v_proj(x))
        scores = (q @ k.transpose(0, 1, 3, 2)).astype(mx.float32)
        att = mx.softmax(scores / math.sqrt(self.head_dim), axis=-1).astype(v.dtype)
        o = (att @ v).transpose(0, 2, 1, 3).reshape(B, C, -1)
        h = h + self.o_proj(o)
        return h + self.mlp(self.mlp_norm(h))


class Adapter(nn.Module):
    def __init__(self, c: Any):
        super().__init__()
        self.config = c
        self.layers = [AdapterLayer(c) for _ in range(c.num_layers)]
        self._inv_freq = np.asarray(c.inv_freq(), np.float32)

    def __call__(self, h: mx.array) -> mx.array:
        f = np.arange(h.shape[1], dtype=np.float32)[:, None] * self._inv_freq[None]
        emb = np.concatenate([f, f], axis=-1)
        cos = mx.array(np.cos(emb)).astype(h.dtype)
        sin = mx.array(np.sin(emb)).astype(h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return h

    @classmethod
    def from_numpy(cls, c: Any, tensors: dict, dtype: Any, path: Path) -> Adapter:
        from mlx.utils import tree_flatten

        module = cls(c)
        expected = {k: v.shape for k, v in tree_flatten(module.parameters())}
        if set(tensors) != set(expected):
            missing, extra = set(expected) - set(tensors), set(tensors) - set(expected)
            raise ValueError(
                f"{path}: tensors do not match the adapter config (missing "
                f"{sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})"
            )
        for k, shape in expected.items():
            if tuple(tensors[k].shape) != tuple(shape):
                raise ValueError(
                    f"{path}: {k}: expected shape {tuple(shape)}, got "
                    f"{tuple(tensors[k].shape)}"
                )
        module.load_weights(
            [(k, mx.array(v).astype(dtype)) for k, v in tensors.items()]
        )
        module.freeze()
        return module
