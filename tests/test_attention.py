"""sdjax.attention.dot_product_attention against a NumPy reference (CPU)."""
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.attention import dot_product_attention


def reference(q, k, v, scale=None, is_causal=False):
    """softmax(q k^T * scale) v in float64, (B, L, H, D) layout."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = np.einsum("blhd,bshd->bhls", q, k) * scale
    if is_causal:
        logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhls,bshd->blhd", weights / weights.sum(-1, keepdims=True), v)


def qkv(L=12, S=7, H=3, D=16, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((2, n, H, D)), jnp.float32) for n in (L, S, S))


def rel_err(a, b):
    return np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max()


@pytest.mark.parametrize("implementation", ["auto", "einsum", "xla"])
@pytest.mark.parametrize("is_causal, scale", [(False, None), (True, None), (False, 0.3)])
def test_matches_reference(implementation, is_causal, scale):
    q, k, v = qkv(S=12) if is_causal else qkv()  # cross-attention: 12 queries, 7 keys
    out = dot_product_attention(q, k, v, implementation=implementation, is_causal=is_causal, scale=scale)
    assert out.shape == q.shape and out.dtype == jnp.float32
    assert rel_err(out, reference(q, k, v, scale, is_causal)) <= 1e-5


@pytest.mark.parametrize("upcast", [True, False])
def test_bf16(upcast):
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv())
    out = dot_product_attention(q, k, v, implementation="einsum", upcast=upcast)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, reference(q, k, v)) < 2e-2


def test_bad_implementation():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"unknown attention implementation 'flash'"):
        dot_product_attention(q, k, v, implementation="flash")


@pytest.mark.skipif(__import__("jax").default_backend() == "gpu",
                    reason="needs a machine without a GPU: the error is for those")
def test_cudnn_without_gpu_is_a_clear_error():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"'cudnn' needs an NVIDIA GPU"):
        dot_product_attention(q, k, v, implementation="cudnn")
