"""Text encoders and assembly against diffusers' encode_prompt, for the same components."""

import logging

import pytest
import torch

from mmdit.config import TextLayout
from mmdit.text import (CLIP_BOS, CLIP_EOS, assemble, clip_token_ids, clip_tokenizer_from_open_clip,
                        load_diffusers_text_encoders, sample_keep, t5_token_ids)

PROMPTS = {
    "short": "a photo of a red circle left of a blue square",
    "empty": "",
    "long": "a photo of " + ", ".join(f"a red circle number {i}" for i in range(40)),
}


def test_clip_tokenizer_from_open_clip_matches_open_clip():
    import open_clip

    ours = clip_tokenizer_from_open_clip()
    reference = open_clip.get_tokenizer("ViT-L-14")
    for prompt in [*PROMPTS.values(), "Über Café!!  weird   spacing, 3 CATS."]:
        expected = reference([prompt])[0].tolist()
        ids = clip_token_ids(ours, [prompt], pad_id=0)[0].tolist()
        assert ids == expected  # open_clip pads with 0 and truncates to BOS + 75 + EOS, like CLIP-G


def test_token_layout_and_truncation_warning(caplog):
    tok = clip_tokenizer_from_open_clip()
    ids = clip_token_ids(tok, ["a photo"], pad_id=CLIP_EOS)[0].tolist()
    assert ids[:4] == [CLIP_BOS, 320, 1125, CLIP_EOS] and set(ids[4:]) == {CLIP_EOS} and len(ids) == 77
    with caplog.at_level(logging.WARNING, logger="mmdit.text"):
        clip_token_ids(tok, [PROMPTS["long"]], pad_id=0, name="CLIP-G")
    assert "CLIP-G keeps 75 of" in caplog.text and "dropped" in caplog.text


@pytest.fixture(scope="module")
def encoders(tiny_pipeline):
    return load_diffusers_text_encoders(tiny_pipeline, t5_tokens=40)


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_pipeline):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(tiny_pipeline)


