"""SD3's three text encoders (CLIP-L, CLIP-G, T5-XXL) and the one function that assembles their outputs.

What each encoder contributes (shared/docs/sd3-reference.md section 2):
- CLIP-L: token states of the penultimate layer without the final LayerNorm; pooled = final-LN state at the
  first end token, *unprojected* (SD3's CLIP-L projection is the identity; the stock OpenAI one is not).
- CLIP-G: penultimate token states; pooled = final-LN end-token state through text_projection.
- T5-XXL encoder: last hidden state after the final norm. No attention masks anywhere: padding tokens produce real
  states that the MM-DiT attends to, so pad ids and lengths are part of the model.

`assemble` is the only place that builds the MM-DiT's (context, pooled). An absent encoder (`--no-t5`, a model
shipped without one, or training's per-encoder dropout) contributes zeros of its exact shape, so sampling without
T5 and training with T5 dropped see the same input.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmdit.config import TextLayout

logger = logging.getLogger(__name__)

CLIP_BOS, CLIP_EOS = 49406, 49407
T5_EOS, T5_PAD = 1, 0


# ---------------------------------------------------------------------------------------------------------------
# Tokenisation: ids are laid out here, not by the tokenizer's padding options, so every source behaves alike.


def _warn_truncated(name: str, prompt: str, kept: int, total: int):
    if total > kept:
        logger.warning("%s keeps %d of %d prompt tokens; %d dropped from %r", name, kept, total, total - kept,
                       prompt[:60] + ("..." if len(prompt) > 60 else ""))


def clip_token_ids(tokenizer, prompts: list[str], pad_id: int, length: int = 77, name: str = "CLIP") -> torch.Tensor:
    """(B, length) ids: BOS, up to length - 2 BPE tokens, EOS, then pad_id (EOS for CLIP-L, 0 for CLIP-G)."""
    rows = []
    for prompt in prompts:
        tokens = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        _warn_truncated(name, prompt, length - 2, len(tokens))
        ids = [CLIP_BOS] + tokens[: length - 2] + [CLIP_EOS]
        rows.append(ids + [pad_id] * (length - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


def t5_token_ids(tokenizer, prompts: list[str], length: int) -> torch.Tensor:
    """(B, length) ids: up to length - 1 SentencePiece tokens, EOS (1), then 0 (pad)."""
    rows = []
    for prompt in prompts:
        tokens = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        _warn_truncated("T5", prompt, length - 1, len(tokens))
        ids = tokens[: length - 1] + [T5_EOS]
        rows.append(ids + [T5_PAD] * (length - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------------
# Encoders


@dataclass
class ClipEncoder:
    """A CLIP text tower (transformers CLIPTextModel or CLIPTextModelWithProjection) with its tokenizer."""

    model: torch.nn.Module
    tokenizer: object
    pad_id: int                # CLIP_EOS for CLIP-L, 0 ("!") for CLIP-G
    project_pooled: bool       # False for CLIP-L, True for CLIP-G
    name: str = "CLIP"

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def __call__(self, prompts: list[str], length: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
        """-> tokens (B, length, width) from the penultimate layer, pooled (B, width)."""
        device = next(self.model.parameters()).device
        ids = clip_token_ids(self.tokenizer, prompts, self.pad_id, length, self.name).to(device)
        out = self.model.text_model(ids, output_hidden_states=True)
        pooled = out.pooler_output
        if self.project_pooled:
            pooled = self.model.text_projection(pooled)
        return out.hidden_states[-2], pooled


@dataclass
class T5Encoder:
    """A transformers T5EncoderModel with its SentencePiece tokenizer."""

    model: torch.nn.Module
    tokenizer: object

    @property
    def width(self) -> int:
        return self.model.config.d_model

    @torch.no_grad()
    def __call__(self, prompts: list[str], length: int) -> torch.Tensor:
        """-> (B, length, width) last hidden states, no attention mask."""
        device = next(self.model.parameters()).device
        ids = t5_token_ids(self.tokenizer, prompts, length).to(device)
        return self.model(ids).last_hidden_state


# ---------------------------------------------------------------------------------------------------------------
# Assembly


def assemble(layout: TextLayout, batch_size: int, clip_l=None, clip_g=None, t5=None, keep: dict | None = None,
             dtype: torch.dtype = torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The MM-DiT's conditioning from whichever encoder outputs are present.

    clip_l, clip_g: (tokens (B, clip_tokens, W), pooled (B, W)) or None; t5: (B, t5_tokens, context_dim) or None.
    keep: optional {encoder name: (B,) bool}; a False entry zeroes that sample's part, which is how training drops
    encoders. Returns context (B, clip_tokens + t5_tokens, context_dim) and pooled (B, clip_l_dim + clip_g_dim).
    """
    B, Lc, Lt = batch_size, layout.clip_tokens, layout.t5_tokens

    def part(name, value, shape):
        if value is None:
            return torch.zeros(shape, dtype=dtype, device=device)
        if tuple(value.shape) != shape:
            raise ValueError(f"{name} output has shape {tuple(value.shape)}, expected {shape}")
        value = value.to(dtype=dtype, device=device)
        if keep is not None and name in keep:
            mask = keep[name].to(device).view(B, *([1] * (value.ndim - 1)))
            value = torch.where(mask, value, torch.zeros((), dtype=dtype, device=device))
        return value

    l_tokens, l_pooled = clip_l if clip_l is not None else (None, None)
    g_tokens, g_pooled = clip_g if clip_g is not None else (None, None)
    clip = torch.cat([part("clip_l", l_tokens, (B, Lc, layout.clip_l_dim)),
                      part("clip_g", g_tokens, (B, Lc, layout.clip_g_dim))], dim=-1)
    clip = F.pad(clip, (0, layout.context_dim - clip.shape[-1]))   # zero channels up to T5's width
    context = torch.cat([clip, part("t5", t5, (B, Lt, layout.context_dim))], dim=1)
    pooled = torch.cat([part("clip_l", l_pooled, (B, layout.clip_l_dim)),
                        part("clip_g", g_pooled, (B, layout.clip_g_dim))], dim=-1)
    return context, pooled


