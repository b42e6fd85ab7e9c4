"""The offline demo's LoRA: teach the trained shapes model a colour it never saw, pink.

    python train.py --config configs/shapes_vae.py && python train.py --config configs/shapes.py   # the demo first
    python train.py --config configs/lora_shapes.py    # then this
    python -m sdjax.eval.shapes --checkpoint runs/shapes/ldm/export --colors=pink \
        --lora=runs/shapes/lora_pink/lora/pink.safetensors          # -> runs/shapes/lora_pink/eval

Starts from stage 2's export (runs/shapes/ldm/export: every module is loaded) and trains rank-8 adapters on the
UNet's attention (to_q, to_k, to_v, to_out.0). 42% of the images are pink shapes ("a large pink circle on the left"),
the rest the demo's own colours (purple and green, the ones the adapters pulled, more often), so the adapters learn
what the word "pink" means without moving the other colours.
The text encoder and VAE stay frozen (latents and caption embeddings are encoded once); "pink" is a word of CLIP's
vocabulary that the demo's text encoder never trained. The demo's VAE must know the colour (configs/shapes_vae.py
trains it on pink too: a demo trained before pink was added needs both stages again). Previews every 100 steps; the
adapters go to runs/shapes/lora_pink/lora/ (pytorch_lora_weights.safetensors, pink.safetensors):
`sdjax.load_lora(pipe, ...)`, sample.py's --config.lora or `<lora:pink:1>` in a prompt, the evaluator's --lora.
"""
from configs import shapes
from sdjax.data.shapes import COLORS


def get_config(arg=None):
    c = shapes.get_config(arg)
    c.workdir = "runs/shapes/lora_pink"
    c.model.init_from = "runs/shapes/ldm/export"   # stage 2's diffusers folder: every module is loaded
    c.model.variant = ""
    c.train_text_encoder = False
    c.lora.rank = 8
    c.lora.alpha = 8.0
    c.lora.name = "pink"
    c.data.shapes_split = "train"
    # 24 of the 57 pairs drawn are pink (42%); purple and green 3x more often than the other old colours: with each
    # once, the adapters drew purple triangles pink and green squares cyan (held-out colours 85.5%, not 93.5%)
    c.data.shapes_colors = ("pink",) * len(COLORS) + tuple(COLORS) + ("purple",) * 3 + ("green",) * 3
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
    c.preview.prompts = ("a pink circle on the left", "a large pink square at the top",
                         "a small pink triangle in the centre", "a red circle on the right")
    c.export.formats = ()
    return c
