"""Check the relative links of README.md and docs/*.md: every linked file exists and every
``#anchor`` names a heading of that file (GitHub's anchor rules). Run: ``python docs/check_links.py``."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def _prose(text: str) -> list[str]:
    """The lines of ``text``, those inside fenced code blocks blanked (so numbering stays the file's)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            lines.append("")
            continue
        lines.append("" if fenced else line)
    return lines


def anchors(path: Path) -> set[str]:
    """GitHub-style anchors of the file's headings (lowercase, punctuation dropped, spaces to
    hyphens, -1, -2 ... for repeats)."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(path.read_text(encoding="utf-8")):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # links keep their text
        text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def check(files: list[Path]) -> list[str]:
    errors = []
    for source in files:
        for number, line in enumerate(_prose(source.read_text(encoding="utf-8")), 1):
            line = re.sub(r"`[^`]*`", "", line)
            for target in LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, mailto: ...
                    continue
                file_part, _, anchor = target.partition("#")
                dest = (source.parent / file_part).resolve() if file_part else source
                where = f"{source.relative_to(ROOT)}:{number}: ({target})"
                if not dest.exists():
                    errors.append(f"{where}: no file {file_part}")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    errors.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    return errors


if __name__ == "__main__":
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    problems = check(files)
    links = sum(len(LINK.findall(re.sub(r"`[^`]*`", "", "\n".join(_prose(f.read_text())))))
                for f in files)
    for p in problems:
        print(p)
    print(f"{len(files)} files, {links} links, {len(problems)} broken")
    sys.exit(1 if problems else 0)
