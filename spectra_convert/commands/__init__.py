"""One click shell per verb (``cli.COMMANDS``), plus what several shells share."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for a short conversion verb, then restore it.

    Why: importing torch and transformers and loading a model create ~600k long-lived Python objects, and the
    collector re-traverses them again and again as they accumulate: 0.6 s of a ~7 s upcycle on the 2-core CI
    box (measured with and without). A conversion's memory is tensors, freed by reference counting as usual.
    On the way out, what survived (the imported modules, mostly) is frozen into the permanent generation
    (``gc.freeze``) before the collector is re-enabled: its first collection would otherwise traverse all of it
    once more (0.3 s) just before the CLI process exits; the price is that cycles made during the verb are not
    collected — fine for a verb that ends the process. Long verbs (finetune, study) keep the collector on."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()
