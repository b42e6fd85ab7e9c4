"""load_pretrained / save_pretrained / save_single_file against diffusers, on tiny random SD 1.x / 2.x / inpainting
pipelines saved in the real on-disk formats."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sdjax
from sdjax.weights import single_file
from tests import tiny_models

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a photo of an astronaut riding a horse", "", "A CAT, sitting; on 3 mats!"]


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def inputs(in_channels):
    rng = np.random.default_rng(0)
    return dict(latents=rng.standard_normal((2, 16, 16, in_channels)).astype(np.float32),
                image=rng.uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32),
                z=rng.standard_normal((1, 8, 8, 4)).astype(np.float32))


def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def reference_outputs(pipe):
    """Token ids, text embeddings, UNet output, VAE posterior mean and decode of a diffusers pipeline."""
    x = inputs(pipe.unet.config.in_channels)
    ids = pipe.tokenizer(PROMPTS[:2], padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        context = pipe.text_encoder(ids).last_hidden_state
        eps = pipe.unet(nchw(x["latents"]), 981, context).sample
        mean = pipe.vae.encode(nchw(x["image"])).latent_dist.mean
        image = pipe.vae.decode(nchw(x["z"])).sample
    return dict(ids=ids.numpy(), context=context.numpy(), eps=nhwc(eps), mean=nhwc(mean), image=nhwc(image))


@nnx.jit
def _forward(pipe_modules, ids, latents, image, z):
    text_encoder, unet, vae = pipe_modules
    context = text_encoder(ids)
    return context, unet(latents, 981, context), vae.encode(image)[0], vae.decode(z)


def our_outputs(pipe):
    x = inputs(pipe.unet.config.in_channels)
    ids = pipe.tokenizer(PROMPTS[:2])
    context, eps, mean, image = _forward((pipe.text_encoder, pipe.unet, pipe.vae), jnp.asarray(ids),
                                         x["latents"], x["image"], x["z"])
    return dict(ids=ids, context=context, eps=eps, mean=mean, image=image)


def assert_same(ours, ref):
    np.testing.assert_array_equal(ours["ids"], ref["ids"])
    for key in ("context", "eps", "mean", "image"):
        assert rel_err(ours[key], ref[key]) <= 1e-4, key


CASES = {"sd1": ("sd1", False), "sd2": ("sd2", False), "sd1-inpaint": ("sd1", True)}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    family, inpaint = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    folder = tiny_models.tiny_diffusers_folder(tmp, family, inpaint)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                            requires_safety_checker=False)
    return dict(family=family, inpaint=inpaint, tmp=tmp, folder=folder, ref=reference_outputs(ref))


def test_diffusers_folder_loads_with_reference_outputs(case):
    pipe = sdjax.load_pretrained(case["folder"])
    assert pipe.family == case["family"]
    assert pipe.unet.config.in_channels == (9 if case["inpaint"] else 4)
    assert pipe.scheduler_config["_class_name"] == "PNDMScheduler"
    assert pipe.scheduler_config["beta_schedule"] == "scaled_linear"
    assert_same(our_outputs(pipe), case["ref"])


def test_save_single_file_loads_in_diffusers_and_back(case):
    pipe = sdjax.load_pretrained(case["folder"])
    path = sdjax.save_single_file(pipe, case["tmp"] / "model.safetensors")
    # the CompVis layout, detected from the tensors alone
    info = single_file.detect(single_file.read_checkpoint(path))
    assert info.family == case["family"] and info.unet_in_channels == (9 if case["inpaint"] else 4)
    cls = diffusers.StableDiffusionInpaintPipeline if case["inpaint"] else diffusers.StableDiffusionPipeline
    theirs = cls.from_single_file(str(path), config=str(case["folder"]), local_files_only=True,
                                  safety_checker=None, requires_safety_checker=False)
    assert_same(reference_outputs(theirs), case["ref"])
    back = sdjax.load_pretrained(path, prediction_type="epsilon")
    assert back.family == case["family"] and back.scheduler_config["prediction_type"] == "epsilon"
    assert_same(our_outputs(back), case["ref"])  # the built-in tokenizer gives the folder tokenizer's ids


def test_save_pretrained_loads_in_diffusers(case):
    pipe = sdjax.load_pretrained(case["folder"])
    out = sdjax.save_pretrained(pipe, case["tmp"] / "saved")
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None,
                                                               requires_safety_checker=False)
    assert_same(reference_outputs(theirs), case["ref"])
    assert theirs.scheduler.config.steps_offset == 1
    assert_same(our_outputs(sdjax.load_pretrained(out)), case["ref"])


def test_ckpt_and_fp16_files(tmp_path):
    """A pickled .ckpt ({"state_dict": ...}, as CompVis released them) and fp16 tensors load too."""
    folder = tiny_models.tiny_diffusers_folder(tmp_path, "sd1")
    pipe = sdjax.load_pretrained(folder)
    sdjax.save_single_file(pipe, tmp_path / "model.safetensors")
    sd = single_file.read_checkpoint(tmp_path / "model.safetensors")
    sd["alphas_cumprod"] = np.ones(1000, np.float32)  # schedule buffers of training checkpoints are skipped
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}, "global_step": 1},
               tmp_path / "model.ckpt")
    ckpt = sdjax.load_pretrained(tmp_path / "model.ckpt")
    ref = our_outputs(pipe)
    assert_same(our_outputs(ckpt), ref)
    half = sdjax.save_single_file(pipe, tmp_path / "half.safetensors", dtype=np.float16)
    assert single_file.read_checkpoint(half)["first_stage_model.encoder.conv_in.weight"].dtype == np.float16
    loaded = sdjax.load_pretrained(half)
    assert loaded.unet.conv_in.kernel.dtype == jnp.float32
    assert rel_err(our_outputs(loaded)["eps"], ref["eps"]) < 1e-2


def test_bf16_compute_with_fp32_params(tmp_path):
    folder = tiny_models.tiny_diffusers_folder(tmp_path, "sd1")
    pipe = sdjax.load_pretrained(folder, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert pipe.unet.conv_in.kernel.dtype == jnp.float32
    out = our_outputs(pipe)
    assert out["eps"].dtype == jnp.bfloat16
    assert rel_err(out["eps"], our_outputs(sdjax.load_pretrained(folder))["eps"]) < 5e-2


def test_bad_paths_and_checkpoints_give_precise_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sdjax.load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without model_index.json"):
        sdjax.load_pretrained(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither a diffusers folder"):
        sdjax.load_pretrained(tmp_path / "notes.txt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        sdjax.load_pretrained(tmp_path / "junk.safetensors")

    folder = tiny_models.tiny_diffusers_folder(tmp_path, "sd1")
    pipe = sdjax.load_pretrained(folder)
    path = sdjax.save_single_file(pipe, tmp_path / "model.safetensors")
    sd = single_file.read_checkpoint(path)
    key = "model.diffusion_model.out.2.bias"
    extra = "model.diffusion_model.input_blocks.99.0.weight"
    broken = {k: v for k, v in sd.items() if k != key} | {extra: np.zeros(3, np.float32)}
    single_file.write_checkpoint(broken, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match=rf"missing tensors \(1\): {key}(.|\n)*unexpected tensors \(1\): {extra}"):
        sdjax.load_pretrained(tmp_path / "broken.safetensors")
    single_file.write_checkpoint({k: v for k, v in sd.items() if not k.startswith("first_stage_model.")},
                                 tmp_path / "novae.safetensors")
    with pytest.raises(ValueError, match="not a Stable Diffusion 1.x / 2.x single file: no VAE"):
        sdjax.load_pretrained(tmp_path / "novae.safetensors")

    # a diffusers folder whose weights do not fit its config: the tensor and both shapes are named
    cfg_file = folder / "unet" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["cross_attention_dim"] = 64
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"attn2.to_k.weight has shape \(\d+, 128\), the model expects \(\d+, 64\)"):
        sdjax.load_pretrained(folder)


def test_single_file_records_exact_configs(tmp_path):
    """A model off the SD conventions (tiny: 2 attention heads, 32-wide CLIP, v-prediction) comes back exactly:
    save_single_file stores the configs in the safetensors metadata; a file without them is read by convention."""
    from sdjax import variants
    from sdjax.pipeline import StableDiffusion
    from sdjax.tokenizer import default_tokenizer

    variant = variants.get("tiny")
    pipe = StableDiffusion(*variant.build(seed=3), default_tokenizer(),
                           dict(variant.scheduler, prediction_type="v_prediction"))
    path = sdjax.save_single_file(pipe, tmp_path / "tiny.safetensors")
    back = sdjax.load_pretrained(path)
    assert back.unet.config == pipe.unet.config and back.text_encoder.config == pipe.text_encoder.config
    assert back.prediction_type == "v_prediction"
    x, ctx = np.ones((1, 8, 8, 4), np.float32), np.ones((1, 77, 32), np.float32)
    np.testing.assert_array_equal(back.unet(x, 10, ctx), pipe.unet(x, 10, ctx))
    plain = tmp_path / "plain.safetensors"
    single_file.write_checkpoint(single_file.read_checkpoint(path), plain)
    assert sdjax.load_pretrained(plain).unet.config.attention_head_dim == 8  # the SD 1.x convention
