"""The toy world's text towers, trained once on its images: CLIP-L-, CLIP-G- and T5-architecture encoders whose
states say what a prompt says, as SD3's real encoders (trained on web-scale data) do.

Random towers blur prompts together (pooled CLIP of "a red circle" and "a blue circle" are nearly the same vector),
and an MM-DiT cannot learn what its text does not carry. Here each tower is trained contrastively against a small
image encoder on the toy world's training pictures (CLIP's symmetric InfoNCE over the batch), with a hard negative
per picture: its caption changed in one attribute (another colour, count or shape, the two colours swapped, the
relation's objects swapped), so that a bag of words cannot win and the states must bind colours to shapes and
keep word order. CLIP towers are pooled as SD3 pools them (CLIP-L: the final-norm end token, unprojected; CLIP-G:
the same through text_projection); T5 by the mean of its states, which is also what the MM-DiT attends over. Held-out
combinations are never shown, not even as negatives.

The alignment encoder (train_feature_encoder; REPA's targets, mmdit.align) is trained the same way afterwards, on
the world's latents against the frozen towers, so its features at each latent position say what is drawn there in
the towers' terms.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmdit.text import CLIP_EOS, clip_token_ids, t5_token_ids
from mmdit.toy import world

EMBED = 128


class ImageEncoder(nn.Module):
    """64x64 pictures -> EMBED: four stride-2 convolutions and a linear head (discarded after training)."""

    def __init__(self, width: int = 32):
        super().__init__()
        layers, channels = [], 3
        for out in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels * 16, EMBED)

    def forward(self, images: torch.Tensor) -> torch.Tensor:   # (B, 3, 64, 64) in [-1, 1]
        x = F.adaptive_avg_pool2d(self.features(images), 4)
        return self.head(x.flatten(1))


def tower_outputs(components: dict, ids: dict) -> dict[str, torch.Tensor]:
    """Each tower's pooled vector, computed as mmdit.text computes what the MM-DiT sees."""
    clip_l, clip_g, t5 = components["text_encoder"], components["text_encoder_2"], components["text_encoder_3"]
    out_l = clip_l.text_model(ids["clip_l"], output_hidden_states=True)
    out_g = clip_g.text_model(ids["clip_g"], output_hidden_states=True)
    states = t5(ids["t5"]).last_hidden_state
    # The token states the MM-DiT reads (penultimate CLIP layers) feed the pooled vectors through the last layer.
    return {"clip_l": out_l.pooler_output, "clip_g": clip_g.text_projection(out_g.pooler_output),
            "t5": states.mean(1)}


def token_ids(components: dict, captions: list[str], clip_tokens: int, t5_tokens: int) -> dict[str, torch.Tensor]:
    return {"clip_l": clip_token_ids(components["tokenizer"], captions, CLIP_EOS, clip_tokens, "CLIP_L"),
            "clip_g": clip_token_ids(components["tokenizer_2"], captions, 0, clip_tokens, "CLIP_G"),
            "t5": t5_token_ids(components["tokenizer_3"], captions, t5_tokens)}


def tower_heads(components: dict) -> nn.ModuleDict:
    """A linear head per tower from its pooled width to the shared EMBED space (trained, then discarded)."""
    widths = {"clip_l": components["text_encoder"].config.hidden_size,
              "clip_g": components["text_encoder_2"].config.projection_dim,
              "t5": components["text_encoder_3"].config.d_model}
    return nn.ModuleDict({name: nn.Linear(w, EMBED) for name, w in widths.items()})


def captions_with_near_misses(captions: list[str], metadata: list[dict], index, rng) -> list[str]:
    """The batch's captions, then one near miss per picture (world.near_miss; another scene's caption when none)."""
    negatives = [world.caption_of(world.near_miss(metadata[i], rng) or metadata[rng.integers(len(metadata))])
                 for i in index]
    return [captions[i] for i in index] + negatives


