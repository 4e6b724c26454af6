"""spectra_convert.textdata: both formats load, and every bad input is a one-line UserError naming the problem.

The documents written here are lines taken from the committed real-text corpus (never invented prose)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import shutil
from pathlib import Path

import pytest

from spectra_convert.errors import UserError
from spectra_convert.textdata import TextRecord, default_calibration_path, domains_of, load_texts

CORPUS = Path(__file__).resolve().parent / "fixtures" / "corpus"


@pytest.fixture(scope="module")
def real_records() -> list[dict]:
    """Four real documents (one per domain) from the committed held-out + unseen corpus."""
    picked: dict[str, dict] = {}
    for line in (CORPUS / "mixed_eval.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        picked.setdefault(record["domain"], record)
    return list(picked.values())


def _error(path: Path, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        load_texts(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- happy paths ----------------------------------------------------------------------------------------------


def test_jsonl_loads_text_and_domain_and_skips_blank_lines(tmp_path, real_records):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"text": r["text"], "domain": r["domain"], "source": r["source"]}) for r in real_records]
    path.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n", encoding="utf-8")
    records = load_texts(path)
    assert records == [TextRecord(r["text"], r["domain"]) for r in real_records]
    assert domains_of(records) == [r["domain"] for r in real_records]


def test_jsonl_domain_is_optional(tmp_path, real_records):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in real_records), encoding="utf-8")
    records = load_texts(path)
    assert [r.domain for r in records] == [None] * len(real_records)
    assert domains_of(records) is None


def test_max_records_keeps_the_first_n_and_stops_reading(tmp_path, real_records):
    path = tmp_path / "data.jsonl"
    good = "".join(json.dumps({"text": r["text"], "domain": r["domain"]}) + "\n" for r in real_records[:2])
    path.write_text(good + "this line is not json\n", encoding="utf-8")
    assert [r.text for r in load_texts(path, max_records=2)] == [r["text"] for r in real_records[:2]]
    assert "not valid JSON" in _error(path, max_records=3)
    for bad in (0, -1, 1.5, True):
        assert "max_records must be a positive integer" in _error(path, max_records=bad)


def test_txt_documents_are_separated_by_blank_lines(tmp_path, real_records):
    # Each real document, with its own blank lines collapsed, becomes one paragraph of the .txt file.
    paragraphs = ["\n".join(line for line in r["text"].splitlines() if line.strip()) for r in real_records]
    path = tmp_path / "data.txt"
    path.write_text("\n\n\n".join(paragraphs) + "\n   \n", encoding="utf-8")
    records = load_texts(path)
    assert [r.text for r in records] == paragraphs
    assert all(r.domain is None for r in records)
    assert domains_of(records) is None
    assert len(load_texts(path, max_records=1)) == 1


def test_utf8_bom_is_accepted(tmp_path, real_records):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": real_records[0]["text"]}).encode() + b"\n")
    assert load_texts(path)[0].text == real_records[0]["text"]


def test_default_calibration_corpus_loads_balanced():
    path = default_calibration_path()
    assert path.name == "calibration.jsonl" and path.is_file()
    records = load_texts(path)
    domains = domains_of(records)
    assert domains is not None and len(records) >= 100
    assert {d: domains.count(d) for d in set(domains)} == {"code": 40, "docs": 40, "legal": 40}
    # Interleaved by domain, so a prefix (max_records) stays balanced too.
    assert sorted(domains_of(load_texts(path, max_records=6))) == ["code", "code", "docs", "docs", "legal", "legal"]


# -- bad input ------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    assert _error(tmp_path / "nope.jsonl") == f"{tmp_path / 'nope.jsonl'}: no such file"


def test_directory(tmp_path):
    folder = tmp_path / "corpus.jsonl"
    folder.mkdir()
    assert "is a directory" in _error(folder)


def test_unsupported_extension(tmp_path, real_records):
    path = tmp_path / "data.csv"
    path.write_text(real_records[0]["text"], encoding="utf-8")
    message = _error(path)
    assert "unsupported file type '.csv'" in message and ".jsonl" in message and ".txt" in message


@pytest.mark.parametrize("name,content", [("empty.jsonl", ""), ("blank.jsonl", "\n  \n\n"), ("empty.txt", ""),
                                          ("blank.txt", "\n\n \t\n")])
def test_empty_file_has_no_documents(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert _error(path).endswith("no documents (the file is empty or only blank lines)")


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("first line\nGr\u00fc\u00dfe\n".encode("latin-1"))
    assert _error(path).startswith(f"{path}:2: not UTF-8 text")


def _jsonl_with_bad_line_3(tmp_path, real_records, bad_line: str) -> Path:
    path = tmp_path / "data.jsonl"
    good = [json.dumps({"text": r["text"], "domain": r["domain"]}) for r in real_records[:2]]
    path.write_text("\n".join([good[0], good[1], bad_line]) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("bad_line,expected", [
    ('{"text": "unterminated', "not valid JSON"),
    ('["text"]', "expected a JSON object with a 'text' field, got an array"),
    ('{"domain": "code"}', "missing the 'text' field"),
    ('{"text": 42}', "'text' must be a string, got a number"),
    ('{"text": null}', "'text' must be a string, got null"),
    ('{"text": "   "}', "'text' is empty"),
    ('{"text": "x = 1", "domain": 3}', "'domain' must be a string, got a number"),
])
def test_bad_jsonl_line_names_the_line(tmp_path, real_records, bad_line, expected):
    path = _jsonl_with_bad_line_3(tmp_path, real_records, bad_line)
    message = _error(path)
    assert message.startswith(f"{path}:3: {expected}")


def test_mixed_domains_are_refused():
    records = [TextRecord("a", "code"), TextRecord("b", None), TextRecord("c", "legal")]
    with pytest.raises(UserError, match="2 of 3 records have a 'domain' and 1 do not"):
        domains_of(records)


_LOAD_AND_PRINT_ERROR = (
    "import sys\n"
    "from spectra_convert.errors import UserError\n"
    "from spectra_convert.textdata import load_texts\n"
    "try:\n    load_texts(sys.argv[1])\nexcept UserError as e:\n    print(e)\n"
)
#: Root reads any file; drop the two capabilities that let it, so mode bits apply as to anyone else.
_WITHOUT_DAC_OVERRIDE = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                         "--bounding-set=-dac_override,-dac_read_search"]


def _load_error(path: Path) -> str:
    if os.geteuid() != 0:
        return _error(path)
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a file unreadable")
    proc = subprocess.run([*_WITHOUT_DAC_OVERRIDE, sys.executable, "-c", _LOAD_AND_PRINT_ERROR, str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_permission_denied(tmp_path, real_records):
    """An unreadable file, and a file inside a folder we may not enter."""
    unreadable = tmp_path / "secret.jsonl"
    unreadable.write_text(json.dumps({"text": real_records[0]["text"]}) + "\n", encoding="utf-8")
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "inner.txt").write_text(real_records[0]["text"], encoding="utf-8")
    os.chmod(unreadable, 0o000)
    os.chmod(locked, 0o000)
    try:
        for path in (unreadable, locked / "inner.txt"):
            assert _load_error(path) == f"{path}: permission denied"
    finally:
        os.chmod(locked, 0o755)
        os.chmod(unreadable, 0o644)
