"""Rectified flow as pure functions: noising, training timesteps, loss, inference schedule, samplers, guidance.

sigma is the noise level in [0, 1] everywhere: x_sigma = (1 - sigma) * x0 + sigma * noise, and the network predicts
the velocity noise - x0. Only the model turns sigma into its timestep input (sigma * 1000). The resolution shift
is applied explicitly, only where asked. Nothing here imports the model: samplers take a callable
`velocity(x, sigma, step) -> v` (x (B, ...), sigma (B,), step the index into the schedule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
# Recipes and command lines take their accepted names from mmdit.config (TIMESTEP_SAMPLERS, LOSS_WEIGHTINGS,
# SAMPLERS) and check them before any work; here each function knows only its own branches, and a test holds the
# two to each other.


# ---------------------------------------------------------------------------------------------------------------
# Training


def interpolate(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The forward process x_sigma = (1 - sigma) * x0 + sigma * noise; sigma (B,) broadcasts over the rest."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return torch.lerp(x0, noise, s)


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_sigma / d sigma: what the network learns to predict."""
    return noise - x0


def shift_sigma(sigma, shift: float):
    """The resolution shift sigma' = shift * sigma / (1 + (shift - 1) * sigma); shift 1 is the identity."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(n: int, method: str = "lognorm", *, mean: float = 0.0, std: float = 1.0, mode_scale: float = 1.29,
                  generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """n training noise levels in (0, 1) drawn with one of the paper's densities (SD3 paper, section 3.1).

    uniform: sigma ~ U(0, 1).  lognorm(m, s): sigma = sigmoid(N(m, s)), the paper's default (0, 1).
    mode(s): sigma = 1 - u - s * (cos^2(pi u / 2) - 1 + u).  cosmap: sigma = 1 - 1 / (tan(pi u / 2) + 1).
    """
    if method == "lognorm":
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    if method not in _TIMESTEP_SAMPLER_NAMES:
        raise ValueError(f"unknown timestep sampler {method!r}; accepted: {', '.join(_TIMESTEP_SAMPLER_NAMES)}")
    u = torch.rand(n, generator=generator, device=device)
    if method == "uniform":
        return u
    if method == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return 1 - 1 / (torch.tan(math.pi * u / 2) + 1)   # cosmap


def lognorm_density(sigma, mean: float = 0.0, std: float = 1.0):
    """The paper's logit-normal density pi_ln(t; m, s) = exp(-(logit t - m)^2 / 2s^2) / (s sqrt(2 pi) t (1 - t))."""
    logit = torch.log(sigma / (1 - sigma))
    return torch.exp(-((logit - mean) ** 2) / (2 * std**2)) / (std * math.sqrt(2 * math.pi) * sigma * (1 - sigma))


def cosmap_density(sigma):
    """pi_cosmap(t) = 2 / (pi - 2 pi t + 2 pi t^2)."""
    return 2 / (math.pi - 2 * math.pi * sigma + 2 * math.pi * sigma**2)


def loss_weight(sigma: torch.Tensor, weighting: str = "none") -> torch.Tensor:
    """Per-sample loss weights: none (1), sigma_sqrt (sigma^-2) or cosmap (its density), as diffusers names them."""
    if weighting == "none":
        return torch.ones_like(sigma)
    if weighting == "sigma_sqrt":
        return sigma.float() ** -2
    if weighting == "cosmap":
        return cosmap_density(sigma.float())
    raise ValueError(f"unknown loss weighting {weighting!r}; accepted: none, sigma_sqrt, cosmap")


def flow_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
              weighting: str = "none") -> torch.Tensor:
    """Mean squared error of the predicted velocity, per sample weighted, averaged in fp32. A tensor, no host sync."""
    per_sample = (pred.float() - velocity_target(x0, noise).float()).pow(2).flatten(1).mean(1)
    return (loss_weight(sigma, weighting) * per_sample).mean()


# ---------------------------------------------------------------------------------------------------------------
# Inference schedule and samplers


