"""``spectra-convert finetune``: a thin click shell over ``spectra_convert.finetune.finetune``.

Multi-process: ``accelerate launch --config_file recipes/accelerate/<recipe>.yaml -m spectra_convert finetune ...``.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import UserError
from . import checked, output_option


@click.command(context_settings={"show_default": True})
@click.argument("model", type=str)
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Training text: JSONL with 'text', or .txt.")
@output_option("Output folder (written atomically).")
@click.option("--mode", required=True, type=checked("finetune", "mode"), help="router: only routers train; lora: LoRA + routers.")
@click.option("--steps", default=100, type=checked("finetune", "steps"), help="Optimizer steps in total (a resumed run counts from 0).")
@click.option("--seq-len", default=512, type=checked("finetune", "seq_len"), help="Tokens per packed block.")
@click.option("--batch-size", default=4, type=checked("finetune", "batch_size"), help="Blocks per micro-batch per process.")
@click.option("--grad-accum", default=1, type=checked("finetune", "grad_accum"), help="Micro-batches per optimizer step.")
@click.option("--routers", default="auto", type=checked("finetune", "routers"),
              help="lora mode: train or freeze the routers; auto freezes a carved model's (fitted by the converter) "
                   "and trains the others.")
@click.option("--lr-router", default=5e-5, type=checked("finetune", "lr_router"), help="Learning rate of the routers.")
@click.option("--lr", default=None, type=checked("finetune", "lr"),
              help="Learning rate of the LoRA adapters; default 1e-3 for carved models (recovery), 2e-4 otherwise.")
@click.option("--lr-schedule", default="constant", type=checked("finetune", "lr_schedule"),
              help="constant, or cosine / linear decay to 0 over --lr-decay-steps (all rates).")
@click.option("--lr-decay-steps", default=None, type=checked("finetune", "lr_decay_steps"),
              help="The step a decaying schedule reaches 0 at (default --steps; fix it to extend a run in segments).")
@click.option("--lr-decay-start", default=0, type=checked("finetune", "lr_decay_start"),
              help="The step a decaying schedule starts at; the rates are constant before (stable, then decay).")
@click.option("--lora-r", default=16, type=checked("finetune", "lora_r"))
@click.option("--lora-alpha", default=32, type=checked("finetune", "lora_alpha"))
@click.option("--target-modules", multiple=True, help="LoRA targets (repeat or comma-separate); default: attention "
              "projections + fused expert tensors.")
@click.option("--merge", is_flag=True, help="LoRA: merge the adapter and write a full model folder.")
@click.option("--eval-data", type=click.Path(path_type=Path), default=None,
              help="Held-out text; default: a few blocks held out of --data.")
@click.option("--save-every", default=50, type=checked("finetune", "save_every"), help="Checkpoint every N steps (0: never).")
@click.option("--checkpoint-dir", type=click.Path(path_type=Path), default=None, help="Default: OUT.partial (removed once OUT is written); a given folder is kept with the final step, so "
              "--resume with a larger --steps extends the run.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint (same config required).")
@click.option("--seed", default=0, type=checked("finetune", "seed"))
@click.option("--log-every", default=10, type=checked("finetune", "log_every"), help="Log loss, load CV, Gram orthogonality, tokens/s every N steps.")
@click.option("--log-file", type=click.Path(path_type=Path), default=None, help="Also append the logs here as JSONL.")
@click.option("--max-grad-norm", default=1.0, type=checked("finetune", "max_grad_norm"), help="Gradient clipping (0: off).")
@click.option("--recalibration-tokens", default=65536, show_default=True, type=checked("finetune", "recalibration_tokens"),
              help="Training tokens (spread over --data) the routers' dual bias is re-corrected on after training.")
@click.option("--distill-from", type=str, default=None,
              help="Teacher (the dense parent: folder or Hub id): learn its next-token distributions (KL) instead of "
                   "only the observed next token.")
@click.option("--distill-gguf-file", type=str, default=None, help="GGUF file inside --distill-from to load.")
@click.option("--distill-weight", default=1.0, type=checked("finetune", "distill_weight"),
              help="Share of the LM loss replaced by the KL to the teacher (1: KL only).")
@click.option("--force", is_flag=True, help="Overwrite OUT and discard earlier checkpoints.")
def command(model: str, data: Path, out: Path, mode: str, steps: int, seq_len: int, batch_size: int,
            grad_accum: int, lr_router: float, lr: float | None, lr_schedule: str,
            lr_decay_steps: int | None, lr_decay_start: int, lora_r: int, lora_alpha: int,
            target_modules: tuple[str, ...], merge: bool, eval_data: Path | None, save_every: int,
            checkpoint_dir: Path | None, resume: bool, seed: int, log_every: int, log_file: Path | None,
            max_grad_norm: float, recalibration_tokens: int, distill_from: str | None, distill_gguf_file: str | None,
            distill_weight: float, routers: str, force: bool) -> None:
    """Fine-tune the SPECTRA routers (and optionally LoRA adapters) of MODEL on --data."""
    from ..console import summary_table
    from ..finetune import finetune

    targets = tuple(t.strip() for spec in target_modules for t in spec.split(",") if t.strip())
    if targets and mode != "lora":
        raise UserError("--target-modules applies to --mode lora only")
    try:
        result = finetune(
            model, data, out, mode=mode, steps=steps, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum,
            lr_router=lr_router, lr=lr, lr_schedule=lr_schedule, lr_decay_steps=lr_decay_steps,
            lr_decay_start=lr_decay_start, lora_r=lora_r, lora_alpha=lora_alpha, target_modules=targets or None,
            eval_data=eval_data, save_every=save_every, resume=resume, seed=seed, merge=merge, force=force,
            checkpoint_dir=checkpoint_dir, log_every=log_every, log_file=log_file, max_grad_norm=max_grad_norm,
            recalibration_tokens=recalibration_tokens, distill_from=distill_from,
            distill_gguf_file=distill_gguf_file, distill_weight=distill_weight, routers=routers,
        )
        is_main = _is_main_process()
    finally:
        _end_process_group()
    if not is_main:
        return
    before, after = result.eval_before, result.eval_after
    summary_table(
        f"finetune ({result.mode}, {result.steps} steps, {result.world_size} process(es)) -> {result.out}",
        ["metric", "before", "after"],
        [
            ["held-out perplexity", before["perplexity"], after["perplexity"]],
            ["mean load CV", before["mean_cv"], after["mean_cv"]],
            ["max load CV", max(before["load_cv"]), max(after["load_cv"])],
            ["Gram orthogonality (mean)", sum(before["gram_orthogonality"]) / len(before["gram_orthogonality"]),
             sum(after["gram_orthogonality"]) / len(after["gram_orthogonality"])],
            ["final train loss", "", result.final_loss],
        ],
    )


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _end_process_group() -> None:
    """Destroy the process group ``accelerate launch`` made for this command before the interpreter exits.

    Left to interpreter finalisation, gloo's worker threads can still hold work objects whose teardown needs the
    GIL; the process then aborts (SIGABRT, "terminate called without an active exception") after the output was
    written, and ``accelerate launch`` reports a failed run. The command owns the group, so it ends it; a library
    caller of ``finetune()`` keeps managing its own. Accelerate's own teardown (what ``end_training`` calls)."""
    from accelerate import PartialState

    PartialState().destroy_process_group()
