"""The README stays a front door and the docs stay true to the config and the Makefile.

The strict site build (`make docs-build`) checks links between the pages of docs/; these check what
it cannot see: the README (outside docs/), config.toml and the Makefile.
"""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# 12 KiB: a pitch, a screenshot, two commands, a few figures and links. Everything else is in docs/.
README_MAX_BYTES = 12288


def test_readme_is_at_most_12_kib() -> None:
    size = README.stat().st_size
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes, over {README_MAX_BYTES}: move details to docs/ and link to them"
    )


def test_readme_relative_links_point_at_files() -> None:
    targets = re.findall(r"\]\(([^)\s]+)\)", README.read_text(encoding="utf-8"))
    local = [t.split("#", 1)[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    assert local, "expected links into docs/ in the README"
    missing = sorted({t for t in local if not (ROOT / t).exists()})
    assert not missing, f"README.md links to missing files: {missing}"


def _reference_sections() -> dict[str, str]:
    """docs/configuration.md split by its "## `[section]`" headings."""
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    parts = re.split(r"^## `\[(\w+)\]`.*$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_every_config_key_is_in_the_reference() -> None:
    config = tomllib.loads((ROOT / "config.toml").read_text(encoding="utf-8"))
    sections = _reference_sections()
    missing = [
        f"[{section}] {key}"
        for section, table in config.items()
        for key in table
        if f"`{key}`" not in sections.get(section, "")
    ]
    assert not missing, f"docs/configuration.md does not document: {', '.join(missing)}"


def _commented_keys() -> dict[str, set[str]]:
    """Keys config.toml shows commented out (`# width = 64`: unset, so the default applies), by section."""
    keys: dict[str, set[str]] = {}
    section = ""
    for line in (ROOT / "config.toml").read_text(encoding="utf-8").splitlines():
        header = re.match(r"^\[(\w+)\]", line)
        if header:
            section = header[1]
        commented = re.match(r"^# (\w+) = ", line)
        if commented:
            keys.setdefault(section, set()).add(commented[1])
    return keys


def test_the_reference_documents_only_real_keys() -> None:
    config = tomllib.loads((ROOT / "config.toml").read_text(encoding="utf-8"))
    commented = _commented_keys()
    unknown = []
    for section, text in _reference_sections().items():
        assert section in config, f"docs/configuration.md has a section [{section}] that config.toml lacks"
        shown = set(config[section]) | commented.get(section, set())
        for row in re.findall(r"^\| (`[^|]+)\|", text, flags=re.MULTILINE):
            unknown += [f"[{section}] {k}" for k in re.findall(r"`(\w+)`", row) if k not in shown]
    assert not unknown, f"docs/configuration.md documents keys config.toml lacks: {', '.join(unknown)}"


def test_every_make_target_mentioned_exists() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, flags=re.MULTILINE))
    pages = [README, *sorted(DOCS.glob("*.md"))]
    # `make x` in inline code, or at the start of a line in a shell block (prose "make" is a verb)
    command = re.compile(r"(?:`|^)make ([a-z][\w-]*)", flags=re.MULTILINE)
    mentioned = {(p.name, t) for p in pages for t in command.findall(p.read_text(encoding="utf-8"))}
    unknown = sorted(f"{page}: make {t}" for page, t in mentioned if t not in targets)
    assert not unknown, f"docs mention make targets the Makefile lacks: {unknown}"
