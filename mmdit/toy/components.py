"""The toy world's SD3 components: a 16-channel VAE trained on its images, small CLIP-L / CLIP-G / T5 towers
trained on its images and captions (mmdit.toy.towers), tokenizers sized to its prompts, the "toy" MM-DiT preset
(untrained) and its scheduler, saved as a diffusers StableDiffusion3Pipeline directory that every real loader reads.
They are built once (`data/make_toy.py world`) and shipped inside the bundled model; every toy recipe reuses them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmdit.testing import tiny_components
from mmdit.toy import TOY_SAMPLING


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
              seed: int = 0, progress=None, decoder_only: bool = False, worst_background_weight: float = 0.0):
    """Reconstruction (L1 + L2, objects weighted up) plus a small KL, on whole images ((N, H, W, 3) uint8), with
    a locality term; compute_dtype: an autocast dtype (the caller's choice; master weights stay fp32).

    Locality: each step also decodes a spliced latent (one image's latent on one side of a random cut of the latent
    grid, another image's on the other) to the same splice of the two pictures, and encodes the spliced picture to
    the spliced latent. GroupNorm normalises over the whole picture, and toy pictures are mostly background, so
    without this the VAE learns a holistic code: one added shape moved every latent, and latents that a diffusion
    model assembles region by region decoded to texture all over the picture.

    Afterwards the latent factors are set from the data, as SD3's were: shift = mean and scaling = 1 / std of the
    posterior means.

    decoder_only: the encoder (and so every latent, the factors and whatever was trained on them) stays as it is;
    only the decoder learns, from the same reconstruction and splice targets."""
    import numpy as np

    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    frozen = {p: p.requires_grad for p in vae.encoder.parameters()}   # handed back as they came
    vae.encoder.requires_grad_(not decoder_only)
    try:
        optimizer = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)
        B = batch_size
        vae.train()
        for step in range(steps):
            x = data[rng.integers(0, len(data), B)].float() / 127.5 - 1
            cut = latent_cuts(B, x.shape[-1] // factor, rng)
            spliced = _splice(x, cut.repeat_interleave(factor, -1).repeat_interleave(factor, -2))
            with torch.autocast(x.device.type, compute_dtype or torch.float32, enabled=compute_dtype is not None), \
                    torch.set_grad_enabled(not decoder_only):
                posterior = vae.encode(x if decoder_only else torch.cat([x, spliced])).latent_dist
                z = posterior.mean   # the mean, as sampling uses it: sampling noise slows learning
                target_z = _splice(z[:B], cut)
            with torch.autocast(x.device.type, compute_dtype or torch.float32, enabled=compute_dtype is not None):
                recon = vae.decode(torch.cat([z[:B], target_z])).sample.float()
            loss = _weighted_error(recon, torch.cat([x, spliced]), object_weight, worst_background_weight)
            if not decoder_only:
                loss = loss + kl_weight * posterior.kl().mean()
                spread = z[:B].detach().var() + 1e-6
                loss = loss + locality_weight * ((z[B:].float() - target_z.float()) ** 2).mean() / spread
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if progress:
                progress(step, loss.item())
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        vae.eval()
    if decoder_only:
        return vae
    with torch.no_grad():
        sample = data[torch.randperm(len(data), generator=g)[:64]].float() / 127.5 - 1
        z = vae.encode(sample).latent_dist.mean
    vae.register_to_config(shift_factor=round(z.mean().item(), 4), scaling_factor=round(1 / z.std().item(), 4))
    return vae


def _splice(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mask-selected parts of each item, the rest from the previous item of the batch."""
    return mask * x + (1 - mask) * x.roll(1, 0)


WORST_BACKGROUND_PIXELS = 16   # per picture: a mark of a few pixels, not the blurred rim of an object


def _weighted_error(recon: torch.Tensor, x: torch.Tensor, object_weight: float,
                    worst_background_weight: float = 0.0) -> torch.Tensor:
    """L1 + L2 with objects (and a rim around them) weighted up: they are a few percent of the pixels, and without
    the weight the loss is all background and the decoder stays at blurry blobs for a long time.

    worst_background_weight adds the mean of each picture's WORST_BACKGROUND_PIXELS largest errors away from any
    object: a mark a few pixels wide (the decoder drew one in the top-left corner of every picture) is too small a
    part of the mean for it to be trained away, and background pixels should all come back as they were."""
    error = (recon - x).abs() + (recon - x) ** 2
    background = x.flatten(2).median(2).values[..., None, None]
    near = torch.nn.functional.max_pool2d(((x - background).abs().sum(1, keepdim=True) > 0.2).float(), 5, 1, 2)
    weight = 1 + object_weight * near
    loss = (error * weight).sum() / (weight.sum() * 3)
    if worst_background_weight:
        away = (error.sum(1) * (1 - near[:, 0])).flatten(1)
        worst = away.topk(min(WORST_BACKGROUND_PIXELS, away.shape[1]), dim=1).values
        loss = loss + worst_background_weight * worst.mean() / 3
    return loss


# The decoder's second phase (train_vae with decoder_only): the first phase weights objects up, or the decoder stays
# at blurry blobs; left there, it decodes backgrounds with a dark top-left mark and tinted halos. A second phase on
# every training image, objects weighted far less, removes the halos and leaves the latents as they were; the
# worst-background term removes the mark, which is too few pixels for the mean error to see.
DECODER_PHASE = {"lr": 1e-3, "object_weight": 5.0, "worst_background_weight": 1.0}


def mend_decoder(vae, images, steps: int, seed: int = 0, compute_dtype: torch.dtype | None = None, progress=None):
    """The decoder's second phase on images ((N, H, W, 3) uint8): the encoder, the latents and their factors stay."""
    return train_vae(vae, images, steps, seed=seed, compute_dtype=compute_dtype, progress=progress,
                     decoder_only=True, **DECODER_PHASE)


# The longest toy prompt ("a photo of a red circle left of a blue square", the README's) is 11 tokens for either
# tokenizer: CLIP needs 13 with its BOS and EOS, T5 12 with its EOS. Every text token costs the MM-DiT as much as
# an image token, so no more.
TOY_CLIP_WIDTHS, TOY_CLIP_TOKENS, TOY_T5_TOKENS = (32, 32), 13, 12
ALIGN_ENCODER = "align_encoder"   # the alignment encoder's folder inside a toy pipeline (diffusers ignores it)
TOY_SHIFT = 1.0   # sampling shift: the paper's shift is 1 at 256^2 and grows with resolution; toy images are 64^2


def save_toy_pipeline(path, images, metadata: list[dict], corpus: list[str], vae_steps: int, tower_steps: int,
                      vae_images: int | None = None, seed: int = 0, compute_dtype: torch.dtype | None = None,
                      progress=None, decoder_steps: int = 0, align_steps: int = 0) -> Path:
    """The toy world's SD3 pipeline, untrained MM-DiT: a VAE trained on the first vae_images of images ((N, H, W,
    3) uint8), then its decoder alone on all of them for decoder_steps (mend_decoder); CLIP-L / CLIP-G
    towers (width 32, the real CLIP tokenizer) and T5 (a SentencePiece tokenizer trained on corpus) trained against
    the images and their scenes' metadata (mmdit.toy.towers); the "toy" MM-DiT preset; written as a diffusers
    StableDiffusion3Pipeline directory; then, for align_steps, the alignment encoder against those towers
    (ALIGN_ENCODER inside it). progress(stage, step, losses)."""
    import numpy as np
    from diffusers import StableDiffusion3Pipeline

    from mmdit.config import SAMPLING_DEFAULTS_FILE, model_preset
    from mmdit.toy.towers import train_towers

    torch.manual_seed(seed)
    vae = train_vae(toy_vae(np.asarray(images).shape[1]), images[:vae_images], vae_steps, seed=seed,
                    compute_dtype=compute_dtype,
                    progress=(lambda step, loss: progress("vae", step, {"loss": loss})) if progress else None)
    if decoder_steps:
        mend_decoder(vae, images, decoder_steps, seed=seed + 1, compute_dtype=compute_dtype,
                     progress=(lambda step, loss: progress("decoder", step, {"loss": loss})) if progress else None)
    components = tiny_components(seed, corpus=corpus, clip_tokens=TOY_CLIP_TOKENS, t5_tokens=TOY_T5_TOKENS, vae=vae,
                                 mmdit_config=model_preset("toy"), clip_widths=TOY_CLIP_WIDTHS, shift=TOY_SHIFT)
    if tower_steps:
        train_towers(components, images, metadata, tower_steps, clip_tokens=TOY_CLIP_TOKENS, t5_tokens=TOY_T5_TOKENS,
                     seed=seed, progress=(lambda step, losses: progress("towers", step, losses)) if progress else None)
    path = Path(path)
    StableDiffusion3Pipeline(**components).save_pretrained(path)
    for folder in ("tokenizer", "tokenizer_2"):
        slim_clip_tokenizer(path / folder)
    (path / SAMPLING_DEFAULTS_FILE).write_text(json.dumps(TOY_SAMPLING) + "\n")   # copied into every export
    if align_steps:
        save_align_encoder(path, components, images, metadata, align_steps, seed=seed + 2,
                           progress=(lambda step, losses: progress("align", step, losses)) if progress else None)
    return path


def save_align_encoder(path, components: dict, images, metadata: list[dict], steps: int, seed: int = 2,
                       progress=None) -> Path:
    """The alignment encoder for REPA (mmdit.align, configs/toy.yaml's align section), trained on the normalised
    latents of images ((N, H, W, 3) uint8) as components' VAE encodes them, against components' frozen towers
    (mmdit.toy.towers.train_feature_encoder); written to path/ALIGN_ENCODER."""
    import numpy as np

    from mmdit.align import save_encoder
    from mmdit.toy.towers import train_feature_encoder
    from mmdit.vae import VAE

    vae = VAE(components["vae"])
    pixels = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2)
    latents = torch.cat([vae.encode(pixels[i:i + 256].float() / 127.5 - 1) for i in range(0, len(pixels), 256)])
    encoder, _ = train_feature_encoder(components, latents.float(), metadata, steps, clip_tokens=TOY_CLIP_TOKENS,
                                       t5_tokens=TOY_T5_TOKENS, seed=seed, progress=progress)
    return save_encoder(encoder, Path(path) / ALIGN_ENCODER)


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
