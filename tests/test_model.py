import pytest
import torch

from mmdit.config import MODEL_PRESETS, MMDiTConfig, model_preset, paper_depth
from mmdit.model import MMDiT, forward_flops, train_step_flops
from tests.conftest import tiny_inputs


def tiny_model(name="tiny-sd3.5", randomize=False, seed=0):
    torch.manual_seed(seed)
    model = MMDiT(model_preset(name))
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.2)
    return model


def inputs_for(config, **kw):
    return tiny_inputs(context_dim=config.context_dim, pooled_dim=config.pooled_dim, **kw)


@pytest.mark.parametrize("name", ["tiny", "tiny-sd3.5"])
def test_fresh_model_outputs_exact_zero(name):
    model = tiny_model(name)
    out = model(**inputs_for(model.config, height=12, width=8))
    assert out.shape == (2, 16, 12, 8)
    assert torch.count_nonzero(out) == 0


def test_non_square_latent_shape_and_finite():
    model = tiny_model(randomize=True)
    out = model(**inputs_for(model.config, height=6, width=14))
    assert out.shape == (2, 16, 6, 14) and torch.isfinite(out).all()


# Parameter counts without the position table, from diffusers instantiated on the meta device
# (shared/docs/sd3-reference.md section 0): they pin down every layer's shape.
@pytest.mark.parametrize("name,count,table", [
    ("sd3-medium", 2_028_328_000, 56_623_104),
    ("sd3.5-medium", 2_243_171_520, 226_492_416),
    ("sd3.5-large", 8_056_627_520, 89_653_248),
])
def test_preset_parameter_counts_match_released_models(name, count, table):
    with torch.device("meta"):
        model = MMDiT(model_preset(name))
    assert sum(p.numel() for p in model.parameters()) == count
    assert model.pos_embed.numel() == table


def test_paper_width_rule():
    cfg = paper_depth(8)
    assert (cfg.hidden_size, cfg.num_heads, cfg.head_dim) == (512, 8, 64)
    assert MODEL_PRESETS["d24"].hidden_size == MODEL_PRESETS["sd3-medium"].hidden_size == 1536


def test_last_block_text_stream_is_pre_only():
    model = tiny_model()
    last = model.joint_blocks[-1].context_block
    assert last.adaLN_modulation[1].out_features == 2 * model.config.hidden_size
    assert last.attn.proj is None and not hasattr(last, "mlp")
    assert model.joint_blocks[0].x_block.adaLN_modulation[1].out_features == 9 * model.config.hidden_size


def test_skip_layers_changes_output_and_skipping_nothing_does_not():
    model = tiny_model(randomize=True)
    inp = inputs_for(model.config)
    with torch.no_grad():
        base = model(**inp)
        assert torch.equal(base, model(**inp, skip_layers=()))
        assert not torch.allclose(base, model(**inp, skip_layers=(0,)))


def test_activation_checkpointing_gives_identical_gradients():
    model = tiny_model(randomize=True)
    inp = inputs_for(model.config)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.activation_checkpointing = flag
        model(**inp).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_every_trainable_parameter_gets_a_gradient():
    # Data-parallel wrappers fail on parameters that take no part in the loss.
    model = tiny_model(randomize=True)
    model(**inputs_for(model.config)).square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_timestep_embedding_is_fp32_in_bf16_model():
    # sigma * 1000 near 1000 needs fp32: bf16 would round 999.1 and 999.9 to the same value.
    model = tiny_model(randomize=True).to(torch.bfloat16)
    inp = inputs_for(model.config, batch=1)
    inp = {k: v.to(torch.bfloat16) if k != "sigma" else v for k, v in inp.items()}
    with torch.no_grad():
        a = model(**{**inp, "sigma": torch.tensor([0.9991])})
        b = model(**{**inp, "sigma": torch.tensor([0.9999])})
    assert a.dtype == torch.bfloat16 and not torch.equal(a, b)


@pytest.mark.parametrize("change,match", [
    (dict(height=7), "multiples of the patch size 2"),
    (dict(height=34, width=8), "exceeds this model's 16x16 position table"),
    (dict(context_dim=12), "context must be"),
    (dict(pooled_dim=5), "pooled must be"),
])
def test_bad_inputs_give_one_line_errors(change, match):
    model = tiny_model()
    inp = tiny_inputs(**{"context_dim": model.config.context_dim, "pooled_dim": model.config.pooled_dim, **change})
    with pytest.raises(ValueError, match=match) as err:
        model(**inp)
    assert "\n" not in str(err.value)


def test_config_validation():
    with pytest.raises(ValueError, match="x_self_attn_layers"):
        MMDiTConfig(depth=2, x_self_attn_layers=(5,))
    with pytest.raises(ValueError, match="unknown model preset"):
        model_preset("sd4")
    with pytest.raises(ValueError, match="unknown MMDiTConfig keys"):
        MMDiTConfig.from_dict({"depht": 3})
    cfg = model_preset("tiny-sd3.5")
    assert MMDiTConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("name", ["tiny", "tiny-sd3.5"])
def test_flop_formula_matches_counted_matmuls(name):
    """The analytic count behind the benchmark's FLOP fraction, against torch's counter. The counter does not see
    CPU attention kernels, so attention is checked separately: it is 4 * L_q * L_k * h per block."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_model(name, randomize=True)
    cfg = model.config
    inp = inputs_for(cfg, height=12, width=8, context_len=7)
    Lx = 6 * 4
    with FlopCounterMode(display=False) as counter:
        model(**inp)
    f = forward_flops(cfg, Lx, 7)
    assert counter.get_total_flops() == 2 * (f["embed"] + f["linear"])
    h, L = cfg.hidden_size, Lx + 7
    expected_attn = 4 * h * ((cfg.depth - 1) * L * L + Lx * L + sum(Lx * Lx for _ in cfg.x_self_attn_layers))
    assert f["attention"] == expected_attn
    assert train_step_flops(cfg, 2, Lx, 7) == 2 * (2 * f["embed"] + 3 * (f["linear"] + f["attention"]))
