"""Sampling jobs (what `sample.py` runs): prompts -> numbered image slots -> PNG files, resumable.

Every image has a global index (prompt i, copy j -> i * num_images_per_prompt + j) that fixes its file
name and its noise (seed, index), so a re-run, another batch size or another device count writes the
same files, and a killed job resumes where it stopped: `run(config)` skips slots whose file exists.
With `--config.trajectory=K` each image also gets `<name>.trajectory.png` (written first, so an image on disk
has its strip), and a slot is done when both exist: a re-run adds the strips an earlier job did not make.
LoRAs (`job_loras`): --config.lora adds A1111's `<lora:NAME:SCALE>` tag to every prompt, --config.lora_dir holds
the files tags name; every LoRA of the job is loaded once, and prompts with different tags run in separate batches
with the scales theirs ask for (the others at 0), one compiled program for all. A PNG keeps its prompt's tags.
With several processes, process 0 writes the files and decides what is left to do (`agreed_pending`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from sdjax.cli import names, one_line


@dataclasses.dataclass(frozen=True)
class ImageSlot:
    index: int
    prompt: str
    negative_prompt: str
    seed: int

    def filename(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.prompt.lower()).strip("-")[:60] or "empty"
        return f"{self.index:05d}-{slug}.png"

    def trajectory_filename(self) -> str:
        """The denoising strip of the image (`--config.trajectory`): x̂₀ frames, then the image."""
        return self.filename().removesuffix(".png") + ".trajectory.png"


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts (one per line; # starts a comment)")
    return prompts


def image_slots(prompts: list[str], *, negative_prompt: str = "", num_images_per_prompt: int = 1,
                seed: int = 0) -> list[ImageSlot]:
    return [ImageSlot(i * num_images_per_prompt + j, p, negative_prompt, seed)
            for i, p in enumerate(prompts) for j in range(num_images_per_prompt)]


def pending(slots: list[ImageSlot], output_dir: str | Path, trajectory: bool = False) -> list[ImageSlot]:
    """The slots whose image file does not exist yet (or, with `trajectory`, whose strip does not)."""
    output_dir = Path(output_dir)
    names = (lambda s: (s.filename(), s.trajectory_filename())) if trajectory else (lambda s: (s.filename(),))
    return [s for s in slots if not all((output_dir / name).exists() for name in names(s))]


def agreed_pending(slots: list[ImageSlot], output_dir: str | Path, settings: dict | None = None,
                   trajectory: bool = False, lora_hashes: dict[str, str] | None = None) -> list[ImageSlot]:
    """`pending` as process 0 sees it, on every process (only process 0 writes the files, and the processes
    must run the same batches: without a shared filesystem the others' folders would not tell what is done).

    settings: the PNG `parameters` fields this job fixes (`known_settings`); an image already in the folder that
    records others was made by another job, and every process stops with a ConfigError that names it.
    lora_hashes: {name: hash} of the LoRA files the prompts' tags name (an image records the hashes of its own)."""
    import jax

    todo = pending(slots, output_dir, trajectory)
    conflict = (settings_conflict(slots, todo, output_dir, settings, lora_hashes)
                if settings and jax.process_index() == 0 else "")
    if jax.process_count() == 1:
        if conflict:
            raise ConfigError(conflict)
        return todo
    import zlib

    from jax.experimental import multihost_utils

    job = "\n".join(f"{s.index}\0{s.prompt}\0{s.negative_prompt}\0{s.seed}" for s in slots)
    ids = np.asarray(multihost_utils.process_allgather(np.array([len(slots), zlib.crc32(job.encode()) >> 1],
                                                                np.int32)))
    if (ids != ids[0]).any():
        raise ConfigError(f"the {jax.process_count()} processes were given different jobs (prompts, "
                          "num_images_per_prompt, seed or negative prompt differ between hosts)")
    names = {s.filename() for s in todo}
    mine = np.array([s.filename() in names for s in slots] + [bool(conflict)], np.int32)
    agreed = np.asarray(multihost_utils.broadcast_one_to_all(mine))
    if agreed[-1]:
        raise ConfigError(conflict or f"process 0's {output_dir} holds images of another job (its log says which)")
    return [s for s, p in zip(slots, agreed[:-1]) if p]


# Fields the PNG carries only when they are not the default: an image that has one and a job that does not set it
# (or the other way round) differ.
OPTIONAL_FIELDS = ("Clip skip", "Emphasis", "Lora hashes", "Refiner", "Refiner switch at")


def known_settings(config) -> dict[str, str]:
    """The PNG `parameters` fields a sampling config fixes before its model is loaded (as a1111_parameters writes
    them): the sampler and size only where the config names them (else they come from the checkpoint)."""
    fields = {"Steps": str(config.steps), "CFG scale": str(effective_guidance(config.guidance_scale)),
              "Model": Path(config.checkpoint or config.variant).name}
    if config.sampler:
        fields["Sampler"] = config.sampler
    if config.height and config.width:
        fields["Size"] = f"{config.width}x{config.height}"
    if config.clip_skip:
        fields["Clip skip"] = str(config.clip_skip + 1)
    if config.get("emphasis", "Original") != "Original":
        fields["Emphasis"] = config.emphasis
    if config.get("refiner"):
        fields["Refiner"] = Path(config.refiner).name
        fields["Refiner switch at"] = str(config.refiner_switch)
    return fields


def effective_guidance(guidance_scale: float) -> float:
    """The guidance scale a sampling run applies: at most 1 means no guidance, the same images as 1."""
    return max(float(guidance_scale), 1.0)


# A field of the last line: "Key: value," or, holding a comma, a colon or a newline, "Key: \"json string\","
_FIELD = re.compile(r'\s*(\w[\w \-/]*): ("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _quoted(value) -> str:
    """A field's value as A1111 writes it: JSON-quoted when it holds a comma, a colon or a newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, {field: value}) of an A1111 `parameters` text as a1111_parameters writes it."""
    lines = text.split("\n")
    fields = {key: json.loads(value) if value.startswith('"') else value for key, value in _FIELD.findall(lines[-1])}
    negative = [line.removeprefix("Negative prompt: ") for line in lines[:-1] if line.startswith("Negative prompt: ")]
    prompt = "\n".join(line for line in lines[:-1] if not line.startswith("Negative prompt: "))
    return prompt, negative[0] if negative else "", fields


def settings_conflict(slots: list[ImageSlot], todo: list[ImageSlot], output_dir: str | Path,
                      settings: dict[str, str], lora_hashes: dict[str, str] | None = None) -> str:
    """"" if every image of `slots` already in `output_dir` records this job's prompt, seed and `settings` (and,
    given `lora_hashes` {name: hash}, the hashes of the LoRAs its prompt names); else one line naming the first
    that does not, what differs, and the fix."""
    left = {s.index for s in todo}
    for slot in slots:
        path = Path(output_dir) / slot.filename()
        if slot.index in left and not path.exists():  # an image pending for its trajectory strip alone is checked
            continue
        try:
            with Image.open(path) as image:  # info: the text chunks before the pixels (save_png writes it there);
                text = image.info.get("parameters", "")  # `image.text` would decode every image of the job
        except (OSError, SyntaxError, ValueError) as e:
            return f"{path} is not a readable PNG ({one_line(e)}): delete it and run again to regenerate it"
        prompt, negative, fields = parse_parameters(text)
        expected = {"prompt": slot.prompt, "negative prompt": slot.negative_prompt, "Seed": str(slot.seed),
                    "Image index": str(slot.index), **settings}
        optional = OPTIONAL_FIELDS
        if lora_hashes is None:  # not given: not checked
            optional = tuple(k for k in optional if k != "Lora hashes")
        else:
            expected.update(lora_fields(slot.prompt, lora_hashes))
        found = {"prompt": prompt, "negative prompt": negative, **fields}
        differ = [f"{k} {found.get(k, '(none)')!r} here, {v!r} now" for k, v in expected.items() if found.get(k) != v]
        differ += [f"{k} {found[k]!r} here, (none) now" for k in optional if k in found and k not in expected]
        if differ:
            return (f"{path} was made by another job ({'; '.join(differ)}): use another --config.output_dir, or "
                    f"delete the old images to regenerate them")
    return ""


def lora_fields(prompt: str, hashes: dict[str, str]) -> dict[str, str]:
    """The `Lora hashes` field of an image of `prompt` (A1111's: "name: hash, ..." of its tags, by name)."""
    from sdjax.lora import prompt_loras

    tags = sorted(prompt_loras(prompt)[1], key=lambda tag: tag.name)
    return {"Lora hashes": ", ".join(f"{t.name}: {hashes[t.name]}" for t in tags)} if tags else {}


def batches(slots: list[ImageSlot], batch_size: int) -> list[list[ImageSlot]]:
    return [slots[i:i + batch_size] for i in range(0, len(slots), batch_size)]


def a1111_parameters(slot: ImageSlot, *, steps: int, sampler: str, cfg_scale: float, width: int,
                     height: int, model: str = "", extra: dict | None = None) -> str:
    """Generation parameters in A1111's PNG `parameters` text format."""
    text = slot.prompt
    if slot.negative_prompt:
        text += f"\nNegative prompt: {slot.negative_prompt}"
    fields = {"Steps": steps, "Sampler": sampler, "CFG scale": cfg_scale, "Seed": slot.seed,
              "Size": f"{width}x{height}", "Image index": slot.index}
    if model:
        fields["Model"] = model
    fields.update(extra or {})
    return text + "\n" + ", ".join(f"{k}: {_quoted(v)}" for k, v in fields.items())


def save_png(image: np.ndarray, path: str | Path, parameters: str) -> None:
    """Write a uint8 (H, W, 3) image with its `parameters` text chunk, atomically."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(np.asarray(image, np.uint8)).save(tmp, pnginfo=info)
    tmp.replace(path)


def grid(images: list[np.ndarray], columns: int | None = None) -> np.ndarray:
    """Tile equally sized uint8 images into one image, row by row."""
    if not images:
        raise ValueError("no images to put in a grid")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    h, w, c = images[0].shape
    out = np.zeros((rows * h, columns * w, c), np.uint8)
    for k, img in enumerate(images):
        r, col = divmod(k, columns)
        out[r * h:(r + 1) * h, col * w:(col + 1) * w] = img
    return out


class ConfigError(ValueError):
    """A sampling setting the user got wrong; its message names the fix (sample.py prints it on one line)."""


_DTYPES = ("float32", "bfloat16", "float16")


def _checked(config) -> None:
    if not config.checkpoint and not config.variant:
        raise ConfigError("no model: set --config.checkpoint=PATH (a diffusers folder or a .safetensors/.ckpt "
                          "file), or --config.variant=NAME for a randomly initialised architecture")
    if config.checkpoint and not Path(config.checkpoint).exists():
        raise ConfigError(f"--config.checkpoint={config.checkpoint} does not exist; give a diffusers folder or a "
                          ".safetensors/.ckpt file")
    for key in ("checkpoint", "refiner"):
        if not config.get(key):
            continue
        if key == "refiner" and not Path(config.refiner).exists():
            raise ConfigError(f"--config.refiner={config.refiner} does not exist; give the SDXL refiner's diffusers "
                              "folder")
        from sdjax.pretrained import checkpoint_kind

        try:
            checkpoint_kind(config[key])
        except ValueError as e:
            raise ConfigError(f"--config.{key}={config[key]}: {e}") from None
    if config.get("refiner") and not 0.0 < config.refiner_switch < 1.0:
        raise ConfigError(f"--config.refiner_switch={config.refiner_switch}: give the noise fraction where the refiner "
                          "takes over, strictly between 0 and 1 (diffusers' denoising_end; 0.8 is usual)")
    if bool(config.prompt) == bool(config.prompts_file):
        raise ConfigError("give exactly one of --config.prompt='...' or --config.prompts_file=PATH")
    for key in ("height", "width"):
        if config[key] and config[key] % 8:
            raise ConfigError(f"--config.{key}={config[key]} is not a multiple of 8; use "
                              f"{config[key] // 8 * 8} or {config[key] // 8 * 8 + 8}")
    if config.strength is not None and not 0.0 < config.strength <= 1.0:
        raise ConfigError(f"--config.strength={config.strength} must be in (0, 1] (1 = ignore the init image)")
    if config.mask_image and not config.init_image:
        raise ConfigError("--config.mask_image needs --config.init_image (the image to inpaint into)")
    for key in ("init_image", "mask_image"):
        if config[key] and not Path(config[key]).is_file():
            raise ConfigError(f"--config.{key}={config[key]} does not exist")
    for path in embedding_paths(config):
        if not Path(path).exists():
            raise ConfigError(f"--config.embeddings: {path} does not exist; give textual inversion files (.pt, .bin "
                              "or .safetensors), comma-separated")
    for path, _ in lora_settings(config):
        if not Path(path).exists():
            raise ConfigError(f"--config.lora: {path} does not exist; give LoRA files (.safetensors, or diffusers "
                              "folders) as PATH or PATH:SCALE, comma-separated")
    if config.get("lora_dir") and not Path(config.lora_dir).is_dir():
        raise ConfigError(f"--config.lora_dir={config.lora_dir} is not a folder; give the folder of the LoRA files "
                          "that prompts name with <lora:NAME:SCALE>")
    if config.get("trajectory", 0) < 0:
        raise ConfigError(f"--config.trajectory={config.trajectory}: use 0 (no strip) or K >= 1 (a frame every K "
                          "model calls)")
    if config.get("trajectory_decoder", "vae") not in ("vae", "approx"):
        raise ConfigError(f"--config.trajectory_decoder={config.trajectory_decoder!r}: use 'vae' (the decoder) or "
                          "'approx' (a linear map of the latents: near free, blurry)")
    if config.dtype not in _DTYPES:
        raise ConfigError(f"--config.dtype={config.dtype!r}: use one of {', '.join(_DTYPES)}")
    if config.steps < 1 or config.num_images_per_prompt < 1 or config.batch_size < 1:
        raise ConfigError("--config.steps, --config.num_images_per_prompt and --config.batch_size must be >= 1")
    if config.seed < 0:
        raise ConfigError(f"--config.seed={config.seed}: use 0 or more (image i of the job draws noise (seed, i))")
    from sdjax.attention import IMPLEMENTATIONS

    if config.attention not in IMPLEMENTATIONS:
        raise ConfigError(f"--config.attention={config.attention!r}: use one of {', '.join(IMPLEMENTATIONS)}")
    if not config.guidance_scale >= 0:
        raise ConfigError(f"--config.guidance_scale={config.guidance_scale}: use 0 or more (up to 1: no guidance)")
    if config.clip_skip < 0:
        raise ConfigError(f"--config.clip_skip={config.clip_skip}: use 0 (the last layer) or more")
    from sdjax.prompts import EMPHASIS

    if config.get("emphasis", "Original") not in EMPHASIS:
        raise ConfigError(f"--config.emphasis={config.emphasis!r}: use one of {', '.join(map(repr, EMPHASIS))} "
                          "(A1111's modes; 'None' reads brackets as text)")
    sizes = {key: _image_size(config[key], key) for key in ("init_image", "mask_image") if config[key]}
    if len(sizes) == 2 and sizes["init_image"] != sizes["mask_image"]:
        raise ConfigError("--config.mask_image is {}x{}, --config.init_image {}x{}: give a mask of the image's "
                          "size".format(*sizes["mask_image"], *sizes["init_image"]))
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--config.output_dir={out} is a file; give a folder")
    existing = next((p for p in [out, *out.parents] if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--config.output_dir={out}: {existing} is not writable; give a folder you can write to")


def _image_size(path: str, key: str) -> tuple[int, int]:
    """(width, height) of an image file, read in full (a truncated or non-image file is a ConfigError)."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.size
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for a file it cannot read
        raise ConfigError(f"--config.{key}={path} is not an image PIL can read ({one_line(e)})") from None


def embedding_paths(config) -> list[str]:
    """The textual inversion files of --config.embeddings=PATH,PATH2 (empty entries ignored)."""
    return list(names(config.get("embeddings", "")))


def lora_settings(config) -> list[tuple[str, float]]:
    """[(file, scale)] of --config.lora=PATH[:SCALE],PATH2[:SCALE2] (scale 1 when not given)."""
    from sdjax.lora import parse_lora_setting

    return parse_lora_setting(config.get("lora", ""))


def job_loras(config, prompts: list[str]) -> tuple[list[str], dict[str, Path]]:
    """(the job's prompts as it records them, {LoRA name: file}), as A1111 writes and reads LoRAs: each
    --config.lora file is added to every prompt as a tag `<lora:NAME:SCALE>` (NAME: its file's stem), and each tag a
    prompt holds names a --config.lora file or NAME.safetensors (.pt, ...) under --config.lora_dir. Prompts whose
    tags differ run in separate batches (`lora_groups`). Any missing file stops the job here, before the model."""
    from sdjax import lora

    given = {}
    for path, scale in lora_settings(config):
        name = lora.default_name(path)
        if name in given:
            raise ConfigError(f"--config.lora: two files are named {name!r} (a LoRA is named after its file's stem, "
                              "a diffusers folder after the folder): rename one")
        given[name] = (Path(path), scale)
    tags = "".join(f" {lora.PromptLoRA(name, scale, scale).tag()}" for name, (_, scale) in given.items())
    files = {name: path for name, (path, _) in given.items()}
    out = []
    for prompt in prompts:
        try:
            named = lora.prompt_loras(prompt)[1]
        except ValueError as e:
            raise ConfigError(f"prompt {prompt!r}: {e}") from None
        for tag in named:
            if tag.name in given:
                raise ConfigError(f"prompt {prompt!r} has a tag for LoRA {tag.name!r}, which --config.lora adds to "
                                  "every prompt: drop one of the two")
            if tag.name in files:
                continue
            if not config.get("lora_dir"):
                raise ConfigError(f"prompt {prompt!r} names LoRA {tag.name!r}: set --config.lora_dir=FOLDER to the "
                                  f"folder that holds {tag.name}.safetensors, or give the file in --config.lora")
            try:
                files[tag.name] = lora.find_lora(tag.name, config.lora_dir)
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f"prompt {prompt!r}: {e}: put it there (--config.lora_dir) or give the file in "
                                  "--config.lora") from None
        out.append(prompt + tags)
    return out, files


def lora_groups(slots: list[ImageSlot]) -> dict[tuple, list[ImageSlot]]:
    """The slots by the LoRAs and strengths their prompts' tags name (a batch runs at one setting of the scales)."""
    from sdjax.lora import prompt_loras

    groups = {}
    for slot in slots:
        key = tuple(sorted(prompt_loras(slot.prompt)[1], key=lambda tag: tag.name))
        groups.setdefault(key, []).append(slot)
    return groups


def load_model(config):
    """The StableDiffusion a sampling config names: a checkpoint, or a random `variant` (demos, benchmarks), with
    the config's textual inversion embeddings added (read before the model, so a bad file stops the job at once)."""
    from sdjax import textual_inversion

    embeddings = []
    for path in embedding_paths(config):
        try:
            embeddings.append(textual_inversion.read_embedding(path))
        except (ValueError, FileNotFoundError, ImportError) as e:
            raise ConfigError(f"--config.embeddings: {one_line(e)}") from None
    names = [e.name.lower() for e in embeddings]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"--config.embeddings: two files give the name {twice[0]!r} (a file's name is its stem, or "
                          "a diffusers file's token): rename one")
    pipe = _load_model(config)
    for embedding in embeddings:
        try:
            textual_inversion.add_to_pipeline(pipe, embedding)
        except ValueError as e:
            raise ConfigError(f"--config.embeddings: {one_line(e)}") from None
    return pipe


