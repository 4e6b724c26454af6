"""Resumable checkpoints (the atomic output folder is ``modelio.outdir.atomic_output_dir``).

Layout of the checkpoint folder (``OUT.partial/`` unless ``--checkpoint-dir``)::

    run.json                 the run config and its hash; a resume with another config is refused
    step-00000004/           accelerator.save_state(): optimizer, RNG states of every rank, and (through a
        trainable.safetensors  save hook) only the tensors that train plus the routers' dual-bias buffers,
        trainer_state.json     so a checkpoint of a router-only run is kilobytes, not a model copy.

A checkpoint is written into ``.tmp-step-N`` and renamed when complete, so a SIGKILL mid-save leaves the last
complete checkpoint as the newest one. Only the newest checkpoint is kept. ``OUT.partial/`` is removed once
OUT is written; a ``--checkpoint-dir`` is kept and also holds the final step, so ``--resume`` with a larger
``--steps`` continues a finished run as if it had never stopped (constant learning rates, data order by step).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import UserError

CHECKPOINT_PREFIX = "step-"
RUN_FILE = "run.json"
TRAINER_STATE = "trainer_state.json"


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys[:4])


class CheckpointDir:
    """The resumable state of one run."""

    def __init__(self, path: Path, config: dict[str, Any]):
        self.path = path
        self.config = json.loads(json.dumps(config, sort_keys=True, default=str))
        self.hash = config_hash(self.config)

    def checkpoints(self) -> list[Path]:
        if not self.path.is_dir():
            return []
        found = [p for p in self.path.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
                 and (p / TRAINER_STATE).is_file()]
        return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def check(self, *, resume: bool, force: bool) -> Path | None:
        """Validate the folder against this run; return the checkpoint to resume from (or None).

        Read-only, so every rank can call it and reach the same verdict before anyone writes.
        """
        run_file = self.path / RUN_FILE
        if not self.path.exists():
            return None
        if not resume:
            if force:
                return None
            raise UserError(
                f"{self.path} holds checkpoints of an earlier run; pass --resume to continue it or --force to start over"
            )
        if not run_file.is_file():
            raise UserError(f"cannot resume: {self.path} has no {RUN_FILE}; pass --force to start over")
        old = json.loads(run_file.read_text())
        if old.get("hash") != self.hash:
            raise UserError(
                f"cannot resume: the checkpoint in {self.path} was written with a different config "
                f"({_differences(old.get('config', {}), self.config)}); rerun with the same options or --force"
            )
        return self.latest()

    def initialise(self, *, fresh: bool) -> None:
        """(main process) Create the folder and its run file; a fresh run clears what an earlier run left."""
        if fresh and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / RUN_FILE).write_text(json.dumps({"hash": self.hash, "config": self.config}, indent=2) + "\n")

    def staging(self, step: int) -> Path:
        return self.path / f".tmp-{CHECKPOINT_PREFIX}{step:08d}"

    def commit(self, step: int, trainer_state: dict[str, Any]) -> Path:
        """(main process) Finish a staged checkpoint: state file, atomic rename, drop older checkpoints."""
        staging = self.staging(step)
        (staging / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")
        final = self.path / f"{CHECKPOINT_PREFIX}{step:08d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        for old in self.checkpoints():
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        return final
