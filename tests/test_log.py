"""What a run prints where its output is not a terminal: plain progress lines, now and then."""

from __future__ import annotations

from paced_ds.runtime import log


def test_off_a_terminal_progress_is_a_plain_line_now_and_then(monkeypatch, capsys):
    monkeypatch.setattr(log.sys.stderr, "isatty", lambda: False)
    clock = [100.0]
    monkeypatch.setattr(log.time, "time", lambda: clock[0])
    bar = log.progress_bar(300, "distilling", enabled=True)
    assert isinstance(bar, log.PlainProgress)
    for step in range(300):
        clock[0] += 0.5  # 150 s in all: a line every 30 s
        bar.set_postfix(loss=f"{1 / (step + 1):.4f}")
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 6 and "\r" not in "".join(lines)
    assert lines[0] == "paced-ds: distilling: 60/300 (20%), 30 s, loss=0.0167"
    assert lines[-1] == "paced-ds: distilling: 300/300 (100%), 150 s, loss=0.0033"


def test_a_short_phase_prints_nothing_and_a_disabled_bar_is_silent(monkeypatch, capsys):
    monkeypatch.setattr(log.sys.stderr, "isatty", lambda: False)
    bar = log.progress_bar(10, "rollouts", enabled=True)
    bar.update(10)
    bar.close()
    quiet = log.progress_bar(10, "rollouts", enabled=False)
    quiet.update(10)
    quiet.close()
    assert capsys.readouterr().err == ""
