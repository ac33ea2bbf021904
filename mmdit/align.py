"""Representation alignment (REPA, Yu et al. 2024, "Representation Alignment for Generation"): while the MM-DiT
learns to denoise, one joint block's image-token states are pulled, through a small MLP projector, toward a frozen
encoder's features of the *clean* latent at the same positions (negative cosine similarity). A diffusion model
otherwise has to discover what is where from its noisy input on its own, which is slow; REPA hands it a target that
already says so. Training only: the projector is dropped at export, the MM-DiT keeps its SD3 weights and keys.

The encoder reads latents (the shards hold precomputed latents, not pixels), so its targets cost one small forward
per step and nothing in the shards. Its weights are a folder: config.json (FeatureEncoder's arguments) and
model.safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ENCODER_CONFIG, ENCODER_WEIGHTS = "config.json", "model.safetensors"


class FeatureEncoder(nn.Module):
    """Normalised latents (B, C, H, W) -> per-position features (B, dim, H, W): three 3x3 convolutions."""

    def __init__(self, latent_channels: int = 16, width: int = 128, dim: int = 128):
        super().__init__()
        self.config = {"latent_channels": latent_channels, "width": width, "dim": dim}
        self.layers = nn.Sequential(nn.Conv2d(latent_channels, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
                                    nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
                                    nn.Conv2d(width, dim, 3, padding=1))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.layers(latents)


def save_encoder(encoder: FeatureEncoder, folder) -> Path:
    from mmdit.checkpoint import atomic_save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_file(folder / ENCODER_WEIGHTS, {k: v.detach().float().contiguous()
                                                for k, v in encoder.state_dict().items()}, {"format": "pt"})
    (folder / ENCODER_CONFIG).write_text(json.dumps(encoder.config) + "\n")
    return folder


def load_encoder(folder) -> FeatureEncoder:
    """A frozen FeatureEncoder from folder (safetensors only); one-line errors for a missing or mismatched one."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / ENCODER_CONFIG).is_file() or not (folder / ENCODER_WEIGHTS).is_file():
        raise FileNotFoundError(f"alignment encoder {folder}: expected a folder with {ENCODER_CONFIG} and "
                                f"{ENCODER_WEIGHTS}")
    config = json.loads((folder / ENCODER_CONFIG).read_text())
    try:
        encoder = FeatureEncoder(**config)
        encoder.load_state_dict(load_file(folder / ENCODER_WEIGHTS), strict=True)
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"alignment encoder {folder}: weights do not match its config.json "
                         f"({str(e).splitlines()[0]})") from None
    return encoder.eval().requires_grad_(False)


class Projector(nn.Module):
    """A block's image-token states (B, L, hidden) -> the encoder's feature space (B, L, dim): REPA's 3-layer MLP."""

    def __init__(self, hidden: int, dim: int, width: int = 512):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(hidden, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                    nn.Linear(width, dim))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.layers(states)


def feature_tokens(features: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, dim, H, W) -> (B, (H/p)(W/p), dim) in the MM-DiT's token order (row-major patches), each patch's mean."""
    if patch_size > 1:
        features = F.avg_pool2d(features, patch_size)
    return features.flatten(2).transpose(1, 2)


def alignment_loss(projected: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative cosine similarity per token, averaged: -1 when every projected state points along its target."""
    return -F.cosine_similarity(projected.float(), targets.float(), dim=-1).mean()


class BlockOutput:
    """Keeps the image-token output of one of the model's joint blocks from the first forward after arm() (a
    forward hook, so the model's code and weights stay as they are). Armed, so that other passes (validation, or
    activation checkpointing's recompute during backward, which would hold the block's graph past the step) are
    not kept."""

    def __init__(self, model: nn.Module, index: int):
        blocks = model.joint_blocks
        if not 0 <= index < len(blocks):
            raise ValueError(f"align.block must be a joint block of the model, 0 to {len(blocks) - 1}; got {index}")
        self.states, self.armed = None, False
        self.handle = blocks[index].register_forward_hook(self._keep)

    def arm(self):
        self.states, self.armed = None, True

    def _keep(self, module, inputs, output):
        if self.armed:
            self.states, self.armed = output[0], False

    def take(self) -> torch.Tensor:
        states, self.states = self.states, None
        if states is None:
            raise RuntimeError("the aligned block did not run in this forward pass")
        return states


class Alignment:
    """What a training run adds for REPA: the frozen encoder, the projector and its own AdamW (it follows the run's
    learning rate; its state goes into checkpoints, so a resume stays bit-exact), and the block's kept output."""

    def __init__(self, model: nn.Module, encoder: FeatureEncoder, *, block: int, weight: float, projector_width: int,
                 betas=(0.9, 0.999), eps: float = 1e-8):
        self.weight, self.encoder = weight, encoder
        self.setup = {"block": block, "projector_width": projector_width, "dim": encoder.config["dim"]}
        self.patch_size = model.config.patch_size
        self.output = BlockOutput(model, block)
        device = next(model.parameters()).device
        self.projector = Projector(model.config.hidden_size, encoder.config["dim"], projector_width).to(device)
        # REPA trains its projector beside the model, unclipped and without weight decay: a small head whose
        # gradients are not the model's, so they stay out of the model's clipping norm
        self.optimizer = torch.optim.AdamW(self.projector.parameters(), lr=0.0, betas=betas, eps=eps, weight_decay=0.0)

    def loss(self, clean_latents: torch.Tensor) -> torch.Tensor:
        """The alignment loss of the last forward pass against the clean latents it was made from."""
        with torch.no_grad():
            targets = feature_tokens(self.encoder(clean_latents.float()), self.patch_size)
        return alignment_loss(self.projector(self.output.take().float()), targets)

    def step(self, lr: float):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"setup": self.setup, "projector": self.projector.state_dict(), "optimizer": self.optimizer.state_dict()}

    def resume_problem(self, state: dict) -> str | None:
        """Why a checkpoint's alignment state cannot continue here (another block, projector or encoder width)."""
        saved = state.get("setup", {})
        changed = [f"{k} {saved.get(k)} -> {v}" for k, v in self.setup.items() if saved.get(k) != v]
        return f"its alignment was set up otherwise ({', '.join(changed)})" if changed else None

    def load_state_dict(self, state: dict):
        self.projector.load_state_dict(state["projector"])
        self.optimizer.load_state_dict(state["optimizer"])
