"""One progress-bar policy for every long loop (convert, prune, save/load, finetune, eval, sparsify_).

progress=False: no bar. progress=None (the library default): a bar only when stderr is a terminal, so a
server that calls `sparserun.load` does not write bars into its logs. progress=True (the CLI default): a bar
on a terminal (or a notebook's widget); when stderr is a log file or a pipe, plain lines instead
(`prune wanda 2:4: 3/32 layer, 41 s`), at most one per LOG_INTERVAL_S and one at the end: a long conversion
shows it is alive in the log, and the log stays readable (a bar writes carriage returns and no newline, so a
log of bars is one endless line that looks stalled). A quick inner loop (leave=False) writes nothing unless it
runs past the interval.
"""
from __future__ import annotations

import sys
import time

LOG_INTERVAL_S = 30.0


def _stderr_is_terminal() -> bool:
    try:
        return bool(sys.stderr is not None and sys.stderr.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


class LogLines:
    """The iterable with progress as newline-terminated lines on stderr (the non-terminal form of a bar). Takes
    the tqdm arguments the callers use (desc, total, unit, leave) and set_postfix."""

    def __init__(self, iterable, desc: str = "", total: int | None = None, unit: str = "it", leave: bool = True,
                 interval: float = LOG_INTERVAL_S, **_ignored):
        self.iterable = iterable
        self.desc, self.unit, self.leave, self.interval = desc, unit, leave, interval
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.postfix = ""

    def set_postfix(self, **kw) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def _say(self, n: int, t0: float) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {n}{of} {self.unit}, {time.monotonic() - t0:.0f} s{extra}", file=sys.stderr,
              flush=True)

    def __iter__(self):
        t0 = last = time.monotonic()
        n, said = 0, None  # said: the count last written
        for item in self.iterable:
            yield item
            n += 1
            if time.monotonic() - last >= self.interval:
                self._say(n, t0)
                last, said = time.monotonic(), n
        if (self.leave or said is not None) and said != n:
            self._say(n, t0)

    def __len__(self) -> int:
        return len(self.iterable)


def progress_bar(iterable=None, *, progress: bool | None, **kw):
    """A bar (tqdm) or log lines over `iterable` under the policy above; keyword arguments are tqdm's."""
    if progress is True and sys.stderr is not None and not _stderr_is_terminal() \
            and "ipykernel" not in sys.modules:  # a notebook's widget is no log
        return LogLines(iterable, **kw)
    from tqdm.auto import tqdm

    if progress is False or sys.stderr is None:
        kw["disable"] = True
    elif progress is None:
        kw["disable"] = None  # tqdm's own test: off unless the stream is a terminal
    return tqdm(iterable, **kw)
