"""GetStats -> the Prometheus text exposition format (version 0.0.4), served on /metrics.

The gRPC core owns the numbers (astrai_serve/core/metrics.py) and ships them in `GetStats`; the
facade, which holds no state, only renders them. Written by hand: a few gauges, counters and
histograms do not need a client library.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from astrai_serve.proto import generate_pb2 as pb


@dataclass(frozen=True)
class _Metric:
    name: str   # Prometheus name
    kind: str   # "gauge" | "counter"
    field: str  # GetStatsResponse field it comes from
    help: str


_STATS_METRICS = (
    _Metric("astrai_kv_pages_total", "gauge", "kv_pages_total", "KV cache pages in the pool."),
    _Metric("astrai_kv_pages_in_use", "gauge", "kv_pages_in_use", "KV cache pages held by running requests."),
    _Metric("astrai_kv_pages_cached", "gauge", "kv_pages_cached", "KV cache pages held only by the prefix cache (evictable)."),
    _Metric("astrai_num_requests_running", "gauge", "num_requests_running", "Requests being decoded or prefilled."),
    _Metric("astrai_num_requests_waiting", "gauge", "num_requests_waiting", "Requests queued for admission."),
    _Metric("astrai_prefix_cache_hit_tokens_total", "counter", "prefix_cache_hit_tokens_total", "Prompt tokens served from the prefix cache."),
    _Metric("astrai_prompt_tokens_total", "counter", "prompt_tokens_total", "Prompt tokens processed."),
    _Metric("astrai_generation_tokens_total", "counter", "generation_tokens_total", "Tokens generated."),
    _Metric("astrai_num_preemptions_total", "counter", "num_preemptions_total", "Requests preempted for lack of KV pages."),
)


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def render_prometheus(stats: pb.GetStatsResponse, model_name: str) -> str:
    """GetStats -> Prometheus text format. Every sample carries a model_name label."""
    label = f'model_name="{_escape_label(model_name)}"'
    lines: list[str] = []

    def header(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")

    header("astrai_engine_alive", "gauge", "1 while the engine loop runs.")
    lines.append(f"astrai_engine_alive{{{label}}} {int(stats.engine_alive)}")
    for m in _STATS_METRICS:
        header(m.name, m.kind, m.help)
        lines.append(f"{m.name}{{{label}}} {_fmt(int(getattr(stats, m.field)))}")
    header("astrai_requests_finished_total", "counter", "Finished requests by finish reason.")
    for reason in sorted(stats.requests_finished_total):
        value = stats.requests_finished_total[reason]
        lines.append(f'astrai_requests_finished_total{{{label},finish_reason="{_escape_label(reason)}"}} {value}')
    for h in stats.histograms:
        header(h.name, "histogram", h.help)
        cumulative = 0
        bounds = list(h.upper_bounds) + [math.inf]
        for bound, count in zip(bounds, h.bucket_counts):
            cumulative += count
            lines.append(f'{h.name}_bucket{{{label},le="{_fmt(bound)}"}} {cumulative}')
        lines.append(f"{h.name}_sum{{{label}}} {_fmt(h.sum)}")
        lines.append(f"{h.name}_count{{{label}}} {h.count}")
    return "\n".join(lines) + "\n"
