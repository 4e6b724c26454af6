"""``spectra_convert.finetune(...)``: the library function behind ``spectra-convert finetune``.

Order of work is chosen so that every user error surfaces before any training time is spent: flags, MODEL,
OUT, data, LoRA targets and the resume config are all checked first, on every rank, before anyone writes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..console import err_console
from ..errors import UserError
from ..modelio.config import stored_dtype
from ..modelio.outdir import atomic_output_dir, check_free_space, check_output
from ..modelio.resolve import resolve_model_dir
from ..router.recalibrate import recalibrate_model_bias
from ..router.loads import RouterMonitor
from .data import pack, read_texts, split_validation
from .modes import ModeOptions, get_mode, resolve_lora_lr, resolve_router_training
from .schedule import resolve_decay_steps
from .state import CheckpointDir
from .trainer import (
    LoopConfig,
    TrainerState,
    evaluate,
    install_checkpoint_hooks,
    router_digest,
    train_loop,
)

SUMMARY_FILE = "finetune.json"


@dataclass
class FinetuneResult:
    out: Path
    mode: str
    steps: int
    final_loss: float
    losses: list[float]
    eval_before: dict[str, Any]
    eval_after: dict[str, Any]
    resumed_from_step: int | None
    world_size: int


def resolve_spectra_model(model: str | Path) -> Path:
    """A local SPECTRA model folder, or a one-line ``UserError`` saying what is wrong with it."""
    path = resolve_model_dir(str(model))
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"MODEL {path} has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_file} is not valid JSON ({exc.msg})") from None
    if config.get("model_type") != "spectra":
        raise UserError(
            f"MODEL {path} has no SPECTRA routers (model_type {config.get('model_type')!r}); "
            "convert it first with `spectra-convert upcycle` or `spectra-convert reroute`"
        )
    return path.resolve()


RECALIBRATION_TOKENS = 65536  # SmolLM2 8x: held-out CV 0.077 with a bias corrected on 8k tokens, 0.046 on 54k


def recalibration_blocks(train_blocks: torch.Tensor, tokens: int = RECALIBRATION_TOKENS) -> torch.Tensor:
    """Up to ``tokens`` (default 65536) tokens of training blocks spread evenly over the whole training set (deterministic).

    The first blocks of a packed file can all come from one or two long records (one stdlib module spans
    dozens of blocks), and a bias corrected on one domain unbalances the others; too few tokens leave the
    hard-load estimate noisy (see ``recalibrate_model_bias``)."""
    n, seq_len = train_blocks.shape
    count = min(n, max(16, -(-tokens // seq_len)))
    picks = torch.linspace(0, n - 1, steps=count).round().long().unique()
    return train_blocks[picks]


def _model_fingerprint(model_path: Path) -> str:
    """Cheap identity of the weights: config bytes plus names and sizes of the weight files."""
    digest = hashlib.sha256((model_path / "config.json").read_bytes())
    for f in sorted(model_path.glob("*.safetensors")):
        digest.update(f"{f.name}:{f.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def _cpu_workers() -> bool:
    """True for torchrun-style workers on a machine without CUDA.

    ``accelerate launch --multi_gpu`` (or a MULTI_GPU config such as recipes/accelerate/cpu-2proc.yaml) starts
    the workers through torchrun but does not set ``ACCELERATE_USE_CPU``; accelerate 1.15 then finds no GPU
    backend and silently runs every worker as an independent single process. Asking for CPU explicitly makes
    the workers form one gloo group instead.
    """
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _positive(name: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise UserError(f"{name} must be at least {minimum}, got {value}")


def finetune(
    model: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    mode: str = "router",
    steps: int = 100,
    seq_len: int = 512,
    batch_size: int = 4,
    grad_accum: int = 1,
    lr_router: float = 5e-5,
    lr: float | None = None,
    lr_schedule: str = "constant",
    lr_decay_steps: int | None = None,
    lr_decay_start: int = 0,
    lora_r: int = 16,
    lora_alpha: int = 32,
    target_modules: tuple[str, ...] | list[str] | None = None,
    eval_data: str | Path | None = None,
    save_every: int = 50,
    resume: bool = False,
    seed: int = 0,
    merge: bool = False,
    force: bool = False,
    checkpoint_dir: str | Path | None = None,
    log_every: int = 10,
    log_file: str | Path | None = None,
    max_grad_norm: float = 1.0,
    max_records: int | None = None,
    recalibration_tokens: int = RECALIBRATION_TOKENS,
    distill_from: str | Path | None = None,
    distill_gguf_file: str | None = None,
    distill_weight: float = 1.0,
    routers: str = "auto",
) -> FinetuneResult:
    """Fine-tune the routers (``mode="router"``) or LoRA + routers (``mode="lora"``) of a SPECTRA model.

    Writes a complete model folder to ``out`` atomically (for LoRA without ``merge``: a PEFT adapter folder
    whose ``base_model_name_or_path`` is ``model``), plus ``finetune.json`` with losses and held-out
    perplexity / load CV before and after. Checkpoints go to ``checkpoint_dir`` (default ``OUT.partial``);
    ``resume=True`` continues from the newest one if its config matches. A given ``checkpoint_dir`` is kept and
    also holds the final step, so ``resume=True`` with more ``steps`` extends a finished run exactly (one run
    evaluated along the way: bench/carve.py --lora-minutes). Works single-process or under
    ``accelerate launch`` / ``torchrun`` (the data order and dual biases are rank-consistent).

    ``distill_from``: a teacher (the dense parent; ``distill_gguf_file`` inside it) whose next-token
    distributions the model learns: ``loss = (1 - distill_weight) * LM + distill_weight * KL(teacher || model)``
    plus the router aux term (``finetune.distill``).

    ``routers`` (lora mode): ``train`` trains them with ``lr_router``, ``freeze`` keeps their parameters fixed,
    ``auto`` (default) freezes carved models' routers (fitted to the oracle by the converter: training them
    during LoRA costs quality, see ``resolve_router_training``) and trains everyone else's. ``lr`` (the LoRA
    adapters' rate) defaults by model, see ``resolve_lora_lr``. ``lr_schedule`` scales every rate by a function of
    the step (``schedule.SCHEDULES``); a decaying one runs from ``lr_decay_start`` (default 0) to 0 at
    ``lr_decay_steps`` (default ``steps``).

    Steps: check (every user error, before any training time), load (data, model, teacher, resume state), train
    (then re-calibrate the biases), save.
    """
    from accelerate.utils import set_seed

    run = _check(model, data, out, eval_data, mode=mode, merge=merge, force=force, steps=steps, seq_len=seq_len,
                 batch_size=batch_size, grad_accum=grad_accum, save_every=save_every, log_every=log_every,
                 lora_r=lora_r, recalibration_tokens=recalibration_tokens)
    lr_decay_steps = resolve_decay_steps(lr_schedule, lr_decay_steps, steps, lr_decay_start)
    if distill_from is not None and not 0.0 < distill_weight <= 1.0:
        raise UserError(f"--distill-weight must be in (0, 1], got {distill_weight}")
    if distill_from is None and distill_gguf_file is not None:
        raise UserError("--distill-gguf-file needs --distill-from")
    if distill_from is not None:  # a missing teacher is a user error before anything is loaded
        distill_from = resolve_model_dir(str(distill_from), what="--distill-from")
    accelerator = _accelerator(merge)
    set_seed(seed)
    tokenizer, train_blocks, val_blocks = _load_data(run, data, eval_data, seq_len, max_records)
    train_routers = resolve_router_training(routers, mode, run.model_path)
    lr = resolve_lora_lr(lr, run.model_path)
    options = ModeOptions(lr_router=lr_router, lr=lr, lora_r=lora_r, lora_alpha=lora_alpha,
                          target_modules=tuple(target_modules) if target_modules else None,
                          train_routers=train_routers)
    trainable = run.mode_impl.prepare(_load_model(run.model_path, train_blocks), options)
    run_config = {
        "model": str(run.model_path), "model_fingerprint": _model_fingerprint(run.model_path),
        "data_sha256": hashlib.sha256(train_blocks.numpy().tobytes()).hexdigest()[:16],
        "mode": mode, "seq_len": seq_len, "batch_size": batch_size, "grad_accum": grad_accum,
        "world_size": accelerator.num_processes, "lr_router": lr_router, "seed": seed,
        "max_grad_norm": max_grad_norm, "mixed_precision": str(accelerator.mixed_precision),
    }
    if lr_schedule != "constant":  # absent for constant: checkpoints of constant-rate runs keep resuming
        run_config.update(lr_schedule=lr_schedule, lr_decay_steps=lr_decay_steps, lr_decay_start=lr_decay_start)
    if mode == "lora":
        run_config.update(lr=lr, lora_r=lora_r, lora_alpha=lora_alpha, targets=options.resolved_targets,
                          routers="train" if train_routers else "freeze")
    teacher = None
    if distill_from is not None:
        from .distill import load_teacher

        teacher = load_teacher(distill_from, gguf_file=distill_gguf_file, weight=distill_weight,
                               vocab_size=trainable.get_output_embeddings().weight.shape[0], device=accelerator.device)
        run_config.update(distill_from=str(distill_from), distill_gguf_file=distill_gguf_file,
                          distill_weight=distill_weight)
    ckpt_path = Path(checkpoint_dir).resolve() if checkpoint_dir else run.out.with_name(run.out.name + ".partial")
    ckpt = CheckpointDir(ckpt_path, run_config)
    resume_from = _open_checkpoints(accelerator, ckpt, resume=resume, force=force)
    optimizer = torch.optim.AdamW(run.mode_impl.param_groups(trainable, options), weight_decay=0.0)
    model_p, optimizer = accelerator.prepare(trainable, optimizer)
    install_checkpoint_hooks(accelerator, model_p)
    state = _resume_state(accelerator, ckpt, resume_from, resume)

    loop = LoopConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, seed=seed, save_every=save_every,
                      log_every=log_every, max_grad_norm=max_grad_norm,
                      log_file=Path(log_file) if log_file else None, checkpoint_last=checkpoint_dir is not None,
                      teacher=teacher, lr_schedule=lr_schedule, lr_decay_steps=lr_decay_steps,
                      lr_decay_start=lr_decay_start)
    start_step = state.step
    state, eval_after = _train(accelerator, model_p, optimizer, train_blocks, val_blocks, loop, ckpt, state,
                               eval_batch=max(1, batch_size), recalibration_tokens=recalibration_tokens)

    from accelerate.utils import gather_object

    unwrapped = accelerator.unwrap_model(model_p)
    digests = gather_object([router_digest(unwrapped)])
    summary = {
        "mode": mode, "merged": merge, "steps": state.step, "final_loss": state.losses[-1] if state.losses else None,
        "losses": state.losses, "eval_before": state.eval_before, "eval_after": eval_after,
        "resumed_from_step": start_step if resume_from is not None else None,
        "world_size": accelerator.num_processes, "rank_router_sha256": list(digests),
        "train_blocks": int(train_blocks.shape[0]), "validation_blocks": int(val_blocks.shape[0]),
        "config": run_config,
    }
    _save(accelerator, run, model_p, tokenizer, summary, ckpt, remove_checkpoints=checkpoint_dir is None)
    return FinetuneResult(
        out=run.out, mode=mode, steps=state.step, final_loss=summary["final_loss"], losses=state.losses,
        eval_before=state.eval_before, eval_after=eval_after,
        resumed_from_step=summary["resumed_from_step"], world_size=accelerator.num_processes,
    )


@dataclass
class _Run:
    """What the checks settled: the mode, the SPECTRA model folder, OUT and every input it must not overlap."""

    mode_impl: Any
    model_path: Path
    out: Path
    inputs: list[Path]
    merge: bool
    force: bool
    model: str  # MODEL as the user gave it: a Hub id or a path (the card names it by id or folder name)


def _check(model: str | Path, data: str | Path, out: str | Path, eval_data: str | Path | None, *, mode: str,
           merge: bool, force: bool, **counts: int) -> _Run:
    """Flags, MODEL and OUT, checked before anything is loaded (on every rank, before anyone writes)."""
    mode_impl = get_mode(mode)
    if merge and mode != "lora":
        raise UserError("--merge applies to --mode lora only (router mode always writes a full model)")
    minimums = {"steps": 1, "seq_len": 2, "batch_size": 1, "grad_accum": 1, "save_every": 0, "log_every": 1,
                "lora_r": 1, "recalibration_tokens": 1}
    for name, minimum in minimums.items():
        _positive("--" + name.replace("_", "-"), counts[name], minimum)
    model_path = resolve_spectra_model(model)
    out = Path(out).expanduser().resolve()
    inputs = [model_path, Path(data)] + ([Path(eval_data)] if eval_data is not None else [])
    check_output(out, force=force, inputs=inputs)  # now, not after training; atomic_output_dir re-checks at the end
    if mode != "lora" or merge:  # a full model folder: the size of MODEL's weights (an adapter is small)
        check_free_space(out, sum(f.stat().st_size for f in model_path.glob("*.safetensors")))
    return _Run(mode_impl, model_path, out, inputs, merge, force, str(model))


def _accelerator(merge: bool) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    accelerator = Accelerator(cpu=_cpu_workers(),
                              kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    if merge and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise UserError("--merge is not supported under FSDP/DeepSpeed; save the adapter, then merge it in one process")
    return accelerator


def _load_data(run: _Run, data: str | Path, eval_data: str | Path | None, seq_len: int,
               max_records: int | None) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The model's tokenizer and the packed training and held-out blocks."""
    from transformers import AutoTokenizer

    from ..modeling.configuration_spectra import SpectraConfig

    try:
        # Passing the config keeps AutoTokenizer from reading config.json's auto_map (a trust_remote_code prompt).
        tokenizer = AutoTokenizer.from_pretrained(run.model_path, config=SpectraConfig.from_pretrained(run.model_path),
                                                  trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"MODEL {run.model_path} has no usable tokenizer files ({str(exc).splitlines()[0]})") from None
    texts = read_texts(data, max_records=max_records)
    blocks = pack(texts, tokenizer, seq_len, source=str(data))
    if eval_data is not None:
        val_blocks = pack(read_texts(eval_data, max_records=max_records), tokenizer, seq_len, source=str(eval_data))
        return tokenizer, blocks, val_blocks
    split = split_validation(blocks, source=str(data))
    return tokenizer, split.train, split.validation


