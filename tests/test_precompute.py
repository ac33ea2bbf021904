"""data/precompute.py on a tiny img2dataset-style input with the tiny pipeline: what it stores is what the encoders
and VAE give, the loader and assembly reproduce the sampling path's conditioning, bad input is counted, and an
interrupted run resumes to the same bytes."""

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmdit import loader, shards, sources
from mmdit.images import resize_center_crop
from mmdit.loading import load_conditioning
from mmdit.text import assemble

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("precompute_cli", ROOT / "data" / "precompute.py")
precompute = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(precompute)


def png(seed, size=(48, 32)):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_input(folder):
    """Two input shards: good samples, an undecodable image, a missing caption, an empty caption; shard 1 is
    truncated."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for i in range(4):
            add(tar, f"{i:04d}.png", png(i))
            add(tar, f"{i:04d}.txt", f"a photo of a red circle number {i}".encode())
            add(tar, f"{i:04d}.json", json.dumps({"caption_synthetic": f"a red circle, image {i}"}).encode())
        add(tar, "0004.jpg", b"this is no jpeg")
        add(tar, "0004.txt", b"a broken image")
        add(tar, "0004.json", json.dumps({"caption_synthetic": "broken"}).encode())
        add(tar, "0005.png", png(5))
        add(tar, "0005.json", json.dumps({"caption_synthetic": "no txt caption"}).encode())
        add(tar, "0006.png", png(6, size=(32, 48)))
        add(tar, "0006.txt", b"")
        add(tar, "0006.json", json.dumps({"caption_synthetic": "empty first caption"}).encode())
    with tarfile.open(folder / "00001.tar", "w") as tar:
        for i in range(10, 14):
            add(tar, f"{i:04d}.png", png(i))
            add(tar, f"{i:04d}.txt", f"a photo of a blue square number {i}".encode())
            add(tar, f"{i:04d}.json", json.dumps({"caption_synthetic": f"a blue square {i}"}).encode())
    data = (folder / "00001.tar").read_bytes()
    (folder / "00001.tar").write_bytes(data[: int(len(data) * 0.6)])
    return [str(folder / "00000.tar"), str(folder / "00001.tar")]


def run(inputs, model, out, *extra):
    precompute.main(["--input", *inputs, "--model", str(model), "--out", str(out), "--resolution", "32",
                     "--second-caption", "json:caption_synthetic", "--t5-tokens", "20", "--batch-size", "3",
                     "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def precomputed(tiny_pipeline, tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    inputs = make_input(root / "raw")
    run(inputs, tiny_pipeline, root / "out")
    return root, inputs


def test_manifest_counts_and_skips(precomputed):
    root, _ = precomputed
    manifest = shards.read_manifest(root / "out")
    assert manifest["shards"]["00000.tar"] == 5            # 0-3 and the empty-caption sample 6
    assert 0 < manifest["shards"]["00001.tar"] < 4          # the truncated shard gives what it holds
    assert manifest["skipped"]["undecodable_image"] == 1 and manifest["skipped"]["missing_caption"] == 1
    assert manifest["skipped"]["empty_captions_encoded"] == 1 and manifest["skipped"]["truncated_inputs"] == 1
    assert manifest["identities"]["t5_tokens"] == 20 and manifest["identities"]["vae"]


def test_stored_tensors_equal_the_encoders_and_vae(precomputed, tiny_pipeline):
    root, _ = precomputed
    text, vae = load_conditioning(tiny_pipeline, t5_tokens=20)
    samples = {s["record"]["key"]: s for s in sources.read_shard(str(root / "out" / "00000.tar"))}
    assert sorted(samples) == ["0000", "0001", "0002", "0003", "0006"]
    for key, seed in (("0001", 1), ("0006", 6)):
        s = samples[key]
        with Image.open(io.BytesIO(png(seed, size=(32, 48) if key == "0006" else (48, 32)))) as im:
            pixels, box = resize_center_crop(im, 32, 32)
        assert s["record"]["crop_box"] == box and s["record"]["bucket"] == [32, 32]
        torch.testing.assert_close(s["latent"].float(), vae.encode(pixels[None])[0], rtol=2e-3, atol=2e-3)
        for v, caption in enumerate(s["record"]["captions"]):
            out = text.encode([caption])
            ref = {"clip_l": out["clip_l"][0][0], "clip_l_pooled": out["clip_l"][1][0], "clip_g": out["clip_g"][0][0],
                   "clip_g_pooled": out["clip_g"][1][0], "t5": out["t5"][0]}
            for name, tensor in ref.items():
                torch.testing.assert_close(s["variants"][v][name].float(), tensor, rtol=2e-3, atol=2e-3)
    assert samples["0006"]["record"]["captions"][0] == ""


def test_loader_and_assembly_equal_the_sampling_path(precomputed, tiny_pipeline):
    root, _ = precomputed
    text, _ = load_conditioning(tiny_pipeline, t5_tokens=20)
    batch = next(iter(loader.ShardDataset(str(root / "out"), batch_size=2, seed=0, shuffle_buffer=1, variant_probs=[1, 0])))
    parts = dict(clip_l=(batch["clip_l"], batch["clip_l_pooled"]), clip_g=(batch["clip_g"], batch["clip_g_pooled"]),
                 t5=batch["t5"])
    context, pooled = assemble(text.layout, 2, **parts)
    captions = []
    for key in batch["keys"]:
        shard = "00000.tar" if int(key) < 10 else "00001.tar"
        captions += [s["record"]["captions"][0] for s in sources.read_shard(str(root / "out" / shard))
                     if s["record"]["key"] == key]
    ref_context, ref_pooled = text.conditioning(captions)
    torch.testing.assert_close(context, ref_context, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(pooled, ref_pooled, rtol=2e-3, atol=2e-3)


def test_interrupted_run_resumes_to_identical_shards(precomputed, tiny_pipeline, tmp_path):
    root, inputs = precomputed
    out = tmp_path / "out"
    run(inputs[:1], tiny_pipeline, out)                     # as if the run stopped after shard 0 ...
    (out / ".00001.tar.tmp").write_bytes(b"partial")         # ... while writing shard 1
    (out / "manifest.json").unlink()                         # that partial run's manifest covered one input
    run(inputs, tiny_pipeline, out)
    for name in ("00000.tar", "00001.tar"):
        assert (out / name).read_bytes() == (root / "out" / name).read_bytes()
    assert json.loads((out / "manifest.json").read_text()) == json.loads((root / "out" / "manifest.json").read_text())


def test_image_folder_with_buckets(tiny_pipeline, tmp_path):
    (tmp_path / "photos").mkdir()
    lines = []
    for i, size in enumerate([(128, 64), (64, 128), (64, 64)]):
        (tmp_path / "photos" / f"{i}.png").write_bytes(png(i, size))
        lines.append(json.dumps({"file": f"{i}.png", "caption": f"a picture {i}"}))
    lines.append(json.dumps({"file": "missing.png", "caption": "gone"}))
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    lines.append("[1, 2]")                                   # not an object: skipped, the run goes on
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    precompute.main(["--images", str(tmp_path / "photos"), "--captions", str(tmp_path / "captions.jsonl"),
                     "--model", str(tiny_pipeline), "--out", str(tmp_path / "out"),
                     "--resolution", "64", "--buckets", "--no-t5", "--samples-per-shard", "2", "--device", "cpu"])
    manifest = shards.read_manifest(tmp_path / "out")
    assert manifest["samples"] == 3 and manifest["skipped"] == {"missing_image": 1} and len(manifest["shards"]) == 2
    samples = [s for name in manifest["shards"] for s in sources.read_shard(str(tmp_path / "out" / name))]
    shapes = {s["record"]["key"]: tuple(s["latent"].shape[1:]) for s in samples}
    assert shapes == {"000000000": (6, 12), "000000001": (12, 6), "000000002": (8, 8)}  # 96x48, 48x96, 64x64
    assert all("t5" not in v for s in samples for v in s["variants"])


def test_two_processes_split_the_inputs_and_the_last_writes_the_manifest(precomputed, tiny_pipeline, tmp_path,
                                                                          monkeypatch):
    """As under accelerate launch: each process takes every other input shard; together they make the same
    shards as one process, and the manifest appears once both are done."""
    root, inputs = precomputed
    out = tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    run(inputs, tiny_pipeline, out)
    assert sorted(p.name for p in out.glob("*.tar")) == ["00001.tar"] and not (out / "manifest.json").exists()
    monkeypatch.setenv("RANK", "0")
    run(inputs, tiny_pipeline, out)
    for name in ("00000.tar", "00001.tar"):
        assert (out / name).read_bytes() == (root / "out" / name).read_bytes()
    assert shards.read_manifest(out)["samples"] == shards.read_manifest(root / "out")["samples"]


def test_rerun_with_other_settings_is_refused(precomputed, tiny_pipeline, tmp_path, capsys):
    root, inputs = precomputed
    out = tmp_path / "out"
    run(inputs[:1], tiny_pipeline, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit) as err:
        run(inputs, tiny_pipeline, out, "--no-t5")
    assert err.value.code == 2 and "other settings (t5:" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before   # nothing touched


def test_inputs_over_http_and_a_latin1_caption(tiny_pipeline, tmp_path):
    """--input takes URLs (here a local server); a caption that is not UTF-8 is read as latin-1 and counted, not
    turned into U+FFFD."""
    from mmdit.testing import ShardServer

    (tmp_path / "raw").mkdir()
    with tarfile.open(tmp_path / "raw" / "00000.tar", "w") as tar:
        add(tar, "0000.png", png(0))
        add(tar, "0000.txt", "un caf\u00e9 cr\u00e8me".encode("latin-1"))
        add(tar, "0000.json", json.dumps({"caption_synthetic": "a cup"}).encode())
        add(tar, "0001.png", png(1))
        add(tar, "0001.txt", "a plain caption".encode())
        add(tar, "0001.json", json.dumps({"caption_synthetic": "plain"}).encode())
    with ShardServer(tmp_path / "raw") as url:
        run([f"{url}/{{00000..00000}}.tar"], tiny_pipeline, tmp_path / "out")
    manifest = shards.read_manifest(tmp_path / "out")
    assert manifest["samples"] == 2 and manifest["skipped"]["captions_read_as_latin1"] == 1
    captions = {s["record"]["key"]: s["record"]["captions"][0]
                for s in sources.read_shard(str(tmp_path / "out" / "00000.tar"))}
    assert captions == {"0000": "un caf\u00e9 cr\u00e8me", "0001": "a plain caption"}
