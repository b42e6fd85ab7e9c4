"""Stage 2 of a latent diffusion model from scratch: text encoder + UNet from random init on a trained VAE.

    python train.py --config configs/train_autoencoder.py --config.workdir=runs/ae      # stage 1
    python train.py --config configs/train_scratch.py --config.workdir=runs/ldm --config.model.init_from=runs/ae

model.init_from is the autoencoder run (its workdir, its export folder, or any diffusers vae/ folder); the
text encoder and UNet are random `model.variant` modules trained together. The result exports as a full
diffusers folder (and loads in diffusers' StableDiffusionPipeline).
"""
from configs import tiny


def get_config(arg=None):
    c = tiny.get_config(arg)
    c.model.init_from = ""          # required: the autoencoder run
    c.train_text_encoder = True
    c.optimizer.text_encoder_learning_rate = 5e-4
    c.num_steps = 2000
    c.checkpoint.every = 500
    return c
