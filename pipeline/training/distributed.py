"""Data-parallel training under torchrun: the process's rank and device, the process group."""
from __future__ import annotations

import os

import torch


class Dist:
    """The torchrun environment: world size, rank, local rank (1, 0, 0 outside torchrun)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))  # processes on this machine

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def setup(self, device: torch.device) -> torch.device:
        """Join the process group (nccl on CUDA, gloo on CPU); returns this process's device."""
        if not self.enabled:
            return device
        import torch.distributed as tdist

        if device.type == "cuda":
            device = torch.device("cuda", self.local)
            torch.cuda.set_device(device)
        if not tdist.is_initialized():
            tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world))
        return device

    def barrier(self):
        if self.enabled:
            import torch.distributed as tdist

            tdist.barrier()

    def weights_agree(self, model: torch.nn.Module, device) -> bool:
        """Whether every process ends with the same weights (DDP keeps them in sync; a divergence means the
        gradients were not averaged): one checksum per process, compared with all_reduce min/max."""
        if not self.enabled:
            return True
        import torch.distributed as tdist

        total = sum(float(p.detach().double().abs().sum()) for p in model.parameters())
        lo = torch.tensor([total], dtype=torch.float64, device=device)
        hi = lo.clone()
        tdist.all_reduce(lo, op=tdist.ReduceOp.MIN)
        tdist.all_reduce(hi, op=tdist.ReduceOp.MAX)
        return bool(torch.isclose(lo, hi, rtol=1e-9, atol=0.0).item())
