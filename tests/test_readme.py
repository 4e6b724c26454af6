"""The README matches what a user sees: its quickstart outputs are git-ignored, the synopsis' ``--max-cv``
threshold passes on the quickstart model by the numbers the README reports for it, every benchmark row names
its settings, the test suite's duration is stated, and its code uses the options the CLI has."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def quickstart_outputs() -> list[str]:
    """Every folder the README's bash blocks write: ``-o X`` and ``--report-dir X``."""
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    found = re.findall(r"(?:\s-o|--report-dir)\s+([\w./-]+)", "\n".join(blocks))
    return sorted(set(found))


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs the git checkout")
def test_gitignore_covers_what_the_quickstart_writes() -> None:
    outputs = quickstart_outputs()
    assert {"smollm2-8x", "report"} <= set(outputs), outputs
    for name in [*outputs, "validation-smollm2-8x", "smollm2-8x-lora"]:
        done = subprocess.run(["git", "check-ignore", "-q", "--no-index", f"{name}/model.safetensors"], cwd=REPO)
        assert done.returncode == 0, f"{name}/ is not git-ignored"


def test_synopsis_threshold_passes_on_the_reported_quickstart_model() -> None:
    synopsis = README.split("```", 2)[1]
    threshold = float(re.search(r"validate .*--max-cv ([\d.]+)", synopsis).group(1))
    worst = float(re.search(r"load CV mean ([\d.]+) / worst layer ([\d.]+)", README).group(2))
    assert worst < threshold, (worst, threshold)


def test_every_benchmark_row_names_its_settings_and_the_suite_duration_is_stated() -> None:
    table = README.split("## Benchmarks", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `bench/")]
    assert rows
    for row in rows:
        script = row.split("|")[1]
        assert "(" in script and ")" in script, f"benchmark row without its settings: {script.strip()}"
    assert re.search(r"The whole suite takes \S+ minutes", README)


def test_readme_commands_use_options_the_verbs_have() -> None:
    import click

    from tests.test_options import command_of

    for verb, flags in {"upcycle": ["-o", "--gguf-file", "--experts", "--top-k"],
                        "validate": ["--data", "--report-dir", "--baselines", "--max-cv", "--parent"],
                        "finetune": ["--data", "-o", "--mode", "--merge"], "push": ["--repo", "--dry-run"],
                        "run": ["-o", "--dry-run"]}.items():
        opts = {o for p in command_of(verb).params if isinstance(p, click.Option) for o in p.opts}
        for flag in flags:
            assert f"{verb}" in README and flag in opts, (verb, flag)
    assert "--out " not in README and "config=AutoConfig" not in README
