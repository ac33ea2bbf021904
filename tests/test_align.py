"""Representation alignment (mmdit.align): the encoder's folder round-trips and bad ones are refused, targets come
in the MM-DiT's token order, the kept block output is the block's, and train.py with align.weight > 0 trains the
projector, checkpoints it and resumes bit for bit, in one process and in two (DDP and DeepSpeed ZeRO-3)."""

import json

import pytest
import torch

from mmdit.align import (Alignment, BlockOutput, FeatureEncoder, alignment_loss, feature_tokens, load_encoder,
                         save_encoder)
from mmdit.checkpoint import load_mmdit
from mmdit.config import model_preset
from mmdit.model import MMDiT
from tests.test_train import (ROOT, args, launch_two, losses, make_pipeline_shards, shard_dir,  # noqa: F401
                              train_cli, zero3_file)


def test_encoder_folder_round_trips_and_bad_ones_fail(tmp_path):
    torch.manual_seed(0)
    encoder = FeatureEncoder(16, width=16, dim=8)
    save_encoder(encoder, tmp_path / "enc")
    loaded = load_encoder(tmp_path / "enc")
    z = torch.randn(2, 16, 8, 8)
    assert torch.equal(loaded(z), encoder(z)) and not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(FileNotFoundError, match="config.json and model.safetensors"):
        load_encoder(tmp_path / "missing")
    (tmp_path / "enc" / "config.json").write_text(json.dumps({"latent_channels": 16, "width": 32, "dim": 8}))
    with pytest.raises(ValueError, match="do not match its config.json"):
        load_encoder(tmp_path / "enc")


