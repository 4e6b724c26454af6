"""The ``spectra-convert`` click group.

Each verb lives in ``spectra_convert/commands/<verb>.py`` as a thin click shell over one library function;
this module only wires them together and turns ``UserError`` (and the few library errors that are really
user errors) into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import importlib
import os
import sys

# torch's CPU allocator reads this once, at its first allocation: tensors of 2 MB and more then get
# transparent huge pages, i.e. 512x fewer page faults on the gigabytes an upcycle allocates (measured,
# SmolLM2 8x on 2 cores: 11.2 -> 10.1 s from safetensors, 17.7 -> 15.3 s from the GGUF). It must be set before
# anything imports torch, hence here; a value the user set wins (THP_MEM_ALLOC_ENABLE=0 turns it off).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import click

from .cpu_threads import choose_cli_threads
from .errors import UserError

#: verb -> module under spectra_convert.commands exposing a click command named ``command``
COMMANDS = {
    "upcycle": "upcycle",
    "reroute": "reroute",
    "finetune": "finetune",
    "validate": "validate",
    "push": "push",
    "run": "run_recipe",
    "study": "study",
}


class LazyGroup(click.Group):
    """Imports a verb's module only when it runs (or ``--help`` lists it), so ``--help`` and light verbs stay
    fast: verb modules import torch and transformers inside their functions, never at module level (tested)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return self._load(name)

    @staticmethod
    def _load(name: str) -> click.Command | None:
        module_name = COMMANDS.get(name)
        if module_name is None:
            return None
        return importlib.import_module(f"spectra_convert.commands.{module_name}").command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="spectra-convert")
def group() -> None:
    """Turn HuggingFace causal LMs into SPECTRA-routed Mixture-of-Experts models."""


def _pick_threads(args: list[str]) -> None:
    """Run on the cores nobody else is using at start (``cpu_threads``; say so on stderr when that is fewer
    than all); not for help or version, which start no torch."""
    if not args or {"-h", "--help", "--version"} & set(args):
        return
    threads = choose_cli_threads()
    if threads is not None:
        click.echo(f"note: another process is keeping cores busy; running on {threads} thread"
                   f"{'s' if threads > 1 else ''} (set OMP_NUM_THREADS to choose)", err=True)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the group, map user errors to one stderr line and exit code."""
    _pick_threads(sys.argv[1:] if argv is None else argv)
    try:
        group.main(args=argv, standalone_mode=False)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except MemoryError:
        click.echo("error: out of memory; use a smaller --dtype or fewer --calibration-tokens", err=True)
        sys.exit(3)
    except OSError as exc:
        click.echo(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
