"""sdjax.clip against transformers' CLIPTextModel (tiny random models, CPU, fp32)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdjax import pretrained
from sdjax.clip import VARIANTS, CLIPTextConfig, CLIPTextEncoder, strip_text_model_prefix
from sdjax.weights import diffusers_folder
from sdjax.weights.torch_names import load_state_dict, to_state_dict

import torch
import transformers


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def build(cfg, **kwargs):
    return pretrained.abstract_module(CLIPTextEncoder, cfg, **kwargs)


def param_count(module):
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def reference_model(hidden_act, eos_token_id):
    config = transformers.CLIPTextConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
        max_position_embeddings=77, hidden_act=hidden_act, bos_token_id=998, eos_token_id=eos_token_id,
        pad_token_id=1)
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=[("quick_gelu", 999), ("gelu", 2)], ids=["sd1-quick_gelu", "sd2-gelu"])
def pair(request, tmp_path_factory):
    """A transformers CLIPTextModel saved with save_pretrained and its sdjax twin loaded from the files."""
    ref = reference_model(*request.param)
    folder = tmp_path_factory.mktemp("clip")
    ref.save_pretrained(folder, safe_serialization=True)
    cfg = CLIPTextConfig.from_transformers(json.loads((folder / "config.json").read_text()))
    ours = build(cfg)
    sd = diffusers_folder.read_weights(folder, "model")
    load_state_dict(ours, strip_text_model_prefix(sd), ignore=("position_ids",))
    return ref, ours


def token_ids(batch=3, seed=0):
    """BOS, random text, EOS (999), then padding, with different lengths per row."""
    rng = np.random.default_rng(seed)
    ids = np.full((batch, 77), 1, np.int64)
    for row, n in enumerate(rng.integers(3, 70, batch)):
        ids[row, 0], ids[row, n + 1] = 998, 999
        ids[row, 1:n + 1] = rng.integers(3, 990, n)
    return ids


def test_outputs_match_transformers(pair):
    ref, ours = pair
    ids = token_ids()
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids), output_hidden_states=True)
    out = nnx.jit(lambda m, x: m.encode(x))(ours, jnp.asarray(ids, jnp.int32))
    assert out["last_hidden_state"].shape == (3, 77, 128)
    assert rel_err(out["last_hidden_state"], expected.last_hidden_state) <= 1e-4
    assert rel_err(out["pooler_output"], expected.pooler_output) <= 1e-4
    assert len(out["hidden_states"]) == len(expected.hidden_states) == 4
    for a, b in zip(out["hidden_states"], expected.hidden_states):
        assert rel_err(a, b) <= 1e-4


def test_clip_skip_is_diffusers_penultimate_layer(pair):
    """diffusers' clip_skip=k: final_layer_norm(hidden_states[-(k + 1)])."""
    ref, ours = pair
    ids = token_ids(2, seed=1)
    with torch.no_grad():
        hidden = ref(torch.from_numpy(ids), output_hidden_states=True).hidden_states
        expected = ref.final_layer_norm(hidden[-2])  # transformers 5: no text_model level
    assert rel_err(ours(jnp.asarray(ids), clip_skip=1), expected) <= 1e-4
    assert rel_err(ours(jnp.asarray(ids)), ref(torch.from_numpy(ids)).last_hidden_state.detach()) <= 1e-4
    with pytest.raises(ValueError, match="clip_skip=3 must be in"):
        ours(jnp.asarray(ids), clip_skip=3)


def test_state_dict_round_trip_and_names(pair):
    ref, ours = pair
    ref_sd = ref.state_dict()
    sd = to_state_dict(ours)
    assert set(sd) == {k for k in ref_sd if not k.endswith("position_ids")}
    for key, value in sd.items():
        np.testing.assert_array_equal(value, ref_sd[key].numpy())
    # the text_model.* layout of released checkpoints loads too
    fresh = build(ours.config)
    load_state_dict(fresh, strip_text_model_prefix(to_state_dict(ours, prefix="text_model.")))
    for a, b in zip(jax.tree.leaves(nnx.state(ours)), jax.tree.leaves(nnx.state(fresh))):
        np.testing.assert_array_equal(a, b)


def test_bf16_compute_with_fp32_params(pair):
    _, ours = pair
    bf16 = build(ours.config, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    load_state_dict(bf16, to_state_dict(ours))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    ids = jnp.asarray(token_ids(2))
    out = bf16(ids)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, ours(ids)) < 5e-2


@pytest.mark.parametrize("name,count", [("sd15", 123_060_480), ("sd21", 340_387_840), ("sdxl_g", 694_659_840)])
def test_full_size_parameter_counts(name, count):
    assert param_count(build(VARIANTS[name])) == count


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_config_round_trips_through_transformers(name):
    """to_transformers names the class (CLIPTextModel, or CLIPTextModelWithProjection: SDXL's second encoder) that
    builds a model of this one's parameter count, and reads back as the same config."""
    cfg = VARIANTS[name]
    d = cfg.to_transformers()
    ref_cfg = transformers.CLIPTextConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    assert CLIPTextConfig.from_transformers(dict(ref_cfg.to_dict(), architectures=d["architectures"])) == cfg
    with torch.device("meta"):
        ref = getattr(transformers, d["architectures"][0])(ref_cfg)
    assert param_count(build(cfg)) == sum(p.numel() for p in ref.parameters())


def test_config_errors():
    with pytest.raises(ValueError, match=r"unsupported config keys \['rope_theta'\]"):
        CLIPTextConfig.from_transformers({"hidden_size": 64, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="model_type .t5.: Stable Diffusion"):
        CLIPTextConfig.from_transformers({"model_type": "t5", "hidden_size": 64})
    with pytest.raises(ValueError, match="hidden_act 'relu' is not supported"):
        CLIPTextConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="not divisible"):
        CLIPTextConfig(hidden_size=100, num_attention_heads=3)


def test_wrong_checkpoint_names_missing_and_unexpected_tensors(pair):
    ref, ours = pair
    sd = to_state_dict(ours)
    sd.pop("final_layer_norm.weight")
    sd["encoder.layers.9.mlp.fc1.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match=r"missing tensors \(1\): final_layer_norm.weight(.|\n)*unexpected "
                                         r"tensors \(1\): encoder.layers.9.mlp.fc1.weight"):
        load_state_dict(build(ours.config), sd)
    sd = to_state_dict(ours)
    sd["embeddings.token_embedding.weight"] = np.zeros((5, 128), np.float32)
    with pytest.raises(ValueError, match=r"embeddings.token_embedding.weight has shape \(5, 128\), the model "
                                         r"expects \(1000, 128\)"):
        load_state_dict(build(ours.config), sd)
