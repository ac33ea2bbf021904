"""Shards from anywhere (mmdit.sources, mmdit.loader): source specs read exactly as given, a local HTTP server and
pipe: commands giving the same training as local files, faults skipped and counted, bad specs refused at start,
and resume exact with any number of loader workers, in both modes, across an epoch's end, with 1 and 2 ranks."""

import json
import os
import subprocess
import sys

import pytest
import torch

from mmdit import loader, sources
from mmdit.checkpoint import load_mmdit
from mmdit.testing import ShardServer
from tests.test_train import ACCELERATE_DEEPSPEED_2, ROOT, args, losses, make_shards, train_cli

QUICK = sources.ReadPolicy(retries=1, retry_delay=0.01, timeout=5)


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    make_shards(root / "train", n_shards=3, per_shard=8)
    make_shards(root / "val", n_shards=1)
    return root


def records(out, name="log.jsonl"):
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


# ---- specs ------------------------------------------------------------------------------------------------------

def test_specs_mean_exactly_what_they_say(shard_root):
    folder = shard_root / "train"
    whole = sources.parse_source(str(folder))
    assert whole.urls == tuple(str(folder / f"{i:05d}.tar") for i in range(3)) and whole.samples == 24
    assert sources.parse_source(str(folder / "manifest.json")).urls == whole.urls
    one = sources.parse_source(str(folder / "{00000..00000}.tar"))   # never widened to the folder's manifest
    assert one.urls == (str(folder / "00000.tar"),) and one.counts == {str(folder / "00000.tar"): 8}
    single = sources.parse_source(str(folder / "00001.tar"))
    assert single.urls == (str(folder / "00001.tar"),)
    piped = sources.parse_source(f"pipe:cat {folder}/{{00000..00001}}.tar")
    assert piped.urls == (f"pipe:cat {folder}/00000.tar", f"pipe:cat {folder}/00001.tar") and piped.counts is None
    remote = sources.parse_source("https://host/bucket/train-{000000..000002}.tar")
    assert remote.urls[-1] == "https://host/bucket/train-000002.tar" and remote.remote
    mixed = sources.parse_sources([str(folder), {"source": str(folder / "00000.tar"), "weight": 2.5}])
    assert [s.weight for s in mixed] == [1.0, 2.5]


@pytest.mark.parametrize("spec,match", [
    ("s3://bucket/x-{0..3}.tar", "unknown scheme s3:"),
    ("/data/x-{}.tar", "empty or malformed brace range"),
    ("/data/x-{0..}.tar", "empty or malformed brace range"),
    ("/nonexistent/shards", "does not exist"),
    ([{"source": "/x.tar", "weight": 0}], "weight must be a positive number"),
    ([{"url": "/x.tar"}], "accepted keys are source and weight"),
    ([], "no shard source given"),
])
def test_bad_specs_are_one_line(spec, match):
    with pytest.raises(ValueError, match=match):
        sources.parse_sources(spec)


def test_manifests_are_checked(shard_root, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    manifest = json.loads((shard_root / "train" / "manifest.json").read_text())
    (wrong / "manifest.json").write_text(json.dumps({**manifest, "schema": 99}))
    with pytest.raises(ValueError, match="has schema 99; this code reads 1"):
        sources.parse_source(str(wrong))
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({**manifest, "identities": {"vae": "another"}}))
    (shard_root / "train" / "manifest.json").write_text(json.dumps({**manifest, "identities": {"vae": "one"}}))
    try:
        with pytest.raises(ValueError, match="different encoders or VAE"):
            sources.parse_sources([str(shard_root / "train"), str(other)])
    finally:
        (shard_root / "train" / "manifest.json").write_text(json.dumps(manifest))


def test_weights_repeat_sources_per_epoch(shard_root):
    folder = str(shard_root / "train")
    urls = [u for u, _ in loader.epoch_shards(sources.parse_sources([{"source": folder, "weight": 2}]), 0, 0)]
    assert sorted(urls) == sorted(sources.parse_source(folder).urls * 2)
    # a fraction of a shard is a chance per epoch: on average a source is read as often as its weight says
    mixed = sources.parse_sources([{"source": folder, "weight": 1.34}, {"source": str(shard_root / "val"),
                                                                       "weight": 0.5}])
    epochs = [loader.epoch_shards(mixed, 0, e) for e in range(400)]
    from_train = [sum("train" in u for u, _ in order) for order in epochs]
    from_val = [sum("val" in u for u, _ in order) for order in epochs]
    assert set(from_train) == {4, 5} and abs(sum(from_train) / 400 - 3 * 1.34) < 0.05
    assert abs(sum(from_val) / 400 - 0.5) < 0.08


