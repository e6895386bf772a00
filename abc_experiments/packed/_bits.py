"""Bit packing helpers (pure torch). Bit 1 means +1, bit 0 means -1."""

from __future__ import annotations

import torch
from torch import Tensor

_WEIGHTS8 = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)


def pack_bits(bits: Tensor) -> Tensor:
    """Flat dense packing: bool tensor (any shape) -> uint8 of ceil(n/8) bytes, element i at bit i % 8
    of byte i // 8 (row-major element order)."""
    flat = bits.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _WEIGHTS8.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, count: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` bits as a bool vector."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (count + 7) // 8:
        raise ValueError(f"expected {(count + 7) // 8} packed bytes (uint8 vector) for {count} bits, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    bits = (packed.view(-1, 1) & _WEIGHTS8.to(packed.device)) != 0
    return bits.reshape(-1)[:count]


def pack_words(bits: Tensor) -> Tensor:
    """Pack the last dimension (C bools) into ceil(C/64) int64 words, channel c at bit c % 64 of word
    c // 64; the unused high bits are 0. Shape (..., C) -> (..., Wc)."""
    *lead, C = bits.shape
    words = (C + 63) // 64
    padded = torch.zeros(*lead, words * 64, dtype=torch.uint8, device=bits.device)
    padded[..., :C] = bits.to(torch.uint8)
    as_bytes = (padded.view(*lead, words * 8, 8) * _WEIGHTS8.to(bits.device)).sum(-1, dtype=torch.uint8)
    return as_bytes.contiguous().view(torch.int64)  # little-endian byte order within a word


def unpack_words(words: Tensor, C: int) -> Tensor:
    """Inverse of :func:`pack_words`: (..., Wc) int64 -> (..., C) bool."""
    as_bytes = words.contiguous().view(torch.uint8)
    bits = (as_bytes.unsqueeze(-1) & _WEIGHTS8.to(words.device)) != 0
    return bits.flatten(-2)[..., :C]
