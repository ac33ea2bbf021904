"""The shard format, the writer and the loader: round trips, exact epoch coverage, determinism, corrupt data."""

import io
import random
import tarfile

import numpy as np
import pytest
import torch

from mmdit import loader, shards, sources
from mmdit.sources import parse_sources

C, V = 16, 2


def fake_sample(i, side=4, t5=True):
    g = torch.Generator().manual_seed(i)
    variants = []
    for v in range(V):
        variant = {"clip_l": torch.randn(5, 6, generator=g), "clip_l_pooled": torch.randn(6, generator=g),
                   "clip_g": torch.randn(5, 7, generator=g), "clip_g_pooled": torch.randn(7, generator=g)}
        if t5:
            variant["t5"] = torch.randn(9, 13, generator=g)
        variants.append(variant)
    record = {"captions": [f"caption {i}", f"synthetic caption {i}"], "original_size": [64, 48]}
    return f"{i:06d}", record, torch.randn(C, side, side, generator=g), variants


def write_shards(folder, n_shards=6, per_shard=5, dtype="float16", sides=(4,)):
    counts = {}
    for s in range(n_shards):
        name = f"{s:05d}.tar"
        with shards.ShardWriter(folder / name, dtype) as w:
            for j in range(per_shard):
                i = s * per_shard + j
                key, record, latent, variants = fake_sample(i, side=sides[i % len(sides)])
                w.write(key, record, latent, variants)
        counts[name] = w.count
    shards.write_manifest(folder, counts, {"vae": "test"}, {"undecodable": 0})
    return counts


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_round_trip(tmp_path, dtype):
    write_shards(tmp_path, n_shards=1, per_shard=3, dtype=dtype)
    samples = list(sources.read_shard(tmp_path / "00000.tar"))
    assert [s["record"]["key"] for s in samples] == ["000000", "000001", "000002"]
    for i, s in enumerate(samples):
        key, record, latent, variants = fake_sample(i)
        torch_dtype = getattr(torch, dtype)
        assert s["record"]["captions"] == record["captions"] and s["record"]["dtype"] == dtype
        assert s["latent"].dtype == torch_dtype and torch.equal(s["latent"], latent.to(torch_dtype))
        for ours, ref in zip(s["variants"], variants):
            assert set(ours) == set(shards.TEXT_FIELDS)
            assert all(torch.equal(ours[k], ref[k].to(torch_dtype)) for k in ref)


def test_shards_are_plain_webdataset_and_npy(tmp_path):
    import webdataset as wds

    write_shards(tmp_path, n_shards=1, per_shard=2)
    samples = list(wds.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False))
    assert len(samples) == 2 and "v1.t5.npy" in samples[0] and "latent.npy" in samples[0]
    array = np.load(io.BytesIO(samples[0]["latent.npy"]), allow_pickle=False)
    assert array.dtype == np.float16 and array.shape == (C, 4, 4)


@pytest.mark.parametrize("array", [np.arange(24, dtype=np.float16).reshape(2, 3, 4),
                                   np.asfortranarray(np.arange(6, dtype=np.uint16).reshape(2, 3)),
                                   np.arange(3, dtype=">f4"), np.zeros((0, 5), np.int8), np.float32(7.0)])
def test_read_npy_matches_numpy(array):
    data = io.BytesIO()
    np.save(data, array, allow_pickle=False)
    ours, ref = shards.read_npy(data.getvalue()), np.load(io.BytesIO(data.getvalue()), allow_pickle=False)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape and np.array_equal(ours, ref)
    assert ours.flags.writeable   # torch.from_numpy warns on read-only arrays


def test_read_npy_refuses_what_np_load_refuses():
    data = io.BytesIO()
    np.save(data, np.arange(10, dtype=np.float32), allow_pickle=False)
    good = data.getvalue()
    with pytest.raises(ValueError, match="bad magic"):
        shards.read_npy(b"PK" + good[2:])
    with pytest.raises(ValueError, match="header says"):
        shards.read_npy(good[:-4])
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickled"):
        shards.read_npy(pickled.getvalue())


def test_writes_are_reproducible_and_atomic(tmp_path):
    write_shards(tmp_path / "a", n_shards=1)
    write_shards(tmp_path / "b", n_shards=1)
    assert (tmp_path / "a" / "00000.tar").read_bytes() == (tmp_path / "b" / "00000.tar").read_bytes()
    with pytest.raises(RuntimeError):
        with shards.ShardWriter(tmp_path / "c" / "00000.tar") as w:
            w.write(*fake_sample(0))
            raise RuntimeError("interrupted")
    assert list((tmp_path / "c").iterdir()) == []  # no partial shard, no temporary left


