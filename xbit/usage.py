"""Wall time per phase and peak memory of a run, for the CLI's table and the report."""

import resource
import time
from contextlib import contextmanager

import torch


def host_rss_bytes() -> int:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_host_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_device_bytes(device) -> int | None:
    """Peak memory torch allocated on a CUDA device (None on the CPU, where host RSS is the measure)."""
    device = torch.device(device)
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


class Usage:
    """phase(name) times a phase (repeated names add up) and notes the peak RSS at its end; note(label) records
    the RSS now and the peak so far (after each block: how memory grows with depth)."""

    def __init__(self):
        self.seconds, self.peak_rss_after, self.notes = {}, {}, []

    def note(self, label: str):
        self.notes.append({"at": label, "rss": host_rss_bytes(), "peak_rss": peak_host_rss_bytes()})

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.peak_rss_after[name] = peak_host_rss_bytes()

    def report(self, device) -> dict:
        return {"phase_seconds": dict(self.seconds), "peak_rss_after_phase": dict(self.peak_rss_after),
                "rss_by_block": list(self.notes),
                "peak_host_rss_bytes": peak_host_rss_bytes(), "peak_device_bytes": peak_device_bytes(device)}
