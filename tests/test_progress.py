"""The one progress-bar policy (sparserun.progress): off, terminal-only, or log-friendly on a non-terminal."""
import io
import sys

import pytest

from sparserun.progress import LOG_INTERVAL_S, progress_bar


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


def test_true_on_a_log_redraws_rarely(monkeypatch):
    """A CLI writing to a log file still shows it is alive, but not one frame per item."""
    log, term = io.StringIO(), _Terminal()
    bar = _run(monkeypatch, log, True)
    assert bar.drawn and bar.mininterval == LOG_INTERVAL_S and "x:" in log.getvalue()
    assert _run(monkeypatch, term, True).mininterval < LOG_INTERVAL_S


def test_no_stderr_at_all(monkeypatch):
    """pythonw / a daemon with sys.stderr = None: no bar and no crash."""
    monkeypatch.setattr(sys, "stderr", None)
    assert list(progress_bar(range(2), progress=True)) == [0, 1]
