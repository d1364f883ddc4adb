"""The one progress-bar policy (sparserun.progress): off, terminal-only, or log-friendly on a non-terminal."""
import io
import sys

import pytest

from sparserun.progress import LogLines, progress_bar


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _run(monkeypatch, stream, progress):
    monkeypatch.setattr(sys, "stderr", stream)
    bar = progress_bar(range(3), progress=progress, desc="x")
    drawn = not bar.disable  # read before iterating: tqdm sets disable when it closes
    assert list(bar) == [0, 1, 2]  # the bar never changes what is iterated
    bar.drawn = drawn
    return bar


@pytest.mark.parametrize("stream", [io.StringIO(), _Terminal()], ids=["log", "terminal"])
def test_false_draws_nothing(monkeypatch, stream):
    assert not _run(monkeypatch, stream, False).drawn and stream.getvalue() == ""


def test_none_draws_only_on_a_terminal(monkeypatch):
    log, term = io.StringIO(), _Terminal()
    assert not _run(monkeypatch, log, None).drawn and log.getvalue() == ""
    bar = _run(monkeypatch, term, None)
    assert bar.drawn and "x:" in term.getvalue()


def test_true_on_a_log_writes_lines(monkeypatch):
    """A CLI writing to a log file: newline-terminated lines, at most one per interval and one at the end (a
    bar's carriage returns made the log one endless line); a quick inner loop (leave=False) writes nothing."""
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    bar = progress_bar(range(5), progress=True, desc="prune", unit="layer")
    assert isinstance(bar, LogLines) and len(bar) == 5
    assert list(bar) == [0, 1, 2, 3, 4]
    assert log.getvalue() == "prune: 5/5 layer, 0 s\n"
    quiet = progress_bar(range(3), progress=True, desc="load", leave=False)
    assert list(quiet) == [0, 1, 2] and log.getvalue().count("\n") == 1
    slow = LogLines(iter(range(3)), desc="train", unit="step", interval=0.0)  # every item is past the interval
    slow.set_postfix(loss="1.5")
    assert list(slow) == [0, 1, 2]
    assert log.getvalue().splitlines()[1:] == ["train: 1 step, 0 s, loss=1.5", "train: 2 step, 0 s, loss=1.5",
                                               "train: 3 step, 0 s, loss=1.5"]
    assert "\r" not in log.getvalue()
    assert not isinstance(_run(monkeypatch, _Terminal(), True), LogLines)  # a terminal still gets the bar


def test_no_stderr_at_all(monkeypatch):
    """pythonw / a daemon with sys.stderr = None: no bar and no crash."""
    monkeypatch.setattr(sys, "stderr", None)
    assert list(progress_bar(range(2), progress=True)) == [0, 1]
