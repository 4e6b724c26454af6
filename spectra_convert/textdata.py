"""Loading the text that calibration, fine-tuning and validation run on.

Two formats, chosen by file extension so a typo never silently changes how a file is read:

* ``.jsonl`` / ``.ndjson`` — one JSON object per line with a string ``text`` and an optional ``domain``
  (domains feed the domain-specialisation metric; see docs/ARCHITECTURE.md, "Metrics"). Blank lines are skipped.
* ``.txt`` — plain text; documents are separated by blank lines; no domains.

Every problem a user can cause (missing file, a directory, no permission, bad JSON on line 7, a record without
``text``) is a one-line ``UserError`` that names the file and, for JSONL, the line. The shipped default
calibration corpus (real text: Python stdlib sources, man pages, Debian copyright files — built by
``scripts/build_corpus.py``) is at ``default_calibration_path()``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
TEXT_SUFFIXES = (".txt",)


@dataclass
class TextRecord:
    """One document: its text and, when the data says so, the domain it comes from."""

    text: str
    domain: str | None = None


def default_calibration_path() -> Path:
    """The calibration corpus shipped as package data (code, docs and legal text, balanced, ~120 documents)."""
    # Next to this module rather than importlib.resources: the editable install's namespace-style finder makes
    # resources.files("spectra_convert") fail, and the package is never imported from a zip.
    return Path(__file__).resolve().parent / "data" / "calibration.jsonl"


def load_texts(path: str | Path, *, max_records: int | None = None) -> list[TextRecord]:
    """Read documents from a ``.jsonl`` or ``.txt`` file (see the module docstring for the formats).

    ``max_records`` keeps the first N documents and stops parsing there (lines after the N-th document are
    not checked, so a bad line late in a big file does not block a run that uses only its start). Raises ``UserError`` for any bad input.
    """
    if max_records is not None and (isinstance(max_records, bool) or not isinstance(max_records, int)
                                    or max_records < 1):
        raise UserError(f"max_records must be a positive integer, got {max_records!r}")
    path = Path(path)
    suffix = path.suffix.lower()
    text = _read(path)
    parsed = _parse_jsonl(path, text) if suffix in JSONL_SUFFIXES else _parse_txt(text)  # _read checked suffix
    records = list(_take(parsed, max_records))
    if not records:
        raise UserError(f"{path}: no documents (the file is empty or only blank lines)")
    return records


def domains_of(records: Sequence[TextRecord]) -> list[str] | None:
    """Each record's domain, aligned with ``records`` — or None when no record has one.

    Metrics that compare routing with domains need a domain for every token, so a file where only some records
    carry one is an error rather than a silently smaller sample.
    """
    domains = [r.domain for r in records]
    missing = sum(d is None for d in domains)
    if missing == len(domains):
        return None
    if missing:
        raise UserError(
            f"{len(domains) - missing} of {len(domains)} records have a 'domain' and {missing} do not; "
            "give every record a domain or none"
        )
    return [d for d in domains if d is not None]


# --------------------------------------------------------------------------------------------------------------


def _read(path: Path) -> str:
    """The file's text, with every OS-level failure turned into one line naming the file."""
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except PermissionError:  # a parent folder we may not enter
        raise UserError(f"{path}: permission denied") from None
    if not exists:
        raise UserError(f"{path}: no such file")
    if is_dir:
        raise UserError(f"{path}: is a directory; expected a .jsonl or .txt file")
    if path.suffix.lower() not in JSONL_SUFFIXES + TEXT_SUFFIXES:
        raise UserError(
            f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; expected .jsonl (one JSON object "
            "with a 'text' field per line) or .txt (documents separated by blank lines)"
        )
    try:
        data = path.read_bytes()
    except PermissionError:
        raise UserError(f"{path}: permission denied") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte offset {exc.start})") from None


def _take(records: Iterator[TextRecord], limit: int | None) -> Iterator[TextRecord]:
    if limit is None:
        yield from records
        return
    for count, record in enumerate(records, start=1):
        yield record
        if count >= limit:
            return  # do not parse (or fail on) anything after the last record kept


def _parse_jsonl(path: Path, text: str) -> Iterator[TextRecord]:
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028, \x0c... that splitlines() cuts at.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{number}: expected a JSON object with a 'text' field, got {_kind(obj)}")
        if "text" not in obj:
            raise UserError(f"{path}:{number}: missing the 'text' field")
        value = obj["text"]
        if not isinstance(value, str):
            raise UserError(f"{path}:{number}: 'text' must be a string, got {_kind(value)}")
        if not value.strip():
            raise UserError(f"{path}:{number}: 'text' is empty")
        domain = obj.get("domain")
        if domain is not None and not isinstance(domain, str):
            raise UserError(f"{path}:{number}: 'domain' must be a string, got {_kind(domain)}")
        yield TextRecord(value, domain)


def _parse_txt(text: str) -> Iterator[TextRecord]:
    paragraph: list[str] = []
    for line in text.splitlines():
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield TextRecord("\n".join(paragraph))
            paragraph = []
    if paragraph:
        yield TextRecord("\n".join(paragraph))


def _kind(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)
