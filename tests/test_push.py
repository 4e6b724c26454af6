"""``push``: folder checks, dry run (+ fresh-process load), and the real upload path against the recording fake
Hub in ``tests/fakehub.py`` (loopback only; the client runs with ``HF_HUB_DISABLE_XET=1`` because the fake speaks
classic LFS, not Xet).

The model is a tiny random-weight llama-parent SPECTRA model (structure only; its weights say nothing about
quality), written by the real ``save_pretrained`` so config/auto_map/modeling files are what converters produce.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spectra_convert.errors import UserError
from spectra_convert.hub import check_model_folder, manifest, safetensors_names
from spectra_convert.modelcard import write_model_card
from tests.conftest import REPO, run_without_package, tiny_parent_config
from tests.fakehub import FakeHub

TOKEN = "hf_secret_test_token"
PROMPT_IDS = [[1, 17, 42, 99, 5]]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A converted folder as upcycle writes it: sharded safetensors + index, runtime .py files, card, report."""
    from spectra_convert.modeling.configuration_spectra import SpectraConfig
    from spectra_convert.modeling.modeling_spectra import SpectraForCausalLM

    torch.manual_seed(0)
    config = SpectraConfig(text_config=tiny_parent_config("llama").to_dict(),
                           spectra={"num_experts": 4, "top_k": 2, "router_dim": 16})
    folder = tmp_path_factory.mktemp("push") / "model"
    SpectraForCausalLM(config).eval().save_pretrained(folder, max_shard_size="40KB")
    (folder / "validation").mkdir()
    # Schema-shaped report (see modelcard tests); only its layout matters here.
    (folder / "validation" / "report.json").write_text(json.dumps({"summary": {"load_cv": 0.5}}))
    write_model_card(folder, base_model=None)
    return folder


@pytest.fixture
def folder(converted, tmp_path) -> Path:
    """A private copy a test may break."""
    return Path(shutil.copytree(converted, tmp_path / "model"))


def cli_env(tmp_path: Path, endpoint: str, token: str | None = TOKEN) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE", "HF_ENDPOINT")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_XET="1", OMP_NUM_THREADS="1")
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def run_push(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spectra_convert", "push", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == errors[0]
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert TOKEN not in result.stdout + result.stderr
    return errors[0]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- folder checks --------------------------------------------------------------------------------------------


def test_check_lists_every_file_but_hidden_and_caches(folder):
    (folder / ".cache").mkdir()
    (folder / ".cache" / "lock").write_text("x")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "modeling_spectra.cpython-311.pyc").write_bytes(b"\0")
    files = [p.relative_to(folder).as_posix() for p in check_model_folder(folder)]
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                     if p.is_file() and not p.relative_to(folder).parts[0].startswith((".", "__pycache__")))
    assert files == on_disk
    for needed in ("config.json", "README.md", "modeling_spectra.py", "configuration_spectra.py",
                   "model.safetensors.index.json", "validation/report.json"):
        assert needed in files
    assert sum(name.endswith(".safetensors") for name in files) >= 2  # sharded, so the index check matters


def _drop_auto_map(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))


def _edit_runtime(folder: Path) -> None:
    path = folder / "modeling_spectra.py"
    path.write_text(path.read_text() + "\n# edited\n")


def _phantom_tensor(folder: Path) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.layers.0.mlp.gate.phantom"] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _drop_shard(folder: Path) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    (folder / sorted(set(index["weight_map"].values()))[-1]).unlink()


BREAKAGES = {
    "no auto_map": (_drop_auto_map, "no auto_map"),
    "missing modeling file": (lambda f: (f / "modeling_spectra.py").unlink(), "modeling_spectra.py"),
    "missing configuration file": (lambda f: (f / "configuration_spectra.py").unlink(), "configuration_spectra.py"),
    "modified modeling file": (_edit_runtime, "differs from the SPECTRA runtime"),
    "tensor missing from shard": (_phantom_tensor, "tensor model.layers.0.mlp.gate.phantom"),
    "shard missing": (_drop_shard, "missing"),
    "no model card": (lambda f: (f / "README.md").unlink(), "model card missing"),
    "no config": (lambda f: (f / "config.json").unlink(), "config.json missing"),
}


