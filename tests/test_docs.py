"""The documentation documents what the code does: every config key (in a page generated from
the code), every command, the CI command; the README stays a front door; no link is broken."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from paced_ds.cli import build_parser
from paced_ds.config import describe

REPO = Path(__file__).resolve().parent.parent
README_PATH = REPO / "README.md"
README = README_PATH.read_text()
DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md"))
CONFIGURATION = DOCS / "configuration.md"
REGENERATE = "paced-ds config --reference > docs/configuration.md"
README_MAX_LINES = 300


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def reference_table() -> str:
    """What `paced-ds config --reference` prints, run in-process through the CLI's own parser."""
    args = build_parser().parse_args(["config", "--reference"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert args.func(args) == 0
    return out.getvalue()


def table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def test_every_config_key_is_in_the_reference():
    page = CONFIGURATION.read_text()
    missing = [key for key, _, _, _ in describe() if f"| `{key}` |" not in page]
    assert not missing, f"{rel(CONFIGURATION)} lacks {missing}: regenerate its table with `{REGENERATE}`"


def test_the_configuration_page_is_the_generated_table():
    page, fresh = CONFIGURATION.read_text(), reference_table()
    if page == fresh:
        return
    old, new = set(table_rows(page)), set(table_rows(fresh))
    key = re.compile(r"^\| `([^`]+)` \|")
    keys = lambda rows: {m.group(1) for m in map(key.match, rows) if m}  # noqa: E731
    raise AssertionError(
        f"{rel(CONFIGURATION)} is stale: regenerate it with `{REGENERATE}` "
        f"(keys added since: {sorted(keys(new) - keys(old))}, removed: {sorted(keys(old) - keys(new))}, "
        f"changed: {sorted(keys(new - old) & keys(old - new))})")


def test_every_command_is_documented():
    texts = [README] + [page.read_text() for page in PAGES]
    commands = build_parser()._subparsers._group_actions[0].choices
    missing = [name for name in commands if not any(f"paced-ds {name}" in text for text in texts)]
    assert not missing, f"not in README.md or docs/*.md: {missing}"


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"```bash\n{ci}\n```" in README


def test_no_placeholders_left():
    for path in [README_PATH] + PAGES:
        assert "{{" not in path.read_text(), rel(path)


def test_the_readme_is_a_front_door():
    lines = len(README.splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move reference material to docs/"


LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def relative_links(text: str) -> list[str]:
    """Targets of the markdown links and images outside code that are not URLs."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [target for target in LINK.findall(text)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) and not target.startswith("#")]


def test_relative_links_resolve():
    broken = []
    for path in [README_PATH] + PAGES:
        for target in relative_links(path.read_text()):
            if not (path.parent / target.split("#", 1)[0]).exists():
                broken.append(f"{rel(path)}: {target}")
    assert not broken, "links to missing files: " + "; ".join(broken)


def test_the_link_check_sees_links():
    found = relative_links("[a](docs/x.md#y) ![b](p.png) [c](https://e.org) [d](#z) `[e](f.md)`\n```\n[g](h.md)\n```\n")
    assert found == ["docs/x.md#y", "p.png"]
