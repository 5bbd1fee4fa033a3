"""The one VLM judge (OneReward): "for task T with prompt P, is image 1 better than image 2 on criterion C?",
reward = P(Yes).

The tiny judge is a transformers Qwen2-VL built from a small config, with a word-level tokenizer trained
locally on the query vocabulary. The flux profile's judge is a pretrained Qwen2.5-VL (or Qwen2-VL) loaded from a
URI, asked in the chat format it was instruction-tuned on, with a LoRA adapter on its language model's attention;
it saves the adapter alone beside the base's URI. Images go into the model's pixel layout with torch operations only
(resize, normalise, patchify), so a gradient flows from P(Yes) back into generated pixels: the RL stage
needs that path, and the PIL/numpy image processor would cut it.

Each image is shown as a two-frame clip, the condition's masked input then the result, the way Qwen2-VL
takes video: its patch embedding spans two frames (temporal_patch_size 2), so the judge sees where the mask
is and what was kept at no extra tokens. Without it the judge could only guess which region was generated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from onereward import storage
from onereward.models import lora

META = "judge.json"
IMAGE_PAD, VISION_START, VISION_END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"
YES, NO = "yes", "no"
SPECIALS = ["[PAD]", "[UNK]", IMAGE_PAD, VISION_START, VISION_END, YES, NO]
# a pretrained judge's answers and adapter: the language model's attention (the vision tower's are qkv and proj,
# left frozen: the gradient still reaches the pixels through it in RL)
ANSWERS = ("Yes", "No")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", VISION_START, VISION_END, IMAGE_PAD]
# The CLIP normalisation Qwen2-VL's image processor applies.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


ARCHS = ("qwen2_vl", "qwen2_5_vl")
# The vision tower's attention over a batch of images packed into one sequence. transformers runs one sdpa call
# per image (per window on Qwen2.5-VL) unless the implementation's name says "flash", which hands it the
# images' boundaries (cu_seqlens) instead; the judge's images are all one size, so one batched call does them all.
PACKED_ATTENTION = "flash_packed_sdpa"


def packed_sdpa(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                **kwargs):
    """(1, heads, total, d) query/key/value of equal-length images -> (1, total, heads, d), what transformers'
    flash path returns; chunks of unequal length (none on the judge) go one call each, as transformers does."""
    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    q, k, v = (x.squeeze(0) for x in (query, key, value))  # (heads, total, d)
    if len(set(lengths)) == 1:
        n, length = len(lengths), lengths[0]
        q, k, v = (x.unflatten(1, (n, length)).transpose(0, 1) for x in (q, k, v))  # (images, heads, length, d)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling)
        return out.transpose(1, 2).reshape(1, n * length, out.shape[1], out.shape[3]), None
    outs = [F.scaled_dot_product_attention(a[None], b[None], c[None], dropout_p=dropout, scale=scaling)[0]
            for a, b, c in zip(*(x.split(lengths, dim=1) for x in (q, k, v)), strict=True)]
    return torch.cat(outs, dim=1).transpose(0, 1)[None], None


@dataclass(frozen=True)
class JudgeShape:
    arch: str = "qwen2_vl"  # qwen2_vl | qwen2_5_vl (windowed vision attention, SwiGLU vision MLP)
    image_size: int = 32
    patch_size: int = 4
    merge_size: int = 2
    temporal_patch_size: int = 2
    vision_dim: int = 64
    vision_depth: int = 2
    text_hidden: int = 128
    text_layers: int = 2
    heads: int = 4

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_image(self) -> int:
        return (self.grid // self.merge_size) ** 2

    @classmethod
    def of(cls, config, image_size: int) -> JudgeShape:
        """The shape of a Qwen-VL checkpoint's config, its images shown at `image_size`."""
        v, t = config.vision_config, config.text_config
        unit = v.patch_size * v.spatial_merge_size
        if image_size % unit:
            raise ValueError(f"judge image_size {image_size}: {config.model_type} takes multiples of {unit} "
                             f"(patch {v.patch_size} x merge {v.spatial_merge_size})")
        return cls(arch=config.model_type, image_size=image_size, patch_size=v.patch_size,
                   merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
                   vision_dim=getattr(v, "embed_dim", v.hidden_size), vision_depth=v.depth,
                   text_hidden=t.hidden_size, text_layers=t.num_hidden_layers, heads=t.num_attention_heads)


