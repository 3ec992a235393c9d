"""Every document and file the repository's text points at exists in the repository.

Scanned: the tracked (and new, not ignored) text files. Checked: relative link targets in Markdown
and notebooks (``[text](path)``, anchors stripped) and any mention of a ``*.md`` path in any text
file, relative to the file or to the repository root.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT_SUFFIXES = {".md", ".py", ".yaml", ".yml", ".toml", ".j2", ".ipynb", ".sh", ".txt", ".cfg", ""}
LINK = re.compile(r"\]\(([^)\s]+)\)")
MD_MENTION = re.compile(r"(?<![\w/.:-])((?:\.\./|\./)?[\w/.-]*\w\.md)\b")


def text_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    this = Path(__file__).resolve()  # its examples point nowhere on purpose
    paths = [ROOT / name for name in listed if Path(name).suffix in TEXT_SUFFIXES]
    return [path for path in paths if path.is_file() and path.resolve() != this]


def references(text: str, markdown: bool) -> set[str]:
    found = {target.split("#")[0] for target in LINK.findall(text)} if markdown else set()
    found |= set(MD_MENTION.findall(text))
    return {ref for ref in found if ref and "://" not in ref and not ref.startswith(("mailto:", "#", "<", "$"))}


def missing_references(files: list[Path], root: Path) -> list[str]:
    """One line per reference that resolves to nothing."""
    missing = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for ref in sorted(references(text, markdown=path.suffix in (".md", ".ipynb"))):
            candidates = [(path.parent / ref).resolve(), (root / ref).resolve()]
            if any(c.exists() for c in candidates):
                continue
            missing.append(f"{path.relative_to(root)} refers to {ref}, which the repository lacks")
    return missing


def test_the_scan_finds_links_and_md_mentions_that_point_nowhere(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "design.md").write_text("# design\n")
    page = tmp_path / "README.md"
    page.write_text(
        "See [the design](docs/design.md#layering), [notes](docs/notes.md) and https://example.org/x.md;\n"
        "formulas as in DESIGN.md section 3; `docs/design.md` exists.\n"
    )
    assert missing_references([page], tmp_path) == [
        "README.md refers to DESIGN.md, which the repository lacks",
        "README.md refers to docs/notes.md, which the repository lacks",
    ]




def test_nothing_in_the_repository_refers_to_a_file_it_lacks() -> None:
    files = text_files()
    assert any(p.name == "design.md" for p in files) and len(files) > 50
    assert missing_references(files, ROOT) == []
