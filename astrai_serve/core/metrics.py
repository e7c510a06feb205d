"""Latency histograms kept by the gRPC core.

The core owns the numbers (it sees every request, whichever client sent it) and ships them in
`GetStats`; the REST facade, which holds no state, renders them for Prometheus
(astrai_serve/facade/prometheus.py).
"""
from __future__ import annotations

import bisect
import math
import threading

from astrai_serve.proto import generate_pb2 as pb

# Bucket bounds in seconds, chosen for token latencies from sub-millisecond (GPU decode) to
# tens of seconds (a long prefill on a busy CPU).
TTFT_BOUNDS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
TPOT_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BOUNDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0)


class Histogram:
    """A thread-safe histogram with fixed bucket bounds (per-bucket counts; +Inf is the last)."""

    def __init__(self, name: str, help_text: str, bounds: tuple[float, ...]):
        if list(bounds) != sorted(bounds) or len(set(bounds)) != len(bounds):
            raise ValueError(f"histogram {name}: bucket bounds must be strictly increasing, got {bounds}")
        self.name = name
        self.help = help_text
        self.bounds = tuple(float(b) for b in bounds)
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        if not math.isfinite(value) or value < 0:
            return  # a clock hiccup must not poison the sum
        i = bisect.bisect_left(self.bounds, value)  # le semantics: value <= bound lands in that bucket
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def to_proto(self) -> pb.Histogram:
        with self._lock:
            counts, total = list(self._counts), self._sum
        return pb.Histogram(name=self.name, help=self.help, upper_bounds=self.bounds,
                            bucket_counts=counts, sum=total, count=sum(counts))


class ServerMetrics:
    """Per-request latency observations and finish counters, fed by the gRPC servicer."""

    def __init__(self) -> None:
        self.ttft = Histogram("astrai_time_to_first_token_seconds",
                              "Time from receiving a Generate request to its first token.", TTFT_BOUNDS)
        self.tpot = Histogram("astrai_time_per_output_token_seconds",
                              "Mean time between output tokens of one sample, after the first.", TPOT_BOUNDS)
        self.e2e = Histogram("astrai_e2e_request_latency_seconds",
                             "Time from receiving a Generate request to its last message.", E2E_BOUNDS)
        self._finished: dict[str, int] = {}
        self._lock = threading.Lock()

    def count_finished(self, reason: str) -> None:
        with self._lock:
            self._finished[reason] = self._finished.get(reason, 0) + 1

    def finished(self) -> dict[str, int]:
        with self._lock:
            return dict(self._finished)

    def histograms(self) -> list[pb.Histogram]:
        return [h.to_proto() for h in (self.ttft, self.tpot, self.e2e)]
