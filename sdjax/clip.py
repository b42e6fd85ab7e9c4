"""The CLIP text encoder of Stable Diffusion in Flax NNX: token ids (B, 77) -> embeddings (B, 77, D).

Same architecture and parameter names as transformers' `CLIPTextModel` (`embeddings.token_embedding`,
`encoder.layers.0.self_attn.q_proj`, `final_layer_norm`, ...), so `sdjax.weights.torch_names` loads its
state dict as is (after dropping the `text_model.` level that checkpoints on disk carry):

    encoder = CLIPTextEncoder(VARIANTS["sd15"], rngs=nnx.Rngs(0))
    context = encoder(input_ids)                  # (B, 77, 768): what the UNet cross-attends to
    context = encoder(input_ids, clip_skip=1)     # the penultimate layer, final-layer-normed
    out = encoder.encode(input_ids)               # last_hidden_state, pooler_output, hidden_states

SD 1.x uses OpenAI's CLIP ViT-L/14 text tower (quick_gelu); SD 2.x OpenCLIP ViT-H's, of which diffusers
keeps 23 of 24 layers (gelu). Both are pre-LayerNorm transformers with a causal mask.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax import modelconfig
from sdjax.attention import dot_product_attention
from sdjax.layers import LayerNorm, embed, linear

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
# Fields of transformers' PretrainedConfig (4.x and 5.x) and CLIP training knobs that say nothing about the
# text tower's math: bookkeeping, generation defaults, dropout, init scales.
_GENERIC_KEYS = tuple("""
    architectures model_type dtype torch_dtype transformers_version use_bfloat16 torchscript tf_legacy_loss
    return_dict output_hidden_states output_attentions output_scores return_dict_in_generate pruned_heads
    tie_word_embeddings chunk_size_feed_forward is_encoder_decoder is_decoder add_cross_attention
    cross_attention_hidden_size tie_encoder_decoder max_length min_length do_sample early_stopping num_beams
    num_beam_groups diversity_penalty temperature top_k top_p typical_p repetition_penalty length_penalty
    no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids num_return_sequences forced_bos_token_id
    forced_eos_token_id remove_invalid_values exponential_decay_length_penalty suppress_tokens
    begin_suppress_tokens finetuning_task id2label label2id tokenizer_class prefix sep_token_id
    decoder_start_token_id task_specific_params problem_type gradient_checkpointing use_cache
    initializer_range initializer_factor attention_dropout dropout""".split())


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers CLIPTextConfig fields that shape the model (config.json names and defaults)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    projection_dim: int = 512  # the CLIP projection head's width (text_projection's output, when present)
    with_projection: bool = False  # transformers' CLIPTextModelWithProjection (SDXL's second encoder)

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"CLIPTextConfig: hidden_act {self.hidden_act!r} is not supported; "
                             f"use one of {sorted(_ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIPTextConfig: hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")

    @property
    def family(self) -> str:
        """"sd1" (OpenAI CLIP ViT-L, quick_gelu) or "sd2" (OpenCLIP ViT-H, gelu)."""
        return "sd2" if self.hidden_act == "gelu" else "sd1"

    @classmethod
    def from_transformers(cls, d: dict) -> "CLIPTextConfig":
        """From a text_encoder/config.json (a CLIPTextModel's, or a CLIPModel's `text_config`)."""
        if "text_config" in d:
            d = d["text_config"]
        d = dict(d)
        if d.get("model_type", "clip_text_model") != "clip_text_model":
            raise ValueError(f"text encoder config has model_type {d['model_type']!r}: Stable Diffusion's text "
                             "encoder is a CLIP text model ('clip_text_model')")
        projection_dim = d.get("projection_dim", cls.projection_dim)
        with_projection = "CLIPTextModelWithProjection" in (d.get("architectures") or ())
        d.pop("with_projection", None)
        config = modelconfig.from_dict(cls, d, ignore=_GENERIC_KEYS)
        return dataclasses.replace(config, projection_dim=projection_dim, with_projection=with_projection)

    def to_transformers(self) -> dict:
        d = modelconfig.to_dict(self)
        del d["with_projection"]  # transformers reads it off the class, as "architectures" names it
        return {"architectures": ["CLIPTextModelWithProjection" if self.with_projection else "CLIPTextModel"],
                "model_type": "clip_text_model", "attention_dropout": 0.0, "initializer_factor": 1.0,
                "initializer_range": 0.02, **d}


VARIANTS = {
    # OpenAI CLIP ViT-L/14 text tower (SD 1.x), 123,060,480 parameters.
    "sd15": CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           projection_dim=768),
    # OpenCLIP ViT-H/14 text tower as diffusers ships it for SD 2.x: 23 of 24 layers, 340,387,840 parameters.
    "sd21": CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                           hidden_act="gelu", pad_token_id=1, projection_dim=512),
    # Real vocabulary (so the real tokenizer works), 32 wide: ~1.6M parameters, nearly all embeddings.
    "tiny": CLIPTextConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                           projection_dim=32),
    # The offline shapes demo's text encoder: 64 wide, 2 layers (3.3M parameters, 3.2M of them embeddings).
    "shapes": CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                             projection_dim=64),
    # SDXL's second encoder, OpenCLIP ViT-bigG/14's text tower with its projection: 694,659,840 parameters (the
    # first is "sd15"'s ViT-L).
    "sdxl_g": CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                             hidden_act="gelu", pad_token_id=1, projection_dim=1280, with_projection=True),
    "tiny_sdxl_g": CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=1,
                                  hidden_act="gelu", projection_dim=48, with_projection=True),
}


class CLIPAttention(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, attention_impl: str, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d = config.hidden_size
        self.heads, self.attention_impl = config.num_attention_heads, attention_impl
        self.q_proj = linear(d, d, **kw)
        self.k_proj = linear(d, d, **kw)
        self.v_proj = linear(d, d, **kw)
        self.out_proj = linear(d, d, **kw)

    def __call__(self, x):
        B, L, D = x.shape
        q, k, v = (p(x).reshape(B, L, self.heads, D // self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = dot_product_attention(q, k, v, implementation=self.attention_impl, is_causal=True)
        return self.out_proj(out.reshape(B, L, D))


class CLIPMLP(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = _ACTIVATIONS[config.hidden_act]
        self.fc1 = linear(config.hidden_size, config.intermediate_size, **kw)
        self.fc2 = linear(config.intermediate_size, config.hidden_size, **kw)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: CLIPTextConfig, *, attention_impl: str, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **kw)
        self.self_attn = CLIPAttention(config, attention_impl=attention_impl, **kw)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **kw)
        self.mlp = CLIPMLP(config, **kw)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.token_embedding = embed(config.vocab_size, config.hidden_size, **kw)
        self.position_embedding = embed(config.max_position_embeddings, config.hidden_size, **kw)

    def __call__(self, input_ids):
        positions = jnp.arange(input_ids.shape[1])[None, :]
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPEncoder(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, attention_impl: str, dtype, param_dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(config, attention_impl=attention_impl, dtype=dtype,
                                                 param_dtype=param_dtype, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])


class CLIPTextEncoder(nnx.Module):
    """transformers' CLIPTextModel (its `text_model`), without dropout (SD never uses it); with
    `config.with_projection`, CLIPTextModelWithProjection (its `text_model` and `text_projection`)."""

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str = "einsum", rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = config
        self.embeddings = CLIPEmbeddings(config, **kw)
        self.encoder = CLIPEncoder(config, attention_impl=attention_impl, **kw)
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **kw)
        if config.with_projection:
            self.text_projection = linear(config.hidden_size, config.projection_dim, use_bias=False, **kw)

    def encode(self, input_ids, *, num_layers: int | None = None) -> dict:
        """transformers' outputs for int token ids (B, L):

        last_hidden_state (B, L, D): the last layer, final-layer-normed;
        pooler_output (B, D): last_hidden_state at each row's EOS token;
        hidden_states: the embeddings and every layer's output (num_layers + 1 entries, not normed);
        text_embeds (B, projection_dim): text_projection(pooler_output), with `config.with_projection`.
        `num_layers` stops after that many layers (the rest are not computed).
        """
        input_ids = jnp.asarray(input_ids, jnp.int32)
        x = self.embeddings(input_ids)
        hidden_states = [x]
        for layer in self.encoder.layers[:num_layers]:
            x = layer(x)
            hidden_states.append(x)
        last = self.final_layer_norm(x)
        out = {"last_hidden_state": last, "pooler_output": _pool(last, input_ids, self.config.eos_token_id),
               "hidden_states": tuple(hidden_states)}
        if self.config.with_projection:
            out["text_embeds"] = self.text_projection(out["pooler_output"])
        return out

    def __call__(self, input_ids, clip_skip: int = 0):
        """The UNet's context (B, L, D): the output of the last layer, or with `clip_skip=k` of the layer
        k before it, final-layer-normed either way (diffusers' `clip_skip`; A1111's "CLIP skip" is k + 1)."""
        n = self.config.num_hidden_layers
        if not 0 <= clip_skip < n:
            raise ValueError(f"clip_skip={clip_skip} must be in [0, {n - 1}] for a {n}-layer text encoder")
        return self.encode(input_ids, num_layers=n - clip_skip)["last_hidden_state"]


def sdxl_conditioning(encoders, input_ids, clip_skip: int = 0):
    """SDXL's text conditioning, as diffusers' StableDiffusionXLPipeline.encode_prompt computes it.

    encoders: (ViT-L, ViT-bigG with projection) for the base model, (ViT-bigG,) for the refiner; input_ids: one
    (B, L) array per encoder (its own tokenizer's). Returns (context, pooled): each encoder's hidden state
    `clip_skip + 1` layers before its last (the penultimate by default), not final-layer-normed, concatenated
    along the features (B, L, 768 + 1280); and the last encoder's projected pooled output (B, 1280).
    """
    if len(encoders) != len(input_ids):
        raise ValueError(f"sdxl_conditioning: {len(encoders)} text encoders, {len(input_ids)} id arrays")
    if not encoders[-1].config.with_projection:
        raise ValueError("sdxl_conditioning: the last text encoder must have a text_projection (ViT-bigG's)")
    states = []
    for k, (encoder, ids) in enumerate(zip(encoders, input_ids)):
        n = encoder.config.num_hidden_layers
        if not 0 <= clip_skip < n - 1:
            raise ValueError(f"clip_skip={clip_skip} must be in [0, {n - 2}] for a {n}-layer text encoder")
        last = k == len(encoders) - 1  # its pooled output needs every layer
        out = encoder.encode(ids, num_layers=None if last else n - 1 - clip_skip)
        states.append(out["hidden_states"][-(clip_skip + 2) if last else -1])
    return jnp.concatenate(states, axis=-1), out["text_embeds"]


def _pool(last_hidden_state, input_ids, eos_token_id: int):
    """The EOS token's features. Old configs (eos_token_id=2) mark EOS as the row's largest id, as transformers does."""
    if eos_token_id == 2:
        index = jnp.argmax(input_ids, axis=-1)
    else:
        index = jnp.argmax(input_ids == eos_token_id, axis=-1)
    return jnp.take_along_axis(last_hidden_state, index[:, None, None], axis=1)[:, 0]


def strip_text_model_prefix(state_dict: dict) -> dict:
    """Checkpoints store CLIPTextModel keys under `text_model.`; transformers >= 5 saves them without."""
    p = "text_model."
    return {k[len(p):] if k.startswith(p) else k: v for k, v in state_dict.items()}
