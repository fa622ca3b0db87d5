"""Offline pretraining corpora for the embedded default model (docs/default-model.md).

Three text sets, written as JSONL (``{"text": ...}``) under OUT, each with a held-out split (every 50th
document by a stable hash of its name):

* ``prose``  Python's documentation: the reStructuredText sources in Debian's ``python3.11-doc``
             (/usr/share/doc/python3.11/html/_sources; its HTML pages as text if those are missing) when
             installed (``apt-get install python3.11-doc``), else the standard library's docstrings.
* ``code``   the standard library's own ``.py`` source (tests and vendored packages left out), split into
             chunks of top-level definitions so short rows are not mostly padding.
* ``long``   whole standard-library modules of 4-32 KB, for the long-context stage.

Both sources are PSF-licensed and present on any Debian machine with Python 3.11.

    python scripts/default_corpora.py --out build/default/corpora
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import html.parser
import json
import re
import sys
import sysconfig
from pathlib import Path

DOC_HTML = Path("/usr/share/doc/python3.11/html")
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "ensurepip", "turtledemo",
             "__pycache__", "tkinter", "pydoc_data", "encodings", "config-3.11-x86_64-linux-gnu"}


def held_out(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 50 == 0


class _TextOf(html.parser.HTMLParser):
    """The readable text of a Sphinx page's main body (navigation, scripts and styles dropped)."""

    SKIP = {"script", "style", "nav", "head"}
    BLOCK = {"p", "div", "li", "pre", "h1", "h2", "h3", "h4", "dt", "dd", "tr", "section", "blockquote"}

    def __init__(self):
        super().__init__()
        self.parts: list[str] = []
        self.skip = 0
        self.in_body = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in self.SKIP:
            self.skip += 1
        if attrs.get("role") == "main" or attrs.get("class") == "body":
            self.in_body = True
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skip:
            self.skip -= 1
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip and self.in_body:
            self.parts.append(data)

    def text(self) -> str:
        text = "".join(self.parts).replace("\u00b6", "")
        text = re.sub(r"[ \t]+\n", "\n", text)
        return re.sub(r"\n{3,}", "\n\n", text).strip()


def prose_documents() -> list[tuple[str, str]]:
    docs = []
    sources = DOC_HTML / "_sources"  # the reStructuredText each page is built from: already plain text
    if sources.is_dir():
        for path in sorted(sources.rglob("*.txt")):
            if "c-api" in path.parts or "whatsnew" in path.parts:
                continue
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            if len(text) > 200:
                docs.append((str(path.relative_to(sources)), text))
        if docs:
            return docs
    if DOC_HTML.is_dir():
        for path in sorted(DOC_HTML.rglob("*.html")):
            if any(part in ("_static", "genindex", "c-api") for part in path.parts) or path.name.startswith("genindex"):
                continue
            parser = _TextOf()
            parser.feed(path.read_text(encoding="utf-8", errors="replace"))
            text = parser.text()
            if len(text) > 200:
                docs.append((str(path.relative_to(DOC_HTML)), text))
        if docs:
            return docs
    print("python3.11-doc not installed: using the standard library's docstrings as prose", file=sys.stderr)
    for path in stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        strings = [ast.get_docstring(node) for node in ast.walk(tree)
                   if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))]
        text = "\n\n".join(s for s in strings if s and len(s) > 40)
        if len(text) > 200:
            docs.append((str(path), text))
    return docs


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1])
                  and not p.name.startswith("test_"))


def code_chunks(text: str, target: int = 3000) -> list[str]:
    """Split a module at top-level ``def``/``class``/decorator lines into chunks of about ``target`` chars."""
    pieces, current = [], []
    size = 0
    for line in text.splitlines(keepends=True):
        if size >= target and re.match(r"(def |class |@|async def )", line):
            pieces.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        pieces.append("".join(current))
    return [p for p in pieces if p.strip()]


def write(out: Path, name: str, docs: list[tuple[str, str]]) -> None:
    counts = {}
    for split in ("train", "heldout"):
        rows = [text for key, text in docs if held_out(key) == (split == "heldout")]
        with open(out / f"{name}-{split}.jsonl", "w", encoding="utf-8") as handle:
            for text in rows:
                handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        counts[split] = (len(rows), sum(map(len, rows)))
    print(f"{name}: train {counts['train'][0]} docs / {counts['train'][1] / 1e6:.1f} MB, "
          f"held out {counts['heldout'][0]} docs / {counts['heldout'][1] / 1e6:.2f} MB", file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="build/default/corpora")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write(out, "prose", prose_documents())
    code, long = [], []
    for path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for i, chunk in enumerate(code_chunks(text)):
            code.append((f"{path}#{i}", chunk))
        if 4_000 <= len(text) <= 32_000:
            long.append((str(path), text))
    write(out, "code", code)
    write(out, "long", long)
    return 0


if __name__ == "__main__":
    sys.exit(main())