def query_words(task: str, criterion: str, prompt: str) -> list[str]:
    """The question, as words of the local vocabulary; each image is a run of image tokens."""
    image = [VISION_START, IMAGE_PAD, VISION_END]  # IMAGE_PAD is repeated to the image's token count
    return ["task", task, "prompt", *prompt.split(), "criterion", *criterion.split("_"), "is", "image", "1",
            "better", "than", "image", "2", "?", "image", "1", *image, "image", "2", *image, "answer"]


def query_text(task: str, criterion: str, prompt: str, tokens_per_image: int) -> str:
    """The query as the tokenizer reads it: each image's pad token repeated to its token count."""
    words = query_words(task, criterion, prompt)
    return " ".join(" ".join([w] * tokens_per_image) if w == IMAGE_PAD else w for w in words)


def chat_query_text(task: str, criterion: str, prompt: str, tokens_per_image: int) -> str:
    """The query as a pretrained judge reads it: ChatML with its template's default system line, the images as its
    processor expands them (pad tokens back to back), the answer's first token next."""
    image = VISION_START + IMAGE_PAD * tokens_per_image + VISION_END
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"Task: {task}. Prompt: {prompt or 'none'}. Criterion: {criterion.replace('_', ' ')}.\n"
            "Each image is shown after the masked input it completes.\n"
            f"Image 1: {image}\nImage 2: {image}\n"
            "Is image 1 better than image 2 on the criterion? Answer Yes or No.<|im_end|>\n<|im_start|>assistant\n")