def sample_keep(batch_size: int, drop_prob: dict[str, float], generator: torch.Generator | None = None,
                device=None) -> dict[str, torch.Tensor]:
    """Independent per-encoder dropout (the SD3 paper drops each encoder with p = 0.463): {name: (B,) bool}."""
    return {name: torch.rand(batch_size, generator=generator, device=device) >= p for name, p in drop_prob.items()}


@dataclass
class TextEncoders:
    """The encoders a model has (any may be None) and the layout that combines them."""

    layout: TextLayout
    clip_l: ClipEncoder | None = None
    clip_g: ClipEncoder | None = None
    t5: T5Encoder | None = None

    def encode(self, prompts: list[str]) -> dict[str, object]:
        """Each present encoder's raw outputs for the prompts: {name: output or None}."""
        n = self.layout.clip_tokens
        return {
            "clip_l": self.clip_l(prompts, n) if self.clip_l else None,
            "clip_g": self.clip_g(prompts, n) if self.clip_g else None,
            "t5": self.t5(prompts, self.layout.t5_tokens) if self.t5 else None,
        }

    def conditioning(self, prompts: list[str], dtype: torch.dtype = torch.float32, device=None):
        """(context, pooled) for the prompts, absent encoders as zeros."""
        return assemble(self.layout, len(prompts), **self.encode(prompts), dtype=dtype, device=device)

    def to(self, device) -> "TextEncoders":
        """Every present encoder moved to device (the one way sampling, precompute and training move them)."""
        for encoder in (self.clip_l, self.clip_g, self.t5):
            if encoder is not None:
                encoder.model.to(device)
        return self


def encoders_with_layout(clip_l: ClipEncoder, clip_g: ClipEncoder, t5: T5Encoder | None, *, t5_tokens: int,
                         clip_tokens: int = 77, context_dim: int | None = None) -> TextEncoders:
    """The encoders with the layout their widths imply: the context is T5's width, or, without T5, context_dim
    (the transformer's, so its zeros fit) or SD3's 4096. The one place a loaded model's TextLayout is built."""
    width = t5.width if t5 else context_dim or TextLayout().context_dim
    layout = TextLayout(clip_l_dim=clip_l.width, clip_g_dim=clip_g.width, context_dim=width, t5_tokens=t5_tokens,
                        clip_tokens=clip_tokens)
    return TextEncoders(layout, clip_l, clip_g, t5)


