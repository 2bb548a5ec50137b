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
    """A drafter for `target` from a `drafter=` argument (see DRAFTERS): the target
    itself, run under a plan (`target.planned(plan)`, a Target of its own)."""
    return target.planned(drafter_plan(target, spec))


def drafter_plan(target: Any, spec: str) -> Any:
    """The PassPlan that a `drafter=` argument names for `target`."""
    from .plan import SelfDraftPlan
    from .trained import CONFIG, trained_plan

    if not isinstance(spec, str):
        raise ValueError(f"drafter: expected a string, got {type(spec).__name__}")
    kind, _, settings = spec.partition(":")
    if kind == "self":
        return SelfDraftPlan.parse(settings, target.config)
    if kind == "target" and not settings:
        return SelfDraftPlan().checked(target.config)
    if kind == "default" and not settings:
        shipped = Path(target.path) / "drafter"
        if not (shipped / CONFIG).is_file():
            raise ValueError(
                f"drafter: 'default': no drafter is shipped for {target.path}; use "
                "'self' (training-free)"
            )
        return trained_plan(target, shipped)
    if (Path(spec) / CONFIG).is_file():
        return trained_plan(target, spec)
    if Path(spec).is_dir():
        raise ValueError(f"drafter: {spec}: a folder without {CONFIG}")
    raise ValueError(
        f"drafter: unknown drafter {spec!r}; expected one of {', '.join(DRAFTERS)}"
    )