def _load_model(model_path: Path, train_blocks: torch.Tensor) -> torch.nn.Module:
    from ..modeling.modeling_spectra import SpectraForCausalLM

    base = SpectraForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if not base.routers():
        raise UserError(f"MODEL {model_path} has no SPECTRA routers")
    if int(train_blocks.max()) >= base.get_input_embeddings().num_embeddings:
        raise UserError("the tokenizer in MODEL produces ids beyond the model's vocabulary")
    return base


def _open_checkpoints(accelerator: Any, ckpt: CheckpointDir, *, resume: bool, force: bool) -> Path | None:
    """The checkpoint to resume from (or None); every rank reaches the same verdict before anyone writes."""
    resume_from = ckpt.check(resume=resume, force=force)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ckpt.initialise(fresh=resume_from is None)
    accelerator.wait_for_everyone()
    return resume_from


def _resume_state(accelerator: Any, ckpt: CheckpointDir, resume_from: Path | None, resume: bool) -> TrainerState:
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state = TrainerState(**json.loads((resume_from / "trainer_state.json").read_text()))
        if accelerator.is_main_process:
            err_console.print(f"resuming from {resume_from} (step {state.step})", highlight=False)
        return state
    if resume and accelerator.is_main_process:
        err_console.print(f"no checkpoint in {ckpt.path}; starting from step 0", highlight=False)
    return TrainerState()


