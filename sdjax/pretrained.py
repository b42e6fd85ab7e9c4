"""load_pretrained / save_pretrained / save_single_file: real Stable Diffusion checkpoints in and out.

Two on-disk layouts are understood:
  * a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/);
  * a single CompVis / A1111 file (.safetensors or .ckpt), whose architecture is read off its tensors.
Either becomes a `StableDiffusion` of NNX modules; both can be written back.
"""
from __future__ import annotations

import copy
import functools
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax import initializers, sdxl, variants
from sdjax.autoencoder import AutoencoderKL, AutoencoderKLConfig, vae_kwargs  # noqa: F401 (public here too)
from sdjax.clip import CLIPTextConfig, CLIPTextEncoder, strip_text_model_prefix
from sdjax.pipeline import StableDiffusion
from sdjax.tokenizer import family_tokenizer, has_tokenizer_files, load_tokenizer
from sdjax.unet import UNet2DConditionModel, UNetConfig
from sdjax.weights import diffusers_folder as df
from sdjax.weights import single_file
from sdjax.weights.safetensors_io import read_metadata
from sdjax.weights.torch_names import submit_state_dict, threads, to_state_dict

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
_TEXT_ENCODER_BUFFERS = ("position_ids",)


def abstract_module(cls, config, **kwargs):
    """`cls(config, **kwargs)` with shapes, dtypes and shardings only: nothing initialised, nothing traced
    (`sdjax.initializers.plan`; `nnx.eval_shape` of the constructor took ~100 s for SD 1.5 on 2 cores).

    The module is kept per (class, config, kwargs): a second load of the same architecture in a process
    only builds fresh Variables (`nnx.merge`).
    """
    graphdef, state = _abstract_split(cls, config, tuple(sorted(kwargs.items())))
    return nnx.merge(graphdef, state, copy=True)


@functools.lru_cache(maxsize=32)
def _abstract_split(cls, config, kwargs: tuple):
    module, _ = initializers.plan(lambda rngs: cls(config, rngs=rngs, **dict(kwargs)))
    return nnx.split(module)


def _submit(pool, cls, config, state_dict, *, what: str, ignore=(), **kwargs):
    """Build `cls` abstractly and start filling it from `state_dict` on `pool`; returns the function that waits and
    gives the module. The next module is built while this one's tensors convert."""
    module = abstract_module(cls, config, **kwargs)
    finish = submit_state_dict(module, state_dict, pool, what=what, ignore=ignore)

    def done():
        finish()
        return module
    return done


def load_pretrained(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None,
                    attention_impl: str = "auto", prediction_type: str | None = None) -> StableDiffusion:
    """Load a Stable Diffusion 1.x / 2.x checkpoint: a diffusers folder or a single CompVis file.

    dtype: compute dtype, and the parameter dtype unless `param_dtype` is given (fp32 params with
    bf16 compute: `dtype=jnp.bfloat16, param_dtype=jnp.float32`). In float16 the VAE stays float32 unless its
    config sets force_upcast false (`vae_kwargs`): float16 overflows in SD's VAEs.
    prediction_type: overrides the scheduler's ("epsilon" | "v_prediction" | "sample"); single files
    do not record it, so SD 2.x files default to v_prediction (the 768 px models) with a warning.
    """
    path = Path(path)
    kwargs = dict(dtype=dtype, param_dtype=param_dtype or dtype, attention_impl=attention_impl)
    if checkpoint_kind(path) == "folder":
        pipe = _load_diffusers_folder(path, **kwargs)
    else:
        pipe = _load_single_file(path, prediction_type=prediction_type, **kwargs)
    if prediction_type is not None:
        pipe.scheduler_config["prediction_type"] = prediction_type
    return pipe