def test_manifests_name_shards_beside_them_on_any_scheme(tmp_path):
    assert sources.beside("gs://b/s/manifest.json", "00000.tar") == "gs://b/s/00000.tar"
    assert sources.beside("https://h/b/s/manifest.json?sig=x", "00001.tar") == "https://h/b/s/00001.tar"
    assert sources.beside("hf://datasets/o/n/manifest.json", "a.tar") == "hf://datasets/o/n/a.tar"
    assert sources.beside(str(tmp_path / "manifest.json"), "a.tar") == str(tmp_path / "a.tar")
    with pytest.raises(ValueError, match="not a pipe: command"):
        sources.parse_source("pipe:aws s3 cp s3://b/manifest.json -")
    assert sources.parse_source("pipe:cat ${HOME}/x.tar").urls == ("pipe:cat ${HOME}/x.tar",)   # a command's braces


def test_compressed_shards_and_path_arguments(shard_root, tmp_path):
    import gzip

    (tmp_path / "00000.tar.gz").write_bytes(gzip.compress((shard_root / "train" / "00000.tar").read_bytes()))
    stats = sources.ReadStats()
    assert len(list(sources.read_shard(tmp_path / "00000.tar.gz", stats))) == 8 and stats.failed_shards == 0
    assert len(list(loader.ShardDataset(shard_root / "train", 4, seed=0))) == 6   # a Path, as before


def test_a_broken_tar_over_http_fails_at_once(tmp_path):
    import time

    (tmp_path / "junk.tar").write_bytes(b"no tar at all " * 40000)
    with ShardServer(tmp_path) as url:
        started, stats = time.perf_counter(), sources.ReadStats()
        assert list(sources.read_shard(f"{url}/junk.tar", stats, sources.ReadPolicy(retries=0))) == []
        assert time.perf_counter() - started < 5 and stats.failed_shards == 1
        assert stats.failed[f"{url}/junk.tar"] in ("invalid header", "bad checksum", "truncated header",
                                                  "empty header")


# ---- HTTP, pipe:, faults ----------------------------------------------------------------------------------------

def test_http_faults_are_skipped_counted_and_named(shard_root):
    make_shards(shard_root / "faulty", n_shards=4, per_shard=6)
    with ShardServer(shard_root, missing={"faulty/00001.tar"}, cut={"faulty/00002.tar"}) as url:
        dataset = loader.ShardDataset(f"{url}/faulty/{{00000..00003}}.tar", 2, seed=0, shuffle_buffer=3,
                                      policy=QUICK, end_markers=True)
        items = list(dataset)
    keys = [k for b in items if not b.get("end") for k in b["keys"]]
    good = [f"{i:06d}" for i in list(range(0, 6)) + list(range(18, 24))]
    assert sorted(k for k in keys if k in good) == good                       # every other sample, once
    # of the cut shard (samples 12-17) at most the ones before the break, each once (webdataset's pipe reader may
    # drop them all when curl has exited before they are read)
    assert len(keys) == len(set(keys)) and all(12 <= int(k) < 18 for k in set(keys) - set(good))
    report = items[-1]["read"]
    assert report["failed_shards"] == 2 and report["retries"] == 2
    assert report["failed"] == {f"{url}/faulty/00001.tar": "HTTP error (>= 400)",
                                f"{url}/faulty/00002.tar": "transfer cut short"}


def test_unreachable_sources_are_found_before_any_compute(shard_root):
    with ShardServer(shard_root) as url:
        assert sources.unreachable(sources.parse_source(f"{url}/train/{{00000..00002}}.tar")) is None
        assert "HTTP error" in sources.unreachable(sources.parse_source(f"{url}/nowhere/{{0..4}}.tar"))
    assert "exited with status" in sources.unreachable(sources.parse_source("pipe:cat /nonexistent/{0..1}.tar"))


