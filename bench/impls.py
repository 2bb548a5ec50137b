"""The implementations a benchmark times, behind one call: generate one canvas.

Each adapter runs its implementation's own end-to-end generation (prefill of the
prompt, then one canvas of exactly `steps` denoising steps: the confidence threshold
is set so low that no canvas stops early) and returns when the step of each decoder
call began. The interval between two consecutive starts is one whole denoising step
(decoder pass + sampler + loop bookkeeping + that step's host sync), measured the same
way for every implementation:

- ours (`mlx_diffgem.generate_ids`, either backend): starts of `Model.decode`;
- transformers: `DiffusionGemmaForBlockDiffusion.generate`, starts of `forward`
  (its decoder call);
- mlx-vlm: `mlx_vlm.generate.diffusion.stream_diffusion_generate` (its full canvas
  loop, entropy-bound sampler, no extra temperature) with a no-op detokenizer,
  starts of `diffusion_decoder_logits`.

Steady-state steps are steps 3..S-1: step 1 has no self-conditioning input, mlx-vlm
evaluates its first step lazily inside the second, and the end of step S is not a
decoder call (it would include the canvas commit).
"""

from __future__ import annotations

import importlib.metadata
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

NEVER_CONFIDENT = 1e-30  # a mean entropy below this never happens: no early stop
STEADY = slice(2, None)  # of the S-1 start-to-start intervals: steps 3..S-1


@dataclass
class Run:
    """One timed generation: step start times and the whole call."""

    marks: list[float]  # perf_counter at the start of every decoder call
    start: float
    end: float

    @property
    def steps(self) -> int:
        return len(self.marks)

    def step_intervals(self) -> list[float]:
        """Durations of steps 3..S-1 (seconds)."""
        return list(np.diff(self.marks)[STEADY])


class StepClock:
    """Records when each call of `obj.<attr>` starts, while active."""

    def __init__(self, obj: Any, attr: str):
        self.obj, self.attr, self.marks = obj, attr, []

    def __enter__(self) -> StepClock:
        self._had = self.attr in vars(self.obj)
        orig = getattr(self.obj, self.attr)

        def timed(*args, **kwargs):
            self.marks.append(time.perf_counter())
            return orig(*args, **kwargs)

        self._orig = orig
        setattr(self.obj, self.attr, timed)
        return self

    def __exit__(self, *exc) -> None:
        if self._had:  # e.g. a torch.compile'd method set on the instance
            setattr(self.obj, self.attr, self._orig)
        else:
            delattr(self.obj, self.attr)


def _timed(obj: Any, attr: str, fn) -> Run:
    with StepClock(obj, attr) as clock:
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
    return Run(clock.marks, t0, t1)


def _check_steps(name: str, run: Run, steps: int) -> Run:
    if run.steps != steps:
        raise RuntimeError(f"{name}: ran {run.steps} decoder passes, expected {steps}")
    return run


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


class Ours:
    """mlx-diffgem's own loop (`generate_ids`) on a loaded Target."""

    def __init__(self, target: Any):
        self.target = target
        self.name = f"mlx_diffgem[{target.backend}]"
        self.info = {"status": "ok", "how": "mlx_diffgem.generate_ids"}

    def generate(self, ids: np.ndarray, steps: int, seed: int) -> Run:
        from mlx_diffgem.core.generate import generate_ids

        C = self.target.config.canvas_length
        kw = dict(max_denoising_steps=steps, confidence_threshold=NEVER_CONFIDENT)
        run = _timed(
            self.target.model,
            "decode",
            lambda: generate_ids(self.target, ids, seed=seed, max_new_tokens=C, **kw),
        )
        return _check_steps(self.name, run, steps)


