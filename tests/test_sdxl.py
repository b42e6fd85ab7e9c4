"""SDXL against diffusers on tiny random SDXL-shaped models: the two text encoders' conditioning (context and
pooled embedding) as StableDiffusionXLPipeline.encode_prompt gives it, base and refiner. (The UNet's added
conditioning: tests/test_unet.py.)"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import pretrained
from sdjax.clip import CLIPTextConfig, CLIPTextEncoder, sdxl_conditioning, strip_text_model_prefix
from sdjax.weights.torch_names import load_state_dict
from tests import tiny_models

import torch

pytestmark = pytest.mark.xdist_group("sdxl")  # one worker builds the tiny pipelines once

PROMPTS = ["a photo of an astronaut riding a horse on the moon", "lowres"]


@pytest.fixture(scope="module")
def torch_pipes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxl")
    return {"base": tiny_models.tiny_sdxl_pipeline(tmp), "refiner": tiny_models.tiny_sdxl_pipeline(tmp, refiner=True)}


def sdjax_encoder(model) -> CLIPTextEncoder:
    config = dict(model.config.to_dict(), architectures=[type(model).__name__])  # as save_pretrained writes it
    encoder = pretrained.abstract_module(CLIPTextEncoder, CLIPTextConfig.from_transformers(config))
    load_state_dict(encoder, strip_text_model_prefix({k: v.numpy() for k, v in model.state_dict().items()}),
                    ignore=("position_ids",))
    return encoder


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("which, clip_skip", [("base", None), ("base", 1), ("refiner", None)])
def test_text_conditioning_matches_diffusers(torch_pipes, which, clip_skip):
    pipe = torch_pipes[which]
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False, clip_skip=clip_skip)
    pairs = [(pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)]
    pairs = [(e, t) for e, t in pairs if e is not None]
    encoders = [sdjax_encoder(e) for e, _ in pairs]
    assert [e.config.with_projection for e in encoders] == [False] * (len(pairs) - 1) + [True]
    ids = [np.asarray(t(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids) for _, t in pairs]
    ours, ours_pooled = sdxl_conditioning(encoders, [jnp.asarray(i) for i in ids], clip_skip=clip_skip or 0)
    assert ours.shape == context.shape == (2, 77, tiny_models.CLIP_HIDDEN * len(pairs))
    assert ours_pooled.shape == pooled.shape == (2, tiny_models.SDXL_POOLED)
    assert rel_err(ours, context.numpy()) <= 1e-4 and rel_err(ours_pooled, pooled.numpy()) <= 1e-4
