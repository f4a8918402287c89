"""The README and the docs match the code: links resolve, the index lists every page, the README's
command table is the command line's, its examples run, and benchmarks/README.md names every file."""
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "benchmarks" / "README.md",
         *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _links(page: Path):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)   # not inside code blocks
    text = re.sub(r"`[^`\n]*`", "", text)                            # nor inline code
    return [m for m in LINK.findall(text) if not m.startswith(("http://", "https://", "mailto:"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    missing = [link for link in _links(page) if not (page.parent / link).exists()]
    assert not missing, f"{page.relative_to(ROOT)}: links to missing files {missing}"


def test_index_lists_every_page():
    linked = {(ROOT / "docs" / link).resolve() for link in _links(ROOT / "docs" / "index.md")}
    pages = {p.resolve() for p in (ROOT / "docs").glob("*.md") if p.name != "index.md"}
    assert not pages - linked, f"docs/index.md does not link {sorted(p.name for p in pages - linked)}"


def test_readme_is_a_newcomers_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines"
    block = lines[lines.index("```") + 1:lines.index("```", lines.index("```") + 1)]
    assert [ln.split()[:3] for ln in block] == [["bash", "dev.sh", "demo"], ["bash", "dev.sh", "test"]]


def _commands() -> set:
    """The command line's sub-commands ("bench" too, which is left out where its import fails)."""
    from w4a16.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return set(sub.choices) | {"bench"}


def test_readme_command_table_is_the_command_line():
    listed = set(re.findall(r"^\| `w4a16 ([a-z-]+)`", (ROOT / "README.md").read_text(), flags=re.M))
    assert listed == _commands(), (listed, _commands())


def test_guide_command_table_is_the_command_line():
    listed = set(re.findall(r"^\| `w4a16 ([a-z-]+)", (ROOT / "docs" / "guide.md").read_text(), flags=re.M))
    assert _commands() <= listed, _commands() - listed


def test_readme_examples_run(tmp_path, monkeypatch, capsys):
    """The README's Python blocks, in order, in one namespace (on the CPU through the interpreter)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for code in blocks:
        exec(compile(code, "README.md", "exec"), scope)   # noqa: S102 (our own README)
    out = capsys.readouterr().out
    err = float(out.split("rel. error:")[1].split()[0])
    assert err < 1e-2 and tuple(scope["y"].shape) == (4, 512)
    assert os.path.getsize(tmp_path / "model.safetensors") > 0


def test_benchmarks_readme_names_every_file():
    text = (ROOT / "benchmarks" / "README.md").read_text()
    files = [p.name for p in (ROOT / "benchmarks").iterdir() if p.suffix in (".py", ".sh")]
    assert files and all(f"`{name}`" in text for name in files), [n for n in files if f"`{n}`" not in text]
