"""Optimizers for the MM-DiT: AdamW (the paper's), or Muon on the blocks' weight matrices with AdamW on the rest.

Muon (Jordan et al. 2024; "Muon is Scalable for LLM Training", Liu et al. 2025) orthogonalises each matrix's
momentum with a few Newton-Schulz steps, so every direction of a layer's update moves at the same rate. It is
meant for the hidden matrices only: embeddings, the final projection, biases and norm gains stay on AdamW. With
torch's `adjust_lr_fn="match_rms_adamw"` the update's RMS matches AdamW's, so one learning rate and one schedule
serve both halves (the Moonlight recipe).
"""

from __future__ import annotations

import torch

from mmdit.config import OPTIMIZERS

BLOCK_PREFIXES = ("joint_blocks.",)   # the MM-DiT's transformer blocks (checkpoint names)


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """A 2-D weight inside a transformer block: what Muon updates (attention, MLP and adaLN projections)."""
    return param.ndim == 2 and name.startswith(BLOCK_PREFIXES)


class MuonWithAdamW:
    """Muon for the blocks' matrices and AdamW for every other trained parameter, stepped as one optimizer: one
    list of param_groups (a learning-rate schedule sets them all), one state dict, one zero_grad."""

    def __init__(self, named_params, *, lr: float, betas, weight_decay: float, eps: float, fused: bool,
                 momentum: float = 0.95):
        named_params = list(named_params)
        matrices = [p for n, p in named_params if is_hidden_matrix(n, p)]
        rest = [p for n, p in named_params if not is_hidden_matrix(n, p)]
        if not matrices:
            raise ValueError("optim.optimizer muon: the model has no block weight matrices to give Muon")
        self.muon = torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True,
                                     adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(rest, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, fused=fused)

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True):
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict):
        if set(state) != {"muon", "adamw"}:
            raise ValueError(f"not a Muon + AdamW optimizer state (keys {sorted(state)}): was the run trained with "
                             f"another optim.optimizer?")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def build_optimizer(name: str, named_params, *, lr: float, betas, weight_decay: float, eps: float, fused: bool):
    """The optimizer called name (OPTIMIZERS) over the (name, parameter) pairs to train."""
    if name == "adamw":
        return torch.optim.AdamW([p for _, p in named_params], lr=lr, betas=betas, weight_decay=weight_decay,
                                 eps=eps, fused=fused)
    if name == "muon":
        return MuonWithAdamW(named_params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, fused=fused)
    raise ValueError(f"unknown optimizer {name!r}; accepted: {', '.join(OPTIMIZERS)}")
