"""Distillation from a teacher (the dense parent): the fine-tune objective for a model that should match it.

Why (docs/ARCHITECTURE.md, "Fine-tuning"): a carved or dropped model is its parent with neurons removed or
re-initialised, and the point of fine-tuning it is to get the parent's predictions back. The parent's whole
next-token distribution at every position says more per token than the one observed next token (measured on
SmolLM2 carved to 56% active, LoRA, README "Carving": 1.86x the parent's unseen-domain perplexity after 13
minutes instead of 18, best 1.83x instead of 1.86x; both runs then plateau). The loss is the forward KL divergence
``KL(teacher || student)`` per token (temperature 1), mixed with the LM loss:
``loss = (1 - w) * LM + w * KL + router_aux_loss_coef * aux``; ``w = 1`` (the default) drops the LM term.

The teacher is loaded once per process, frozen, in float32, never wrapped by accelerate (no gradients, no
collectives) and must share the student's vocabulary (checked before any training).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..modelio.parent import load_dense_parent
from ..modelio.resolve import resolve_model_dir


@dataclass
class Teacher:
    """A frozen model whose next-token distributions the student learns; ``weight`` is ``w`` above."""

    model: nn.Module
    weight: float

    def kl(self, student_logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Mean over tokens of ``KL(teacher || student)`` on ``input_ids [B, T]`` (every position, float32)."""
        with torch.no_grad():
            teacher_logits = self.model(input_ids=input_ids, use_cache=False).logits
            target = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, -2)
        student = F.log_softmax(student_logits.float(), dim=-1).flatten(0, -2)
        return F.kl_div(student, target, reduction="batchmean", log_target=True)

    def mix(self, total: torch.Tensor, lm: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
        """``total`` (LM + aux, the model's ``loss``) with the LM term's share ``w`` replaced by the KL term."""
        return total + self.weight * (kl - lm)


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
