"""How a training job's ranks are started, defined once.

``LaunchOptions`` is what every command that trains accepts (`coatnet pretrain`, `coatnet finetune`): the
launcher, the ranks, and Ray Train's share (``RayTrainOptions``). The command-line flags are generated from
its fields (``add_arguments``), the flows' ``training`` parameter (``flows.params.TrainingTarget``) extends
it, and ``RayOptions``, what ``pipeline.train.launch`` hands Ray Train, extends the same Ray fields with where
Ray runs. A field's description is its flag's help; ``metavar`` in its schema extra names the flag's value.
"""

from __future__ import annotations

import argparse
import typing
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    TypeAdapter,
    ValidationError,
)
from pydantic.fields import FieldInfo

Launcher = Literal["local", "torchrun", "deepspeed", "ray"]
LAUNCHERS: tuple[str, ...] = typing.get_args(Launcher)
RAY_GROUP = "Ray Train (--launcher ray)"


def _meta(metavar: str) -> dict[str, Any]:
    return {"metavar": metavar}


class RayTrainOptions(BaseModel):
    """Ray Train's share of the launch options (``--launcher ray``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    num_workers: PositiveInt | None = Field(None, description="Ray Train workers (default: --nproc)",
                                            json_schema_extra=_meta("N"))
    gpus_per_worker: NonNegativeFloat = Field(0.0, description="GPUs per worker", json_schema_extra=_meta("G"))
    cpus_per_worker: PositiveFloat = Field(1.0, description="CPUs per worker", json_schema_extra=_meta("C"))
    max_failures: NonNegativeInt = Field(2, description="restarts from the last checkpoint after a lost worker",
                                         json_schema_extra=_meta("N"))
    # Elastic: Ray Train's (min, max) scaling; a restarted group resumes through a universal checkpoint.
    min_workers: PositiveInt | None = Field(None, description="elastic: a restart may continue on as few as N "
                                                              "workers (default: always --num-workers)",
                                            json_schema_extra=_meta("N"))
    # Streaming needs every node to hold the same number of ranks and data.num_canonical_nodes to divide or be a
    # multiple of the node count: with this, launch checks the world size and every elastic restart size first.
    workers_per_node: PositiveInt | None = Field(None, description="workers Ray Train places on one node (its GPUs / "
                                                                   "--gpus-per-worker); needed with --min-workers "
                                                                   "(default: checked when the workers start)",
                                                 json_schema_extra=_meta("N"))


class RayOptions(RayTrainOptions):
    """What ``launch(..., launcher="ray")`` hands Ray Train: the Ray Train options and where Ray runs."""

    address: str | None = Field(None, description="cluster to join (default: RAY_ADDRESS, else a local Ray "
                                                  "is started)", json_schema_extra=_meta("ADDR"))
    # For a local cluster started here (tests, a laptop).
    num_cpus: int | None = None
    object_store_memory: int | None = 200 * 2**20
    extra_init: dict = Field(default_factory=dict)


class LaunchOptions(RayTrainOptions):
    """Where the ranks run and how many: the flags of every command that trains."""

    launcher: Launcher = Field("local", description="local processes, torchrun, the deepspeed launcher, "
                                                    "or Ray Train")
    nproc: PositiveInt = Field(1, description="ranks on this machine", json_schema_extra=_meta("N"))

    @property
    def world_size(self) -> int:
        return (self.num_workers or self.nproc) if self.launcher == "ray" else self.nproc

    def ray_options(self, address: str | None = None, **local: Any) -> RayOptions:
        return RayOptions(address=address, **self.model_dump(include=set(RayTrainOptions.model_fields)), **local)

    def launch_kwargs(self, ray_address: str | None = None) -> dict[str, Any]:
        """Keyword arguments of ``pipeline.train.launch`` (and ``pipeline.finetune.run``)."""
        return {"launcher": self.launcher, "nproc": self.nproc, "ray": self.ray_options(ray_address)}

    def to_argv(self) -> list[str]:
        """The flags that give these options to `coatnet pretrain|finetune` (those not at their default)."""
        argv: list[str] = []
        for name, f in LaunchOptions.model_fields.items():
            value = getattr(self, name)
            if value != f.default:
                argv += [_flag(name), str(value)]
        return argv


# ---------------------------------------------------------------------------------------------
# Command-line flags made from the fields.

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add(group: Any, name: str, f: FieldInfo, flag: str | None = None) -> None:
    check = TypeAdapter(Annotated[f.annotation, *f.metadata] if f.metadata else f.annotation)

    def parse(text: str) -> Any:
        try:
            return check.validate_python(text)
        except ValidationError as e:
            raise argparse.ArgumentTypeError(e.errors()[0]["msg"]) from None

    extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
    choices = typing.get_args(f.annotation) if typing.get_origin(f.annotation) is Literal else None
    default = f"{f.default:g}" if isinstance(f.default, float) else f.default
    help_ = f.description if "(default" in (f.description or "") else f"{f.description} (default: {default})"
    group.add_argument(flag or _flag(name), dest=name, type=parse, default=f.default, choices=choices,
                       metavar=extra.get("metavar"), help=help_)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--launcher --nproc`` and, in their own group, the Ray Train flags with ``--ray-address``."""
    ray_fields = set(RayTrainOptions.model_fields)
    for name, f in LaunchOptions.model_fields.items():
        if name not in ray_fields:
            _add(parser, name, f)
    group = parser.add_argument_group(RAY_GROUP)
    _add(group, "ray_address", RayOptions.model_fields["address"])
    for name in RayTrainOptions.model_fields:
        _add(group, name, LaunchOptions.model_fields[name])


def from_arguments(args: argparse.Namespace) -> LaunchOptions:
    return LaunchOptions(**{name: getattr(args, name) for name in LaunchOptions.model_fields})
