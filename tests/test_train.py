"""train.py on tiny shards, one process: the loss falls, resuming is bit-exact, validation is deterministic, the
EMA is the formula, and bad recipes fail before any compute."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from mmdit import loader, shards
from mmdit.checkpoint import load_mmdit

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
train_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_cli)


def make_shards(folder, n_shards=3, per_shard=8):
    """Samples the tiny preset reads: CLIP widths 8 + 16 = pooled 24, T5 width 32 = context; latents with
    structure (a per-sample constant plus a ramp) so there is something to learn."""
    counts = {}
    for s in range(n_shards):
        name = f"{s:05d}.tar"
        with shards.ShardWriter(folder / name) as w:
            for j in range(per_shard):
                i = s * per_shard + j
                g = torch.Generator().manual_seed(i)
                level = torch.rand(1, generator=g) * 2 - 1
                latent = level + torch.linspace(-0.5, 0.5, 8).view(1, 1, 8).expand(16, 8, 8)
                variant = {"clip_l": torch.randn(5, 8, generator=g) + level, "clip_l_pooled": level.expand(8),
                           "clip_g": torch.randn(5, 16, generator=g), "clip_g_pooled": level.expand(16),
                           "t5": torch.randn(6, 32, generator=g) + level}
                w.write(f"{i:06d}", {"captions": [str(i)]}, latent, [variant])
        counts[name] = w.count
    shards.write_manifest(folder, counts, {}, {})


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    make_shards(root / "train")
    make_shards(root / "val", n_shards=1)
    return root


def args(shard_dir, out, *extra):
    return ["--config", str(ROOT / "configs" / "tiny.yaml"), f"data.shards={shard_dir / 'train'}",
            f"data.val_shards={shard_dir / 'val'}", f"train.out_dir={out}", "data.caption_variant_probs=[1]", *extra]


def losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(out) / "log.jsonl").read_text().splitlines())
            if "loss" in r}


def test_loss_falls(shard_dir, tmp_path):
    train_cli.main(args(shard_dir, tmp_path / "run", "train.steps=150", "train.log_every=1", "optim.lr=1e-3"))
    curve = losses(tmp_path / "run")
    # A fresh model predicts 0, so the loss starts near E|noise - x0|^2 (about 1.4 here); noise keeps it well
    # above 0 at high sigma, so a fall of a fifth is a model that learned.
    first, last = sum(curve[s] for s in range(1, 21)) / 20, sum(curve[s] for s in range(131, 151)) / 20
    assert last < 0.8 * first
    assert (tmp_path / "run" / "checkpoints" / "step_00000150" / "ema.safetensors").is_file()
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 1000   # loss, lr, grad norm, throughput, validation per sigma


def test_resume_is_bit_exact(shard_dir, tmp_path):
    """2N steps in one go == N steps, stop, resume, N steps: every loss and the final weights."""
    common = ("train.log_every=1", "train.checkpoint_every=100", "data.batch_size=3")
    train_cli.main(args(shard_dir, tmp_path / "one", "train.steps=14", *common))
    train_cli.main(args(shard_dir, tmp_path / "two", "train.steps=7", *common))
    train_cli.main(args(shard_dir, tmp_path / "two", "train.steps=14", *common) + ["--resume", "latest"])
    assert losses(tmp_path / "one") == losses(tmp_path / "two")      # 14 steps cross an epoch boundary (24 / 3)
    for name in ("model", "ema"):
        a = load_mmdit(tmp_path / "one" / "checkpoints" / "step_00000014" / f"{name}.safetensors").state_dict()
        b = load_mmdit(tmp_path / "two" / "checkpoints" / "step_00000014" / f"{name}.safetensors").state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_muon_trains_and_resumes_bit_exact(shard_dir, tmp_path):
    """optim.optimizer=muon: Muon on the blocks' matrices, AdamW on the rest; the loss falls, both halves' states
    are checkpointed, and a resumed run equals an unbroken one."""
    from mmdit.optim import is_hidden_matrix

    common = ("train.log_every=1", "train.checkpoint_every=100", "data.batch_size=3", "optim.optimizer=muon",
              "optim.lr=3e-3", "optim.warmup_steps=2")
    train_cli.main(args(shard_dir, tmp_path / "one", "train.steps=40", *common))
    train_cli.main(args(shard_dir, tmp_path / "two", "train.steps=20", *common))
    state = torch.load(tmp_path / "two" / "checkpoints" / "step_00000020" / "optimizer.pt", weights_only=True)
    model = load_mmdit(tmp_path / "two" / "checkpoints" / "step_00000020" / "model.safetensors")
    matrices = sum(is_hidden_matrix(n, p) for n, p in model.named_parameters())
    assert matrices > 0 and len(state["muon"]["state"]) == matrices
    assert len(state["adamw"]["state"]) == len(list(model.parameters())) - matrices
    train_cli.main(args(shard_dir, tmp_path / "two", "train.steps=40", *common) + ["--resume", "latest"])
    curve = losses(tmp_path / "one")
    assert curve == losses(tmp_path / "two")
    assert sum(curve[s] for s in range(31, 41)) < 0.9 * sum(curve[s] for s in range(1, 11))   # AdamW: 0.82


def test_muon_is_refused_under_deepspeed_and_on_a_run_of_another_optimizer(shard_dir, tmp_path, capsys,
                                                                          monkeypatch):
    """DeepSpeed steps its own AdamW: muon is refused before any compute. A checkpoint is resumed only with the
    optimizer it was trained with (its state would not fit the other)."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(SystemExit) as err:
        train_cli.main(args(shard_dir, tmp_path / "ds", "optim.optimizer=muon"))
    assert err.value.code == 2 and "DeepSpeed steps its own AdamW; accepted with DeepSpeed: adamw" in \
        capsys.readouterr().err and not (tmp_path / "ds").exists()
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    train_cli.main(args(shard_dir, tmp_path / "run", "train.steps=2"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        train_cli.main(args(shard_dir, tmp_path / "run", "train.steps=4", "optim.optimizer=muon") +
                       ["--resume", "latest"])
    message = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and "trained with optim.optimizer=adamw, the recipe says muon" in message[-1]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000002"]


def test_validation_is_deterministic_and_ema_is_the_formula(shard_dir, tmp_path):
    from mmdit.config import TextLayout, load_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    train_cli.main(args(shard_dir, tmp_path / "run", "train.steps=3", "train.checkpoint_every=1",
                        "train.keep_checkpoints=5", "train.ema_decay=0.5"))
    ckpt = tmp_path / "run" / "checkpoints"
    ema2, ema3 = (load_mmdit(ckpt / f"step_0000000{k}" / "ema.safetensors").state_dict() for k in (2, 3))
    model3 = load_mmdit(ckpt / "step_00000003" / "model.safetensors").state_dict()
    for k in ema3:
        torch.testing.assert_close(ema3[k], 0.5 * ema2[k] + 0.5 * model3[k], rtol=0, atol=1e-7)
    model = load_mmdit(ckpt / "step_00000003" / "model.safetensors")
    batches = [b for _, b in zip(range(2), loader.ShardDataset(str(shard_dir / "val"), 4, shuffle_buffer=1))]
    layout = TextLayout(clip_l_dim=8, clip_g_dim=16, context_dim=32, clip_tokens=5, t5_tokens=6)
    first = train_cli.validation_loss(model, batches, layout, cfg, torch.device("cpu"))
    torch.manual_seed(123)  # the global RNG plays no part
    assert train_cli.validation_loss(model, batches, layout, cfg, torch.device("cpu")) == first
    assert len(first["per_sigma"]) == cfg.train.val_sigmas


@pytest.mark.parametrize("extra,match", [
    (["optim.lrr=1"], "unknown config key optim.lrr"),
    (["data.shards=/nonexistent/shards"], "shard source /nonexistent/shards does not exist"),
    (["optim.cooldown_steps=-1"], "optim.cooldown_steps must be a finite number in [0, inf)"),
    (["train.steps=0"], "train.steps must be a finite number in [1, inf), got 0"),
    (["train.log_every=0"], "train.log_every must be"),
    (["optim.optimizer=sgd"], "optim.optimizer 'sgd' is not one of adamw, muon"),
    (["optim.optimizer=muon", "model.init_from=x", "model.lora={rank: 4}"], "LoRA runs take adamw"),
])
def test_bad_recipe_fails_before_compute(shard_dir, tmp_path, capsys, extra, match):
    with pytest.raises(SystemExit) as err:
        train_cli.main(args(shard_dir, tmp_path / "run", *extra))
    assert err.value.code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_bad_sample_model_defaults_file_fails_before_compute(shard_dir, tmp_path, capsys):
    """train.sample_model's mmdit_sampling.json is read at the first sample grid, hours in: it is checked first."""
    model = tmp_path / "pipeline"
    model.mkdir()
    (model / "mmdit_sampling.json").write_text('{"cfg": "strong"}')
    with pytest.raises(SystemExit) as err:
        train_cli.main(args(shard_dir, tmp_path / "run", f"train.sample_model={model}"))
    assert err.value.code == 2 and "cfg must be a number" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_non_finite_losses_stop_the_run(shard_dir, tmp_path, capsys):
    # A learning rate of inf blows the weights up after the first step: every later loss is non-finite.
    with pytest.raises(SystemExit) as err:
        train_cli.main(args(shard_dir, tmp_path / "run", "optim.lr=1e30", "optim.warmup_steps=1", "optim.grad_clip=1e30",
                            "train.max_bad_steps=3", "train.steps=20", "train.checkpoint_every=1"))
    assert err.value.code == 2 and "non-finite losses in a row" in capsys.readouterr().err


def run_cli(argv, timeout=120):
    """train.py as a command, with a deadline: a run that cannot end fails the test instead of hanging it."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def broken_copies(shard_dir, folder, keep_tars: bool):
    """The train shards' manifest in `folder`, with its tars either absent or replaced by bytes that are no tar."""
    import shutil

    folder.mkdir()
    shutil.copy(shard_dir / "train" / "manifest.json", folder)
    if keep_tars:
        for tar in (shard_dir / "train").glob("*.tar"):
            (folder / tar.name).write_bytes(b"not a tar" * 100)
    return folder


@pytest.mark.parametrize("case,extra,match", [
    ("batch", ["data.batch_size=100"], "epoch 0 gives rank 0 no batch: its loader streams hold at most 24 samples"),
    ("missing", [], "3 local shards that the recipe names are missing"),
    ("unreadable", [], "epoch 0 gave rank 0 no batch"),
    ("unreadable", ["data.resampled=true"], "data: none of the 3 shards gave a readable sample"),
    ("unreadable", ["data.resampled=true", "data.num_workers=1"], "data: none of the 3 shards gave a readable"),
])
def test_data_that_cannot_fill_a_batch_ends_the_run(shard_dir, tmp_path, case, extra, match):
    """Each of these used to spin forever at full CPU (deaf to SIGTERM): now one line and exit 2, at once."""
    shards_arg = []
    if case != "batch":
        shards_arg = [f"data.shards={broken_copies(shard_dir, tmp_path / 'shards', case == 'unreadable')}"]
    result = run_cli(args(shard_dir, tmp_path / "run", "train.steps=5", *shards_arg, *extra), timeout=90)
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert result.returncode == 2 and lines and match in lines[-1], result.stderr[-2000:]


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.pt", "state_rank0.pt"])
def test_resume_latest_passes_over_a_corrupt_newest_checkpoint(shard_dir, tmp_path, capsys, victim):
    common = ("train.log_every=1", "train.checkpoint_every=2", "train.keep_checkpoints=5", "data.batch_size=3")
    train_cli.main(args(shard_dir, tmp_path / "one", "train.steps=6", *common))
    train_cli.main(args(shard_dir, tmp_path / "two", "train.steps=4", *common))
    newest = tmp_path / "two" / "checkpoints" / "step_00000004"
    data = (newest / victim).read_bytes()
    (newest / victim).write_bytes(data[: len(data) // 2])      # cut short, as a crash in a copy would leave it
    with pytest.raises(SystemExit) as err:                     # named explicitly: refused with one line
        train_cli.main(args(shard_dir, tmp_path / "two", "train.steps=6", *common) + ["--resume", str(newest)])
    assert err.value.code == 2 and f"{victim} is unreadable" in capsys.readouterr().err
    train_cli.main(args(shard_dir, tmp_path / "two", "train.steps=6", *common) + ["--resume", "latest"])
    assert f"skipping checkpoint {newest}: {victim} is unreadable" in capsys.readouterr().err
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert all(one[s] == two[s] for s in range(3, 7))          # steps 3-6 again, from step 2, bit for bit


def test_sigterm_saves_and_resume_matches_an_uninterrupted_run(shard_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    common = ("train.log_every=1", "train.checkpoint_every=1000", "train.steps=200", "data.batch_size=3")
    train_cli.main(args(shard_dir, tmp_path / "ref", *common))
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args(shard_dir, tmp_path / "run", *common)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "saved" in err
    stopped_at = max(losses(tmp_path / "run"))
    assert stopped_at < 200  # it really stopped early
    train_cli.main(args(shard_dir, tmp_path / "run", *common) + ["--resume", "latest"])
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")


ACCELERATE_DEEPSPEED_2 = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  deepspeed_config_file: {ds}
  zero3_init_flag: false
num_machines: 1
num_processes: 2
machine_rank: 0
main_training_function: main
use_cpu: false
"""


def test_two_processes_with_deepspeed_zero2(tmp_path):
    """Two ranks (DeepSpeed ZeRO-2 on CPU, gloo): accelerate must see world size 2 (it reported 1 before the
    backend was named), each rank reads its own samples, gradients are reduced (one global grad norm), and
    resuming two processes is bit-exact."""
    import os
    import subprocess
    import sys

    make_shards(tmp_path / "train", n_shards=4, per_shard=6)
    config = tmp_path / "accelerate.yaml"
    config.write_text(ACCELERATE_DEEPSPEED_2.format(ds=ROOT / "configs" / "deepspeed" / "zero2.json"))
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}

    def launch(out, steps, *extra):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
               f"data.shards={tmp_path / 'train'}", f"train.out_dir={out}", f"train.steps={steps}",
               "train.log_every=1", "data.batch_size=2", "train.checkpoint_every=100",
               "data.caption_variant_probs=[1]", *extra]
        result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        # Ranks used to abort now and then in the interpreter's teardown after their work was written ("terminate
        # called without an active exception"); train.py's leave() skips that teardown.
        assert result.returncode == 0 and "terminate called" not in result.stderr, result.stderr[-2000:]

    def records(out, name):
        return {r["step"]: r for r in map(json.loads, (out / name).read_text().splitlines()) if "loss" in r}

    launch(tmp_path / "one", 8)
    r0, r1 = records(tmp_path / "one", "log.jsonl"), records(tmp_path / "one", "log_rank1.jsonl")
    assert set(r0) == set(r1) == set(range(1, 9))
    first_epoch = range(1, 7)   # 24 samples / (2 ranks x batch 2) = 6 steps per epoch
    keys0 = {k for s in first_epoch for k in r0[s]["keys"]}
    keys1 = {k for s in first_epoch for k in r1[s]["keys"]}
    assert len(keys0) == len(keys1) == 12 and not keys0 & keys1          # every sample once, split between ranks
    assert all(r0[s]["grad_norm"] == r1[s]["grad_norm"] for s in r0)     # one reduced gradient
    assert any(r0[s]["loss"] != r1[s]["loss"] for s in r0)               # from different data

    def same_run(a_dir, b_dir, last):
        for name in ("log.jsonl", "log_rank1.jsonl"):
            a, b = records(a_dir, name), records(b_dir, name)
            assert {s: (r["loss"], r["keys"]) for s, r in a.items()} == \
                {s: (r["loss"], r["keys"]) for s, r in b.items()}
        for weights in ("model", "ema"):
            a = load_mmdit(a_dir / "checkpoints" / f"step_{last:08d}" / f"{weights}.safetensors").state_dict()
            b = load_mmdit(b_dir / "checkpoints" / f"step_{last:08d}" / f"{weights}.safetensors").state_dict()
            assert all(torch.equal(a[k], b[k]) for k in a)

    launch(tmp_path / "two", 4)
    launch(tmp_path / "two", 8, "--resume", "latest")
    same_run(tmp_path / "one", tmp_path / "two", 8)
    # one process cannot take up two ranks' data positions and generators: refused in one line, nothing written
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
                             f"data.shards={tmp_path / 'train'}", f"train.out_dir={tmp_path / 'two'}",
                             "train.steps=10", "data.batch_size=2", "data.caption_variant_probs=[1]",
                             "--resume", "latest"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "saved by 2 processes; resume it with 2, not 1" in result.stderr
    assert max(records(tmp_path / "two", "log.jsonl")) == 8

    # A time budget no launch can meet: the ranks time their steps, agree on the slowest figures (gathered, so the
    # same on every accelerate), and both end one step after the probe.
    launch(tmp_path / "budget", 200, "train.time_budget_s=0.001")
    ends = [max(records(tmp_path / "budget", name)) for name in ("log.jsonl", "log_rank1.jsonl")]
    assert ends == [21, 21]
    assert json.loads((tmp_path / "budget" / "config.json").read_text())["train"]["steps"] == 21

    # SIGTERM to the launcher reaches every rank; they agree on the step, save together, and the resumed run
    # continues as if nothing happened.
    import signal
    import time

    launch(tmp_path / "ref", 300)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), str(ROOT / "train.py"),
           "--config", str(ROOT / "configs" / "tiny.yaml"), f"data.shards={tmp_path / 'train'}",
           f"train.out_dir={tmp_path / 'sig'}", "train.steps=300", "train.log_every=1", "data.batch_size=2",
           "train.checkpoint_every=100", "data.caption_variant_probs=[1]"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "sig" / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    saved = sorted((tmp_path / "sig" / "checkpoints").glob("step_*"))
    assert saved and int(saved[-1].name[5:]) < 300
    launch(tmp_path / "sig", 300, "--resume", "latest")
    same_run(tmp_path / "ref", tmp_path / "sig", 300)


def test_gradient_accumulation_steps_once_per_step(shard_dir, tmp_path):
    """2 micro-batches of 2 make one optimizer step per training step, on the samples of a batch of 4. (Their
    noise and timesteps are drawn in another order than the big batch's, so the weights are not compared: at a
    real learning rate the two differ by about as much as two seeds.)"""
    common = ("train.steps=3", "train.checkpoint_every=3", "train.log_every=1", "data.shuffle_buffer=1")
    train_cli.main(args(shard_dir, tmp_path / "big", "data.batch_size=4", *common))
    train_cli.main(args(shard_dir, tmp_path / "acc", "data.batch_size=2", "optim.grad_accum=2", *common))
    saved = torch.load(tmp_path / "acc" / "checkpoints" / "step_00000003" / "optimizer.pt", weights_only=True)
    assert {int(s["step"]) for s in saved["state"].values()} == {3}
    keys = [{r["step"]: sorted(r["keys"]) for r in map(json.loads, (tmp_path / run / "log.jsonl").read_text()
             .splitlines()) if "loss" in r} for run in ("big", "acc")]
    assert all(set(keys[1][s]) < set(keys[0][s]) for s in (1, 2, 3))   # the last micro-batch: half the big batch
    sai = load_mmdit(tmp_path / "acc" / "export" / "ema_sai.safetensors").state_dict()
    acc = load_mmdit(tmp_path / "acc" / "export" / "ema.safetensors").state_dict()
    assert all(torch.equal(acc[k], sai[k]) for k in acc)   # the exports hold the same EMA


def test_gradient_accumulation_under_deepspeed_steps_once_per_step(tmp_path):
    """Two ranks accumulating 2 micro-batches: DeepSpeed ZeRO-2 makes DDP's step (up to rounding). It used to step
    at every micro-batch, as accelerate's backward outside its accumulate() marks each one a boundary."""
    make_shards(tmp_path / "train", n_shards=4, per_shard=6)
    common = ["--config", str(ROOT / "configs" / "tiny.yaml"), f"data.shards={tmp_path / 'train'}", "train.steps=3",
              "train.checkpoint_every=3", "optim.lr=1e-2", "optim.warmup_steps=1", "data.shuffle_buffer=1",
              "data.caption_variant_probs=[1]", "data.batch_size=1", "optim.grad_accum=2"]
    launch_two(["--use_deepspeed", "--deepspeed_config_file", str(ROOT / "configs" / "deepspeed" / "zero2.json")],
               [*common, f"train.out_dir={tmp_path / 'deepspeed'}"])
    launch_two(["--multi_gpu"], [*common, f"train.out_dir={tmp_path / 'ddp'}", 'train.deepspeed=""'])
    a, b = (load_mmdit(tmp_path / run / "checkpoints" / "step_00000003" / "model.safetensors").state_dict()
            for run in ("deepspeed", "ddp"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_non_finite_loss_on_one_rank_skips_on_both_and_ends(tmp_path):
    """A non-finite loss on one rank only (its shards hold NaN latents) is skipped on both ranks together, and the
    run stops on max_bad_steps on both: before, the other rank went on into a backward whose gradient reduction
    waited for its partner forever."""
    import subprocess

    make_shards(tmp_path / "train", n_shards=4, per_shard=6)
    for shard in ("00001.tar", "00003.tar"):   # every other shard: one rank's share
        nan_shards = tmp_path / "nan"   # written apart, then copied over the clean ones
        with shards.ShardWriter(nan_shards / shard) as w:
            for j in range(6):
                w.write(f"nan{shard[3:5]}{j}", {"captions": ["x"]}, torch.full((16, 8, 8), float("nan")),
                        [{"clip_l": torch.zeros(5, 8), "clip_l_pooled": torch.zeros(8), "clip_g": torch.zeros(5, 16),
                          "clip_g_pooled": torch.zeros(16), "t5": torch.zeros(6, 32)}])
        (tmp_path / "train" / shard).write_bytes((nan_shards / shard).read_bytes())
    try:
        launch_two(["--multi_gpu"], ["--config", str(ROOT / "configs" / "tiny.yaml"), f"data.shards={tmp_path / 'train'}",
                                     f"train.out_dir={tmp_path / 'run'}", "train.steps=20", "data.batch_size=2",
                                     "train.max_bad_steps=3", "data.caption_variant_probs=[1]", 'train.deepspeed=""'],
                   timeout=180)
    except AssertionError as e:
        assert "non-finite losses in a row" in str(e)
    except subprocess.TimeoutExpired:
        pytest.fail("a rank waited forever for its partner")
    else:
        pytest.fail("the run did not stop on non-finite losses")
    logs = [tmp_path / "run" / name for name in ("log.jsonl", "log_rank1.jsonl")]
    assert not any('"loss"' in log.read_text() for log in logs if log.exists())   # no rank trained a step alone


def test_a_validation_shard_failing_on_one_rank_leaves_zero3_validation_in_step(tmp_path):
    """Under ZeRO-3 both ranks run the validation forwards together. A validation shard that fails on rank 1 alone
    (a remote read; here a pipe: that fails there) gives it fewer batches; the ranks keep as many as the fewest
    read. Before, rank 0's extra forwards gathered parameters with a partner that had moved on: the run aborted."""
    import subprocess

    make_shards(tmp_path / "train", n_shards=4, per_shard=6)
    make_shards(tmp_path / "val", n_shards=2, per_shard=4)   # 2 batches of 2 per shard: rank 0 reads 4, rank 1 2
    fetch = tmp_path / "fetch.sh"
    fetch.write_text(f'if [ "$RANK" = 1 ] && [ "$1" = 1 ]; then exit 1; fi\ncat {tmp_path / "val"}/0000$1.tar\n')
    # Every parameter partitioned and released after use, as a model larger than ZeRO-3's live-parameter limit has
    # it: each forward gathers anew (with the tiny model's whole parameters kept, the extra forwards needed no partner)
    zero3 = zero3_file(tmp_path, stage3_param_persistence_threshold=0, stage3_max_live_parameters=1000,
                       stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=0)
    try:
        result = launch_two(["--use_deepspeed", "--deepspeed_config_file", str(zero3)], [
            "--config", str(ROOT / "configs" / "tiny.yaml"), f"data.shards={tmp_path / 'train'}",
            f"data.val_shards=pipe:sh {fetch} {{0..1}}", "data.retries=0", f"train.out_dir={tmp_path / 'run'}",
            "train.steps=2", "train.val_every=2", "data.batch_size=2", "data.caption_variant_probs=[1]"], timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("a rank waited forever for its partner in validation")
    assert "validation on 2 batches, not 4" in result.stderr   # said by rank 0, which read 4
    vals = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if '"val"' in line]
    assert [v["step"] for v in vals] == [2] and math.isfinite(vals[0]["val"]["mean"])


def test_finetune_an_sd3_pipeline_and_load_the_export_in_diffusers(tiny_pipeline, tmp_path):
    """--init-from an SD3 pipeline (any format load_mmdit reads), train, export: diffusers' pipeline runs it."""
    import shutil

    import numpy as np
    from diffusers import StableDiffusion3Pipeline
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    with shards.ShardWriter(tmp_path / "shards" / "00000.tar") as w:
        for i in range(4):
            variant = {"clip_l": torch.randn(5, 64, generator=g), "clip_l_pooled": torch.randn(64, generator=g),
                       "clip_g": torch.randn(5, 128, generator=g), "clip_g_pooled": torch.randn(128, generator=g),
                       "t5": torch.randn(6, 256, generator=g)}
            w.write(f"{i:06d}", {"captions": ["x"]}, torch.randn(16, 8, 8, generator=g), [variant])
    shards.write_manifest(tmp_path / "shards", {"00000.tar": 4}, {}, {})
    train_cli.main(["--config", str(ROOT / "configs" / "tiny.yaml"), f"data.shards={tmp_path / 'shards'}",
                    f"model.init_from={tiny_pipeline}", f"train.out_dir={tmp_path / 'run'}", "train.steps=2",
                    "data.caption_variant_probs=[1]", "train.checkpoint_every=100",
                    f"train.sample_model={tiny_pipeline}", "train.sample_steps=2", "train.val_every=2"])
    grid = np.asarray(Image.open(tmp_path / "run" / "samples" / "step_00000002.png"))
    assert grid.shape == (64, 128, 3)   # two prompts, 8x8 latents decode to 64x64
    pipe_dir = tmp_path / "finetuned"
    shutil.copytree(tiny_pipeline, pipe_dir)
    shutil.rmtree(pipe_dir / "transformer")
    shutil.copytree(tmp_path / "run" / "export" / "transformer", pipe_dir / "transformer")
    pipe = StableDiffusion3Pipeline.from_pretrained(pipe_dir)
    image = pipe("a photo of a red circle", num_inference_steps=2, width=32, height=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


def test_learning_rate_schedule():
    """Warm-up, constant, then (with a cool-down) a linear decay that reaches base / cooldown on the last step."""
    lr = [train_cli.get_lr(s, 1.0, 10, 20, 100) for s in range(100)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == lr[79] == 1.0
    assert lr[80] == 1.0 and lr[90] == pytest.approx(0.5) and lr[99] == pytest.approx(1 / 20)
    assert all(a >= b for a, b in zip(lr[9:], lr[10:]))
    assert [train_cli.get_lr(s, 1.0, 10) for s in (9, 99, 10**6)] == [1.0, 1.0, 1.0]   # no cool-down: constant
    assert train_cli.get_lr(2, 1.0, 1, 1000, 4) == pytest.approx(0.5)   # shorter than the cool-down: decays all along
    assert train_cli.get_lr(0, 1.0, 1, 10) == 1.0   # a cool-down without a run length leaves the rate alone


def test_a_time_budget_keeps_or_shortens_the_schedule():
    """Steps that fit are kept; steps that do not are cut to what fits, the cool-down in the same proportion, never
    to fewer than one more step."""
    from mmdit.config import load_config

    assert train_cli.budgeted_schedule(2750, 1375, 100, 60.0, 0.25, 840.0) == (2750, 1375)   # 100 + 3120 fit
    assert train_cli.budgeted_schedule(2750, 1375, 100, 60.0, 0.35, 840.0) == (2328, 1164)   # 100 + 2228 fit
    assert train_cli.budgeted_schedule(2750, 1375, 100, 900.0, 0.35, 840.0) == (101, 50)      # over already
    assert train_cli.budgeted_schedule(2750, 10, 100, 900.0, 0.35, 840.0) == (101, 1)       # a cool-down stays one
    assert train_cli.budgeted_schedule(2750, 0, 100, 900.0, 0.35, 840.0) == (101, 0)        # none stays none
    assert train_cli.budget_probe_steps(2750) == (20, 100) and train_cli.budget_probe_steps(200) == (4, 20)
    assert train_cli.budget_probe_steps(3) == (1, 2)
    recipe = load_config(ROOT / "configs" / "toy.yaml")
    assert train_cli.budget_window(recipe, 0) == (20, 100)      # a fresh launch times steps 21-100
    assert train_cli.budget_window(recipe, 99) == (100, 180)    # a resume just before the probe still times 80


def test_a_run_over_its_time_budget_shortens_itself_and_resumes_with_that(shard_dir, tmp_path, capsys):
    """A budget the run cannot meet: at its probe step it ends its schedule one step later and says so, in the log
    and in config.json; resumed from a checkpoint after that decision, it keeps it (not the asked length) and ends
    bit for bit where the unbroken run did."""
    import shutil

    common = ("train.log_every=1", "train.checkpoint_every=1", "train.keep_checkpoints=1000", "data.batch_size=3",
              "train.steps=200", "optim.cooldown_steps=100", "train.time_budget_s=0.001")
    train_cli.main(args(shard_dir, tmp_path / "one", *common))
    assert "training 21 (cool-down 10 of them), not 200" in capsys.readouterr().err
    curve = losses(tmp_path / "one")
    assert max(curve) == 21                                       # probe at step 20 of 200, one more step
    recipe = json.loads((tmp_path / "one" / "config.json").read_text())
    assert (recipe["train"]["steps"], recipe["optim"]["cooldown_steps"]) == (21, 10)
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "step_00000021")
    shutil.rmtree(tmp_path / "two" / "export")
    train_cli.main(args(shard_dir, tmp_path / "two", *common) + ["--resume", "latest"])
    assert losses(tmp_path / "two") == curve
    for name in ("model", "ema"):
        a = load_mmdit(tmp_path / "one" / "checkpoints" / "step_00000021" / f"{name}.safetensors").state_dict()
        b = load_mmdit(tmp_path / "two" / "checkpoints" / "step_00000021" / f"{name}.safetensors").state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "two" / "checkpoints" / "step_00000022").exists()


def test_the_launcher_chooses_the_engine(tmp_path):
    """What accelerate launch says wins over the recipe's train.deepspeed; relative recipe paths resolve from the
    repository, not the working directory; a launch that started fewer processes than asked is refused."""
    choose = train_cli.choose_engine
    zero3 = str(ROOT / "configs" / "deepspeed" / "zero3.json")
    launcher = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": zero3}
    assert choose("configs/deepspeed/zero2.json", 2, launcher) == ("deepspeed", zero3)
    assert choose("configs/deepspeed/zero2.json", 2, {"ACCELERATE_USE_DEEPSPEED": "true"}) == ("deepspeed", None)
    relative = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "configs/deepspeed/zero3.json"}
    assert choose("", 2, relative) == ("deepspeed", zero3)   # configs/accelerate/multi_node.yaml, launched elsewhere
    assert choose("configs/deepspeed/zero2.json", 2, {}) == ("deepspeed",
                                                             str(ROOT / "configs" / "deepspeed" / "zero2.json"))
    assert choose("", 2, {}) == ("ddp", None)
    assert choose("configs/deepspeed/zero2.json", 1, {}) == ("single", None)
    with pytest.raises(ValueError, match="no such file"):
        choose("configs/deepspeed/zero9.json", 2, {})
    with pytest.raises(ValueError, match="--deepspeed_config_file .* no such file"):
        choose("", 2, {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(tmp_path / "x")})
    one_of_two = {"ACCELERATE_MIXED_PRECISION": "no", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with pytest.raises(ValueError, match="asked for several processes but started one"):
        choose("configs/deepspeed/zero2.json", 1, one_of_two)


def make_pipeline_shards(folder, n_shards, per_shard, seed=0):
    """Shards with the tiny pipeline's text widths (CLIP 64 + 128, T5 256), so its encoders and VAE can draw the
    run's sample grids."""
    g = torch.Generator().manual_seed(seed)
    counts = {}
    for s in range(n_shards):
        with shards.ShardWriter(folder / f"{s:05d}.tar") as w:
            for j in range(per_shard):
                variant = {"clip_l": torch.randn(5, 64, generator=g), "clip_l_pooled": torch.randn(64, generator=g),
                           "clip_g": torch.randn(5, 128, generator=g), "clip_g_pooled": torch.randn(128, generator=g),
                           "t5": torch.randn(6, 256, generator=g)}
                w.write(f"{s * per_shard + j:06d}", {"captions": ["x"]}, torch.randn(16, 8, 8, generator=g), [variant])
        counts[f"{s:05d}.tar"] = w.count
    shards.write_manifest(folder, counts, {}, {})


def zero3_file(folder, **settings) -> Path:
    """The shipped configs/deepspeed/zero3.json with these zero_optimization settings changed, written in folder."""
    config = json.loads((ROOT / "configs" / "deepspeed" / "zero3.json").read_text())
    config["zero_optimization"].update(settings)
    path = Path(folder) / "zero3.json"
    path.write_text(json.dumps(config))
    return path


def launch_two(launcher_args, recipe_args, timeout=400):
    """train.py under `accelerate launch` with 2 processes on this CPU (gloo); its stderr on failure."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", *launcher_args, str(ROOT / "train.py"), *recipe_args]
    result = subprocess.run(cmd, env={**os.environ, "DS_ACCELERATOR": "cpu"}, cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0 and "terminate called" not in result.stderr, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("engine", ["zero3", "zero3-split", "ddp"])
def test_two_processes_resume_bit_exact_with_validation_and_samples(tiny_pipeline, tmp_path, engine):
    """N + N == 2N for every loss of both ranks, the final model and the EMA, with validation and a sample grid
    inside the run. zero3: the shipped file, named to the launcher (it used to crash on resume); zero3-split: a
    threshold that splits some parameters and keeps others whole (validation used to deadlock); ddp: no DeepSpeed."""
    make_pipeline_shards(tmp_path / "train", 4, 6)
    make_pipeline_shards(tmp_path / "val", 1, 4, seed=1)
    zero3 = ROOT / "configs" / "deepspeed" / "zero3.json"
    if engine == "zero3-split":
        zero3 = zero3_file(tmp_path, stage3_param_persistence_threshold=2000)
    launcher = ["--multi_gpu"] if engine == "ddp" else ["--use_deepspeed", "--deepspeed_config_file", str(zero3)]
    ddp = ['train.deepspeed=""'] if engine == "ddp" else []   # the launcher names no DeepSpeed, nor does the recipe

    def run(out, steps, *extra):
        return launch_two(launcher, [
            "--config", str(ROOT / "configs" / "tiny.yaml"), f"data.shards={tmp_path / 'train'}",
            f"data.val_shards={tmp_path / 'val'}", f"model.init_from={tiny_pipeline}",
            f"train.sample_model={tiny_pipeline}", "train.sample_steps=2", "train.val_every=3",
            f"train.out_dir={out}", f"train.steps={steps}", "train.log_every=1", "data.batch_size=2",
            "train.checkpoint_every=100", "data.caption_variant_probs=[1]", *ddp, *extra])

    def records(out, name):
        return {r["step"]: r["loss"] for r in map(json.loads, (out / name).read_text().splitlines()) if "loss" in r}

    run(tmp_path / "one", 6)
    run(tmp_path / "two", 3)
    result = run(tmp_path / "two", 6, "--resume", "latest")
    for name in ("log.jsonl", "log_rank1.jsonl"):
        assert records(tmp_path / "one", name) == records(tmp_path / "two", name)
        assert len(records(tmp_path / "one", name)) == 6
    norms = [{r["step"]: r["grad_norm"] for r in map(json.loads, (tmp_path / "one" / name).read_text().splitlines())
              if "loss" in r} for name in ("log.jsonl", "log_rank1.jsonl")]
    assert norms[0] == norms[1]   # one gradient, reduced over both ranks
    for weights in ("model", "ema"):
        a, b = (load_mmdit(d / "checkpoints" / "step_00000006" / f"{weights}.safetensors").state_dict()
                for d in (tmp_path / "one", tmp_path / "two"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    setup = json.loads((tmp_path / "two" / "run.json").read_text())
    assert setup["engine"] == ("ddp" if engine == "ddp" else "deepspeed") and setup["world_size"] == 2
    assert setup["zero_stage"] == (None if engine == "ddp" else 3)
    assert ("engine: ddp" if engine == "ddp" else "engine: deepspeed ZeRO-3") in result.stderr
    assert (tmp_path / "two" / "samples" / "step_00000006.png").is_file()
    vals = [r for r in map(json.loads, (tmp_path / "two" / "log.jsonl").read_text().splitlines()) if "val" in r]
    assert [v["step"] for v in vals] == [3, 6] and all("val_ema" in v for v in vals)


def test_bf16_ema_reads_the_fp32_masters(tmp_path):
    """Under DeepSpeed bf16 the module holds bf16 copies; the EMA and model.safetensors must come from the fp32
    master weights: model.safetensors holds values bf16 cannot represent, and EMA_k = d EMA_k-1 + (1 - d) model_k
    holds for them (it fails when the EMA reads the bf16 copies)."""
    make_shards(tmp_path / "train", n_shards=4, per_shard=6)
    launch_two(["--use_deepspeed", "--deepspeed_config_file", str(ROOT / "configs" / "deepspeed" / "zero2.json")],
               ["--config", str(ROOT / "configs" / "tiny.yaml"), f"data.shards={tmp_path / 'train'}",
                f"train.out_dir={tmp_path / 'run'}", "train.steps=3", "train.precision=bf16", "data.batch_size=2",
                "train.checkpoint_every=1", "train.keep_checkpoints=5", "train.ema_decay=0.5", "optim.lr=1e-2",
                "optim.warmup_steps=1", "data.caption_variant_probs=[1]"])
    ckpt = tmp_path / "run" / "checkpoints"
    ema2, ema3, model3 = (load_mmdit(ckpt / f"step_0000000{k}" / f"{n}.safetensors").state_dict()
                          for k, n in ((2, "ema"), (3, "ema"), (3, "model")))
    assert all(t.dtype == torch.float32 for t in model3.values())
    weights = torch.cat([t.flatten() for t in model3.values()])
    assert (weights != weights.bfloat16().float()).float().mean() > 0.5      # fp32 masters, not bf16 copies
    for k in ema3:
        torch.testing.assert_close(ema3[k], 0.5 * ema2[k] + 0.5 * model3[k], rtol=0, atol=1e-7)


@pytest.mark.slow
def test_compiled_training_matches_eager(shard_dir, tmp_path):
    """train.compile=true trains the same model (to compiler rounding) and its checkpoints keep our key names."""
    common = ("train.steps=4", "train.log_every=1", "train.checkpoint_every=100")
    train_cli.main(args(shard_dir, tmp_path / "eager", *common))
    train_cli.main(args(shard_dir, tmp_path / "compiled", *common, "train.compile=true"))
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert eager.keys() == compiled.keys() and all(abs(eager[s] - compiled[s]) < 1e-4 for s in eager)
    a = load_mmdit(tmp_path / "eager" / "export" / "ema.safetensors").state_dict()
    b = load_mmdit(tmp_path / "compiled" / "export" / "ema.safetensors").state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_a_launch_that_starts_one_of_two_processes_is_refused(shard_dir, tmp_path):
    """`accelerate launch --num_processes 2 train.py` without --multi_gpu / --use_deepspeed starts one process on a
    machine without GPUs; it used to train alone, silently."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train.py"),
           *args(shard_dir, tmp_path / "run", "train.steps=2")]
    env = {**{k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "MASTER_ADDR", "RANK")},
           "CUDA_VISIBLE_DEVICES": ""}   # with two GPUs accelerate would start both
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert result.returncode != 0 and "asked for several processes but started one" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
