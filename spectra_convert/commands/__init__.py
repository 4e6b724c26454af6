"""One click shell per verb (``cli.COMMANDS``), plus what several shells share."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from pathlib import Path

import click


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


def checked(verb: str, key: str) -> click.ParamType:
    """The click type of ``verb``'s option ``key``: its rule in ``options.RULES`` (the table recipes are checked
    against too), so the CLI and a recipe refuse the same values with the same message."""
    return _Checked(verb, key)


class _Checked(click.ParamType):
    def __init__(self, verb: str, key: str) -> None:
        from ..options import RULES

        self.rule = RULES[verb][key]
        self.name = self.rule.kind

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str | None:
        if self.rule.kind in ("choice", "dtype"):
            return "[" + "|".join(self.rule.allowed()) + "]"
        return {"int": "INTEGER", "float": "FLOAT"}.get(self.rule.kind, "TEXT")

    def convert(self, value, param, ctx):  # type: ignore[override]
        from ..options import check

        label = max(param.opts, key=len) if param is not None and param.opts else self.name
        return check(self.rule, value, label)


class _OutputOption(click.Option):
    """An option with spellings that still work but are not shown in ``--help`` (finetune's old ``--out``)."""

    def __init__(self, *args, hidden_aliases: tuple[str, ...] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hidden_aliases = hidden_aliases

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        shown, self.opts = self.opts, [o for o in self.opts if o not in self.hidden_aliases]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = shown


def output_option(help: str, *, dest: str = "out"):
    """``-o/--output``, the same spelling in every verb that writes a folder (``--out`` still accepted)."""
    return click.option("-o", "--output", "--out", dest, cls=_OutputOption, hidden_aliases=("--out",), required=True,
                        type=click.Path(path_type=Path), help=help)