def contrastive_losses(picture: torch.Tensor, pooled: dict, heads: nn.ModuleDict, scale) -> dict:
    """CLIP's symmetric InfoNCE per tower, each picture (B, EMBED, normalised) against the batch's captions and near
    misses (pooled: (2B, width) per tower), each caption against the pictures."""
    batch_size = len(picture)
    labels = torch.arange(batch_size)
    losses = {}
    for name, vectors in pooled.items():
        text = F.normalize(heads[name](vectors), dim=-1)
        logits = scale * picture @ text.T      # (B, 2B): captions and near misses
        losses[name] = (F.cross_entropy(logits, labels)
                        + F.cross_entropy(scale * text[:batch_size] @ picture.T, labels)) / 2
    return losses


def train_towers(components: dict, images: np.ndarray, metadata: list[dict], steps: int, *, clip_tokens: int,
                 t5_tokens: int, batch_size: int = 128, lr: float = 1e-3, seed: int = 0, progress=None) -> dict:
    """Train the three text towers of components (StableDiffusion3Pipeline's keyword names) in place against
    images ((N, H, W, 3) uint8) and their scenes' GenEval metadata; returns the final losses per tower. CLIP-L's
    projection stays the identity (SD3 uses its pooled output unprojected)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    towers = {"clip_l": components["text_encoder"], "clip_g": components["text_encoder_2"],
              "t5": components["text_encoder_3"]}
    heads = tower_heads(components)
    image_encoder = ImageEncoder()
    log_scale = nn.Parameter(torch.tensor(np.log(10.0), dtype=torch.float32))
    towers["clip_l"].text_projection.requires_grad_(False)
    params = [p for t in towers.values() for p in t.parameters() if p.requires_grad]
    params += list(heads.parameters()) + list(image_encoder.parameters()) + [log_scale]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)
    for t in towers.values():
        t.train()
    data = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2)
    captions = [world.caption_of(m) for m in metadata]
    losses = {}
    for step in range(steps):
        index = rng.integers(0, len(data), batch_size)
        x = data[index].float() / 127.5 - 1
        ids = token_ids(components, captions_with_near_misses(captions, metadata, index, rng), clip_tokens, t5_tokens)
        pooled = tower_outputs(components, ids)
        picture = F.normalize(image_encoder(x), dim=-1)
        per_tower = contrastive_losses(picture, pooled, heads, log_scale.exp().clamp(max=100))
        losses = {name: loss.item() for name, loss in per_tower.items()}
        optimizer.zero_grad(set_to_none=True)
        sum(per_tower.values()).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if progress:
            progress(step, losses)
    for t in towers.values():
        t.eval().requires_grad_(False)
    return losses


def train_feature_encoder(components: dict, latents: torch.Tensor, metadata: list[dict], steps: int, *,
                          clip_tokens: int, t5_tokens: int, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
                          progress=None):
    """The alignment encoder (mmdit.align.FeatureEncoder) for REPA targets: trained on the world's normalised
    latents (N, 16, H, W) contrastively against the *frozen*, already trained towers' pooled vectors, with the same
    near-miss captions as hard negatives, so that its per-position features say which shape of which colour lies
    where. A pooled head (discarded) meets each tower's through a linear head of its own. Returns (encoder,
    final loss)."""
    from mmdit.align import FeatureEncoder

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    encoder = FeatureEncoder(latents.shape[1])
    dim = encoder.config["dim"]
    pool = nn.Sequential(nn.GroupNorm(8, dim), nn.SiLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Linear(dim * 16, EMBED))
    heads = tower_heads(components)
    log_scale = nn.Parameter(torch.tensor(np.log(10.0), dtype=torch.float32))
    params = list(encoder.parameters()) + list(pool.parameters()) + list(heads.parameters()) + [log_scale]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)
    captions = [world.caption_of(m) for m in metadata]
    loss = torch.tensor(0.0)
    for step in range(steps):
        index = rng.integers(0, len(latents), batch_size)
        ids = token_ids(components, captions_with_near_misses(captions, metadata, index, rng), clip_tokens, t5_tokens)
        with torch.no_grad():
            pooled = tower_outputs(components, ids)
        picture = F.normalize(pool(encoder(latents[index].float())), dim=-1)
        loss = sum(contrastive_losses(picture, pooled, heads, log_scale.exp().clamp(max=100)).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if progress:
            progress(step, {"loss": loss.item()})
    return encoder.eval().requires_grad_(False), loss.item()
