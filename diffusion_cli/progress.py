"""Progress bars: tqdm's on a terminal; where stderr is a file or a pipe (a cluster job's log, `2>
log.txt`), one plain line every DIFFUSION_CLI_PROGRESS_SECONDS seconds (default 30) instead of
tqdm's `\r` frames, which a log keeps as one line of thousands of frames."""

import os
import sys
import time

from tqdm.auto import tqdm as terminal_bar

LINE_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


def seconds_between_lines() -> float:
    return float(os.environ.get("DIFFUSION_CLI_PROGRESS_SECONDS", 30))


class LogLines(terminal_bar):
    """A tqdm bar that writes whole lines: at its start, at most every `seconds_between_lines()`,
    and at its end. A bar that is not left (leave=False: one inside another, such as each batch's
    sampling steps) writes neither its start nor its end line, only its lines in between."""

    def __init__(self, *args, **kwargs):
        interval = seconds_between_lines()
        self.printed = -float("inf") if kwargs.get("leave", True) else time.monotonic()
        super().__init__(*args, **{**kwargs, "mininterval": interval, "maxinterval": max(interval, 10),
                                   "dynamic_ncols": False, "bar_format": LINE_FORMAT})

    def display(self, msg=None, pos=None):
        if msg == "":  # tqdm clearing the bar: nothing to clear in a log
            return False
        closing = self.disable  # close() sets it, then asks for the last line and writes its "\n"
        if not closing and time.monotonic() - self.printed < seconds_between_lines():
            return False
        self.printed = time.monotonic()
        self.fp.write((self.__str__() if msg is None else msg) + ("" if closing else "\n"))
        self.fp.flush()
        return True

    def clear(self, nolock=False):
        """A log line stays (tqdm clears a bar before a log message and redraws it after)."""


def tqdm(*args, **kwargs):
    """A progress bar (tqdm's arguments) for where stderr goes: a terminal or a log."""
    stream = kwargs.get("file") or sys.stderr
    bar = terminal_bar if getattr(stream, "isatty", lambda: False)() else LogLines
    return bar(*args, **kwargs)