def _load_model(config):
    import jax.numpy as jnp

    from sdjax import pretrained, variants

    dtype = getattr(jnp, config.dtype)
    if config.checkpoint:
        try:
            return pretrained.load_pretrained(config.checkpoint, dtype=dtype, attention_impl=config.attention,
                                              prediction_type=config.prediction_type)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"--config.checkpoint={config.checkpoint}: {e}") from None
    try:
        variant = variants.get(config.variant)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return variant.pipeline(seed=config.seed, dtype=dtype, attention_impl=config.attention)


def _load_refiner(config, pipe):
    """The SDXL refiner --config.refiner names (None without one), loaded as the model is."""
    if not config.get("refiner"):
        return None
    import jax.numpy as jnp

    from sdjax import pretrained

    if pipe.family != "sdxl":
        raise ConfigError(f"--config.refiner: the model is {pipe.family}, not SDXL; a refiner finishes an SDXL base "
                          "model's run")
    if config.get("trajectory", 0):
        raise ConfigError("--config.trajectory with --config.refiner: the strip shows one model's run; drop one")
    try:
        refiner = pretrained.load_pretrained(config.refiner, dtype=getattr(jnp, config.dtype),
                                             attention_impl=config.attention)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"--config.refiner={config.refiner}: {e}") from None
    if refiner.family != "sdxl":
        raise ConfigError(f"--config.refiner={config.refiner} is an {refiner.family} model; give an SDXL refiner")
    return refiner


