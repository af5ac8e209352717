"""The one model factory of the pipeline: this project's CoAtNets by name, any timm model as ``timm/<name>``.

Training, checkpointing, evaluation, fine-tuning and registration build and inspect models only through
this module, so none of them special-cases timm. What a recipe names:

    model.name: coatnet_0                 # coatnet.create_model(name, num_classes, img_size, drop_path_rate, **overrides)
    model.name: timm/coatnet_0_224        # timm.create_model(name, num_classes, drop_path_rate, img_size, **overrides)

``img_size`` reaches a timm model only where its constructor takes it (ViTs, MaxxVit, Swin: their position
tables and windows depend on it); a CNN builds without it. YAML lists in ``overrides`` become tuples, the
form timm's configs use (``embed_dim: [24, 32, 64, 128]`` for MaxxVit, whose constructor overlays its
keyword arguments on its config).

What only a CoAtNet has: the analytic MAC counter (``coatnet.count``; a timm model is counted by torch's
FLOP counter on the meta device) and the resize of relative-position tables to another resolution
(``coatnet.adapt_state_dict``); a timm checkpoint must fit the fine-tuning model's shapes as they are.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
from collections.abc import Mapping
from typing import Any

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import coatnet
from coatnet.state_dict import HEAD_BIAS, HEAD_WEIGHT

TIMM_PREFIX = "timm/"
# Keys the pipeline sets from its own model section; in overrides they would be ambiguous.
RESERVED_OVERRIDES = ("num_classes", "img_size", "drop_path_rate", "pretrained")
# Names timm gives relative-position tables (MaxxVit/CoAtNet, Swin, BEiT...); only CoAtNet's are resized.
_REL_TABLE_MARKERS = ("relative_position", "rel_pos")


class ModelNameError(ValueError):
    """``model.name`` names no model this pipeline can build."""


def is_timm(name: str) -> bool:
    return name.startswith(TIMM_PREFIX)


def _timm_name(name: str) -> str:
    return name[len(TIMM_PREFIX):]


def check_name(name: str) -> None:
    """Raise ModelNameError (one line, close matches listed) when ``name`` is not a model we can build."""
    if is_timm(name):
        inner = _timm_name(name)
        if inner and timm.is_model(inner):
            return
        close = difflib.get_close_matches(inner, _timm_models(), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(TIMM_PREFIX + c for c in close)}" if close else \
            " (timm.list_models() lists them)"
        raise ModelNameError(f"{name!r} is not a model timm {timm.__version__} knows{hint}")
    if name not in coatnet.list_models():
        close = difflib.get_close_matches(name, coatnet.list_models(), n=3, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else f"; known: {', '.join(coatnet.list_models())}"
        raise ModelNameError(f"unknown CoAtNet variant {name!r}{hint} (or timm/<name> for a timm model)")


@functools.cache
def _timm_models() -> tuple[str, ...]:
    return tuple(timm.list_models())


def builds_partitioned(name: str) -> bool:
    """Whether the model can be constructed inside ``deepspeed.zero.Init`` (ZeRO-3: each module partitioned as
    its constructor returns). A CoAtNet initialises through ``Module.apply``, which zero.Init gathers; timm
    models initialise with their own walk over the children (``named_apply``), which would meet empty
    partitions, so they are built whole and partitioned afterwards."""
    return not is_timm(name)


def _tuples(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def create_model(name: str, *, num_classes: int, img_size: int, drop_path_rate: float | None = None,
                 overrides: Mapping[str, Any] | None = None, device: str | torch.device | None = None) -> nn.Module:
    """The model a recipe's ``model`` section names, freshly initialised (on ``device``: ``meta`` for shapes)."""
    overrides = dict(overrides or {})
    if not is_timm(name):
        return coatnet.create_model(name, num_classes=num_classes, img_size=img_size, drop_path_rate=drop_path_rate,
                                    device=device, **overrides)
    kwargs: dict[str, Any] = {"num_classes": num_classes, **_tuples(overrides)}
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    with torch.device(device) if device is not None else contextlib.nullcontext():
        try:
            return timm.create_model(_timm_name(name), img_size=img_size, **kwargs)
        except TypeError as e:
            # A constructor without img_size (a CNN) refuses it before building anything.
            if "img_size" not in str(e):
                raise
            return timm.create_model(_timm_name(name), **kwargs)


