"""MM-DiT training step and forward pass against diffusers' SD3Transformer2DModel: same config, same weights.

Both models run in one process, alternating call by call. A training step is forward, MSE to a fixed target,
backward and a fused AdamW step (the same optimiser for both). Reported per case and precision: median times and
their ratio (diffusers / ours, > 1 means we are faster), peak memory of a training step above the resident model
and optimiser state, the largest output difference, and matmul FLOP/s as a fraction of this machine's dense-matmul
peak measured in the same run.
"""

from __future__ import annotations

import json
import statistics
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from mmdit.bench.measure import (alternate, matmul_peak, measure_in_subprocess, paired_ratio, peak_step_memory,
                                 track_freed_memory)
from mmdit.checkpoint import build_mmdit, to_native_state
from mmdit.model import forward_flops, train_step_flops

TEXT_TOKENS = 154  # 77 CLIP + 77 T5 tokens: Stability's reference length
DEFAULT_CASES = ("4:16:16", "8:32:4")  # depth : latent side : batch


def parse_case(text: str) -> tuple[int, int, int]:
    try:
        depth, side, batch = (int(v) for v in text.split(":"))
    except ValueError:
        raise SystemExit(f"bad case {text!r}: expected DEPTH:LATENT_SIDE:BATCH, e.g. 4:16:16") from None
    if side % 2:
        raise SystemExit(f"bad case {text!r}: the latent side must be even")
    return depth, side, batch


def build_pair(depth: int, side: int, device: torch.device, seed: int = 0):
    """diffusers' SD3Transformer2DModel of the paper's depth-d shape with random weights, and ours holding them."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    ref = SD3Transformer2DModel(
        sample_size=side, patch_size=2, in_channels=16, num_layers=depth, attention_head_dim=64,
        num_attention_heads=depth, joint_attention_dim=4096, caption_projection_dim=64 * depth,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=max(side // 2, 8))
    with torch.no_grad():  # not adaLN-zero: every path must carry signal for the comparison to mean anything
        for p in ref.parameters():
            p.normal_(0, 0.02)
    state, config = to_native_state({k: v.clone() for k, v in ref.state_dict().items()}, head_dim=64,
                                    source="diffusers model")
    ours = build_mmdit(state, config)
    return ref.to(device), ours.to(device), config


def make_case(depth, side, batch, precision, device):
    """Both models, the same inputs, and a train step and a forward pass for each: {name: (step, forward)}."""
    ref, ours, config = build_pair(depth, side, device)
    g = torch.Generator().manual_seed(1)
    x, target = (torch.randn(batch, 16, side, side, generator=g).to(device) for _ in range(2))
    sigma = torch.rand(batch, generator=g).to(device)
    context = torch.randn(batch, TEXT_TOKENS, 4096, generator=g).to(device)
    pooled = torch.randn(batch, 2048, generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-autocast" else nullcontext()
    calls = {
        "ours": lambda: ours(x, sigma, context, pooled),
        "diffusers": lambda: ref(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=context,
                                 pooled_projections=pooled, return_dict=False)[0],
    }
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
                  for name, m in (("ours", ours), ("diffusers", ref))}

    def train_step(name):
        def step():
            optimizers[name].zero_grad(set_to_none=True)
            with autocast:
                out = calls[name]()
            F.mse_loss(out.float(), target).backward()
            optimizers[name].step()
        return step

    def forward(name):
        def fwd():
            with torch.no_grad(), autocast:
                return calls[name]()
        return fwd

    return config, {name: (train_step(name), forward(name)) for name in calls}


def step_memory_alone(depth, side, batch, precision, device, name):
    """Peak memory of one training step of one side, in a process holding only what that side needs."""
    track_freed_memory()
    config, sides = make_case(depth, side, batch, precision, device)
    for other in [n for n in sides if n != name]:
        del sides[other]
    return peak_step_memory(sides[name][0], device)


def run_case(depth, side, batch, precision, device, rounds, peak_flops, measure_memory=True):
    config, sides = make_case(depth, side, batch, precision, device)
    max_diff = (sides["ours"][1]().float() - sides["diffusers"][1]().float()).abs().max().item()
    train_rounds = alternate({n: s[0] for n, s in sides.items()}, device, rounds)
    fwd_rounds = alternate({n: s[1] for n, s in sides.items()}, device, rounds)
    train = {n: statistics.median(t) for n, t in train_rounds.items()}
    fwd = {n: statistics.median(t) for n, t in fwd_rounds.items()}
    del sides
    if not measure_memory:
        memory = {"ours": None, "diffusers": None}
    elif device.type == "cpu":  # each side in a fresh process: allocator settings that track memory slow timing
        memory = {n: measure_in_subprocess(step_memory_alone, depth, side, batch, precision, device, n)
                  for n in ("ours", "diffusers")}
    else:
        memory = {n: step_memory_alone(depth, side, batch, precision, device, n) for n in ("ours", "diffusers")}

    image_tokens = (side // 2) ** 2
    flops = train_step_flops(config, batch, image_tokens, TEXT_TOKENS)
    f = forward_flops(config, image_tokens, TEXT_TOKENS)
    fwd_flops = batch * sum(f.values())
    return {
        "depth": depth, "latent": f"{side}x{side}", "image_tokens": image_tokens, "text_tokens": TEXT_TOKENS,
        "batch": batch, "precision": precision, "max_abs_diff": max_diff,
        "train_s": train, "forward_s": fwd,
        "train_speedup": paired_ratio(train_rounds["diffusers"], train_rounds["ours"]),
        "forward_speedup": paired_ratio(fwd_rounds["diffusers"], fwd_rounds["ours"]), "peak_bytes": memory,
        "train_flops": flops, "train_mfu": {n: flops / t / peak_flops for n, t in train.items()},
        "forward_mfu": {n: fwd_flops / t / peak_flops for n, t in fwd.items()}, "matmul_peak_flops": peak_flops,
    }


def bare_train_step(depth: int, batch: int, side: int = 32, text_tokens: int = TEXT_TOKENS, compile: bool = False,
                    lora_rank: int | None = None):
    """A paper-family MM-DiT and one training step on fixed tensors (forward, MSE, backward, fused AdamW): the
    rate the model itself allows, with no data path around it. lora_rank: peft adapters of that rank on the
    default targets train instead of every weight. The step's `trained` is the count of trained parameters."""
    from mmdit.config import LoraSpec, paper_depth
    from mmdit.model import MMDiT

    model = MMDiT(paper_depth(depth, pos_embed_max_size=max(side // 2, 8)))
    if lora_rank is not None:
        from mmdit.lora import add_lora

        add_lora(model, LoraSpec(rank=lora_rank))
    if compile:
        model.compile()
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-4, fused=True)
    x, target = torch.randn(batch, 16, side, side), torch.randn(batch, 16, side, side)
    sigma, context, pooled = torch.rand(batch), torch.randn(batch, text_tokens, 4096), torch.randn(batch, 2048)

    def step():
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x, sigma, context, pooled), target).backward()
        opt.step()

    step.trained = sum(p.numel() for p in trained)
    return step


