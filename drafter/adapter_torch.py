"""The trained drafter's own layers in PyTorch (twin of adapter_mlx.py).

Each layer: bidirectional attention over the canvas (RoPE on canvas offsets; the
context already reached the stream through the target layers below), then a gated
GELU MLP, both residual and pre-normed. The output projections start at zero, so an
untrained adapter is the identity and the drafter starts as the cut target.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cuda_backend.model import MLP, RMSNorm, rope


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

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        B, C, _ = h.shape
        x = self.input_norm(h)
        q = rope(self.q_proj(x).view(B, C, self.heads, -1), cos, sin).transpose(1, 2)
        k = rope(self.k_proj(x).view(B, C, self.heads, -1), cos, sin).transpose(1, 2)
        v = self.v_proj(x).view(B, C, self.heads, -1).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(self.head_dim)
        o = torch.softmax(scores, dim=-1).to(v.dtype) @ v
        h = h + self.o_proj(o.transpose(1, 2).reshape(B, C, -1))
        return h + self.mlp(self.mlp_norm(h))


class Adapter(nn.Module):
    def __init__(self, c: Any):
        super().__init__()
        self.config = c
        self.layers = nn.ModuleList(AdapterLayer(c) for _ in range(c.num_layers))
        inv = torch.tensor(c.inv_freq(), dtype=torch.float32)
        self.register_buffer("inv_freq", inv, persistent=False)
        for layer in self.layers:  # identity at initialisation
            nn.init.zeros_(layer.o_proj.weight)
            nn.init.zeros_(layer.mlp.down_proj.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(h.shape[1], device=h.device, dtype=torch.float32)
        f = pos[:, None] * self.inv_freq[None]
        emb = torch.cat((f, f), dim=-1)
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return h

    def to_numpy(self) -> dict:
        return {
            k: v.detach().float().cpu().numpy() for k, v in self.state_dict().items()
        }

    @classmethod
    def from_numpy(cls, c: Any, tensors: dict, dtype: Any, path: Path) -> Adapter:
        with torch.device("cpu"):
            module = cls(c)
        expected = set(module.state_dict())
        if set(tensors) != expected:
            missing, extra = expected - set(tensors), set(tensors) - expected
            raise ValueError(
                f"{path}: tensors do not match the adapter config (missing "
                f"{sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})"
            )
        state = {k: torch.from_numpy(v.copy()) for k, v in tensors.items()}
        try:
            module.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1].strip()
            raise ValueError(f"{path}: {first}") from None
        return module.to(dtype).requires_grad_(False).eval()
