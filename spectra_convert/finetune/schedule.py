"""Learning-rate schedules: every group's rate is its base rate times a factor of the step alone.

Why a function of the step and nothing else: a resumed run must take the steps an uninterrupted run takes
(docs/ARCHITECTURE.md, "Fine-tuning"), so the rate at step ``s`` may depend only on ``s``, the schedule's name and
the steps it decays between -- all recorded in the checkpoint's run config, so a resume under another
schedule is refused like any other config change. With ``constant`` a finished run can be extended by more steps
exactly; with a decaying schedule the decay length must be fixed up front (``--lr-decay-steps``), which is how
``bench/carve.py`` cuts one decaying run into evaluated segments.
"""

from __future__ import annotations

import math

from ..errors import UserError

#: name -> what it does (the CLI's choices)
SCHEDULES = {
    "constant": "the base rate at every step",
    "cosine": "half a cosine from the base rate at --lr-decay-start (default 0) to 0 at --lr-decay-steps",
    "linear": "a straight line from the base rate at --lr-decay-start (default 0) to 0 at --lr-decay-steps",
}


def lr_factor(schedule: str, step: int, decay_steps: int, decay_start: int = 0) -> float:
    """The factor on the base rates for the optimizer step with 0-based index ``step``: 1 before ``decay_start``,
    then the decay from 1 at ``decay_start`` to 0 at ``decay_steps``."""
    if schedule == "constant" or step < decay_start:
        return 1.0
    progress = min(step - decay_start, decay_steps - decay_start) / (decay_steps - decay_start)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown schedule {schedule!r}")


def resolve_decay_steps(schedule: str, decay_steps: int | None, steps: int, decay_start: int = 0) -> int | None:
    """The step a decaying schedule reaches 0 at (default: ``steps``); None for ``constant``. A schedule shorter
    than the run is refused (its last steps would train at rate 0), and so is a decay that starts at or after its
    end. ``decay_start`` > 0 holds the rate constant first (warmup-free "stable, then decay")."""
    if schedule not in SCHEDULES:
        raise UserError(f"--lr-schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if schedule == "constant":
        if decay_steps is not None or decay_start:
            raise UserError("--lr-decay-steps / --lr-decay-start need a decaying --lr-schedule (cosine or linear)")
        return None
    decay_steps = steps if decay_steps is None else decay_steps
    if decay_steps < steps:
        raise UserError(f"--lr-decay-steps {decay_steps} is below --steps {steps}: the steps after the decay "
                        "would train at rate 0")
    if not 0 <= decay_start < decay_steps:
        raise UserError(f"--lr-decay-start {decay_start} must be at least 0 and below the decay's end ({decay_steps})")
    return decay_steps


def apply_lr(param_groups: list[dict], schedule: str, step: int, decay_steps: int | None, decay_start: int = 0) -> None:
    """Set every group's rate for ``step``. The base rate is kept in the group as ``base_lr`` (saved with the
    optimizer state, so a resumed run scales the same base)."""
    if schedule == "constant":
        return
    factor = lr_factor(schedule, step, decay_steps, decay_start)
    for group in param_groups:
        group["lr"] = group.setdefault("base_lr", group["lr"]) * factor