def count(name: str, *, num_classes: int, img_size: int, overrides: Mapping[str, Any] | None = None
          ) -> tuple[int, int]:
    """(parameters, multiply-adds per image): CoAtNet's analytic counter; for timm, a meta-device build and
    forward under torch's FLOP counter (convolutions and matmuls, as the analytic one counts), no memory used."""
    overrides = dict(overrides or {})
    if not is_timm(name):
        conf = coatnet.get_config(name)
        if overrides:
            conf = conf.replace(**overrides)
        p, m = coatnet.count(conf, img_size, num_classes=num_classes)
        return int(p), int(m)
    model = create_model(name, num_classes=num_classes, img_size=img_size, overrides=overrides, device="meta")
    params = sum(p.numel() for p in model.parameters())
    with torch.device("meta"), FlopCounterMode(display=False) as flops:
        model.eval()(torch.empty(1, 3, img_size, img_size))
    return int(params), int(flops.get_total_flops() // 2)


def architecture(model: nn.Module) -> dict[str, Any] | None:
    """The exact architecture to store beside the weights (a CoAtNet's config); None where the name and
    overrides rebuild it (timm)."""
    return model.config.to_dict() if isinstance(model, coatnet.CoAtNet) else None


def from_model_config(model_config: Mapping[str, Any]) -> nn.Module:
    """The model of a run's ``model_config.json`` (the trainer's export; also a bare CoAtNetConfig dict)."""
    if isinstance(model_config.get("config"), dict):  # a CoAtNet export: the exact architecture
        return coatnet.CoAtNet(coatnet.CoAtNetConfig.from_dict(model_config["config"]))
    if "depths" in model_config and not is_timm(str(model_config.get("name", ""))):
        return coatnet.CoAtNet(coatnet.CoAtNetConfig.from_dict(dict(model_config)))
    return create_model(str(model_config["name"]), num_classes=int(model_config["num_classes"]),
                        img_size=int(model_config["img_size"]), overrides=model_config.get("overrides") or {})


def classifier_keys(model: nn.Module) -> tuple[str, str]:
    """State-dict keys (weight, bias) of the model's classifier, the rows a head transfer maps.

    timm models name their classifier through ``get_classifier`` (what ``reset_classifier`` replaces).
    """
    if isinstance(model, coatnet.CoAtNet):
        return HEAD_WEIGHT, HEAD_BIAS
    get = getattr(model, "get_classifier", None)
    if get is None or not hasattr(model, "reset_classifier"):
        raise ValueError(f"{type(model).__name__} has no get_classifier/reset_classifier: its classifier cannot "
                         "be found to map the pretraining classes onto the fine-tuning ones")
    head = get()
    names = {id(m): n for n, m in model.named_modules()}
    if not isinstance(head, nn.Linear) or id(head) not in names:
        kind = "several classifiers" if isinstance(head, tuple | list) else f"a {type(head).__name__} classifier"
        raise ValueError(f"{type(model).__name__} has {kind}; the head transfer maps the rows of one Linear layer")
    return f"{names[id(head)]}.weight", f"{names[id(head)]}.bias"


def adapt_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module,
                     shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """``state`` made to fit ``model``: CoAtNet resizes its relative-position tables to the model's grids;
    another model takes the checkpoint as it is, and a table of another size is a ValueError saying so.

    ``shapes``: the model's full shapes where its parameters do not show them (ZeRO-3 partitions).
    """
    if isinstance(model, coatnet.CoAtNet):
        return coatnet.adapt_state_dict(state, model)
    want = shapes if shapes is not None else {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, value in state.items():
        if key in want and tuple(value.shape) != tuple(want[key]) and any(m in key for m in _REL_TABLE_MARKERS):
            raise ValueError(f"{key} is {tuple(value.shape)} in the checkpoint and {tuple(want[key])} in the model: "
                             f"relative-position tables are resized to a new resolution only for CoAtNet models, "
                             f"not {type(model).__name__}; use the checkpoint's img_size")
    return dict(state)


def activation_elements(name: str, *, num_classes: int, img_size: int,
                        overrides: Mapping[str, Any] | None = None) -> int:
    """Elements per image that the leaf modules of a training forward output (what autograd keeps, roughly),
    from a meta-device forward: nothing is allocated. ``pipeline.cluster.sizing`` turns it into bytes."""
    model = create_model(name, num_classes=num_classes, img_size=img_size, overrides=overrides, device="meta")
    total = 0

    def add(_module: nn.Module, _args: Any, out: Any) -> None:
        nonlocal total
        total += sum(t.numel() for t in (out if isinstance(out, tuple | list) else (out,))
                     if isinstance(t, torch.Tensor))

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    hooks = [m.register_forward_hook(add) for m in leaves]
    try:
        with torch.device("meta"):
            model.train()(torch.empty(1, 3, img_size, img_size))
    finally:
        for h in hooks:
            h.remove()
    return total