def _train(accelerator: Any, model_p: Any, optimizer: Any, train_blocks: torch.Tensor, val_blocks: torch.Tensor,
           loop: LoopConfig, ckpt: CheckpointDir, state: TrainerState, *, eval_batch: int,
           recalibration_tokens: int) -> tuple[TrainerState, dict[str, Any]]:
    """Held-out evaluation, the training loop, the biases re-calibrated, held-out evaluation again."""
    monitor = RouterMonitor(accelerator.unwrap_model(model_p))
    if state.eval_before is None:
        state.eval_before = evaluate(accelerator, model_p, val_blocks, eval_batch, monitor)
    state = train_loop(accelerator, model_p, optimizer, train_blocks, loop, ckpt, state, monitor)
    # Training moved the routers: end with the hard-load bias correction on training text (same blocks on
    # every rank, so the biases stay identical across processes).
    recalibrate_model_bias(accelerator.unwrap_model(model_p),
                           recalibration_blocks(train_blocks, recalibration_tokens).to(accelerator.device))
    eval_after = evaluate(accelerator, model_p, val_blocks, eval_batch, monitor)
    monitor.close()
    return state, eval_after


def _save(accelerator: Any, run: _Run, model_p: Any, tokenizer: Any, summary: dict[str, Any], ckpt: CheckpointDir,
          *, remove_checkpoints: bool) -> None:
    """The output folder, written atomically by the main process (a sharded model is gathered on every rank
    first: a collective)."""
    from accelerate.utils import DistributedType

    gathered = None
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        gathered = accelerator.get_state_dict(model_p)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_output_dir(run.out, force=run.force, inputs=run.inputs) as tmp:
            run.mode_impl.save(accelerator.unwrap_model(model_p), tmp, merge=run.merge,
                               dtype=stored_dtype(run.model_path), state_dict=gathered)
            tokenizer.save_pretrained(tmp)
            (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
            _write_card(tmp, run.model, run.model_path, summary)
        if remove_checkpoints:
            shutil.rmtree(ckpt.path, ignore_errors=True)
    accelerator.wait_for_everyone()


def _write_card(out: Path, model: str | Path, model_path: Path, summary: dict[str, Any]) -> None:
    """Our model card in ``out``: a full model's (its original parent carried over from MODEL's card), or an
    adapter's (PEFT's blank template replaced; ``adapter_config.json`` names the base by Hub id or folder
    name, never by this machine's absolute path)."""
    from ..modelcard import card_base_model, finetune_facts, model_label, write_adapter_card, write_model_card

    facts = finetune_facts(model, summary)
    adapter_config = out / "adapter_config.json"
    if not adapter_config.is_file():
        write_model_card(out, base_model=card_base_model(model_path), finetuned=facts)
        return
    config = json.loads(adapter_config.read_text())
    config["base_model_name_or_path"] = model_label(model)
    adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    on_hub = not Path(str(model)).expanduser().exists()  # resolve_model_dir: a path that exists is local
    write_adapter_card(out, base_model=model_label(model), on_hub=on_hub, facts=facts)


__all__ = ["FinetuneResult", "finetune", "resolve_spectra_model"]
