"""Training text -> fixed-length token blocks, and a data order that is a pure function of (seed, step).

Why packing: every block is exactly ``seq_len`` real tokens (documents joined by EOS), so there is no padding,
every token counts in the loss, and routers always see full sequences.

Why a pure data order: a job killed at step ``s`` and resumed must see exactly the batches an uninterrupted run
sees from step ``s`` on. ``block_indices`` therefore derives every batch from a seeded permutation of the blocks
per epoch, indexed by the global sample position — no iterator state to save or restore.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError

#: Fixed seed of the held-out validation blocks: changing --seed must not change what "validation" means.
VALIDATION_SEED = 20240917
#: Blocks held out for validation when no --eval-data is given: 5% of the blocks, at least 1, at most this.
MAX_VALIDATION_BLOCKS = 16


def read_texts(path: str | Path, max_records: int | None = None) -> list[str]:
    """Texts of a JSONL (``text`` field) or .txt file, through the shared loader (UserError on bad files)."""
    from ..textdata import load_texts

    return [record.text for record in load_texts(path, max_records=max_records)]


def pack(texts: list[str], tokenizer, seq_len: int, *, source: str = "data") -> torch.Tensor:
    """Tokenise ``texts``, join them with EOS and cut the stream into ``[n_blocks, seq_len]`` blocks.

    The tail shorter than a block is dropped. Raises ``UserError`` when not even one block fits.
    """
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {seq_len}")
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in encoded:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
    n_blocks = len(stream) // seq_len
    if n_blocks == 0:
        raise UserError(
            f"{source} has {len(stream)} tokens, fewer than one block of --seq-len {seq_len}; "
            "give more text or a smaller --seq-len"
        )
    return torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


@dataclass(frozen=True)
class Split:
    """Packed training blocks and validation blocks."""

    train: torch.Tensor
    validation: torch.Tensor


def split_validation(blocks: torch.Tensor, *, source: str = "data") -> Split:
    """Hold out a tiny, fixed set of blocks for validation (5%, at least 1, at most ``MAX_VALIDATION_BLOCKS``)."""
    n = blocks.shape[0]
    if n < 2:
        raise UserError(
            f"{source} packs into only {n} block; need at least 2 (one is held out for validation) "
            "or pass --eval-data"
        )
    n_val = min(MAX_VALIDATION_BLOCKS, max(1, round(0.05 * n)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(VALIDATION_SEED))
    val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
    return Split(train=blocks[train_idx], validation=blocks[val_idx])


def block_indices(step: int, micro: int, rank: int, *, n_blocks: int, batch_size: int, grad_accum: int,
                  world_size: int, seed: int) -> torch.Tensor:
    """Indices of the blocks of one micro-batch: a pure function of (seed, step, micro-step, rank).

    Global sample positions are laid out step-major, then micro-step, then rank; position ``p`` is block
    ``perm_e[p mod n]`` of epoch ``e = p // n``, with ``perm_e`` a permutation seeded by ``(seed, e)``.
    """
    per_step = batch_size * grad_accum * world_size
    start = step * per_step + (micro * world_size + rank) * batch_size
    positions = range(start, start + batch_size)
    cache: dict[int, torch.Tensor] = {}
    out = []
    for p in positions:
        epoch = p // n_blocks
        if epoch not in cache:
            cache[epoch] = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(cache[epoch][p % n_blocks]))
    return torch.tensor(out, dtype=torch.long)
