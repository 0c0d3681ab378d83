"""Data-parallel calibration: statistics from 2 CPU processes (gloo) equal those of 1 process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from tests.xbit.dist_stats_worker import calibration_batch, statistics

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_statistics_of_one(tmp_path):
    out = tmp_path / "stats.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(ROOT / "tests/xbit/dist_stats_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(out)
    assert two["world"] == 2
    one = statistics(calibration_batch())  # 7 samples: 4 on one process, 3 on the other
    assert set(two["stats"]) == set(one) and len(one) == 15
    for name, h in one.items():
        torch.testing.assert_close(two["stats"][name], h, rtol=1e-5, atol=1e-6)
