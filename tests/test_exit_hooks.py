"""Clean-up registered with paced_ds.runtime.exit runs before ``os._exit`` (how paced_ds.train
leaves) and at an ordinary exit, last registered first, past a hook that fails."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=60)


def test_hooks_run_before_os_exit_in_reverse_order_past_a_failure(tmp_path):
    log = tmp_path / "log"
    done = run_python(f"""
        import os
        from paced_ds.runtime.exit import on_exit, run_hooks

        def note(word, end="\\n"):
            with open({str(log)!r}, "a") as f:
                f.write(word + end)

        def broken():
            raise OSError("disk gone")

        on_exit(note, "first")
        on_exit(broken)
        on_exit(note, "last", end="!\\n")
        run_hooks()
        run_hooks()  # a second call finds nothing left to do
        os._exit(3)
    """)
    assert done.returncode == 3, done.stderr
    assert log.read_text() == "last!\nfirst\n"
    assert "at exit, broken failed: disk gone" in done.stdout


def test_hooks_run_at_an_ordinary_exit_too(tmp_path):
    log = tmp_path / "log"
    done = run_python(f"""
        from pathlib import Path
        from paced_ds.runtime.exit import on_exit

        on_exit(Path({str(log)!r}).write_text, "cleaned")
    """)
    assert done.returncode == 0, done.stderr
    assert log.read_text() == "cleaned"

