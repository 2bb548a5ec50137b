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
    from .trained import trained_plan

    folder = trained_folder(target, spec)
    if folder is not None:
        return trained_plan(target, folder)
    kind, _, settings = spec.partition(":")
    if kind == "self":
        return SelfDraftPlan.parse(settings, target.config)
    return SelfDraftPlan().checked(target.config)  # "target"


def recommended(target: Any, spec: str) -> dict:
    """The SpecPolicy settings a trained drafter's config asks for ("speculative"
    in drafter_config.json); {} for the others."""
    from .trained import CONFIG, DrafterSpec

    folder = trained_folder(target, spec)
    if folder is None:
        return {}
    return dict(DrafterSpec.from_file(folder / CONFIG).speculative or {})


def trained_folder(target: Any, spec: str) -> Path | None:
    """The folder of the trained drafter a `drafter=` argument names; None for
    "self..." and "target"; a ValueError for anything else."""
    from .trained import CONFIG

    if not isinstance(spec, str):
        raise ValueError(f"drafter: expected a string, got {type(spec).__name__}")
    kind, _, settings = spec.partition(":")
    if kind == "self" or (kind == "target" and not settings):
        return None
    if kind == "default" and not settings:
        shipped = Path(target.path) / "drafter"
        if not (shipped / CONFIG).is_file():
            raise ValueError(
                f"drafter: 'default': no drafter is shipped for {target.path}; use "
                "'self' (training-free)"
            )
        return shipped
    if (Path(spec) / CONFIG).is_file():
        return Path(spec)
    if Path(spec).is_dir():
        raise ValueError(f"drafter: {spec}: a folder without {CONFIG}")
    raise ValueError(
        f"drafter: unknown drafter {spec!r}; expected one of {', '.join(DRAFTERS)}"
    )
