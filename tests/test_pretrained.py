"""load_pretrained / save_pretrained / save_single_file against diffusers, on tiny random SD 1.x / 2.x / inpainting
pipelines saved in the real on-disk formats."""
import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sdjax
from sdjax.autoencoder import AutoencoderKLConfig
from sdjax.clip import CLIPTextConfig
from sdjax.unet import UNetConfig
from sdjax.weights import single_file
from sdjax.weights.safetensors_io import read_metadata
from tests import tiny_models

import torch
import diffusers

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


@pytest.mark.parametrize("case", ["sd1"], indirect=True)  # the sd1 folder the tests above use
def test_bf16_compute_with_fp32_params(case):
    pipe = sdjax.load_pretrained(case["folder"], dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert pipe.unet.conv_in.kernel.dtype == jnp.float32
    out = our_outputs(pipe)
    assert out["eps"].dtype == jnp.bfloat16
    assert rel_err(out["eps"], case["ref"]["eps"]) < 5e-2


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
    from sdjax import pretrained, variants
    from sdjax.autoencoder import AutoencoderKL
    from sdjax.clip import CLIPTextEncoder
    from sdjax.pipeline import StableDiffusion
    from sdjax.tokenizer import default_tokenizer
    from sdjax.unet import UNet2DConditionModel

    variant, rng = variants.get("tiny"), np.random.default_rng(3)
    modules = []
    for cls, config in ((CLIPTextEncoder, variant.text_encoder), (UNet2DConditionModel, variant.unet),
                        (AutoencoderKL, variant.vae)):
        module = pretrained.abstract_module(cls, config, dtype=jnp.float32, param_dtype=jnp.float32,
                                            attention_impl="auto")
        for _, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):  # random weights, without variant.build's
            var.set_value(jnp.asarray(rng.normal(0, 0.05, var.get_value().shape), jnp.float32))  # compile per shape
        modules.append(module)
    pipe = StableDiffusion(*modules, default_tokenizer(), dict(variant.scheduler, prediction_type="v_prediction"))
    path = sdjax.save_single_file(pipe, tmp_path / "tiny.safetensors")
    back = sdjax.load_pretrained(path)
    assert back.unet.config == pipe.unet.config and back.text_encoder.config == pipe.text_encoder.config
    assert back.prediction_type == "v_prediction"
    x, ctx = np.ones((1, 8, 8, 4), np.float32), np.ones((1, 77, 32), np.float32)
    eps = nnx.jit(lambda unet: unet(x, 10, ctx))  # one compiled program for both
    np.testing.assert_array_equal(eps(back.unet), eps(pipe.unet))
    plain = tmp_path / "plain.safetensors"
    single_file.write_checkpoint(single_file.read_checkpoint(path), plain)
    assert sdjax.load_pretrained(plain).unet.config.attention_head_dim == 8  # the SD 1.x convention


def _weight_files(folder):
    return {part: sorted(p.name for p in (folder / part).iterdir() if p.name != "config.json")
            for part in ("unet", "vae", "text_encoder")}


@pytest.fixture(scope="module")
def sd1_torch_pipeline(tmp_path_factory):
    return tiny_models.tiny_pipeline(tmp_path_factory.mktemp("sd1-torch"), "sd1")


@pytest.mark.parametrize("layout", ["fp16-variant", "sharded", "bin"])
def test_diffusers_folder_layouts_written_by_diffusers(layout, sd1_torch_pipeline, tmp_path):
    """fp16 variant files, sharded safetensors (*.safetensors.index.json) and .bin pickles, each written by diffusers'
    own save_pretrained, load with diffusers' outputs."""
    pipe = sd1_torch_pipeline
    folder, load_kwargs = tmp_path / layout, {}
    if layout == "fp16-variant":
        copy.deepcopy(pipe).to(torch.float16).save_pretrained(str(folder), variant="fp16")
        load_kwargs = dict(variant="fp16", torch_dtype=torch.float32)  # the fp16 weights, computed in fp32
        assert _weight_files(folder) == {"unet": ["diffusion_pytorch_model.fp16.safetensors"],
                                         "vae": ["diffusion_pytorch_model.fp16.safetensors"],
                                         "text_encoder": ["model.fp16.safetensors"]}
        assert single_file.read_checkpoint(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")[
            "conv_in.weight"].dtype == np.float16
    elif layout == "sharded":
        pipe.save_pretrained(str(folder), max_shard_size="300KB")
        for part, files in _weight_files(folder).items():
            index = [f for f in files if f.endswith(".safetensors.index.json")]
            assert len(index) == 1 and len(files) > 3, (part, files)
    else:
        pipe.save_pretrained(str(folder), safe_serialization=False)
        # transformers 5 writes safetensors whatever it is asked; write the text encoder's pytorch_model.bin with
        # the keys of the released SD checkpoints
        text_sd = {k if k.startswith("text_model.") else "text_model." + k: v
                   for k, v in pipe.text_encoder.state_dict().items()}
        (folder / "text_encoder" / "model.safetensors").unlink()
        torch.save(text_sd, folder / "text_encoder" / "pytorch_model.bin")
        assert _weight_files(folder) == {"unet": ["diffusion_pytorch_model.bin"],
                                         "vae": ["diffusion_pytorch_model.bin"], "text_encoder": ["pytorch_model.bin"]}
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                               requires_safety_checker=False, **load_kwargs)
    ours = sdjax.load_pretrained(folder)
    assert ours.unet.conv_in.kernel.dtype == jnp.float32
    assert_same(our_outputs(ours), reference_outputs(theirs))


