"""Distillation from a teacher (the dense parent): the fine-tune objective for a model that should match it.

Why (docs/ARCHITECTURE.md, "Fine-tuning"): a carved or dropped model is its parent with neurons removed or
re-initialised, and the point of fine-tuning it is to get the parent's predictions back. The parent's whole
next-token distribution at every position says more per token than the one observed next token (measured on
SmolLM2 carved to 56% active, LoRA, docs/CARVING.md: 1.86x the parent's unseen-domain perplexity after 13
minutes instead of 18, best 1.83x instead of 1.86x; both runs then plateau). The loss is the forward KL divergence
``KL(teacher || student)`` per token (temperature 1), mixed with the LM loss:
``loss = (1 - w) * LM + w * KL + router_aux_loss_coef * aux``; ``w = 1`` (the default) drops the LM term.

The teacher is loaded once per process, frozen, in float32, never wrapped by accelerate (no gradients, no
collectives) and must share the student's vocabulary (checked before any training).

Both terms are computed by one fused pass over the logits (``DistillationObjective``), a few rows at a time, with
the gradient written during the forward: ``d loss / d logits = softmax(student) - p_teacher`` (times ``w / N``),
plus ``(1 - w) / M`` times ``softmax(student) - onehot(label)`` on labelled rows. Why (docs/ARCHITECTURE.md,
"Fine-tuning"): with a 49k-token vocabulary, autograd's version (two ``log_softmax`` over ``[N, V]``, ``kl_div``,
their backwards, and the model's own LM loss whose gradient ``w = 1`` then cancels) spent ~2.2 s of a 9.8 s
distilled LoRA step of a carved SmolLM2 (1024 tokens) on element-wise passes over 200 MB tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..modelio.parent import load_dense_parent
from ..modelio.resolve import resolve_model_dir


#: Logit rows per pass of ``DistillationObjective`` on a CPU: a few MB per buffer, so each row block's passes stay in
#: cache (16 to 128 rows measured the same on the 2-core box). An accelerator takes bigger blocks: each pass is a
#: kernel launch there, and its memory is fast.
DISTILL_CHUNK_ROWS = 16
ACCELERATOR_CHUNK_ROWS = 1024
#: ``labels`` value of rows without a next token (transformers' ignore index).
IGNORE_INDEX = -100


class DistillationObjective(torch.autograd.Function):
    """``(loss, lm, kl)`` for student logits ``[N, V]``, teacher logits ``[N, V]`` and ``labels [N]``:
    ``kl`` = mean over the N rows of ``KL(teacher || student)``, ``lm`` = mean cross-entropy over the M rows whose
    label is not ``IGNORE_INDEX``, ``loss = (1 - w) lm + w kl``; only ``loss`` has a gradient (see the module doc).

    The forward walks ``DISTILL_CHUNK_ROWS`` rows at a time and, when the student's logits need a gradient, stores
    it (float32, ``[N, V]``: the size of one of the log-softmax tensors autograd would keep); backward scales it."""

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, _ = student.shape
        labelled = labels != IGNORE_INDEX
        n_labelled = int(labelled.sum())
        lm_weight = 0.0 if n_labelled == 0 else (1.0 - weight) / n_labelled
        kl_weight = weight / rows
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty(student.shape, dtype=torch.float32, device=student.device) if want_grad else None
        # Per row: the share of softmax(student) in the gradient (w / N, plus (1 - w) / M where labelled).
        softmax_share = torch.where(labelled, kl_weight + lm_weight, kl_weight).to(torch.float32).unsqueeze(-1)
        # float64 running sums, kept on the device (no host sync per block)
        kl_sum = torch.zeros((), dtype=torch.float64, device=student.device)
        nll_sum = torch.zeros((), dtype=torch.float64, device=student.device)
        chunk = DISTILL_CHUNK_ROWS if student.device.type == "cpu" else ACCELERATOR_CHUNK_ROWS
        for start in range(0, rows, chunk):
            block = slice(start, start + chunk)
            log_student = torch.log_softmax(student[block].float(), dim=-1)
            log_teacher = torch.log_softmax(teacher[block].float(), dim=-1)
            p_teacher = log_teacher.exp()
            block_labels, block_labelled = labels[block], labelled[block]
            picked = log_student.gather(-1, block_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            nll_sum -= picked[block_labelled].sum()
            if grad is not None:
                out = grad[block]
                torch.exp(log_student, out=out)
                out.mul_(softmax_share[block]).sub_(p_teacher, alpha=kl_weight)
                if lm_weight:
                    where = block_labelled.nonzero().squeeze(-1)
                    out[where, block_labels[where]] -= lm_weight
            kl_sum += torch.dot(p_teacher.view(-1), log_teacher.sub_(log_student).view(-1))
        ctx.grad = grad
        ctx.student_dtype = student.dtype
        kl = (kl_sum / rows).to(torch.float32)
        lm = (nll_sum / max(n_labelled, 1)).to(torch.float32)
        loss = (1.0 - weight) * lm + weight * kl
        ctx.mark_non_differentiable(lm, kl)
        return loss, lm, kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor, _lm: Any, _kl: Any) -> tuple[torch.Tensor | None, None, None, None]:
        return (ctx.grad * grad_loss).to(ctx.student_dtype), None, None, None


@dataclass
class Teacher:
    """A frozen model whose next-token distributions the student learns; ``weight`` is ``w`` above."""

    model: nn.Module
    weight: float

    def objective(self, student_logits: torch.Tensor, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"loss": (1 - w) LM + w KL, "lm": LM, "kl": KL}`` on ``input_ids [B, T]`` and the student's logits
        ``[B, T, V]`` (every position for the KL, the next token for the LM as transformers shifts it); only
        ``loss`` carries a gradient."""
        with torch.no_grad():
            teacher_logits = self.model(input_ids=input_ids, use_cache=False).logits
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, :-1] = input_ids[:, 1:]
        loss, lm, kl = DistillationObjective.apply(student_logits.flatten(0, -2), teacher_logits.flatten(0, -2),
                                                   labels.flatten().to(student_logits.device), self.weight)
        return {"loss": loss, "lm": lm, "kl": kl}

    def kl(self, student_logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Mean over tokens of ``KL(teacher || student)`` (no gradient: a judge of a model, not an objective)."""
        with torch.no_grad():
            return self.objective(student_logits, input_ids)["kl"]


def load_teacher(source: str | Path, *, gguf_file: str | None, weight: float, vocab_size: int,
                 device: torch.device) -> Teacher:
    """The teacher ``source`` (a local folder or a Hub id, optionally a GGUF file inside it), checked against the
    student's vocabulary size: a one-line ``UserError`` when it cannot be a teacher for this model (``weight``
    was checked with the other flags, before anything was loaded)."""
    model_dir = resolve_model_dir(str(source), what="--distill-from")
    model, _ = load_dense_parent(model_dir, gguf_file, torch.float32)
    teacher_vocab = model.get_output_embeddings().weight.shape[0]
    if teacher_vocab != vocab_size:
        raise UserError(f"--distill-from {source}: its vocabulary has {teacher_vocab} tokens, the model's {vocab_size}; "
                        "the teacher must share the model's tokenizer (distil from the model's parent)")
    model.requires_grad_(False)
    return Teacher(model.to(device).eval(), weight)
