"""One fp32 safetensors file from a DeepSpeed ZeRO checkpoint, by DeepSpeed's own consolidation.

Accepts what a user has at hand, local or in object storage: a checkpoint tag directory
(``.../checkpoints/step_00001000``), a checkpoints root with a ``latest`` file, or a run's
output directory (``{output_dir}/checkpoints/latest``). ``deepspeed.utils.zero_to_fp32``
reads DeepSpeed's own (pickled) files: they are this pipeline's output, not third-party
data; everything after this step is safetensors.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline import storage
from pipeline.artifacts import RunDir
from pipeline.errors import UserError
from pipeline.train.checkpoint import COMPLETE, LATEST

_TAG_FILES = re.compile(r"^(zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt|mp_rank_\d+_model_states\.pt|"
                        r"bf16_zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt|" + re.escape(COMPLETE) + ")$")


class CheckpointNotFound(UserError, FileNotFoundError):
    """No DeepSpeed checkpoint where one was expected."""


def _names(uri: str) -> set[str]:
    """Names directly under ``uri`` (files and first-level directories)."""
    if storage.is_remote(uri):
        return {storage.relative(o.uri, uri).split("/", 1)[0] for o in storage.list_objects(uri)}
    p = Path(uri)
    return {c.name for c in p.iterdir()} if p.is_dir() else set()


def resolve_checkpoint(uri: str, tag: str | None = None) -> tuple[str, str]:
    """``(checkpoints_root, tag)`` for a tag directory, a checkpoints root or a run directory."""
    uri = str(uri).rstrip("/")
    if tag:
        return uri, tag
    names = _names(uri)
    if any(_TAG_FILES.match(n) for n in names):
        parent, _, name = uri.rpartition("/")
        return parent or ".", name
    for root in (uri, storage.join(uri, RunDir.CHECKPOINTS)):
        marker = storage.join(root, LATEST)
        if storage.exists(marker):
            return root, storage.read_text(marker).strip()
    raise CheckpointNotFound(
        f"{uri}: not a DeepSpeed checkpoint (expected a step directory, a directory with '{LATEST}', "
        f"or a run directory with {RunDir.CHECKPOINTS}/{LATEST})"
    )


def consolidate(checkpoint_dir_or_uri: str | Path, out_path: str | Path, *, tag: str | None = None) -> Path:
    """Consolidate a ZeRO checkpoint into one fp32 state dict saved as safetensors at ``out_path``."""
    # lazy: DeepSpeed takes seconds to import and picks an accelerator; only consolidation needs it
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root, tag = resolve_checkpoint(str(checkpoint_dir_or_uri), tag)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="coatnet-consolidate-") as tmp:
        if storage.is_remote(root):
            storage.download_dir(storage.join(root, tag), Path(tmp, tag))
            root = tmp
        tag_dir = Path(root, tag)
        if not tag_dir.is_dir():
            raise CheckpointNotFound(f"{checkpoint_dir_or_uri}: checkpoint '{tag}' is missing under {root}")
        if not any(p.name.endswith("optim_states.pt") for p in tag_dir.iterdir()):
            raise CheckpointNotFound(
                f"{tag_dir}: no ZeRO optimizer shards (a stage-0 checkpoint?); use the run's exported "
                f"{RunDir.WEIGHTS} as finetune.pretrained instead"
            )
        state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
        # safetensors refuses shared storage; zero_to_fp32 may return views into flat buffers.
        tensors = {
            k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous().clone()
            for k, v in state.items() if isinstance(v, torch.Tensor)
        }
    if not tensors:
        raise CheckpointNotFound(f"{checkpoint_dir_or_uri}: the checkpoint holds no tensors")
    tmp_out = out.with_name(f".{out.name}.tmp")
    save_file(tensors, str(tmp_out), metadata={"source": "deepspeed.zero_to_fp32", "tag": tag})
    tmp_out.replace(out)
    return out
