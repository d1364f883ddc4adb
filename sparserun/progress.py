"""One progress-bar policy for every long loop (convert, prune, save/load, finetune, eval, sparsify_).

progress=False: no bar. progress=None (the library default): a bar only when stderr is a terminal, so a
server that calls `sparserun.load` does not write bars into its logs. progress=True (the CLI default): always
a bar, but when stderr is not a terminal (a log file, a CI job) it redraws at most every LOG_INTERVAL_S
seconds: a long conversion still shows it is alive in the log without thousands of carriage-return frames.
"""
from __future__ import annotations

import sys

LOG_INTERVAL_S = 30.0


def _stderr_is_terminal() -> bool:
    try:
        return bool(sys.stderr is not None and sys.stderr.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def progress_bar(iterable=None, *, progress: bool | None, **kw):
    """tqdm over `iterable` under the policy above; keyword arguments go to tqdm."""
    from tqdm.auto import tqdm

    if progress is False or sys.stderr is None:
        kw["disable"] = True
    elif progress is None:
        kw["disable"] = None  # tqdm's own test: off unless the stream is a terminal
    elif not _stderr_is_terminal() and "ipykernel" not in sys.modules:  # a notebook's widget is no log
        kw.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm(iterable, **kw)
