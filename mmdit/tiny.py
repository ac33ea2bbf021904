"""Tiny SD3 pipelines in the real formats, built offline: the stand-ins that tests (and the toy world) load through
exactly the code that loads released models.

Real architectures at toy widths: CLIP-L- and CLIP-G-architecture text towers with the real CLIP vocabulary and
tokenizer (from open_clip's bundled BPE merges), a T5 v1.1 encoder with a SentencePiece tokenizer trained here on a
small caption corpus, a 16-channel AutoencoderKL with SD3's latent factors, an MM-DiT, and the flow scheduler with
shift 3.0, saved as a diffusers StableDiffusion3Pipeline directory. The toy world's pipeline (save_toy_pipeline)
is built the same way with a VAE trained on the toy images, 32-wide CLIP towers, tokenizers that declare 12
tokens, a BPE T5 tokenizer trained on the toy captions, the "toy" MM-DiT preset and shift 1.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import torch

from mmdit.checkpoint import diffusers_config, to_diffusers
from mmdit.config import MMDiTConfig
from mmdit.model import MMDiT
from mmdit.text import CLIP_BOS, CLIP_EOS, clip_tokenizer_from_open_clip
from mmdit.vae import SD3_SCALING_FACTOR, SD3_SHIFT_FACTOR

# Widths: CLIP-L + CLIP-G (64 + 128) < T5 (256), so the zero padding of the CLIP channels is exercised.
CLIP_L_WIDTH, CLIP_G_WIDTH, T5_WIDTH = 64, 128, 256


def caption_corpus() -> list[str]:
    """Captions phrased like GenEval's prompts, plus a few free sentences: the T5 tokenizer's training text."""
    colors = "red green blue yellow purple orange pink brown black white gray".split()
    shapes = "circle square triangle star hexagon".split()
    counts = "one two three four".split()
    relations = ["left of", "right of", "above", "below"]
    corpus = [f"a photo of a {c} {s}" for c in colors for s in shapes]
    corpus += [f"a photo of {n} {c} {s}s" for n in counts for c in colors for s in shapes]
    corpus += [f"a photo of a {c} {s} {r} a {c2} {s2}"
               for c, s, c2, s2, r in itertools.product(colors[:4], shapes, colors[4:8], shapes, relations)]
    corpus += ["a photo of a cat and a dog", "an astronaut riding a horse on the moon, highly detailed",
               "The quick brown fox jumps over the lazy dog."]
    return corpus


def train_t5_tokenizer(corpus: list[str], vocab_size: int = 200, model_type: str = "unigram"):
    """A transformers T5Tokenizer over a SentencePiece model trained on corpus (pad 0, EOS 1, unk 2). T5's own is a
    unigram model; on a corpus of few distinct sentences (the toy world's) unigram seeding stalls at characters,
    so the toy uses BPE pieces, which the T5 tokenizer segments the same way (highest-scoring pieces)."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size,
                                   hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   model_type=model_type, minloglevel=2, num_threads=1)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    return T5Tokenizer(vocab=vocab, extra_ids=0, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def _randomize(module: torch.nn.Module, std: float, generator: torch.Generator):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)


