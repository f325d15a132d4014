"""Stopping a training run cleanly: SIGINT (Ctrl-C) and SIGTERM (what schedulers send before they
kill) ask the loop to save a checkpoint and exit; a second Ctrl-C exits at once."""

import signal


class GracefulStop:
    """Context manager; `requested` is the name of the first signal received, or None."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: at once

    def __enter__(self):
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave the signals alone
            self._previous.clear()
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class Stopped(Exception):
    """The run saved a checkpoint and stopped on a signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
