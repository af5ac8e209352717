"""Planning estimates for large CoAtNets on GPU clusters: memory per GPU, throughput, wall-clock.

Everything here is an estimate derived from one measurement and stated assumptions, never a promise:

* Measured (project GPU notes, shared/device/README.md): timm ``coatnet_5_224`` trains at 207 images/s on
  one H200 at batch 64 (AdamW, bf16 autocast, eager), 180 TFLOP/s counted as 6 x MACs, i.e. 22.8% of the
  790 TFLOP/s dense bf16 ceiling, with a 55 GiB memory peak.
* Throughput of another model or resolution on one GPU = that same utilisation (MFU) x the ceiling of the
  GPU / (6 x MACs per image), or 8 x MACs with activation checkpointing (one extra forward).
* Cluster throughput = per-GPU throughput x GPUs x a scaling efficiency (default 0.9 with EFA).
* Memory per GPU = model states under ZeRO (2 B bf16 weights + 2 B grads + 12 B fp32 master/Adam per
  parameter, partitioned by stage as in the ZeRO paper; the 12 B move to host memory with the optimizer
  offloaded; the sharded EMA adds 4 B/N) + a fixed overhead + micro-batch x activations per image.
  Activations per image are proportional to the sum over blocks of tokens x channels; the factor is
  calibrated on the measurement above (55 GiB minus 16 B/param of fp32 AdamW state, over 64 images).
  With checkpointing each block keeps only its bf16 input plus one block's full activations. Attention
  maps are assumed not stored (fused attention kernels).
* The split of model states into replicated and partitioned bytes is checked against a measurement of
  the trainer itself (``benchmarks/zero_memory.py``, CPU, fp32, 1 and 2 ranks): ``MEASURED_ZERO``.

MACs and parameters come from ``coatnet.count`` when the model package provides it, else from the paper's
table (``MACS_SOURCE`` says which was used).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from pipeline.cluster.instances import GiB, InstanceType, get_instance

# --- the one measurement -------------------------------------------------------------------------
MEASURED_MODEL = "coatnet_5"
MEASURED_IMG_SIZE = 224
MEASURED_BATCH = 64
MEASURED_IMAGES_PER_S = 207.0
MEASURED_TFLOPS = 180.0
MEASURED_PEAK_GIB = 55.0
CEILING_TFLOPS = 790.0
MEASURED_MFU = MEASURED_TFLOPS / CEILING_TFLOPS

# --- assumptions (change them here, the table follows) --------------------------------------------
SCALING_EFFICIENCY = 0.9
OVERHEAD_GIB = {0: 6.0, 1: 6.0, 2: 6.0, 3: 8.0}  # CUDA context, NCCL buffers, ZeRO-3 live-parameter buffers
MEMORY_HEADROOM = 0.9  # plan to use at most this share of GPU memory (fragmentation)
IN21K_IMAGES = 13_000_000
EPOCHS = 90

# The paper's layouts: per stage a list of (blocks, width); stage i works at 1/2^(i+1) of the input side.
# CoAtNet-6/7 put MBConv blocks and the wide transformer blocks both at 1/16 (stage 3 has two parts).
LAYOUTS: dict[str, list[list[tuple[int, int]]]] = {
    "coatnet_0": [[(2, 64)], [(2, 96)], [(3, 192)], [(5, 384)], [(2, 768)]],
    "coatnet_1": [[(2, 64)], [(2, 96)], [(6, 192)], [(14, 384)], [(2, 768)]],
    "coatnet_2": [[(2, 128)], [(2, 128)], [(6, 256)], [(14, 512)], [(2, 1024)]],
    "coatnet_3": [[(2, 192)], [(2, 192)], [(6, 384)], [(14, 768)], [(2, 1536)]],
    "coatnet_4": [[(2, 192)], [(2, 192)], [(12, 384)], [(28, 768)], [(2, 1536)]],
    "coatnet_5": [[(2, 192)], [(2, 256)], [(12, 512)], [(28, 1280)], [(2, 2048)]],
    "coatnet_6": [[(2, 192)], [(2, 192)], [(4, 384)], [(8, 768), (42, 1536)], [(2, 2048)]],
    "coatnet_7": [[(2, 192)], [(2, 256)], [(4, 512)], [(8, 1024), (42, 2048)], [(2, 3072)]],
}

# The paper's table: parameters and GMACs at 512 ("FLOPs" there are multiply-adds). Used only when the model
# package cannot count; 224 figures are then scaled by the token count, a slight over-estimate because
# attention's quadratic term shrinks faster.
PAPER_PARAMS = {
    "coatnet_0": 25e6, "coatnet_1": 42e6, "coatnet_2": 75e6, "coatnet_3": 168e6, "coatnet_4": 275e6,
    "coatnet_5": 688e6, "coatnet_6": 1.47e9, "coatnet_7": 2.44e9,
}
PAPER_GMACS = {  # (img_size, GMACs) pairs read from the paper
    "coatnet_0": {224: 4.2, 384: 13.4}, "coatnet_1": {224: 8.4, 384: 27.4},
    "coatnet_2": {224: 15.7, 384: 49.8, 512: 96.7}, "coatnet_3": {224: 34.7, 384: 107.4, 512: 203.1},
    "coatnet_4": {384: 189.5, 512: 360.9}, "coatnet_5": {512: 812.0}, "coatnet_6": {512: 1521.0},
    "coatnet_7": {512: 2586.0},
}


def known_models() -> list[str]:
    """Model names the renderer accepts: the model package's registry when present, else the paper's."""
    try:
        # lazy and optional: cluster files render without torch, from the paper's tables
        import coatnet

        return sorted(set(coatnet.list_models()))
    except (ImportError, AttributeError):
        return sorted(LAYOUTS)


def _paper_count(name: str, img_size: int) -> tuple[float, float]:
    table = PAPER_GMACS[name]
    ref = min(table, key=lambda r: abs(r - img_size))
    return PAPER_PARAMS[name], table[ref] * 1e9 * (img_size / ref) ** 2


def count(name: str, img_size: int) -> tuple[float, float, str]:
    """(parameters, MACs per image, source) for ``name`` at ``img_size``."""
    try:
        import coatnet  # lazy and optional, as in known_models

        params, macs = coatnet.count(name, img_size)
        return float(params), float(macs), "coatnet.count"
    except (ImportError, AttributeError, KeyError, ValueError):
        if name not in PAPER_GMACS:
            raise ValueError(f"no parameter/MAC count for {name!r}: the model package cannot count it") from None
        params, macs = _paper_count(name, img_size)
        return params, macs, "paper table"


def token_channels(name: str, img_size: int) -> tuple[float, float]:
    """(sum over blocks of tokens x width, largest single block's tokens x width) per image."""
    if name not in LAYOUTS:
        raise ValueError(f"no layout for {name!r}; sizing knows {', '.join(LAYOUTS)}")
    total, largest = 0.0, 0.0
    for stage, parts in enumerate(LAYOUTS[name]):
        tokens = (img_size / 2 ** (stage + 1)) ** 2
        for blocks, width in parts:
            total += blocks * tokens * width
            largest = max(largest, tokens * width)
    return total, largest


def _bytes_per_token_channel() -> float:
    # fp32 AdamW with bf16 autocast keeps 16 B/param (weights, grads, two moments) in the measured run.
    params = PAPER_PARAMS[MEASURED_MODEL]
    act_bytes = MEASURED_PEAK_GIB * GiB - 16 * params
    tc, _ = token_channels(MEASURED_MODEL, MEASURED_IMG_SIZE)
    return act_bytes / (MEASURED_BATCH * tc)


BYTES_PER_TOKEN_CHANNEL = _bytes_per_token_channel()


# A model without a layout here (a timm model, the small CPU CoAtNets) is sized by the elements its leaf
# modules output in one training forward (pipeline.models.activation_elements, a meta-device forward),
# calibrated on the same measurement: timm coatnet_5_224 at 224 outputs 463,005,651 such elements per image
# (`python -c "from pipeline import models; print(models.activation_elements('timm/coatnet_5_224',
# num_classes=21843, img_size=224))"`). With checkpointing no saving is assumed: its blocks are not known here.
MEASURED_ACTIVATION_ELEMENTS = 463_005_651
BYTES_PER_ACTIVATION_ELEMENT = (MEASURED_PEAK_GIB * GiB - 16 * PAPER_PARAMS[MEASURED_MODEL]) / (
    MEASURED_BATCH * MEASURED_ACTIVATION_ELEMENTS)


def activation_bytes_per_image(name: str, img_size: int, checkpointing: bool,
                               activation_elements: float | None = None) -> float:
    """Bytes of activations per image: from the paper's layout of ``name``, or, for a model without one, from
    its ``activation_elements`` per image."""
    if name not in LAYOUTS and activation_elements is not None:
        return BYTES_PER_ACTIVATION_ELEMENT * activation_elements
    total, largest = token_channels(name, img_size)
    if not checkpointing:
        return BYTES_PER_TOKEN_CHANNEL * total
    return 2.0 * total + BYTES_PER_TOKEN_CHANNEL * largest


# --- the memory model of model states ------------------------------------------------------------
# Bytes per parameter per GPU under DeepSpeed ZeRO with bf16 mixed precision, as (replicated on every GPU,
# partitioned over the N data-parallel GPUs): bf16 weights 2, bf16 gradients 2, fp32 master weights 4 and
# Adam's two fp32 moments 8 (the ZeRO paper's 2 + 2 + 12).
STATE_BYTES: dict[int, tuple[float, float]] = {0: (16.0, 0.0), 1: (4.0, 12.0), 2: (2.0, 14.0), 3: (0.0, 16.0)}
OPTIMIZER_BYTES = 12.0  # fp32 master + moments: host memory when the optimizer is offloaded (ZeRO-Offload)
EMA_BYTES = 4.0  # the sharded fp32 EMA (pipeline/train/ema.py): partitioned like, and beside, the fp32 masters
# The same layout in fp32, what a CPU run holds after a step (ZeRO-2 frees its gradients after the step,
# ZeRO-3 keeps its gradient partition): ZeRO-2 4 B weights + 12/N master and moments, ZeRO-3 20/N (4 B weights,
# 4 B gradients, 4 B master copy, 8 B moments). MEASURED_ZERO is compared with it; what the measurement
# shows beyond the replicated part is DeepSpeed's gradient-reduction bucket (reduce_bucket_size, 5e8
# elements: a fixed buffer of which a model smaller than the bucket touches about 4 B per parameter).
FP32_STATE_BYTES: dict[int, tuple[float, float]] = {2: (4.0, 12.0), 3: (0.0, 20.0)}
BUCKET_BYTES_MAX = 4.0  # fp32 bytes per parameter the reduce bucket may add when the model is smaller than it

# Measured: `python benchmarks/zero_memory.py` (coatnet_2, 73.5M parameters, 64x64, micro-batch 4, fp32, CPU,
# gloo, 2 shared cores): model-state bytes per parameter per rank (RSS after a step over the base RSS) on 1
# and 2 ranks, fitted as replicated + partitioned / N; the EMA's bytes per parameter per rank; the EMA
# update's time as a share of a step (median); activation bytes per image (forward at 2M minus at M images).
MEASURED_ZERO: dict = {
    "model": "coatnet_2", "params": 73_472_712, "img_size": 64, "micro_batch": 4,
    "fit": {2: {"replicated": 5.4, "partitioned": 12.0, "ratio_2_to_1": 0.66},
            3: {"replicated": 5.8, "partitioned": 19.8, "ratio_2_to_1": 0.61}},
    "ema_bytes_per_param": {1: 4.0, 2: 2.0},
    "ema_cost_ratio": 0.0063,
    "activation_mib_per_image": 29.5,
}


def model_state_bytes(params: float, zero_stage: int, world_size: int, *, offload: bool = False,
                      ema: bool = False) -> float:
    """Per-GPU bytes of weights, gradients, optimizer state (and the sharded EMA) under DeepSpeed ZeRO, bf16.

    ``offload``: the optimizer (fp32 masters, moments; the EMA with them) lives in host memory.
    """
    if zero_stage not in STATE_BYTES:
        raise ValueError(f"zero stage must be 0, 1, 2 or 3, not {zero_stage}")
    if offload and zero_stage == 0:
        raise ValueError("optimizer offload needs ZeRO stage 1, 2 or 3")
    n = max(world_size, 1)
    replicated, partitioned = STATE_BYTES[zero_stage]
    if offload:
        partitioned -= OPTIMIZER_BYTES
    elif ema:
        partitioned += EMA_BYTES if zero_stage else 0.0
        replicated += 0.0 if zero_stage else EMA_BYTES
    return (replicated + partitioned / n) * params


def host_state_bytes(params: float, zero_stage: int, world_size: int, *, offload: bool, ema: bool = False) -> float:
    """Per-GPU bytes the offloaded optimizer (and EMA) keep in host memory (0 without offload)."""
    if not offload:
        return 0.0
    return (OPTIMIZER_BYTES + (EMA_BYTES if ema else 0.0)) * params / max(world_size, 1)


def memory_gib(
    name: str, img_size: int, *, params: float, zero_stage: int, world_size: int, micro_batch: int,
    checkpointing: bool, offload: bool = False, ema: bool = False, activation_elements: float | None = None,
) -> float:
    states = model_state_bytes(params, zero_stage, world_size, offload=offload, ema=ema)
    acts = micro_batch * activation_bytes_per_image(name, img_size, checkpointing, activation_elements)
    return (states + acts) / GiB + OVERHEAD_GIB[zero_stage]


def images_per_s_per_gpu(macs: float, instance: InstanceType, checkpointing: bool, mfu: float = MEASURED_MFU) -> float:
    flops_per_image = (8 if checkpointing else 6) * macs
    return mfu * instance.bf16_ceiling_tflops * 1e12 / flops_per_image


@dataclass(frozen=True)
class Plan:
    model: str
    img_size: int
    instance_type: str
    nodes: int
    gpus: int
    zero_stage: int
    checkpointing: bool
    micro_batch: int
    grad_accum: int
    global_batch: int
    params: float
    macs: float
    memory_gib: float
    images_per_s: float
    days: float
    gpu_hours: float
    macs_source: str
    offload: bool = False
    ema: bool = False
    state_gib: float = 0.0  # model states (and EMA) per GPU
    activation_gib: float = 0.0  # micro-batch x activations per image
    host_gib_per_node: float = 0.0  # offloaded optimizer state per node

    def as_dict(self) -> dict:
        return asdict(self)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def fit(
    name: str, img_size: int, *, instance_type: str, nodes: int, gpus_per_node: int | None = None,
    global_batch: int = 4096, min_micro: int = 8, offload: tuple[bool, ...] = (False,), ema: bool = False,
) -> Plan | None:
    """The cheapest memory-feasible (ZeRO stage, offload, checkpointing, micro-batch) for this cluster, or None.

    Preference order: ZeRO-2 before ZeRO-3 (less communication), no checkpointing before checkpointing
    (a third less compute), and optimizer offload (host Adam, PCIe traffic every step) only when nothing
    else fits; the first that fits a micro-batch of at least ``min_micro`` wins, else the one with the
    largest micro-batch. Micro-batches are divisors of the per-GPU share of the global batch. ``ema``:
    the sharded EMA is kept (fine-tuning recipes).
    """
    inst = get_instance(instance_type, kind="gpu")
    gpus = nodes * (gpus_per_node or inst.gpus)
    if global_batch % gpus:
        return None
    params, macs, source = count(name, img_size)
    budget = inst.gpu_memory_gib * MEMORY_HEADROOM
    best: tuple[int, int, bool, bool] | None = None
    options = [(zero, ckpt, off) for off in offload for zero, ckpt in ((2, False), (3, False), (2, True), (3, True))]
    for zero, ckpt, off in options:
        fits = [
            m for m in divisors(global_batch // gpus)
            if memory_gib(name, img_size, params=params, zero_stage=zero, world_size=gpus, micro_batch=m,
                          checkpointing=ckpt, offload=off, ema=ema) <= budget
        ]
        if not fits:
            continue
        micro = max(fits)
        if micro >= min_micro or micro == global_batch // gpus:
            best = (zero, micro, ckpt, off)
            break
        if best is None or micro > best[1]:
            best = (zero, micro, ckpt, off)
    if best is None:
        return None
    zero, micro, ckpt, off = best
    per_gpu = images_per_s_per_gpu(macs, inst, ckpt)
    cluster = per_gpu * gpus * (SCALING_EFFICIENCY if nodes > 1 else 1.0)
    seconds = EPOCHS * IN21K_IMAGES / cluster
    states = model_state_bytes(params, zero, gpus, offload=off, ema=ema) / GiB
    return Plan(
        model=name, img_size=img_size, instance_type=instance_type, nodes=nodes, gpus=gpus, zero_stage=zero,
        checkpointing=ckpt, micro_batch=micro, grad_accum=global_batch // (gpus * micro),
        global_batch=global_batch, params=params, macs=macs,
        memory_gib=memory_gib(name, img_size, params=params, zero_stage=zero, world_size=gpus,
                              micro_batch=micro, checkpointing=ckpt, offload=off, ema=ema),
        images_per_s=cluster, days=seconds / 86400, gpu_hours=seconds / 3600 * gpus, macs_source=source,
        offload=off, ema=ema, state_gib=states,
        activation_gib=micro * activation_bytes_per_image(name, img_size, ckpt) / GiB,
        host_gib_per_node=host_state_bytes(params, zero, gpus, offload=off, ema=ema) * (gpus // nodes) / GiB,
    )


def sizing_table(
    models: Iterable[str] = ("coatnet_5", "coatnet_6", "coatnet_7"),
    img_sizes: Iterable[int] = (224, 512),
    *, instance_type: str = "p5.48xlarge", target_days: float = 14.0, max_nodes: int = 64,
    global_batch: int = 4096,
) -> list[Plan]:
    """For each model and size: the smallest power-of-two node count whose 90-epoch 21K run fits
    ``target_days`` (or ``max_nodes`` when none does), with the configuration that fits in memory."""
    rows = []
    for name in models:
        for size in img_sizes:
            chosen = None
            nodes = 1
            while nodes <= max_nodes:
                plan = fit(name, size, instance_type=instance_type, nodes=nodes, global_batch=global_batch)
                if plan is not None:
                    chosen = plan
                    if plan.days <= target_days:
                        break
                nodes *= 2
            if chosen is None:
                raise ValueError(f"{name} at {size} does not fit on up to {max_nodes} x {instance_type}")
            rows.append(chosen)
    return rows


def format_table(rows: list[Plan]) -> str:
    """The runbook's markdown table."""
    head = (
        "| model | img | params | GMACs/img | instance | nodes (GPUs) | ZeRO | act. ckpt | micro | accum "
        "| est. GiB/GPU | est. img/s | est. days (90 ep) | GPU-hours |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for p in rows:
        lines.append(
            f"| {p.model} | {p.img_size} | {p.params / 1e9:.2f}B | {p.macs / 1e9:.0f} | {p.instance_type} "
            f"| {p.nodes} ({p.gpus}) | {p.zero_stage} | {'yes' if p.checkpointing else 'no'} | {p.micro_batch} "
            f"| {p.grad_accum} | {p.memory_gib:.0f} | {p.images_per_s:,.0f} | {p.days:.1f} | {p.gpu_hours:,.0f} |"
        )
    sources = sorted({p.macs_source for p in rows})
    lines.append("")
    lines.append(
        f"MACs from {', '.join(sources)}; MFU {MEASURED_MFU:.1%} (measured, timm coatnet_5 at 224, one H200); "
        f"scaling efficiency {SCALING_EFFICIENCY:.0%} across nodes; {EPOCHS} epochs x {IN21K_IMAGES / 1e6:.0f}M "
        f"images; global batch {rows[0].global_batch if rows else ''}; memory budget {MEMORY_HEADROOM:.0%} of "
        f"GPU memory; activations {BYTES_PER_TOKEN_CHANNEL:.1f} B per token-channel (calibrated)."
    )
    return "\n".join(lines)


# --- ZeRO plans for a given number of GPUs (the runbook's second table) ------------------------------------
ZERO_INSTANCE = "p5e.48xlarge"  # 8 x H200 141 GB
ZERO_GPUS = (8, 16, 64)
# (what, img_size, global batch, EMA): 21K pretraining at 224 as in the paper (no EMA), 1K fine-tuning at 512
# (batch 512, EMA kept as the paper's fine-tuning does).
ZERO_RUNS = (("pretrain", 224, 4096, False), ("finetune", 512, 512, True))


def zero_plans(
    models: Iterable[str] = ("coatnet_5", "coatnet_6", "coatnet_7"), gpu_counts: Iterable[int] = ZERO_GPUS,
    *, instance_type: str = ZERO_INSTANCE, runs: Iterable[tuple[str, int, int, bool]] = ZERO_RUNS,
) -> list[tuple[str, Plan | None]]:
    """For each run kind, model and GPU count: the ZeRO stage, offload, checkpointing and micro-batch chosen."""
    inst = get_instance(instance_type, kind="gpu")
    rows = []
    for what, size, batch, ema in runs:
        for name in models:
            for gpus in gpu_counts:
                if gpus % inst.gpus and gpus > inst.gpus:
                    raise ValueError(f"{gpus} GPUs is not a whole number of {instance_type} nodes ({inst.gpus} GPUs)")
                nodes, per_node = (gpus // inst.gpus, inst.gpus) if gpus >= inst.gpus else (1, gpus)
                rows.append((what, fit(name, size, instance_type=instance_type, nodes=nodes, gpus_per_node=per_node,
                                       global_batch=batch, offload=(False, True), ema=ema)))
    return rows


def format_zero_table(rows: list[tuple[str, Plan | None]]) -> str:
    """The runbook's ZeRO table: the choice per model and GPU count, and the memory it is expected to take."""
    head = (
        "| run | model | img | params | GPUs (H200) | ZeRO | offload | act. ckpt | micro x accum | EMA "
        "| states GiB/GPU | activations GiB/GPU | est. GiB/GPU | host GiB/node |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for what, p in rows:
        if p is None:
            lines.append(f"| {what} | - | - | - | - | does not fit | | | | | | | | |")
            continue
        lines.append(
            f"| {what} | {p.model} | {p.img_size} | {p.params / 1e9:.2f}B | {p.gpus} | {p.zero_stage} "
            f"| {'optimizer' if p.offload else 'no'} | {'yes' if p.checkpointing else 'no'} "
            f"| {p.micro_batch} x {p.grad_accum} | {'yes' if p.ema else 'no'} | {p.state_gib:.1f} "
            f"| {p.activation_gib:.1f} | {p.memory_gib:.0f} | {p.host_gib_per_node:.0f} |"
        )
    lines.append("")
    states = " / ".join(f"ZeRO-{k} {r:g} + {q:g}/N" for k, (r, q) in STATE_BYTES.items() if k >= 2)
    lines.append(
        f"Modelled (bf16 mixed precision): model states {states} "
        f"B/param/GPU, the sharded EMA +{EMA_BYTES:g}/N, optimizer offload moves {OPTIMIZER_BYTES:g}/N to host "
        f"memory; activations {BYTES_PER_TOKEN_CHANNEL:.1f} B per token-channel (calibrated on the H200 "
        f"measurement); overhead {OVERHEAD_GIB[2]:g} GiB (ZeRO-2) / {OVERHEAD_GIB[3]:g} GiB (ZeRO-3); budget "
        f"{MEMORY_HEADROOM:.0%} of GPU memory." + (f" {measured_note()}" if MEASURED_ZERO else "")
    )
    return "\n".join(lines)


def measured_note() -> str:
    """One sentence on the CPU measurement the state model is checked against."""
    m = MEASURED_ZERO
    fits = "; ".join(f"ZeRO-{k} {v['replicated']:.1f} + {v['partitioned']:.1f}/N"
                     for k, v in sorted(m["fit"].items()))
    model = " / ".join(f"ZeRO-{k} {r:g} + {q:g}/N" for k, (r, q) in FP32_STATE_BYTES.items())
    return (f"Measured (benchmarks/zero_memory.py, {m['model']} at {m['img_size']}, fp32 on CPU, 1 and 2 ranks): "
            f"{fits} B/param/rank (the fp32 model: {model}, plus the reduce bucket); ZeRO-3 on 2 ranks holds "
            f"{m['fit'][3]['ratio_2_to_1']:.2f}x the model states of 1 rank; the EMA adds "
            f"{m['ema_bytes_per_param'][2]:g} B/param/rank on 2 ranks and its update costs {m['ema_cost_ratio']:.1%} "
            "of a step.")


def activation_bytes_per_token_channel_measured() -> float:
    """The CPU measurement's activations (fp32, eager) per token-channel, beside the GPU calibration."""
    m = MEASURED_ZERO
    total, _ = token_channels(m["model"], m["img_size"])
    return m["activation_mib_per_image"] * 2**20 / total
