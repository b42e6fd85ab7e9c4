"""Fine-tune SDXL base on a folder of captioned images at 1024 px: the UNet (2.6B parameters) sharded over the
devices (FSDP), the two text encoders and the VAE frozen.

    python train.py --config configs/finetune_sdxl.py --config.workdir=runs/x \
        --config.model.init_from=/models/stable-diffusion-xl-base-1.0 --config.data.path=/data/my_images \
        --config.batch_size=32

init_from: a diffusers folder or an SDXL single file (A1111 / ComfyUI). Each image is conditioned on its own size
ids, as SDXL was trained: its original (height, width) before resizing, the top-left corner of its random crop and
the target size (sdjax.training.sdxl_time_ids). What each device holds, by arithmetic (2,567,463,684 UNet
parameters at 4 bytes): parameters, two AdamW moments and the EMA take 41 GB and the gradients 10 GB more; replicated
that is 51 GB of an 80 GB GPU before the frozen encoders (3.3 GB), the VAE and 1024 px activations, so the state is
sharded along mesh.fsdp (-1: every device; 6.4 GB a device on 8). LoRA instead: --config.lora.rank=16 (the base is
frozen, only the adapters carry optimizer state: mesh.fsdp=1 on one GPU). --config.train_text_encoder=True trains
both text encoders too (at optimizer.text_encoder_learning_rate). init_from may be the refiner: its UNet takes the
aesthetic score (data.aesthetic_score, 6.0) in place of the target size, and its one text encoder trains with
train_text_encoder.
"""
from configs import finetune_sd15


def get_config(arg=None):
    c = finetune_sd15.get_config(arg)
    c.data.resolution = 1024
    c.data.caption_dropout = 0.0     # SDXL samples without a prompt from zeros, not from an empty caption's encoding
    c.batch_size = 32
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.optimizer.learning_rate = 1e-6
    c.optimizer.text_encoder_learning_rate = 1e-6
    c.optimizer.warmup_steps = 100
    c.preview.prompts = ("a photo of an astronaut riding a horse on the moon", "a lighthouse at dusk, oil painting")
    return c