def test_single_file_without_metadata_is_read_off_the_tensors(case):
    """A CompVis single file with no sdjax metadata (written from the diffusers folder's tensors): family, inpainting,
    sizes and the SD 2.x defaults (v-prediction, 96 x 96 latents: 768 px) come from the tensors alone."""
    import safetensors.numpy

    folder = case["folder"]
    weights = [safetensors.numpy.load_file(str(folder / part / name)) for part, name in
               (("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors"),
                ("text_encoder", "model.safetensors"))]
    configs = [json.loads((folder / part / "config.json").read_text()) for part in ("unet", "vae", "text_encoder")]
    path = case["tmp"] / "plain.safetensors"
    single_file.write_checkpoint(single_file.from_diffusers(*weights, single_file.info_from_configs(*configs)), path)
    assert set(read_metadata(path)) == {"format"}
    pipe = sdjax.load_pretrained(path)
    assert pipe.family == case["family"]
    assert pipe.unet.config.in_channels == (9 if case["inpaint"] else 4)
    assert pipe.unet.config == UNetConfig.from_diffusers(configs[0])
    assert pipe.vae.config == AutoencoderKLConfig.from_diffusers(configs[1])
    assert pipe.text_encoder.config == CLIPTextConfig.from_transformers(configs[2])
    sd2_768 = case["family"] == "sd2" and not case["inpaint"]
    assert pipe.prediction_type == ("v_prediction" if case["family"] == "sd2" else "epsilon")
    assert pipe.unet.config.sample_size == (96 if sd2_768 else 64)
    assert_same(our_outputs(pipe), case["ref"])


def test_abstract_module_matches_an_nnx_rngs_build():
    """load_pretrained plans each model without tracing it and keeps the plan per architecture: the modules have
    the structure, shapes and dtypes of nnx.eval_shape of a build with nnx.Rngs, and every call has fresh Variables."""
    from sdjax import pretrained, variants
    from sdjax.clip import CLIPTextEncoder
    from sdjax.unet import UNet2DConditionModel

    def leaves(module):
        return [(path, type(v), v.get_value().shape, v.get_value().dtype)
                for path, v in nnx.to_flat_state(nnx.state(module))]

    variant = variants.get("tiny")
    kwargs = dict(dtype=jnp.bfloat16, param_dtype=jnp.float32, attention_impl="einsum")
    for cls, config in ((CLIPTextEncoder, variant.text_encoder), (UNet2DConditionModel, variant.unet)):
        ours = pretrained.abstract_module(cls, config, **kwargs)
        reference = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), **kwargs))
        assert nnx.graphdef(ours) == nnx.graphdef(reference)
        assert leaves(ours) == leaves(reference)
        path, var = nnx.to_flat_state(nnx.state(ours, nnx.Param))[0]
        var.set_value(jnp.zeros(var.get_value().shape, var.get_value().dtype))
        again = dict(nnx.to_flat_state(nnx.state(pretrained.abstract_module(cls, config, **kwargs), nnx.Param)))
        assert isinstance(again[path].get_value(), jax.ShapeDtypeStruct), path


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_large_tensors_convert_into_their_own_populated_buffers(dtype):
    """A tensor of 1 MB or more that stays on the CPU is converted into its own mapping, faulted in at once (the
    parity tests' tiny models have none that large): a linear and a conv weight, transposed and cast, give
    numpy's transpose; below 1 MB, numpy's memory."""
    import mmap

    from sdjax.weights import torch_names

    rng = np.random.default_rng(0)
    cases = {"linear": (rng.standard_normal((1280, 1024)).astype(np.float32), (1, 0)),
             "conv": (rng.standard_normal((320, 320, 3, 3)).astype(np.float32), (2, 3, 1, 0)),
             "small": (rng.standard_normal((64, 96)).astype(np.float32), (1, 0))}
    for name, (weight, axes) in cases.items():
        view = torch_names._from_torch_layout("kernel", weight)
        like = jax.ShapeDtypeStruct(view.shape, dtype)
        buffer = torch_names._host_buffer(view.shape, np.dtype(dtype), stays=torch_names._on_cpu(like))
        root = buffer
        while isinstance(root, (np.ndarray, memoryview)):
            root = root.base if isinstance(root, np.ndarray) else root.obj
        assert isinstance(root, mmap.mmap) == (name != "small"), name
        out = torch_names._place(view, like)
        assert out.dtype == dtype and out.shape == weight.transpose(axes).shape
        np.testing.assert_array_equal(np.asarray(out), weight.transpose(axes).astype(dtype))
