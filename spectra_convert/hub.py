"""Publishing a converted folder to the Hugging Face Hub — the only network code in the project.

Three steps, each usable on its own:

1. ``check_model_folder`` refuses a folder that would publish a broken repo: no ``auto_map`` (the Hub page would
   not load), missing or stale runtime ``.py`` files (the remote code would not match the weights' layout), a
   tensor the index promises but no shard holds, no model card. Each failure is one line naming the piece.
2. ``manifest`` hashes what will be uploaded (path, size, sha256) — the same list a dry run writes and a real
   upload commits, so a test can compare the two.
3. ``push`` either copies the files plus ``manifest.json`` into a dry-run folder (no network at all) or creates
   the repo and uploads everything in ONE commit through ``huggingface_hub`` (large files go through its
   Xet/LFS path; the repo never shows a half-uploaded model).

The token comes from huggingface_hub's usual sources (``HF_TOKEN``, ``hf auth login``); it is never printed,
and every Hub failure becomes one ``UserError`` line that is scrubbed of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .modelio.checkpoint import INDEX_NAME, SINGLE_NAME
from .modelio.safetensors_files import read_header
from .modelio.side_files import RUNTIME_DIR, RUNTIME_FILES

#: Written next to the files of a dry run; not part of the upload.
MANIFEST_NAME = "manifest.json"
REQUIRED_AUTO_MAP = ("AutoConfig", "AutoModelForCausalLM")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_HASH_CHUNK = 8 * 1024 * 1024


@dataclass
class PushResult:
    """What was (or, for a dry run, would have been) published."""

    repo_id: str
    revision: str
    files: list[dict[str, Any]]
    total_bytes: int
    repo_url: str | None = None
    commit_url: str | None = None
    dry_run_dir: Path | None = None


# -- 1. folder check ------------------------------------------------------------------------------------------


def runtime_files() -> list[Path]:
    """The package's runtime modules, which must be byte-identical in the folder."""
    return [RUNTIME_DIR / name for name in RUNTIME_FILES]


