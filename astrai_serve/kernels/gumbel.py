"""Sampling by the Gumbel-max trick with counter-based noise: one pass over the logits per step.

    token = argmax_i  x_i / T + G_i,   G_i = -log(-log U_i),  U_i uniform in (0, 1)

picks token i with probability softmax(x / T)_i, so no softmax, no normalisation and no second
pass are needed; a row with T = 0 is plain argmax (first index among ties, as torch.argmax).

The noise is not drawn from a stateful generator: U_i is a hash of (row key, i). A row's key is
a hash of (the sample's seed, the position being sampled), so a seeded sample gets the same
noise whatever else shares the batch, without one generator call per row (which costs a launch
per seeded row per step: 256 launches a step for a GRPO batch). Rows without a seed take a key
from the engine's own random stream. The hash is murmur3's 32-bit finaliser, applied twice:

    h = fmix32(fmix32(i * 0x9E3779B9 + k0) ^ k1),   U = ((h >> 9) + 0.5) / 2**23

The torch version here is the reference (and the CPU path); triton_sampling.py computes the
same bits on the GPU in one kernel, and `astrai_serve.kernels.gumbel_argmax` picks between them.
Keys are made on the host with numpy (vectorised, no sync).
"""
from __future__ import annotations

import numpy as np
import torch

GOLDEN = 0x9E3779B9
M32 = 0xFFFFFFFF
_MIX1, _MIX2 = 0x85EBCA6B, 0xC2B2AE35


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (numpy wraps on overflow, as the algorithm wants)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def seeded_keys(seeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """uint64 keys of seeded rows: a hash of (seed, position sampled)."""
    with np.errstate(over="ignore"):
        return _splitmix64(seeds.astype(np.uint64) ^ _splitmix64(positions.astype(np.uint64)))


def split_keys(keys: np.ndarray) -> np.ndarray:
    """uint64 keys -> int64 [S, 2] of (low word, high word), the layout both kernels read."""
    keys = keys.astype(np.uint64)
    return np.stack([keys & np.uint64(M32), keys >> np.uint64(32)], axis=1).astype(np.int64)


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    # int64 holding uint32 values: products wrap in int64, and the mask keeps their low 32 bits.
    h = h ^ (h >> 16)
    h = (h * _MIX1) & M32
    h = h ^ (h >> 13)
    h = (h * _MIX2) & M32
    return h ^ (h >> 16)


def uniform_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """U [S, vocab] float32 in (0, 1) for int64 keys [S, 2]."""
    i = torch.arange(vocab, dtype=torch.int64, device=keys.device)[None, :]
    h = _fmix32(((i * GOLDEN) + keys[:, :1]) & M32)
    h = _fmix32(h ^ keys[:, 1:])
    return ((h >> 9).float() + 0.5) * (1.0 / 8388608.0)


def gumbel_argmax_reference(x: torch.Tensor, temps: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """int64 [S]: per row argmax(x / T + Gumbel noise), or argmax(x) where T <= 0."""
    greedy = temps <= 0
    gumbel = -torch.log(-torch.log(uniform_noise(keys, x.shape[1])))
    scores = x.float() / torch.where(greedy, 1.0, temps)[:, None] + gumbel
    scores = torch.where(greedy[:, None], x.float(), scores)
    return scores.argmax(-1)
