"""Run by test_distributed.py under torchrun: calibration statistics of the tiny model, saved by rank 0."""

import sys

import torch

from tests.tiny import tiny_llama
from xbit.calibrate import head_hessian, init_distributed, run_blocks


def statistics(ids: torch.Tensor) -> dict:
    model = tiny_llama(seed=4)
    out = {}

    def record(i, block, hessians):
        out.update({f"model.layers.{i}.{n}": h for n, h in hessians.items()})

    hidden = run_blocks(model, ids, "cpu", record, batch_size=2, progress=False)
    out["lm_head"] = head_hessian(model, hidden, "cpu")
    return out


def calibration_batch() -> torch.Tensor:
    return torch.randint(3, 128, (7, 24), generator=torch.Generator().manual_seed(0))


if __name__ == "__main__":
    rank, size = init_distributed()
    stats = statistics(calibration_batch())
    if rank == 0:
        torch.save({"world": size, "stats": stats}, sys.argv[1])
