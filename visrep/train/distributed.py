"""torchrun helpers: a process group when launched by torchrun, nothing otherwise."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    owned = not dist.is_initialized()
    if owned:
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)  # collectives and default allocations go to this process's GPU
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "TORCHELASTIC_RESTART_COUNT" not in os.environ:  # not launched by torchrun (e.g. a submitit task)
            dist.init_process_group(backend)
        else:
            # torchrun's agent keeps one store across elastic restarts, and a restarted group would read the killed
            # group's addresses from it (gloo: "connection refused", or a hang). So each group gets its own key
            # space: the number of times this rank has joined, counted in the store. Every rank rejoins once per
            # rendezvous round, so the count agrees across ranks and nodes (TORCHELASTIC_RESTART_COUNT does not:
            # it is per node, and a node restarted for a peer's failure does not count it).
            store, rank, world = next(dist.rendezvous("env://"))
            joins = store.add(f"visrep/joins/rank{rank}", 1)
            dist.init_process_group(backend, store=dist.PrefixStore(f"visrep/group{joins}", store),
                                    rank=rank, world_size=world)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owned)


def teardown_distributed(info: DistInfo, *, finished: bool = True) -> None:
    """Destroy the process group if `setup_distributed` created it.

    After a finished run every rank meets at a barrier first: a rank that tears gloo down while its peer is
    still in its last collective makes the peer abort ("connection closed by peer"). After an error there
    is no barrier, since the failed peer may never come to it."""
    if info.owns_group and dist.is_initialized():
        if finished and info.world_size > 1:
            dist.barrier()
        dist.destroy_process_group()


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every process if `flag` is true on any (stop together: a lone stop would hang the rest)."""
    if info.world_size <= 1:
        return bool(flag)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def any_rank_flags(flags: torch.Tensor, info: DistInfo) -> list[bool]:
    """Several stop flags (a float tensor on the device) agreed across processes in one collective and one host
    sync: each is true everywhere if it is true on any process."""
    if info.world_size > 1:
        flags = flags.clone()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in flags.tolist()]