class Transformers:
    """transformers' reference `DiffusionGemmaForBlockDiffusion.generate`."""

    name = "transformers"

    def __init__(self, model: Any, device: str, weights: str):
        import torch

        self.torch, self.device, self.model = torch, device, model
        self.C = int(model.config.canvas_length)
        self.info = {
            "status": "ok",
            "version": _version("transformers"),
            "how": "DiffusionGemmaForBlockDiffusion.generate, attn sdpa, "
            "default (dynamic) cache, not compiled",
            "weights": weights,
        }

    @classmethod
    def load(cls, path: Path, dtype: str, device: str) -> Transformers:
        """From the preset's checkpoint folder, as a user loads it."""
        import torch
        from transformers import DiffusionGemmaForBlockDiffusion
        from transformers.utils import logging

        logging.disable_progress_bar()  # one record line, not a loading bar
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(
            str(path), dtype=getattr(torch, dtype), attn_implementation="sdpa"
        )
        return cls(model.eval().to(device), device, "from_pretrained")

    def generate(self, ids: np.ndarray, steps: int, seed: int) -> Run:
        torch = self.torch
        torch.manual_seed(seed)
        x = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        kw = dict(max_denoising_steps=steps, confidence_threshold=NEVER_CONFIDENT)

        def call():
            with torch.no_grad():
                self.model.generate(x, max_new_tokens=self.C, **kw)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()

        return _check_steps(self.name, _timed(self.model, "forward", call), steps)


class _NeverStop:
    """mlx-vlm's stopping-criteria slot: the benchmark never stops on a token."""

    def __call__(self, token: int) -> bool:
        return False

    def add_eos_token_ids(self, ids: Any) -> None:
        pass


class _NullDetokenizer:
    last_segment = ""

    def reset(self) -> None:
        pass

    def add_token(self, *args: Any, **kwargs: Any) -> None:
        pass

    def finalize(self) -> None:
        pass


class _NullTokenizer:
    """Enough of a processor for mlx-vlm's loop; text is not what we time."""

    def __init__(self):
        self.detokenizer = _NullDetokenizer()
        self.stopping_criteria = _NeverStop()


class MlxVlm:
    """mlx-vlm's DiffusionGemma port and its canvas loop."""

    name = "mlx_vlm"

    def __init__(self, path: Path, dtype: str, prefill_chunk: int):
        from mlx_diffgem.mlx_backend._blas import import_mlx

        mx = import_mlx()  # the fast BLAS must load before mlx_vlm imports mlx
        from mlx_vlm.generate import diffusion
        from mlx_vlm.utils import load_model

        self.mx, self.loop, self.chunk = mx, diffusion, prefill_chunk
        # strict=False: the random checkpoint has no vision-tower weights
        self.model = load_model(Path(path), strict=False)
        if dtype != "float32":
            self.model.set_dtype(getattr(mx, dtype))
        gen = json.loads((Path(path) / "generation_config.json").read_text())
        gen["confidence_threshold"] = NEVER_CONFIDENT
        self.model.config.generation_config = gen
        self.C = int(self.model.config.canvas_length)
        self.tok = _NullTokenizer()
        self.info = {
            "status": "ok",
            "version": _version("mlx-vlm"),
            "how": "mlx_vlm.generate.diffusion.stream_diffusion_generate, "
            "entropy-bound sampler, temperature 1, full canvas, no-op detokenizer",
        }

    def generate(self, ids: np.ndarray, steps: int, seed: int) -> Run:
        mx = self.mx
        mx.random.seed(seed)

        def call():
            results = self.loop.stream_diffusion_generate(
                self.model,
                self.tok,
                self.tok,
                mx.array(ids),
                None,
                None,
                max_tokens=self.C,
                skip_special_token_ids=[],
                temperature=1.0,
                max_denoising_steps=steps,
                diffusion_full_canvas=True,
                diffusion_sampler="entropy-bound",
                prefill_step_size=self.chunk,
            )
            for _ in results:
                pass

        run = _timed(self.model, "diffusion_decoder_logits", call)
        return _check_steps(self.name, run, steps)


def load_peer(
    name: str, path: Path, dtype: str, device: str, prefill_chunk: int
) -> tuple[Any | None, dict]:
    """A peer adapter, or None and why (a peer that fails to load is a result)."""
    pkg = {"transformers": "transformers", "mlx_vlm": "mlx-vlm"}[name]
    if _version(pkg) is None:
        return None, {"status": "unavailable", "reason": f"{pkg} is not installed"}
    try:
        if name == "transformers":
            peer = Transformers.load(path, dtype, device)
        else:
            peer = MlxVlm(path, dtype, prefill_chunk)
    except Exception as e:  # noqa: BLE001 - any load failure is recorded, not fatal
        return None, {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
    return peer, peer.info
