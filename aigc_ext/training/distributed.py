"""Where a training run executes: its device, the attention backend forced for it, and the few
collective operations it needs (no-ops in a single process).

:func:`resolve_device` turns ``run.device`` into this process's device and checks that
``run.precision`` works there; :func:`check_backend_override` checks ``AIGC_EXT_BACKEND`` before
anything is created. A run is distributed when it is launched by ``torchrun`` (``WORLD_SIZE`` > 1
in the environment). Then :func:`setup` joins the process group (NCCL for CUDA, Gloo on the CPU)
unless the caller already did, and :meth:`DistContext.close` leaves it again (only if it joined
it). The model is replicated with DDP (``run.distributed = "ddp"``, the default) or sharded with
FSDP2 (``"fsdp"``, :mod:`aigc_ext.training.fsdp`); :func:`gradient_sync` accumulates gradients
without communication for either.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from aigc_ext.training import fsdp
from aigc_ext.training.config import ConfigError

__all__ = [
    "DistContext",
    "check_backend_override",
    "env_world",
    "gradient_sync",
    "resolve_device",
    "setup",
]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def env_world() -> tuple[int, int, int]:
    """``(world_size, rank, local_rank)`` from the environment torchrun sets (1, 0, 0 without)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"inconsistent WORLD_SIZE={world} and RANK={rank} in the environment")
    return world, rank, local


@dataclass
class DistContext:
    """This process's place in the run and the device collectives use."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    comm_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            if self.comm_device.type == "cuda":
                dist.barrier(device_ids=[self.comm_device.index or 0])
            else:
                dist.barrier()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over all processes (float64 on the CPU on return)."""
        values = values.detach().to(torch.float64)
        if self.enabled:
            values = values.to(self.comm_device)
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values.cpu()

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """For each flag: is it set on any process? (So that all processes act alike.)"""
        if not self.enabled:
            return tuple(bool(f) for f in flags)
        summed = self.all_reduce_sum(torch.tensor([float(bool(f)) for f in flags]))
        return tuple(bool(v > 0) for v in summed.tolist())

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every process's ``tensor`` (same shape and dtype everywhere), on the CPU, by rank."""
        if not self.enabled:
            return [tensor.detach().cpu()]
        wide = tensor.detach().to(torch.int64 if not tensor.is_floating_point() else tensor.dtype)
        wide = wide.to(self.comm_device)
        out = [torch.empty_like(wide) for _ in range(self.world_size)]
        dist.all_gather(out, wide)
        return [t.to(tensor.dtype).cpu() for t in out]

    def close(self) -> None:
        """Leaves the process group if :func:`setup` joined it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def setup(device: torch.device) -> DistContext:
    """Joins the process group when launched with ``WORLD_SIZE`` > 1; returns the context.

    ``device`` is the device this process trains on: CUDA selects NCCL (and that device for
    the collectives), anything else Gloo.
    """
    world, rank, local = env_world()
    if world == 1:
        return DistContext()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
        owns = True
    elif dist.get_world_size() != world or dist.get_rank() != rank:
        raise RuntimeError(
            f"the process group (world size {dist.get_world_size()}, rank {dist.get_rank()}) "
            f"does not match WORLD_SIZE={world}, RANK={rank}"
        )
    comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
    return DistContext(world, rank, local, comm, owns)


@contextlib.contextmanager
def gradient_sync(module: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Gradient accumulation without communication: while ``enabled`` is False, backward
    passes of an FSDP or DDP module leave their gradients local (FSDP:
    ``set_requires_gradient_sync``, DDP: ``no_sync``); otherwise nothing changes."""
    if enabled:
        yield
    elif fsdp.is_sharded(module):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    elif hasattr(module, "no_sync"):
        with module.no_sync():
            yield
    else:
        yield


def resolve_device(
    spec: str, precision: str, local_rank: int = 0, world_size: int = 1
) -> torch.device:
    """The torch device for ``run.device`` and a check that ``run.precision`` works there.

    ``auto`` is CUDA when available, else the CPU. Under torchrun with several processes each
    one uses ``cuda:<LOCAL_RANK>``. On the CPU, ``fp16`` is refused (mixed precision there is
    ``bf16`` autocast; ``fp16`` needs a GradScaler on CUDA).
    """
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"run.device is {spec!r} but CUDA is not available here; use 'cpu' or 'auto'"
            )
        if world_size > 1:
            device = torch.device("cuda", local_rank)
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"run.device {str(device)!r}: this machine has {torch.cuda.device_count()} GPU(s)"
            )
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"run.precision 'bf16' is not supported by {device}; use fp16/fp32")
    elif precision == "fp16":
        raise ConfigError(
            "run.precision 'fp16' needs a CUDA device (it trains with a GradScaler); "
            "on the CPU use 'fp32' or 'bf16' (autocast)"
        )
    return device


def check_backend_override(device: torch.device | None = None) -> None:
    """Checks ``AIGC_EXT_BACKEND`` before a run creates anything: when set, it must name a
    registered attention backend that is available here (and runs on ``device``, if given).

    The variable is otherwise read only at the first attention call, after the data and the
    model are built and the output directory is created. Raises :class:`ConfigError`.
    """
    name = os.environ.get("AIGC_EXT_BACKEND") or None  # empty: not set, as the dispatcher reads it
    if name is None:
        return
    import aigc_ext

    infos = {b.name: b for b in aigc_ext.backends()}
    where = f"environment variable AIGC_EXT_BACKEND={name!r}"
    info = infos.get(name)
    if info is None:
        raise ConfigError(
            f"{where}: unknown attention backend; registered: {', '.join(sorted(infos))}"
        )
    if not info.available:
        raise ConfigError(f"{where}: the backend is not available here: {info.reason}")
    if device is not None and device.type not in info.devices:
        raise ConfigError(
            f"{where}: the backend runs on {', '.join(info.devices)}, the run on {device.type}"
        )


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512_BF16 or AMX-BF16 on x86).

    Read from ``/proc/cpuinfo``; where that is not readable (not Linux), or on a CPU that is not
    x86, the answer is True: only a CPU known to lack the instructions is second-guessed.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return True


def effective_precision(precision: str, device: torch.device, force: bool = False) -> str:
    """The precision a run trains in: ``precision``, except that ``bf16`` on a CPU without bf16
    matmul hardware becomes ``fp32`` (with a warning) unless ``force`` (``run.force_precision``).

    On such CPUs torch computes bf16 matmuls at about 0.3 GFLOP/s, so a bf16 autocast step of a
    small GPT-2 takes minutes where fp32 takes a second.
    """
    if precision != "bf16" or device.type != "cpu" or force or cpu_has_bf16_matmul():
        return precision
    logging.getLogger("aigc_ext.training").warning(
        "run.precision 'bf16': this CPU has no bf16 matmul hardware (no AVX512_BF16 or "
        "AMX-BF16), where torch's bf16 matmuls are hundreds of times slower than fp32; training "
        "in fp32 instead (set run.force_precision = true to keep bf16)"
    )
    return "fp32"