@pytest.mark.parametrize("which", list(PROMPTS))
def test_encoders_and_assembly_equal_diffusers_encode_prompt(encoders, diffusers_pipe, which):
    prompt = PROMPTS[which]
    with torch.no_grad():
        ref_l, ref_l_pooled = diffusers_pipe._get_clip_prompt_embeds(prompt, clip_model_index=0)
        ref_g, ref_g_pooled = diffusers_pipe._get_clip_prompt_embeds(prompt, clip_model_index=1)
        ref_t5 = diffusers_pipe._get_t5_prompt_embeds(prompt, max_sequence_length=40)
        ref_context, _, ref_pooled, _ = diffusers_pipe.encode_prompt(
            prompt, prompt, prompt, do_classifier_free_guidance=False, max_sequence_length=40)
    out = encoders.encode([prompt])
    torch.testing.assert_close(out["clip_l"][0], ref_l, rtol=0, atol=1e-6)
    torch.testing.assert_close(out["clip_l"][1], ref_l_pooled, rtol=0, atol=1e-6)   # identity projection
    torch.testing.assert_close(out["clip_g"][0], ref_g, rtol=0, atol=1e-6)
    torch.testing.assert_close(out["clip_g"][1], ref_g_pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(out["t5"], ref_t5, rtol=0, atol=1e-6)
    context, pooled = encoders.conditioning([prompt])
    assert context.shape == (1, 77 + 40, 256) and pooled.shape == (1, 64 + 128)
    torch.testing.assert_close(context, ref_context, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=1e-6)


def test_no_t5_equals_diffusers_without_t5(tiny_pipeline_without_t5):
    from diffusers import StableDiffusion3Pipeline

    ref = StableDiffusion3Pipeline.from_pretrained(tiny_pipeline_without_t5, text_encoder_3=None, tokenizer_3=None)
    ours = load_diffusers_text_encoders(tiny_pipeline_without_t5, no_t5=True, t5_tokens=256, context_dim=256)
    with torch.no_grad():
        ref_context, _, ref_pooled, _ = ref.encode_prompt(PROMPTS["short"], None, None,
                                                          do_classifier_free_guidance=False)
    context, pooled = ours.conditioning([PROMPTS["short"]])
    torch.testing.assert_close(context, ref_context, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=1e-6)
    assert torch.count_nonzero(context[:, 77:]) == 0


def test_model_without_t5_needs_no_t5(tiny_pipeline_without_t5):
    with pytest.raises(ValueError, match="has no T5 encoder.*--no-t5"):
        load_diffusers_text_encoders(tiny_pipeline_without_t5)


def test_assemble_layout_and_zero_convention():
    layout = TextLayout(clip_l_dim=3, clip_g_dim=5, context_dim=12, clip_tokens=4, t5_tokens=6)
    B = 2
    l = (torch.randn(B, 4, 3), torch.randn(B, 3))
    g = (torch.randn(B, 4, 5), torch.randn(B, 5))
    t5 = torch.randn(B, 6, 12)
    context, pooled = assemble(layout, B, clip_l=l, clip_g=g, t5=t5)
    assert context.shape == (B, 10, 12) and pooled.shape == (B, 8)
    torch.testing.assert_close(context[:, :4, :3], l[0])          # CLIP-L, then CLIP-G on channels
    torch.testing.assert_close(context[:, :4, 3:8], g[0])
    assert torch.count_nonzero(context[:, :4, 8:]) == 0          # zero-padded to T5's width
    torch.testing.assert_close(context[:, 4:], t5)               # T5 after the CLIP rows
    torch.testing.assert_close(pooled, torch.cat([l[1], g[1]], -1))

    # An absent encoder and a dropped one are the same zeros: --no-t5 sees what training's dropout taught.
    no_t5, _ = assemble(layout, B, clip_l=l, clip_g=g, t5=None)
    dropped, _ = assemble(layout, B, clip_l=l, clip_g=g, t5=t5, keep={"t5": torch.tensor([False, False])})
    assert torch.equal(no_t5, dropped) and torch.count_nonzero(no_t5[:, 4:]) == 0
    part, part_pooled = assemble(layout, B, clip_l=l, clip_g=g, t5=t5, keep={"clip_l": torch.tensor([True, False])})
    assert torch.equal(part[0], context[0]) and torch.count_nonzero(part[1, :4, :3]) == 0
    assert torch.count_nonzero(part_pooled[1, :3]) == 0 and torch.equal(part_pooled[1, 3:], pooled[1, 3:])
    nothing, nothing_pooled = assemble(layout, B)
    assert nothing.shape == (B, 10, 12) and torch.count_nonzero(nothing) == 0 and nothing_pooled.shape == (B, 8)
    with pytest.raises(ValueError, match="t5 output has shape"):
        assemble(layout, B, t5=torch.randn(B, 5, 12))


def test_sample_keep_rate():
    keep = sample_keep(20000, {"clip_l": 0.463, "clip_g": 0.463, "t5": 0.463}, torch.Generator().manual_seed(0))
    for mask in keep.values():
        assert abs((~mask).float().mean().item() - 0.463) < 0.015
    assert not torch.equal(keep["clip_l"], keep["t5"])  # independent


def test_t5_token_layout(encoders):
    ids = t5_token_ids(encoders.t5.tokenizer, ["a photo of a red circle"], 30)[0].tolist()
    eos = ids.index(1)
    assert eos > 0 and set(ids[eos + 1:]) == {0} and len(ids) == 30


def test_single_file_encoders_equal_directory_encoders(tiny_single_file, tiny_pipeline, encoders):
    from transformers import AutoTokenizer

    from mmdit.checkpoint import read_safetensors
    from mmdit.text import clip_from_state, t5_from_state

    prefix = "text_encoders.{}.transformer."
    tok = clip_tokenizer_from_open_clip()
    clip_l = clip_from_state(read_safetensors(tiny_single_file, prefix.format("clip_l"))[0], "clip_l", tok)
    clip_g = clip_from_state(read_safetensors(tiny_single_file, prefix.format("clip_g"))[0], "clip_g", tok)
    t5 = t5_from_state(read_safetensors(tiny_single_file, prefix.format("t5xxl"))[0],
                       AutoTokenizer.from_pretrained(tiny_pipeline / "tokenizer_3"))
    prompt = [PROMPTS["short"]]
    for ours, ref in ((clip_l(prompt), encoders.clip_l(prompt)), (clip_g(prompt), encoders.clip_g(prompt))):
        torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(ours[1], ref[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(t5(prompt, 40), encoders.t5(prompt, 40), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="CLIP-G weights lack text_projection"):
        state = read_safetensors(tiny_single_file, prefix.format("clip_g"))[0]
        state.pop("text_projection.weight")
        clip_from_state(state, "clip_g", tok)


def test_clip_g_through_open_clip_matches_open_clip():
    """An open_clip text tower (the family CLIP-G comes from), converted, gives open_clip's own pooled output and
    its penultimate block's token states."""
    import open_clip

    from mmdit.text import clip_from_state, open_clip_text_to_transformers

    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=48, vision_cfg=open_clip.CLIPVisionCfg(layers=1, width=64, patch_size=16,
                                                                             image_size=32),
                           text_cfg=open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=128, heads=2,
                                                          layers=3)).eval()
    tok = clip_tokenizer_from_open_clip()
    ours = clip_from_state(open_clip_text_to_transformers(model.state_dict()), "clip_g", tok)
    prompts = [PROMPTS["short"], PROMPTS["empty"]]
    ids = clip_token_ids(tok, prompts, pad_id=0)
    captured = {}
    hook = model.transformer.resblocks[-2].register_forward_hook(lambda m, i, o: captured.update(x=o))
    with torch.no_grad():
        pooled_ref = model.encode_text(ids)
    hook.remove()
    tokens_ref = captured["x"] if model.transformer.batch_first else captured["x"].transpose(0, 1)
    tokens, pooled = ours(prompts)
    torch.testing.assert_close(pooled, pooled_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(tokens, tokens_ref, rtol=0, atol=1e-5)
