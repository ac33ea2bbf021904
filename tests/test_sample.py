"""sample.py end to end on a tiny pipeline: the image diffusers' StableDiffusion3Pipeline makes, and clean failures."""

import importlib.util
import re
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sample_cli", ROOT / "sample.py")
sample_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sample_cli)

PROMPT = "a photo of a red circle left of a blue square"
COMMON = ["--steps", "4", "--cfg", "5", "--width", "64", "--height", "48", "--max-sequence-length", "40"]


def diffusers_images(model_dir, seeds, no_t5=False, **kwargs):
    from diffusers import StableDiffusion3Pipeline

    extra = dict(text_encoder_3=None, tokenizer_3=None) if no_t5 else {}
    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, **extra)
    args = dict(num_inference_steps=4, guidance_scale=5.0, width=64, height=48, max_sequence_length=40)
    args.update(kwargs)
    out = pipe([PROMPT] * len(seeds), generator=[torch.Generator().manual_seed(s) for s in seeds],
               output_type="np", **args).images
    return (out * 255).round().astype(np.uint8)


def read(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float64)


def assert_same_image(ours, theirs):
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).mean() <= 0.5 / 255 * 255  # mean abs difference <= 0.5/255 of the range
    assert ours.std() > 5  # a real picture, not a constant


@pytest.mark.parametrize("no_t5", [False, True])
def test_sample_equals_diffusers(tiny_pipeline, tmp_path, no_t5):
    out = tmp_path / "img.png"
    sample_cli.main(["--model", str(tiny_pipeline), "--prompt", PROMPT, "--seed", "7", "--out", str(out), *COMMON,
                     *(["--no-t5"] if no_t5 else [])])
    assert_same_image(read(out), diffusers_images(tiny_pipeline, [7], no_t5=no_t5)[0])
    info = Image.open(out).text
    assert info["prompt"] == PROMPT
    params = json.loads(info["parameters"])
    assert params["seed"] == 7 and params["steps"] == 4 and params["t5"] is (not no_t5) and params["shift"] == 3.0


def test_single_file_gives_the_same_image(tiny_pipeline, tiny_single_file, tmp_path):
    out = tmp_path / "img.png"
    sample_cli.main(["--model", str(tiny_single_file), "--t5-tokenizer", str(tiny_pipeline / "tokenizer_3"),
                     "--prompt", PROMPT, "--seed", "7", "--out", str(out), *COMMON])
    assert_same_image(read(out), diffusers_images(tiny_pipeline, [7])[0])


def test_batch_and_several_images_follow_the_seed_rule(tiny_pipeline, tmp_path):
    sample_cli.main(["--model", str(tiny_pipeline), "--prompt", PROMPT, "--seed", "3", "--num-images", "3",
                     "--batch-size", "2", "--out", str(tmp_path / "dir"), *COMMON])
    written = sorted((tmp_path / "dir").glob("*.png"))
    assert [p.name for p in written] == ["00000.png", "00001.png", "00002.png"]
    reference = diffusers_images(tiny_pipeline, [3, 4, 5])
    for path, ref in zip(written, reference):
        assert_same_image(read(path), ref)


def test_skip_layer_guidance_equals_diffusers(tiny_pipeline, tmp_path):
    out = tmp_path / "slg.png"
    sample_cli.main(["--model", str(tiny_pipeline), "--prompt", PROMPT, "--seed", "1", "--out", str(out),
                     "--steps", "20", "--cfg", "5", "--width", "64", "--height", "48",
                     "--max-sequence-length", "40", "--slg-layers", "1"])
    ref = diffusers_images(tiny_pipeline, [1], num_inference_steps=20, skip_guidance_layers=[1])[0]
    assert_same_image(read(out), ref)
    plain = diffusers_images(tiny_pipeline, [1], num_inference_steps=20)[0]
    assert np.abs(read(out) - plain).max() > 0  # guidance really changed the image (a few early steps only)


# ---- bad input: one line on stderr, exit 2, nothing written ----------------------------------------------------

def run_failing(argv, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        sample_cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sample.py: error: ") and "\n" not in err
    return err


def test_missing_model_lists_accepted_layouts(tmp_path, capsys):
    err = run_failing(["--model", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "o" / "a.png")],
                      capsys, tmp_path)
    assert "does not exist" in err and "diffusers SD3 pipeline directory" in err and "Stability single file" in err
    assert not (tmp_path / "o").exists()


