"""One builder for the small real tokenizers the tests and benches need: a byte-level BPE trained on Python
standard-library sources (real text, available offline), wrapped as a ``PreTrainedTokenizerFast``."""

from __future__ import annotations

import sysconfig
from pathlib import Path

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def train_byte_bpe(vocab_size: int, sources: tuple[str, ...] | list[str], *, eos: str, unk: str | None = None,
                   pad: str | None = None, bos: str | None = None):
    """Byte-level BPE of at most ``vocab_size`` tokens trained on ``sources`` (stdlib file names).

    Special tokens get the first ids in the order ``unk`` (when given), ``eos``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ([unk] if unk else []) + [eos]
    tokenizer = Tokenizer(models.BPE(unk_token=unk) if unk else models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train([str(STDLIB / name) for name in sources], trainer)
    assert tokenizer.get_vocab_size() <= vocab_size
    named = {key: value for key, value in (("unk_token", unk), ("pad_token", pad), ("bos_token", bos)) if value}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, **named)