@pytest.mark.parametrize("case", sorted(BREAKAGES))
def test_broken_folder_is_refused_in_one_line(folder, case):
    breakage, needle = BREAKAGES[case]
    breakage(folder)
    with pytest.raises(UserError) as info:
        check_model_folder(folder)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("case", ["no auto_map", "modified modeling file", "tensor missing from shard",
                                  "no model card"])
def test_broken_folder_cli_exits_nonzero_before_any_request(folder, tmp_path, case):
    breakage, needle = BREAKAGES[case]
    breakage(folder)
    with FakeHub(token=TOKEN) as hub:
        result = run_push([str(folder), "--repo", "me/tiny"], cli_env(tmp_path, hub.endpoint), tmp_path)
    assert_one_line_error(result, needle)
    assert result.returncode == 2
    assert hub.requests == []


def test_safetensors_names_reads_header_only(converted):
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    names = set()
    for shard in set(index["weight_map"].values()):
        names |= safetensors_names(converted / shard)
    assert names == set(index["weight_map"])


def test_manifest_hashes_match_file_bytes(converted):
    files = check_model_folder(converted)
    entries = manifest(files, converted)
    assert [e["path"] for e in entries] == sorted(p.relative_to(converted).as_posix() for p in files)
    for entry in entries:
        data = (converted / entry["path"]).read_bytes()
        assert entry["size"] == len(data) and entry["sha256"] == sha256(data)


# -- dry run --------------------------------------------------------------------------------------------------


def test_dry_run_writes_exact_upload_and_manifest_without_network(converted, tmp_path):
    out = tmp_path / "dry"
    before = {p: p.read_bytes() for p in converted.rglob("*") if p.is_file()}
    with FakeHub(token=TOKEN) as hub:
        env = cli_env(tmp_path, hub.endpoint)
        result = run_push([str(converted), "--repo", "me/tiny", "--dry-run", str(out)], env, tmp_path)
        assert result.returncode == 0, result.stderr
        again = run_push([str(converted), "--repo", "me/tiny", "--dry-run", str(out)], env, tmp_path)
        assert_one_line_error(again, "--force")
        forced = run_push([str(converted), "--repo", "me/tiny", "--dry-run", str(out), "--force"], env, tmp_path)
        assert forced.returncode == 0, forced.stderr
    assert hub.requests == []  # no network call at all, not even huggingface_hub's telemetry

    data = json.loads((out / "manifest.json").read_text())
    assert data["repo_id"] == "me/tiny" and data["revision"] == "main"
    listed = {e["path"]: e for e in data["files"]}
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted([*listed, "manifest.json"])
    assert sorted(listed) == sorted(p.relative_to(converted).as_posix() for p in check_model_folder(converted))
    for path, entry in listed.items():
        content = (out / path).read_bytes()
        assert content == (converted / path).read_bytes()
        assert entry["size"] == len(content) and entry["sha256"] == sha256(content)
    assert {p: p.read_bytes() for p in converted.rglob("*") if p.is_file()} == before  # input untouched
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_dry_run_inside_model_folder_is_refused(folder, tmp_path):
    from spectra_convert.hub import push

    with pytest.raises(UserError, match="outside"):
        push(folder, "me/tiny", dry_run=folder / "dry")


@pytest.mark.slow
def test_dry_run_folder_loads_and_generates_without_spectra_convert(converted, tmp_path):
    from spectra_convert.hub import push
    from spectra_convert.modeling.modeling_spectra import SpectraForCausalLM

    out = tmp_path / "dry"
    push(converted, "me/tiny", dry_run=out)
    reference = SpectraForCausalLM.from_pretrained(converted).eval()
    expected = reference.generate(torch.tensor(PROMPT_IDS), max_new_tokens=6, do_sample=False)[0].tolist()

    script = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