def test_unreadable_model_file(tmp_path, capsys):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 64)
    err = run_failing(["--model", str(bad), "--prompt", "x", "--out", str(tmp_path / "a.png")], capsys, tmp_path)
    assert "not a readable safetensors file" in err and not (tmp_path / "a.png").exists()


@pytest.mark.parametrize("size,match", [(("60", "48"), "--width must be a multiple of 8"),   # before loading
                                        (("64", "40"), "multiples of 16 for this model")])   # VAE 8 x patch 2
def test_size_not_a_multiple_of_16(tiny_pipeline, tmp_path, capsys, size, match):
    err = run_failing(["--model", str(tiny_pipeline), "--prompt", "x", "--width", size[0], "--height", size[1],
                       "--out", str(tmp_path / "a.png")], capsys, tmp_path)
    assert match in err and not (tmp_path / "a.png").exists()


def test_model_without_t5_needs_no_t5(tiny_pipeline_without_t5, tmp_path, capsys):
    err = run_failing(["--model", str(tiny_pipeline_without_t5), "--prompt", "x", "--out", str(tmp_path / "a.png"),
                       *COMMON], capsys, tmp_path)
    assert "--no-t5" in err and not (tmp_path / "a.png").exists()


def test_unwritable_out(tiny_pipeline, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    err = run_failing(["--model", str(tiny_pipeline), "--prompt", "x", "--out", str(blocker / "sub" / "a.png")],
                      capsys, tmp_path)
    assert "cannot write --out" in err


def test_pickle_weights_need_opt_in(tiny_pipeline, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file

    model = tmp_path / "pipe"
    shutil.copytree(tiny_pipeline, model)
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), model / "transformer" / "diffusion_pytorch_model.bin")
    weights.unlink()
    err = run_failing(["--model", str(model), "--prompt", "x", "--out", str(tmp_path / "a.png"), *COMMON],
                      capsys, tmp_path)
    assert "pickle" in err and "allow_pickle" in err and not (tmp_path / "a.png").exists()
    sample_cli.main(["--model", str(model), "--prompt", PROMPT, "--seed", "7", "--allow-pickle",
                     "--out", str(tmp_path / "a.png"), *COMMON])
    assert_same_image(read(tmp_path / "a.png"), diffusers_images(tiny_pipeline, [7])[0])


def test_real_process_exit_code(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(tmp_path / "none"),
                             "--prompt", "x", "--out", str(tmp_path / "a.png")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("sample.py: error: model")


def test_hub_id_offline_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    err = run_failing(["--model", "nobody-here/no-such-sd3", "--prompt", "x", "--out", str(tmp_path / "a.png")],
                      capsys, tmp_path)
    assert "could not be fetched from the hub" in err and not (tmp_path / "a.png").exists()


def test_clip_g_from_an_open_clip_file_gives_the_same_image(tiny_pipeline, tmp_path):
    """CLIP-G replaced by the same tower stored in open_clip's layout: the image does not change."""
    from safetensors.torch import save_file
    from transformers import CLIPTextModelWithProjection

    state = CLIPTextModelWithProjection.from_pretrained(tiny_pipeline / "text_encoder_2").state_dict()
    layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers."))
    oc = {"token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
          "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
          "ln_final.weight": state["text_model.final_layer_norm.weight"],
          "ln_final.bias": state["text_model.final_layer_norm.bias"],
          "text_projection": state["text_projection.weight"].t().contiguous()}
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}."
        q = f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            oc[q + f"attn.in_proj_{kind}"] = torch.cat([state[p + f"self_attn.{n}_proj.{kind}"] for n in "qkv"])
            for ours, theirs in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                                 ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")):
                oc[q + f"{theirs}.{kind}"] = state[p + f"{ours}.{kind}"]
    save_file(oc, tmp_path / "open_clip_bigG.safetensors")
    out = tmp_path / "img.png"
    sample_cli.main(["--model", str(tiny_pipeline), "--clip-g", str(tmp_path / "open_clip_bigG.safetensors"),
                     "--prompt", PROMPT, "--seed", "7", "--out", str(out), *COMMON])
    assert_same_image(read(out), diffusers_images(tiny_pipeline, [7])[0])


