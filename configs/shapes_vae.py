"""The offline demo, stage 1 of 2: train the autoencoder (VAE) of a latent diffusion model on procedural shapes.

    python train.py --config configs/shapes_vae.py     # 5 to 12 min on 2 CPU cores -> runs/shapes/vae/export/vae
    python train.py --config configs/shapes.py         # stage 2: text encoder + UNet on its latents

64x64 images of one coloured shape (sdjax.data.shapes) <-> 16x16x4 latents (the `shapes` variant's VAE,
downsampling 4x). L2 reconstruction + a light KL, as SD's VAE without its GAN and perceptual losses. The export
measures scaling_factor (1 / std of the latents) for stage 2. See the README's "Offline demo" section.

The VAE is the demo's image codec, so it sees every colour the renderer draws (`sdjax.data.shapes.PALETTE`),
pink included; stage 2, the text-to-image model, never sees pink (configs/lora_shapes.py teaches it). A VAE trained
on the 8 demo colours alone snaps other colours to them: it reconstructs pink as pink 39% of the time.
"""
from configs import train_base
from sdjax.data.shapes import PALETTE


def get_config(arg=None):
    c = train_base.get_config(arg)
    c.workdir = "runs/shapes/vae"
    c.stage = "autoencoder"
    c.model.variant = "shapes"
    c.data.source = "shapes"
    c.data.shapes_size = 64
    c.data.resolution = 64
    c.data.shapes_colors = tuple(PALETTE)  # the demo's 8 colours and the new ones
    c.data.num_threads = 0          # rendering a 64 px shape takes ~1 ms; threads would only compete with XLA
    c.batch_size = 8               # more, smaller steps: the VAE learns colour and edges sooner on a budget
    c.num_steps = 900
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 20
    c.optimizer.schedule = "cosine"
    c.optimizer.end_lr_fraction = 0.1
    c.autoencoder.reconstruction = "l2"  # L1 spends its gradient on the flat background; L2 learns hue first
    c.autoencoder.kl_weight = 1e-6
    c.ema.decay = 0.99
    c.mesh.fsdp_min_size = 1024
    c.checkpoint.every = 100
    c.log_every = 10
    c.export.formats = ("vae",)
    return c
