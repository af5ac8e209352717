"""Where the loop is: optimizer steps taken, the epoch and the step within it, skipped steps."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    nonfinite_skips: int = 0
    samples_seen: int = 0  # kept (not masked) samples of the applied steps, every rank's
    mlflow_run_id: str | None = None

    def advance(self, steps_per_epoch: int) -> None:
        """One optimizer step done (applied or skipped: either way it consumed a global batch)."""
        self.step += 1
        self.step_in_epoch += 1
        if self.step_in_epoch == steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    @property
    def at_epoch_start(self) -> bool:
        return self.step_in_epoch == 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in fields(self):
            setattr(self, f.name, state.get(f.name, f.default))