# ---------------------------------------------------------------------------------------------------------------
# Loading. Hub ids work where the libraries can reach the hub: from_pretrained does that; nothing here downloads.


def t5_dtype(dtype: torch.dtype) -> torch.dtype:
    """T5-XXL overflows in fp16: it runs in bf16 when fp16 is asked for (outputs are cast back in assemble)."""
    return torch.bfloat16 if dtype == torch.float16 else dtype


def clip_tokenizer_from_open_clip():
    """transformers' CLIPTokenizer built from the BPE merges that ship inside open_clip: OpenAI's CLIP vocabulary
    (the one SD3's CLIP-L and CLIP-G share), so no tokenizer download is needed."""
    import gzip
    import importlib.util
    from pathlib import Path

    from transformers import CLIPTokenizer

    spec = importlib.util.find_spec("open_clip")  # located, not imported: importing it pulls in torchvision
    if spec is None:
        raise RuntimeError("open_clip is not installed; it ships the CLIP vocabulary (pip install open_clip_torch)")
    bpe = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1: 49152 - 256 - 2 + 1]
    byte_chars = _bytes_to_unicode()
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, merges=[tuple(m.split()) for m in merges],
                         pad_token="<|endoftext|>")


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable character table, in vocabulary order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _count_blocks(state, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def _load_strict(model: torch.nn.Module, state: dict, what: str):
    """load_state_dict(strict=True) with a one-line error."""
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"{what} weights do not fit: {len(missing)} missing (e.g. {missing[:1]}), "
                         f"{len(extra)} unexpected (e.g. {extra[:1]})")
    wrong = [k for k in state if state[k].shape != expected[k].shape]
    if wrong:
        raise ValueError(f"{what} weight {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, "
                         f"expected {tuple(expected[wrong[0]].shape)}")
    model.load_state_dict(state, strict=True)


def clip_from_state(state: dict, role: str, tokenizer, dtype: torch.dtype = torch.float32) -> ClipEncoder:
    """A CLIP text tower from transformers-layout tensors (Stability's clip_l / clip_g files, or the
    text_encoders.clip_*.transformer.* part of an all-in-one file). The architecture comes from the shapes; the
    activation from the role (CLIP-L: quick_gelu, CLIP-G: gelu); heads are 64 wide, as in both released towers."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    if "text_model.embeddings.token_embedding.weight" not in state:
        raise ValueError(f"no {role} text tower in these weights (text_model.* keys expected)")
    vocab, width = state["text_model.embeddings.token_embedding.weight"].shape
    if "text_projection.weight" not in state:
        if role == "clip_g":
            raise ValueError("the CLIP-G weights lack text_projection.weight, which SD3's pooled output needs")
        state["text_projection.weight"] = torch.eye(width)  # never applied: CLIP-L's pooled output is unprojected
    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, num_attention_heads=max(1, width // 64),
        intermediate_size=state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count_blocks(state, "text_model.encoder.layers."),
        max_position_embeddings=state["text_model.embeddings.position_embedding.weight"].shape[0],
        hidden_act="quick_gelu" if role == "clip_l" else "gelu",
        projection_dim=state["text_projection.weight"].shape[0],
        bos_token_id=CLIP_BOS, eos_token_id=CLIP_EOS, pad_token_id=CLIP_EOS if role == "clip_l" else 0)
    model = CLIPTextModelWithProjection(config)
    _load_strict(model, state, role.upper())
    return ClipEncoder(model.to(dtype).eval().requires_grad_(False), tokenizer,
                       pad_id=CLIP_EOS if role == "clip_l" else 0, project_pooled=role == "clip_g",
                       name=role.upper())


def open_clip_text_to_transformers(state: dict) -> dict:
    """An open_clip CLIP's text tower (token_embedding, transformer.resblocks.*, ln_final, text_projection) in
    transformers' CLIPTextModelWithProjection names, so CLIP-G can come from open_clip (e.g. ViT-bigG-14)."""
    out = {"text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
           "text_model.final_layer_norm.weight": state["ln_final.weight"],
           "text_model.final_layer_norm.bias": state["ln_final.bias"],
           "text_projection.weight": state["text_projection"].t().contiguous()}  # open_clip applies x @ P
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
    for key, value in state.items():
        key = key.replace(".in_proj_weight", ".in_proj.weight").replace(".in_proj_bias", ".in_proj.bias")
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        if not m:
            continue
        layer, name, kind = m.groups()
        prefix = f"text_model.encoder.layers.{layer}."
        if name == "attn.in_proj":  # fused q, k, v along the output rows
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{prefix}self_attn.{part}.{kind}"] = chunk.contiguous()
        elif name in names:
            out[f"{prefix}{names[name]}.{kind}"] = value
    return out


