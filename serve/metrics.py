"""Prometheus metrics, one registry per app (so several apps can live in one process, e.g. in tests)."""

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("xbit_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("xbit_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("xbit_generation_tokens", "Tokens generated", registry=r)
        self.queue_length = Gauge("xbit_queue_length", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("xbit_running_sequences", "Sequences in the running batch", registry=r)
        self.batch_size = Histogram("xbit_decode_batch_size", "Sequences per decode step", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.ttft = Histogram("xbit_time_to_first_token_seconds", "Submit to first token", registry=r,
                              buckets=_LATENCY)
        self.step_time = Histogram("xbit_decode_step_seconds", "Time of one batched decode step", registry=r,
                                   buckets=_LATENCY)
        self.tokens_per_s = Gauge("xbit_generation_tokens_per_second", "Decode throughput over the last ~1 s",
                                  registry=r)
        self._window = [time.perf_counter(), 0]

    def set_load(self, waiting: int, running: int):
        self.queue_length.set(waiting)
        self.running.set(running)

    def prefill(self, n_tokens: int, seconds: float):
        self.prompt_tokens.inc(n_tokens)

    def first_token(self, seconds: float):
        self.ttft.observe(seconds)

    def tokens_out(self, n: int):
        self.generation_tokens.inc(n)
        self._window[1] += n
        now = time.perf_counter()
        if now - self._window[0] >= 1.0:
            self.tokens_per_s.set(self._window[1] / (now - self._window[0]))
            self._window = [now, 0]

    def decode_step(self, batch: int, seconds: float):
        self.batch_size.observe(batch)
        self.step_time.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
