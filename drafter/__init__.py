"""Drafters for speculative block-verify decoding (DESIGN §4).

load_drafter(target, "self")                       # training-free, default cuts
load_drafter(target, "self:layers=0,5 top_k=1")    # explicit cuts
load_drafter(target, "target")                     # the target at full cost
load_drafter(target, "default")                    # the drafter shipped with the model
load_drafter(target, "path/to/drafter")            # a trained drafter folder
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DRAFTERS = ("self", "self:SETTINGS", "target", "default", "PATH")


def load_drafter(target: Any, spec: str) -> Any:
    """A drafter for `target` from a `drafter=` argument (see DRAFTERS)."""
    from .plan import SelfDraftPlan
    from .self_draft import SelfDrafter
    from .trained import CONFIG, TrainedDrafter

    if not isinstance(spec, str):
        raise ValueError(f"drafter: expected a string, got {type(spec).__name__}")
    kind, _, settings = spec.partition(":")
    if kind == "self":
        return SelfDrafter(target, SelfDraftPlan.parse(settings, target.config))
    if kind == "target" and not settings:
        return SelfDrafter(target, SelfDraftPlan().checked(target.config))
    if kind == "default" and not settings:
        shipped = Path(target.path) / "drafter"
        if not (shipped / CONFIG).is_file():
            raise ValueError(
                f"drafter: 'default': no drafter is shipped for {target.path}; use "
                "'self' (training-free)"
            )
        return TrainedDrafter(target, shipped)
    if (Path(spec) / CONFIG).is_file():
        return TrainedDrafter(target, spec)
    if Path(spec).is_dir():
        raise ValueError(f"drafter: {spec}: a folder without {CONFIG}")
    raise ValueError(
        f"drafter: unknown drafter {spec!r}; expected one of {', '.join(DRAFTERS)}"
    )
