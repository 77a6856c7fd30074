"""``torchrun`` helpers: join the process group, this process's rank, gather a value from every rank."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch


def join_torchrun(device: torch.device | str = "cpu") -> Optional[torch.device]:
    """Join the process group ``torchrun`` describes (gloo on CPU, NCCL on CUDA).

    Returns the device this process should use (``cuda:LOCAL_RANK`` on CUDA),
    or ``None`` outside ``torchrun`` (``WORLD_SIZE`` unset or 1), where
    nothing is done. The caller destroys the group when finished.
    """
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as dist

    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def distributed_rank_and_size() -> Tuple[int, int]:
    """``(rank, world size)`` of an initialised ``torch.distributed`` group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def from_every_rank(value: Any) -> List[Any]:
    """``value`` of every rank of the initialised ``torch.distributed`` group, in rank order."""
    import torch.distributed as dist

    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered
