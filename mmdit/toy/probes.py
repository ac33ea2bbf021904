"""Linear probes: what a set of text towers tells the MM-DiT about a toy prompt, measured before any MM-DiT trains.

Each probe is a logistic regression from one view of the towers' outputs to one attribute of the prompt, trained on
70% of the prompts of its kind and scored on the other 30% (a fixed split):

    colour    "a photo of a {colour} {shape}"                      -> the colour
    shape     the same prompts                                      -> the shape
    count     "a photo of {n} {shape}s"                            -> n
    relation  "a photo of a {shape} {relation} a {shape}"          -> the relation
    layout    the same prompts                                      -> the axis and which shape is at its top or left
                                                                       (what the picture must show; word order)
    binding   "a photo of a {c1} {s1} and a {c2} {s2}" with a square -> the square's colour (a bag of words that
              knows both colours but not which shape carries which gets about half of them)

The held-out probes train on the prompts whose combination training shows and test on those it holds out
(world.HELD_OUT_*: colour-shape pairs, counts, relation phrasings; for binding, a held-out pair beside a square whose
own pair is seen): whether the towers code a combination they never saw as they code those they did.

Views: `pooled`, the vector adaLN reads (CLIP-L and CLIP-G pooled); `tokens`, the context the joint attention
reads, as a set (SD3 gives context tokens no positions): each tower's mean token state. The control is what the
literature finds works (random per-word vectors plus sinusoidal positions in the T5 slot, both views their mean).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from mmdit.toy import world

PROBES = ("colour", "shape", "count", "relation", "layout", "binding")
HELD_OUT_PROBES = ("colour", "count", "layout", "binding")   # trained on seen combinations, tested on held-out


def _families() -> dict[str, list[tuple[str, int, bool | None]]]:
    """{probe: [(prompt, label, held out)]}: held out True for a combination world.HELD_OUT_* never trains, None
    where that leaves the label itself unseen (a held-out probe can neither train nor test on those)."""
    C, S, R = world.COLORS, world.SHAPES, world.RELATIONS
    pairs = [(f"a photo of a {c} {s}", c, s, (c, s) in world.HELD_OUT_COLORS) for c, s in itertools.product(C, S)]
    binding = []
    for (a, b), c1, c2 in itertools.product(itertools.permutations(S, 2), C, C):
        if "square" in (a, b) and c1 != c2:
            square, other = ((c1, a), (c2, b)) if a == "square" else ((c2, b), (c1, a))
            held = None if square in world.HELD_OUT_COLORS else other in world.HELD_OUT_COLORS
            binding.append((f"a photo of a {c1} {a} and a {c2} {b}", C.index(square[0]), held))
    relation, layout = [], []
    for (a, b), r in itertools.product(itertools.permutations(S, 2), R):
        prompt, held = f"a photo of a {a} {r} a {b}", (a, r, b) in world.HELD_OUT_POSITIONS
        relation.append((prompt, R.index(r), held))
        # the picture it asks for: the axis and the shape at its top or left end ("a triangle above a circle" and
        # "a circle below a triangle" are one layout); a bag of words cannot tell which shape that is
        first = a if r in ("left of", "above") else b
        layout.append((prompt, 3 * (r in ("above", "below")) + S.index(first), held))
    return {"colour": [(p, C.index(c), held) for p, c, _, held in pairs],
            "shape": [(p, S.index(s), held) for p, _, s, held in pairs],
            "count": [(f"a photo of {world.NUMBERS[n]} {s}s", n - 2, (n, s) in world.HELD_OUT_COUNTS)
                      for n, s in itertools.product(world.NUMBERS, S)],
            "relation": relation, "layout": layout, "binding": binding}


def probe_prompts() -> dict[str, tuple[list[str], list[int]]]:
    """{probe: (prompts, labels)}."""
    return {probe: ([p for p, _, _ in rows], [y for _, y, _ in rows]) for probe, rows in _families().items()}


def held_out_split(probe: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices into probe_prompts()[probe]: the prompts training shows, and those it holds out.
    A held-out probe asks whether the towers put a combination they never saw in the code of those they did:
    where they do, an MM-DiT that fails the combination fails it itself."""
    held = [h for _, _, h in _families()[probe]]
    return (np.array([i for i, h in enumerate(held) if h is False]),
            np.array([i for i, h in enumerate(held) if h is True]))


