"""mmdit.optim: Muon is torch.optim.Muon's arithmetic (batched by shape, in the precision asked for), and the
Muon + AdamW pair splits the MM-DiT's parameters as meant."""

import pytest
import torch

from mmdit.config import model_preset
from mmdit.model import MMDiT
from mmdit.optim import Muon, MuonWithAdamW, build_optimizer, is_hidden_matrix, orthogonalize


def shapes_and_grads(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(48, 16), (48, 16), (16, 16), (16, 64), (64, 16)]   # tall, square and wide; two of one shape
    return [torch.randn(s, generator=g) for s in shapes], [[torch.randn(s, generator=g) for s in shapes]
                                                           for _ in range(4)]


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 1e-5), (torch.float32, 2e-3)])
def test_muon_steps_as_torch_muon_does(dtype, atol):
    """Four steps of ours against torch.optim.Muon (match_rms_adamw, nesterov, weight decay): in bf16, as torch
    computes, up to the rounding of batched against single matmuls; in fp32, within bf16's error of torch's."""
    start, grads = shapes_and_grads()
    ours = [torch.nn.Parameter(w.clone()) for w in start]
    theirs = [torch.nn.Parameter(w.clone()) for w in start]
    opt_ours = Muon(ours, lr=0.02, weight_decay=0.1, ns_dtype=dtype)
    opt_theirs = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for step_grads in grads:
        for params, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            for p, grad in zip(params, step_grads):
                p.grad = grad.clone()
            opt.step()
    for a, b, w in zip(ours, theirs, start):
        assert (a - w).abs().max() > 0.02   # they moved
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


def test_orthogonalize_flattens_the_spectrum():
    g = torch.Generator().manual_seed(1)
    stack = torch.randn(3, 40, 24, generator=g) @ torch.diag(torch.logspace(-1, 1, 24))   # condition number 100
    singular = torch.linalg.svdvals(orthogonalize(stack))
    assert singular.shape == (3, 24) and singular.min() > 0.5 and singular.max() < 1.3
    assert torch.linalg.svdvals(stack).max() / torch.linalg.svdvals(stack).min() > 50


def test_muon_with_adamw_splits_the_mmdit():
    """The blocks' 2-D weights go to Muon; embedders, the final layer, biases and norm gains to AdamW; none twice."""
    model = MMDiT(model_preset("tiny"))
    named = list(model.named_parameters())
    opt = build_optimizer("muon", named, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8, fused=False)
    assert isinstance(opt, MuonWithAdamW)
    muon_ids = {id(p) for p in opt.muon.param_groups[0]["params"]}
    adamw_ids = {id(p) for p in opt.adamw.param_groups[0]["params"]}
    assert not muon_ids & adamw_ids and len(muon_ids | adamw_ids) == len(named)
    for name, p in named:
        assert (id(p) in muon_ids) == (name.startswith("joint_blocks.") and p.ndim == 2), name
    assert any(is_hidden_matrix(n, p) and "adaLN" in n for n, p in named)
    assert not any(id(p) in muon_ids for n, p in named if n.startswith(("x_embedder", "final_layer", "context_")))
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'; accepted: adamw, muon"):
        build_optimizer("sgd", named, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8, fused=False)


def test_one_schedule_sets_both_halves_learning_rates():
    """train.py sets group["lr"] on every param group: Muon's and AdamW's both follow, and both step."""
    model = MMDiT(model_preset("tiny"))
    opt = build_optimizer("muon", list(model.named_parameters()), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0,
                          eps=1e-8, fused=False)
    for group in opt.param_groups:
        group["lr"] = 0.25
    assert opt.muon.param_groups[0]["lr"] == 0.25 and opt.adamw.param_groups[0]["lr"] == 0.25
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == set(before)
