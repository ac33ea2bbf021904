"""Choosing the compute precision by measurement: bf16 autocast only where it is faster on this device.

CPUs differ by orders of magnitude here: with native bf16 (AVX512-BF16, AMX) a bf16 matmul runs about twice as fast
as fp32; on an AVX2-only CPU it is emulated and runs hundreds of times slower. So `precision: auto` times a
training-shaped block (a transformer MLP: two linear layers, forward and backward) both ways on the device and picks
the faster, keeping fp32 unless bf16 wins clearly. The bf16 timing stops at its first repeat slower than fp32, so an
emulating CPU costs one slow repeat, not several. On CUDA, bf16 is chosen where the GPU has it natively. Master
weights are fp32 either way. A resumed run reuses the choice its checkpoint recorded (train.py), so a noisy timing
cannot change precision halfway.
"""

from __future__ import annotations

import time

import torch

from mmdit.config import PRECISIONS as CHOICES


def bf16_speedup(device, width: int = 256, tokens: int = 1024, repeats: int = 5) -> float:
    """fp32 time / bf16-autocast time of forward + backward through two linear layers (width -> 4 width -> width)
    on tokens rows, the medians of repeats (bf16 cut short where one repeat already loses to fp32)."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                 torch.nn.Linear(4 * width, width)).to(device)
    x = torch.randn(tokens, width, generator=g).to(device)

    def run(bf16: bool, give_up_after: float = float("inf")) -> float:
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                y = layers(x)
            y.float().square().mean().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            if times[-1] > give_up_after:
                return times[-1]
        return sorted(times[1:])[len(times[1:]) // 2]

    fp32 = run(False)
    return fp32 / run(True, give_up_after=4 * fp32)


def choose_precision(requested: str, device, speedup=bf16_speedup, margin: float = 1.1) -> str:
    """"bf16" or "fp32": as requested, or for "auto" bf16 where speedup(device) exceeds margin."""
    if requested not in CHOICES:
        raise ValueError(f"precision {requested!r} is not one of {', '.join(CHOICES)}")
    if requested != "auto":
        return requested
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    return "bf16" if speedup(device) > margin else "fp32"
