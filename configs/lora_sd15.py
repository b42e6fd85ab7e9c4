"""LoRA on Stable Diffusion 1.5: rank-4 adapters on the UNet's attention layers, trained on a folder of captioned
images at 512 px while the model itself stays frozen.

    python train.py --config configs/lora_sd15.py --config.workdir=runs/my_style \
        --config.model.init_from=/models/stable-diffusion-v1-5 --config.data.path=/data/my_images
    # -> runs/my_style/lora/pytorch_lora_weights.safetensors (diffusers) and runs/my_style/lora/my_style.safetensors
    #    (kohya: A1111, ComfyUI); load either with pipe.load_lora(PATH) or diffusers' load_lora_weights

configs/finetune_sd15.py with lora.rank = 4 (alpha 4) and learning rate 1e-4, as diffusers' train_text_to_image_lora.py;
no EMA, no caption dropout. Also the feed-forwards: --config.lora.targets=to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2;
the text encoder's attention too: --config.train_text_encoder=True (optimizer.text_encoder_learning_rate).
export.formats=('diffusers',) also writes the model with the adapters merged into its weights.
"""
from configs import finetune_sd15


def get_config(arg=None):
    c = finetune_sd15.get_config(arg)
    c.lora.rank = 4
    c.lora.alpha = 4.0
    c.data.caption_dropout = 0.0
    c.batch_size = 8
    c.num_steps = 2000
    c.optimizer.learning_rate = 1e-4
    c.optimizer.text_encoder_learning_rate = 5e-5
    c.optimizer.warmup_steps = 0
    c.ema.decay = 0.0                # previews and the export use the adapters as trained
    c.checkpoint.every = 500         # each checkpoint also rewrites workdir/lora/
    c.export.formats = ()            # the adapters only (float16, export.dtype)
    return c
