"""The accelerate training loop: steps, gradient accumulation, dual-bias sync, logging, checkpoints, eval.

Decisions that matter for correctness:

* **Data order** comes from ``data.block_indices(step, micro, rank)`` — no iterator state — so a resumed run
  sees the batches an uninterrupted run sees.
* **Dual bias across ranks**: every router EMA-updates its ``dual_bias`` buffer from the Sinkhorn potentials of
  its rank's local batch during forward. DDP is created with ``broadcast_buffers=False`` (rank 0's buffers must
  not overwrite the others' mid-accumulation) and after every optimizer step the buffers are *averaged* over
  ranks (``accelerator.reduce(..., "mean")``): the mean of the ranks' EMA updates is the EMA update a single
  process would make from the average potentials, and all ranks leave every step with identical buffers.
* **Checkpoints** hold only what trains (plus the dual biases) through an accelerate save hook, together with
  the optimizer and every rank's RNG state (``accelerator.save_state``). FSDP / DeepSpeed keep accelerate's
  own full-state path.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from torch import nn

from ..console import err_console, progress
from ..router.find import find_routers
from ..router.loads import RouterMonitor
from .data import block_indices
from .schedule import apply_lr
from .state import CheckpointDir

TRAINABLE_FILE = "trainable.safetensors"


@dataclass
class LoopConfig:
    steps: int
    batch_size: int
    grad_accum: int
    seed: int
    save_every: int
    log_every: int
    max_grad_norm: float
    log_file: Path | None = None
    checkpoint_last: bool = False  # also checkpoint the final step (kept checkpoint folders: a later, longer run resumes)
    teacher: Any = None  # a ``distill.Teacher``: its KL term replaces a share of the LM loss
    lr_schedule: str = "constant"  # ``schedule.SCHEDULES``: the rates are a function of the step alone
    lr_decay_steps: int | None = None  # the step a decaying schedule reaches 0 at (None for constant)
    lr_decay_start: int = 0  # the step the decay starts at (the rate is constant before)


@dataclass
class TrainerState:
    """What a checkpoint needs besides tensors (saved as ``trainer_state.json``)."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    eval_before: dict[str, Any] | None = None


# -- checkpoint hooks ------------------------------------------------------------------------------------------


def _checkpoint_names(model: nn.Module) -> set[str]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return names | {n for n, _ in model.named_buffers() if n.endswith("dual_bias")}


def install_checkpoint_hooks(accelerator: Accelerator, model: nn.Module) -> None:
    """Save/load only trainable tensors + dual biases instead of a full model copy per checkpoint."""
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        return
    unwrapped = accelerator.unwrap_model(model)
    names = _checkpoint_names(unwrapped)

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            state = unwrapped.state_dict()
            save_file({n: state[n].detach().contiguous().cpu() for n in sorted(names)},
                      str(Path(output_dir) / TRAINABLE_FILE))
        weights.clear()  # accelerate must not write the full model

    def load_hook(models: list, input_dir: str) -> None:
        tensors = load_file(str(Path(input_dir) / TRAINABLE_FILE))
        missing = names - set(tensors)
        if missing:
            raise RuntimeError(f"checkpoint {input_dir} lacks {sorted(missing)[:3]}")
        result = unwrapped.load_state_dict(tensors, strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"checkpoint {input_dir} has unexpected tensors {result.unexpected_keys[:3]}")
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator: Accelerator, ckpt: CheckpointDir, state: TrainerState) -> None:
    staging = ckpt.staging(state.step)
    if accelerator.is_main_process and staging.exists():
        import shutil

        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ckpt.commit(state.step, asdict(state))
    accelerator.wait_for_everyone()


# -- helpers ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def sync_dual_bias(accelerator: Accelerator, model: nn.Module) -> None:
    """Average every router's dual bias over ranks (one collective for all layers)."""
    if accelerator.num_processes == 1:
        return
    buffers = [r.dual_bias for r in find_routers(accelerator.unwrap_model(model))]
    flat = torch.cat([b.reshape(-1).float() for b in buffers]).to(accelerator.device)
    flat = accelerator.reduce(flat, reduction="mean")
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b).to(b.dtype))
        offset += b.numel()


def router_digest(model: nn.Module) -> str:
    """sha256 of every router tensor (parameters and dual bias) as this rank holds them."""
    import hashlib

    digest = hashlib.sha256()
    for router in find_routers(model):
        for name, tensor in sorted(router.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: nn.Module, blocks: torch.Tensor, batch_size: int,
             monitor: RouterMonitor) -> dict[str, Any]:
    """Held-out perplexity (token-weighted) and per-layer load CV, sharded over ranks and reduced.

    Every rank runs the same number of forwards (FSDP needs matching collectives); a rank whose shard is
    exhausted runs a dummy forward whose loads are discarded.
    """
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    saved = monitor.loads.clone()
    monitor.reset()
    world, rank = accelerator.num_processes, accelerator.process_index
    n = blocks.shape[0]
    mine = list(range(rank, n, world))
    rounds = math.ceil(math.ceil(n / world) / batch_size)
    nll = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    tokens = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for r in range(rounds):
        chunk = mine[r * batch_size:(r + 1) * batch_size]
        dummy = not chunk
        ids = blocks[chunk or [0]].to(accelerator.device)
        before = monitor.loads.clone()
        logits = model(input_ids=ids, use_cache=False).logits.float()
        if dummy:
            monitor.loads.copy_(before)
            continue
        losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        nll += losses.double()
        tokens += ids[:, 1:].numel()
    nll = accelerator.reduce(nll, reduction="sum")
    tokens = accelerator.reduce(tokens, reduction="sum")
    loads = accelerator.reduce(monitor.loads.to(accelerator.device), reduction="sum").cpu()
    monitor.loads.copy_(saved)
    unwrapped.train(was_training)
    mean_nll = float(nll / tokens)
    cvs = monitor.cvs(loads)
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": int(tokens),
        "load_cv": cvs,
        "mean_cv": sum(cvs) / len(cvs),
        "gram_orthogonality": monitor.gram_orthogonality(),
    }