def sigmas(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """num_steps + 1 decreasing noise levels ending in 0, equal to diffusers' FlowMatchEulerDiscreteScheduler(shift)
    after set_timesteps(num_steps), quirk included: the training table's smallest sigma is already shifted and is
    shifted a second time here, so the last nonzero sigma is 0.00893 for shift 3 (sd3-reference.md section 4)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sigma_max = shift_sigma(1.0, shift)
    sigma_min = shift_sigma(1.0 / num_train_timesteps, shift)
    s = torch.linspace(sigma_max, sigma_min, num_steps, dtype=torch.float64)
    return torch.cat([shift_sigma(s, shift), torch.zeros(1, dtype=torch.float64)]).float()


def sample(velocity: Velocity, noise: torch.Tensor, schedule: torch.Tensor, method: str = "euler",
           progress: Callable | None = None) -> torch.Tensor:
    """Integrate from x = noise at schedule[0] to schedule[-1] (usually 0). The state stays in fp32.

    euler: x += (s' - s) v.  heun: the trapezoidal correction of Euler (one extra call per step but the last).
    dpmpp_2m: DPM-Solver++(2M) on the flow's sigmas with lambda = -log(sigma), Stability's default for SD3.5;
    its first-order step is the flow DDIM step, which equals Euler.
    """
    if method not in _SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {method!r}; accepted: {', '.join(_SAMPLER_NAMES)}")
    x = noise.float()
    ones = torch.ones(x.shape[0], device=x.device)
    steps = range(len(schedule) - 1)
    prev_x0 = None
    for i in (progress(steps) if progress else steps):
        s, s_next = float(schedule[i]), float(schedule[i + 1])
        v = velocity(x, s * ones, i).float()
        if method == "euler" or (method == "heun" and s_next == 0):
            x = x + (s_next - s) * v
        elif method == "heun":
            x_pred = x + (s_next - s) * v
            v_next = velocity(x_pred, s_next * ones, i).float()
            x = x + (s_next - s) * (v + v_next) / 2
        else:  # dpmpp_2m, in data prediction
            x0 = x - s * v
            if s_next == 0:
                x = x0
            else:
                x0_mix = x0
                if prev_x0 is not None:
                    h = math.log(s / s_next)
                    r = math.log(float(schedule[i - 1]) / s) / h
                    x0_mix = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
                x = (s_next / s) * x + (1 - s_next / s) * x0_mix
            prev_x0 = x0
    return x


_SAMPLER_NAMES = ("euler", "heun", "dpmpp_2m")   # the branches of sample()
_TIMESTEP_SAMPLER_NAMES = ("uniform", "lognorm", "mode", "cosmap")   # the branches of sample_sigmas()


# ---------------------------------------------------------------------------------------------------------------
# Guidance


@dataclass(frozen=True)
class SkipLayerGuidance:
    """Skip-layer guidance (SD3.5 Medium): a further conditional pass with `layers` skipped, pushed away from.

    Active on steps i with start * num_steps < i < end * num_steps, as diffusers and ComfyUI do.
    """

    layers: tuple[int, ...] = (7, 8, 9)
    scale: float = 2.8
    start: float = 0.01
    end: float = 0.2

    def active(self, step: int, num_steps: int) -> bool:
        return self.scale > 0 and self.start * num_steps < step < self.end * num_steps


def guided_velocity(model: Callable[..., torch.Tensor], cond: dict, uncond: dict | None, scale: float,
                    num_steps: int, slg: SkipLayerGuidance | None = None) -> Velocity:
    """Classifier-free guidance v = v_u + scale (v_c - v_u), both passes in one batch ([uncond, cond], as diffusers).

    model(x, sigma, **conditioning, skip_layers=()) -> velocity; cond and uncond are dicts of batch-first tensors.
    As in diffusers, guidance runs only for scale > 1 (otherwise the conditional pass alone is used), and
    skip-layer guidance only together with it.
    """
    use_cfg = uncond is not None and scale > 1
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond} if use_cfg else None

    def velocity(x, sigma, step):
        if use_cfg:
            v_uncond, v_cond = model(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
            v = v_uncond + scale * (v_cond - v_uncond)
        else:
            v = v_cond = model(x, sigma, **cond)
        if use_cfg and slg is not None and slg.active(step, num_steps):  # as diffusers: only with CFG
            v = v + slg.scale * (v_cond - model(x, sigma, **cond, skip_layers=slg.layers))
        return v

    return velocity
