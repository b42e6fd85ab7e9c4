"""sdjax.lora against diffusers + PEFT, on a tiny SD 1.x pipeline saved to disk: a PEFT adapter saved by diffusers'
save_lora_weights, a kohya / A1111 file with LoCon convolutions, and sdjax's own adapters exported in both layouts
give the text encoder and UNet outputs diffusers gives (unfused and fused); unfusing restores the base bit for bit;
a bad file attaches nothing; adapters stack, each at its scale, and a new scale does not recompile; sample.py's
--config.lora and <lora:name:w> tags."""
from __future__ import annotations

import collections
import copy
import functools
import hashlib

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import sdjax
from sdjax import lora
from sdjax.pipeline import StableDiffusion
from sdjax.weights.safetensors_io import write_safetensors
from sdjax.weights.torch_names import to_state_dict
from tests import tiny_models

import diffusers
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

pytestmark = pytest.mark.xdist_group("lora")  # one worker builds the tiny pipeline once

TIMESTEP = 500
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def assert_close(name: str, ours, ref, *, tol: float = 2e-5) -> None:  # measured: <= 1.8e-6
    err = max(rel_err(o, r) for o, r in zip(ours, ref))
    print(f"{name}: {err:.2e} relative")
    assert err <= tol, (name, err)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """PyTorch on one thread while this module runs: on 2 busy cores its second thread spins, and these tiny models
    run 10x slower with it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_unet():
    """A smaller SD 1.x UNet than tiny_models' (2 blocks, 1 layer each: quick to compile), still with every layer
    kind a LoRA adapts: attention projections, conv proj_in / proj_out, resnet convs, a stride-2 downsampler."""
    torch.manual_seed(11)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8, cross_attention_dim=tiny_models.CLIP_HIDDEN, norm_num_groups=8)
    return tiny_models.perturb_(unet, 11)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny_models.tiny_vae(), text_encoder=tiny_models.tiny_clip(), unet=tiny_unet(),
        tokenizer=tiny_models.tiny_tokenizer(tmp / "tokenizer_files"),
        scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(tmp / "tiny"), safe_serialization=True)
    return tmp / "tiny"


@pytest.fixture(scope="module")
def base(folder):
    return sdjax.load_pretrained(folder)


@pytest.fixture(scope="module")
def inputs(base):
    rng = np.random.default_rng(0)
    return dict(ids=np.asarray(base.tokenizer(["a photo of an astronaut riding a horse", "lowres"])),
                latents=rng.standard_normal((2, 16, 16, 4)).astype(np.float32),
                context=rng.standard_normal((2, 8, tiny_models.CLIP_HIDDEN)).astype(np.float32))


def fresh(base) -> StableDiffusion:
    """A copy of the sdjax pipeline whose text encoder and UNet a test may change."""
    return StableDiffusion(nnx.clone(base.text_encoder), nnx.clone(base.unet), base.vae, base.tokenizer,
                           dict(base.scheduler_config))


@functools.cache
def _diffusers_pipe(folder):
    return diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                             requires_safety_checker=False)


def diffusers_pipe(folder):
    """A fresh diffusers pipeline of the tiny folder (a copy: quicker than loading it again)."""
    return copy.deepcopy(_diffusers_pipe(folder))


def diffusers_outputs(pipe, x):
    """(text encoder output, UNet output (NHWC)) of a diffusers pipeline."""
    with torch.no_grad():
        text = pipe.text_encoder(torch.from_numpy(x["ids"]).long()).last_hidden_state.numpy()
        eps = pipe.unet(torch.from_numpy(x["latents"].transpose(0, 3, 1, 2)), TIMESTEP,
                        torch.from_numpy(x["context"])).sample.numpy()
    return text, eps.transpose(0, 2, 3, 1)


TRACES = collections.Counter()  # graphdef -> times _forward traced (= compiled) it


# Optimisation level 0: a third of the compile time of each adapter layout, the same numbers to 1e-7.
@functools.partial(jax.jit, static_argnums=0, compiler_options={"xla_backend_optimization_level": 0})
def _forward(graphdef, state, ids, latents, context):
    TRACES[graphdef] += 1  # runs only while tracing
    text_encoder, unet = nnx.merge(graphdef, state)
    return text_encoder(ids), unet(latents, TIMESTEP, context)


def sdjax_outputs(pipe, x):
    graphdef, state = nnx.split((pipe.text_encoder, pipe.unet))
    text, eps = _forward(graphdef, state, x["ids"], x["latents"], x["context"])
    return np.asarray(text), np.asarray(eps)


def fused_weights_match(name: str, pipe, dpipe, base) -> None:
    """sdjax's fused kernels against those of a fused diffusers pipeline (unload_lora_weights keeps them)."""
    dpipe.unload_lora_weights()
    worst, changed = 0.0, 0
    for component in ("unet", "text_encoder"):
        ours = to_state_dict(getattr(pipe, component))
        before = to_state_dict(getattr(base, component))
        ref = {k.removeprefix("text_model."): v.numpy() for k, v in getattr(dpipe, component).state_dict().items()}
        assert ours.keys() == ref.keys()
        worst = max(worst, max(rel_err(ours[k], ref[k]) for k in ours))
        changed += sum(rel_err(ours[k], before[k]) > 1e-3 for k in ours)
    assert changed == len(list(lora._adapted(pipe)))  # exactly the adapted kernels moved
    print(f"{name}: {worst:.2e} relative")
    assert worst <= 1e-5, (name, worst)


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Every LoRA weight random (PEFT starts lora_B at zero: the adapter would do nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def assert_base(pipe, base) -> None:
    """The pipeline's text encoder and UNet are the base ones, bit for bit, graph and state."""
    for component in ("text_encoder", "unet"):
        ours, ref = nnx.split(getattr(pipe, component)), nnx.split(getattr(base, component))
        assert ours[0] == ref[0], component
        flat, ref_flat = nnx.to_flat_state(ours[1]), nnx.to_flat_state(ref[1])
        assert [k for k, _ in flat] == [k for k, _ in ref_flat]
        for (key, v), (_, r) in zip(flat, ref_flat):
            np.testing.assert_array_equal(v.get_value(), r.get_value(), err_msg=str(key))


# ---------------------------------------------------------------------------------------------- the files

@pytest.fixture(scope="module")
def peft_file(folder, tmp_path_factory):
    """PEFT adapters (alpha != rank, a rank and an alpha pattern) on a diffusers pipeline's UNet and text encoder,
    saved by diffusers' save_lora_weights with their LoraConfigs in the metadata."""
    dpipe = diffusers_pipe(folder)
    unet_config = LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, rank_pattern={"to_k": 2},
                             alpha_pattern={"attn2.to_v": 3})
    text_config = LoraConfig(r=2, lora_alpha=5, target_modules=TEXT_TARGETS)
    dpipe.unet.add_adapter(unet_config)
    inject_adapter_in_model(text_config, dpipe.text_encoder)  # transformers 5's add_adapter wants peft >= 0.22
    randomize_(dpipe.unet, 1)
    randomize_(dpipe.text_encoder, 2)
    out = tmp_path_factory.mktemp("peft") / "peft-style"
    diffusers.StableDiffusionPipeline.save_lora_weights(
        str(out), unet_lora_layers=get_peft_model_state_dict(dpipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(dpipe.text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict())
    return out


# kohya name -> (rank, alpha, down shape after the rank (PyTorch layout), out features). Every attention projection
# has the same alpha and the text encoder self-attention layers only: diffusers 0.42 reads neither a per-layer alpha
# of kohya's attention names (it falls back to the file's most common alpha) nor the self-attention layers of a file
# that also adapts mlp layers. sdjax reads both as kohya and A1111 do.
KOHYA_LAYERS = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (4, 3.0, (32,), 32),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (4, 3.0, (128,), 32),
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0": (2, 3.0, (32,), 32),
    "lora_unet_down_blocks_0_attentions_0_proj_in": (4, 8.0, (32, 1, 1), 32),  # LoCon: a 1x1 conv
    "lora_unet_down_blocks_0_resnets_0_conv1": (2, 1.0, (32, 3, 3), 32),  # LoCon: a 3x3 conv
    "lora_unet_down_blocks_0_downsamplers_0_conv": (2, 4.0, (32, 3, 3), 32),  # stride 2
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2": (4, 2.0, (256,), 64),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (4, 2.0, (128,), 128),
    "lora_te_text_model_encoder_layers_1_self_attn_out_proj": (2, 2.0, (128,), 128),
}


def write_kohya(path, seed: int = 0):
    """A kohya-layout file (lora_down / lora_up / alpha per layer) on some layers only, convolutions included."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, (rank, alpha, down, out) in KOHYA_LAYERS.items():
        up_shape = (out, rank, 1, 1) if len(down) == 3 else (out, rank)
        tensors[f"{name}.lora_down.weight"] = rng.standard_normal((rank, *down)).astype(np.float32) * 0.2
        tensors[f"{name}.lora_up.weight"] = rng.standard_normal(up_shape).astype(np.float32) * 0.2
        tensors[f"{name}.alpha"] = np.asarray(alpha, np.float32)
    write_safetensors(tensors, path, {"ss_network_module": "networks.lora"})
    return path


@pytest.fixture(scope="module")
def kohya_file(tmp_path_factory):
    return write_kohya(tmp_path_factory.mktemp("kohya") / "kohya-style.safetensors")


# ---------------------------------------------------------------------------------------------- loaded side by side

@pytest.fixture(scope="module")
def plain(folder, inputs):
    """diffusers' outputs without adapters."""
    return diffusers_outputs(diffusers_pipe(folder), inputs)


@pytest.fixture(scope="module")
def stacked(folder, base, peft_file, kohya_file):
    """An sdjax and a diffusers pipeline, each with both files loaded; a test sets the scales it needs (0: off, the
    adapter then adds exactly nothing). One adapter layout, so one compiled program serves every scale."""
    pipe = fresh(base)
    assert pipe.load_lora(peft_file) == "peft-style"  # a diffusers folder is named after the folder
    assert pipe.load_lora(kohya_file) == "kohya-style"  # a file after its stem, as A1111 names it
    assert lora.adapters(pipe) == {"kohya-style": {"unet": 7, "text_encoder": 2},
                                   "peft-style": {"unet": 32, "text_encoder": 8}}  # 4 attention blocks, 2 layers
    dpipe = diffusers_pipe(folder)
    for path in (peft_file, kohya_file):
        dpipe.load_lora_weights(str(path), adapter_name=lora.default_name(path))
    return pipe, dpipe


def set_scales(stacked, scales: dict) -> None:
    """{adapter: scale or (UNet scale, text encoder scale)} on both pipelines."""
    pipe, dpipe = stacked
    weights = []
    for name, scale in scales.items():
        unet, text = scale if isinstance(scale, tuple) else (scale, scale)
        pipe.set_lora_scale(name, unet, text_encoder_scale=text)
        weights.append({"unet": unet, "text_encoder": text})
    dpipe.set_adapters(list(scales), weights)


def test_peft_lora_matches_diffusers(stacked, inputs, plain):
    set_scales(stacked, {"peft-style": (0.7, 0.4), "kohya-style": 0.0})
    ref = diffusers_outputs(stacked[1], inputs)
    assert min(rel_err(r, p) for r, p in zip(ref, plain)) > 0.05  # the adapter changes both outputs
    assert_close("peft unfused", sdjax_outputs(stacked[0], inputs), ref)


def test_kohya_lora_matches_diffusers(stacked, inputs, plain):
    set_scales(stacked, {"peft-style": 0.0, "kohya-style": 0.8})
    ref = diffusers_outputs(stacked[1], inputs)
    assert min(rel_err(r, p) for r, p in zip(ref, plain)) > 0.05
    assert_close("kohya unfused", sdjax_outputs(stacked[0], inputs), ref)


def test_two_adapters_each_at_its_scale_without_recompiling(stacked, inputs, peft_file):
    pipe = stacked[0]
    graphdef = nnx.graphdef((pipe.text_encoder, pipe.unet))
    outputs = []
    for peft_scale, kohya_scale in ((0.6, 0.9), (1.0, -0.5)):
        set_scales(stacked, {"peft-style": peft_scale, "kohya-style": kohya_scale})
        outputs.append(sdjax_outputs(pipe, inputs))
        assert_close(f"two adapters at {peft_scale} / {kohya_scale}", outputs[-1],
                     diffusers_outputs(stacked[1], inputs))
    assert TRACES[graphdef] == 1  # every scale of every test on this layout: one compilation
    assert rel_err(outputs[0][1], outputs[1][1]) > 0.05
    with pytest.raises(ValueError, match="no adapter named 'other'; loaded: kohya-style, peft-style"):
        pipe.set_lora_scale("other", 1.0)
    with pytest.raises(ValueError, match="a LoRA named 'peft-style' is loaded already: unload_lora"):
        pipe.load_lora(peft_file)


def test_fused_matches_diffusers_and_unfuse_restores_the_base(folder, base, inputs, peft_file, kohya_file):
    pipe = fresh(base)
    pipe.load_lora(peft_file, scale=0.7, text_encoder_scale=0.4)
    pipe.load_lora(kohya_file, scale=0.8)
    dpipe = diffusers_pipe(folder)
    for path in (peft_file, kohya_file):
        dpipe.load_lora_weights(str(path), adapter_name=lora.default_name(path))
    dpipe.set_adapters(["peft-style", "kohya-style"], [{"unet": 0.7, "text_encoder": 0.4}, 0.8])
    unfused = sdjax_outputs(pipe, inputs)  # the stacked layout's program: no compilation
    dpipe.fuse_lora()
    pipe.fuse_lora()
    assert lora.is_fused(pipe)
    assert_close("both fused", sdjax_outputs(pipe, inputs), diffusers_outputs(dpipe, inputs))
    fused_weights_match("both fused, kernels", pipe, dpipe, base)

    pipe.unfuse_lora()
    for component in ("text_encoder", "unet"):  # every kernel as it was, bit for bit
        ours, ref = to_state_dict(getattr(pipe, component)), to_state_dict(getattr(base, component))
        for key, value in ours.items():
            np.testing.assert_array_equal(value, ref[key], err_msg=key)
    for ours, before in zip(sdjax_outputs(pipe, inputs), unfused):
        np.testing.assert_array_equal(ours, before)
    pipe.unload_lora()
    assert_base(pipe, base)


# ---------------------------------------------------------------------------------------------- sdjax's own

@pytest.fixture(scope="module")
def own(base, inputs, plain, tmp_path_factory):
    """An adapter made by add_lora (up weights then random), its outputs, and its exports in both layouts."""
    pipe = fresh(base)
    key = jax.random.key(0)
    paths = lora.add_lora(pipe.unet, "mine", rank=4, alpha=2.0, targets=["attn2.to_v", "proj_in", "conv1",
                                                                           "downsamplers.0.conv"], key=key)
    paths += lora.add_lora(pipe.text_encoder, "mine", rank=2, alpha=6.0, targets=["q_proj", "out_proj"], key=key,
                           scale=0.5)  # self-attention only: see KOHYA_LAYERS
    assert len(paths) == 21  # 4 to_v, 4 proj_in, 8 conv1, 1 downsampler; 2 q_proj, 2 out_proj
    before = sdjax_outputs(pipe, inputs)
    assert_close("add_lora (up zero) vs the base model", before, plain)
    rng = np.random.default_rng(3)
    for _, _, layer in lora._adapted(pipe):
        up = layer.lora["mine"].up
        up.set_value(rng.standard_normal(up.shape).astype(np.float32) * 0.2)
    after = sdjax_outputs(pipe, inputs)
    assert min(rel_err(a, b) for a, b in zip(after, before)) > 0.05
    tmp = tmp_path_factory.mktemp("own")
    files = {fmt: lora.save_lora(pipe, tmp / fmt / ("mine.safetensors" if fmt == "kohya" else ""), format=fmt)
             for fmt in lora.FORMATS}
    return pipe, after, files


@pytest.mark.parametrize("fmt", lora.FORMATS)
def test_own_adapter_exports_load_in_diffusers(folder, base, inputs, own, fmt):
    pipe, ours, files = own
    assert files[fmt].name == ("mine.safetensors" if fmt == "kohya" else "pytorch_lora_weights.safetensors")
    dpipe = diffusers_pipe(folder)
    dpipe.load_lora_weights(str(files[fmt]), adapter_name="mine")
    dpipe.set_adapters("mine", {"unet": 1.0, "text_encoder": 0.5})
    assert_close(f"own adapter, {fmt} file, in diffusers", ours, diffusers_outputs(dpipe, inputs))

    back = fresh(base)  # and sdjax reads its own file back as it was
    back.load_lora(files[fmt], name="mine", text_encoder_scale=0.5)
    ours_flat = dict(nnx.to_flat_state(nnx.state((pipe.text_encoder, pipe.unet), nnx.LoRAParam)))
    back_flat = dict(nnx.to_flat_state(nnx.state((back.text_encoder, back.unet), nnx.LoRAParam)))
    assert ours_flat.keys() == back_flat.keys() and len(ours_flat) == 42
    for key, v in ours_flat.items():
        np.testing.assert_array_equal(back_flat[key].get_value(), v.get_value(), err_msg=str(key))
    assert nnx.graphdef(back.unet) == nnx.graphdef(pipe.unet)  # the same alphas (graph constants) and names


# ---------------------------------------------------------------------------------------------- errors, saving

def test_bad_keys_attach_nothing(base, peft_file, kohya_file, tmp_path):
    from safetensors.numpy import load_file

    pipe = fresh(base)
    graphdef = nnx.graphdef((pipe.text_encoder, pipe.unet))
    kohya = load_file(kohya_file)
    bad = "lora_unet_down_blocks_7_attentions_0_proj_in"
    kohya.update({f"{bad}.lora_down.weight": np.zeros((2, 32, 1, 1), np.float32),
                  f"{bad}.lora_up.weight": np.zeros((32, 2, 1, 1), np.float32)})
    write_safetensors(kohya, tmp_path / "bad-kohya.safetensors")
    peft = load_file(lora.lora_file(peft_file))
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_z.lora_A.weight"
    peft[key] = np.zeros((4, 32), np.float32)
    write_safetensors(peft, tmp_path / "bad-peft.safetensors")
    wide = load_file(kohya_file)
    wide["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = np.zeros((4, 768), np.float32)
    write_safetensors(wide, tmp_path / "wide.safetensors")
    loha = {"lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": np.zeros((2, 2), np.float32)}
    write_safetensors(loha, tmp_path / "loha.safetensors")
    cases = [("bad-kohya", rf"{bad}.lora_(down|up).weight names no layer of this model; the nearest is "
                           r"lora_unet_down_blocks_\d_attentions_0_proj_in"),
             ("bad-peft", rf"{key} names no layer of this model .* the nearest is unet.down_blocks.0.attentions.0."
                          r"transformer_blocks.0.attn1.to_"),
             ("wide", r"q_proj.lora_down.weight has shape \(4, 768\), the layer needs \(4, 128\)"),
             ("loha", "hada_w1_a is LoHa, not a plain LoRA")]
    for stem, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe.load_lora(tmp_path / f"{stem}.safetensors")
        assert lora.adapters(pipe) == {}
        assert nnx.graphdef((pipe.text_encoder, pipe.unet)) == graphdef
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipe.load_lora(tmp_path / "missing.safetensors")


def test_saving_the_base_model_refuses_unfused_adapters(base, kohya_file, tmp_path):
    pipe = fresh(base)
    pipe.load_lora(kohya_file, scale=0.5)
    for save in (sdjax.save_pretrained, sdjax.save_single_file):
        with pytest.raises(ValueError, match=r"carries LoRA adapters \(kohya-style\) that are not part of its weights: "
                                             r"pipe.fuse_lora\(\) first"):
            save(pipe, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    pipe.fuse_lora()
    with pytest.raises(ValueError, match="fused into the weights; call unfuse_lora"):
        pipe.set_lora_scale("kohya-style", 1.0)
    sdjax.save_pretrained(pipe, tmp_path / "merged")  # fused: the merged model
    merged = sdjax.load_pretrained(tmp_path / "merged")
    for component in ("unet", "text_encoder"):
        ours, saved = to_state_dict(getattr(pipe, component)), to_state_dict(getattr(merged, component))
        for key, value in ours.items():
            np.testing.assert_array_equal(saved[key], value, err_msg=key)


# ---------------------------------------------------------------------------------------------- sample.py

def current_scales(pipe) -> dict[str, tuple[float, float]]:
    """{adapter: (UNet scale, text encoder scale)} as the pipeline's layers hold them (one value per component)."""
    found = collections.defaultdict(set)
    for component, _, layer in lora._adapted(pipe):
        for name, adapter in layer.lora.items():
            found[name, component].add(round(float(adapter.scale[...]), 6))
    assert all(len(values) == 1 for values in found.values()), found
    return {name: (min(found[name, "unet"]), min(found[name, "text_encoder"])) for name, _ in found}


def addnet_hash(path) -> str:
    """A1111's "Lora hashes" entry of a .safetensors file: sha256 of the bytes after the header, 12 digits."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


def test_sample_job_loras_and_prompt_tags(folder, base, peft_file, kohya_file, tmp_path, monkeypatch):
    """--config.lora adds a tag to every prompt; tags resolve under --config.lora_dir; prompts with different tags
    run in separate batches at their own strengths; the PNGs keep the tags and record A1111's Lora hashes."""
    from configs import sample as sample_config
    from sdjax import jobs, pipeline

    calls = []

    def generate(pipe, texts, **kwargs):
        calls.append((texts, current_scales(pipe)))
        return np.zeros((len(texts), 16, 16, 3), np.uint8)

    monkeypatch.setattr(jobs, "_load_model", lambda config: fresh(base))
    monkeypatch.setattr(pipeline, "generate", generate)
    (tmp_path / "prompts.txt").write_text("a castle <lora:kohya-style:0.5>\na field\n"
                                          "a castle <lora:kohya-style:0.5>, at night\n"
                                          "<lora:kohya-style:0.8:0.2>a tree\n")
    config = sample_config.get_config()
    config.update(checkpoint=str(folder), prompts_file=str(tmp_path / "prompts.txt"), lora=f"{peft_file}:0.7",
                  lora_dir=str(kohya_file.parent), steps=2, height=16, width=16, batch_size=4,
                  output_dir=str(tmp_path / "out"))
    jobs.run(config)
    peft_on, kohya_off = (0.7, 0.7), (0.0, 0.0)
    assert calls == [  # batches of 4 (padded with the last slot), one per set of tags
        (["a castle  ", "a castle , at night ", "a castle , at night ", "a castle , at night "],
         {"peft-style": peft_on, "kohya-style": (0.5, 0.5)}),
        (["a field "] * 4, {"peft-style": peft_on, "kohya-style": kohya_off}),
        (["a tree "] * 4, {"peft-style": peft_on, "kohya-style": (0.2, 0.8)})]
    hashes = {"kohya-style": addnet_hash(kohya_file), "peft-style": addnet_hash(lora.lora_file(peft_file))}
    for index, prompt, names in [(0, "a castle <lora:kohya-style:0.5> <lora:peft-style:0.7>", ["kohya-style",
                                                                                            "peft-style"]),
                                 (1, "a field <lora:peft-style:0.7>", ["peft-style"]),
                                 (3, "<lora:kohya-style:0.8:0.2>a tree <lora:peft-style:0.7>", ["kohya-style",
                                                                                                "peft-style"])]:
        png = next((tmp_path / "out").glob(f"{index:05d}-*.png"))
        text = Image.open(png).info["parameters"]
        assert f'Lora hashes: "{", ".join(f"{n}: {hashes[n]}" for n in names)}"' in text
        recorded, _, fields = jobs.parse_parameters(text)
        assert recorded == prompt and fields["Lora hashes"] == ", ".join(f"{n}: {hashes[n]}" for n in names)
    jobs.run(config)  # a re-run reads the PNGs back (quoted hashes and all) and finds nothing to do
    assert len(calls) == 3

    monkeypatch.setattr(jobs, "load_model", lambda config: pytest.fail("the model loaded before the check"))
    for change, message in [
            (dict(lora=f"{tmp_path / 'missing.safetensors'}:0.5"),
             r"^--config.lora: .*missing.safetensors does not exist; give LoRA files"),
            (dict(lora_dir=""), r"names LoRA 'kohya-style': set --config.lora_dir=FOLDER to the folder that holds "
                                r"kohya-style.safetensors, or give the file in --config.lora"),
            (dict(lora_dir=str(tmp_path)), r"no LoRA file named kohya-style .* under .*: put it there"),
            (dict(lora=f"{kohya_file}:0.3"), "has a tag for LoRA 'kohya-style', which --config.lora adds to every "
                                             "prompt: drop one of the two"),
            (dict(lora_dir=str(tmp_path / "prompts.txt")), "--config.lora_dir=.* is not a folder"),
            (dict(lora=str(tmp_path / "prompts.txt")), r"^LoRA file: .*prompts.txt is not a LoRA file: expected one")]:
        with pytest.raises(jobs.ConfigError, match=message) as error:
            jobs.run(dict_update(config, change))
        assert "\n" not in str(error.value)

    from sdjax.weights.safetensors_io import read_safetensors

    other = tmp_path / "retrained"  # a file of the same name with other weights: its images are another job's
    other.mkdir()
    write_safetensors({k: v * 2 for k, v in read_safetensors(kohya_file).items()}, other / kohya_file.name)
    with pytest.raises(jobs.ConfigError, match=r"00000-.*\.png was made by another job \(Lora hashes 'kohya-style: "
                                               rf"{hashes['kohya-style']}, .* here, 'kohya-style: [0-9a-f]{{12}}, "):
        jobs.run(dict_update(config, dict(lora_dir=str(other))))


def dict_update(config, change):
    config = copy.deepcopy(config)
    config.update(change)
    return config


def test_a_prompt_tag_finds_a_lora_by_file_name_or_by_its_alias(tmp_path):
    """<lora:NAME> is NAME.safetensors under lora_dir, else the file whose ss_output_name is NAME (A1111's alias)."""
    from sdjax.weights.safetensors_io import write_safetensors

    tensors = {"lora_unet_x.alpha": np.ones((), np.float32)}
    (tmp_path / "sub").mkdir()
    write_safetensors(tensors, tmp_path / "sub" / "detail_v2-000010.safetensors", {"ss_output_name": "add_detail"})
    write_safetensors(tensors, tmp_path / "style.safetensors", {})
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    assert lora.find_lora("style", tmp_path) == tmp_path / "style.safetensors"
    assert lora.find_lora("add_detail", tmp_path) == tmp_path / "sub" / "detail_v2-000010.safetensors"
    with pytest.raises(FileNotFoundError, match="nor one whose ss_output_name is nothing"):
        lora.find_lora("nothing", tmp_path)
