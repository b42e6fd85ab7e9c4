"""Sampling: text2img, img2img and inpainting from a checkpoint (`sample.py`).

    python sample.py --config configs/sample.py --config.checkpoint=PATH \
        --config.prompt="a photo of an astronaut riding a horse"
    python sample.py --config configs/sample.py --config.checkpoint=PATH --config.prompts_file=prompts.txt \
        --config.num_images_per_prompt=4 --config.sampler="DPM++ 2M Karras" --config.steps=25
    python sample.py --config configs/sample.py --config.checkpoint=PATH --config.prompt="..." \
        --config.init_image=photo.png --config.strength=0.6                       # img2img
    python sample.py --config configs/sample.py --config.checkpoint=PATH --config.prompt="..." \
        --config.init_image=photo.png --config.mask_image=mask.png               # inpainting (white = repaint)
    python sample.py --config configs/sample.py --config.checkpoint=PATH --config.prompt="a <cat-toy> backpack" \
        --config.embeddings=EasyNegative.safetensors,cat-toy/ --config.negative_prompt=easynegative  # textual inversion
    python sample.py --config configs/sample.py --config.checkpoint=PATH --config.prompt="..." \
        --config.trajectory=5         # also <image>.trajectory.png: the image as predicted every 5 steps, then the image
    python sample.py --config configs/sample.py --config.checkpoint=PATH --config.prompt="a castle" \
        --config.lora=add_detail.safetensors:0.8,my-lora/                    # LoRAs (kohya / A1111 or diffusers)
    python sample.py --config configs/sample.py --config.checkpoint=PATH --config.lora_dir=models/Lora \
        --config.prompt="a castle <lora:add_detail:0.8>"                      # A1111's tags, files found in lora_dir

    python sample.py --config configs/sample.py --config.checkpoint=sdxl-base/ --config.refiner=sdxl-refiner/ \
        --config.prompt="a lighthouse at dusk" --config.height=1024 --config.width=1024      # SDXL base + refiner

Prompts take A1111's emphasis syntax ("a (red:1.3) fox", "[blurry]", BREAK) and any length (sdjax.prompts); the PNG
records them as written.

Any field below can be overridden with --config.FIELD=VALUE; an unknown field is an error.
"""
import ml_collections
from ml_collections import config_dict


def get_config():
    c = ml_collections.ConfigDict()
    c.checkpoint = ""            # a diffusers folder or a single .safetensors / .ckpt file
    c.variant = ""               # or a named architecture with random weights (sdjax.variants), for smoke tests
    c.prediction_type = config_dict.placeholder(str)  # override the checkpoint's (single SD 2.x files: v_prediction)
    c.prompt = ""
    c.prompts_file = ""          # one prompt per line, "#" comments; images already written are skipped
    c.negative_prompt = ""
    c.num_images_per_prompt = 1
    c.seed = 0                   # image i of a job starts from noise (seed, i): same image on any device count
    c.sampler = ""               # "" = the checkpoint's scheduler; or "Euler a", "DPM++ 2M Karras", "DDIM", ...
    c.steps = 30
    c.guidance_scale = 7.5
    c.guidance_rescale = 0.0
    c.clip_skip = 0              # diffusers' clip_skip (A1111's "Clip skip" minus 1)
    c.emphasis = "Original"      # A1111's "(word:1.3)" / "[word]" / BREAK: Original | No norm | Ignore | None (= text)
    c.embeddings = ""            # textual inversion files (.pt / .bin / .safetensors), comma-separated; a prompt
                                 # uses each by its name: an A1111 file's stem, a diffusers file's token (sdjax.textual_inversion)
    c.lora = ""                  # LoRA files (kohya / A1111 .safetensors, diffusers folders) as PATH[:SCALE],
                                 # comma-separated: each becomes a <lora:NAME:SCALE> tag (NAME: its file's stem)
                                 # added to every prompt (sdjax.lora)
    c.lora_dir = ""              # where prompts' <lora:NAME:SCALE> tags find NAME.safetensors (any depth); prompts
                                 # naming different LoRAs run in separate batches. PNGs keep the tags and
                                 # record "Lora hashes" as A1111 does
    c.refiner = ""               # SDXL: the refiner's folder; the base denoises down to refiner_switch, the refiner
                                 # runs the rest of the same schedule (diffusers' denoising_end / denoising_start)
    c.refiner_switch = 0.8       # the fraction of the noise range the base removes (PNG: "Refiner switch at")
    c.height = 0                 # 0 = the model's native size (512 for SD 1.x, 768 for SD 2.x)
    c.width = 0
    c.init_image = ""            # img2img / inpainting input
    c.mask_image = ""            # inpainting mask, white = repaint
    c.strength = config_dict.placeholder(float)  # img2img default 0.8, inpainting 1.0
    c.batch_size = 8             # images per compiled batch (rounded up to a multiple of the devices)
    c.batch_invariant = False    # True: one image at a time, bit-identical on any device count / batch size (slower)
    c.distributed = False        # True: jax.distributed.initialize() first (one process per host)
    c.data_parallel = -1         # devices on the mesh's data axis; -1 = all
    c.dtype = "float32"          # compute dtype: float32 | bfloat16 | float16
    c.attention = "auto"         # auto | einsum | xla | cudnn
    c.output_dir = "outputs/samples"
    c.trajectory = 0             # K >= 1: also write <image>.trajectory.png, the final image as predicted (x̂₀)
                                 # at model calls 0, K, 2K, ... and the last, then the image itself, left to right
    c.trajectory_decoder = "vae"  # the strip's frames: vae (the decoder) | approx (a linear map of the latents, ~free)
    return c
