"""Shared fixtures: tiny random models built offline in the real formats."""

import pytest
import torch

# Tiny architectures exercising every variant: plain SD3, QK norm, MMDiT-X layers.
TINY_DIFFUSERS = {
    "sd3": dict(qk_norm=None, dual_attention_layers=()),
    "sd3.5-large-like": dict(qk_norm="rms_norm", dual_attention_layers=()),
    "sd3.5-medium-like": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1)),
}


def tiny_diffusers_transformer(qk_norm=None, dual_attention_layers=(), num_layers=3, seed=0):
    """A diffusers SD3Transformer2DModel at toy size with random (not adaLN-zero) weights, so every path matters."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=num_layers, attention_head_dim=8,
        num_attention_heads=3, joint_attention_dim=40, caption_projection_dim=24, pooled_projection_dim=20,
        out_channels=16, pos_embed_max_size=16, dual_attention_layers=dual_attention_layers, qk_norm=qk_norm)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def tiny_inputs(batch=2, height=8, width=8, context_len=7, context_dim=40, pooled_dim=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(batch, 16, height, width, generator=g), sigma=torch.rand(batch, generator=g),
                context=torch.randn(batch, context_len, context_dim, generator=g),
                pooled=torch.randn(batch, pooled_dim, generator=g))


@pytest.fixture(params=list(TINY_DIFFUSERS))
def diffusers_transformer(request):
    return tiny_diffusers_transformer(**TINY_DIFFUSERS[request.param])


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """A tiny random SD3 pipeline in diffusers' directory format (QK norm and an MMDiT-X block included)."""
    from mmdit.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipeline", seed=0)


@pytest.fixture(scope="session")
def tiny_single_file(tiny_pipeline, tmp_path_factory):
    """The same weights as one Stability-layout all-in-one file."""
    from mmdit.loading import export_single_file

    path = tmp_path_factory.mktemp("tiny_sai") / "tiny_sd3_incl_clips_t5.safetensors"
    export_single_file(tiny_pipeline, path)
    return path


@pytest.fixture(scope="session")
def tiny_pipeline_without_t5(tiny_pipeline, tmp_path_factory):
    """The pipeline as shipped without T5: no text_encoder_3 / tokenizer_3."""
    import json
    import shutil

    path = tmp_path_factory.mktemp("tiny_no_t5") / "pipeline"
    shutil.copytree(tiny_pipeline, path, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    index = json.loads((path / "model_index.json").read_text())
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    (path / "model_index.json").write_text(json.dumps(index))
    return path
