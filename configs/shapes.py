"""The offline demo, stage 2 of 2: a text encoder and UNet trained from scratch on the stage-1 VAE's latents.

    python train.py --config configs/shapes_vae.py     # stage 1 (5 to 12 min on 2 CPU cores, by machine)
    python train.py --config configs/shapes.py         # stage 2 (12 to 23 min) -> runs/shapes/ldm/export
    python sample.py --config configs/shapes_sample.py # a grid of seen and held-out captions
    python -m sdjax.eval.shapes --checkpoint runs/shapes/ldm/export   # colour / shape / position accuracy

Captions come from the procedural grammar of sdjax.data.shapes ("a small green triangle at the top"); the
colour-shape pairs it holds out (purple triangle, orange circle, green square) are never trained on. 10% of the
captions are dropped to "" so classifier-free guidance works. Latents are encoded once (cache_latents); the UNet
predicts v under a zero-terminal-SNR schedule with uniform loss weights (min-SNR would take the weight off the
high-noise steps that place the shape); previews every 500 steps go to workdir/previews and TensorBoard.
"""
from configs import train_base


def get_config(arg=None):
    c = train_base.get_config(arg)
    c.workdir = "runs/shapes/ldm"
    c.model.variant = "shapes"
    c.model.init_from = "runs/shapes/vae"   # stage 1's workdir (its export/vae is loaded and frozen)
    c.train_text_encoder = True
    c.data.source = "shapes"
    c.data.shapes_size = 64
    c.data.resolution = 64
    c.data.shapes_length = 10_000     # distinct images, encoded once
    c.data.cache_latents = True
    c.data.caption_dropout = 0.1
    c.data.num_threads = 0
    c.batch_size = 32
    c.num_steps = 1500
    c.objective.min_snr_gamma = 0.0   # min-SNR would take the weight off the high-noise steps that decide layout
    c.optimizer.learning_rate = 1e-3
    c.optimizer.text_encoder_learning_rate = 1e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.schedule = "cosine"
    c.optimizer.end_lr_fraction = 0.1
    c.ema.decay = 0.995
    c.mesh.fsdp_min_size = 1024
    c.mesh.cpu_devices = 2            # on a CPU: one device per core, 47 instead of 39 images/s on 2 cores
    c.checkpoint.every = 500
    c.log_every = 25
    c.preview_every = 500
    c.preview.prompts = ("a red circle on the left", "a large blue square at the top",
                         "a small yellow triangle in the centre", "a purple triangle on the right")
    c.preview.num_inference_steps = 20
    c.preview.guidance_scale = 4.0
    return c
