import math

import pytest
import torch

from mmdit import flow
from mmdit.config import SAMPLERS


@pytest.mark.parametrize("n", [1, 4, 28, 50])
@pytest.mark.parametrize("shift", [3.0, 1.0])
def test_sigmas_equal_diffusers_scheduler(n, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(n)
    ours = flow.sigmas(n, shift)
    assert ours.shape == (n + 1,) and ours[-1] == 0
    torch.testing.assert_close(ours, sched.sigmas.float(), rtol=0, atol=1e-6)


def test_sigmas_reproduce_double_shift_quirk():
    s = flow.sigmas(4, 3.0)
    torch.testing.assert_close(s, torch.tensor([1.0, 0.8577, 0.6022, 0.00893, 0.0]), rtol=0, atol=1e-4)


def test_shift():
    s = torch.linspace(0, 1, 11)
    torch.testing.assert_close(flow.shift_sigma(s, 1.0), s)
    assert flow.shift_sigma(0.5, 3.0) == pytest.approx(0.75)
    assert flow.shift_sigma(torch.tensor(1.0), 3.0) == 1.0


def test_forward_process_and_target():
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    sigma = torch.tensor([0.0, 0.25, 1.0])
    xs = flow.interpolate(x0, noise, sigma)
    torch.testing.assert_close(xs[0], x0[0])
    torch.testing.assert_close(xs[1], 0.75 * x0[1] + 0.25 * noise[1])
    torch.testing.assert_close(xs[2], noise[2])
    # The target is the time derivative of the path.
    eps = 1e-3
    num = (flow.interpolate(x0, noise, sigma.clamp(max=0.9) + eps) - flow.interpolate(x0, noise, sigma.clamp(max=0.9)))
    torch.testing.assert_close(num / eps, flow.velocity_target(x0, noise), rtol=1e-2, atol=1e-2)


def ks_distance(samples: torch.Tensor, cdf) -> float:
    x, _ = samples.double().sort()
    n = len(x)
    ecdf_hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    ecdf_lo = torch.arange(0, n, dtype=torch.float64) / n
    c = cdf(x)
    return max((ecdf_hi - c).abs().max().item(), (ecdf_lo - c).abs().max().item())


def normal_cdf(z):
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


N = 200_000
KS = 0.006  # ~2x the 99.9% Kolmogorov-Smirnov critical value at N = 200k; a wrong formula is off by far more


@pytest.mark.parametrize("m,s", [(0.0, 1.0), (0.5, 0.6)])
def test_lognorm_distribution(m, s):
    g = torch.Generator().manual_seed(0)
    x = flow.sample_sigmas(N, "lognorm", mean=m, std=s, generator=g)
    assert ks_distance(x, lambda t: normal_cdf((torch.log(t / (1 - t)) - m) / s)) < KS
    if (m, s) == (0.0, 1.0):
        assert x.median().item() == pytest.approx(0.5, abs=0.01)
        # The paper's density, checked on a histogram.
        hist = torch.histc(x, bins=20, min=0, max=1) / (N / 20)
        centers = (torch.arange(20) + 0.5) / 20
        torch.testing.assert_close(hist, flow.lognorm_density(centers), rtol=0.06, atol=0.02)


def test_cosmap_distribution():
    x = flow.sample_sigmas(N, "cosmap", generator=torch.Generator().manual_seed(1))
    # sigma = 1 - 1/(tan(pi u/2) + 1) is increasing in u, so P(sigma <= t) = (2/pi) atan(t / (1 - t)).
    assert ks_distance(x, lambda t: 2 / math.pi * torch.atan(t / (1 - t))) < KS
    hist = torch.histc(x, bins=20, min=0, max=1) / (N / 20)
    centers = (torch.arange(20) + 0.5) / 20
    torch.testing.assert_close(hist, flow.cosmap_density(centers), rtol=0.05, atol=0.02)


@pytest.mark.parametrize("s", [0.0, 0.5, 1.29])
def test_mode_distribution(s):
    x = flow.sample_sigmas(N, "mode", mode_scale=s, generator=torch.Generator().manual_seed(2))
    # f(u) = 1 - u - s (cos^2(pi u/2) - 1 + u) decreases in u for s < 2/(pi - 2): P(sigma <= f(u)) = 1 - u.
    u = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)
    f = 1 - u - s * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    emp = (x.double()[None] <= f[:, None]).double().mean(1)
    assert (emp - (1 - u)).abs().max() < KS
    if s == 0.0:
        assert ks_distance(x, lambda t: t) < KS  # mode(0) is uniform


def test_uniform_and_unknown_sampler():
    x = flow.sample_sigmas(N, "uniform", generator=torch.Generator().manual_seed(3))
    assert ks_distance(x, lambda t: t) < KS
    with pytest.raises(ValueError, match="accepted: uniform, lognorm, mode, cosmap"):
        flow.sample_sigmas(4, "beta")


def test_flow_loss_and_weighting():
    x0, noise = torch.randn(4, 2, 3), torch.randn(4, 2, 3)
    sigma = torch.tensor([0.1, 0.3, 0.5, 0.9])
    assert flow.flow_loss(noise - x0, x0, noise, sigma) == 0
    pred = noise - x0 + 1.0
    assert flow.flow_loss(pred, x0, noise, sigma) == pytest.approx(1.0)
    assert flow.flow_loss(pred, x0, noise, sigma, "sigma_sqrt") == pytest.approx((sigma ** -2).mean().item())
    with pytest.raises(ValueError, match="accepted: none, sigma_sqrt, cosmap"):
        flow.loss_weight(sigma, "snr")


