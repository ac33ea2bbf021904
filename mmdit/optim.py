"""Optimizers for the MM-DiT: AdamW (the paper's), or Muon on the blocks' weight matrices with AdamW on the rest.

Muon (Jordan et al. 2024; "Muon is Scalable for LLM Training", Liu et al. 2025) orthogonalises each matrix's
momentum with a few Newton-Schulz steps, so every direction of a layer's update moves at the same rate. It is
meant for the hidden matrices only: embeddings, the final projection, biases and norm gains stay on AdamW. The
update is scaled by 0.2 * sqrt(max(fan_out, fan_in)) so that its RMS matches AdamW's ("match_rms_adamw"), and one
learning rate and one schedule serve both halves (the Moonlight recipe).

The arithmetic is torch.optim.Muon's (nesterov momentum by lerp, its quintic coefficients, decoupled weight
decay), written here for two reasons: torch's runs the Newton-Schulz steps in bf16 whatever the device, which on a
CPU without native bf16 (AVX2) takes about 1.8 s a step for the toy model against 2 ms for AdamW; and it
orthogonalises one matrix at a time, where matrices of one shape can go through batched matmuls together. Here
the caller (the training entry point, which measures) chooses the Newton-Schulz dtype.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from mmdit.config import OPTIMIZERS

BLOCK_PREFIXES = ("joint_blocks.",)   # the MM-DiT's transformer blocks (checkpoint names)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)   # Keller Jordan's quintic, as torch.optim.Muon
# Matrices of one shape are orthogonalised together, in stacks of at most this many elements, so that a model of
# SD3.5 Large's size does not hold a copy of all its MLP weights at once.
MAX_STACK_ELEMENTS = 1 << 26


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """A 2-D weight inside a transformer block: what Muon updates (attention, MLP and adaLN projections)."""
    return param.ndim == 2 and name.startswith(BLOCK_PREFIXES)


def orthogonalize(stack: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Newton-Schulz approximation of U V^T for each matrix U S V^T of a (k, rows, cols) stack, in its dtype."""
    a, b, c = NS_COEFFICIENTS
    tall = stack.size(-2) > stack.size(-1)
    x = stack.mT if tall else stack   # iterate on the Gram matrix of the shorter side
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)   # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon over 2-D parameters; ns_dtype is the Newton-Schulz steps' precision (bf16 only where it is faster)."""

    def __init__(self, params, *, lr: float, weight_decay: float = 0.0, momentum: float = 0.95,
                 ns_steps: int = 5, ns_dtype: torch.dtype = torch.float32):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum})
        if any(p.ndim != 2 for group in self.param_groups for p in group["params"]):
            raise ValueError("Muon updates 2-D weight matrices only")
        self.ns_steps, self.ns_dtype = ns_steps, ns_dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            momentum, lr = group["momentum"], group["lr"]
            torch._foreach_lerp_(buffers, grads, 1 - momentum)
            by_shape = defaultdict(list)
            for i, p in enumerate(params):
                by_shape[tuple(p.shape)].append(i)
            for shape, members in by_shape.items():
                scale = 0.2 * math.sqrt(max(shape))
                per_stack = max(1, MAX_STACK_ELEMENTS // math.prod(shape))
                for first in range(0, len(members), per_stack):
                    chunk = members[first:first + per_stack]
                    ahead = torch.empty((len(chunk), *shape), dtype=self.ns_dtype, device=params[chunk[0]].device)
                    for k, i in enumerate(chunk):   # nesterov: the update looks one momentum step ahead
                        ahead[k] = grads[i].lerp(buffers[i], momentum)
                    ortho = orthogonalize(ahead, self.ns_steps)
                    for k, i in enumerate(chunk):
                        params[i].mul_(1 - lr * group["weight_decay"])
                        params[i].add_(ortho[k].to(params[i].dtype), alpha=-lr * scale)


class MuonWithAdamW:
    """Muon for the blocks' matrices and AdamW for every other trained parameter, stepped as one optimizer: one
    list of param_groups (a learning-rate schedule sets them all), one state dict, one zero_grad."""

    def __init__(self, named_params, *, lr: float, betas, weight_decay: float, eps: float, fused: bool,
                 ns_dtype: torch.dtype = torch.float32):
        named_params = list(named_params)
        matrices = [p for n, p in named_params if is_hidden_matrix(n, p)]
        rest = [p for n, p in named_params if not is_hidden_matrix(n, p)]
        if not matrices:
            raise ValueError("optim.optimizer muon: the model has no block weight matrices to give Muon")
        self.muon = Muon(matrices, lr=lr, weight_decay=weight_decay, ns_dtype=ns_dtype)
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


def build_optimizer(name: str, named_params, *, lr: float, betas, weight_decay: float, eps: float, fused: bool,
                    ns_dtype: torch.dtype = torch.float32):
    """The optimizer called name (OPTIMIZERS) over the (name, parameter) pairs to train; ns_dtype is Muon's
    Newton-Schulz precision."""
    if name == "adamw":
        return torch.optim.AdamW([p for _, p in named_params], lr=lr, betas=betas, weight_decay=weight_decay,
                                 eps=eps, fused=fused)
    if name == "muon":
        return MuonWithAdamW(named_params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, fused=fused,
                             ns_dtype=ns_dtype)
    raise ValueError(f"unknown optimizer {name!r}; accepted: {', '.join(OPTIMIZERS)}")
