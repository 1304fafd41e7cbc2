"""Preemption: SIGTERM (and SIGINT) only raise a flag; the loop saves at the next step boundary and
returns. Saving inside the handler would run Orbax in the middle of whatever the main thread was
doing, possibly mid-step with the state donated."""

from __future__ import annotations

import signal
import threading


class StopFlag:
    """Set by a signal (or by `request()` in tests and callbacks); read by the loop once per step."""

    def __init__(self):
        self._event = threading.Event()
        self.reason = ""

    def request(self, reason: str = "requested") -> None:
        self.reason = reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def handler(self, signum, frame) -> None:
        del frame
        self.request(signal.Signals(signum).name)


class install_handlers:
    """Context manager: routes SIGTERM/SIGINT to `flag` while training, restores the old handlers
    after. Signals can only be installed from the main thread; elsewhere (e.g. a notebook worker
    thread) the loop still stops via `flag.request()`."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, flag: StopFlag):
        self.flag = flag
        self._old: dict = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self.flag.handler)
        return self.flag

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
