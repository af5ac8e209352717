"""An fp32 exponential moving average of the model's weights (DeepSpeed keeps none).

Updated from the module's parameters after each optimizer step. Under ZeRO-3 the parameters
are partitioned, so they are gathered one module at a time (``GatheredParameters``); under
bf16 the module holds bf16 copies, so the average is of those (the fp32 master weights are
partitioned across ranks and not all in one place).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def _gathered(params: list[nn.Parameter]):
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


class ModelEma:
    def __init__(self, model: nn.Module, decay: float, device: str | torch.device | None = None) -> None:
        self.decay = decay
        self.device = device
        self.shadow: dict[str, torch.Tensor] = {}
        self.num_updates = 0
        self._copy_from(model, init=True)

    def _named_tensors(self, model: nn.Module):
        # Only what the state dict holds: non-persistent buffers (cached index tables) are not weights.
        keys = set(model.state_dict(keep_vars=True).keys())
        for name, p in model.named_parameters():
            if name in keys:
                yield name, p, True
        for name, b in model.named_buffers():
            if name in keys:
                yield name, b, False

    @torch.no_grad()
    def _copy_from(self, model: nn.Module, init: bool) -> None:
        d = self.decay
        params = [p for _, p, is_p in self._named_tensors(model) if is_p]
        with _gathered(params):
            for name, t, is_param in self._named_tensors(model):
                src = t.detach()
                dev = self.device or src.device
                if init or name not in self.shadow:
                    self.shadow[name] = src.to(dev, torch.float32 if src.is_floating_point() else src.dtype, copy=True)
                elif not is_param or not src.is_floating_point():
                    # Buffers (BatchNorm running stats, counters) are copied, as timm's ModelEmaV2 does for buffers
                    # it cannot meaningfully average.
                    self.shadow[name].copy_(src.to(self.shadow[name].device))
                else:
                    self.shadow[name].lerp_(src.to(self.shadow[name].device, torch.float32), 1.0 - d)

    def update(self, model: nn.Module) -> None:
        self._copy_from(model, init=False)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
        for k, v in state["shadow"].items():
            if k in self.shadow:
                self.shadow[k].copy_(v)
            else:
                self.shadow[k] = v.to(self.device or "cpu")

    def export(self) -> dict[str, torch.Tensor]:
        """The averaged weights as a state dict for ``model.load_state_dict`` (fp32, contiguous, on CPU)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.shadow.items()}
