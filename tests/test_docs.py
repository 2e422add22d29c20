"""The README documents what the code does: every config key, every command, the CI command."""

from __future__ import annotations

from pathlib import Path

from paced_ds.cli import build_parser
from paced_ds.config import describe

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def test_every_config_key_is_in_the_reference():
    for key, _, default, _ in describe():
        assert f"| `{key}` |" in README, key


def test_every_command_is_documented():
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in commands:
        assert f"paced-ds {name}" in README, name


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"```bash\n{ci}\n```" in README


def test_no_placeholders_left():
    assert "{{" not in README