def _add_loras(pipe, files: dict[str, Path]) -> None:
    """Attach the job's LoRAs (`job_loras`), off until a batch sets its scales."""
    from sdjax import lora

    for name, path in files.items():
        try:
            lora.load_lora(pipe, path, name=name, scale=0.0)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"LoRA {name!r} ({path}): {one_line(e)}") from None


def _make_mesh(config):
    import jax

    n = jax.device_count() if config.data_parallel in (0, -1) else config.data_parallel
    return jax.make_mesh((n,), ("data",), devices=jax.devices()[:n], axis_types=(jax.sharding.AxisType.Auto,))


def run(config) -> Path:
    """Run a sampling job: every pending image of the prompts, in batches over all devices; returns the folder."""
    import time

    import jax
    from PIL import Image
    from tqdm import tqdm

    from sdjax import lora, pipeline, schedulers
    from sdjax.lora import PromptLoRA, prompt_loras
    from sdjax.prompts import count_chunks

    _checked(config)
    if config.sampler:
        try:
            schedulers.scheduler_config_for({}, config.sampler)
        except ValueError as e:
            raise ConfigError(f"--config.sampler={config.sampler!r}: {e}") from None
    try:
        prompts = [config.prompt] if config.prompt else read_prompts_file(config.prompts_file)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"--config.prompts_file: {e}") from None
    prompts, lora_files = job_loras(config, prompts)  # each prompt with its <lora:NAME:SCALE> tags, as recorded
    texts = {prompt: prompt_loras(prompt)[0] for prompt in prompts}  # what the text encoder reads: no tags
    out_dir = Path(config.output_dir)
    slots = image_slots(prompts, negative_prompt=config.negative_prompt,
                        num_images_per_prompt=config.num_images_per_prompt, seed=config.seed)
    trajectory = config.get("trajectory", 0)
    # before the model: a wrong job stops at once
    try:
        lora_hashes = {name: lora.lora_hash(path) for name, path in lora_files.items()}  # what each image records
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"LoRA file: {one_line(e)}") from None
    todo = agreed_pending(slots, out_dir, known_settings(config), trajectory=bool(trajectory),
                          lora_hashes=lora_hashes)
    pipe = load_model(config)
    _add_loras(pipe, lora_files)
    refiner = _load_refiner(config, pipe)
    sdxl = pipe.family == "sdxl"
    layers = (pipe.text_encoder or pipe.text_encoder_2).config.num_hidden_layers - sdxl  # SDXL: penultimate first
    if config.clip_skip >= layers:
        raise ConfigError(f"--config.clip_skip={config.clip_skip}: this text encoder has {layers + sdxl} layers; use "
                          f"0 to {layers - 1}")
    height, width = config.height or pipe.default_size, config.width or pipe.default_size
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    mesh = _make_mesh(config)
    per_batch = -(-min(config.batch_size, max(len(todo), 1)) // mesh.size) * mesh.size  # a multiple of the devices
    sampler = config.sampler or pipe.scheduler_config.get("_class_name", "default")
    emphasis = config.get("emphasis", "Original")
    # every batch gets the job's chunk count: one program, and an image does not depend on its batch mates
    try:
        chunks = count_chunks(pipe.tokenizer or pipe.tokenizer_2, [*texts.values(), config.negative_prompt],
                              emphasis=emphasis)
    except ValueError as e:
        raise ConfigError(f"--config.prompt / prompts_file / negative_prompt: {e}") from None
    kwargs = dict(num_inference_steps=config.steps, guidance_scale=config.guidance_scale,
                  guidance_rescale=config.guidance_rescale, sampler=config.sampler or None, height=height,
                  width=width, clip_skip=config.clip_skip, mesh=mesh, batch_invariant=config.batch_invariant,
                  emphasis=emphasis, min_chunks=chunks)
    if refiner is not None:
        kwargs.update(refiner=refiner, denoising_end=config.refiner_switch)
    if trajectory:
        kwargs.update(trajectory_every=trajectory, trajectory_decoder=config.get("trajectory_decoder", "vae"))
    extra_fields = {key: value for key, value in known_settings(config).items()
                    if key in ("Clip skip", "Emphasis", "Refiner", "Refiner switch at")}
    init = {}
    if config.init_image:
        init["init_images"] = [Image.open(config.init_image)] * per_batch
        init["strength"] = config.strength if config.strength is not None else (1.0 if config.mask_image else 0.8)
        if config.mask_image:
            init["masks"] = [Image.open(config.mask_image)] * per_batch
    log = print if jax.process_index() == 0 else (lambda *a, **k: None)
    log(f"{len(slots)} images ({len(slots) - len(todo)} already in {out_dir}), batches of {per_batch} on "
        f"{mesh.size} device(s), {config.steps} steps of {sampler}, {width}x{height}")
    if lora_files:
        log("LoRAs: " + ", ".join(f"{name} ({path})" for name, path in lora_files.items()))
    bar = tqdm(total=len(todo), unit="img", disable=jax.process_index() != 0 or not todo)
    job = [(tags, batch) for tags, group in lora_groups(todo).items() for batch in batches(group, per_batch)]
    for k, (tags, batch) in enumerate(job):
        start = time.perf_counter()
        if k == 0:
            bar.set_description("compiling + first batch")
        for name in lora_files:  # the strengths this batch's prompts name; any other LoRA is off (0: no recompiling)
            tag = next((t for t in tags if t.name == name), PromptLoRA(name, 0.0, 0.0))
            pipe.set_lora_scale(name, tag.unet_scale, text_encoder_scale=tag.text_encoder_scale)
        n = len(batch)
        batch = batch + [batch[-1]] * (per_batch - n)  # a fixed batch shape: compiled once
        extra = {key: value[:per_batch] for key, value in init.items() if key != "strength"}
        images = pipeline.generate(
            pipe, [texts[s.prompt] for s in batch],  # no negative prompt: None (SDXL's base then takes zeros)
            negative_prompts=[s.negative_prompt for s in batch] if any(s.negative_prompt for s in batch) else None,
            seeds=[s.seed for s in batch], indices=[s.index for s in batch],
            **({"strength": init["strength"]} if init else {}), **extra, **kwargs)
        images, strips = images if trajectory else (images, [None] * len(images))
        if jax.process_index() == 0:
            for slot, image, frames in zip(batch[:n], images, strips):
                params = a1111_parameters(slot, steps=config.steps, sampler=sampler,
                                          cfg_scale=effective_guidance(config.guidance_scale), width=width,
                                          height=height, model=Path(config.checkpoint or config.variant).name,
                                          extra={**extra_fields, **lora_fields(slot.prompt, lora_hashes)})
                if frames is not None:  # first: an image on disk has its strip
                    save_png(grid([*frames, image], columns=len(frames) + 1), out_dir / slot.trajectory_filename(),
                             params)
                if not (out_dir / slot.filename()).exists():  # pending for its strip alone: keep the image
                    save_png(image, out_dir / slot.filename(), params)
        bar.set_description(f"batch {k + 1}: {time.perf_counter() - start:.1f}s")
        bar.update(n)
    bar.close()
    if jax.process_index() == 0:
        done = [np.asarray(Image.open(out_dir / s.filename()).convert("RGB")) for s in slots[:64]
                if (out_dir / s.filename()).exists()]
        if done:
            Image.fromarray(grid(done)).save(out_dir / "grid.png")
        log(f"images: {out_dir.resolve()} ({len(slots)} PNGs with their parameters; grid.png shows the first "
            f"{len(done)})")
    return out_dir
