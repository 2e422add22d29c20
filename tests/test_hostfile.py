"""--hostfile is checked before anything loads: the deepspeed launcher would quietly run a
missing hostfile's job on this node alone."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from paced_ds import cli
from paced_ds.errors import UserError

from launch import RECIPE, run


def refused(tmp_path: Path, command: str, hostfile: Path, *overrides: str) -> str:
    """Run ``paced-ds COMMAND --hostfile HOSTFILE`` as a process; assert exit 2, one error line,
    no run directory."""
    result = run([sys.executable, "-m", "paced_ds.cli", command, "--config", str(RECIPE), "--hostfile",
                  str(hostfile), f"train.output_dir={tmp_path / 'run'}", *overrides], timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("paced-ds: error: --hostfile "), result.stderr
    assert not (tmp_path / "run").exists()
    return lines[0]


def test_missing_hostfile_is_refused_before_anything_runs(tmp_path):
    missing = tmp_path / "missing.txt"
    # The unknown key would be refused too: the hostfile is checked before the config is loaded.
    line = refused(tmp_path, "train", missing, "train.no_such_key=1")
    assert f"--hostfile {missing}: no such file" in line
    assert "one-node run" in line


def test_teacher_serve_checks_its_hostfile_too(tmp_path):
    missing = tmp_path / "teacher_hosts"
    line = refused(tmp_path, "teacher-serve", missing, "teacher.address=127.0.0.1:29600")
    assert f"--hostfile {missing}: no such file" in line


def test_malformed_line_names_file_and_line(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# two nodes\nnode0 slots=8\n\nnode1 8\n")
    line = refused(tmp_path, "train", hosts)
    assert f"{hosts}:4" in line and "'node1 8'" in line


def test_directory_comment_only_and_duplicate_hosts(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        cli.check_hostfile(str(tmp_path))
    hosts = tmp_path / "hosts"
    hosts.write_text("# nothing yet\n\n")
    with pytest.raises(UserError, match="no `hostname slots=N` line"):
        cli.check_hostfile(str(hosts))
    hosts.write_text("node0 slots=8\nnode0 slots=4\n")
    with pytest.raises(UserError, match=r"hosts:2: host node0 is already listed on line 1"):
        cli.check_hostfile(str(hosts))


def test_unreadable_hostfile(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"file/hosts: cannot read it \(Not a directory\)"):
        cli.check_hostfile(str(tmp_path / "file" / "hosts"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_hostfile_without_read_permission(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("node0 slots=8\n")
    hosts.chmod(0)
    with pytest.raises(UserError, match="cannot read it"):
        cli.check_hostfile(str(hosts))


def test_valid_hostfile_gives_hosts_and_slots(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# the cluster\nnode0 slots=8\n\n  node1   slots=4  \n")
    assert cli.check_hostfile(str(hosts)) == {"node0": 8, "node1": 4}