def _token_id(tokenizer, text: str) -> int:
    """The one token `text` is: the reward reads the logit of one answer token, images are runs of one pad token."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"the judge's tokenizer reads {text!r} as {ids}; the judge needs it as one known token")
    return ids[0]


def build_tokenizer(tasks_criteria: list[tuple[str, str]], prompts: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {w for t, c in tasks_criteria for w in query_words(t, c, "")} | {w for p in prompts for w in p.split()}
    words = sorted(words - set(SPECIALS))
    vocab = {w: i for i, w in enumerate([*SPECIALS, *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", padding_side="left")


def _normalised(images: torch.Tensor, s: int) -> torch.Tensor:
    x = (images + 1) / 2
    if x.shape[-1] != s or x.shape[-2] != s:
        x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(MEAN, dtype=x.dtype, device=x.device)[None, :, None, None]
    std = torch.tensor(STD, dtype=x.dtype, device=x.device)[None, :, None, None]
    return (x - mean) / std


def pixel_values(images: torch.Tensor, shape: JudgeShape, context: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> Qwen2-VL's flattened patches (B * grid², 3 * t * p * p), in torch ops only
    (differentiable), in the order Qwen2VLImageProcessor produces. With `context` (B, 3, H, W) each image is
    the two-frame clip (context, image); without, a still image is its own temporal pair."""
    s, p, m, t = shape.image_size, shape.patch_size, shape.merge_size, shape.temporal_patch_size
    x = _normalised(images, s)
    b, c, g = x.shape[0], x.shape[1], shape.grid
    if context is None:
        x = x[:, None].expand(b, t, c, s, s)
    else:
        if t != 2:
            raise ValueError("a context frame needs temporal_patch_size 2")
        x = torch.stack([_normalised(context, s), x], dim=1)
    x = x.reshape(b, t, c, g // m, m, p, g // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # b, gh, gw, mh, mw, c, t, ph, pw
    return x.reshape(b * g * g, c * t * p * p)


@dataclass(frozen=True)
class Query:
    """What a batch of questions asks, one entry a row: the task, criterion and prompt of each, and the
    condition's masked input (B, 3, H, W) in [-1, 1] shown before each image (None: still images)."""

    tasks: list[str]
    criteria: list[str]
    prompts: list[str]
    context: torch.Tensor | None = None

    def __getitem__(self, sl: slice | list[int]) -> Query:
        pick = (lambda v: v[sl]) if isinstance(sl, slice) else (lambda v: [v[i] for i in sl])
        ctx = None if self.context is None else self.context[sl]
        return Query(pick(self.tasks), pick(self.criteria), pick(self.prompts), ctx)

    def __add__(self, other: Query) -> Query:
        ctx = None if self.context is None else torch.cat([self.context, other.context])
        return Query(self.tasks + other.tasks, self.criteria + other.criteria, self.prompts + other.prompts, ctx)


def _twice(context: torch.Tensor | None) -> torch.Tensor | None:
    return None if context is None else torch.cat([context, context])


def _classes(arch: str):
    import transformers

    if arch == "qwen2_5_vl":
        return transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    return transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration


def _config(shape: JudgeShape, tk, max_positions: int = 512):
    """A Qwen2-VL / Qwen2.5-VL config of `shape` over the tokenizer `tk`'s vocabulary."""
    head_dim = shape.text_hidden // shape.heads
    third = head_dim // 2 // 3
    common = {"patch_size": shape.patch_size, "spatial_merge_size": shape.merge_size,
              "temporal_patch_size": shape.temporal_patch_size, "depth": shape.vision_depth,
              "num_heads": shape.heads}
    if shape.arch == "qwen2_vl":
        vision = {**common, "embed_dim": shape.vision_dim, "hidden_size": shape.text_hidden, "mlp_ratio": 2}
    elif shape.arch == "qwen2_5_vl":
        # windowed attention over image quarters, the last block attends fully, as in the 7B
        vision = {**common, "hidden_size": shape.vision_dim, "out_hidden_size": shape.text_hidden,
                  "intermediate_size": shape.vision_dim * 2, "window_size": shape.image_size // 2,
                  "fullatt_block_indexes": [shape.vision_depth - 1]}
    else:
        raise ValueError(f"judge arch {shape.arch!r}: expected one of {ARCHS}")
    return _classes(shape.arch)[0](
        vision_config=vision,
        text_config={"vocab_size": len(tk), "hidden_size": shape.text_hidden,
                     "intermediate_size": shape.text_hidden * 2, "num_hidden_layers": shape.text_layers,
                     "num_attention_heads": shape.heads, "num_key_value_heads": shape.heads,
                     "max_position_embeddings": max_positions, "tie_word_embeddings": True,
                     "bos_token_id": None, "eos_token_id": None,
                     # mrope splits the rotary half-dimension into (time, height, width) sections
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                         "mrope_section": [head_dim // 2 - 2 * third, third, third]}},
        image_token_id=tk.convert_tokens_to_ids(IMAGE_PAD),
        vision_start_token_id=tk.convert_tokens_to_ids(VISION_START),
        vision_end_token_id=tk.convert_tokens_to_ids(VISION_END),
        pad_token_id=tk.pad_token_id,
    )


@dataclass(frozen=True)
class Source:
    """Where a pretrained judge's frozen weights come from: its checkpoint's URI, the adapter's rank, the dtype."""

    base_uri: str
    lora_rank: int
    dtype: str = "bfloat16"


class Judge:
    """Pairwise Yes/No judge over a Qwen2-VL / Qwen2.5-VL: built from a small config with a local word-level
    vocabulary (`build`, `tiny`), or a pretrained checkpoint with a LoRA adapter (`from_pretrained`, `flux`)."""

    def __init__(self, model, tokenizer, shape: JudgeShape, source: Source | None = None):
        self.model, self.tokenizer, self.shape, self.source = model, tokenizer, shape, source
        self.phrase = query_text if source is None else chat_query_text
        yes, no = (YES, NO) if source is None else ANSWERS
        self.yes_id, self.no_id = _token_id(tokenizer, yes), _token_id(tokenizer, no)
        self.image_id = _token_id(tokenizer, IMAGE_PAD)
        self._rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._geometry: dict[tuple[int, str], dict] = {}
        from transformers import AttentionInterface

        AttentionInterface.register(PACKED_ATTENTION, packed_sdpa)
        model.model.visual.config._attn_implementation = PACKED_ATTENTION

    @classmethod
    def build(cls, tasks_criteria: list[tuple[str, str]], prompts: list[str], shape: JudgeShape = JudgeShape(),
              seed: int = 0):
        torch.manual_seed(seed)
        tk = build_tokenizer(tasks_criteria, prompts)
        return cls(_classes(shape.arch)[1](_config(shape, tk)), tk, shape)

    @classmethod
    def from_pretrained(cls, source: Source, image_size: int, arch: str | None = None,
                        device: str | torch.device | None = None) -> Judge:
        """A Qwen-VL checkpoint (a local folder or an s3:// prefix, as `save_pretrained` writes it with its
        tokenizer), frozen, with a LoRA adapter of `source.lora_rank` on its language model. `arch`, when given,
        is what the config declares the checkpoint to be."""
        from transformers import AutoConfig, AutoTokenizer

        local = str(storage.external_folder(source.base_uri))
        config = AutoConfig.from_pretrained(local, local_files_only=True)
        if config.model_type not in ARCHS or (arch and config.model_type != arch):
            raise ValueError(f"judge checkpoint {source.base_uri} is a {config.model_type!r}; expected "
                             f"{arch or ' or '.join(ARCHS)!r}")
        shape = JudgeShape.of(config, image_size)
        dtype = torch.bfloat16 if source.dtype == "bfloat16" else torch.float32
        model = _classes(config.model_type)[1].from_pretrained(local, dtype=dtype, local_files_only=True,
                                                               use_safetensors=True)
        if source.lora_rank:
            lora.add_lora(model, source.lora_rank, LORA_TARGETS)
        else:
            model.requires_grad_(False)
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(model, AutoTokenizer.from_pretrained(local, local_files_only=True), shape, source)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """All of a tiny judge; the adapter of a pretrained one."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def weights_digest(self) -> str:
        """sha256 of the trainable weights (data-parallel processes must end with the same)."""
        from onereward.models.generator import tensors_digest

        return tensors_digest((n, p) for n, p in self.model.named_parameters() if p.requires_grad)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _row(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids (L,), 3D rope positions (3, L)) of one unpadded query, cached: transformers derives the
        positions with a Python loop over rows and images on every call, a ninth of a judge training step on
        `tiny` (the query texts repeat: tasks x criteria x prompts)."""
        hit = self._rows.get(text)
        if hit is None:
            if len(self._rows) >= 65536:
                self._rows.clear()
            ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            g = self.shape.grid
            pos, _ = self.model.model.get_rope_index(
                ids, mm_token_type_ids=(ids == self.image_id).long(), image_grid_thw=torch.tensor([[1, g, g]] * 2),
                attention_mask=torch.ones_like(ids))
            hit = self._rows[text] = (ids[0], pos[:, 0])
        return hit

    def _inputs(self, tasks: list[str], criteria: list[str], prompts: list[str]) -> dict[str, torch.Tensor]:
        """The batch left-padded as the tokenizer pads it, with the rope positions get_rope_index gives."""
        n = self.shape.tokens_per_image
        rows = [self._row(self.phrase(t, c, p, n)) for t, c, p in zip(tasks, criteria, prompts, strict=True)]
        length = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        pos = torch.zeros((3, len(rows), length), dtype=torch.long)  # get_rope_index leaves padding at 0
        for i, (row_ids, row_pos) in enumerate(rows):
            ids[i, length - len(row_ids):] = row_ids
            mask[i, length - len(row_ids):] = 1
            pos[:, i, length - len(row_ids):] = row_pos
        device = self.model.device
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device),
                "mm_token_type_ids": (ids == self.image_id).long().to(device)}

    def p_yes(self, image1: torch.Tensor, image2: torch.Tensor, q: Query) -> torch.Tensor:
        """P(Yes | image 1 better than image 2 for the query), one value a row, differentiable in the images;
        the Yes/No softmax at the answer position."""
        return self.yes_no_logits(image1, image2, q).softmax(-1)[:, 0]

    def p_yes_both_orders(self, image1: torch.Tensor, image2: torch.Tensor, q: Query
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """(P(Yes | image 1, image 2), P(Yes | image 2, image 1)): each image through the vision tower once."""
        p = self.both_orders_logits(image1, image2, q).softmax(-1)[:, 0]
        return p[: len(image1)], p[len(image1) :]

    def yes_no_logits(self, image1: torch.Tensor, image2: torch.Tensor, q: Query) -> torch.Tensor:
        """(B, 2) logits of Yes and No at the answer position (the training loss is a 2-way cross-entropy)."""
        tokens = self.vision_tokens(torch.cat([image1, image2]), _twice(q.context))
        return self._answer_logits(*tokens.chunk(2), q)

    def both_orders_logits(self, image1: torch.Tensor, image2: torch.Tensor, q: Query) -> torch.Tensor:
        """(2B, 2): yes_no_logits of (image 1, image 2) then of (image 2, image 1). The vision tower sees each
        image alone, so its tokens serve both orders: a third less compute a training step on `tiny`."""
        t1, t2 = self.vision_tokens(torch.cat([image1, image2]), _twice(q.context)).chunk(2)
        return self._answer_logits(torch.cat([t1, t2]), torch.cat([t2, t1]), q + q)

    def vision_tokens(self, images: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """(B, tokens_per_image, text_hidden): the vision tower's merged tokens of each image (of the clip
        (context, image) with a context), what the language model is shown in place of the image's pad tokens."""
        device = self.device
        context = None if context is None else context.to(device)
        pixels = pixel_values(images.to(device), self.shape, context).to(self.model.dtype)
        grid, geometry = self._vision_geometry(images.shape[0])
        tokens = self.model.model.visual(pixels, grid_thw=grid, **geometry).pooler_output  # after the 2x2 merger
        return tokens.reshape(images.shape[0], self.shape.tokens_per_image, -1)

    def _vision_geometry(self, n: int) -> tuple[torch.Tensor, dict]:
        """(grid_thw, the vision tower's rope positions and image/window boundaries) for `n` images of the
        judge's one size, computed once per batch size by transformers' own helpers, which take them
        precomputed: derived on every call they cost a Python loop over the images, 8 ms of a ~200 ms
        training step of 64 images."""
        from transformers import vision_utils as vu
        from transformers.utils.generic import get_max_seqlen

        device = self.model.device
        hit = self._geometry.get((n, str(device)))
        if hit is None:
            visual, g = self.model.model.visual, self.shape.grid
            grid = torch.tensor([[1, g, g]] * n, device=device)
            cu = vu.get_vision_cu_seqlens(grid)
            geometry = {"position_ids": vu.get_vision_position_ids(grid, visual.spatial_merge_size),
                        "cu_seqlens": cu, "max_seqlen": get_max_seqlen(cu, visual.config)}
            if self.shape.arch == "qwen2_5_vl":  # windowed attention
                index, cu_window = vu.get_vision_window_index(
                    grid, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
                    patch_size=visual.patch_size)
                geometry |= {"window_index": index, "cu_window_seqlens": cu_window,
                             "max_window_seqlen": get_max_seqlen(cu_window, visual.config)}
            hit = self._geometry[(n, str(device))] = (grid, geometry)
        return hit

    def _answer_logits(self, tokens1: torch.Tensor, tokens2: torch.Tensor, q: Query) -> torch.Tensor:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        b = tokens1.shape[0]
        both = torch.stack([tokens1, tokens2], dim=1).flatten(0, 2)  # image 1, image 2 of row 0, then row 1...
        grid = self._vision_geometry(2 * b)[0]  # the images' rope positions in the language model
        out = self.model(**self._inputs(q.tasks, q.criteria, q.prompts), image_grid_thw=grid, logits_to_keep=1,
                         use_cache=False,
                         mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=(both,))})
        return out.logits[:, -1, [self.yes_id, self.no_id]].float()

    def image_features(self, images: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """(B, text_hidden): vision_tokens mean-pooled. The vision warm-up of train_reward fits these before the
        pairwise query is trained."""
        return self.vision_tokens(images, context).mean(1).float()

    def save(self, path: str | Path) -> None:
        """A tiny judge whole (model and tokenizer); a pretrained one as its adapter beside the base's URI."""
        path = Path(path)
        if self.source is None:
            self.model.save_pretrained(path / "model", safe_serialization=True)
            self.tokenizer.save_pretrained(path / "tokenizer")
            meta = {"kind": f"tiny_{self.shape.arch}", "shape": self.shape.__dict__}
        else:
            if not lora.has_adapter(self.model):
                raise ValueError("a pretrained judge is saved as its LoRA adapter; this one has none (lora_rank 0)")
            lora.save_adapter(self.model, path / lora.ADAPTER)
            meta = {"kind": "pretrained", "shape": self.shape.__dict__, "source": self.source.__dict__,
                    "adapter": lora.ADAPTER}
        path.mkdir(parents=True, exist_ok=True)
        (path / META).write_text(json.dumps(meta))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> Judge:
        """A saved judge; a pretrained one's base is fetched from its URI and loaded on `device` (default: a GPU
        when there is one), a tiny one is loaded on the CPU."""
        from transformers import PreTrainedTokenizerFast

        path = Path(path)
        meta = json.loads((path / META).read_text())
        shape = JudgeShape(**meta["shape"])
        if meta["kind"] == "pretrained":
            judge = cls.from_pretrained(Source(**meta["source"]), shape.image_size, shape.arch, device)
            lora.load_adapter(judge.model, path / meta["adapter"], f"source.lora_rank in {path / META}")
            return judge
        model = _classes(shape.arch)[1].from_pretrained(path / "model", use_safetensors=True, local_files_only=True)
        tk = PreTrainedTokenizerFast.from_pretrained(str(path / "tokenizer"), local_files_only=True)
        return cls(model, tk, shape)


def write_toy_checkpoint(path: str | Path, arch: str, tasks_criteria: list[tuple[str, str]], prompts: list[str],
                         seed: int = 0) -> Path:
    """A Qwen-VL checkpoint at toy width laid out as `save_pretrained` writes a real one (config, safetensors, a
    byte-level BPE tokenizer with Qwen's special tokens, trained locally on the judge's queries): the flux
    profile's judges on the CPU, where no 7B checkpoint can come from a hub."""
    path = Path(path)
    tk = chat_tokenizer(tasks_criteria, prompts)
    torch.manual_seed(seed)
    shape = JudgeShape(arch=arch)
    _classes(arch)[1](_config(shape, tk, max_positions=4096)).save_pretrained(path, safe_serialization=True)
    tk.save_pretrained(path)
    return path


def chat_tokenizer(tasks_criteria: list[tuple[str, str]], prompts: list[str]):
    """A byte-level BPE tokenizer with Qwen's special tokens, trained locally on the chat queries (a stand-in for a
    pretrained judge's own: any text encodes, `Yes` and `No` are one token each)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [chat_query_text(t, c, p, 1) + answer for t, c in tasks_criteria for p in prompts for answer in ANSWERS]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=512, special_tokens=CHAT_SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   additional_special_tokens=CHAT_SPECIALS[1:])
