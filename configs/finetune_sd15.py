"""Fine-tune Stable Diffusion 1.5 on a folder of captioned images at 512 px (UNet; the text encoder and VAE frozen).

    python train.py --config configs/finetune_sd15.py --config.workdir=runs/x \
        --config.model.init_from=/models/stable-diffusion-v1-5 --config.data.path=/data/my_images \
        --config.batch_size=64

init_from: a diffusers folder or an A1111 single file. The folder holds images with same-named .txt
captions, or a metadata.jsonl. For TFDS data: --config.data.source=tfds --config.data.tfds_name=NAME.
Mixed precision (bf16 compute, fp32 parameters), remat and EMA are on; the run exports a diffusers folder
and an A1111 .safetensors of the EMA weights to workdir/export. Add --config.train_text_encoder=True to
train the text encoder too (at optimizer.text_encoder_learning_rate).
"""
from configs import train_base


def get_config(arg=None):
    c = train_base.get_config(arg)
    c.model.init_from = ""          # required: --config.model.init_from=PATH
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.data.source = "folder"
    c.data.resolution = 512
    c.data.center_crop = False
    c.data.random_flip = True
    c.data.caption_dropout = 0.1
    c.batch_size = 64
    c.num_steps = 10_000
    c.optimizer.learning_rate = 1e-5
    c.optimizer.text_encoder_learning_rate = 5e-6
    c.optimizer.warmup_steps = 500
    c.ema.decay = 0.9999
    c.checkpoint.every = 1000
    c.export.formats = ("diffusers", "single_file")
    c.export.dtype = "float16"
    return c