def test_train_from_http_and_pipe_equals_local_files_bit_for_bit(shard_root, tmp_path):
    common = ("train.steps=14", "train.log_every=1", "train.val_every=1000", "train.checkpoint_every=1000")
    train_cli.main(args(shard_root, tmp_path / "local", *common))
    with ShardServer(shard_root) as url:
        train_cli.main(args(shard_root, tmp_path / "http", *common,
                            f"data.shards={url}/train/{{00000..00002}}.tar", f"data.val_shards={url}/val/manifest.json"))
    train_cli.main(args(shard_root, tmp_path / "pipe", *common,
                        f"data.shards=pipe:cat {shard_root}/train/{{00000..00002}}.tar"))
    reference = losses(tmp_path / "local")
    assert len(reference) == 14   # two epochs of 24 samples at batch 4 and more
    assert losses(tmp_path / "http") == reference and losses(tmp_path / "pipe") == reference


def test_a_run_with_failing_shards_finishes_and_logs_them(shard_root, tmp_path):
    make_shards(shard_root / "flaky", n_shards=4, per_shard=6)
    with ShardServer(shard_root, missing={"flaky/00001.tar"}, cut={"flaky/00002.tar"}) as url:
        train_cli.main(args(shard_root, tmp_path / "run", "train.steps=8", "train.log_every=1",
                            f"data.shards={url}/flaky/{{00000..00003}}.tar", "data.retries=1",
                            "data.retry_delay=0.01", "data.timeout=5"))
    log = records(tmp_path / "run")
    named = {u: why for r in log if "data_failed" in r for u, why in r["data_failed"].items()}
    assert named == {f"{url}/flaky/00001.tar": "HTTP error (>= 400)", f"{url}/flaky/00002.tar": "transfer cut short"}
    assert sum("data_failed" in r for r in log) <= 2 * 2        # each named once per epoch's report at most
    trained = [r for r in log if "loss" in r]
    assert trained[-1]["step"] == 8 and trained[-1]["data"]["failed_shards"] >= 2


def test_a_remote_manifest_is_read_at_the_start_only(shard_root, tmp_path):
    server = ShardServer(shard_root)
    with server as url:
        train_cli.main(args(shard_root, tmp_path / "run", "train.steps=16", f"data.shards={url}/train/manifest.json"))
    assert len(losses(tmp_path / "run")) >= 3                                   # 16 steps: over 2 epochs
    assert server.requests.count("train/manifest.json") == 2                    # the check, then the run


def test_bad_validation_shards_and_too_few_shards_for_the_ranks_stop_the_run(shard_root, tmp_path, capsys):
    (tmp_path / "junk.tar").write_bytes(b"no tar" * 1000)
    with pytest.raises(SystemExit) as err:
        train_cli.main(args(shard_root, tmp_path / "run", f"data.val_shards={tmp_path / 'junk.tar'}"))
    assert err.value.code == 2 and "data.val_shards" in capsys.readouterr().err
    from mmdit.config import load_config

    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), ["data.batch_size=4", "data.num_workers=2"])
    one_shard = sources.parse_sources(str(shard_root / "val"))
    with pytest.raises(ValueError, match="epoch 0 gives rank 1 no batch"):
        train_cli.check_shares(one_shard, cfg, world=2)
    train_cli.check_shares(sources.parse_sources(str(shard_root / "train")), cfg, world=1)


def test_a_one_shard_pattern_trains_on_that_shard_only(shard_root, tmp_path):
    train_cli.main(args(shard_root, tmp_path / "run", "train.steps=6", "train.log_every=1",
                        f"data.shards={shard_root}/train/{{00000..00000}}.tar"))
    keys = {k for r in records(tmp_path / "run") if "keys" in r for k in r["keys"]}
    assert keys == {f"{i:06d}" for i in range(8)}


