"""Where and how a process runs models: device, precision, rank, seeds, RNG snapshots, threads.

    from pipeline.runtime import Runtime, seed_everything
    seed_everything(0)
    rt = Runtime.create("auto", images=True)      # CUDA when there is one, else CPU
    model = rt.prepare(model); ddp_model = rt.wrap(model)
    with rt.autocast(): z = model(rt.to_device(x))

The one device and precision policy, used by teacher training, caching, distillation and
evaluation alike:
- on CUDA, image models (inputs ``(C, H, W)``) run under bf16 autocast in channels_last
  memory format; every loss, cached logit, entropy and p_gt is computed from logits cast to
  float32 after the forward pass;
- everything else (CPU, vector inputs) runs in float32.

Under ``torchrun`` (environment ``WORLD_SIZE > 1``) ``Runtime.create`` joins the process
group (NCCL on CUDA, gloo on CPU), picks ``cuda:LOCAL_RANK``, and ``wrap`` returns a
DistributedDataParallel module; with one process everything is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn

from pipeline.errors import UserError


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads (None: leave them), then restore the count.

    A fixed count makes CPU results bit-identical across runs and processes."""
    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices): same seed, same run on CPU."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global RNG state, as plain data a weights_only checkpoint can hold."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_main_process() -> bool:
    """Rank 0 under torchrun (or no torchrun): the process that scores models, writes reports and prints."""
    return int(os.environ.get("RANK", "0")) == 0


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; a CUDA device that is absent is a UserError."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device: expected auto, cpu, cuda or cuda:N, found {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device: {device!r} requested but CUDA is not available")
    return dev


@dataclass
class Runtime:
    """One training process: its device, its rank among ``world_size`` and its precision."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    images: bool = False

    @classmethod
    def create(cls, device: str | torch.device = "auto", *, images: bool = False) -> "Runtime":
        """The runtime of this process; joins the torchrun process group when WORLD_SIZE > 1."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        dev = resolve_device(device)
        if world_size <= 1:
            return cls(dev, images=images)
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        return cls(dev, rank=dist.get_rank(), world_size=dist.get_world_size(), images=images)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def for_model(cls, device: str | torch.device, input_shape: tuple[int, ...]) -> "Runtime":
        """A single-process runtime for a model of inputs ``input_shape`` (caching, evaluation)."""
        return cls(resolve_device(device), images=len(tuple(input_shape)) == 3)

    @property
    def amp(self) -> bool:
        """bf16 autocast and channels_last: image models on CUDA (the module's policy)."""
        return self.device.type == "cuda" and self.images

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for image models on CUDA; nothing elsewhere."""
        if self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device (channels_last for images on CUDA)."""
        model = model.to(self.device)
        if self.amp:
            model = model.to(memory_format=torch.channels_last)
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel around ``model`` when there are several processes."""
        if self.world_size <= 1 or not any(p.requires_grad for p in model.parameters()):
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.amp and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over all processes (in place); identity with one process."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
