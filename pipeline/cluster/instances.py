"""The GPU and CPU instance types the renderer knows, with the figures that sizing and validation need.

Figures are AWS's published specifications for each type. ``bf16_ceiling_tflops`` is the dense bf16
matmul rate used as the utilisation ceiling: measured on an H200 (790 TFLOP/s, see the project's GPU notes);
H100 has the same tensor cores and is taken equal; A100 is scaled by the ratio of the datasheet peaks
(312 / 989).
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3
TB = 1000**4


@dataclass(frozen=True)
class InstanceType:
    name: str
    gpus: int
    gpu: str
    gpu_memory_gib: float
    vcpus: int
    memory_gib: int
    nvme_bytes: int  # node-local instance-store NVMe, all devices together
    efa_interfaces: int  # 0: no EFA
    bf16_ceiling_tflops: float = 0.0

    @property
    def kind(self) -> str:
        return "gpu" if self.gpus else "cpu"


_H200 = 790.0
_H100 = 790.0
_A100 = 790.0 * 312 / 989

INSTANCE_TYPES: dict[str, InstanceType] = {
    t.name: t
    for t in (
        InstanceType("p5.48xlarge", 8, "H100", 80, 192, 2048, 8 * 3840 * 1000**3, 32, _H100),
        InstanceType("p5e.48xlarge", 8, "H200", 141, 192, 2048, 8 * 3840 * 1000**3, 32, _H200),
        InstanceType("p5en.48xlarge", 8, "H200", 141, 192, 2048, 8 * 3840 * 1000**3, 16, _H200),
        InstanceType("p4d.24xlarge", 8, "A100", 40, 96, 1152, 8 * 1000 * 1000**3, 4, _A100),
        InstanceType("p4de.24xlarge", 8, "A100", 80, 96, 1152, 8 * 1000 * 1000**3, 4, _A100),
        # CPU types for the head node and the preprocessing workers.
        InstanceType("m6i.2xlarge", 0, "", 0, 8, 32, 0, 0),
        InstanceType("m6i.4xlarge", 0, "", 0, 16, 64, 0, 0),
        InstanceType("c6i.16xlarge", 0, "", 0, 64, 128, 0, 0),
        InstanceType("c6id.16xlarge", 0, "", 0, 64, 128, 3800 * 1000**3, 0),
    )
}


def get_instance(name: str, *, kind: str | None = None) -> InstanceType:
    """The catalogue entry for ``name``; a clear error listing the known types otherwise."""
    known = [n for n, t in INSTANCE_TYPES.items() if kind is None or t.kind == kind]
    t = INSTANCE_TYPES.get(name)
    if t is None or (kind is not None and t.kind != kind):
        what = f"{kind.upper()} instance type" if kind else "instance type"
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(known)}")
    return t