def mib(b):
    return "n/a" if b is None else f"{b / 2**20:.0f} MiB"


def report(r):
    print(f"\ndepth {r['depth']} (hidden {64 * r['depth']}), latent {r['latent']} ({r['image_tokens']} image + "
          f"{r['text_tokens']} text tokens), batch {r['batch']}, {r['precision']}; max |ours - diffusers| = "
          f"{r['max_abs_diff']:.2e}")
    print(f"  {'(medians)':10s} {'ours':>10s} {'diffusers':>10s} {'speedup':>8s}   "
          f"matmul peak fraction (ours / diffusers)")
    for kind in ("train", "forward"):
        t = r[f"{kind}_s"]
        mfu = r[f"{kind}_mfu"]
        print(f"  {kind + ' ms':10s} {t['ours'] * 1e3:10.1f} {t['diffusers'] * 1e3:10.1f} "
              f"{r[f'{kind}_speedup']:7.3f}x   {mfu['ours']:.1%} / {mfu['diffusers']:.1%}")
    m = r["peak_bytes"]
    ratio = f"{m['ours'] / m['diffusers']:.3f}x" if m["ours"] and m["diffusers"] else ""
    print(f"  {'step peak':10s} {mib(m['ours']):>10s} {mib(m['diffusers']):>10s} {ratio:>8s}   (memory above the "
          f"resident weights and optimiser state)")


def run(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precisions = args.precision or (["fp32", "bf16-autocast"] if device.type == "cpu" else ["bf16-autocast"])
    print(f"MM-DiT benchmark on {device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}: "
          f"mmdit.MMDiT vs diffusers.SD3Transformer2DModel, same config and weights, alternating; "
          f"{args.rounds} timed rounds; speedup = median over rounds of diffusers/ours; "
          f"train step = forward + MSE + backward + fused AdamW")
    peaks = {}
    for precision in precisions:
        dtype = torch.bfloat16 if precision == "bf16-autocast" else torch.float32
        peaks[precision] = matmul_peak(device, dtype)
        print(f"measured dense matmul peak, {dtype}: {peaks[precision] / 1e9:.1f} GFLOP/s")
    results = []
    for case in args.case or DEFAULT_CASES:
        depth, side, batch = parse_case(case)
        for precision in precisions:
            results.append(run_case(depth, side, batch, precision, device, args.rounds, peaks[precision]))
            report(results[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "torch": torch.__version__, "results": results}, f, indent=2)
    return results


def add_arguments(parser):
    parser.add_argument("--case", action="append", help="DEPTH:LATENT_SIDE:BATCH (repeatable); default "
                        + " and ".join(DEFAULT_CASES))
    parser.add_argument("--precision", action="append", choices=["fp32", "bf16-autocast"],
                        help="default: fp32 and bf16-autocast on CPU, bf16-autocast on GPU")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--rounds", type=int, default=7, help="timed calls of each side (default 7)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.set_defaults(run=run)