def tiny_components(seed: int = 0, qk_norm: bool = True, x_self_attn_layers=(0,), corpus: list[str] | None = None,
                    clip_tokens: int = 77, t5_tokens: int | None = None, vae=None,
                    mmdit_config: MMDiTConfig | None = None,
                    clip_widths: tuple[int, int] = (CLIP_L_WIDTH, CLIP_G_WIDTH), shift: float = 3.0) -> dict:
    """Random tiny components, keyed as StableDiffusion3Pipeline's constructor arguments. corpus: the T5
    tokenizer's training text; clip_tokens / t5_tokens: the lengths the tokenizers declare (model_max_length);
    vae: a trained AutoencoderKL instead of a random one; mmdit_config: the transformer's shape; clip_widths:
    CLIP-L's and CLIP-G's; shift: the scheduler's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    g = torch.Generator().manual_seed(seed)

    def clip(width, act, pad_id):
        config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width,
                                num_hidden_layers=2, num_attention_heads=max(1, width // 64),
                                max_position_embeddings=clip_tokens,
                                hidden_act=act, projection_dim=width, bos_token_id=CLIP_BOS,
                                eos_token_id=CLIP_EOS, pad_token_id=pad_id)
        model = CLIPTextModelWithProjection(config).eval()
        _randomize(model, 0.05, g)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "layer_norm" in name and name.endswith("weight"):
                    p.add_(1.0)
        return model

    clip_l = clip(clip_widths[0], "quick_gelu", CLIP_EOS)
    with torch.no_grad():  # SD3's CLIP-L projection is the identity
        clip_l.text_projection.weight.copy_(torch.eye(clip_widths[0]))
    clip_g = clip(clip_widths[1], "gelu", 0)

    t5_tokenizer = (train_t5_tokenizer(corpus, vocab_size=120, model_type="bpe") if corpus
                    else train_t5_tokenizer(caption_corpus()))
    if t5_tokens is not None:
        t5_tokenizer.model_max_length = t5_tokens
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=T5_WIDTH, d_kv=32, num_heads=4, d_ff=256,
                                 num_layers=2, relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
                                 is_encoder_decoder=False, use_cache=False)).eval()
    _randomize(t5, 0.05, g)
    with torch.no_grad():
        for name, p in t5.named_parameters():
            if "layer_norm" in name:
                p.fill_(1.0)
        # Token embeddings 20x the other weights, so each state stays mostly its own token, as a trained T5's do:
        # at 0.05 the two random layers mixed every token with its context (the toy T5's state of "red" in "a red
        # circle" vs "a red triangle": cosine 0.76), and a toy MM-DiT learnt the trained colour-shape pairs but
        # never composed the held-out ones. At 1.0 that cosine is 0.94, and in 6000 steps seen colour prompts went
        # 0.41 -> 0.66.
        t5.shared.weight.copy_(torch.randn(t5.shared.weight.shape, generator=g))

    tokenizer_l = clip_tokenizer_from_open_clip()
    tokenizer_g = clip_tokenizer_from_open_clip()
    tokenizer_g.pad_token = "!"  # CLIP-G pads with id 0
    for tok in (tokenizer_l, tokenizer_g):
        tok.model_max_length = clip_tokens

    if vae is None:
        vae = random_vae(g)
    mmdit = MMDiT(mmdit_config or MMDiTConfig(depth=2, num_heads=2, head_dim=16, context_dim=T5_WIDTH,
                                              pooled_dim=CLIP_L_WIDTH + CLIP_G_WIDTH, pos_embed_max_size=32,
                                              qk_norm=qk_norm, x_self_attn_layers=tuple(x_self_attn_layers)))
    _randomize(mmdit, 0.05, g)
    config = {k: v for k, v in diffusers_config(mmdit.config).items() if not k.startswith("_")}
    transformer = SD3Transformer2DModel.from_config(config)
    transformer.load_state_dict(to_diffusers(mmdit.state_dict(), mmdit.config), strict=True)

    return dict(transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=vae,
                text_encoder=clip_l, tokenizer=tokenizer_l, text_encoder_2=clip_g, tokenizer_2=tokenizer_g,
                text_encoder_3=t5, tokenizer_3=t5_tokenizer)


def random_vae(generator: torch.Generator):
    """A 16-channel AutoencoderKL with SD3's factors and 4 levels (8x down), random weights."""
    from diffusers import AutoencoderKL

    g = generator
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32),
                        layers_per_block=1, latent_channels=16, norm_num_groups=32, use_quant_conv=False,
                        use_post_quant_conv=False, scaling_factor=SD3_SCALING_FACTOR,
                        shift_factor=SD3_SHIFT_FACTOR, sample_size=64).eval()
    _randomize(vae, 0.05, g)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    return vae


def save_tiny_pipeline(path, seed: int = 0, **kwargs) -> Path:
    """Write a tiny random SD3 pipeline as a diffusers directory that StableDiffusion3Pipeline loads."""
    from diffusers import StableDiffusion3Pipeline

    path = Path(path)
    StableDiffusion3Pipeline(**tiny_components(seed, **kwargs)).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# The toy world's components: a VAE trained on its images, and its tokenizers' lengths


