"""Training recipes: YAML deltas over typed defaults, strict about keys and types, with key=value overrides."""

import json
from pathlib import Path

import pytest

from mmdit import flow
import torch

from mmdit.config import (LOSS_WEIGHTINGS, SAMPLERS, TIMESTEP_SAMPLERS, Config, config_to_dict, load_config,
                          model_preset)

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_papers_recipe():
    c = Config()
    assert (c.flow.timestep_sampling, c.flow.lognorm_mean, c.flow.lognorm_std) == ("lognorm", 0.0, 1.0)
    assert c.text.drop_clip_l == c.text.drop_clip_g == c.text.drop_t5 == 0.463
    assert (c.optim.lr, c.optim.grad_clip, c.train.ema_decay) == (1e-4, 1.0, 0.9999)
    assert c.data.caption_variant_probs == (0.5, 0.5) and c.flow.train_shift == 1.0


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_bundled_recipe_loads(recipe):
    c = load_config(ROOT / "configs" / recipe)
    assert c.model.build_config().depth >= 1
    assert (ROOT / c.train.deepspeed).is_file()


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json"])
def test_deepspeed_configs(name):
    ds = json.loads((ROOT / "configs" / "deepspeed" / name).read_text())
    assert ds["zero_optimization"]["stage"] == int(name[4])
    assert ds["train_micro_batch_size_per_gpu"] == "auto"  # the batch size lives in the recipe only


def test_overrides_and_round_trip(tmp_path):
    c = load_config(ROOT / "configs" / "tiny.yaml", ["optim.lr=3e-4", "train.steps=7",
                                                    "model.overrides={qk_norm: true}",
                                                    "data.caption_variant_probs=[1, 0]"])
    assert (c.optim.lr, c.train.steps, c.data.caption_variant_probs) == (3e-4, 7, (1.0, 0.0))
    assert c.model.build_config().qk_norm and c.model.build_config().depth == model_preset("tiny").depth
    (tmp_path / "saved.yaml").write_text(json.dumps(config_to_dict(c)))  # JSON is YAML
    assert load_config(tmp_path / "saved.yaml") == c


@pytest.mark.parametrize("overrides,match", [
    (["optim.lrr=1"], "unknown config key optim.lrr; accepted in optim: lr"),
    (["optimizer.lr=1"], "unknown config section 'optimizer'"),
    (["train.steps=many"], "train.steps: expected int, got str"),
    (["train.steps=1.5"], "train.steps: expected int, got float"),
    (["model.preset=sd4"], "unknown model preset 'sd4'"),
    (["model.overrides={depht: 3}"], "unknown model override"),
    (["flow.timestep_sampling=beta"], "flow.timestep_sampling 'beta' is not one of"),
    (["text.drop_t5=1.5"], r"text.drop_t5 must be a finite number in \[0, 1\], got 1.5"),
    (["train.steps=0"], r"train.steps must be a finite number in \[1, inf\), got 0"),
    (["train.steps=-5"], r"train.steps must be"),
    (["train.log_every=0"], r"train.log_every must be"),
    (["train.checkpoint_every=0"], r"train.checkpoint_every must be"),
    (["train.val_every=0"], r"train.val_every must be"),
    (["data.batch_size=0"], r"data.batch_size must be"),
    (["optim.lr=0"], r"optim.lr must be a finite number in \(0, inf\)"),
    (["optim.lr=.nan"], r"optim.lr must be"),
    (["optim.lr=.inf"], r"optim.lr must be"),
    (["optim.grad_accum=0"], r"optim.grad_accum must be"),
    (["train.ema_decay=1.5"], r"train.ema_decay must be"),
    (["optim.betas=[0.9, 1.0]"], r"optim.betas must be two numbers in \[0, 1\)"),
    (["optim.betas=[0.9]"], r"optim.betas must be two numbers"),
    (["data.caption_variant_probs=[0, 0]"], r"data.caption_variant_probs must be non-negative weights"),
    (["data.caption_variant_probs=[-1, 2]"], r"data.caption_variant_probs must be"),
    (["data.prepare_args=[--out, x]"], r"data.prepare_args is set but data.prepare is empty"),
    (["lr=1"], "expected section.key=value"),
])
def test_bad_recipes_fail_with_one_line(overrides, match):
    with pytest.raises(ValueError, match=match) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ValueError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    for text, kind in (("- model\n- data\n", "list"), ("42\n", "int"), ("just words\n", "str")):
        (tmp_path / "odd.yaml").write_text(text)
        with pytest.raises(ValueError, match=f"must be a mapping of sections .* got a {kind}"):
            load_config(tmp_path / "odd.yaml")


def test_every_ranged_field_exists_and_its_defaults_pass():
    """The range table names real numeric fields (a typo there would check nothing), and the defaults pass."""
    import dataclasses

    from mmdit.config import RECIPE_RANGES, Config

    for where in RECIPE_RANGES:
        section, name = where.split(".")
        assert name in {f.name for f in dataclasses.fields(getattr(Config(), section))}, where
    load_config(None, [])


def test_recipe_names_agree_with_flow():
    """Every name the recipe and the command lines accept is implemented by mmdit.flow, and flow refuses others."""
    sigma = torch.full((4,), 0.5)
    for name in TIMESTEP_SAMPLERS:
        assert flow.sample_sigmas(4, name).shape == (4,)
    for name in LOSS_WEIGHTINGS:
        assert flow.loss_weight(sigma, name).shape == (4,)
    for name in SAMPLERS:
        assert flow.sample(lambda x, s, i: -x, torch.ones(2, 3), flow.sigmas(2), name).shape == (2, 3)
    for call in (lambda: flow.sample_sigmas(4, "beta"), lambda: flow.loss_weight(sigma, "snr"),
                 lambda: flow.sample(lambda x, s, i: x, torch.ones(2, 3), flow.sigmas(2), "ddim")):
        with pytest.raises(ValueError, match="unknown"):
            call()
