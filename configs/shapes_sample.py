"""Sample the offline demo's model (configs/shapes_vae.py then configs/shapes.py): one image per prompt and a grid.

    python sample.py --config configs/shapes_sample.py
    python sample.py --config configs/shapes_sample.py --config.prompts_file= \
        --config.prompt="a large cyan triangle at the bottom"

The prompts (configs/shapes_prompts.txt) end with colour-shape pairs the model never saw in training
(purple triangle, orange circle, green square). Every field of configs/sample.py can be overridden.
"""
from configs import sample


def get_config():
    c = sample.get_config()
    c.checkpoint = "runs/shapes/ldm/export"
    c.prompts_file = "configs/shapes_prompts.txt"
    c.sampler = "DPM++ 2M"
    c.steps = 25
    c.guidance_scale = 4.0
    c.height = 64
    c.width = 64
    c.batch_size = 12
    c.output_dir = "runs/shapes/samples"
    return c
