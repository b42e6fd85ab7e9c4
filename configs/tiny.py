"""A tiny model trained from scratch on the procedural shapes at 32 px: minutes on a laptop CPU.

    python train.py --config configs/tiny.py --config.workdir=runs/tiny
    python train.py --config configs/tiny.py --config.workdir=runs/tiny --config.num_steps=2000   # a longer run

Also the config of the end-to-end tests. Everything of configs/train_base.py can be overridden.
"""
from configs import train_base


def get_config(arg=None):
    c = train_base.get_config(arg)
    c.model.variant = "tiny"        # sdjax.variants: ~0.8M-parameter UNet, 2-layer 32-wide CLIP, 2x VAE
    c.data.source = "shapes"
    c.data.shapes_size = 32
    c.data.resolution = 32
    c.data.caption_dropout = 0.1
    c.data.num_threads = 0
    c.batch_size = 8
    c.num_steps = 200
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 10
    c.ema.decay = 0.99
    c.mesh.fsdp_min_size = 1024
    c.checkpoint.every = 100
    c.log_every = 10
    c.preview_every = 100          # workdir/previews/ and TensorBoard, sampled with sdjax.pipeline
    c.preview.prompts = ("a red circle on the left", "a large blue square at the top")
    c.preview.num_inference_steps = 10
    c.preview.guidance_scale = 3.0
    return c
