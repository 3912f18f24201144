"""Data-parallel training over the processes `accelerate launch` started (torchrun underneath; gloo on the CPU,
NCCL on GPUs): each process takes its share of every batch, the loss and the gradients are summed over all of
them before each optimizer step (so every process makes the same update), and only the main process writes files
and logs. With one process nothing here communicates: every method returns its local value at no cost.

train.batch_size is the global batch: the data order, the plan and a resumed run's position are the same on any
number of processes, and each process trains on batch_size / N rows of every batch.

Gradients are summed with torch.distributed.all_reduce once per optimizer step instead of wrapping the models in
DistributedDataParallel: what trains is adapters inside frozen models, embedding rows or whole models, some
parameters stop training mid-run (DreamBooth's text encoder), and a process may have no rows at all in a batch
smaller than the number of processes (a bucket's last one) — one reduction before the step handles every case,
and accumulating over several batches needs no `no_sync`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from library.data.batches import hash_ints
from library.training.device import resolve_device
from library.training.launch import launch_info

_BUCKET_ELEMENTS = 1 << 24  # gradients summed per all_reduce call: 64 MiB of fp32
Result = TypeVar("Result")


@dataclass(frozen=True)
class Share:
    """The rows [start, stop) of a batch of `total` samples that this process trains on."""

    start: int
    stop: int
    total: int

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.total

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)


class Processes:
    """The processes training together; `Processes()` is a run on its own."""

    def __init__(self, count: int = 1, rank: int = 0, device: torch.device | None = None):
        self.count = count
        self.rank = rank
        self.device = device or torch.device("cpu")  # where collectives put their tensors (NCCL: the GPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, total: int) -> Share:
        """This process's contiguous rows of a batch of `total`: equal parts, the first processes one more row
        when `total` does not divide (only a bucket's last, partial batch)."""
        base, extra = divmod(total, self.count)
        start = self.rank * base + min(self.rank, extra)
        return Share(start, start + base + (self.rank < extra), total)

    def seed(self, step_seed: int) -> int:
        """The global RNG's seed for a step (dropout in the network): the step's own on the main process, one
        derived from it elsewhere, so processes do not repeat each other's dropout masks."""
        return step_seed if self.rank == 0 else hash_ints(step_seed, self.rank, 8)

    def loss_value(self, loss: torch.Tensor) -> float:
        """The whole batch's loss: the sum of every process's part (each its rows' sum / the batch size). NaN or
        inf when any process's is, so every process skips (or stops at) the same batch."""
        if self.count == 1:
            return loss.item()
        total = loss.detach().float().reshape(1).to(self.device, copy=True)
        dist.all_reduce(total)
        return total.item()

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on any (a stop request: all stop after the same step)."""
        if self.count == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value)
        return value.item() > 0

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """Sum the gradients of `params` over the processes. A parameter no process has a gradient for (frozen
        mid-run) keeps none; one that only some have (a process with no rows) counts as zero elsewhere."""
        if self.count == 1:
            return
        present = torch.tensor([float(p.grad is not None) for p in params], device=self.device)
        dist.all_reduce(present)
        summed = [p for p, count in zip(params, present.tolist()) if count > 0]
        for param in summed:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        for bucket in _buckets([p.grad for p in summed]):
            flat = torch.cat([grad.reshape(-1) for grad in bucket])
            dist.all_reduce(flat)
            offset = 0
            for grad in bucket:
                grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
                offset += grad.numel()

    def broadcast(self, params: list[torch.Tensor]) -> None:
        """Start every process from the main process's values (as DistributedDataParallel does)."""
        if self.count == 1:
            return
        for param in params:
            dist.broadcast(param.data, 0)

    def barrier(self) -> None:
        if self.count > 1:
            dist.barrier()

    def main_only(self, work: Callable[[], Result]) -> Result | None:
        """`work()` on the main process while the others wait for it to end (a save); None on the others."""
        try:
            return work() if self.is_main else None
        finally:
            self.barrier()


def _buckets(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Gradients in groups of one dtype and device, about _BUCKET_ELEMENTS each, summed by one call apiece."""
    buckets: dict[tuple, list[list[torch.Tensor]]] = {}
    for grad in grads:
        groups = buckets.setdefault((grad.dtype, grad.device), [[]])
        if groups[-1] and sum(g.numel() for g in groups[-1]) + grad.numel() > _BUCKET_ELEMENTS:
            groups.append([])
        groups[-1].append(grad)
    return [bucket for groups in buckets.values() for bucket in groups]


def fill_latents(latents, processes: Processes) -> None:
    """Fill the run's latent cache (library/data/sources.py LatentSource). The processes share the encoding of a
    disk cache — each its part, then each reads the whole — so none waits for another to encode all of it (a
    wait longer than the process group's timeout would end the run). A memory cache is filled by each."""
    if latents.mode == "disk" and processes.count > 1:
        latents.fill(part=(processes.rank, processes.count))
        processes.barrier()
    latents.fill()


def start_processes(requested_device: str) -> None:
    """Join the process group of the processes the launcher started (nothing to do alone). Rendezvous and
    backend are accelerate's (its PartialState: gloo on the CPU, NCCL on GPUs, each process its local GPU)."""
    if launch_info().processes == 1:
        return
    from accelerate.state import AcceleratorState, PartialState

    if not dist.is_initialized():  # forget what an earlier one-process run in this process set up (tests)
        AcceleratorState._reset_state(reset_partial_state=True)
    PartialState(cpu=resolve_device(requested_device).type == "cpu")


def current_processes() -> Processes:
    """The processes of this run: those start_processes joined, else this one alone."""
    if not (dist.is_available() and dist.is_initialized()):
        return Processes()
    from accelerate.state import PartialState

    return Processes(dist.get_world_size(), dist.get_rank(), PartialState().device)


def end_processes() -> None:
    """Leave the process group at the end of a run (NCCL warns about a group left open)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resume_note(saved_processes: int, processes: int) -> str | None:
    """What resuming on another number of processes means, or None when the number is the same."""
    if saved_processes == processes:
        return None
    return (f"note: the state was saved by a run on {saved_processes} process(es), this one runs on {processes}: "
            "the data order and global batch continue unchanged; sums split differently differ in the last float "
            "digits, and network dropout masks differ")
