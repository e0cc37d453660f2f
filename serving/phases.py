"""setup()'s phases, timed: one log line each (with bytes/s where bytes moved), and the seconds
kept for ``/health``. Also the logging an app shows when nothing else configured it."""

from __future__ import annotations

import logging
import time

LOGGERS = ("app", "conversion", "model_loader", "serving")


class SetupPhases:
    """``with phases("load") as phase:`` times a phase into ``phases.seconds`` and logs it."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    def __call__(self, name: str) -> Phase:
        return Phase(name, self)

    def done(self) -> float:
        """Record and return the whole setup's seconds."""
        self.seconds["total"] = round(time.perf_counter() - self.started, 3)
        return self.seconds["total"]


class Phase:
    """One timed phase; ``detail`` (or :meth:`rate`) completes its log line."""

    def __init__(self, name: str, phases: SetupPhases) -> None:
        self.name, self.phases, self.detail = name, phases, ""
        self.nbytes: int | None = None

    def rate(self, nbytes: int, where: str) -> None:
        self.nbytes, self.detail = nbytes, where

    def __enter__(self) -> Phase:
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        elapsed = time.perf_counter() - self.started
        self.phases.seconds[self.name] = round(elapsed, 3)
        log = self.phases.log
        if exc_info[0] is not None:
            log.error("%s: failed after %.2f s: %s", self.name, elapsed, exc_info[1])
        elif self.nbytes is not None:
            rate = self.nbytes / 1e9 / elapsed if elapsed > 0 else 0.0
            log.info("%s: %.2f GB in %.2f s (%.2f GB/s) %s", self.name, self.nbytes / 1e9, elapsed, rate, self.detail)
        else:
            log.info("%s: %.2f s%s", self.name, elapsed, f" ({self.detail})" if self.detail else "")


def configure_logging() -> None:
    """Show the INFO phase lines of the app and its packages when nothing else configured logging."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
