"""CUDA equality checks of the optimised paths (the CPU tests' counterparts), before any timing.

Writes ``$OUT/check_cuda.json``: for coatnet_0 at 224 on the GPU, the largest differences of
SDPA vs eager attention (fp32 and bf16 autocast, outputs and gradients), torch.compile vs eager,
cached vs freshly gathered inference bias, channels_last vs NCHW; and which SDPA kernel ran. Also the
trainer's input step on the GPU against the CPU (``pipeline.train.device_input``: uint8 -> normalised
float32 channels_last, MixUp/CutMix with the same draws): the CPU tests show it equals the float path of
before bit for bit; here the same on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import coatnet  # noqa: E402
from pipeline.train.config import AugmentConfig  # noqa: E402
from pipeline.train.device_input import mix_batch, normalize  # noqa: E402
from pipeline.train.transforms import batch_mix  # noqa: E402


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def fwd_bwd(model, x, y, amp):
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(x)
    F.cross_entropy(out.float(), y).backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    return out.detach(), grads


def device_input_check(dev: torch.device, batch: int, img_size: int) -> dict:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (batch, img_size, img_size, 3), dtype=torch.uint8, generator=g)
    y, idx = torch.randint(0, 1000, (batch,), generator=g), torch.arange(batch)
    on_cpu = normalize(pixels, "cpu", mean=mean, std=std)
    on_dev = normalize(pixels.pin_memory() if dev.type == "cuda" else pixels, dev, mean=mean, std=std)
    mix = batch_mix(AugmentConfig(mixup_alpha=0.8, cutmix_alpha=1.0), 1000)
    res = {"normalize_fp32": max_diff(on_dev.cpu(), on_cpu),
           "normalize_bf16": max_diff(on_dev.to(torch.bfloat16).cpu(), on_cpu.to(torch.bfloat16)),
           "channels_last": on_dev.is_contiguous(memory_format=torch.channels_last)}
    for k in range(3):  # MixUp or CutMix, chosen per batch by the seeded draws
        xc, yc = mix_batch(on_cpu, y, idx + k, mix, 0)
        xd, yd = mix_batch(on_dev, y.to(dev), idx + k, mix, 0)
        res[f"mix_{k}"] = {"images": max_diff(xd.cpu(), xc), "labels": max_diff(yd.cpu(), yc)}
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="coatnet_0")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="cuda", help="cpu only to smoke-test this script")
    args = p.parse_args(argv)
    out_dir = Path(os.environ.get("OUT", "out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    res: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                 "model": args.model, "batch": args.batch}
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = coatnet.create_model(args.model, img_size=args.img_size, device=dev).train()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=dev)
    y = torch.randint(0, 1000, (args.batch,), device=dev)
    for amp in (False, True):
        tag = "bf16" if amp else "fp32"
        model.set_attn_impl("sdpa")
        o1, g1 = fwd_bwd(model, x, y, amp)
        model.set_attn_impl("eager")
        o2, g2 = fwd_bwd(model, x, y, amp)
        res[f"sdpa_vs_eager_{tag}"] = {"out": max_diff(o1, o2), "grad": max_diff(g1, g2),
                                       "grad_rel": (g1 - g2).norm().item() / g2.norm().item()}
    model.set_attn_impl("sdpa")
    # which fused kernel accepts the aligned float mask (no silent math fallback)
    attn = model.stages[3].blocks[0].attn
    n = attn.rel_bias.num_positions
    q = torch.randn(args.batch, attn.num_heads, n, attn.head_dim, device=dev, dtype=torch.bfloat16)
    bias = attn.rel_bias(torch.bfloat16)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = {}
    for name, be in [("efficient", SDPBackend.EFFICIENT_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("flash", SDPBackend.FLASH_ATTENTION)]:
        try:
            with sdpa_kernel(be):
                F.scaled_dot_product_attention(q, q, q, attn_mask=bias)
            kernels[name] = "ok"
        except RuntimeError as e:
            kernels[name] = str(e).splitlines()[0][:160]
    res["sdpa_kernels_accepting_mask"] = kernels
    # inference: cached bias vs fresh gather; channels_last vs NCHW
    model.eval()
    with torch.no_grad():
        a = model(x)
        model.set_bias_cache(False)
        b = model(x)
        model.set_bias_cache(True)
        model.channels_last = False
        c = model(x)
        model.channels_last = True
    res["cached_vs_fresh_bias_eval"] = max_diff(a, b)
    res["channels_last_vs_nchw_eval"] = max_diff(a, c)
    # torch.compile (inductor) vs eager, training forward+backward in bf16 autocast
    model.train()
    o_ref, g_ref = fwd_bwd(model, x, y, True)
    t0 = time.time()
    try:
        compiled = torch.compile(model)
        o_c, g_c = fwd_bwd(compiled, x, y, True)
        res["compile_vs_eager_bf16"] = {"out": max_diff(o_c, o_ref),
                                        "grad_rel": (g_c - g_ref).norm().item() / g_ref.norm().item(),
                                        "compile_s": time.time() - t0}
    except Exception as e:  # noqa: BLE001 - the failure is the finding
        res["compile_vs_eager_bf16"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    try:
        res["device_input_vs_cpu"] = device_input_check(dev, args.batch, args.img_size)
    except Exception as e:  # noqa: BLE001 - the failure is the finding
        res["device_input_vs_cpu"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    print(json.dumps(res, indent=2))
    (out_dir / "check_cuda.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
