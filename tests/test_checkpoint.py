"""Weight compatibility: diffusers and Stability layouts against diffusers itself, and lossless round trips."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmdit.checkpoint import SAI_PREFIX, CheckpointError, load_mmdit, save_mmdit
from mmdit.config import model_preset
from mmdit.model import MMDiT
from tests.conftest import tiny_diffusers_transformer, tiny_inputs

TOL = 1e-5  # fp32 max abs difference against diffusers


def diffusers_out(ref, x, sigma, context, pooled, skip_layers=None):
    with torch.no_grad():
        return ref(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=context, pooled_projections=pooled,
                   skip_layers=skip_layers).sample


def ours_out(model, skip_layers=(), **inp):
    with torch.no_grad():
        return model.eval()(**inp, skip_layers=skip_layers)


@pytest.mark.parametrize("height,width", [(8, 8), (12, 8), (6, 16)])
def test_diffusers_directory_matches_diffusers(diffusers_transformer, tmp_path, height, width):
    diffusers_transformer.save_pretrained(tmp_path / "transformer")
    model = load_mmdit(tmp_path / "transformer")
    inp = tiny_inputs(height=height, width=width)
    diff = (ours_out(model, **inp) - diffusers_out(diffusers_transformer, **inp)).abs().max()
    assert diff <= TOL
    diff_skip = (ours_out(model, skip_layers=(1,), **inp)
                 - diffusers_out(diffusers_transformer, skip_layers=[1], **inp)).abs().max()
    assert diff_skip <= TOL


def test_pipeline_directory_reads_its_transformer(tmp_path):
    ref = tiny_diffusers_transformer()
    ref.save_pretrained(tmp_path / "pipe" / "transformer")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    model = load_mmdit(tmp_path / "pipe")
    inp = tiny_inputs()
    assert (ours_out(model, **inp) - diffusers_out(ref, **inp)).abs().max() <= TOL


def test_sharded_diffusers_directory(tmp_path):
    ref = tiny_diffusers_transformer(qk_norm="rms_norm")
    ref.save_pretrained(tmp_path / "t", max_shard_size="20KB")
    assert (tmp_path / "t" / "diffusion_pytorch_model.safetensors.index.json").exists()
    model = load_mmdit(tmp_path / "t")
    inp = tiny_inputs()
    assert (ours_out(model, **inp) - diffusers_out(ref, **inp)).abs().max() <= TOL


def test_stability_single_file_matches_diffusers(diffusers_transformer, tmp_path):
    """Our 'sai' file, converted by diffusers' own single-file converter, is the diffusers model: so our Stability
    layout is Stability's. It also loads back (inside an all-in-one file with VAE and text-encoder keys)."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    diffusers_transformer.save_pretrained(tmp_path / "t")
    save_mmdit(load_mmdit(tmp_path / "t"), tmp_path / "sd3.safetensors", "sai")
    sai = load_file(tmp_path / "sd3.safetensors")
    assert all(k.startswith(SAI_PREFIX) for k in sai)
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(sai))
    expected = diffusers_transformer.state_dict()
    assert set(converted) == set(expected)
    assert all(torch.equal(converted[k], expected[k]) for k in expected)

    all_in_one = {**sai, "first_stage_model.decoder.conv_in.weight": torch.randn(4, 4),
                  "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.randn(8)}
    save_file(all_in_one, tmp_path / "sd3_incl_clips.safetensors")  # no metadata, like Stability's files
    model = load_mmdit(tmp_path / "sd3_incl_clips.safetensors")
    inp = tiny_inputs(height=12, width=8)
    assert (ours_out(model, **inp) - diffusers_out(diffusers_transformer, **inp)).abs().max() <= TOL


@pytest.mark.parametrize("fmt", ["native", "sai", "diffusers"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-sd3.5"])
def test_round_trips_are_bit_identical(tmp_path, fmt, preset):
    torch.manual_seed(0)
    model = MMDiT(model_preset(preset))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    path = tmp_path / ("m" if fmt == "diffusers" else "m.safetensors")
    save_mmdit(model, path, fmt)
    loaded = load_mmdit(path)
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_dtype_is_kept_or_converted(tmp_path):
    model = MMDiT(model_preset("tiny")).to(torch.bfloat16)
    save_mmdit(model, tmp_path / "m.safetensors", "sai")
    assert load_mmdit(tmp_path / "m.safetensors").context_embedder.weight.dtype == torch.bfloat16
    assert load_mmdit(tmp_path / "m.safetensors", dtype=torch.float32).pos_embed.dtype == torch.float32


def test_saved_diffusers_directory_loads_in_diffusers(tmp_path):
    from diffusers import SD3Transformer2DModel

    model = MMDiT(model_preset("tiny-sd3.5"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    save_mmdit(model, tmp_path / "t", "diffusers")
    ref = SD3Transformer2DModel.from_pretrained(tmp_path / "t").eval()
    inp = tiny_inputs(context_dim=32, pooled_dim=24, height=10, width=6)
    assert (ours_out(model, **inp) - diffusers_out(ref, **inp)).abs().max() <= TOL


def test_save_over_existing_checkpoint_replaces_it(tmp_path):
    model = MMDiT(model_preset("tiny"))
    save_mmdit(model, tmp_path / "t", "diffusers")
    save_mmdit(model, tmp_path / "t", "diffusers")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
    assert json.loads((tmp_path / "t" / "config.json").read_text())["num_layers"] == 2


# ---- bad input: one-line errors -------------------------------------------------------------------------------

def one_line_error(path, match, **kw):
    with pytest.raises(CheckpointError, match=match) as err:
        load_mmdit(path, **kw)
    assert "\n" not in str(err.value)


def test_missing_path(tmp_path):
    one_line_error(tmp_path / "nope.safetensors", "does not exist; accepted: a Stability single file")


def test_unknown_safetensors(tmp_path):
    save_file({"encoder.weight": torch.zeros(3)}, tmp_path / "vae.safetensors")
    one_line_error(tmp_path / "vae.safetensors", "holds no MM-DiT weights")


def test_unknown_suffix_and_empty_dir(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    one_line_error(tmp_path / "model.gguf", "unknown checkpoint type")
    (tmp_path / "empty").mkdir()
    one_line_error(tmp_path / "empty", "no diffusers transformer weights")


def test_truncated_file(tmp_path):
    save_mmdit(MMDiT(model_preset("tiny")), tmp_path / "m.safetensors", "sai")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    one_line_error(tmp_path / "cut.safetensors", "not a readable safetensors file")


def test_missing_tensor(tmp_path):
    save_mmdit(MMDiT(model_preset("tiny")), tmp_path / "m.safetensors", "sai")
    state = load_file(tmp_path / "m.safetensors")
    del state[SAI_PREFIX + "joint_blocks.1.x_block.mlp.fc2.weight"]
    save_file(state, tmp_path / "partial.safetensors")
    one_line_error(tmp_path / "partial.safetensors", "missing 1 tensors")


def test_pickle_needs_opt_in(tmp_path):
    model = MMDiT(model_preset("tiny"))
    torch.save({"state_dict": model.state_dict()}, tmp_path / "m.ckpt")
    one_line_error(tmp_path / "m.ckpt", "is a pickle file.*allow_pickle=True")
    loaded = load_mmdit(tmp_path / "m.ckpt", allow_pickle=True)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_unknown_save_format(tmp_path):
    with pytest.raises(CheckpointError, match="accepted: native, diffusers, sai"):
        save_mmdit(MMDiT(model_preset("tiny")), tmp_path / "m", "ckpt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_parity_at_real_widths(tmp_path):
    """The paper's d12 shape at SD3's real widths (heads of 64, context 4096, pooled 2048, a 192 table) with QK norm
    and an MMDiT-X block: numerics hold at full width, not only at toy sizes."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    ref = SD3Transformer2DModel(num_layers=12, attention_head_dim=64, num_attention_heads=12,
                                caption_projection_dim=768, pos_embed_max_size=192, qk_norm="rms_norm",
                                dual_attention_layers=(0,)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    ref.save_pretrained(tmp_path / "t")
    model = load_mmdit(tmp_path / "t")
    inp = tiny_inputs(batch=1, height=32, width=24, context_len=154, context_dim=4096, pooled_dim=2048)
    assert (ours_out(model, **inp) - diffusers_out(ref, **inp)).abs().max() <= TOL


def test_broken_index_and_config_json(tmp_path):
    ref = tiny_diffusers_transformer()
    ref.save_pretrained(tmp_path / "t", max_shard_size="20KB")
    (tmp_path / "t" / "diffusion_pytorch_model.safetensors.index.json").write_text('{"metadata": {}}')
    one_line_error(tmp_path / "t", "has no weight_map")
    (tmp_path / "t" / "config.json").write_text("{not json")
    one_line_error(tmp_path / "t", "is not readable JSON")
