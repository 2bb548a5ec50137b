"""A trained drafter: the target's first layers, then a few layers of its own.

The drafter runs a subset of the target's decoder layers (reading the target's KV
cache, so the prompt reaches it through the target's own encode-time K/V and it needs
no cache of its own), then `adapter_layers` small bidirectional layers trained by
`drafter/distill.py`, then the target's final norm and tied LM head (optionally over
a sub-vocabulary). It is the target run under a plan, as the self-drafter is.

A drafter folder holds `drafter_config.json` and `drafter.safetensors`; the one shipped
for a model lives in the model folder's `drafter/` (`drafter="default"`). Every value
of the config is checked (ConfigError, naming the file and key), and so is every
tensor (CheckpointError: a damaged file, a name, shape or dtype the config does not
call for, NaN or infinite values) before anything is built.

The config records the model the drafter was made for ("target", a fingerprint:
drafter/fingerprint.py); loading it for another model is refused ("drafter made for a
different model: ..."). A folder saved before fingerprints has none: it loads with a
UserWarning, unchecked (refusing it would break drafters that work); `stamp(folder,
model)` writes the fingerprint of the model it was made for.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlx_diffgem.core import checkpoint
from mlx_diffgem.core import validate as V
from mlx_diffgem.core.errors import CheckpointError, ConfigError

from . import fingerprint as fp
from .plan import SelfDraftPlan

CONFIG, WEIGHTS = "drafter_config.json", "drafter.safetensors"
KIND = "trained-adapter"
DTYPES = ("F32", "F16")  # what the numpy reader (safetensors.numpy) takes


@dataclass(frozen=True)
class AdapterConfig:
    hidden_size: int
    num_layers: int = 1
    num_heads: int = 4
    head_dim: int = 32
    intermediate_size: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    @classmethod
    def at_width_of(cls, config: Any, num_layers: int) -> AdapterConfig:
        """`num_layers` own layers at a model's width: its hidden size, attention
        heads and dense MLP (what distill trains, and what the cost model lays out
        on the released shape)."""
        return cls(
            hidden_size=config.hidden_size,
            num_layers=num_layers,
            num_heads=config.num_attention_heads,
            head_dim=config.head_dim,
            intermediate_size=config.intermediate_size,
            rms_norm_eps=config.rms_norm_eps,
        )

    def inv_freq(self) -> list[float]:
        D = self.head_dim
        return [self.rope_theta ** (-i / D) for i in range(0, D, 2)]

    @classmethod
    def from_dict(cls, raw: Any, source: Path) -> AdapterConfig:
        """The "adapter" entry of drafter_config.json, every value checked."""
        fields = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(raw, dict) or "hidden_size" not in raw:
            raise ConfigError(f"{source}: adapter: expected an object with {fields}")
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise ConfigError(
                f"{source}: adapter: unknown key {unknown[0]!r}; expected {fields}"
            )
        out: dict[str, Any] = {}
        for k, v in raw.items():
            name, kw = f"adapter.{k}", {"source": str(source), "error": ConfigError}
            if k == "rope_theta":
                out[k] = V.number(v, name, lo=0, lo_open=True, **kw)
            elif k == "rms_norm_eps":
                out[k] = V.number(v, name, lo=0, **kw)
            else:
                out[k] = V.integer(v, name, lo=1, **kw)
        if out.get("head_dim", cls.head_dim) % 2:
            raise ConfigError(
                f"{source}: adapter.head_dim must be even (RoPE rotates pairs), got "
                f"{out['head_dim']}"
            )
        return cls(**out)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the adapter (the names of both backends' modules)."""
        H, I = self.hidden_size, self.intermediate_size
        inner = self.num_heads * self.head_dim
        layer = {
            "input_norm.weight": (H,),
            "q_proj.weight": (inner, H),
            "k_proj.weight": (inner, H),
            "v_proj.weight": (inner, H),
            "o_proj.weight": (H, inner),
            "mlp_norm.weight": (H,),
            "mlp.gate_proj.weight": (I, H),
            "mlp.up_proj.weight": (I, H),
            "mlp.down_proj.weight": (H, I),
        }
        return {
            f"layers.{i}.{k}": s
            for i in range(self.num_layers)
            for k, s in layer.items()
        }


_OPTIONAL = ("top_k", "sc_top_k", "head_vocab")


@dataclass(frozen=True)
class DrafterSpec:
    """What drafter_config.json says: which target cuts, the adapter's shape, and
    the target's fingerprint (None: a folder saved before fingerprints)."""

    target_layers: tuple[int, ...]
    adapter: AdapterConfig
    top_k: int | None = None
    sc_top_k: int | None = None
    head_vocab: int | None = None
    target: dict | None = None
    # SpecPolicy settings this drafter is meant to run with (what api.load uses
    # where the caller gives none, SpecPolicy.over), e.g. {"draft_steps": 8}:
    # None, none.
    speculative: dict | None = None

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

    def for_target(self, folder: str | Path, config: Any) -> DrafterSpec:
        """This spec with the fingerprint of the model in `folder` (its config)."""
        target = fp.fingerprint(folder, config, self.target_layers)
        return dataclasses.replace(self, target=target)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("target", "speculative"):
            if d[key] is None:
                d.pop(key)
        return {"kind": KIND, **d, "target_layers": list(self.target_layers)}

    @classmethod
    def from_file(cls, path: Path) -> DrafterSpec:
        raw = _read_json(path)
        if raw.get("kind") != KIND:
            raise ConfigError(f'{path}: expected "kind": "{KIND}"')
        known = {"kind", *(f.name for f in dataclasses.fields(cls))}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(
                f"{path}: unknown key {unknown[0]!r}; expected {sorted(known)}"
            )
        layers = raw.get("target_layers")
        if not isinstance(layers, list) or not layers:
            raise ConfigError(
                f"{path}: target_layers must be a non-empty list of layer indices"
            )
        kw = {"source": str(path), "error": ConfigError}
        opts = {
            k: V.integer(raw[k], k, lo=1, **kw)
            for k in _OPTIONAL
            if raw.get(k) is not None
        }
        return cls(
            target_layers=tuple(
                V.integer(i, "target_layers", lo=0, **kw) for i in layers
            ),
            adapter=AdapterConfig.from_dict(raw.get("adapter"), path),
            target=raw.get("target"),
            speculative=_speculative(raw.get("speculative"), path),
            **opts,
        )


