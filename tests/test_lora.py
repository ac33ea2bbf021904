"""LoRA (mmdit.lora): peft adapters on our fused modules, exact in diffusers' and kohya's layouts; sample.py --lora
draws what diffusers' load_lora_weights draws; bad LoRAs are one line."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mmdit import lora
from mmdit.checkpoint import load_mmdit, save_mmdit
from mmdit.config import model_preset
from mmdit.model import MMDiT
from tests.test_sample import COMMON, PROMPT, assert_same_image, diffusers_images, read, sample_cli


def random_lora(model, spec, seed=0, std=0.05):
    """The model with adapters whose A and B are random (B starts at zero otherwise), and their state."""
    lora.add_lora(model, spec)
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) * std for k, v in lora.trained_lora(model).items()}
    lora.load_lora_state(model, state)
    return state


def test_fused_qkv_splits_exactly_into_q_k_v():
    config = model_preset("tiny")
    model = MMDiT(config)
    spec = lora.LoraSpec(rank=4, alpha=6)
    state = random_lora(model, spec)
    exported = lora.to_diffusers_lora(state, config, spec.scale)
    module = "joint_blocks.0.x_block.attn.qkv"
    fused = spec.scale * state[f"{module}.lora_B.weight"] @ state[f"{module}.lora_A.weight"]
    parts = [exported[f"transformer.transformer_blocks.0.attn.to_{n}.lora_B.weight"]
             @ exported[f"transformer.transformer_blocks.0.attn.to_{n}.lora_A.weight"] for n in "qkv"]
    assert torch.allclose(fused, torch.cat(parts), atol=1e-6, rtol=0)
    assert "transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight" in exported   # the text stream too
    # the adapted model's every output equals the base plus the delta-W
    x, s = torch.randn(2, 16, 8, 8), torch.rand(2)
    c, p = torch.randn(2, 6, config.context_dim), torch.randn(2, config.pooled_dim)
    with torch.no_grad():
        for q in model.parameters():
            if not q.requires_grad:
                q.add_(torch.randn_like(q) * 0.05)   # a base that is not zero-initialised
        adapted = model(x, s, c, p)
    base = MMDiT(config)
    base.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k})
    with torch.no_grad():
        before = base(x, s, c, p)
        lora.apply_loras(base, [(_saved(exported), 1.0)])
        after = base(x, s, c, p)
    assert (adapted - before).abs().mean() > 1e-4 and torch.allclose(after, adapted, atol=1e-6, rtol=0)


_counter = [0]


def _saved(tensors, folder=None, name=None):
    import tempfile
    from pathlib import Path

    _counter[0] += 1
    path = Path(folder or tempfile.mkdtemp()) / (name or f"lora{_counter[0]}.safetensors")
    save_file(tensors, path)
    return str(path)


def test_kohya_layout_follows_comfyui_key_rules_and_converts_back():
    """ComfyUI's LoRA loader maps, for every model weight model.diffusion_model.K.weight, the key
    lora_unet_ + K with dots as underscores (comfy/lora.py, model_lora_keys_unet), with lora_up / lora_down / alpha
    (kohya's names): the file must use exactly those keys, and read back to the same delta-W."""
    config = model_preset("tiny")
    model = MMDiT(config)
    spec = lora.LoraSpec(rank=4, alpha=2)
    state = random_lora(model, spec)
    kohya = lora.to_kohya_lora(state, spec.alpha)
    sai_weights = [k for k in MMDiT(config).state_dict() if k.endswith(".weight")]   # Stability's names (ours)
    comfy_keys = {"lora_unet_" + k[: -len(".weight")].replace(".", "_") for k in sai_weights}
    modules = {k.rsplit(".", 2)[0] for k in kohya}
    assert modules and modules <= comfy_keys
    assert all(float(kohya[f"{m}.alpha"]) == 2 for m in modules)
    back = lora.deltas(_saved(kohya), config)
    for module in back:
        expected = spec.scale * state[f"{module}.lora_B.weight"] @ state[f"{module}.lora_A.weight"]
        assert torch.allclose(back[module], expected, atol=1e-6, rtol=0)
    diffusers = lora.deltas(_saved(lora.to_diffusers_lora(state, config, spec.scale)), config)
    assert set(diffusers) == set(back) and all(torch.allclose(diffusers[m], back[m], atol=1e-6) for m in back)


@pytest.fixture(scope="module")
def tiny_lora(tiny_pipeline, tmp_path_factory):
    """A random rank-4 LoRA for the tiny pipeline's transformer, in all three layouts."""
    folder = tmp_path_factory.mktemp("lora")
    model = load_mmdit(tiny_pipeline / "transformer")
    spec = lora.LoraSpec(rank=4, alpha=8)
    state = random_lora(model, spec, std=0.2)
    paths = {"diffusers": _saved(lora.to_diffusers_lora(state, model.config, spec.scale), folder, "diffusers.safetensors"),
             "kohya": _saved(lora.to_kohya_lora(state, spec.alpha), folder, "kohya.safetensors"),
             "ours": str(folder / "ours.safetensors"),
             # as diffusers' own scripts save it: B as trained, alpha in the adapter metadata
             "diffusers_alpha": str(folder / "diffusers_alpha.safetensors")}
    save_file(lora.to_diffusers_lora(state, model.config, 1.0), folder / "diffusers_alpha.safetensors",
              metadata={"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8})})
    save_file(state, folder / "ours.safetensors", metadata={"mmdit_lora": json.dumps({"rank": 4, "alpha": 8})})
    return paths


def test_sample_with_lora_equals_diffusers_load_lora_weights(tiny_pipeline, tiny_lora, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    theirs_pipe = StableDiffusion3Pipeline.from_pretrained(tiny_pipeline)
    theirs_pipe.load_lora_weights(tiny_lora["diffusers"])
    args = dict(num_inference_steps=4, guidance_scale=5.0, width=64, height=48, max_sequence_length=40)
    theirs = theirs_pipe([PROMPT], generator=[torch.Generator().manual_seed(3)], output_type="np", **args).images
    theirs = (theirs * 255).round().astype(np.uint8)[0]
    plain = diffusers_images(tiny_pipeline, [3])[0]
    assert np.abs(theirs.astype(float) - plain).mean() > 2   # the LoRA changes the picture
    for layout in ("diffusers", "kohya", "ours", "diffusers_alpha"):
        out = tmp_path / f"{layout}.png"
        sample_cli.main(["--model", str(tiny_pipeline), "--prompt", PROMPT, "--seed", "3", "--out", str(out),
                         *COMMON, "--lora", tiny_lora[layout]])
        assert_same_image(read(out), theirs)
    # the merged model, saved and loaded as a whole, draws it too
    merged = load_mmdit(tiny_pipeline / "transformer")
    lora.apply_loras(merged, [(tiny_lora["kohya"], 1.0)])
    single = tmp_path / "merged.safetensors"
    save_mmdit(merged, single, "sai")
    # half a LoRA is half the delta: scale 0.5 twice equals scale 1 once
    twice = tmp_path / "twice.png"
    sample_cli.main(["--model", str(tiny_pipeline), "--prompt", PROMPT, "--seed", "3", "--out", str(twice), *COMMON,
                     "--lora", f"{tiny_lora['kohya']}:0.5", f"{tiny_lora['diffusers']}:0.5"])
    assert_same_image(read(twice), theirs)
    from PIL import Image

    recorded = json.loads(Image.open(twice).text["parameters"])["loras"]
    assert [scale for _, scale, _ in recorded] == [0.5, 0.5] and len(recorded[0][2]) == 64   # path, scale, sha256


def test_bad_loras_are_one_line(tiny_pipeline, tiny_lora, tmp_path, capsys):
    deeper = MMDiT(model_preset("tiny").__class__(**{**model_preset("tiny").to_dict(), "depth": 5}))
    state = random_lora(deeper, lora.LoraSpec(rank=2))
    other_depth = _saved(lora.to_kohya_lora(state, 2), tmp_path, "deeper.safetensors")
    pickled = tmp_path / "lora.pt"
    torch.save({}, pickled)
    cases = [([other_depth], "(another architecture"),
             ([str(pickled)], "is not a .safetensors file; pickle files are read only with --allow-pickle"),
             ([f"{tiny_lora['kohya']}:strong"], "the scale after ':' must be a number, got 'strong'"),
             ([str(tmp_path / "missing.safetensors")], "is not a file")]
    for lora_args, match in cases:
        out = tmp_path / "never.png"
        with pytest.raises(SystemExit) as err:
            sample_cli.main(["--model", str(tiny_pipeline), "--prompt", PROMPT, "--out", str(out), *COMMON,
                             "--lora", *lora_args])
        message = capsys.readouterr().err
        assert err.value.code == 2 and match in message and len(message.strip().splitlines()) == 1, message
        assert not out.exists()


# ---- training ---------------------------------------------------------------------------------------------------

def lora_recipe(tiny_pipeline, shard_root, out, steps, *extra):
    from tests.test_train import ROOT

    return ["--config", str(ROOT / "configs" / "tiny.yaml"), f"data.shards={shard_root / 'train'}",
            f"model.init_from={tiny_pipeline}", "model.lora={rank: 4, alpha: 8, dropout: 0.1}", f"train.out_dir={out}",
            f"train.steps={steps}", "train.log_every=1", "data.batch_size=2", "train.checkpoint_every=3",
            "train.keep_checkpoints=5", "data.caption_variant_probs=[1]", "optim.lr=1e-2", "train.val_every=1000",
            *extra]


def test_lora_training_resumes_exactly_saves_adapters_only_and_exports_every_layout(tiny_pipeline, tmp_path):
    import shutil

    from diffusers import StableDiffusion3Pipeline
    from safetensors import safe_open
    from safetensors.torch import load_file

    from tests.test_train import losses, make_pipeline_shards, train_cli

    make_pipeline_shards(tmp_path / "train", 2, 6)
    train_cli.main(lora_recipe(tiny_pipeline, tmp_path, tmp_path / "whole", 6))
    train_cli.main(lora_recipe(tiny_pipeline, tmp_path, tmp_path / "split", 3))
    train_cli.main(lora_recipe(tiny_pipeline, tmp_path, tmp_path / "split", 6) + ["--resume", "latest"])
    assert losses(tmp_path / "split") == losses(tmp_path / "whole") and len(losses(tmp_path / "whole")) == 6
    whole, split = (tmp_path / r / "checkpoints" / "step_00000006" for r in ("whole", "split"))
    # a resume that would change what the adapters mean is refused with one line
    for changed, match in ((["model.lora={rank: 4, alpha: 16, dropout: 0.1}"], "alpha 8"),
                           (["model.lora={}"], "resume with its model.lora")):
        with pytest.raises(SystemExit) as err:
            train_cli.main(lora_recipe(tiny_pipeline, tmp_path, tmp_path / "split", 9, *changed)
                           + ["--resume", "latest"])
        assert err.value.code == 2
    for name in ("lora.safetensors", "ema_lora.safetensors"):
        a, b = load_file(whole / name), load_file(split / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the checkpoint holds the adapters and their optimizer state, never the base
    adapters = load_file(whole / "lora.safetensors")
    count = sum(t.numel() for t in adapters.values())
    base_count = sum(t.numel() for t in load_mmdit(tiny_pipeline / "transformer").state_dict().values())
    assert all(".lora_" in k for k in adapters) and count < base_count / 4
    assert (whole / "lora.safetensors").stat().st_size < count * 4 + 64 * 1024
    assert (whole / "optimizer.pt").stat().st_size < 3 * count * 4 + 256 * 1024   # AdamW: two moments per value
    assert not (whole / "model.safetensors").exists() and not (whole / "ema.safetensors").exists()
    with safe_open(whole / "lora.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["mmdit_lora"])
    assert meta["rank"] == 4 and meta["alpha"] == 8 and len(meta["base_sha256"]) == 64 and meta["recipe"]["model"]
    # the trained adapters moved, and the three exports plus the merged model draw one picture
    assert any(v.abs().max() > 0 for k, v in adapters.items() if "lora_B" in k)
    export = tmp_path / "whole" / "export"
    theirs_pipe = StableDiffusion3Pipeline.from_pretrained(tiny_pipeline)
    theirs_pipe.load_lora_weights(str(export / "lora_diffusers.safetensors"))
    args = dict(num_inference_steps=4, guidance_scale=5.0, width=64, height=48, max_sequence_length=40)
    theirs = theirs_pipe([PROMPT], generator=[torch.Generator().manual_seed(3)], output_type="np", **args).images
    theirs = (theirs * 255).round().astype(np.uint8)[0]
    # the export command on the last checkpoint writes what the run's end wrote
    lora.main(["export", str(whole), "--out", str(tmp_path / "again")])
    for name in ("lora", "lora_diffusers", "lora_kohya"):
        a, b = load_file(export / f"{name}.safetensors"), load_file(tmp_path / "again" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = (load_mmdit(f).state_dict() for f in (export / "ema.safetensors", tmp_path / "again" / "merged.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit):   # another base than the one trained on is refused
        lora.main(["export", str(whole), "--out", str(tmp_path / "never"), "--base",
                   str(tmp_path / "again" / "merged.safetensors")])
    assert not (tmp_path / "never").exists()
    merged = tmp_path / "merged"   # the base pipeline with the merged transformer in place of its own
    shutil.copytree(tiny_pipeline, merged)
    shutil.rmtree(merged / "transformer")
    shutil.copytree(export / "transformer", merged / "transformer")
    for model, lora_file in ((tiny_pipeline, "lora_diffusers"), (tiny_pipeline, "lora_kohya"), (tiny_pipeline, "lora"),
                             (merged, None)):
        out = tmp_path / f"{lora_file}.png"
        extra = ["--lora", str(export / f"{lora_file}.safetensors")] if lora_file else []
        sample_cli.main(["--model", str(model), "--prompt", PROMPT, "--seed", "3", "--out", str(out), *COMMON, *extra])
        assert_same_image(read(out), theirs)


def test_lora_with_two_processes_under_zero2_resumes_exactly(tiny_pipeline, tmp_path):
    from safetensors.torch import load_file

    from tests.test_train import ROOT, make_pipeline_shards

    make_pipeline_shards(tmp_path / "train", 2, 8)
    launcher = ["--use_deepspeed", "--deepspeed_config_file", str(ROOT / "configs" / "deepspeed" / "zero2.json")]
    from tests.test_train import launch_two

    launch_two(launcher, lora_recipe(tiny_pipeline, tmp_path, tmp_path / "whole", 6))
    launch_two(launcher, lora_recipe(tiny_pipeline, tmp_path, tmp_path / "split", 3))
    launch_two(launcher, lora_recipe(tiny_pipeline, tmp_path, tmp_path / "split", 6) + ["--resume", "latest"])
    for log in ("log.jsonl", "log_rank1.jsonl"):
        steps = lambda run: {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / run / log).read_text()
                                                                  .splitlines()) if "loss" in r}
        assert len(steps("whole")) == 6 and steps("split") == steps("whole")
    for name in ("lora.safetensors", "ema_lora.safetensors"):
        a, b = (load_file(tmp_path / r / "checkpoints" / "step_00000006" / name) for r in ("whole", "split"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    engine = tmp_path / "whole" / "checkpoints" / "step_00000006" / "deepspeed"
    base_bytes = sum(f.stat().st_size for f in (tiny_pipeline / "transformer").glob("*.safetensors"))
    assert sum(f.stat().st_size for f in engine.rglob("*") if f.is_file()) < base_bytes   # no base inside


def test_lora_in_bf16_keeps_the_base_in_bf16_and_the_adapters_in_fp32(tiny_pipeline, tmp_path):
    """train.precision=bf16 (one process): the frozen base is loaded in bf16 (half the memory), the adapters,
    their AdamW state and EMA stay fp32; validation and the sample grid run under autocast; resume is exact."""
    from safetensors.torch import load_file

    from tests.test_train import losses, make_pipeline_shards, train_cli

    make_pipeline_shards(tmp_path / "train", 2, 6)
    make_pipeline_shards(tmp_path / "val", 1, 4, seed=1)
    extra = ("train.precision=bf16", f"data.val_shards={tmp_path / 'val'}", "train.val_every=3",
             f"train.sample_model={tiny_pipeline}", "train.sample_steps=2")
    train_cli.main(lora_recipe(tiny_pipeline, tmp_path, tmp_path / "whole", 6, *extra))
    train_cli.main(lora_recipe(tiny_pipeline, tmp_path, tmp_path / "split", 3, *extra))
    train_cli.main(lora_recipe(tiny_pipeline, tmp_path, tmp_path / "split", 6, *extra) + ["--resume", "latest"])
    assert losses(tmp_path / "split") == losses(tmp_path / "whole") and len(losses(tmp_path / "whole")) == 6
    saved = load_file(tmp_path / "whole" / "checkpoints" / "step_00000006" / "ema_lora.safetensors")
    assert all(t.dtype == torch.float32 for t in saved.values())
    records = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert any("val_ema" in r for r in records)
    assert (tmp_path / "whole" / "samples" / "step_00000006.png").is_file()
    # the base the run trained on was bf16: the dtype train.py chose, asked the way build_state asks
    from mmdit.config import load_config

    procs = train_cli.Processes("single", 0, 1, torch.device("cpu"), "bf16")
    cfg = load_config(None, [f"model.init_from={tiny_pipeline}", "model.lora={rank: 4}"])
    assert train_cli.base_dtype(cfg, procs) == torch.bfloat16
    assert train_cli.base_dtype(load_config(None, [f"model.init_from={tiny_pipeline}"]), procs) == torch.float32
