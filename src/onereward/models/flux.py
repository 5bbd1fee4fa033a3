"""FLUX.1 Fill [dev] behind the generator interface: FluxFillPipeline components, latent-space flow.

The production base is loaded from a URI (local folder or s3:// prefix laid out like the FluxFill
repository, i.e. what `FluxFillPipeline.save_pretrained` writes) in bf16, optionally with a LoRA adapter
(peft) on the transformer's attention projections. `build_toy` makes the same classes at toy width so the
wiring is tested on CPU.

A generator loaded from an external base with an adapter saves the adapter alone (`adapter.safetensors`, ~0.3 GB at
rank 64) beside the base's URI, not the 12 B parameters it did not train; `load` fetches the base and applies it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from onereward import storage
from onereward.config import GeneratorConfig
from onereward.models import lora
from onereward.models.generator import META, MaskedFlowGenerator, tensors_digest

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass(frozen=True)
class FluxShape:
    """Widths of randomly initialised FluxFill components; the defaults are toy width. The text encoders
    are kept small at any width: their output widths are what the transformer sees, and a prompt is
    encoded once, outside the sampling and RL loops."""

    layers: int = 1
    single_layers: int = 1
    heads: int = 2
    head_dim: int = 16
    rope_axes: tuple[int, int, int] = (4, 6, 6)
    text_dim: int = 32  # T5 width (joint_attention_dim)
    pooled_dim: int = 32  # CLIP width (pooled_projection_dim)
    text_length: int = 8  # T5 tokens the transformer attends to
    clip_length: int = 8
    encoder_layers: int = 1
    vae_channels: tuple[int, ...] = (8, 16)
    vae_layers: int = 1
    vae_groups: int = 4


# FLUX.1 Fill [dev]'s transformer (12B) and VAE as published in their configs; T5/CLIP outputs at full width.
FLUX_FILL_DEV = FluxShape(layers=19, single_layers=38, heads=24, head_dim=128, rope_axes=(16, 56, 56),
                          text_dim=4096, pooled_dim=768, text_length=512, clip_length=77,
                          vae_channels=(128, 256, 512, 512), vae_layers=2, vae_groups=32)


def write_pointer(path: Path, cfg: GeneratorConfig, image_size: int) -> None:
    """A generator folder that names an external base instead of holding its weights."""
    path.mkdir(parents=True, exist_ok=True)
    (path / META).write_text(json.dumps({"kind": "flux_fill", "base_uri": cfg.base_uri, "dtype": cfg.dtype,
                                         "lora_rank": cfg.lora_rank, "image_size": image_size}))


class FluxFillGenerator(MaskedFlowGenerator):
    def __init__(self, pipe, image_size: int, guidance_embed: float = 30.0, max_sequence_length: int = 512,
                 base_uri: str | None = None, lora_rank: int = 0):
        from diffusers import FluxFillPipeline

        self.pipe = pipe
        self.image_size = image_size
        self.base_uri = base_uri  # the external checkpoint the frozen weights came from (from_pretrained)
        self.lora_rank = lora_rank
        self.guidance_embed = guidance_embed  # FLUX dev's distilled guidance input, not true CFG
        self.max_sequence_length = max_sequence_length
        self.vsf = pipe.vae_scale_factor
        self.latent_hw = 2 * (image_size // (self.vsf * 2))
        self._pack = FluxFillPipeline._pack_latents
        self._unpack = FluxFillPipeline._unpack_latents
        self.img_ids = FluxFillPipeline._prepare_latent_image_ids(
            1, self.latent_hw // 2, self.latent_hw // 2, "cpu", torch.float32)

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def build_random(cls, image_size: int, prompts: tuple[str, ...], shape: FluxShape | None = None, seed: int = 0,
                     dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> FluxFillGenerator:
        """Randomly initialised FluxFill components from `shape` (toy width by default; FLUX_FILL_DEV for the
        real transformer and VAE), built straight on `device` in `dtype`."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        from onereward.models.tokenizer import build_tokenizer

        shape = shape or FluxShape()
        torch.manual_seed(seed)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                vae = AutoencoderKL(
                    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=shape.vae_channels,
                    down_block_types=("DownEncoderBlock2D",) * len(shape.vae_channels),
                    up_block_types=("UpDecoderBlock2D",) * len(shape.vae_channels),
                    layers_per_block=shape.vae_layers, norm_num_groups=shape.vae_groups, sample_size=image_size,
                    shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False,
                )
                vsf = 2 ** (len(shape.vae_channels) - 1)
                transformer = FluxTransformer2DModel(
                    patch_size=1, in_channels=64 + 64 + 4 * vsf * vsf, out_channels=64, num_layers=shape.layers,
                    num_single_layers=shape.single_layers, attention_head_dim=shape.head_dim,
                    num_attention_heads=shape.heads, joint_attention_dim=shape.text_dim,
                    pooled_projection_dim=shape.pooled_dim, guidance_embeds=True, axes_dims_rope=shape.rope_axes,
                )
                tk = build_tokenizer(prompts, shape.clip_length)
                clip = CLIPTextModel(CLIPTextConfig(
                    vocab_size=len(tk), hidden_size=shape.pooled_dim, intermediate_size=2 * shape.pooled_dim,
                    num_hidden_layers=shape.encoder_layers, num_attention_heads=2,
                    max_position_embeddings=shape.clip_length, projection_dim=shape.pooled_dim))
                t5 = T5EncoderModel(T5Config(vocab_size=len(tk), d_model=shape.text_dim, d_kv=8, d_ff=64,
                                             num_layers=shape.encoder_layers, num_heads=4))
        finally:
            torch.set_default_dtype(default)
        pipe = FluxFillPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
                                tokenizer=tk, text_encoder_2=t5, tokenizer_2=tk, transformer=transformer)
        return cls(pipe, image_size, max_sequence_length=shape.text_length)

    @classmethod
    def build_toy(cls, image_size: int = 32, prompts: tuple[str, ...] = ("fill red circle", "extend"),
                  seed: int = 0) -> FluxFillGenerator:
        """FluxFill-shaped components at toy width (CPU wiring tests)."""
        return cls.build_random(image_size, prompts, FluxShape(), seed)

    @classmethod
    def from_pretrained(cls, uri: str, image_size: int, dtype: str = "bfloat16", lora_rank: int = 0,
                        device: str | None = None) -> FluxFillGenerator:
        """Load a FluxFill checkpoint from a local folder or an s3:// prefix (downloaded once, by URI)."""
        from diffusers import FluxFillPipeline
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # the stage shows its own progress

        local = storage.external_folder(uri)
        torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        pipe = FluxFillPipeline.from_pretrained(str(local), dtype=torch_dtype, local_files_only=True)
        for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            m.requires_grad_(False)
        if lora_rank:
            lora.add_lora(pipe.transformer, lora_rank, LORA_TARGETS)
        pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        meta = local / META
        mseq = json.loads(meta.read_text()).get("max_sequence_length", 512) if meta.exists() else 512
        return cls(pipe, image_size, max_sequence_length=mseq, base_uri=uri, lora_rank=lora_rank)

    @classmethod
    def load(cls, path: str | Path) -> FluxFillGenerator:
        path = Path(path)
        meta = json.loads((path / META).read_text())
        gen = cls.from_pretrained(*cls.base_of(path, meta))
        gen.load_adapter_of(path, meta)
        return gen

    @staticmethod
    def base_of(path: Path, meta: dict) -> tuple[str, int, str, int]:
        """What `from_pretrained` loads for the generator saved in `path` (its META `meta`): (the base's URI, or
        the folder itself when it holds the weights, image size, dtype, adapter rank)."""
        return (meta.get("base_uri") or str(path), meta.get("image_size", 512), meta.get("dtype", "bfloat16"),
                meta.get("lora_rank", 0))

    def load_adapter_of(self, path: Path, meta: dict) -> bool:
        """The adapter saved in `path` put into this generator's; False when the folder holds none (the base's
        pointer: the adapter as loaded fresh is the base)."""
        if not meta.get("adapter"):
            return False
        lora.load_adapter(self.pipe.transformer, path / meta["adapter"], f"lora_rank in {path / META}")
        return True

    @property
    def has_adapter(self) -> bool:
        return lora.has_adapter(self.pipe.transformer)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return lora.adapter_state(self.pipe.transformer)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        meta = {"kind": "flux_fill", "image_size": self.image_size, "dtype": str(self.dtype).removeprefix("torch."),
                "max_sequence_length": self.max_sequence_length}
        if self.has_adapter:
            if not self.base_uri:
                raise ValueError("a LoRA adapter is saved beside its base's URI; this generator was not loaded "
                                 "from one (FluxFillGenerator.from_pretrained)")
            lora.save_adapter(self.pipe.transformer, path / lora.ADAPTER)
            meta |= {"base_uri": self.base_uri, "lora_rank": self.lora_rank, "adapter": lora.ADAPTER}
        else:
            self.pipe.save_pretrained(str(path), safe_serialization=True)
        (path / META).write_text(json.dumps(meta))

    def weights_digest(self) -> str:
        """With an adapter on an external base: the base's URI and the adapter (not 12 B frozen weights)."""
        if not (self.has_adapter and self.base_uri):
            return super().weights_digest()
        return tensors_digest(sorted(self.adapter_state().items()), self.base_uri.encode())

    # --- the generator interface -------------------------------------------------------------------
    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        lat = vae.encode(images.to(vae.dtype)).latent_dist.mean
        lat = (lat - vae.config.shift_factor) * vae.config.scaling_factor
        return self._pack(lat, lat.shape[0], lat.shape[1], lat.shape[2], lat.shape[3])

    def condition(self, images, masks):
        b, h = images.shape[0], self.latent_hw
        masked = self._latents(images * (1 - masks))
        m = masks[:, 0].view(b, h, self.vsf, h, self.vsf).permute(0, 2, 4, 1, 3).reshape(b, self.vsf**2, h, h)
        return torch.cat([masked, self._pack(m, b, self.vsf**2, h, h).to(masked.dtype)], dim=-1)

    def encode_text(self, prompts):
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=prompts, device=self.device, max_sequence_length=self.max_sequence_length)
        return embeds, pooled, text_ids

    def predict_x0(self, z_t, t, cond, text):
        embeds, pooled, text_ids = text
        tr = self.pipe.transformer
        v = tr(hidden_states=torch.cat([z_t, cond], dim=-1).to(tr.dtype), timestep=t.to(tr.dtype),
               guidance=torch.full_like(t, self.guidance_embed, dtype=tr.dtype) if tr.config.guidance_embeds
               else None, pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
               img_ids=self.img_ids.to(z_t.device, tr.dtype), return_dict=False)[0]
        return (z_t - t.view(-1, 1, 1) * v).to(z_t.dtype)  # FLUX predicts v = eps - x0

    def to_model_space(self, images):
        return self._latents(images)

    def to_pixels(self, z):
        vae = self.pipe.vae
        lat = self._unpack(z, self.image_size, self.image_size, self.vsf)
        lat = lat / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(lat.to(vae.dtype), return_dict=False)[0]

    def model_space_shape(self, batch):
        return (batch, (self.latent_hw // 2) ** 2, 64)

    def trainable_modules(self):
        return [self.pipe.transformer]