def toy_vae(side: int = 64):
    """SD3's VAE design (16 latent channels, 4 levels: 8x down) at toy widths, before training; side: the image
    size it is made for (its config's sample_size, the pipeline's default size)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 64, 64),
                         layers_per_block=1, latent_channels=16, norm_num_groups=16, use_quant_conv=False,
                         use_post_quant_conv=False, scaling_factor=1.0, shift_factor=0.0, sample_size=side,
                         mid_block_add_attention=False)


def latent_cuts(n: int, side: int, rng) -> torch.Tensor:
    """(n, 1, side, side) masks on a latent grid, each keeping one side of a random horizontal or vertical cut."""
    masks = torch.zeros(n, 1, side, side)
    for i in range(n):
        k = int(rng.integers(1, side))
        if rng.random() < 0.5:
            masks[i, :, :, :k] = 1
        else:
            masks[i, :, :k, :] = 1
        if rng.random() < 0.5:
            masks[i] = 1 - masks[i]
    return masks


def train_vae(vae, images, steps: int, batch_size: int = 8, lr: float = 2e-3, kl_weight: float = 1e-6,
              object_weight: float = 20.0, locality_weight: float = 0.1, compute_dtype: torch.dtype | None = None,
              seed: int = 0, progress=None):
    """Reconstruction (L1 + L2, objects weighted up) plus a small KL, on whole images ((N, H, W, 3) uint8), with
    a locality term; compute_dtype: an autocast dtype (the caller's choice; master weights stay fp32).

    Locality: each step also decodes a spliced latent (one image's latent on one side of a random cut of the latent
    grid, another image's on the other) to the same splice of the two pictures, and encodes the spliced picture to
    the spliced latent. GroupNorm normalises over the whole picture, and toy pictures are mostly background, so
    without this the VAE learns a holistic code: one added shape moved every latent, and latents that a diffusion
    model assembles region by region decoded to texture all over the picture.

    Afterwards the latent factors are set from the data, as SD3's were: shift = mean and scaling = 1 / std of the
    posterior means."""
    import numpy as np

    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)
    B = batch_size
    vae.train()
    for step in range(steps):
        x = data[rng.integers(0, len(data), B)].float() / 127.5 - 1
        cut = latent_cuts(B, x.shape[-1] // factor, rng)
        spliced = _splice(x, cut.repeat_interleave(factor, -1).repeat_interleave(factor, -2))
        with torch.autocast(x.device.type, compute_dtype or torch.float32, enabled=compute_dtype is not None):
            posterior = vae.encode(torch.cat([x, spliced])).latent_dist
            z = posterior.mean   # the mean, as sampling uses it: sampling noise slows learning
            target_z = _splice(z[:B], cut)
            recon = vae.decode(torch.cat([z[:B], target_z])).sample.float()
        loss = _weighted_error(recon, torch.cat([x, spliced]), object_weight)
        loss = loss + kl_weight * posterior.kl().mean()
        loss = loss + locality_weight * ((z[B:].float() - target_z.float()) ** 2).mean() / (z[:B].detach().var() + 1e-6)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress:
            progress(step, loss.item())
    vae.eval()
    with torch.no_grad():
        sample = data[torch.randperm(len(data), generator=g)[:64]].float() / 127.5 - 1
        z = vae.encode(sample).latent_dist.mean
    vae.register_to_config(shift_factor=round(z.mean().item(), 4), scaling_factor=round(1 / z.std().item(), 4))
    return vae


def _splice(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mask-selected parts of each item, the rest from the previous item of the batch."""
    return mask * x + (1 - mask) * x.roll(1, 0)


def _weighted_error(recon: torch.Tensor, x: torch.Tensor, object_weight: float) -> torch.Tensor:
    """L1 + L2 with objects (and a rim around them) weighted up: they are a few percent of the pixels, and without
    the weight the loss is all background and the decoder stays at blurry blobs for a long time."""
    error = (recon - x).abs() + (recon - x) ** 2
    background = x.flatten(2).median(2).values[..., None, None]
    near = torch.nn.functional.max_pool2d(((x - background).abs().sum(1, keepdim=True) > 0.2).float(), 5, 1, 2)
    weight = 1 + object_weight * near
    return (error * weight).sum() / (weight.sum() * 3)


# The longest toy caption ("a photo of a purple triangle and a white circle") is 10 tokens for either tokenizer:
# 12 holds it with CLIP's BOS and EOS, and T5's EOS.
TOY_CLIP_WIDTHS, TOY_CLIP_TOKENS, TOY_T5_TOKENS = (32, 32), 12, 12
TOY_SHIFT = 1.0   # sampling shift: the paper's shift is 1 at 256^2 and grows with resolution; toy images are 64^2


def save_toy_pipeline(path, images, corpus: list[str], vae_steps: int, seed: int = 0,
                      compute_dtype: torch.dtype | None = None, progress=None) -> Path:
    """The toy world's SD3 pipeline, untrained MM-DiT: a VAE trained on images, frozen random CLIP-L / CLIP-G
    towers (width 32, the real CLIP tokenizer, 12 tokens) and T5 (a SentencePiece tokenizer trained on corpus,
    12 tokens), the "toy" MM-DiT preset; written as a diffusers StableDiffusion3Pipeline directory."""
    import numpy as np
    from diffusers import StableDiffusion3Pipeline

    from mmdit.config import model_preset

    torch.manual_seed(seed)
    vae = train_vae(toy_vae(np.asarray(images).shape[1]), images, vae_steps, seed=seed, compute_dtype=compute_dtype,
                    progress=progress)
    components = tiny_components(seed, corpus=corpus, clip_tokens=TOY_CLIP_TOKENS, t5_tokens=TOY_T5_TOKENS, vae=vae,
                                 mmdit_config=model_preset("toy"), clip_widths=TOY_CLIP_WIDTHS, shift=TOY_SHIFT)
    path = Path(path)
    StableDiffusion3Pipeline(**components).save_pretrained(path)
    for folder in ("tokenizer", "tokenizer_2"):
        slim_clip_tokenizer(path / folder)
    return path


def slim_clip_tokenizer(folder):
    """Store a CLIP tokenizer as vocab.json + merges.txt, the files the released SD3 repositories ship (1.4 MB),
    instead of transformers' tokenizer.json (3.6 MB); the ids are the same (tested). Does nothing when there is no
    tokenizer.json."""
    import json

    folder = Path(folder)
    fast = folder / "tokenizer.json"
    if not fast.is_file():
        return
    model = json.loads(fast.read_text())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False, separators=(",", ":")))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    fast.unlink()