def test_targets_follow_the_models_token_order():
    """Patch p: token (r, c) covers latent rows r*p.. and columns c*p..; its target is that patch's mean."""
    features = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    tokens = feature_tokens(features, 1)
    assert tokens.shape == (2, 16, 3) and torch.equal(tokens[1, 4 * 2 + 3], features[1, :, 2, 3])
    pooled = feature_tokens(features, 2)
    assert pooled.shape == (2, 4, 3)
    assert torch.allclose(pooled[0, 1 * 2 + 0], features[0, :, 2:4, 0:2].mean((-1, -2)))
    config = model_preset("tiny")
    model = MMDiT(config)
    x = torch.zeros(1, config.in_channels, 4, 4)
    x[0, :, 2, 3] = 1.0   # one latent pixel lights one token: the one feature_tokens puts at the same index
    patches = model.x_embedder(x) - model.x_embedder(torch.zeros_like(x))
    lit = patches[0].abs().sum(-1).nonzero().flatten().tolist()
    p = config.patch_size
    assert lit == [(2 // p) * (4 // p) + 3 // p]


def test_loss_is_negative_cosine_and_the_kept_output_is_the_blocks():
    a = torch.randn(2, 5, 4)
    assert torch.allclose(alignment_loss(a, 3 * a), torch.tensor(-1.0))
    assert torch.allclose(alignment_loss(a, -a), torch.tensor(1.0))
    torch.manual_seed(0)
    config = model_preset("tiny")
    model = MMDiT(config)
    for p in model.parameters():   # adaLN-zero leaves a fresh block the identity: make the blocks do something
        p.data.normal_(0, 0.05)
    kept = BlockOutput(model, 1)
    x, sigma = torch.randn(2, config.in_channels, 8, 8), torch.tensor([0.3, 0.7])
    context, pooled = torch.randn(2, 5, config.context_dim), torch.randn(2, config.pooled_dim)
    kept.arm()
    model(x, sigma, context, pooled)
    model(x + 1, sigma, context, pooled)   # a second pass (validation, a checkpointed recompute) is not kept
    # the same states by hand: embed, then blocks 0 and 1
    from mmdit.model import timestep_embedding

    c = model.t_embedder(timestep_embedding(sigma * 1000, config.frequency_dim)) + model.y_embedder(pooled)
    h = model.x_embedder(x) + model.cropped_pos_embed(8 // config.patch_size, 8 // config.patch_size)
    ctx = model.context_embedder(context)
    for block in model.joint_blocks[:2]:
        h, ctx = block(h, ctx, c)
    assert torch.allclose(kept.take(), h, atol=1e-6)
    with pytest.raises(RuntimeError, match="did not run"):
        kept.take()
    model(x, sigma, context, pooled)   # unarmed: nothing kept
    with pytest.raises(RuntimeError, match="did not run"):
        kept.take()
    with pytest.raises(ValueError, match="align.block must be a joint block"):
        BlockOutput(model, config.depth)


def test_alignment_trains_the_projector_toward_the_targets():
    torch.manual_seed(0)
    config = model_preset("tiny")
    model = MMDiT(config)
    encoder = FeatureEncoder(config.in_channels, width=16, dim=8).requires_grad_(False)
    align = Alignment(model, encoder, block=0, weight=1.0, projector_width=32)
    x0 = torch.randn(4, config.in_channels, 8, 8)
    args_ = (torch.full((4,), 0.5), torch.randn(4, 5, config.context_dim), torch.randn(4, config.pooled_dim))
    align.output.arm()
    model(x0, *args_)
    align.loss(x0).backward()   # the alignment term reaches the blocks up to the aligned one, and no further
    grads = [sum(p.grad.abs().sum().item() for p in b.parameters() if p.grad is not None) for b in model.joint_blocks]
    assert grads[0] > 0 and all(g == 0 for g in grads[1:])
    model.zero_grad()
    first = None
    for _ in range(30):
        align.output.arm()
        model(x0, *args_)
        loss = align.loss(x0)
        first = loss.item() if first is None else first
        loss.backward()
        align.step(1e-2)
    assert loss.item() < first - 0.2


def test_train_with_alignment_resumes_bit_exact_and_refuses_a_mismatched_resume(shard_dir, tmp_path, capsys):
    torch.manual_seed(0)
    save_encoder(FeatureEncoder(16, width=16, dim=8), tmp_path / "enc")
    common = ("train.log_every=1", "train.checkpoint_every=100", "data.batch_size=3", "align.weight=0.5",
              f"align.encoder={tmp_path / 'enc'}", "align.projector_width=32")
    train_cli.main(args(shard_dir, tmp_path / "one", "train.steps=12", *common))
    train_cli.main(args(shard_dir, tmp_path / "two", "train.steps=6", *common))
    saved = torch.load(tmp_path / "two" / "checkpoints" / "step_00000006" / "state_rank0.pt", weights_only=True)
    assert saved["align"]["optimizer"]["state"]   # the projector's AdamW moments are checkpointed
    train_cli.main(args(shard_dir, tmp_path / "two", "train.steps=12", *common) + ["--resume", "latest"])
    assert losses(tmp_path / "one") == losses(tmp_path / "two")
    records = [json.loads(r) for r in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    aligned = [r["align_loss"] for r in records if "align_loss" in r]
    assert len(aligned) == 12 and all(-1 <= a <= 1 for a in aligned)
    a = load_mmdit(tmp_path / "one" / "checkpoints" / "step_00000012" / "model.safetensors").state_dict()
    b = load_mmdit(tmp_path / "two" / "checkpoints" / "step_00000012" / "model.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the flow loss alone differs from the run with alignment: the auxiliary loss reaches the model
    train_cli.main(args(shard_dir, tmp_path / "plain", "train.steps=6", *common[:3]))
    assert losses(tmp_path / "plain")[6] != losses(tmp_path / "one")[6]
    with pytest.raises(SystemExit):
        train_cli.main(args(shard_dir, tmp_path / "plain", "train.steps=12", *common) + ["--resume", "latest"])
    assert "trained without alignment" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_cli.main(args(shard_dir, tmp_path / "two", "train.steps=14", *common[:-1], "align.projector_width=16")
                       + ["--resume", "latest"])
    assert "set up otherwise (projector_width 32 -> 16)" in capsys.readouterr().err


@pytest.mark.parametrize("extra,match", [
    (("align.weight=0.5",), "align.encoder is empty"),
    (("align.weight=-1", "align.encoder=x"), "align.weight must be"),
    (("align.weight=0.5", "align.encoder=/nonexistent"), "config.json and model.safetensors"),
    (("align.weight=0.5", "align.encoder=ENC", "align.block=99"), "align.block must be a joint block"),
    (("align.weight=0.5", "align.encoder=ENC", "train.compile=true"), "align.weight > 0 runs eager"),
])
def test_bad_alignment_settings_fail_with_one_line(shard_dir, tmp_path, capsys, extra, match):
    save_encoder(FeatureEncoder(16, width=16, dim=8), tmp_path / "enc")
    extra = [e.replace("ENC", str(tmp_path / "enc")) for e in extra]
    with pytest.raises(SystemExit):
        train_cli.main(args(shard_dir, tmp_path / "run", "train.steps=2", *extra))
    assert match in capsys.readouterr().err
    assert not (tmp_path / "run").exists()   # refused before anything is written


def test_deepspeed_fp16_is_refused_with_alignment(shard_dir, tmp_path, capsys, monkeypatch):
    """DeepSpeed scales an fp16 loss inside its engine, where the projector is not: refused before any work."""
    save_encoder(FeatureEncoder(16, width=16, dim=8), tmp_path / "enc")
    ds = tmp_path / "fp16.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "fp16": {"enabled": "true"}}))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds))
    with pytest.raises(SystemExit):
        train_cli.main(args(shard_dir, tmp_path / "run", "train.steps=2", "align.weight=0.5",
                            f"align.encoder={tmp_path / 'enc'}"))
    assert "cannot unscale an fp16 loss" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_two_processes_align_one_projector_and_resume_bit_exact(tiny_pipeline, tmp_path):
    """Under DDP and DeepSpeed ZeRO-3 (a threshold that partitions the tiny model's larger weights) the projector,
    outside both, starts as rank 0's and steps on the gradient reduced over the ranks, accumulated over 2
    micro-batches: both ranks hold one projector, DDP's N + N == 2N for every loss, the model and the projector,
    and ZeRO-3 makes DDP's model and projector up to rounding."""
    torch.manual_seed(0)
    save_encoder(FeatureEncoder(16, width=16, dim=8), tmp_path / "enc")
    make_pipeline_shards(tmp_path / "train", 4, 6)
    zero3_config = zero3_file(tmp_path, stage3_param_persistence_threshold=2000)

    def run(out, steps, *extra, engine="ddp"):
        launcher = ["--multi_gpu"] if engine == "ddp" else \
            ["--use_deepspeed", "--deepspeed_config_file", str(zero3_config)]
        return launch_two(launcher, [
            "--config", str(ROOT / "configs" / "tiny.yaml"), f"data.shards={tmp_path / 'train'}",
            f"model.init_from={tiny_pipeline}", f"train.out_dir={out}", f"train.steps={steps}", "train.log_every=1",
            "data.batch_size=1", "optim.grad_accum=2", "train.checkpoint_every=100", "data.caption_variant_probs=[1]",
            "align.weight=0.5", f"align.encoder={tmp_path / 'enc'}", "align.projector_width=32", "align.block=0",
            *(['train.deepspeed=""'] if engine == "ddp" else []), *extra])

    def records(out, name):
        return {r["step"]: (r["loss"], r["align_loss"]) for r in map(json.loads, (out / name).read_text().splitlines())
                if "loss" in r}

    def projectors(out):
        return [torch.load(out / "checkpoints" / "step_00000004" / f"state_rank{r}.pt", weights_only=True)["align"]
                ["projector"] for r in (0, 1)]

    def model(out):
        return load_mmdit(out / "checkpoints" / "step_00000004" / "model.safetensors").state_dict()

    run(tmp_path / "one", 4)
    run(tmp_path / "two", 2)
    run(tmp_path / "two", 4, "--resume", "latest")
    run(tmp_path / "zero3", 4, engine="zero3")
    for name in ("log.jsonl", "log_rank1.jsonl"):
        assert records(tmp_path / "one", name) == records(tmp_path / "two", name)
        assert len(records(tmp_path / "one", name)) == 4
    assert records(tmp_path / "one", "log.jsonl") != records(tmp_path / "one", "log_rank1.jsonl")   # own data
    one, two, zero3 = (projectors(tmp_path / d) for d in ("one", "two", "zero3"))
    for pair in (one, zero3):
        assert all(torch.equal(pair[0][k], pair[1][k]) for k in pair[0])   # one projector on both ranks
    assert all(torch.equal(one[0][k], two[0][k]) for k in one[0])
    assert max((one[0][k] - zero3[0][k]).abs().max().item() for k in one[0]) < 1e-5
    a, b, c = (model(tmp_path / d) for d in ("one", "two", "zero3"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert max((a[k] - c[k]).abs().max().item() for k in a) < 1e-5
