"""The training loop's small parts: cadences, the loop state, callbacks loaded from the environment, and the
fault callbacks tests inject through them."""

from __future__ import annotations

import pytest
import torch

from pipeline.train.cadence import Cadence
from pipeline.train.callbacks import (
    CALLBACKS_ENV,
    Callback,
    CallbackError,
    Callbacks,
    from_env,
    load_callback,
)
from pipeline.train.faults import LoseWorker, NonFiniteLoss
from pipeline.train.state import TrainState


def test_cadence_every_n_steps_and_at_the_end():
    log = Cadence.every(4, at=10)
    assert [s for s in range(1, 13) if log(s)] == [4, 8, 10, 12]
    assert [s for s in range(1, 13) if Cadence.every(0, at=10)(s)] == [10]  # 0: only at the end
    assert not any(Cadence.every(0)(s) for s in range(1, 100))


def test_state_advances_through_epochs_and_round_trips():
    state = TrainState()
    for _ in range(7):
        state.advance(steps_per_epoch=3)
    assert (state.step, state.epoch, state.step_in_epoch, state.at_epoch_start) == (7, 2, 1, False)
    state.advance(3), state.advance(3)
    assert state.at_epoch_start and state.epoch == 3
    restored = TrainState()
    restored.load_state_dict(state.state_dict())
    assert restored == state
    # A checkpoint from before a field existed still loads (the field takes its default).
    old = TrainState()
    old.load_state_dict({"step": 5, "epoch": 1, "step_in_epoch": 2})
    assert old.nonfinite_skips == 0 and old.mlflow_run_id is None


class _Tagger(Callback):
    def __init__(self, tag: str = "", scale: float = 1.0) -> None:
        self.tag, self.scale, self.ends = tag, scale, 0

    def on_micro_batch_loss(self, trainer, micro, loss):
        return loss * self.scale

    def on_step_end(self, trainer):
        self.ends += 1


def test_callbacks_load_from_the_environment_with_literal_arguments():
    cbs = from_env({CALLBACKS_ENV: f" {__name__}:_Tagger(tag='a;b', scale=2.0) ; {__name__}:_Tagger "})
    assert [(c.tag, c.scale) for c in cbs] == [("a;b", 2.0), ("", 1.0)]
    chain = Callbacks(cbs)
    assert chain.on_micro_batch_loss(None, 0, torch.tensor(3.0)).item() == 6.0
    chain.on_step_end(None)
    assert [c.ends for c in cbs] == [1, 1]
    assert from_env({}) == [] and from_env({CALLBACKS_ENV: " ; "}) == []


@pytest.mark.parametrize("spec, message", [
    ("pipeline.train.faults.NonFiniteLoss", "is not module:factory"),
    ("pipeline.train.faults:NonFiniteLoss(5)", "key=value"),
    ("pipeline.train.faults:NonFiniteLoss(step=int('5'))", "malformed"),
    ("pipeline.train.no_such_module:Thing", "No module named"),
    ("pipeline.train.faults:NoSuchFault", "NoSuchFault"),
    ("pipeline.train.cadence:Cadence(interval=1)", "not a Callback"),
])
def test_a_bad_callback_spec_is_refused_naming_the_variable(spec, message):
    with pytest.raises(CallbackError, match=message) as err:
        load_callback(spec)
    assert CALLBACKS_ENV in str(err.value)


class _Trainer:
    def __init__(self, step: int, rank: int = 0, world_size: int = 2, output_dir: str = ".") -> None:
        self.state = TrainState(step=step)
        self.ctx = type("Ctx", (), {"rank": rank, "world_size": world_size})()
        self.config = type("Cfg", (), {"output_dir": output_dir})()


def test_nonfinite_fault_poisons_the_first_micro_batch_of_its_step_once():
    fault = load_callback("pipeline.train.faults:NonFiniteLoss(step=3)")
    assert isinstance(fault, NonFiniteLoss)
    loss = torch.tensor(1.5, requires_grad=True)
    assert fault.on_micro_batch_loss(_Trainer(2), 0, loss) is loss
    assert fault.on_micro_batch_loss(_Trainer(3), 1, loss) is loss  # not the first micro-batch
    poisoned = fault.on_micro_batch_loss(_Trainer(3), 0, loss)
    poisoned.backward()
    assert poisoned.isnan() and loss.grad.isnan()  # NaN gradients too, as a real NaN's would be
    assert fault.on_micro_batch_loss(_Trainer(3), 0, loss) is loss  # once


def test_lost_worker_fault_spares_other_ranks_and_steps(tmp_path):
    fault = LoseWorker(step=6)
    fault.on_step_end(_Trainer(5, rank=1, output_dir=str(tmp_path)))
    fault.on_step_end(_Trainer(6, rank=0, output_dir=str(tmp_path)))  # not the last rank
    assert not any(tmp_path.iterdir())  # still alive, nothing marked (the exit itself: the Ray Train test)