# ---- samplers: exact velocity of a 2-D Gaussian mixture ---------------------------------------------------------

MEANS = torch.tensor([[2.0, 0.0], [-1.0, 1.5], [0.0, -2.0]])
WEIGHTS = torch.tensor([0.5, 0.3, 0.2])
STD = 0.1


def true_velocity(x, sigma, step=None):
    """E[noise - x0 | x_sigma] for x0 ~ sum_k w_k N(mu_k, STD^2 I): the optimal rectified-flow field."""
    s = sigma[:, None, None]
    a = 1 - s
    var = a**2 * STD**2 + s**2                                      # per-component variance of x_sigma
    d2 = ((x[:, None, :] - a * MEANS[None]) ** 2).sum(-1, keepdim=True)
    logp = torch.log(WEIGHTS)[None, :, None] - d2 / (2 * var) - torch.log(var)  # 2-D Gaussian, up to a constant
    resp = torch.softmax(logp, dim=1)
    x0_k = MEANS[None] + (a * STD**2 / var) * (x[:, None, :] - a * MEANS[None])
    x0 = (resp * x0_k).sum(1)
    return (x - x0) / sigma[:, None].clamp(min=1e-8)


@pytest.mark.parametrize("method,steps", [("euler", 300), ("heun", 100), ("dpmpp_2m", 100)])
def test_sampler_reaches_the_target_distribution(method, steps):
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    x = flow.sample(true_velocity, noise, flow.sigmas(steps, shift=1.0), method)
    dist = torch.cdist(x, MEANS)
    nearest = dist.argmin(1)
    assert dist.min(1).values.quantile(0.99) < 0.5                     # every sample lands on a component
    counts = torch.bincount(nearest, minlength=3) / len(x)
    torch.testing.assert_close(counts, WEIGHTS, rtol=0, atol=0.03)     # in the right proportions
    for k in range(3):                                                 # with the right spread
        assert x[nearest == k].std(0).mean().item() == pytest.approx(STD, rel=0.25)


def test_second_order_samplers_beat_euler_at_few_steps():
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    reference = flow.sample(true_velocity, noise, flow.sigmas(1000, shift=1.0), "euler")
    err = {m: (flow.sample(true_velocity, noise, flow.sigmas(12, shift=1.0), m) - reference).norm(dim=1).mean()
           for m in SAMPLERS}
    assert err["heun"] < err["euler"] and err["dpmpp_2m"] < err["euler"]


# ---- guidance --------------------------------------------------------------------------------------------------

class RecordingModel:
    """v = x * cond_value (+100 when layers are skipped); records the batch size of each call."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, sigma, c, skip_layers=()):
        self.batches.append((x.shape[0], tuple(skip_layers)))
        return x * c[:, None] + (100.0 if skip_layers else 0.0)


def test_cfg_batches_both_passes_and_mixes():
    model = RecordingModel()
    x = torch.ones(2, 3)
    v = flow.guided_velocity(model, {"c": torch.tensor([2.0, 2.0])}, {"c": torch.tensor([0.5, 0.5])},
                             scale=4.0, num_steps=10)(x, torch.full((2,), 0.5), 0)
    assert model.batches == [(4, ())]
    torch.testing.assert_close(v, torch.full((2, 3), 0.5 + 4.0 * (2.0 - 0.5)))


def test_cfg_scale_one_runs_conditional_only():
    model = RecordingModel()
    v = flow.guided_velocity(model, {"c": torch.tensor([2.0])}, {"c": torch.tensor([0.5])}, 1.0, 10)(
        torch.ones(1, 3), torch.full((1,), 0.5), 0)
    assert model.batches == [(1, ())] and torch.equal(v, torch.full((1, 3), 2.0))


def test_skip_layer_guidance_steps_and_formula():
    slg = flow.SkipLayerGuidance(layers=(1,), scale=2.0, start=0.01, end=0.2)
    assert [i for i in range(28) if slg.active(i, 28)] == [1, 2, 3, 4, 5]
    model = RecordingModel()
    velocity = flow.guided_velocity(model, {"c": torch.tensor([2.0])}, {"c": torch.tensor([0.5])}, 3.0, 28, slg)
    v = velocity(torch.ones(1, 3), torch.full((1,), 0.5), 2)
    assert model.batches == [(2, ()), (1, (1,))]
    expected = 0.5 + 3.0 * 1.5 + 2.0 * (2.0 - 102.0)
    torch.testing.assert_close(v, torch.full((1, 3), expected))


def test_skip_layer_guidance_needs_cfg():
    """As in diffusers: with guidance off (scale <= 1) there is no skip-layer pass either."""
    model = RecordingModel()
    slg = flow.SkipLayerGuidance(layers=(1,), scale=2.0)
    velocity = flow.guided_velocity(model, {"c": torch.tensor([2.0])}, {"c": torch.tensor([0.5])}, 1.0, 28, slg)
    velocity(torch.ones(1, 3), torch.full((1,), 0.5), 2)
    assert model.batches == [(1, ())]
