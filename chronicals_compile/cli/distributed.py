"""``torchrun`` support for ``chronicals finetune``: one process per GPU, DDP, rank 0 reports.

Data parallel the way HF Trainer does it: the model is compiled in place, then wrapped in
``DistributedDataParallel``; each rank reads its own share of the packed rows
(``DistributedSampler``); the logged loss and token counts are summed over ranks in one
all-reduce per step (the step already syncs once to check the loss), so every rank sees the same
figures and a NaN anywhere stops every rank.
"""
from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def sum(self, values: list[float], device) -> list[float]:
        """Element-wise sum over ranks (identity for one process)."""
        if not self.distributed:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def init_world(use_cuda: bool) -> World:
    """The process group torchrun describes in the environment; a single process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch
    import torch.distributed as dist

    world = World(rank=int(os.environ["RANK"]), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if use_cuda:
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return world


def wrap(model, world: World, device):
    """``model`` itself for one process, else DDP over it (the compiled module stays inside)."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