def check_model_folder(model_dir: Path | str) -> list[Path]:
    """Check ``model_dir`` is complete and loadable; return the files to upload (absolute, sorted).

    Raises ``UserError`` naming the first missing or inconsistent piece.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: not a folder; push uploads a local folder written by spectra-convert")
    if (model_dir / ADAPTER_CONFIG).is_file() and not (model_dir / "config.json").is_file():
        return _check_adapter_folder(model_dir)
    config = _read_json(model_dir / "config.json", "config.json")
    if config.get("model_type") != "spectra":
        raise UserError(
            f"{model_dir / 'config.json'}: model_type is {config.get('model_type')!r}, not 'spectra'; push "
            "uploads folders written by spectra-convert upcycle/reroute/finetune"
        )
    _check_auto_map(model_dir, config)
    _check_runtime(model_dir)
    _check_weights(model_dir)
    card = model_dir / "README.md"
    if not card.is_file() or card.stat().st_size == 0:
        raise UserError(
            f"{card}: model card missing; write it with spectra_convert.modelcard.write_model_card(folder, "
            "base_model=...) or re-run the conversion"
        )
    return _upload_files(model_dir)


def adapter_base(model_dir: Path) -> str | None:
    """The Hub id of the base model a LoRA adapter folder needs, or None when its base is not on the Hub."""
    from .modelcard import card_base_model

    config = _read_json(model_dir / ADAPTER_CONFIG, ADAPTER_CONFIG)
    base = config.get("base_model_name_or_path")
    return base if isinstance(base, str) and base == card_base_model(model_dir) else None


def _check_adapter_folder(model_dir: Path) -> list[Path]:
    """A LoRA adapter folder (``finetune --mode lora``) is published only when its base model is a Hub repo
    (its card, written by finetune, names it): an adapter whose base exists only on this machine is useless on
    the Hub, so the user is pointed at ``--merge`` instead."""
    config = _read_json(model_dir / ADAPTER_CONFIG, ADAPTER_CONFIG)
    base = adapter_base(model_dir)
    if base is None:
        raise UserError(
            f"{model_dir} is a LoRA adapter for {config.get('base_model_name_or_path')!r}, which is not a Hugging Face "
            "Hub repository; publish a full model instead: `spectra-convert finetune MODEL --mode lora --merge -o "
            "DIR` writes one (or fine-tune from the base model's Hub id to publish the adapter)"
        )
    weights = model_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise UserError(f"{model_dir}: adapter weights {ADAPTER_WEIGHTS} missing; re-run the fine-tune")
    safetensors_names(weights)
    return _upload_files(model_dir)


def _read_json(path: Path, label: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: {label} missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: {label} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: {label} must hold a JSON object")
    return data


def _check_auto_map(model_dir: Path, config: dict[str, Any]) -> None:
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict):
        raise UserError(
            f"{model_dir / 'config.json'}: no auto_map; the Hub could not load the model with "
            "trust_remote_code (re-run the conversion with this spectra-convert version)"
        )
    for key in REQUIRED_AUTO_MAP:
        target = auto_map.get(key)
        if not isinstance(target, str) or "." not in target:
            raise UserError(f"{model_dir / 'config.json'}: auto_map has no {key} entry")
        module = target.split("--")[-1].rsplit(".", 1)[0]
        if not (model_dir / f"{module}.py").is_file():
            raise UserError(f"{model_dir}: modeling file {module}.py (auto_map.{key}) missing")


def _check_runtime(model_dir: Path) -> None:
    for source in runtime_files():
        shipped = model_dir / source.name
        if not shipped.is_file():
            raise UserError(f"{model_dir}: modeling file {source.name} missing; re-run the conversion")
        if shipped.read_bytes() != source.read_bytes():
            raise UserError(
                f"{shipped}: differs from the SPECTRA runtime of this spectra-convert version (the folder was "
                "written by another version or edited); re-run the conversion with this version"
            )


def _check_weights(model_dir: Path) -> None:
    index_path = model_dir / INDEX_NAME
    if index_path.is_file():
        weight_map = _read_json(index_path, INDEX_NAME).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index_path}: no weight_map")
        by_shard: dict[str, list[str]] = {}
        for tensor, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(tensor)
        for shard, tensors in sorted(by_shard.items()):
            shard_path = (model_dir / shard).resolve()
            if model_dir.resolve() not in shard_path.parents:
                raise UserError(f"{index_path}: shard {shard!r} lies outside the folder")
            if not shard_path.is_file():
                raise UserError(f"{model_dir}: shard {shard} named in {INDEX_NAME} missing")
            present = safetensors_names(shard_path)
            missing = sorted(set(tensors) - present)
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise UserError(f"{shard_path}: tensor {missing[0]} named in {INDEX_NAME} missing{more}")
    elif (model_dir / SINGLE_NAME).is_file():
        safetensors_names(model_dir / SINGLE_NAME)
    else:
        raise UserError(f"{model_dir}: no weights ({SINGLE_NAME} or {INDEX_NAME}) found")


def safetensors_names(path: Path) -> set[str]:
    """Tensor names in a safetensors file, read from its validated JSON header only (no tensor data is loaded)."""
    return set(read_header(path)[0])


def _upload_files(model_dir: Path) -> list[Path]:
    """Every regular file under the folder except hidden entries and Python caches."""
    files = []
    for path in sorted(model_dir.rglob("*")):
        rel = path.relative_to(model_dir)
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts) or path.suffix == ".pyc":
            continue
        if path.is_file():
            files.append(path)
    return files


# -- 2. manifest ----------------------------------------------------------------------------------------------


def manifest(files: Sequence[Path], root: Path | str, *, on_bytes: Any = None) -> list[dict[str, Any]]:
    """``[{path, size, sha256}]`` for ``files`` (paths relative to ``root``, posix, sorted).

    ``on_bytes(n)`` is called as data is hashed (progress bars).
    """
    root = Path(root)
    entries = []
    for path in files:
        digest = hashlib.sha256()
        size = 0
        with open(path, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
        entries.append({"path": Path(path).relative_to(root).as_posix(), "size": size, "sha256": digest.hexdigest()})
    return sorted(entries, key=lambda e: e["path"])


# -- 3. push --------------------------------------------------------------------------------------------------


def push(
    model_dir: Path | str,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: Path | str | None = None,
    endpoint: str | None = None,
    force: bool = False,
) -> PushResult:
    """Check, hash and publish ``model_dir`` to ``repo_id`` (or write the dry-run folder ``dry_run``).

    ``force`` only concerns the dry-run folder (replace it if it exists). ``endpoint`` defaults to
    ``HF_ENDPOINT`` / huggingface_hub's default; tests point it at a local recording server.
    """
    from .console import err_console, human_bytes, progress

    model_dir = Path(model_dir)
    if not _REPO_ID.match(repo_id or ""):
        raise UserError(f"--repo {repo_id!r}: expected OWNER/NAME (letters, digits, '-', '_', '.')")
    if revision is not None and (not revision or revision.startswith(("refs/", "/")) or ".." in revision):
        raise UserError(f"--revision {revision!r}: expected a branch name such as 'main' or 'v1'")
    files = check_model_folder(model_dir)
    message = commit_message or _default_message(model_dir)
    branch = revision or "main"
    if dry_run is None:  # the token is checked before gigabytes are hashed, not after
        endpoint = resolve_endpoint(endpoint)
        token = _token()
        if token is None:
            raise UserError("no Hugging Face token found: set HF_TOKEN or run `hf auth login`")
        _check_token(endpoint, token, repo_id, branch)
    total = sum(p.stat().st_size for p in files)
    with progress() as bar:
        task = bar.add_task(f"hashing {len(files)} files ({human_bytes(total)})", total=total)
        entries = manifest(files, model_dir, on_bytes=lambda n: bar.advance(task, n))
    if dry_run is not None:
        target = _write_dry_run(model_dir, entries, Path(dry_run), force=force, meta={
            "repo_id": repo_id, "revision": branch, "private": private, "commit_message": message,
        })
        return PushResult(repo_id, branch, entries, sum(e["size"] for e in entries), dry_run_dir=target)

    err_console.print(f"uploading {len(entries)} files ({human_bytes(total)}) to {endpoint}/{repo_id} @ {branch}")
    try:
        repo_url, commit_url = _upload(model_dir, entries, repo_id, private, revision, message, endpoint)
    except Exception as exc:  # mapped to one line; anything unknown is re-raised untouched
        mapped = hub_error(exc, endpoint=endpoint, repo_id=repo_id, revision=branch, token=token)
        if mapped is None:
            raise
        raise mapped from None
    return PushResult(repo_id, branch, entries, total, repo_url=repo_url, commit_url=commit_url)


def resolve_endpoint(endpoint: str | None = None) -> str:
    """The Hub endpoint: explicit argument, else ``HF_ENDPOINT``, else huggingface_hub's default."""
    if endpoint:
        return endpoint.rstrip("/")
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _check_token(endpoint: str, token: str, repo_id: str, branch: str) -> None:
    """Ask the Hub who the token belongs to (one small request): a wrong or expired token fails here, in one
    line, before any hashing or upload."""
    from huggingface_hub import HfApi

    try:
        HfApi(endpoint=endpoint).whoami(token=token)
    except Exception as exc:  # mapped to one line; anything unknown is re-raised untouched
        mapped = hub_error(exc, endpoint=endpoint, repo_id=repo_id, revision=branch, token=token)
        if mapped is None:
            raise
        raise mapped from None


