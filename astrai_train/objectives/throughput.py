"""Tokens/s and MFU, measured over each logging window so the GPU is synchronised once per window,
never per step.

MFU = achieved model FLOP/s / peak dense FLOP/s of the devices. Model FLOPs per token are
6 N (forward + backward of every matmul weight) + 12 L H Dh T (attention scores and values,
PaLM appendix B). The peak table is ours because Lightning's misses names like plain
"NVIDIA H200" and lists sparse figures for some chips; MFU is left out when the device is unknown.
"""
from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from astrai_train.model import ModelConfig

# Dense bf16 tensor-core peak, FLOP/s, matched by substring of the lower-cased device name (first hit wins).
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("h100 pcie", 756e12),
    ("h100", 989e12),   # SXM / HBM3; also "NVIDIA H100 80GB HBM3"
    ("h200", 989e12),   # same compute die as H100 SXM; "NVIDIA H200" carries no form factor
    ("gh200", 989e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("l40s", 362e12),
    ("a10g", 70e12),
    ("l4", 121e12),
    ("rtx 4090", 165e12),
    ("rtx 3090", 71e12),
]


def peak_flops(device_name: str) -> float | None:
    name = device_name.lower()
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


def flops_per_token(config: ModelConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 N over the weights used in matmuls + the attention term.
    The input embedding is a lookup, not a matmul: with untied weights it is left out of N; so are
    the experts of a MoE layer a token is not routed to (all but top-k of n_experts)."""
    if not config.tie_weight:
        n_params -= config.vocab_size * config.dim
    sparse = sum(config.is_moe_layer(i) for i in range(config.n_layers))
    n_params -= sparse * (config.n_experts - config.n_experts_per_token) * 3 * config.dim * config.resolved_moe_dim_ffn
    head_dim = config.v_head_dim if config.attention == "mla" else config.resolved_head_dim
    attention = 12 * config.n_layers * config.n_heads * head_dim * seq_len
    return 6 * n_params + attention


class ThroughputMonitor(L.Callback):
    """Logs perf/tokens_per_sec (all ranks), perf/step_time and perf/mfu every log interval."""

    def __init__(self, config: ModelConfig, n_params: int) -> None:
        self.config = config
        self.n_params = n_params
        self._tokens = 0
        self._steps = 0
        self._start: float | None = None
        self._seq_len = 0

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._start is None:
            self._sync(pl_module)
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        rows, seq_len = getattr(pl_module, "step_shape", (0, 0))
        self._tokens += rows * seq_len
        self._seq_len = max(self._seq_len, seq_len)
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        self._steps += 1
        if trainer.global_step % trainer.log_every_n_steps or self._start is None:
            return
        self._sync(pl_module)
        elapsed = time.perf_counter() - self._start
        if elapsed <= 0 or self._steps == 0:
            return
        per_rank = self._tokens / elapsed
        total = per_rank * trainer.world_size
        metrics = {"perf/tokens_per_sec": total, "perf/step_time": elapsed / self._steps}
        if pl_module.device.type == "cuda":
            peak = peak_flops(torch.cuda.get_device_name(pl_module.device))
            if peak:
                achieved = per_rank * flops_per_token(self.config, self.n_params, self._seq_len)
                metrics["perf/mfu"] = achieved / peak
        pl_module.log_dict(metrics, rank_zero_only=True)
        self._tokens = self._steps = 0
        self._seq_len = 0
        self._start = time.perf_counter()
