"""The decoder-only Transformer: embedding, pre-norm blocks (attention + SwiGLU or routed SwiGLU
experts, moe.py), final norm, LM head.

Parameter names follow Hugging Face's Llama/Qwen2/Qwen3 layout (minus the `model.` prefix), so the
model directory maps onto `transformers` checkpoints name for name.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import GQAAttention, MLAAttention
from .backend import AttentionBackend, Linear
from .config import ModelConfig
from .inference_ops import TORCH_OPS, InferenceOps
from .layers import RMSNorm, SwiGLU, rope_tables
from .moe import Experts, MoE


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = MLAAttention(config) if config.attention == "mla" else GQAAttention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = (MoE(config.dim, config.resolved_moe_dim_ffn, config.n_experts, config.n_experts_per_token,
                        config.moe_norm_topk) if config.is_moe_layer(layer) else SwiGLU(config.dim, config.dim_ffn))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_flat(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                     attn: AttentionBackend, layer: int, ops: InferenceOps = TORCH_OPS
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the MLP's output, the residual stream before it is added): the stream is
        `x + residual`. The previous block's last residual add happens here, beside this block's
        RMSNorm (`ops.add_rms_norm`), so one kernel does both: the serving engine's compiled decode breaks its
        graph at every attention call, and an add left at the end of a block would be a kernel
        launch of its own per layer (qwen3-0.6b at batch 1: 28 of them)."""
        h, residual = ops.add_rms_norm(x, residual, self.input_layernorm)
        h, residual = ops.add_rms_norm(self.self_attn.forward_flat(h, cos, sin, attn, layer, ops), residual,
                                       self.post_attention_layernorm)
        return self.mlp.forward_flat(h, ops), residual


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = None if config.tie_weight else nn.Linear(config.dim, config.vocab_size, bias=False)
        self._build_rope()
        if not self.embed_tokens.weight.is_meta:  # meta: weights come from a checkpoint next
            self.reset_parameters()

    # ---- setup -------------------------------------------------------------------------------
    def _build_rope(self, device: torch.device | str | None = None) -> None:
        c = self.config
        device = self.embed_tokens.weight.device if device is None else device
        cos, sin = rope_tables(c.rope_dim, c.max_len, c.rope_theta, device=device, **c.rope_scaling)
        # Non-persistent: derived from the config, never stored in checkpoints. Computed in fp32;
        # a cast of the model to bf16 rounds the tables exactly as HF rounds its cos/sin.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        # Scaled init of the projections that write into the residual stream keeps its
        # variance flat with depth (GPT-2 / LLaMA practice).
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                s = out_std if name.endswith(("o_proj", "down_proj")) else std
                nn.init.normal_(module.weight, mean=0.0, std=s)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, Experts):
                module.reset_parameters(std, out_std)

    @property
    def lm_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    # ---- training forward --------------------------------------------------------------------
    def forward_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> final-norm hidden states [B, T, dim] (causal)."""
        T = input_ids.shape[1]
        if T > self.config.max_len:
            raise ValueError(f"sequence length {T} exceeds max_len={self.config.max_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embed_tokens(input_ids)
        for block in self.layers:
            x = block(x, cos, sin)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, head: Callable[[torch.Tensor, torch.Tensor], Any] | None = None):
        """[B, T] token ids -> logits [B, T, vocab], or `head(hidden, lm_weight)` when given.

        `head` lets a trainer fuse the LM head with its loss (never materialising full logits)
        while still running inside this module's forward, where wrappers such as FSDP have
        gathered the weights.
        """
        hidden = self.forward_hidden(input_ids)
        return self.compute_logits(hidden) if head is None else head(hidden, self.lm_weight)

    def compute_logits(self, hidden: torch.Tensor, linear: Linear = F.linear) -> torch.Tensor:
        return linear(hidden, self.lm_weight)

    # ---- inference forward -------------------------------------------------------------------
    def forward_flat(self, input_ids: torch.Tensor, positions: torch.Tensor,
                     attn: AttentionBackend, ops: InferenceOps = TORCH_OPS) -> torch.Tensor:
        """A flattened batch of new tokens [N] at `positions` [N] -> hidden states [N, dim].

        `attn` owns the KV storage and this step's metadata (see backend.py); `ops` the other
        kernels (projections, SwiGLU's activation, QK-norm + rotary: inference_ops.py); the
        caller picks which rows to turn into logits with `compute_logits`.
        """
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x, residual = self.embed_tokens(input_ids), None
        for i, block in enumerate(self.layers):
            x, residual = block.forward_flat(x, residual, cos, sin, attn, i, ops)
        return ops.add_rms_norm(x, residual, self.norm)[0]

    # ---- model directory ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | Path, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> "Transformer":
        from .io import load_pretrained

        return load_pretrained(cls, directory, device=device, dtype=dtype)

    def save_pretrained(self, directory: str | Path, max_shard_bytes: int = 4 << 30) -> Path:
        from .io import save_pretrained

        return save_pretrained(self, directory, max_shard_bytes=max_shard_bytes)
