"""One optimizer step on a real DeepSpeed engine (one CPU rank, ZeRO 0-3): a step with a non-finite loss is
discarded whole and leaves no trace, the step makes one host synchronisation however many micro-batches, and one
rank without ZeRO skips the gradient all-reduce without changing a weight."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Run in a child process: a DeepSpeed engine joins a process group and sets RANK/WORLD_SIZE in the environment,
# which the launchers of the other tests in this process must not inherit.
SCRIPT = r"""
import json, sys
import torch
import deepspeed
from pipeline.train.callbacks import Callbacks
from pipeline.train.config import from_dict, make_plan
from pipeline.train.distributed import setup_distributed
from pipeline.train.engine import build_model, initialize
from pipeline.train.faults import NonFiniteLoss
from pipeline.train.loss import build_loss
from pipeline.train.state import TrainState
from pipeline.train.step import TrainStep

ctx = setup_distributed()  # a world of one


class Owner:  # what callbacks see: the loop's state
    state = TrainState()


def params(engine):
    ps = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(ps) if hasattr(ps[0], "ds_id") else torch.no_grad():
        return [p.detach().clone() for p in ps]


def trajectory(stage, accum, bad_step=None, reduce_anyway=False, deepspeeds_clip=False):
    cfg = from_dict({"data": {"root": "unused"}, "model": {"name": "coatnet_pico", "img_size": 32, "drop_path_rate": 0.0},
                     "train": {"global_batch_size": 4 * accum, "micro_batch_size": 4, "max_steps": 100},
                     "deepspeed": {"zero_stage": stage}, "logging": {"mlflow": False},
                     "optim": {"grad_clip": 0.05}})  # small enough to clip every step
    plan = make_plan(cfg, 1, train_samples=10**6, num_classes=10)
    torch.manual_seed(0)
    engine, sched = initialize(build_model(cfg, plan), cfg, plan)
    reduces = engine.enable_backward_allreduce
    engine.enable_backward_allreduce |= reduce_anyway
    if deepspeeds_clip:
        del engine.clip_fp32_gradients  # back to the class's own
    g = torch.Generator().manual_seed(1)
    data = [{"image": torch.randn(4, 3, 32, 32, generator=g), "label": torch.randint(0, 10, (4,), generator=g),
             "key": ["k"] * 4} for _ in range(4 * accum)]
    owner, syncs = Owner(), []
    owner.state = TrainState()

    def all_true(flag):
        syncs.append(owner.state.step)
        return ctx.all_true(flag)

    cbs = [NonFiniteLoss(step=bad_step)] if bad_step is not None else []
    step = TrainStep(engine, build_loss(cfg.loss), lambda b: (b["image"], b["label"]), grad_accum_steps=accum,
                     all_true=all_true, device=ctx.device, callbacks=Callbacks(cbs), owner=owner)
    batches, applied = iter(data), []
    for _ in range(3 if bad_step is None else 4):
        if owner.state.step == bad_step:  # the discarded step reads batches of its own, not the others'
            applied.append(step(iter([{**b, "image": b["image"].flip(0)} for b in data[:accum]])).applied)
        else:
            applied.append(step(batches).applied)
        owner.state.step += 1
    return params(engine), sched.get_last_lr()[0], applied, len(syncs), reduces


out = {}
for stage in map(int, sys.argv[1].split(",")):
    for accum in (1, 2):
        ref_w, ref_lr, ref_applied, ref_syncs, reduces = trajectory(stage, accum)
        w, lr, applied, syncs, _ = trajectory(stage, accum, bad_step=1)
        reduced_w = trajectory(stage, accum, reduce_anyway=True)[0]
        ds_clip_w = trajectory(stage, accum, deepspeeds_clip=True)[0] if stage == 0 else ref_w
        out[f"{stage}/{accum}"] = {
            "clip_diff": max(float((a - b).abs().max()) for a, b in zip(ref_w, ds_clip_w)),
            "reduces": reduces, "same_as_reduced": all(torch.equal(a, b) for a, b in zip(ref_w, reduced_w)),
            "same_weights": all(torch.equal(a, b) for a, b in zip(ref_w, w)),
            "same_lr": ref_lr == lr, "applied": applied, "ref_applied": ref_applied,
            "syncs_per_step": [ref_syncs / 3, syncs / 4],
        }
