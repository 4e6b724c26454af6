"""Learning-rate schedules: every group's rate is its base rate times a factor of the step alone.

Why a function of the step and nothing else: a resumed run must take the steps an uninterrupted run takes
(docs/ARCHITECTURE.md, "Fine-tuning"), so the rate at step ``s`` may depend only on ``s``, the schedule's name and
the number of steps it decays over -- all three recorded in the checkpoint's run config, so a resume under another
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
    "cosine": "half a cosine from the base rate at step 0 to 0 after --lr-decay-steps steps",
    "linear": "a straight line from the base rate at step 0 to 0 after --lr-decay-steps steps",
}


def lr_factor(schedule: str, step: int, decay_steps: int) -> float:
    """The factor on the base rates for the optimizer step with 0-based index ``step``."""
    if schedule == "constant":
        return 1.0
    progress = min(step, decay_steps) / decay_steps
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown schedule {schedule!r}")


def resolve_decay_steps(schedule: str, decay_steps: int | None, steps: int) -> int | None:
    """The steps a decaying schedule spans (default: ``steps``); None for ``constant``. A schedule shorter than the
    run is refused: its last steps would train at rate 0."""
    if schedule not in SCHEDULES:
        raise UserError(f"--lr-schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if schedule == "constant":
        if decay_steps is not None:
            raise UserError("--lr-decay-steps needs a decaying --lr-schedule (cosine or linear)")
        return None
    decay_steps = steps if decay_steps is None else decay_steps
    if decay_steps < steps:
        raise UserError(f"--lr-decay-steps {decay_steps} is below --steps {steps}: the steps after the decay "
                        "would train at rate 0")
    return decay_steps


def apply_lr(param_groups: list[dict], schedule: str, step: int, decay_steps: int | None) -> None:
    """Set every group's rate for ``step``. The base rate is kept in the group as ``base_lr`` (saved with the
    optimizer state, so a resumed run scales the same base)."""
    if schedule == "constant":
        return
    factor = lr_factor(schedule, step, decay_steps)
    for group in param_groups:
        group["lr"] = group.setdefault("base_lr", group["lr"]) * factor