# -- the loop --------------------------------------------------------------------------------------------------


def training_loss(out: Any, ids: torch.Tensor, aux_coef: float, teacher: Any = None) -> dict[str, torch.Tensor]:
    """The step's loss from a forward with ``output_router_logits=True``, and its parts.

    Without a teacher the forward had labels and ``out.loss`` is ``LM + aux_coef * aux`` (transformers' MoE
    convention). With one, the forward needs no labels: ``teacher.objective`` computes ``(1 - w) LM + w KL`` from
    the logits in one fused pass (``distill.DistillationObjective``; the model's own LM loss would be a second
    pass over the logits whose gradient ``w = 1`` cancels), and the aux term is added with its own graph."""
    device = out.logits.device
    aux = out.aux_loss if out.aux_loss is not None else torch.zeros((), device=device)
    if teacher is None:
        return {"loss": out.loss, "lm": out.loss - aux_coef * aux, "aux": aux, "kl": torch.zeros((), device=device)}
    terms = teacher.objective(out.logits, ids)
    return {"loss": terms["loss"] + aux_coef * aux, "lm": terms["lm"], "aux": aux, "kl": terms["kl"]}


def train_loop(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
               train_blocks: torch.Tensor, cfg: LoopConfig, ckpt: CheckpointDir, state: TrainerState,
               monitor: RouterMonitor) -> TrainerState:
    """Run steps ``state.step .. cfg.steps - 1``; checkpoint every ``cfg.save_every`` steps (the final step only with
    ``cfg.checkpoint_last``: a checkpoint that is deleted once OUT is written would be wasted time)."""
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    seq_len = train_blocks.shape[1]
    tokens_per_step = cfg.batch_size * cfg.grad_accum * world * seq_len
    bar = progress() if accelerator.is_main_process else contextlib.nullcontext()
    monitor.reset()
    window_start, window_tokens = time.perf_counter(), 0
    aux_coef = float(unwrapped.config.spectra.get("router_aux_loss_coef", 1.0))  # loss = lm + coef * aux
    with bar as live:
        task = live.add_task("fine-tuning", total=cfg.steps, completed=state.step) if live is not None else None
        for step in range(state.step, cfg.steps):
            apply_lr(optimizer.param_groups, cfg.lr_schedule, step, cfg.lr_decay_steps, cfg.lr_decay_start)
            total, aux, lm, kl = (torch.zeros((), device=device) for _ in range(4))
            for micro in range(cfg.grad_accum):
                idx = block_indices(step, micro, rank, n_blocks=train_blocks.shape[0], batch_size=cfg.batch_size,
                                    grad_accum=cfg.grad_accum, world_size=world, seed=cfg.seed)
                ids = train_blocks[idx].to(device)
                sync = contextlib.nullcontext() if micro == cfg.grad_accum - 1 else accelerator.no_sync(model)
                with sync:
                    labels = ids if cfg.teacher is None else None  # a teacher's objective needs no LM loss
                    out = model(input_ids=ids, labels=labels, use_cache=False, output_router_logits=True)
                    parts = training_loss(out, ids, aux_coef, cfg.teacher)
                    accelerator.backward(parts["loss"] / cfg.grad_accum)
                total += parts["loss"].detach() / cfg.grad_accum
                aux += parts["aux"].detach() / cfg.grad_accum
                lm += parts["lm"].detach() / cfg.grad_accum
                kl += parts["kl"].detach() / cfg.grad_accum
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync_dual_bias(accelerator, model)
            step_loss, step_aux, step_lm, step_kl = (float(accelerator.reduce(value, reduction="mean"))
                                                     for value in (total, aux, lm, kl))
            state.losses.append(step_loss)
            state.step = step + 1
            window_tokens += tokens_per_step
            if live is not None:
                live.update(task, completed=state.step, description=f"fine-tuning loss {step_loss:.4f}")
            if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                loads = accelerator.reduce(monitor.loads.to(device), reduction="sum").cpu()
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": state.step, "loss": step_loss, "lm_loss": step_lm, "aux_loss": step_aux,
                    **({"kl_to_teacher": step_kl} if cfg.teacher is not None else {}),
                    "load_cv": monitor.cvs(loads), "gram_orthogonality": monitor.gram_orthogonality(),
                    "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                    "lr": [group["lr"] for group in optimizer.param_groups],
                }
                record["mean_cv"] = sum(record["load_cv"]) / len(record["load_cv"])
                _log(accelerator, record, cfg.log_file)
                monitor.reset()
                window_start, window_tokens = time.perf_counter(), 0
            last = state.step == cfg.steps
            if cfg.save_every and ((state.step % cfg.save_every == 0 and not last) or (last and cfg.checkpoint_last)):
                save_checkpoint(accelerator, ckpt, state)
    return state


def _log(accelerator: Accelerator, record: dict[str, Any], log_file: Path | None) -> None:
    if not accelerator.is_main_process:
        return
    cvs = record["load_cv"]
    err_console.print(
        f"step {record['step']}: loss {record['loss']:.4f} (lm {record['lm_loss']:.4f}) "
        f"load CV mean {record['mean_cv']:.3f} max {max(cvs):.3f} "
        f"gram-orth {sum(record['gram_orthogonality']) / len(cvs):.3f} {record['tokens_per_s']:.0f} tok/s",
        highlight=False, soft_wrap=True,
    )
    if log_file is not None:
        with open(log_file, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
