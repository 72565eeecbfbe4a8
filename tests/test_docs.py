"""The README and the pages under docs/: the README stays short and its commands are
real (the make targets, the `omni-tasks` subcommands), and every relative link in them
leads to a file that exists and, for a page, to a heading it has."""

from __future__ import annotations

import re
from pathlib import Path

import omni_tasks
from omni_tasks.cli.parser import build_parser

ROOT = Path(omni_tasks.__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def test_the_readme_is_short_and_opens_with_the_essentials() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 400
    first_screen = "\n".join(text.splitlines()[:60])
    for needed in ("make demo", "make test", "docs/glossary.md", "celery -A omni_tasks worker"):
        assert needed in first_screen, needed


def test_the_readme_commands_exist() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in re.findall(r"\bmake ([a-z-]+)", README.read_text(encoding="utf-8")):
        assert re.search(rf"^{target}:", makefile, re.M), f"make {target}"
    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    used = set(re.findall(r"`omni-tasks ([a-z]+)", README.read_text(encoding="utf-8")))
    assert used and used <= set(subcommands), used - set(subcommands)


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in [README, *PAGES]:
        for target in LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, fragment = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target}")
            elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_the_reference_pages_exist() -> None:
    names = {page.stem for page in PAGES}
    wanted = {"glossary", "api", "models", "video", "speech", "scheduling", "caching"}
    wanted |= {"operations", "reliability", "security", "wire", "configuration"}
    assert wanted <= names, wanted - names


def test_every_path_named_exists() -> None:
    """A file or folder of the repository named in backticks (`workers/runtime.py`,
    `tests/integration/`, `omni_tasks/coordination/scripts/*.lua`) is there."""
    named = re.compile(r"`((?:omni_tasks|workers|tests|bench|config|deploy|scripts)/[\w./*-]*)")
    missing = []
    for page in [README, *PAGES]:
        for path in set(named.findall(page.read_text(encoding="utf-8"))):
            path = path.split(":")[0].rstrip(".")
            if not any(ROOT.glob(path)) and not (ROOT / path).exists():
                missing.append(f"{page.name}: {path}")
    assert not missing, missing
