#!/usr/bin/env python
"""Build the real-text corpora that ship with spectra-convert and that the tests use.

Why real text: routing balance and specialisation are properties of *text*, so measuring them on invented
sentences says nothing. Everything here comes from files that already sit on a Debian machine with Python:

* ``code``      — Python standard-library sources (the running interpreter's stdlib),
* ``docs``      — man pages under /usr/share/man, rendered to plain text (groff, else a small troff stripper),
* ``legal``     — Debian ``copyright`` files under /usr/share/doc/*/copyright,
* ``changelog`` — Debian changelogs (/usr/share/doc/*/changelog.Debian.gz): the *unseen* domain that no
  calibration or training split contains, so validate can report balance on a domain calibration never saw.

Every document is 600-2000 characters cut at line boundaries. Each source file goes to exactly one split, and
identical source files (symlinked or copied docs of sibling packages) count once, so held-out text is never a
copy of calibration text. Sources are drawn round-robin over *families* (stdlib package, man page name prefix,
package name prefix) so that e.g. the 16k ``gcloud-*`` man pages do not crowd out everything else.

Outputs (relative to ``--out-root``; written atomically, never overwritten without ``--force``):

* ``spectra_convert/data/calibration.jsonl`` — the default calibration corpus (package data),
* ``tests/fixtures/corpus/{train,heldout,unseen,mixed_eval}.jsonl`` and ``manifest.json`` (hashes and a
  fingerprint of the source files seen, so a test can tell "same machine, must reproduce byte-for-byte" from
  "different machine, different corpus").

With ``--training-out FILE --training-docs N`` it writes only FILE instead: N more documents per seen domain,
drawn after the committed splits from source files none of them used (so it never repeats calibration, held-out
or unseen text) -- a larger training set for fine-tuning runs that would overfit the 41k calibration tokens
(``bench/carve.py --train-data``). Not committed: build it where it is needed.

Usage: ``python scripts/build_corpus.py [--out-root .] [--seed 0] [--force]``
       ``python scripts/build_corpus.py --training-out /tmp/train_large.jsonl --training-docs 400``
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MIN_CHARS, MAX_CHARS = 600, 2000
#: Preferred document length: cut at the next paragraph break after this many characters.
SOFT_CHARS = 1100
SEEN_DOMAINS = ("code", "docs", "legal")
UNSEEN_DOMAIN = "changelog"
#: Documents per seen domain in each split (calibration 3 x 40 = 120, train 150, heldout 45).
SPLIT_QUOTAS = {"calibration": 40, "train": 50, "heldout": 15}
UNSEEN_DOCS = 30
#: At most this many documents come from one source file (more sources = more variety).
DOCS_PER_SOURCE = {"code": 2, "docs": 2, "legal": 1, "changelog": 1}

CALIBRATION_PATH = Path("spectra_convert/data/calibration.jsonl")
#: Key of the optional extra training split in ``build``'s files (written to ``--training-out``).
TRAINING_SPLIT = Path("training")
FIXTURE_DIR = Path("tests/fixtures/corpus")

_STDLIB_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "encodings", "turtledemo",
                     "lib2to3", "__pycache__", "ensurepip", "pydoc_data", "lib-dynload", "__phello__"}


@dataclass(frozen=True)
class Source:
    domain: str
    family: str  # sources are drawn round-robin over families, for variety
    path: Path


# ------------------------------------------------------------------------------------------------------------
# Finding sources
# ------------------------------------------------------------------------------------------------------------


def _family(name: str) -> str:
    return re.split(r"[-_.0-9]", name, maxsplit=1)[0] or name


def stdlib_sources() -> list[Source]:
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _STDLIB_SKIP_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if path.is_symlink() or not path.is_file() or path.stat().st_size < 3000:
            continue
        family = rel.parts[0] if len(rel.parts) > 1 else _family(rel.stem.lstrip("_"))
        found.append(Source("code", family, path))
    return found


def man_sources() -> list[Source]:
    """English man pages (sections 1-8), regular files only: symlinks are aliases of pages already listed."""
    found = []
    for section in sorted(Path("/usr/share/man").glob("man[1-8]")):
        for path in sorted(section.iterdir()):
            if path.is_symlink() or not path.is_file() or path.stat().st_size < 400:
                continue
            found.append(Source("docs", _family(path.name), path))
    return found


def doc_sources(filename: str, domain: str) -> list[Source]:
    found = []
    seen = set()
    for pkg in sorted(Path("/usr/share/doc").iterdir()):
        path = pkg / filename
        if not path.is_file():
            continue
        real = path.resolve()
        if real in seen:
            continue
        seen.add(real)
        found.append(Source(domain, _family(pkg.name.removeprefix("lib")), real))
    return found


def all_sources() -> dict[str, list[Source]]:
    return {
        "code": stdlib_sources(),
        "docs": man_sources(),
        "legal": doc_sources("copyright", "legal"),
        UNSEEN_DOMAIN: doc_sources("changelog.Debian.gz", UNSEEN_DOMAIN),
    }


def fingerprint(sources: list[Source]) -> str:
    """Hash of the candidate list (paths and sizes): equal fingerprints mean the build sees the same inputs."""
    digest = hashlib.sha256()
    for source in sources:
        digest.update(f"{source.path}\t{source.path.stat().st_size}\n".encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------------------
# Reading sources as plain text
# ------------------------------------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def groff_version() -> str | None:
    if shutil.which("groff") is None:
        return None
    out = subprocess.run(["groff", "-v"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0].strip() if out else "groff"


def render_man(raw: bytes) -> str | None:
    """Man page source -> readable text. groff when installed, else a regex stripper (fewer niceties)."""
    if raw.lstrip().startswith(b".so "):
        return None  # a redirect to another page
    if shutil.which("groff") is not None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
        proc = subprocess.run(["groff", "-k", "-t", "-mandoc", "-Tutf8", "-P-cbou", "-rHY=0"], input=raw,
                              capture_output=True, env=env, timeout=30, check=False)
        if proc.returncode != 0:
            return None
        text = proc.stdout.decode("utf-8", errors="strict")
        lines = text.splitlines()
        nonblank = [i for i, line in enumerate(lines) if line.strip()]
        if len(nonblank) < 3:
            return None
        # Drop the running header (NAME(1) ... NAME(1)) and footer (version, date) lines.
        return "\n".join(lines[nonblank[0] + 1 : nonblank[-1]])
    return strip_troff(raw.decode("utf-8"))


_TROFF_ESCAPES = [(re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""), (re.compile(r"\\\(em"), "—"),
                  (re.compile(r"\\\((aq|cq)"), "'"), (re.compile(r"\\\((lq|rq|dq)"), '"'), (re.compile(r"\\-"), "-"),
                  (re.compile(r"\\e"), "\\"), (re.compile(r"\\&|\\c|\\:"), ""), (re.compile(r"\\\(.."), ""),
                  (re.compile(r"\\s[-+]?\d"), ""), (re.compile(r"\\ "), " ")]


def strip_troff(source: str) -> str:
    """Minimal troff -> text for machines without groff: keep text lines and section titles, drop macros."""
    out = []
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith("."):
            macro, _, rest = line[1:].partition(" ")
            if macro in ("SH", "SS"):
                out.extend(["", rest.strip('"').upper() if macro == "SH" else rest.strip('"')])
            elif macro in ("B", "I", "BR", "IR", "RB", "BI", "IB", "RI", "Nm", "Ar", "Fl", "Pa"):
                out.append(rest.replace('"', ""))
            elif macro in ("PP", "LP", "P", "sp", "Pp", "TP", "IP"):
                out.append("")
            continue
        for pattern, repl in _TROFF_ESCAPES:
            line = pattern.sub(repl, line)
        out.append(line)
    return "\n".join(out)


def read_text(source: Source) -> str | None:
    """The source as text, or None when it is not usable text (undecodable, a man redirect...)."""
    try:
        raw = _read_bytes(source.path)
        if source.domain == "docs":
            text = render_man(raw)
        else:
            text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, subprocess.SubprocessError, gzip.BadGzipFile):
        return None
    if text is None:
        return None
    return "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n"))


# ------------------------------------------------------------------------------------------------------------
# Cutting documents
# ------------------------------------------------------------------------------------------------------------


def chunks(text: str) -> list[str]:
    """Consecutive documents of MIN..MAX characters, cut at line boundaries, preferring paragraph breaks.

    A document ends at the first blank line after SOFT_CHARS characters, or before the line that would take it
    past MAX_CHARS. Too-short tails are dropped; a single over-long line starts a new document.
    """
    out: list[str] = []
    current: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal current, size
        doc = "\n".join(current).strip("\n")
        if MIN_CHARS <= len(doc) <= MAX_CHARS and _looks_like_text(doc):
            out.append(doc)
        current, size = [], 0

    for line in text.split("\n"):
        if len(line) > MAX_CHARS:
            flush()
            continue
        if not current and not line.strip():
            continue  # documents never start with blank lines
        if size + len(line) + 1 > MAX_CHARS:
            flush()
            if not line.strip():
                continue
        if not line.strip() and size >= SOFT_CHARS:
            flush()
            continue
        current.append(line)
        size += len(line) + 1
    flush()
    return out


def _looks_like_text(doc: str) -> bool:
    """Reject data tables and binary-looking blocks: at least half the visible characters are letters."""
    visible = [c for c in doc if not c.isspace()]
    return bool(visible) and sum(c.isalpha() for c in visible) / len(visible) >= 0.5


# ------------------------------------------------------------------------------------------------------------
# Assigning sources to splits
# ------------------------------------------------------------------------------------------------------------


def round_robin(sources: list[Source], rng: random.Random) -> Iterator[Source]:
    """Sources in a seeded order that visits every family once before any family twice."""
    families: dict[str, list[Source]] = {}
    for source in sources:
        families.setdefault(source.family, []).append(source)
    names = sorted(families)
    rng.shuffle(names)
    for name in names:
        rng.shuffle(families[name])
    depth = 0
    while True:
        emitted = False
        for name in names:
            members = families[name]
            if depth < len(members):
                emitted = True
                yield members[depth]
        if not emitted:
            return
        depth += 1


def fill_splits(domain: str, sources: list[Source], quotas: dict[str, int], seed: int,
                seen_texts: set[str], *, at_most: frozenset = frozenset()) -> dict[str, list[dict[str, str]]]:
    """Fill each split's quota for one domain, every source file going to exactly one split (the splits named in
    ``at_most`` take what is left when the sources run out instead of failing)."""
    rng = random.Random(f"{seed}:{domain}")
    order = round_robin(sources, rng)
    splits: dict[str, list[dict[str, str]]] = {name: [] for name in quotas}
    for split, quota in quotas.items():
        docs = splits[split]
        while len(docs) < quota:
            source = next(order, None)
            if source is None:
                if split in at_most:
                    break
                raise SystemExit(f"error: ran out of {domain} sources filling {split} ({len(docs)}/{quota} documents)")
            text = read_text(source)
            if text is None:
                continue
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest in seen_texts:
                continue  # an identical file was already used (e.g. a sibling package's copyright)
            candidates = [c for c in chunks(text) if hashlib.sha256(c.encode()).hexdigest() not in seen_texts]
            if not candidates:
                continue
            seen_texts.add(digest)
            take = min(DOCS_PER_SOURCE[domain], quota - len(docs), len(candidates))
            picked = sorted(rng.sample(range(len(candidates)), take))
            for index in picked:
                seen_texts.add(hashlib.sha256(candidates[index].encode()).hexdigest())
                docs.append({"text": candidates[index], "domain": domain, "source": str(source.path)})
    return splits


def interleave(groups: list[list[dict[str, str]]]) -> list[dict[str, str]]:
    """Round-robin over domains, so the first N records of a file stay balanced (``max_records``)."""
    out = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def build(seed: int, training_docs: int = 0) -> tuple[dict[Path, list[dict[str, str]]], dict[str, object]]:
    """All output files (relative path -> records) and the manifest describing how they were made; with
    ``training_docs`` also the extra training split (key ``TRAINING_SPLIT``, filled last so the committed splits
    are the same with or without it)."""
    sources = all_sources()
    seen_texts: set[str] = set()
    quotas = {**SPLIT_QUOTAS, **({TRAINING_SPLIT: training_docs} if training_docs > 0 else {})}
    per_domain = {d: fill_splits(d, sources[d], quotas, seed, seen_texts, at_most=frozenset({TRAINING_SPLIT}))
                  for d in SEEN_DOMAINS}
    unseen = fill_splits(UNSEEN_DOMAIN, sources[UNSEEN_DOMAIN], {"unseen": UNSEEN_DOCS}, seed, seen_texts)["unseen"]
    split = {name: interleave([per_domain[d][name] for d in SEEN_DOMAINS]) for name in SPLIT_QUOTAS}
    files = {
        CALIBRATION_PATH: split["calibration"],
        FIXTURE_DIR / "train.jsonl": split["train"],
        FIXTURE_DIR / "heldout.jsonl": split["heldout"],
        FIXTURE_DIR / "unseen.jsonl": unseen,
        FIXTURE_DIR / "mixed_eval.jsonl": split["heldout"] + unseen,
    }
    if training_docs > 0:
        files[TRAINING_SPLIT] = interleave([per_domain[d][TRAINING_SPLIT] for d in SEEN_DOMAINS])
    manifest = {
        "seed": seed,
        "python": ".".join(map(str, sys.version_info[:3])),
        "man_renderer": groff_version() or "regex troff stripper",
        "source_fingerprints": {domain: fingerprint(found) for domain, found in sorted(sources.items())},
        "files": {str(path): {"records": len(recs), "sha256": hashlib.sha256(to_jsonl(recs)).hexdigest()}
                  for path, recs in files.items()},
    }
    return files, manifest


def to_jsonl(records: list[dict[str, str]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


OUTPUTS = (CALIBRATION_PATH, *(FIXTURE_DIR / f"{n}.jsonl" for n in ("train", "heldout", "unseen", "mixed_eval")),
           FIXTURE_DIR / "manifest.json")


def refuse_overwrite(out_root: Path, outputs: list[Path], force: bool) -> None:
    existing = [p for p in outputs if (out_root / p).exists()]
    if existing and not force:
        raise SystemExit(f"error: {out_root / existing[0]} exists ({len(existing)} of the outputs exist); "
                         "pass --force to rebuild")


def write_outputs(out_root: Path, files: dict[Path, list[dict[str, str]]], manifest: dict[str, object],
                  force: bool) -> None:
    """Write every file to a temp dir first, then move them into place (no half-written corpus)."""
    payloads = {path: to_jsonl(recs) for path, recs in files.items()}
    payloads[FIXTURE_DIR / "manifest.json"] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    refuse_overwrite(out_root, list(payloads), force)
    out_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_root, prefix=".build_corpus-") as tmp:
        for rel, data in payloads.items():
            staged = Path(tmp) / rel.name
            staged.write_bytes(data)
            (out_root / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, out_root / rel)


def write_training_split(out: Path, docs: int, seed: int, force: bool) -> int:
    """``--training-out``: the extra training split alone, written atomically (temp file + rename)."""
    if docs < 1:
        raise SystemExit(f"error: --training-docs must be >= 1, got {docs}")
    if out.exists() and not force:
        raise SystemExit(f"error: {out} exists; pass --force to rebuild")
    records = build(seed, training_docs=docs)[0][TRAINING_SPLIT]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}-", delete=False) as staged:
        staged.write(to_jsonl(records))
    os.replace(staged.name, out)
    counts = {d: sum(r["domain"] == d for r in records) for d in SEEN_DOMAINS}
    chars = sum(len(r["text"]) for r in records)
    print(f"{out}: {len(records)} documents ({', '.join(f'{d} {n}' for d, n in counts.items())}), {chars:,} characters")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-root", type=Path, default=Path("."), help="repository root to write into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="overwrite existing corpus files")
    parser.add_argument("--training-out", type=Path, default=None,
                        help="write only an extra training split here (not the committed corpus files)")
    parser.add_argument("--training-docs", type=int, default=400, help="documents per seen domain for --training-out")
    args = parser.parse_args(argv)

    if args.training_out is not None:
        return write_training_split(args.training_out, args.training_docs, args.seed, args.force)
    refuse_overwrite(args.out_root, list(OUTPUTS), args.force)  # before spending time on the build
    files, manifest = build(args.seed)
    write_outputs(args.out_root, files, manifest, args.force)

    from spectra_convert.console import human_bytes, summary_table

    rows = []
    for path, recs in files.items():
        counts = {}
        for rec in recs:
            counts[rec["domain"]] = counts.get(rec["domain"], 0) + 1
        lengths = [len(r["text"]) for r in recs]
        rows.append((path.name, len(recs), ", ".join(f"{d} {n}" for d, n in counts.items()),
                     len({r["source"] for r in recs}), f"{min(lengths)}-{max(lengths)}",
                     human_bytes((args.out_root / path).stat().st_size)))
    summary_table(f"Real-text corpus (seed {args.seed}, man pages via {manifest['man_renderer']})",
                  ["file", "docs", "domains", "sources", "chars/doc", "size"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