def tower_features(text, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The two views of a mmdit.text.TextEncoders' outputs for the prompts."""
    with torch.no_grad():
        out = text.encode(prompts)
        pooled = torch.cat([out["clip_l"][1], out["clip_g"][1]], dim=-1)
        tokens = [out["clip_l"][0].mean(1), out["clip_g"][0].mean(1)]
        if out["t5"] is not None:
            tokens.append(out["t5"].mean(1))
    return {"pooled": pooled.float(), "tokens": torch.cat(tokens, dim=-1).float()}


def control_features(prompts: list[str], width: int = 256, length: int = 12, seed: int = 0) -> dict:
    """Random per-word vectors plus sinusoidal positions (the control), and their mean as the pooled view."""
    vocabulary = sorted({w for p in prompts for w in p.split()})
    g = torch.Generator().manual_seed(seed)
    words = dict(zip(vocabulary, torch.randn(len(vocabulary), width, generator=g)))
    position = torch.arange(length)[:, None] / torch.pow(10000, torch.arange(0, width, 2) / width)[None]
    table = torch.cat([position.sin(), position.cos()], dim=-1)
    states = torch.zeros(len(prompts), length, width)
    for i, p in enumerate(prompts):
        for j, w in enumerate(p.split()[:length]):
            states[i, j] = words[w] + table[j]
    return {"pooled": states.mean(1), "tokens": states.mean(1)}


def probe_accuracy(features: torch.Tensor, labels: list[int], seed: int = 0, steps: int = 300,
                   split: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """Test accuracy of a logistic regression (standardised features, weight decay) on a fixed 70/30 split, or on
    split = (train, test) indices."""
    n = len(labels)
    order = np.random.default_rng(seed).permutation(n)
    train, test = split if split is not None else (order[: math.ceil(0.7 * n)], order[math.ceil(0.7 * n):])
    y = torch.tensor(labels)
    x = features.double()
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = ((x - mean) / std).float()
    classes = int(y.max()) + 1
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05, weight_decay=1e-3)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(x[train] @ weight + bias, y[train])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float(((x[test] @ weight + bias).argmax(1) == y[test]).float().mean())


def probe_table(sources: dict) -> dict[str, dict[str, dict[str, float]]]:
    """{source name: {view: {probe: accuracy}}} for sources {name: TextEncoders or "control"}."""
    prompts = probe_prompts()
    table = {}
    for name, text in sources.items():
        table[name] = {"pooled": {}, "tokens": {}}
        for probe, (texts, labels) in prompts.items():
            features = control_features(texts) if text == "control" else tower_features(text, texts)
            for view in ("pooled", "tokens"):
                table[name][view][probe] = probe_accuracy(features[view], labels)
                if probe in HELD_OUT_PROBES:
                    table[name][view][f"held-out {probe}"] = probe_accuracy(features[view], labels,
                                                                            split=held_out_split(probe))
    return table


def format_table(table: dict) -> str:
    columns = list(PROBES) + [f"held-out {p}" for p in HELD_OUT_PROBES]
    lines = ["| towers | view | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for name, views in table.items():
        for view, scores in views.items():
            lines.append(f"| {name} | {view} | " + " | ".join(f"{scores[p]:.2f}" for p in columns) + " |")
    return "\n".join(lines)


def random_towers(like, seed: int = 0):
    """The toy towers' architecture and tokenizers with fresh random weights (mmdit.testing's initialisation):
    what the towers were before training."""
    from mmdit.testing import tiny_components
    from mmdit.text import CLIP_EOS, ClipEncoder, T5Encoder, encoders_with_layout
    from mmdit.toy.components import TOY_CLIP_WIDTHS

    c = tiny_components(seed, corpus=world.caption_corpus(n=200), clip_tokens=like.layout.clip_tokens,
                        t5_tokens=like.layout.t5_tokens, clip_widths=TOY_CLIP_WIDTHS)
    return encoders_with_layout(ClipEncoder(c["text_encoder"], like.clip_l.tokenizer, CLIP_EOS, False, "CLIP_L"),
                                ClipEncoder(c["text_encoder_2"], like.clip_g.tokenizer, 0, True, "CLIP_G"),
                                T5Encoder(c["text_encoder_3"], like.t5.tokenizer), t5_tokens=like.layout.t5_tokens,
                                clip_tokens=like.layout.clip_tokens)


def main(argv=None):
    """python3 -m mmdit.toy.probes [PIPELINE]: the probe table of a toy pipeline's towers (default: the bundled
    model's), beside the same towers at random weights and the control."""
    import sys

    from mmdit.cli import Parser, fail, one_line, quiet_libraries
    from mmdit.loading import load_conditioning
    from mmdit.toy import BUNDLED_MODEL

    p = Parser(prog="python3 -m mmdit.toy.probes", description=main.__doc__)
    p.add_argument("pipeline", nargs="?", default=str(BUNDLED_MODEL), help="a toy pipeline directory")
    args = p.parse_args(argv)
    quiet_libraries()
    try:
        shipped, _ = load_conditioning(args.pipeline)
    except (ValueError, OSError) as e:
        fail(p.prog, one_line(e))
    print(format_table(probe_table({"trained": shipped, "random": random_towers(shipped),
                                    "control": "control"})), file=sys.stdout)


if __name__ == "__main__":
    main()
