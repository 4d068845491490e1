"""Data parallelism for the LoRA trainers: one process per device under torchrun, each with a shard of the batch.

    torchrun --standalone --nproc_per_node 2 -m alignloop train rwr --snapshot DIR --out RUN   # what the nightly runs

`init(device)` reads torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK); with WORLD_SIZE > 1 it joins the
process group (gloo on CPU, nccl on CUDA, one GPU per process: cuda:LOCAL_RANK). Without torchrun it is a world of
one and touches nothing, so a single process runs exactly as it did before data parallelism.

How a run stays the single-process run (alignloop.trainer.finetune.LoraRun does the rest):
- every rank draws the same random numbers (same seeds, same draws in the same order) for the whole global batch,
  then keeps its own contiguous slice of it (`World.shard`);
- losses are means over the rank's slice; averaging the gradients over the ranks (equal slices) is then the
  gradient of the mean over the global batch;
- rank 0 alone writes (checkpoints, metrics, the adapter, the registry); the others wait at a barrier.
"""

import atexit
import dataclasses
import datetime
import os
import sys
from typing import Sequence

import torch
import torch.distributed as dist

# Rank 0 evaluates the adapter while the others wait at the end barrier: give it hours, not the default minutes.
TIMEOUT = datetime.timedelta(hours=3)


@dataclasses.dataclass(frozen=True)
class World:
    rank: int  # this process's index, 0..size-1; rank 0 writes
    size: int  # processes sharing each batch
    device: torch.device  # this process's device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch):
        """This rank's contiguous slice of a global batch (a list or a tensor whose length divides by size)."""
        if len(batch) % self.size:
            raise ValueError(f"a global batch of {len(batch)} does not split into {self.size} equal shards")
        per_rank = len(batch) // self.size
        return batch[self.rank * per_rank:(self.rank + 1) * per_rank]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def average(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of `tensor` over the ranks, in place (returned); a no-op in a world of one."""
        if self.size > 1:
            dist.all_reduce(tensor)
            tensor /= self.size
        return tensor

    def average_floats(self, values: Sequence[float]) -> list:
        """Logged figures averaged over the ranks, NaN (a shard without up-votes, say) left out of the mean."""
        if self.size == 1:
            return list(values)
        x = torch.tensor(values, dtype=torch.float64, device=self.device)
        counted = torch.isfinite(x)
        x, counted = torch.where(counted, x, 0.0), counted.double()
        dist.all_reduce(x)
        dist.all_reduce(counted)
        return (x / counted).tolist()  # 0 / 0 = NaN where no rank had a value

    def broadcast(self, value):
        """Rank 0's `value` (any picklable object) on every rank."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]


def init(device: str = "") -> World:
    """This process's World; joins the process group when launched by torchrun with WORLD_SIZE > 1 (once per
    process). `device` is the config's ("" = CUDA when available, else CPU)."""
    from alignloop.models import resolve_device_dtype

    resolved, _ = resolve_device_dtype(device or None, "fp32")
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(0, 1, resolved)
    local_rank = int(os.environ["LOCAL_RANK"])
    if resolved.type == "cuda":
        resolved = torch.device("cuda", local_rank)  # one GPU per process
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo", timeout=TIMEOUT)
        atexit.register(dist.destroy_process_group)
    return World(dist.get_rank(), dist.get_world_size(), resolved)


def torchrun_command(nproc_per_node: int, alignloop_args: Sequence[str]) -> list:
    """`alignloop ARGS` as a single-node torchrun launch of `nproc_per_node` processes (a free port of its own)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc_per_node),
            "-m", "alignloop", *alignloop_args]
