"""A contiguous KV cache: the simplest AttentionBackend, so a model can generate before (and
without) the serving engine, and tests have an independent path to compare against.

Storage is [layers, batch, max_len, n_kv, k_dim] (+ values unless the layout keeps them in the
key). Each step is described by `ContiguousKVCache.step(seq_ids, positions)`, which returns the
backend the model calls; sequence rows of a step must be grouped (all tokens of one sequence
adjacent, in position order).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import kv_layout
from .config import ModelConfig


class ContiguousKVCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if max_len > config.max_len:
            raise ValueError(f"cache max_len={max_len} exceeds the model's max_len={config.max_len}")
        self.layout = kv_layout(config)
        lay = self.layout
        self.max_len = max_len
        self.k = torch.zeros(config.n_layers, batch_size, max_len, lay.n_kv, lay.k_dim, device=device, dtype=dtype)
        self.v = None if lay.value_in_key else torch.zeros(
            config.n_layers, batch_size, max_len, lay.n_kv, lay.v_dim, device=device, dtype=dtype)

    def step(self, seq_ids: torch.Tensor, positions: torch.Tensor) -> "_ContiguousStep":
        if int(positions.max()) >= self.max_len:
            raise ValueError(f"position {int(positions.max())} is past the cache length {self.max_len}")
        return _ContiguousStep(self, seq_ids, positions)


class _ContiguousStep:
    def __init__(self, cache: ContiguousKVCache, seq_ids: torch.Tensor, positions: torch.Tensor) -> None:
        self.cache, self.seq_ids, self.positions = cache, seq_ids, positions
        # Host-side grouping, computed once per step and shared by all layers.
        ids = seq_ids.tolist()
        self.groups: list[tuple[int, int, int]] = []  # (seq, start row, end row)
        start = 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or ids[i] != ids[start]:
                self.groups.append((ids[start], start, i))
                start = i
        # Decode steps (one token per sequence) run as one batched, masked attention instead of a
        # loop over sequences: that loop, not the matmuls, dominated generation time.
        self.decode = len(self.groups) == len(ids)
        if self.decode:
            ctx = int(positions.max()) + 1
            self.ctx = ctx
            self.mask = (torch.arange(ctx, device=positions.device)[None, :] <= positions[:, None])[:, None, None, :]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None,
               scale: float) -> torch.Tensor:
        c = self.cache
        c.k[layer, self.seq_ids, self.positions] = k.to(c.k.dtype)
        if c.v is not None:
            c.v[layer, self.seq_ids, self.positions] = v.to(c.v.dtype)
        v_dim = c.layout.v_dim
        if self.decode:
            keys = c.k[layer, self.seq_ids, : self.ctx].to(q.dtype)           # [B, ctx, n_kv, Dk]
            values = keys[..., :v_dim] if c.v is None else c.v[layer, self.seq_ids, : self.ctx].to(q.dtype)
            o = F.scaled_dot_product_attention(q[:, :, None, :], keys.transpose(1, 2), values.transpose(1, 2),
                                               attn_mask=self.mask, scale=scale,
                                               enable_gqa=keys.shape[2] != q.shape[1])
            return o[:, :, 0, :]
        out = q.new_empty(q.shape[0], q.shape[1], v_dim)
        for seq, lo, hi in self.groups:
            pos = self.positions[lo:hi]
            ctx = int(pos[-1]) + 1
            keys = c.k[layer, seq, :ctx]
            values = keys[..., :v_dim] if c.v is None else c.v[layer, seq, :ctx]
            mask = torch.arange(ctx, device=q.device)[None, :] <= pos[:, None]  # [q, ctx]
            o = F.scaled_dot_product_attention(
                q[lo:hi].transpose(0, 1), keys.transpose(0, 1).to(q.dtype), values.transpose(0, 1).to(q.dtype),
                attn_mask=mask, scale=scale, enable_gqa=keys.shape[1] != q.shape[1])
            out[lo:hi] = o.transpose(0, 1)
        return out
