"""Stage 1 of a latent diffusion model from scratch: train the autoencoder (VAE) itself.

    python train.py --config configs/train_autoencoder.py --config.workdir=runs/ae
    python train.py --config configs/train_scratch.py --config.workdir=runs/ldm --config.model.init_from=runs/ae

Reconstruction L1 (or l2) + kl_weight * KL through a posterior sample, no GAN and no perceptual loss.
The run exports a diffusers vae/ folder to workdir/export/vae; configs/train_scratch.py trains the text
encoder and UNet on top of it (model.init_from=the autoencoder run's workdir). The default is the tiny
variant's VAE on shapes at 32 px; --config.model.variant=sd15 --config.data.resolution=256 gives SD's.
"""
from configs import train_base


def get_config(arg=None):
    c = train_base.get_config(arg)
    c.stage = "autoencoder"
    c.model.variant = "tiny"
    c.data.source = "shapes"
    c.data.shapes_size = 32
    c.data.resolution = 32
    c.data.num_threads = 0
    c.batch_size = 8
    c.num_steps = 500
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 20
    c.autoencoder.reconstruction = "l1"
    c.autoencoder.kl_weight = 1e-6
    c.ema.decay = 0.99
    c.mesh.fsdp_min_size = 1024
    c.checkpoint.every = 250
    c.export.formats = ("vae",)
    return c
