"""The benchmark's instruments: they must measure what they say, or the reported ratios mean nothing."""

import torch

from mmdit.bench.measure import alternate, cpu_peak_supported, paired_ratio, peak_memory
from mmdit.bench.model import run_case


def test_paired_ratio_follows_drift():
    slow = [2.0, 4.0, 6.0]   # the machine slows down over the run; the ratio within each round stays 2
    fast = [1.0, 2.0, 3.0]
    assert paired_ratio(slow, fast) == 2.0


def test_alternate_runs_every_function_every_round():
    calls = []
    times = alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, torch.device("cpu"), 3)
    assert calls == ["a", "b"] * 4 and all(len(t) == 3 for t in times.values())


def test_cpu_peak_memory_sees_a_large_temporary():
    if not cpu_peak_supported():
        return  # not Linux: the benchmark reports n/a, which this cannot check
    with peak_memory(torch.device("cpu")) as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    assert mem["bytes"] >= 60 * 2**20


def test_run_case_compares_equal_models():
    r = run_case(depth=2, side=4, batch=1, precision="fp32", device=torch.device("cpu"), rounds=1,
                 peak_flops=1e11, measure_memory=False)
    assert r["max_abs_diff"] < 1e-5
    assert r["train_speedup"] > 0 and set(r["train_s"]) == {"ours", "diffusers"}
    assert r["train_flops"] > 0 and 0 < r["train_mfu"]["ours"]


def test_sampling_bench_sides_make_the_same_images(tiny_pipeline):
    from mmdit.bench.sample import make_sides

    sides = make_sides(str(tiny_pipeline), steps=3, size=32, batch=2, t5_tokens=20, device=torch.device("cpu"),
                       dtype=torch.float32)
    ours, theirs = sides["ours"](), sides["diffusers"]()
    assert ours.shape == theirs.shape == (2, 32, 32, 3)
    assert abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_data_bench_pieces(tmp_path):
    from mmdit.bench.data import loader_rate, write_synthetic

    from mmdit.testing import ShardServer

    size = write_synthetic(tmp_path, samples=6, per_shard=3, variants=1, compact=False)
    assert size > 6 * 0.98e6 and loader_rate(f"{tmp_path}/{{00000..00001}}.tar", batch_size=2) > 0
    with ShardServer(tmp_path) as url:
        assert loader_rate(f"{url}/{{00000..00001}}.tar", batch_size=2) > 0


def test_train_bench_loops_run_on_shards(tmp_path):
    from mmdit.bench.data import write_synthetic
    from mmdit.bench.train import loops
    from mmdit.shards import write_manifest

    write_synthetic(tmp_path, samples=2, per_shard=2, variants=1, compact=False)
    write_manifest(tmp_path, {"00000.tar": 2}, {}, {})
    sides = loops(tmp_path, depth=2, batch=1)
    assert set(sides) == {"bare step (ours)", "diffusers loop"}
    for fn in sides.values():
        fn()
        fn()   # the diffusers loop reads the shards twice over: it restarts them when they run out


def test_lora_bench_sides_step():
    from mmdit.bench.lora import make_step

    full, full_count = make_step(depth=2, batch=1, side=8, rank=None)
    lora, lora_count = make_step(depth=2, batch=1, side=8, rank=4)
    full()
    lora()
    assert 0 < lora_count < full_count / 10