def t5_from_state(state: dict, tokenizer, dtype: torch.dtype = torch.float32) -> T5Encoder:
    """A T5 v1.1 encoder from transformers-layout tensors (Stability's t5xxl file or text_encoders.t5xxl.*)."""
    from transformers import T5Config, T5EncoderModel

    embed = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
    if embed is None:
        raise ValueError("no T5 encoder in these weights (shared.weight or encoder.embed_tokens.weight expected)")
    state = {**state, "shared.weight": embed, "encoder.embed_tokens.weight": embed}
    buckets, heads = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    config = T5Config(
        vocab_size=embed.shape[0], d_model=embed.shape[1], num_heads=heads,
        d_kv=state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
        d_ff=state["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
        num_layers=_count_blocks(state, "encoder.block."), relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    model = T5EncoderModel(config)
    _load_strict(model, state, "T5")
    return T5Encoder(model.to(t5_dtype(dtype)).eval().requires_grad_(False), tokenizer)


def tokenizer_max_length(folder, default: int = 77) -> int:
    """min(default, the tokenizer's declared model_max_length): a released SD3's CLIP tokenizers say 77 and its T5
    tokenizer 512, so they get 77 (Stability's reference length); a small model that declares fewer tokens (the
    toy world) is padded to its own length, as diffusers pads CLIP to tokenizer.model_max_length."""
    import json
    from pathlib import Path

    config = Path(folder) / "tokenizer_config.json"
    declared = json.loads(config.read_text()).get("model_max_length") if config.is_file() else None
    return min(default, int(declared)) if isinstance(declared, (int, float)) and declared > 0 else default


def load_diffusers_text_encoders(path, *, no_t5: bool = False, dtype: torch.dtype = torch.float32,
                                 t5_tokens: int | None = None, context_dim: int | None = None,
                                 allow_pickle: bool = False) -> TextEncoders:
    """The encoders of a diffusers SD3 pipeline directory (text_encoder*, tokenizer*). With no_t5, T5's weights
    are never read; context_dim (the transformer's) then sets the width of its zeros. t5_tokens None: 77, or
    tokenizer_3's model_max_length when shorter (tokenizer_max_length); CLIP likewise from tokenizer/."""
    from pathlib import Path

    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

    path = Path(path)

    def clip(sub, tok, role):
        model = CLIPTextModelWithProjection.from_pretrained(path / sub, dtype=dtype,
                                                            use_safetensors=not allow_pickle or None)
        model = model.eval().requires_grad_(False)
        return ClipEncoder(model, CLIPTokenizer.from_pretrained(path / tok), pad_id=CLIP_EOS if role == "clip_l"
                           else 0, project_pooled=role == "clip_g", name=role.upper())

    clip_l, clip_g = clip("text_encoder", "tokenizer", "clip_l"), clip("text_encoder_2", "tokenizer_2", "clip_g")
    t5 = None
    if not no_t5:
        if not (path / "text_encoder_3").is_dir():
            raise ValueError(f"{path} has no T5 encoder (text_encoder_3); run with --no-t5 to use zeros for it")
        model = T5EncoderModel.from_pretrained(path / "text_encoder_3", dtype=t5_dtype(dtype),
                                               use_safetensors=not allow_pickle or None)
        t5 = T5Encoder(model.eval().requires_grad_(False), AutoTokenizer.from_pretrained(path / "tokenizer_3"))
    return encoders_with_layout(clip_l, clip_g, t5, t5_tokens=t5_tokens or tokenizer_max_length(path / "tokenizer_3"),
                                clip_tokens=tokenizer_max_length(path / "tokenizer"), context_dim=context_dim)
