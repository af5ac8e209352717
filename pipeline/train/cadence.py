"""When a periodic part of the loop acts: every N optimizer steps, and at the steps that end the run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cadence:
    """``cadence(step)`` is true every ``interval`` steps (0: never) and at every step in ``at``.

    The loop's parts each hold one, named for what they decide (``should_log``, ``should_eval``,
    ``should_save``), so "every N steps or at the end" is written once.
    """

    interval: int
    at: frozenset[int] = frozenset()

    @classmethod
    def every(cls, interval: int, *, at: int | None = None) -> Cadence:
        return cls(interval, frozenset() if at is None else frozenset({at}))

    def __call__(self, step: int) -> bool:
        return bool(self.interval) and step % self.interval == 0 or step in self.at
