"""Fine-tune Stable Diffusion 2.1 (768 px, v-prediction) on a folder of captioned images.

    python train.py --config configs/finetune_sd21.py --config.workdir=runs/x \
        --config.model.init_from=/models/stable-diffusion-2-1 --config.data.path=/data/my_images \
        --config.batch_size=32 --config.mesh.fsdp=8

The prediction type comes from the checkpoint's scheduler_config.json (v_prediction for 2.1 768); a
single file does not record it, so pass --config.model.prediction_type=v_prediction (or epsilon for the
512 px base model, with --config.data.resolution=512). Min-SNR-5 weighting; FSDP over 8 devices keeps
the optimizer state of the larger text encoder and UNet small per device.
"""
from configs import finetune_sd15


def get_config(arg=None):
    c = finetune_sd15.get_config(arg)
    c.data.resolution = 768
    c.batch_size = 32
    c.objective.min_snr_gamma = 5.0
    c.optimizer.learning_rate = 5e-6
    return c