def _speculative(raw: Any, path: Path) -> dict | None:
    """The config's "speculative" entry: None, or SpecPolicy fields it checks."""
    from mlx_diffgem.core.speculative import SpecPolicy

    if raw is None:
        return None
    if not isinstance(raw, dict):
        fields = sorted(f.name for f in dataclasses.fields(SpecPolicy))
        raise ConfigError(f"{path}: speculative must be an object of {fields}")
    SpecPolicy.from_options(raw, str(path), ConfigError)
    return dict(raw)


def _read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f'{path}: expected a JSON object with "kind": "{KIND}"')
    return raw


def save(folder: str | Path, spec: DrafterSpec, tensors: dict[str, Any]) -> Path:
    """Write a drafter folder from numpy float32 arrays named as the adapter's (with
    the target's fingerprint when `spec.target` holds one: `spec.for_target`)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG).write_text(json.dumps(spec.to_dict(), indent=1) + "\n")
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "np"})
    return folder


def stamp(folder: str | Path, model: str | Path) -> Path:
    """Write into the drafter `folder` the fingerprint of the model (a checkpoint
    folder or repo id) it was made for; its weights are left as they are."""
    folder, where = Path(folder), checkpoint.resolve(model)
    spec = DrafterSpec.from_file(folder / CONFIG)
    spec = spec.for_target(where, checkpoint.load_config(where))
    (folder / CONFIG).write_text(json.dumps(spec.to_dict(), indent=1) + "\n")
    return folder


def read_weights(path: Path, adapter: AdapterConfig) -> dict[str, np.ndarray]:
    """The adapter's tensors, checked against its config before they are read."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing (a drafter folder holds {CONFIG} and {WEIGHTS})"
        )
    found = checkpoint.read_shapes([path])  # one-line error on a bad header
    _check_tensors(path, found, adapter)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors ({e})") from None
    for name in sorted(tensors):
        if not np.isfinite(tensors[name]).all():
            raise CheckpointError(f"{path}: tensor {name} has NaN or infinite values")
    return tensors


def _check_tensors(path: Path, found: dict, adapter: AdapterConfig) -> None:
    per_layer = len(AdapterConfig(1, num_layers=1).shapes())
    if len(found) != per_layer * adapter.num_layers:  # before listing the names
        raise CheckpointError(
            f"{path}: tensors do not match the adapter config ({len(found)} tensors, "
            f"expected {per_layer} per layer for adapter.num_layers="
            f"{adapter.num_layers})"
        )
    want = adapter.shapes()
    if set(found) != set(want):
        missing, extra = set(want) - set(found), set(found) - set(want)
        raise CheckpointError(
            f"{path}: tensors do not match the adapter config (missing "
            f"{sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})"
        )
    for name in sorted(want):
        dtype, shape = found[name]
        if dtype not in DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name} has dtype {dtype}; expected one of {DTYPES}"
            )
        if tuple(shape) != want[name]:
            raise CheckpointError(
                f"{path}: {name}: expected shape {want[name]}, got {tuple(shape)}"
            )


def load_adapter(folder: Path, spec: DrafterSpec, backend: str, dtype: Any) -> Any:
    """The adapter module of `backend` with the folder's weights."""
    if backend == "mlx":
        from .adapter_mlx import Adapter
    elif backend == "torch":
        from .adapter_torch import Adapter
    else:
        raise ValueError(f"drafter: no trained drafter for backend {backend!r}")
    path = folder / WEIGHTS
    tensors = read_weights(path, spec.adapter)
    return Adapter.from_numpy(spec.adapter, tensors, dtype, path)


def trained_plan(target: Any, folder: str | Path) -> SelfDraftPlan:
    """The plan of the drafter in `folder` for `target`: the target's kept layers,
    the trained adapter (on the target's backend), the target's head."""
    folder = Path(folder)
    source = folder / CONFIG
    spec = DrafterSpec.from_file(source)
    if spec.adapter.hidden_size != target.config.hidden_size:
        raise ConfigError(
            f"{source}: adapter hidden_size {spec.adapter.hidden_size} "
            f"!= the target's {target.config.hidden_size}"
        )
    layers, L = spec.target_layers, target.config.num_hidden_layers
    if len(set(layers)) != len(layers) or max(layers) >= L:
        raise ConfigError(
            f"{source}: target_layers={list(layers)}: expected distinct layer "
            f"indices in [0, {L})"
        )
    try:
        spec.plan(target.config)  # the other cuts fit this target
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    if spec.target is None:
        warnings.warn(
            f"{source}: no target fingerprint (saved before drafters recorded their "
            f"model), so not checked against {target.path}; add one with "
            "drafter.trained.stamp(folder, model)",
            UserWarning,
            stacklevel=3,
        )
    else:
        fp.check(spec.target, target, spec.target_layers, source)
    adapter = load_adapter(folder, spec, target.backend, target.model.dtype)
    return spec.plan(target.config, adapter, str(folder))
