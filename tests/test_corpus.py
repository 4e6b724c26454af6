"""The committed real-text corpora (built by scripts/build_corpus.py): present, split cleanly, really real text,
and reproducible by the script on a machine that sees the same source files."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from spectra_convert.textdata import default_calibration_path, domains_of, load_texts

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "fixtures" / "corpus"
SPLITS = {
    "calibration": default_calibration_path(),
    "train": CORPUS / "train.jsonl",
    "heldout": CORPUS / "heldout.jsonl",
    "unseen": CORPUS / "unseen.jsonl",
}
SEEN = {"code", "docs", "legal"}


def _raw(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {name: _raw(path) for name, path in SPLITS.items()}


def test_files_exist_with_expected_domains_and_sizes(splits):
    assert default_calibration_path() == REPO / "spectra_convert" / "data" / "calibration.jsonl"
    assert default_calibration_path().stat().st_size < 400 * 1024
    expected = {"calibration": {"code": 40, "docs": 40, "legal": 40}, "train": {"code": 50, "docs": 50, "legal": 50},
                "heldout": {"code": 15, "docs": 15, "legal": 15}, "unseen": {"changelog": 30}}
    for name, records in splits.items():
        assert dict(Counter(r["domain"] for r in records)) == expected[name], name
        assert all(set(r) == {"text", "domain", "source"} for r in records)
        assert all(600 <= len(r["text"]) <= 2000 for r in records), name
        # The loader reads them (and so validates every line).
        assert domains_of(load_texts(SPLITS[name])) == [r["domain"] for r in records]


def test_mixed_eval_is_heldout_then_unseen():
    mixed = (CORPUS / "mixed_eval.jsonl").read_bytes()
    assert mixed == (CORPUS / "heldout.jsonl").read_bytes() + (CORPUS / "unseen.jsonl").read_bytes()
    assert set(domains_of(load_texts(CORPUS / "mixed_eval.jsonl"))) == SEEN | {"changelog"}


def test_no_source_file_or_text_is_shared_between_splits(splits):
    owner: dict[str, str] = {}
    texts: dict[str, str] = {}
    for name, records in splits.items():
        for record in records:
            assert owner.setdefault(record["source"], name) == name, f"{record['source']} in {owner[record['source']]} and {name}"
            assert texts.setdefault(record["text"], name) == name, f"same text in {texts[record['text']]} and {name}"
    # And the unseen domain really is unseen by calibration and training.
    assert all(r["domain"] != "changelog" for s in ("calibration", "train", "heldout") for r in splits[s])


def test_texts_are_real_and_of_their_domain(splits):
    records = [r for rs in splits.values() for r in rs]
    by_domain: dict[str, list[str]] = {}
    for record in records:
        by_domain.setdefault(record["domain"], []).append(record["text"])

    def share(domain: str, *needles: str) -> float:
        texts = by_domain[domain]
        return sum(any(n in t for n in needles) for t in texts) / len(texts)

    assert share("code", "def ", "import ") >= 0.6
    assert share("code", "def ", "import ", "class ", "return", "self.", " = ", "#", '"""') == 1.0
    assert share("legal", "License", "Copyright", "license", "copyright") >= 0.9
    assert share("docs", "NAME", "DESCRIPTION", "OPTIONS", "SYNOPSIS", "SEE ALSO") >= 0.3
    assert share("changelog", "urgency=") == 1.0
    assert all(r["source"].endswith(".py") for r in records if r["domain"] == "code")
    assert all(r["source"].startswith("/usr/share/man/") for r in records if r["domain"] == "docs")
    assert all(r["source"].endswith("/copyright") for r in records if r["domain"] == "legal")


def test_texts_are_verbatim_excerpts_of_their_sources(splits):
    """Where the source file is on this machine, the document is a verbatim excerpt (modulo trailing spaces).

    Man pages are rendered by groff, so they are checked by their source existing only."""
    checked = 0
    for record in (r for rs in splits.values() for r in rs):
        path = Path(record["source"])
        if not path.is_file():
            continue
        if record["domain"] == "docs":
            checked += 1
            continue
        data = path.read_bytes()
        text = (gzip.decompress(data) if path.suffix == ".gz" else data).decode("utf-8")
        text = "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n"))
        assert record["text"] in text, record["source"]
        checked += 1
    if checked == 0:
        pytest.skip("none of the corpus source files exist on this machine")


def test_manifest_matches_committed_files():
    manifest = json.loads((CORPUS / "manifest.json").read_text())
    for rel, entry in manifest["files"].items():
        data = (REPO / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], f"{rel} was edited after it was built"
        assert data.count(b"\n") == entry["records"]


def test_rebuild_reproduces_committed_files_byte_for_byte(tmp_path):
    script = REPO / "scripts" / "build_corpus.py"
    proc = subprocess.run([sys.executable, str(script), "--out-root", str(tmp_path), "--seed", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "calibration" in proc.stdout and "changelog 30" in proc.stdout  # the summary table
    committed = json.loads((CORPUS / "manifest.json").read_text())
    rebuilt = json.loads((tmp_path / "tests/fixtures/corpus/manifest.json").read_text())
    inputs = ("python", "man_renderer", "source_fingerprints", "seed")
    if any(committed[k] != rebuilt[k] for k in inputs):
        pytest.skip("this machine has different source files than the one the corpus was built on")
    for rel in committed["files"]:
        assert (tmp_path / rel).read_bytes() == (REPO / rel).read_bytes(), rel
    assert (tmp_path / "tests/fixtures/corpus/manifest.json").read_bytes() == (CORPUS / "manifest.json").read_bytes()

    # A second run refuses to overwrite without --force, and says so.
    again = subprocess.run([sys.executable, str(script), "--out-root", str(tmp_path)], capture_output=True,
                           text=True, timeout=120)
    assert again.returncode != 0 and "pass --force" in again.stderr


def test_training_split_is_extra_text_no_committed_split_holds(tmp_path):
    """``--training-out``: a larger training set for fine-tuning runs, drawn after the committed splits from
    source files none of them used, so it never repeats calibration, held-out or unseen text."""
    script = REPO / "scripts" / "build_corpus.py"
    out = tmp_path / "train_large.jsonl"
    proc = subprocess.run([sys.executable, str(script), "--training-out", str(out), "--training-docs", "6"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["domain"] for r in records} <= {"code", "docs", "legal"} and len(records) <= 18
    assert all(600 <= len(r["text"]) <= 2000 for r in records)
    committed = [json.loads(line) for path in [REPO / "spectra_convert/data/calibration.jsonl",
                                               *(CORPUS / f"{n}.jsonl" for n in ("train", "heldout", "unseen"))]
                 for line in path.read_text().splitlines()]
    if json.loads((CORPUS / "manifest.json").read_text())["python"] == ".".join(map(str, sys.version_info[:3])):
        assert len(records) == 18
        assert not {r["source"] for r in records} & {r["source"] for r in committed}
    assert not {r["text"] for r in records} & {r["text"] for r in committed}
    again = subprocess.run([sys.executable, str(script), "--training-out", str(out)], capture_output=True, text=True,
                           timeout=180)
    assert again.returncode != 0 and "pass --force" in again.stderr
