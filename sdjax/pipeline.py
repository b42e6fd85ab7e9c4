"""The Stable Diffusion pipeline object: the three networks, the tokenizer and the scheduler config."""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class StableDiffusion:
    """What `sdjax.load_pretrained` returns.

    text_encoder: `sdjax.clip.CLIPTextEncoder`; unet: `sdjax.unet.UNet2DConditionModel`;
    vae: `sdjax.autoencoder.AutoencoderKL`; tokenizer: `sdjax.tokenizer.CLIPTokenizer`;
    scheduler_config: the diffusers `scheduler_config.json` fields as a dict.
    """

    text_encoder: Any
    unet: Any
    vae: Any
    tokenizer: Any
    scheduler_config: dict

    @property
    def family(self) -> str:
        """"sd1" or "sd2", from the text encoder (SD 2.x uses OpenCLIP ViT-H, 1024 wide, gelu)."""
        return self.text_encoder.config.family

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")