def _token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def _upload(
    model_dir: Path, entries: list[dict[str, Any]], repo_id: str, private: bool, revision: str | None,
    message: str, endpoint: str,
) -> tuple[str, str]:
    """Create the repo (and branch) and commit every manifest file in one commit."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=endpoint)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    operations = []
    for entry in entries:
        operation = CommitOperationAdd(path_in_repo=entry["path"], path_or_fileobj=str(model_dir / entry["path"]))
        # Reuse the manifest's hash: no second read of large shards, and the LFS oid IS the manifest's sha256,
        # so a file changed after hashing is rejected by the storage instead of silently published.
        operation.upload_info.sha256 = bytes.fromhex(entry["sha256"])
        operations.append(operation)
    info = api.create_commit(
        repo_id, operations, commit_message=message, revision=revision, repo_type="model",
    )
    return str(repo_url), str(info.commit_url)


def hub_error(
    exc: BaseException, *, endpoint: str, repo_id: str, revision: str, token: str | None = None,
) -> UserError | None:
    """Turn a huggingface_hub / transport failure into one ``UserError`` line (``None``: not a Hub failure).

    The token is scrubbed from every message, whatever the server or the library put in it.
    """
    from huggingface_hub.errors import HfHubHTTPError

    transport = _transport_errors()
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__

    message: str | None = None
    for err in chain:
        if isinstance(err, HfHubHTTPError):
            status = err.response.status_code if err.response is not None else None
            if status in (401, 403):
                message = (f"authentication failed (HTTP {status}) at {endpoint}: set HF_TOKEN or run "
                           f"`hf auth login` with a token that can write to {repo_id}")
            elif status == 404:
                message = (f"repository or revision not found on the Hub (HTTP 404): {repo_id}@{revision}; check "
                           "--repo/--revision and that your token can write to it")
            else:
                detail = _first_line(err.server_message or "")
                message = f"the Hub at {endpoint} rejected the upload (HTTP {status})" + (
                    f": {detail}" if detail else "")
            break
        if isinstance(err, transport) or isinstance(err, ConnectionError):
            message = f"cannot reach the Hub at {endpoint}: {type(err).__name__}: {_first_line(str(err))}"
            break
        if isinstance(err, ValueError) and "README.md" in str(err):
            message = f"the Hub rejected the model card metadata: {_first_line(str(err).split(chr(10), 1)[-1])}"
            break
    if message is None:
        return None
    if token:
        message = message.replace(token, "***")
    return UserError(message)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network-level exception classes of the HTTP client huggingface_hub uses (httpx2 in 2.x)."""
    classes: list[type[BaseException]] = []
    for name in ("httpx2", "httpx"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        classes.append(module.TransportError)
    return tuple(classes)


def _first_line(text: str) -> str:
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line[:300]


def _default_message(model_dir: Path) -> str:
    if not (model_dir / "config.json").is_file():
        return f"Upload SPECTRA LoRA adapter for {adapter_base(model_dir)} with spectra-convert"
    knobs = _read_json(model_dir / "config.json", "config.json").get("spectra") or {}
    return (f"Upload SPECTRA model ({knobs.get('source', 'upcycled')}, {knobs.get('num_experts')} experts, "
            f"top-{knobs.get('top_k')}) with spectra-convert")


def _write_dry_run(
    model_dir: Path, entries: list[dict[str, Any]], target: Path, *, force: bool, meta: dict[str, Any],
) -> Path:
    """Copy the upload into ``target`` with ``manifest.json``, atomically (temp folder + rename)."""
    source, target = model_dir.resolve(), target.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise UserError(f"--dry-run {target}: must be a folder outside {source} (and not containing it)")
    if any(e["path"] == MANIFEST_NAME for e in entries):
        raise UserError(f"{model_dir / MANIFEST_NAME}: the folder already holds a {MANIFEST_NAME}; remove it")
    if target.exists() and not force:
        raise UserError(f"--dry-run {target}: already exists; pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for entry in entries:
            dest = tmp / entry["path"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(model_dir / entry["path"], dest)
        (tmp / MANIFEST_NAME).write_text(json.dumps({**meta, "files": entries}, indent=2) + "\n", encoding="utf-8")
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
