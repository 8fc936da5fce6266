"""The documents: README size and first commands, no dead relative link or anchor (anchors computed as GitHub does),
docs/cli.md equal to what the --help code generates, CITATION.cff well-formed, LICENSE as declared, --version."""

from __future__ import annotations

import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md")])


# ---------------------------------------------------------------------------------------------- GitHub anchors


def _strip_code(text: str, inline: bool = True) -> str:
    """``text`` without fenced code blocks (their lines blanked, so line numbers stay) and, with ``inline``, without
    inline code spans."""
    out, fence = [], None
    for line in text.splitlines():
        m = re.match(r"^\s*(```+|~~~+)", line)
        if fence is None and m:
            fence = m.group(1)[:3]
            out.append("")
            continue
        if fence is not None:
            if line.strip().startswith(fence):
                fence = None
            out.append("")
            continue
        out.append(re.sub(r"(`+)(.+?)\1", "", line) if inline else line)
    return "\n".join(out)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: markup dropped (code ticks, emphasis, link targets), lower case,
    every character that is not a letter, digit, space, hyphen or underscore removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a markdown file defines: its headings (duplicates get -1, -2, ... as on GitHub) and explicit
    ``<a name=...>`` / ``id=...`` attributes."""
    text = path.read_text(encoding="utf-8")
    out: set[str] = set()
    seen: dict[str, int] = {}
    for line in _strip_code(text, inline=False).splitlines():  # a heading's code text is in its anchor
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = github_slug(m.group(2))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    out |= set(re.findall(r"""<a\s+(?:name|id)=["']([^"']+)["']""", text))
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """``(line, target)`` of every inline link and image outside code."""
    found = []
    for no, line in enumerate(_strip_code(path.read_text(encoding="utf-8")).splitlines(), 1):
        for target in re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", line):
            found.append((no, target))
    return found


def test_github_slug() -> None:
    assert github_slug("The CPU demo: what `scripts/demo.sh` runs, and why these numbers") == \
        "the-cpu-demo-what-scriptsdemosh-runs-and-why-these-numbers"
    assert github_slug("Is the learnt metric's gain a scale effect?") == "is-the-learnt-metrics-gain-a-scale-effect"
    assert github_slug("Registering at 128^3: learnsim-register and its peers") == \
        "registering-at-1283-learnsim-register-and-its-peers"
    assert github_slug("One q_v iteration against the original pipeline") == \
        "one-q_v-iteration-against-the-original-pipeline"
    assert github_slug("Multi-GPU and clusters") == "multi-gpu-and-clusters"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_dead_relative_link_or_anchor(doc: Path) -> None:
    if not doc.exists():
        pytest.skip(f"{doc.name} not written")
    dead = []
    for no, target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            dead.append(f"{doc.name}:{no}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            dead.append(f"{doc.name}:{no}: {target} (no heading #{anchor} in {dest.name})")
    assert not dead, "\n".join(dead)


def test_link_checker_finds_dead_links(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Title\n\n## Some `code`: here\n\n[ok](#some-code-here) [bad](#nowhere)\n"
                                   "```\n[in code](missing.md)\n```\n[file](b.md#x) [gone](c.md)\n")
    (tmp_path / "b.md").write_text("# B\n\n<a name=\"x\"></a>\n")
    assert [t for _, t in links(tmp_path / "a.md")] == ["#some-code-here", "#nowhere", "b.md#x", "c.md"]
    assert "some-code-here" in anchors(tmp_path / "a.md") and "x" in anchors(tmp_path / "b.md")
    assert "nowhere" not in anchors(tmp_path / "a.md")


# ---------------------------------------------------------------------------------------------- README


def test_readme_is_short_and_starts_with_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, len(lines)
    assert lines[0] == "# learnsim"
    assert lines[2:8] == [
        "```bash",
        "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e . && bash scripts/demo.sh",
        "```",
        "```bash",
        'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e ".[dev]" && python -m pytest -q',
        "```",
    ]


# ---------------------------------------------------------------------------------------------- docs/cli.md


def test_cli_md_is_generated_from_the_help_pages(monkeypatch) -> None:
    for var in ("LEARNSIM_ROOT", "LEARNSIM_CONF", "COLUMNS"):  # the pages read these
        monkeypatch.delenv(var, raising=False)
    from learnsim.cli.cli_doc import render_markdown

    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert committed == render_markdown(), "docs/cli.md is out of date: python -m learnsim.cli.cli_doc > docs/cli.md"


def test_cli_md_holds_every_help_page_and_key(monkeypatch) -> None:
    monkeypatch.delenv("LEARNSIM_ROOT", raising=False)
    monkeypatch.setenv("COLUMNS", "112")
    from learnsim.cli import register, test, train
    from learnsim.cli.config import config_dir

    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    conf = str(Path(config_dir()))
    assert train.help_text().replace(conf, "src/learnsim/conf") in text
    assert test.help_text().replace(conf, "src/learnsim/conf") in text
    assert register._parser().format_help() in text
    for name in ("learnsim-data demo", "learnsim-data ukbb", "learnsim-data validate", "learnsim-compare"):
        assert f"\n## {name}\n" in text
    for key in ("q_v.no_iters" , "sobolev", "reg_loss", "no_samples_uncertainty"):
        assert key.split(".")[-1] + ":" in text, key


def test_cli_doc_check_reports_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "cli.md"
    stale.write_text("# old\n")
    out = subprocess.run([sys.executable, "-m", "learnsim.cli.cli_doc", "--check", str(stale)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "out of date" in out.stderr


# ---------------------------------------------------------------------------------------------- release files


def _cff() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))


def test_citation_cff_is_well_formed() -> None:
    """The keys CFF 1.2.0 requires, their types, the package version and the paper as the preferred citation
    (the full schema check: ``cffconvert --validate``, run at release)."""
    from learnsim import __version__

    cff = _cff()
    assert cff["cff-version"] == "1.2.0"
    for key in ("message", "title", "authors"):
        assert cff.get(key), key
    assert cff["type"] == "software" and cff["license"] == "MIT" and str(cff["version"]) == __version__
    for person in cff["authors"] + cff["preferred-citation"]["authors"]:
        assert person.get("family-names") or person.get("name"), person
        assert set(person) <= {"family-names", "given-names", "name", "name-particle", "affiliation", "orcid",
                               "email", "website", "alias"}, person
    paper = cff["preferred-citation"]
    assert paper["type"] == "conference-paper" and paper["year"] == 2022
    assert paper["start"] == 119 and paper["end"] == 128
    assert "similarity learning" in paper["title"] and "CVPR" in paper["collection-title"] + paper["conference"]["name"]
    names = [a["family-names"] for a in paper["authors"]]
    assert names == ["Grzech", "Azampour", "Glocker", "Schnabel", "Navab", "Kainz", "Le Folgoc"]


def test_license_is_the_declared_mit() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in text
    assert re.search(r'^license = "MIT"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)


def test_changelog_names_the_current_version() -> None:
    from learnsim import __version__

    assert f"## [{__version__}]" in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")


def test_register_prints_the_version() -> None:
    from learnsim import __version__

    out = subprocess.run([sys.executable, "-m", "learnsim.cli.register", "--version"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["learnsim-register", __version__], out


def test_the_version_goes_into_the_run_config() -> None:
    from learnsim import __version__
    from learnsim.cli.help import with_version

    assert with_version(["+experiment=demo"]) == ["+experiment=demo", f"+learnsim_version='{__version__}'"]
    assert with_version(["+learnsim_version='x'"]) == ["+learnsim_version='x'"]  # a DDP child keeps its parent's