def keys_seen(folder, world_size, num_workers, seed=0, epoch=0):
    listed = parse_sources(str(folder))
    per_stream = {}
    for rank in range(world_size):
        for worker in range(num_workers):
            per_stream[(rank, worker)] = [s["record"]["key"] for s in loader.sample_stream(
                listed, seed=seed, epoch=epoch, rank=rank, world_size=world_size, stream=worker,
                streams=num_workers, shuffle_buffer=4)]
    return per_stream


def test_ranks_and_workers_see_every_sample_once_per_epoch(tmp_path):
    write_shards(tmp_path, n_shards=8, per_shard=5)
    seen = keys_seen(tmp_path, world_size=2, num_workers=2)
    everything = [k for keys in seen.values() for k in keys]
    assert sorted(everything) == [f"{i:06d}" for i in range(40)]   # all 40, none twice
    by_rank = [set(seen[(0, 0)] + seen[(0, 1)]), set(seen[(1, 0)] + seen[(1, 1)])]
    assert not by_rank[0] & by_rank[1]
    shards_by_rank = [{int(k) // 5 for k in keys} for keys in by_rank]   # 5 samples per shard
    assert not shards_by_rank[0] & shards_by_rank[1] and len(shards_by_rank[0]) == 4  # disjoint shards, 4 each
    assert keys_seen(tmp_path, 2, 2) == seen                        # same seed, same order
    other_epoch = keys_seen(tmp_path, 2, 2, epoch=1)
    assert other_epoch != seen and sorted(k for v in other_epoch.values() for k in v) == sorted(everything)


def test_resampled_streams_are_endless_and_deterministic(tmp_path):
    write_shards(tmp_path, n_shards=2, per_shard=3)
    take = lambda: [s["record"]["key"] for _, s in zip(range(20), loader.sample_stream(
        parse_sources(str(tmp_path)), seed=1, epoch=0, resampled=True, shuffle_buffer=2))]
    first = take()
    assert len(first) == 20 and first == take()


def test_truncated_shard_and_corrupt_sample_are_skipped_and_counted(tmp_path):
    write_shards(tmp_path, n_shards=2, per_shard=4)
    data = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(data[: len(data) // 2])
    # In shard 0, replace sample 000001's latent with garbage bytes.
    members = []
    with tarfile.open(tmp_path / "00000.tar") as tar:
        for info in tar:
            payload = tar.extractfile(info).read()
            members.append((info, b"not an npy file" if info.name == "000001.latent.npy" else payload))
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for info, payload in members:
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    stats = sources.ReadStats()
    keys = [s["record"]["key"] for shard in parse_sources(str(tmp_path))[0].urls
            for s in sources.read_shard(shard, stats)]
    assert "000001" not in keys and {"000000", "000002", "000003", "000004"} <= set(keys)
    assert stats.corrupt_samples == 1 and stats.failed_shards == 1 and len(keys) < 8
    assert list(stats.failed) == [str(tmp_path / "00001.tar")]


def test_bucket_batches_are_single_shape_and_variants_mix(tmp_path):
    write_shards(tmp_path, n_shards=2, per_shard=12, sides=(4, 6))
    dataset = loader.ShardDataset(str(tmp_path), batch_size=3, seed=0, shuffle_buffer=5)
    batches = list(dataset)
    assert len(batches) == 8 and all(b["latent"].shape[0] == 3 for b in batches)
    assert {tuple(b["latent"].shape[2:]) for b in batches} == {(4, 4), (6, 6)}
    assert batches[0]["t5"].shape == (3, 9, 13) and batches[0]["clip_g_pooled"].shape == (3, 7)
    # 50/50 caption variants: over many draws both appear about equally.
    rng = random.Random(0)
    sample = next(sources.read_shard(str(tmp_path / "00000.tar")))
    picks = [loader.choose_variant(sample, rng) is sample["variants"][0] for _ in range(2000)]
    assert abs(np.mean(picks) - 0.5) < 0.05


def batches_from(folder, num_workers, position=None, **kw):
    dataset = loader.ShardDataset(str(folder), batch_size=2, seed=3, epoch=1, shuffle_buffer=4, position=position,
                                  end_markers=True, **kw)
    items = list(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers))
    return [(b["stream"], b["keys"]) for b in items if not b.get("end")]


@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
def test_resume_continues_with_the_next_batch_at_every_point_of_an_epoch(tmp_path, num_workers):
    """Streams of unequal length (5 shards over 3 workers) end at different times; DataLoader then passes over
    the ended ones. Cut anywhere, the resumed loader gives exactly the rest of the epoch."""
    write_shards(tmp_path, n_shards=5, per_shard=6)
    full = batches_from(tmp_path, num_workers)
    assert len(full) == 15
    streams = max(1, num_workers)
    for cut in range(len(full)):
        position = loader.DataPosition.start(streams, epoch=1)
        for stream, _ in full[:cut]:
            position.advance(stream)
        assert [k for _, k in batches_from(tmp_path, num_workers, position)] == [k for _, k in full[cut:]], cut


def test_compact_t5_is_smaller_and_close(tmp_path):
    g = torch.Generator().manual_seed(0)
    t5 = torch.randn(77, 256, generator=g)
    t5[:, 7] *= 40  # an outlier channel, as T5-XXL has
    variants = [{"clip_l": torch.randn(5, 6), "clip_l_pooled": torch.randn(6), "clip_g": torch.randn(5, 7),
                 "clip_g_pooled": torch.randn(7), "t5": t5}]
    sizes = {}
    for compact in (False, True):
        with shards.ShardWriter(tmp_path / f"{compact}.tar", compact=compact) as w:
            w.write("000000", {}, torch.randn(16, 4, 4), variants)
        sizes[compact] = (tmp_path / f"{compact}.tar").stat().st_size
        back = next(sources.read_shard(str(tmp_path / f"{compact}.tar")))["variants"][0]["t5"].float()
        rel = ((back - t5).norm() / t5.norm()).item()
        assert rel < (1e-3 if not compact else 2.5e-2)
        # the outlier costs precision only in its own group of 64 channels: the scales are per group
        assert ((back[:, 64:] - t5[:, 64:]).norm() / t5[:, 64:].norm()).item() < (1e-3 if not compact else 1e-2)
    assert sizes[True] < 0.65 * sizes[False]


def test_buckets_and_crop():
    from PIL import Image

    from mmdit.images import make_buckets, nearest_bucket, resize_center_crop

    buckets = make_buckets(256)
    assert (256, 256) in buckets and all(w % 16 == 0 and h % 16 == 0 for w, h in buckets)
    assert all(0.5 <= w / h <= 2 for w, h in buckets) and all(abs(w * h / 256**2 - 1) < 0.15 for w, h in buckets)
    assert nearest_bucket(1600, 900, buckets)[0] > nearest_bucket(1600, 900, buckets)[1]
    image = Image.new("RGB", (300, 100), (255, 0, 0))
    pixels, box = resize_center_crop(image, 64, 64)
    assert pixels.shape == (3, 64, 64) and box == [100.0, 0.0, 200.0, 100.0]
    assert torch.allclose(pixels[0], torch.ones(64, 64)) and torch.allclose(pixels[1], -torch.ones(64, 64))


def test_shard_cut_at_a_member_boundary_is_detected(tmp_path):
    """tarfile ends quietly at a cut that falls on a header; the missing end-of-archive marker gives it away,
    and the half-written last sample is not passed on."""
    write_shards(tmp_path, n_shards=1, per_shard=3)
    with tarfile.open(tmp_path / "00000.tar") as tar:
        cut = next(i.offset for i in tar.getmembers() if i.name == "000002.v0.clip_g.npy")
    data = (tmp_path / "00000.tar").read_bytes()
    (tmp_path / "00000.tar").write_bytes(data[:cut])
    stats = sources.ReadStats()
    keys = [s["record"]["key"] for s in sources.read_shard(str(tmp_path / "00000.tar"), stats)]
    assert keys == ["000000", "000001"] and stats.failed_shards == 1


def test_sample_missing_a_text_member_is_rejected():
    members = dict((name.split(".", 1)[1], data) for name, data in shards.encode_sample("k", {}, *fake_sample(0)[2:]))
    del members["v1.clip_g.npy"]
    with pytest.raises(ValueError, match="v1.clip_g.npy is missing"):
        shards.decode_sample(members)
