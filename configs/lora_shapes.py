"""The offline demo's LoRA: adapters on the trained shapes model, trained on the colour-shape pairs it never saw.

    python train.py --config configs/shapes_vae.py && python train.py --config configs/shapes.py   # the demo first
    python train.py --config configs/lora_shapes.py    # then this: 300 steps (9.5 min on 2 busy CPU cores)
    python sample.py --config configs/shapes_sample.py --config.lora=runs/shapes/lora/lora/lora_shapes.safetensors

Starts from stage 2's export (runs/shapes/ldm/export: every module is loaded) and trains rank-8 adapters on the
UNet's attention (to_q, to_k, to_v, to_out.0) on the held-out split only (purple triangles, orange circles, green
squares); the text encoder and VAE stay frozen, so latents and caption embeddings are encoded once. Previews (the three
held-out pairs and a trained one) every 100 steps; the adapters go to runs/shapes/lora/lora/
(pytorch_lora_weights.safetensors, lora_shapes.safetensors): `sdjax.load_lora(pipe, "runs/shapes/lora/lora")`.
"""
from configs import shapes


def get_config(arg=None):
    c = shapes.get_config(arg)
    c.workdir = "runs/shapes/lora"
    c.model.init_from = "runs/shapes/ldm/export"   # stage 2's diffusers folder: every module is loaded
    c.model.variant = ""
    c.train_text_encoder = False
    c.lora.rank = 8
    c.lora.alpha = 8.0
    c.lora.name = "lora_shapes"
    c.data.shapes_split = "heldout"
    c.data.shapes_length = 2000
    c.batch_size = 32
    c.num_steps = 300
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 20
    c.optimizer.schedule = "constant"
    c.ema.decay = 0.0
    c.checkpoint.every = 100
    c.log_every = 10
    c.preview_every = 100
    c.preview.prompts = ("a purple triangle on the left", "a large orange circle at the top",
                         "a small green square in the centre", "a red circle on the right")
    c.export.formats = ()
    return c