def test_single_file_with_text_encoders_beside_it(tiny_pipeline, tiny_single_file, tmp_path):
    """Stability's layout for SD3.5: the model file holds MM-DiT and VAE; text_encoders/clip_l.safetensors,
    clip_g.safetensors and t5xxl_fp16.safetensors lie beside it. Prompts come from a file."""
    from safetensors.torch import load_file, save_file

    everything = load_file(tiny_single_file)
    (tmp_path / "text_encoders").mkdir()
    for role, name in (("clip_l", "clip_l"), ("clip_g", "clip_g"), ("t5xxl", "t5xxl_fp16")):
        prefix = f"text_encoders.{role}.transformer."
        save_file({k[len(prefix):]: v for k, v in everything.items() if k.startswith(prefix)},
                  tmp_path / "text_encoders" / f"{name}.safetensors")
    save_file({k: v for k, v in everything.items() if not k.startswith("text_encoders.")},
              tmp_path / "sd3.5_tiny.safetensors")
    (tmp_path / "prompts.txt").write_text(f"{PROMPT}\n\n")
    out = tmp_path / "img.png"
    sample_cli.main(["--model", str(tmp_path / "sd3.5_tiny.safetensors"), "--prompts-file",
                     str(tmp_path / "prompts.txt"), "--t5-tokenizer", str(tiny_pipeline / "tokenizer_3"),
                     "--seed", "7", "--out", str(out), *COMMON])
    assert_same_image(read(out), diffusers_images(tiny_pipeline, [7])[0])


@pytest.mark.parametrize("extra,match", [
    (["--shift", "0"], r"--shift must be a finite number in \(0, 100\]"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--width", "528"], "exceeds this model's position table: sides up to 512 px"),
    (["--device", "bogus"], "unknown --device"),
    (["--slg-layers", "99"], r"--slg-layers \[99\] lie outside blocks 0..1"),
])
def test_more_bad_options(tiny_pipeline, tmp_path, capsys, extra, match):
    err = run_failing(["--model", str(tiny_pipeline), "--prompt", "x", "--out", str(tmp_path / "a.png"), *COMMON,
                       *extra], capsys, tmp_path)
    assert re.search(match, err) and not (tmp_path / "a.png").exists()


def test_recommended_blocks_the_model_lacks_are_named_as_the_folders(tiny_pipeline, tmp_path, capsys):
    """Skip-layer guidance a model folder recommends but its MM-DiT lacks fails with one line that names the file,
    not a flag the user never typed; --slg-layers overrides it."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline, model)
    (model / "mmdit_sampling.json").write_text('{"slg_layers": [5]}')
    err = run_failing(["--model", str(model), "--prompt", "x", "--out", str(tmp_path / "a.png"), *COMMON],
                      capsys, tmp_path)
    assert "blocks [5] that" in err and "mmdit_sampling.json recommends lie outside blocks 0..1" in err
    assert not (tmp_path / "a.png").exists()
    sample_cli.main(["--model", str(model), "--prompt", "x", "--out", str(tmp_path / "b.png"), *COMMON,
                     "--slg-layers"])
    assert json.loads(Image.open(tmp_path / "b.png").text["parameters"])["slg_layers"] == []


def test_out_is_a_directory_and_prompts_file_not_text(tiny_pipeline, tmp_path, capsys):
    (tmp_path / "taken.png").mkdir()
    err = run_failing(["--model", str(tiny_pipeline), "--prompt", "x", "--out", str(tmp_path / "taken.png")],
                      capsys, tmp_path)
    assert "is a directory" in err
    (tmp_path / "prompts.txt").write_bytes(b"\xff\xfe\x00bad")
    err = run_failing(["--model", str(tiny_pipeline), "--prompts-file", str(tmp_path / "prompts.txt"),
                       "--out", str(tmp_path / "a.png")], capsys, tmp_path)
    assert "is not UTF-8 text" in err


def test_written_files_get_ordinary_permissions(tiny_pipeline, tmp_path):
    import os
    import stat

    out = tmp_path / "img.png"
    sample_cli.main(["--model", str(tiny_pipeline), "--prompt", PROMPT, "--out", str(out), *COMMON])
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