def checkpoint_kind(path: str | os.PathLike) -> str:
    """"folder" (a diffusers folder) or "single_file", from the path alone; else the error that says what it is."""
    path = Path(path)
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ValueError(f"{path} is a folder without model_index.json: not a diffusers Stable Diffusion "
                             f"folder (expected model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
        return "folder"
    if path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return "single_file"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give a diffusers folder or a .safetensors/.ckpt file")
    raise ValueError(f"{path} is neither a diffusers folder (model_index.json) nor a single-file "
                     f"checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)})")


def _present(index: dict, part: str) -> bool:
    """Whether model_index.json names a component (SDXL's refiner lists "text_encoder": [null, null])."""
    entry = index.get(part)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


def _load_diffusers_folder(path: Path, **kwargs) -> StableDiffusion:
    index = df.read_json(path / "model_index.json")
    text_parts = [p for p in ("text_encoder", "text_encoder_2") if _present(index, p)]
    for part in ("unet", "vae"):
        if not _present(index, part):
            raise ValueError(f"{path}/model_index.json names no {part!r}: not a Stable Diffusion pipeline "
                             f"(found {sorted(k for k in index if not k.startswith('_'))})")
    if not text_parts:
        raise ValueError(f"{path}/model_index.json names no text encoder ('text_encoder', or SDXL's "
                         "'text_encoder_2'): not a Stable Diffusion pipeline")
    unet_cfg = UNetConfig.from_diffusers(df.read_json(path / "unet" / "config.json"))
    vae_cfg = AutoencoderKLConfig.from_diffusers(df.read_json(path / "vae" / "config.json"))
    text_cfgs = {p: CLIPTextConfig.from_transformers(df.read_json(path / p / "config.json")) for p in text_parts}
    family = "sdxl" if unet_cfg.addition_embed_type == "text_time" else text_cfgs[text_parts[0]].family
    if family != "sdxl" and text_parts != ["text_encoder"]:
        raise ValueError(f"{path}: a text_encoder_2 beside a UNet without SDXL's added conditioning "
                         f"(addition_embed_type={unet_cfg.addition_embed_type!r}): not an SD pipeline sdjax knows")
    with ThreadPoolExecutor(threads()) as pool:  # the largest first: its tensors convert while the rest is built
        unet = _submit(pool, UNet2DConditionModel, unet_cfg, df.read_weights(path / "unet", df.WEIGHT_NAMES["unet"]),
                       what=f"{path}/unet", **kwargs)
        vae = _submit(pool, AutoencoderKL, vae_cfg, df.read_weights(path / "vae", df.WEIGHT_NAMES["vae"]),
                      what=f"{path}/vae", **vae_kwargs(vae_cfg, kwargs))
        encoders, tokenizers = {}, {}
        for part in text_parts:
            encoders[part] = _submit(
                pool, CLIPTextEncoder, text_cfgs[part],
                strip_text_model_prefix(df.read_weights(path / part, df.WEIGHT_NAMES["text_encoder"])),
                what=f"{path}/{part}", ignore=_TEXT_ENCODER_BUFFERS, **kwargs)
            folder = path / part.replace("text_encoder", "tokenizer")
            if has_tokenizer_files(folder):
                tokenizers[part] = load_tokenizer(folder)
            else:
                log.warning("%s has no %s/ files; using the built-in CLIP tokenizer", path, folder.name)
                tokenizers[part] = family_tokenizer(text_cfgs[part].family)
        unet, vae = unet(), vae()
        encoders = {part: done() for part, done in encoders.items()}
    sched_file = path / "scheduler" / "scheduler_config.json"
    if sched_file.exists():
        scheduler_config = df.read_json(sched_file)
    elif family == "sdxl":
        raise FileNotFoundError(f"{path} has no scheduler/scheduler_config.json (an SDXL folder ships one)")
    else:
        log.warning("%s has no scheduler/scheduler_config.json; using the %s default", path, family)
        scheduler_config = copy.deepcopy(variants.SCHEDULERS[family])
    options = {k: index.get(k, v) for k, v in sdxl.OPTIONS.items()} if family == "sdxl" else {}
    return StableDiffusion.from_modules({**encoders, "unet": unet, "vae": vae}, tokenizers.get("text_encoder"),
                                        scheduler_config, tokenizer_2=tokenizers.get("text_encoder_2"), options=options)


_CONFIG_METADATA = "sdjax_configs"  # safetensors metadata key: the exact configs of a file sdjax wrote


def _load_single_file(path: Path, *, prediction_type: str | None, **kwargs) -> StableDiffusion:
    state_dict = single_file.read_checkpoint(path, upcast_bfloat16=False)
    saved = {}
    if path.suffix.lower() == ".safetensors":
        saved = json.loads(read_metadata(path).get(_CONFIG_METADATA, "{}"))
    if saved:  # written by save_single_file: its configs, not the SD conventions, describe the model
        configs = saved["unet"], saved["vae"], saved.get("text_encoder"), saved.get("text_encoder_2")
        info = single_file.info_from_configs(*configs)
    else:
        info = single_file.detect(state_dict)
        configs = (single_file.unet_config_dict(info), single_file.vae_config_dict(info),
                   single_file.text_config_dict(info), single_file.text2_config_dict(info))
    unet_sd, vae_sd, *text_sds = single_file.to_diffusers(state_dict, info)
    unet_cfg = UNetConfig.from_diffusers(configs[0])
    vae_cfg = AutoencoderKLConfig.from_diffusers(configs[1])
    encoders, tokenizers = {}, {}
    with ThreadPoolExecutor(threads()) as pool:
        unet = _submit(pool, UNet2DConditionModel, unet_cfg, unet_sd, what=f"{path} (UNet)", **kwargs)
        vae = _submit(pool, AutoencoderKL, vae_cfg, vae_sd, what=f"{path} (VAE)", **vae_kwargs(vae_cfg, kwargs))
        for part, config, text_sd in zip(("text_encoder", "text_encoder_2"), configs[2:], text_sds):
            if config is None:
                continue
            text_cfg = CLIPTextConfig.from_transformers(config)
            encoders[part] = _submit(pool, CLIPTextEncoder, text_cfg, strip_text_model_prefix(text_sd),
                                     what=f"{path} ({part.replace('_', ' ')})", ignore=_TEXT_ENCODER_BUFFERS, **kwargs)
            tokenizers[part] = family_tokenizer(text_cfg.family)
        unet, vae = unet(), vae()
        encoders = {part: done() for part, done in encoders.items()}
    scheduler_config = copy.deepcopy(saved.get("scheduler") or variants.SCHEDULERS[info.family])
    if info.family == "sd2" and prediction_type is None and not saved:
        log.warning("%s: single files do not record the prediction type; assuming v_prediction (SD 2.x 768). "
                    "Pass prediction_type='epsilon' for SD 2.x 512-base models.", path)
    options = {}
    if info.family == "sdxl":  # as diffusers' SDXL base and refiner pipelines are configured
        options = saved.get("options") or sdxl.options(refiner="text_encoder" not in encoders)
    return StableDiffusion.from_modules({**encoders, "unet": unet, "vae": vae}, tokenizers.get("text_encoder"),
                                        scheduler_config, tokenizer_2=tokenizers.get("text_encoder_2"), options=options)


def _state_dicts(pipe: StableDiffusion, dtype, what):
    from sdjax import lora

    lora.check_base_export(pipe, what)  # fused adapters are saved as part of the weights; unfused ones refused

    def cast(sd):
        return {k: v.astype(dtype) for k, v in sd.items()} if dtype is not None else sd
    def text(encoder):  # text_model.*: the key layout of every released SD text encoder (transformers 4 and 5 read
        sd = to_state_dict(encoder, prefix="text_model.")  # it); SDXL's text_projection sits beside text_model
        return cast({k.replace("text_model.text_projection.", "text_projection."): v for k, v in sd.items()})

    texts = {part: text(e) for part, e in (("text_encoder", pipe.text_encoder), ("text_encoder_2", pipe.text_encoder_2))
             if e is not None}
    return cast(to_state_dict(pipe.unet)), cast(to_state_dict(pipe.vae)), texts


def save_pretrained(pipe: StableDiffusion, folder: str | os.PathLike, *, dtype=None) -> Path:
    """Write `pipe` as a diffusers folder that diffusers' `StableDiffusionPipeline.from_pretrained` loads.

    Textual inversion tokens go with it: the tokenizer folder lists them (added_tokens.json) and the text encoder
    has their rows (a larger vocab_size), as a diffusers pipeline after `load_textual_inversion` saves itself.

    dtype: numpy dtype for the stored weights (default: the parameters' own dtype).
    """
    folder = Path(folder)
    unet_sd, vae_sd, text_sds = _state_dicts(pipe, dtype, folder)  # before mkdir: a refused save leaves nothing
    folder.mkdir(parents=True, exist_ok=True)
    df.write_weights(unet_sd, folder / "unet", df.WEIGHT_NAMES["unet"])
    df.write_json(pipe.unet.config.to_diffusers(), folder / "unet" / "config.json")
    df.write_weights(vae_sd, folder / "vae", df.WEIGHT_NAMES["vae"])
    df.write_json(pipe.vae.config.to_diffusers(), folder / "vae" / "config.json")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
             "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None]}
    if pipe.family == "sdxl":  # the refiner (no first encoder) is diffusers' img2img pipeline
        index = {"_class_name": "StableDiffusionXLPipeline" if pipe.text_encoder is not None
                 else "StableDiffusionXLImg2ImgPipeline", "_diffusers_version": "0.30.0",
                 "feature_extractor": [None, None], "image_encoder": [None, None],
                 **{k: pipe.options.get(k, v) for k, v in sdxl.OPTIONS.items()}}
    for part, encoder, tokenizer in (("text_encoder", pipe.text_encoder, pipe.tokenizer),
                                     ("text_encoder_2", pipe.text_encoder_2, pipe.tokenizer_2)):
        tokenizer_part = part.replace("text_encoder", "tokenizer")
        if encoder is None:
            if pipe.family == "sdxl":
                index.update({part: [None, None], tokenizer_part: [None, None]})
            continue
        df.write_weights(text_sds[part], folder / part, df.WEIGHT_NAMES["text_encoder"])
        config = encoder.config.to_transformers()
        df.write_json(config, folder / part / "config.json")
        tokenizer.save(folder / tokenizer_part)
        index.update({part: ["transformers", config["architectures"][0]],
                      tokenizer_part: ["transformers", "CLIPTokenizer"]})
    (folder / "scheduler").mkdir(exist_ok=True)
    df.write_json(pipe.scheduler_config, folder / "scheduler" / "scheduler_config.json")
    index.update({"scheduler": ["diffusers", pipe.scheduler_config.get("_class_name", "PNDMScheduler")],
                  "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]})
    df.write_json(dict(sorted(index.items())), folder / "model_index.json")
    return folder


def save_single_file(pipe: StableDiffusion, path: str | os.PathLike, *, dtype=None) -> Path:
    """Write `pipe` as one CompVis-layout .safetensors file (A1111, ComfyUI, diffusers' from_single_file); SDXL
    base and refiner in the layout of their released files (text encoders under conditioner.embedders.*).

    The header's metadata also records the exact model and scheduler configs, so `load_pretrained` rebuilds
    this model exactly even where it departs from the SD conventions a plain single file is read by.

    dtype: float32, float16 or bfloat16 for the stored weights (default: the parameters' own dtype).
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: save_single_file writes .safetensors only (pickled .ckpt is unsafe to share)")
    added = getattr(pipe.tokenizer, "added_tokens", None)
    if added:
        raise ValueError(f"{path}: this pipeline holds textual inversion tokens {sorted(added)[:4]}, and a single file "
                         "has no tokenizer to name their rows (A1111 keeps embeddings in files of their own): save "
                         "with save_pretrained, or load the model again without the embeddings")
    added = getattr(pipe.tokenizer_2, "added_tokens", None)
    if added:
        raise ValueError(f"{path}: the second tokenizer holds textual inversion tokens {sorted(added)[:4]}: save with "
                         "save_pretrained")
    unet_sd, vae_sd, text_sds = _state_dicts(pipe, dtype, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    configs = {"unet": pipe.unet.config.to_diffusers(), "vae": pipe.vae.config.to_diffusers(),
               "scheduler": pipe.scheduler_config}
    for part in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, part)
        if encoder is not None:
            configs[part] = encoder.config.to_transformers()
    if pipe.family == "sdxl":
        configs["options"] = pipe.options
    info = single_file.info_from_configs(configs["unet"], configs["vae"], configs.get("text_encoder"),
                                         configs.get("text_encoder_2"))
    stored = np.dtype(dtype).name if dtype is not None else np.asarray(unet_sd["conv_in.weight"]).dtype.name
    state_dict = single_file.from_diffusers(unet_sd, vae_sd, text_sds.get("text_encoder"), info,
                                            text_sds.get("text_encoder_2"))
    single_file.write_checkpoint(state_dict, path, dtype=stored, metadata={_CONFIG_METADATA: json.dumps(configs)})
    return path
