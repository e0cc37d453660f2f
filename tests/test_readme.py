"""The docs stay true to the code and to themselves: the environment and layout tables of
docs/architecture.md against the code, every relative link and image of README.md and docs/*.md
against the files and headings it names, and the README short enough to read on one page."""

from __future__ import annotations

import re
from pathlib import Path

from conversion.config import ENV_VARS, FAL_RUNNER_ENV, ConversionConfig
from serving.settings import PROFILE_ENV

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section of ``text``, up to the next ``## `` heading."""
    marker = f"\n## {heading}\n"
    assert marker in text, f"no '## {heading}' section"
    return text.split(marker, 1)[1].split("\n## ", 1)[0]


def _env_rows() -> dict[str, tuple[str, str]]:
    section = _section(ARCHITECTURE, "Environment variables")
    # Names are upper case, but for fal's own NOMAD_ALLOC_PORT_grpc (conversion.config.FAL_RUNNER_ENV).
    rows = re.findall(r"^\| `([A-Z][A-Za-z0-9_]+)` \| (.*) \| (.*) \|$", section, flags=re.MULTILINE)
    return {name: (meaning, default) for name, meaning, default in rows}


def _variables_read_in(package: str) -> set[str]:
    names: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        names |= set(re.findall(r'"((?:APP|MODEL_LOADER|HF)_[A-Z0-9_]+)"', path.read_text(encoding="utf-8")))
    return names


def test_the_environment_table_lists_exactly_the_variables_the_code_declares():
    declared = {PROFILE_ENV} | {v.name for v in ENV_VARS} | _variables_read_in("model_loader")
    assert set(_env_rows()) == declared


def test_the_environment_table_gives_the_conversion_defaults_of_the_code():
    rows, config = _env_rows(), ConversionConfig()
    for var in ENV_VARS:
        value = getattr(config, var.field)
        if var.name == FAL_RUNNER_ENV:  # fal sets it on its runners: no default, unset elsewhere
            assert rows[var.name][1].startswith("unset"), var.name
            continue
        if isinstance(value, bool | int | float) and not isinstance(value, str):
            assert rows[var.name][1] == f"`{int(value) if float(value).is_integer() else value}`", var.name
        elif isinstance(value, str):
            assert rows[var.name][1] == f"`{value}`", var.name


def test_the_layout_names_every_module_of_the_packages():
    layout = _section(ARCHITECTURE, "Layout")
    for package in ("conversion", "model_loader", "serving"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name in ("__init__.py", "__main__.py"):
                continue
            rel = path.relative_to(ROOT / package)
            named = (f"`{package}/{rel.as_posix()}`" in layout or f"`{rel.as_posix()}`" in layout
                     or f"`{package}/{rel.parent.as_posix()}/`" in layout and f"`{rel.name}`" in layout
                     or f"`{rel.name}`" in layout)
            assert named, f"docs/architecture.md's layout does not name {package}/{rel}"


def test_no_tracked_text_file_holds_a_merge_conflict_marker():
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    marker = re.compile(r"^(<{7} |>{7} |={7}$)", flags=re.MULTILINE)
    for name in tracked:
        if name.endswith((".md", ".py", ".toml", ".txt", ".json", ".cfg", "Makefile")):
            text = (ROOT / name).read_text(encoding="utf-8", errors="replace")
            assert not marker.search(text), f"{name} holds a merge conflict marker"


# --- links -----------------------------------------------------------------------------------------

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", flags=re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", flags=re.DOTALL)
_MD_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*)?\)")
_HTML_LINK = re.compile(r"<(?:img|a|source)\b[^>]*?\s(?:src|href|srcset)=[\"']([^\"']+)[\"']", flags=re.IGNORECASE)
_HTML_ANCHOR = re.compile(r"<[a-z]+\b[^>]*?\s(?:id|name)=[\"']([^\"']+)[\"']", flags=re.IGNORECASE)
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", flags=re.MULTILINE)


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and code spans: what GitHub renders as links and headings."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text lowercased, every character but letters,
    digits, spaces, hyphens and underscores dropped, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "").lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor of a Markdown file: its headings' slugs (a repeated one gets -1, -2, ... as on
    GitHub) and the ids and names of its HTML elements."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for heading in _HEADING.findall(_FENCE.sub("", text)):
        slug = github_slug(heading)
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found | set(_HTML_ANCHOR.findall(text))


def relative_links(text: str) -> list[str]:
    """The targets of the links and images of a Markdown file that point inside the repository."""
    prose = _prose(text)
    targets = _MD_LINK.findall(prose) + _HTML_LINK.findall(prose)
    return [t for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|//)", t, flags=re.IGNORECASE)]


def _broken(doc: Path) -> list[str]:
    problems = []
    for target in relative_links(doc.read_text(encoding="utf-8")):
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            problems.append(f"{target}: no such file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
            problems.append(f"{target}: {dest.relative_to(ROOT)} has no heading with the anchor #{anchor}")
    return problems


def test_github_slugs_follow_githubs_rules():
    assert github_slug("Warm start on the volume (`bench/startup.py --volume juicefs`)") == (
        "warm-start-on-the-volume-benchstartuppy---volume-juicefs")
    assert github_slug("How to read a pack from the mount (`bench/read_patterns.py`)") == (
        "how-to-read-a-pack-from-the-mount-benchread_patternspy")
    assert github_slug("The demo's checker") == "the-demos-checker"
    assert github_slug("`[deploy]`") == "deploy"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n## A\n<a id=\"here\"></a>\n") == {
        "a", "a-1", "a-2", "here"}


def test_link_checking_sees_every_kind_of_link_and_skips_code():
    text = ('[a](docs/a.md) ![b](docs/b.png "title") <img src="c.png" width="9"> [d](#e) '
            '[web](https://fal.ai) `[code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n')
    assert relative_links(text) == ["docs/a.md", "docs/b.png", "#e", "c.png"]


def test_every_relative_link_and_image_of_the_docs_points_at_a_file_and_heading_that_exist():
    problems = [f"{doc.relative_to(ROOT)}: {problem}" for doc in DOCS for problem in _broken(doc)]
    assert not problems, "dead links:\n" + "\n".join(problems)


def test_the_readme_links_every_page_of_docs():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in relative_links(README)}
    unlinked = [doc.name for doc in DOCS[1:] if doc.resolve() not in linked]
    assert not unlinked, f"README.md's 'More' list does not link {unlinked}"


def test_the_readme_fits_on_a_page_or_two():
    # Issue #24: what a new user needs, in about 150-200 lines; everything else lives in docs/.
    assert len(README.splitlines()) <= 200, "README.md has grown past 200 lines: move the detail to docs/"


def test_the_docs_speak_of_facts_not_of_the_machine_they_were_written_on():
    # Development machines belong in docs/BENCHMARKS.md and docs/gpu.md, beside their numbers.
    phrases = re.compile(r"this (?:2-core )?(?:vm|session|machine)\b|the benchmark vm|the issue's|from here\b"
                         r"|offers here|2-core vm", flags=re.IGNORECASE)
    found = [f"{doc.relative_to(ROOT)}: {m.group(0)!r}" for doc in DOCS
             if doc.name not in ("BENCHMARKS.md", "gpu.md") for m in phrases.finditer(doc.read_text(encoding="utf-8"))]
    assert not found, found
