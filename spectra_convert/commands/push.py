"""``spectra-convert push``: check a converted folder and publish it to the Hub (thin shell over hub.push)."""

from __future__ import annotations

import click


@click.command("push")
@click.argument("model", type=click.Path(file_okay=False, path_type=str))
@click.option("--repo", "repo_id", required=True, help="Hub repository OWNER/NAME (created if missing).")
@click.option("--private", is_flag=True, help="Create the repository private (an existing repo keeps its visibility).")
@click.option("--revision", default=None, help="Branch to commit to (created from main if missing).")
@click.option("--commit-message", default=None, help="Commit summary (default names the conversion).")
@click.option("--dry-run", "dry_run", type=click.Path(path_type=str), default=None,
              help="Write what would be uploaded (+ manifest.json) into this folder; no network call.")
@click.option("--force", is_flag=True, help="Replace an existing --dry-run folder.")
def command(model: str, repo_id: str, private: bool, revision: str | None, commit_message: str | None,
            dry_run: str | None, force: bool) -> None:
    """Check the converted folder MODEL and upload it to the Hub as one commit.

    The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT selects another Hub endpoint.
    """
    from ..console import human_bytes, summary_table
    from ..hub import push

    result = push(model, repo_id, private=private, revision=revision, commit_message=commit_message,
                  dry_run=dry_run, force=force)
    rows: list[tuple[str, object]] = [
        ("repository", result.repo_url or repo_id),
        ("revision", result.revision),
        ("files", len(result.files)),
        ("bytes", f"{result.total_bytes} ({human_bytes(result.total_bytes)})"),
    ]
    if result.dry_run_dir is not None:
        rows.append(("dry run written to", str(result.dry_run_dir)))
        rows.append(("manifest", str(result.dry_run_dir / "manifest.json")))
    else:
        rows.append(("commit", result.commit_url))
    summary_table("push (dry run)" if result.dry_run_dir is not None else "push", ("", "value"), rows)