@pytest.mark.parametrize("spec,match", [
    ("s3://bucket/{{0..3}}.tar", "unknown scheme s3:"),
    ("{root}/train/{{}}.tar", "empty or malformed brace range"),
    ("{url}/nowhere/{{0..2}}.tar", "cannot be read: "),
    ("{root}/wrong", "has schema 99"),
])
def test_bad_sources_stop_train_py_with_one_line_before_compute(shard_root, tmp_path, spec, match):
    wrong = shard_root / "wrong"
    wrong.mkdir(exist_ok=True)
    (wrong / "manifest.json").write_text(json.dumps({"schema": 99, "shards": {"00000.tar": 8}}))
    with ShardServer(shard_root) as url:
        result = subprocess.run([sys.executable, str(ROOT / "train.py"),
                                 *args(shard_root, tmp_path / "run", f"data.shards={spec.format(root=shard_root, url=url)}")],
                                capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and match in result.stderr.strip().splitlines()[-1], result.stderr[-1500:]
    assert not (tmp_path / "run").exists()


# ---- exact resume -----------------------------------------------------------------------------------------------

def final_weights(out, step):
    folder = out / "checkpoints" / f"step_{step:08d}"
    return {name: load_mmdit(folder / f"{name}.safetensors").state_dict() for name in ("model", "ema")}


@pytest.mark.parametrize("resampled", [False, True], ids=["epochs", "resampled"])
@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
def test_resume_is_exact_with_any_number_of_workers(tmp_path, num_workers, resampled):
    """5 shards of 6 at batch 2: 15 batches an epoch (resampled: the manifest's 30 samples), over 3 workers
    streams of 6, 6 and 3 batches. 13 + 13 steps cross the epoch's end after one stream has ended."""
    make_shards(tmp_path / "train", n_shards=5, per_shard=6)
    common = ['data.val_shards=""', "data.batch_size=2", f"data.num_workers={num_workers}", f"data.resampled={str(resampled).lower()}",
              "train.log_every=1", "train.val_every=1000", "train.checkpoint_every=13", "train.keep_checkpoints=5"]
    train_cli.main(args(tmp_path, tmp_path / "whole", "train.steps=26", *common))
    train_cli.main(args(tmp_path, tmp_path / "split", "train.steps=13", *common))
    train_cli.main(args(tmp_path, tmp_path / "split", "train.steps=26", *common) + ["--resume", "latest"])
    whole, split = records(tmp_path / "whole"), records(tmp_path / "split")
    steps = lambda log: {r["step"]: (r["loss"], r["keys"]) for r in log if "loss" in r}
    assert len(steps(whole)) == 26 and steps(split) == steps(whole)
    a, b = final_weights(tmp_path / "whole", 26), final_weights(tmp_path / "split", 26)
    assert all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])


def test_resume_with_other_workers_is_refused(tmp_path, capsys):
    make_shards(tmp_path / "train", n_shards=2, per_shard=6)
    common = ['data.val_shards=""', "data.batch_size=2", "train.checkpoint_every=3"]
    train_cli.main(args(tmp_path, tmp_path / "run", "train.steps=3", "data.num_workers=2", *common))
    with pytest.raises(SystemExit) as err:
        train_cli.main(args(tmp_path, tmp_path / "run", "train.steps=6", "data.num_workers=0", *common)
                       + ["--resume", "latest"])
    assert err.value.code == 2 and "saved reading with data.num_workers 2" in capsys.readouterr().err


def test_two_ranks_with_loader_workers_resume_exactly(tmp_path):
    """2 ranks x 2 workers: rank 0 reads 3 shards (9 batches an epoch), rank 1 two (6); 5 + 5 steps cross both
    ranks' epoch ends."""
    make_shards(tmp_path / "train", n_shards=5, per_shard=6)
    config = tmp_path / "accelerate.yaml"
    config.write_text(ACCELERATE_DEEPSPEED_2.format(ds=ROOT / "configs" / "deepspeed" / "zero2.json"))

    def launch(out, steps, *extra):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
               f"data.shards={tmp_path / 'train'}", f"train.out_dir={out}", f"train.steps={steps}",
               "train.log_every=1", "data.batch_size=2", "data.num_workers=2", "train.checkpoint_every=5",
               "train.keep_checkpoints=5", "data.caption_variant_probs=[1]", *extra]
        result = subprocess.run(cmd, env={**os.environ, "DS_ACCELERATOR": "cpu"}, cwd=ROOT, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]

    launch(tmp_path / "whole", 10)
    launch(tmp_path / "split", 5)
    launch(tmp_path / "split", 10, "--resume", "latest")
    for name in ("log.jsonl", "log_rank1.jsonl"):
        steps = lambda out: {r["step"]: (r["loss"], r["keys"]) for r in records(out, name) if "loss" in r}
        assert len(steps(tmp_path / "whole")) == 10 and steps(tmp_path / "split") == steps(tmp_path / "whole")
    a, b = final_weights(tmp_path / "whole", 10), final_weights(tmp_path / "split", 10)
    assert all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])