assert type(model).__name__ == "SpectraForCausalLM", type(model)
assert not any(name.startswith("spectra_convert") for name in sys.modules)
out = model.generate(torch.tensor({PROMPT_IDS!r}), max_new_tokens=6, do_sample=False)
print("TOKENS", json.dumps(out[0].tolist()))
"""
    env_home = tmp_path / "hf_home"
    result = run_without_package(f"import os; os.environ['HF_HOME'] = {str(env_home)!r}\n" + script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("TOKENS "))
    tokens = json.loads(line[len("TOKENS "):])
    assert tokens == expected and len(tokens) == len(PROMPT_IDS[0]) + 6


# -- real upload against the recording fake Hub ----------------------------------------------------------------


def test_push_commits_every_manifest_file_once(converted, tmp_path):
    from spectra_convert.hub import push

    planned = {e["path"]: e for e in push(converted, "me/tiny", dry_run=tmp_path / "dry").files}
    with FakeHub(token=TOKEN) as hub:
        result = run_push([str(converted), "--repo", "me/tiny", "--private", "--revision", "dev",
                           "--commit-message", "first upload"], cli_env(tmp_path, hub.endpoint), tmp_path)
    assert result.returncode == 0, result.stderr
    assert TOKEN not in result.stdout + result.stderr
    assert "me/tiny" in result.stdout and str(len(planned)) in result.stdout

    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert (commit.repo_id, commit.revision, commit.summary) == ("me/tiny", "dev", "first upload")
    assert sorted(commit.files) == sorted(planned)
    for path, content in commit.files.items():
        assert len(content) == planned[path]["size"] and sha256(content) == planned[path]["sha256"]
        assert content == (converted / path).read_bytes()
    assert hub.files("me/tiny", "dev").keys() >= planned.keys()
    assert hub.repos["me/tiny"]["private"] is True

    api_calls = [r for r in hub.requests if r.path.startswith("/api/") and r.path != "/api/agent-harnesses"]
    assert api_calls and all(r.authorized for r in api_calls)  # the token reached the server...
    assert all("authorization" not in (k.lower() for k in r.headers) for r in hub.requests)  # ...and was not kept
    lfs_puts = {r.path.rsplit("/", 1)[1] for r in hub.requests if r.method == "PUT"}
    shards = {e["sha256"] for p, e in planned.items() if p.endswith(".safetensors")}
    assert lfs_puts == shards  # weights travelled as LFS objects, the small text files inline


def test_push_into_existing_repo_adds_a_second_commit(converted, tmp_path):
    with FakeHub(token=TOKEN) as hub:
        env = cli_env(tmp_path, hub.endpoint)
        assert run_push([str(converted), "--repo", "me/tiny"], env, tmp_path).returncode == 0
        second = run_push([str(converted), "--repo", "me/tiny"], env, tmp_path)
    assert second.returncode == 0, second.stderr
    assert [c.revision for c in hub.commits] == ["main", "main"]


@pytest.mark.parametrize("failure", ["401", "404", "down"])
def test_hub_failures_are_one_line_errors_without_the_token(converted, tmp_path, failure):
    if failure == "down":
        env = cli_env(tmp_path, FakeHub.down_endpoint())
        result = run_push([str(converted), "--repo", "me/tiny"], env, tmp_path)
        assert_one_line_error(result, "cannot reach the Hub at http://127.0.0.1:")
        return
    hub_kwargs = {"token": "hf_the_right_token"} if failure == "401" else {"token": TOKEN, "fail": {"/commit/": 404}}
    with FakeHub(**hub_kwargs) as hub:
        result = run_push([str(converted), "--repo", "me/tiny"], cli_env(tmp_path, hub.endpoint), tmp_path)
    needle = "authentication failed" if failure == "401" else "not found on the Hub (HTTP 404): me/tiny@main"
    line = assert_one_line_error(result, needle)
    assert "HF_TOKEN" in line or failure == "404"
    assert hub.commits == []


def test_missing_token_fails_before_any_request(converted, tmp_path):
    with FakeHub(token=TOKEN) as hub:
        result = run_push([str(converted), "--repo", "me/tiny"], cli_env(tmp_path, hub.endpoint, token=None), tmp_path)
    assert_one_line_error(result, "no Hugging Face token", "HF_TOKEN")
    assert hub.requests == []


@pytest.mark.parametrize("repo", ["tiny", "me/tiny/extra", "me/", "me/ti ny"])
def test_bad_repo_id_is_refused(converted, repo):
    from spectra_convert.hub import push

    with pytest.raises(UserError, match="OWNER/NAME"):
        push(converted, repo, dry_run=Path("/nonexistent-dry-run"))


def test_cli_help_lists_push_options():
    result = subprocess.run([sys.executable, "-m", "spectra_convert", "push", "--help"], capture_output=True,
                            text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0
    for option in ("--repo", "--private", "--revision", "--commit-message", "--dry-run"):
        assert option in result.stdout
