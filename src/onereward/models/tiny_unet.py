"""The tiny pixel-space backbone: a 7-channel diffusers UNet2DConditionModel over (x_t, masked image, mask) and
a small CLIPTextModel over a locally trained word-level tokenizer, 32x32 pixels on the `tiny` profile."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from onereward.config import GeneratorConfig
from onereward.models import tokenizer as tok
from onereward.models.generator import META, MaskedFlowGenerator


class TinyUNetGenerator(MaskedFlowGenerator):
    """Pixel-space generator: a 7-channel diffusers UNet2DConditionModel (x_t, masked image, mask) with a
    small CLIPTextModel over a locally trained word-level tokenizer."""

    def __init__(self, unet, text_encoder, tokenizer, image_size: int, max_tokens: int):
        self.unet, self.text_encoder, self.tokenizer = unet, text_encoder, tokenizer
        self.image_size, self.max_tokens = image_size, max_tokens
        if not torch.cuda.is_available():
            from diffusers.models.attention_processor import AttnProcessor

            # plain bmm + softmax: at 32 channels a head, CPU SDPA kernels were ~1.5x slower a training step
            unet.set_attn_processor(AttnProcessor())

    @classmethod
    def build(cls, cfg: GeneratorConfig, prompts: list[str], image_size: int, seed: int = 0):
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        torch.manual_seed(seed)
        tk = tok.build_tokenizer(prompts, cfg.max_prompt_tokens)
        n = len(cfg.block_out_channels)
        unet = UNet2DConditionModel(
            sample_size=image_size,
            in_channels=7,
            out_channels=3,
            block_out_channels=tuple(cfg.block_out_channels),
            # no attention at full resolution: it dominates CPU time at 32x32 for little gain
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
            layers_per_block=cfg.layers_per_block,
            cross_attention_dim=cfg.text_hidden,
            attention_head_dim=cfg.attention_heads,  # diffusers' legacy name for the number of heads
            norm_num_groups=8,
        )
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tk), hidden_size=cfg.text_hidden, intermediate_size=cfg.text_hidden * 2,
            num_hidden_layers=cfg.text_layers, num_attention_heads=4,
            max_position_embeddings=cfg.max_prompt_tokens, pad_token_id=tk.pad_token_id,
            bos_token_id=tk.pad_token_id, eos_token_id=tk.pad_token_id,
        ))
        return cls(unet, text, tk, image_size, cfg.max_prompt_tokens)
    def condition(self, images, masks):
        return torch.cat([images * (1 - masks), masks * 2 - 1], dim=1)

    def encode_text(self, prompts):
        ids, attn = tok.encode(self.tokenizer, prompts, self.max_tokens)
        hidden = self.text_encoder(input_ids=ids, attention_mask=attn).last_hidden_state
        return hidden, attn

    def predict_x0(self, z_t, t, cond, text):
        hidden, attn = text
        return self.unet(torch.cat([z_t, cond], dim=1), t * 1000, encoder_hidden_states=hidden,
                         encoder_attention_mask=attn).sample

    def to_model_space(self, images):
        return images

    def to_pixels(self, z):
        return z

    def region_weights(self, masks, mask_weight):
        return 1 + (mask_weight - 1) * masks

    def model_space_shape(self, batch):
        return (batch, 3, self.image_size, self.image_size)

    def trainable_modules(self):
        return [self.unet, self.text_encoder]

    def save(self, path):
        path = Path(path)
        self.unet.save_pretrained(path / "unet", safe_serialization=True)
        self.text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(path / "tokenizer")
        (path / META).write_text(json.dumps({"kind": "tiny_unet", "image_size": self.image_size,
                                             "max_tokens": self.max_tokens}))

    @classmethod
    def load(cls, path):
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        path = Path(path)
        meta = json.loads((path / META).read_text())
        unet = UNet2DConditionModel.from_pretrained(path / "unet", use_safetensors=True)
        text = CLIPTextModel.from_pretrained(path / "text_encoder", use_safetensors=True, local_files_only=True)
        return cls(unet, text, tok.load_tokenizer(path / "tokenizer"), meta["image_size"], meta["max_tokens"])
