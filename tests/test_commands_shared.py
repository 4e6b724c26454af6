"""What the verb shells share: the cyclic garbage collector paused for short conversion verbs, and a ``--help``
that lists every verb without importing torch or transformers."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import pytest

from spectra_convert.commands import cyclic_gc_paused


@pytest.fixture(autouse=True)
def unfrozen():
    """``cyclic_gc_paused`` freezes what survived it (right for a CLI process about to exit); give the test
    process its objects back."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_cyclic_gc_is_paused_inside_and_restored_after_even_on_error() -> None:
    assert gc.isenabled()
    with cyclic_gc_paused():
        assert not gc.isenabled()
        survivor = [object()]
    assert gc.isenabled()
    assert gc.get_freeze_count() > 0  # survivors frozen: no full traversal of them before the process exits
    assert survivor
    with pytest.raises(RuntimeError), cyclic_gc_paused():
        raise RuntimeError("conversion failed")
    assert gc.isenabled()


def test_a_collector_the_caller_disabled_stays_disabled() -> None:
    gc.disable()
    try:
        with cyclic_gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.parametrize("verb", ["upcycle", "reroute"])
def test_conversion_verbs_run_with_the_collector_paused(verb: str, monkeypatch, tmp_path) -> None:
    """The verb's library function sees the collector off (a spy around the real function, which then fails
    on a missing folder as usual) and the collector is back on afterwards."""
    import importlib

    from spectra_convert.errors import UserError

    seen: list[bool] = []
    surgery = importlib.import_module(f"spectra_convert.surgery.{verb}")
    real = getattr(surgery, verb)
    monkeypatch.setattr(surgery, verb, lambda *a, **k: seen.append(gc.isenabled()) or real(*a, **k))
    command = importlib.import_module(f"spectra_convert.commands.{verb}").command
    with pytest.raises(UserError, match="no such"):
        command.main([str(tmp_path / "missing"), "-o", str(tmp_path / "out")], standalone_mode=False)
    assert seen == [False] and gc.isenabled()


def test_help_lists_every_verb_without_importing_torch_or_transformers() -> None:
    """``spectra-convert --help`` imports each verb's shell to list it; a shell that imported torch at module
    level made it take 2 s instead of 0.2 s (validate did)."""
    from spectra_convert.cli import COMMANDS

    probe = ("import json, sys\nfrom spectra_convert.cli import main\ntry:\n    main(['--help'])\n"
             "except SystemExit:\n    pass\nprint(json.dumps(sorted(m for m in ('torch', 'transformers') if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    help_text, _, imported = done.stdout.rstrip("\n").rpartition("\n")
    assert json.loads(imported) == []
    verbs = help_text.split("Commands:", 1)[1]
    for verb in COMMANDS:
        assert f"  {verb} " in verbs, verb


def test_progress_shows_tokens_per_second_for_tasks_with_a_unit() -> None:
    """validate's bars count tokens (``unit="tok"``) and show the throughput; unit-less bars show none."""
    from spectra_convert import console

    clock = iter(float(t) for t in range(100))
    bar = console.progress()
    bar.get_time = lambda: next(clock)  # a clock ticking 1 s per reading: the rate does not depend on the box
    tokens = bar.add_task("routing held-out text", total=10_000, unit="tok")
    steps = bar.add_task("building experts", total=10)
    for _ in range(3):
        bar.advance(tokens, 2_000)
        bar.advance(steps, 1)
    rate = console.RateColumn()
    shown = str(rate.render(bar.tasks[tokens]))
    assert shown.endswith(" tok/s") and float(shown.split()[0].replace(",", "")) > 0
    assert str(rate.render(bar.tasks[steps])) == ""
