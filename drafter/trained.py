"""A trained drafter: the target's first layers, then a few layers of its own.

The drafter runs a subset of the target's decoder layers (reading the target's KV
cache, so the prompt reaches it through the target's own encode-time K/V and it needs
no cache of its own), then `adapter_layers` small bidirectional layers trained by
`drafter/distill.py`, then the target's final norm and tied LM head (optionally over
a sub-vocabulary). It is the target run under a plan, as the self-drafter is.

A drafter folder holds `drafter_config.json` and `drafter.safetensors`; the one shipped
for a model lives in the model folder's `drafter/` (`drafter="default"`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .plan import SelfDraftPlan

CONFIG, WEIGHTS = "drafter_config.json", "drafter.safetensors"
KIND = "trained-adapter"


@dataclass(frozen=True)
class AdapterConfig:
    hidden_size: int
    num_layers: int = 1
    num_heads: int = 4
    head_dim: int = 32
    intermediate_size: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    def inv_freq(self) -> list[float]:
        D = self.head_dim
        return [self.rope_theta ** (-i / D) for i in range(0, D, 2)]


@dataclass(frozen=True)
class DrafterSpec:
    """What drafter_config.json says: which target cuts, and the adapter's shape."""

    target_layers: tuple[int, ...]
    adapter: AdapterConfig
    top_k: int | None = None
    sc_top_k: int | None = None
    head_vocab: int | None = None

    def plan(
        self, target_config: Any, adapter: Any = None, source: str | None = None
    ) -> SelfDraftPlan:
        return SelfDraftPlan(
            layers=self.target_layers,
            top_k=self.top_k,
            sc_top_k=self.sc_top_k,
            head_vocab=self.head_vocab,
            adapter=adapter,
            source=source,
        ).checked(target_config)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {"kind": KIND, **d, "target_layers": list(self.target_layers)}

    @classmethod
    def from_file(cls, path: Path) -> DrafterSpec:
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable JSON file ({e})") from None
        if not isinstance(raw, dict) or raw.get("kind") != KIND:
            raise ValueError(f'{path}: expected "kind": "{KIND}"')
        try:
            adapter = AdapterConfig(**raw["adapter"])
            return cls(
                target_layers=tuple(int(i) for i in raw["target_layers"]),
                adapter=adapter,
                top_k=raw.get("top_k"),
                sc_top_k=raw.get("sc_top_k"),
                head_vocab=raw.get("head_vocab"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: bad drafter config ({e!r})") from None


def save(folder: str | Path, spec: DrafterSpec, tensors: dict[str, Any]) -> Path:
    """Write a drafter folder from numpy float32 arrays named as the adapter's."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG).write_text(json.dumps(spec.to_dict(), indent=1) + "\n")
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "np"})
    return folder


def load_adapter(folder: Path, spec: DrafterSpec, backend: str, dtype: Any) -> Any:
    """The adapter module of `backend` with the folder's weights."""
    from safetensors.numpy import load_file

    path = folder / WEIGHTS
    if not path.is_file():
        raise ValueError(
            f"{path}: missing (a drafter folder holds {CONFIG} and {WEIGHTS})"
        )
    tensors = load_file(str(path))
    if backend == "mlx":
        from .adapter_mlx import Adapter
    elif backend == "torch":
        from .adapter_torch import Adapter
    else:
        raise ValueError(f"drafter: no trained drafter for backend {backend!r}")
    return Adapter.from_numpy(spec.adapter, tensors, dtype, path)


def trained_plan(target: Any, folder: str | Path) -> SelfDraftPlan:
    """The plan of the drafter in `folder` for `target`: the target's kept layers,
    the trained adapter (on the target's backend), the target's head."""
    folder = Path(folder)
    spec = DrafterSpec.from_file(folder / CONFIG)
    if spec.adapter.hidden_size != target.config.hidden_size:
        raise ValueError(
            f"{folder / CONFIG}: adapter hidden_size {spec.adapter.hidden_size} "
            f"!= the target's {target.config.hidden_size}"
        )
    adapter = load_adapter(folder, spec, target.backend, target.model.dtype)
    return spec.plan(target.config, adapter, str(folder))