print("RESULT " + json.dumps(out))
"""


def _child_env() -> dict[str, str]:
    """This checkout on the path, DeepSpeed on CPU, and none of a launcher's rank variables."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_nonfinite_step_is_discarded_whole_under_every_zero_stage():
    env = _child_env()
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "0,1,2,3"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=280)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    for key, r in result.items():
        # [step, discarded, step, step] ends exactly where [step, step, step] does: same weights, same LR.
        assert r["applied"] == [True, False, True, True] and r["ref_applied"] == [True] * 3, key
        assert r["same_weights"] and r["same_lr"], (key, r)
        assert r["syncs_per_step"] == [1, 1], (key, r)  # one, whatever the number of micro-batches
        # One rank without ZeRO skips DeepSpeed's gradient all-reduce (a copy of every gradient there and back)
        # and ends where the reducing engine does; ZeRO 1-3 keep theirs (their optimizers read its partitions).
        assert r["reduces"] == (not key.startswith("0/")) and r["same_as_reduced"], (key, r)
        # ZeRO-0 clips with torch's multi-tensor clip_grad_norm_ instead of DeepSpeed's per-parameter loop.
        assert r["clip_diff"] < 1e-5, (key, r)  # the same clip, summed in another order


# The trainer's compiled path (model.compile: true, engine.compile_regions) against its eager path: same recipe,
# same data, three steps under DeepSpeed ZeRO-2. aot_eager runs Dynamo and AOTAutograd, exactly what inductor
# would receive, without the C++ build (inductor's code is covered by tests/model/test_model_fast_paths.py).
COMPILED = r"""
import functools, json
import torch
from pipeline.train.config import from_dict, make_plan
from pipeline.train.distributed import setup_distributed
from pipeline.train.engine import build_model, compile_choice, initialize
from pipeline.train.loss import build_loss
from pipeline.train.state import TrainState
from pipeline.train.callbacks import Callbacks
from pipeline.train.step import TrainStep

torch.nn.Module.compile = functools.partialmethod(torch.nn.Module.compile, backend="aot_eager")
ctx = setup_distributed()


class Owner:
    state = TrainState()


def run(compile):
    cfg = from_dict({"data": {"root": "unused"}, "model": {"name": "coatnet_pico", "img_size": 32,
                     "drop_path_rate": 0.0, "compile": compile},
                     "train": {"global_batch_size": 4, "micro_batch_size": 4, "max_steps": 100},
                     "deepspeed": {"zero_stage": 2}, "logging": {"mlflow": False}})
    plan = make_plan(cfg, 1, train_samples=10**6, num_classes=10)
    torch.manual_seed(0)
    model = build_model(cfg, plan)
    compiled = sum(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
    engine, _ = initialize(model, cfg, plan)
    g = torch.Generator().manual_seed(1)
    data = [{"image": torch.randn(4, 3, 32, 32, generator=g), "label": torch.randint(0, 10, (4,), generator=g)}
            for _ in range(3)]
    step = TrainStep(engine, build_loss(cfg.loss), lambda b: (b["image"], b["label"]), grad_accum_steps=1,
                     all_true=ctx.all_true, device=ctx.device, callbacks=Callbacks([]), owner=Owner())
    losses = [float(step(iter([b])).loss) for b in data]
    blocks = sum(len(s.blocks) for s in model.stages)
    return [p.detach().clone() for p in engine.module.parameters()], losses, [compiled, blocks], list(engine.module.state_dict())


ref_w, ref_loss, ref_n, ref_keys = run(False)
w, loss, n, keys = run(True)
print("RESULT " + json.dumps({
    "max_diff": max(float((a - b).abs().max()) for a, b in zip(ref_w, w)), "losses": [ref_loss, loss],
    "compiled": [ref_n, n], "same_keys": ref_keys == keys,
    "auto_on_cpu": compile_choice(from_dict({"data": {"root": "unused"}}))[0]}))
"""


@pytest.mark.timeout(300)
def test_the_trainers_compiled_step_matches_its_eager_step():
    env = _child_env()
    proc = subprocess.run([sys.executable, "-c", COMPILED], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=280)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(lines[-1].removeprefix("RESULT "))
    (eager, blocks), (compiled, blocks_) = r["compiled"]
    assert eager == 0 and compiled == blocks == blocks_ >= 4  # eager: none; compiled: every block, in place
    assert r["same_keys"]  # Module.compile keeps the state-dict names: checkpoints are interchangeable
    assert r["auto_on_cpu"] is False
    for a, b in zip(*r["losses"]):
        assert abs(a - b) < 1e-4, r["losses"]
    assert r["max_diff"] < 1e-4, r
