"""The one attention function every sdjax module calls.

q, k, v are (batch, length, heads, head_dim). `implementation` picks the kernel:
  "einsum": plain einsum with a softmax in fp32 (best for short key lengths such as the 77 text tokens),
  "xla":    jax.nn.dot_product_attention's XLA path,
  "cudnn":  jax.nn.dot_product_attention's cuDNN flash attention (GPU, fp16/bf16 only),
  "auto":   cuDNN for long self-attention on a GPU with half-precision inputs, einsum otherwise.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn")


def _einsum_attention(q, k, v, *, scale, is_causal, upcast):
    compute = jnp.float32 if upcast else q.dtype
    logits = jnp.einsum("blhd,bshd->bhls", q.astype(compute), k.astype(compute)) * scale
    if is_causal:
        L, S = q.shape[1], k.shape[1]
        mask = jnp.tril(jnp.ones((L, S), bool))
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhls,bshd->blhd", weights, v)


def _cudnn_usable(q, k) -> bool:
    return (
        jax.default_backend() == "gpu"
        and q.dtype in (jnp.float16, jnp.bfloat16)
        and k.shape[1] >= 256
        and q.shape[-1] <= 128
    )


def dot_product_attention(q, k, v, *, implementation: str = "auto", is_causal: bool = False,
                          upcast: bool = True, scale: float | None = None):
    """Scaled dot-product attention over (B, L, H, D) tensors; returns (B, L, H, D)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if implementation == "auto":
        implementation = "cudnn" if _cudnn_usable(q, k) else "einsum"
    if implementation == "einsum":
        return _einsum_attention(q, k, v, scale=scale, is_causal=is_causal, upcast=upcast)
    if implementation == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError(f"attention implementation 'cudnn' needs an NVIDIA GPU (the backend is "
                             f"{jax.default_backend()!r}); use 'auto', 'xla' or 'einsum'")
        if q.dtype not in (jnp.float16, jnp.bfloat16):
            raise ValueError(f"attention implementation 'cudnn' needs float16/bfloat16 inputs, got {q.dtype}; "
                             "compute in bf16 (dtype=jnp.bfloat16) or use 'auto', 'xla' or 'einsum'")
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=is_causal, implementation=implementation)
