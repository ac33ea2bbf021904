"""The toy world: coloured shapes on a grey background, captioned like GenEval's prompts.

Three shapes (circle, square, triangle: GenEval's "classes") in GenEval's ten colours, drawn anti-aliased on a
plain grey background at 64x64 (an 8x8 latent; the toy MM-DiT's patch 1 makes it 64 image tokens). Scenes come
in GenEval's six tasks: single object, two objects, counting (two to four), colours, position (left of, right of,
above, below) and colour attribution. The world is small enough that an SD3-architecture pipeline trains on it on a CPU in minutes, and plain
image analysis can judge it (mmdit.toy.detector), so it gives a quality signal on any machine.

Held out of training, so generalisation can be measured (HELD_OUT_*), each one attribute away from what is trained:
six colour-shape pairs are never named in a caption (a purple triangle is drawn only in scenes whose captions name
no colour: two objects, counting, position; the picture is known, the words "purple triangle" are not), nor are
their words split over a colour-attribution caption's two objects ("a purple square and a red triangle" would teach
that purple never goes on the triangle); three count-shape combinations are never named (two squares are drawn
only under the numberless "a photo of squares"); four position phrasings and two two-object orderings never appear
as captions (the same layouts do, phrased the other way round); and a lone shape is always captioned with its
colour, so the bare "a photo of a circle" is never a training caption.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SIDE = 64
BACKGROUND = (128, 128, 128)
PALETTE = {"red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 220, 30), "green": (40, 170, 60),
           "blue": (40, 80, 220), "purple": (140, 50, 190), "pink": (250, 150, 200), "brown": (130, 75, 25),
           "black": (15, 15, 15), "white": (245, 245, 245)}
COLORS = tuple(PALETTE)          # GenEval's ten, in its order
SHAPES = ("circle", "square", "triangle")
NUMBERS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
# Half-extent of a shape in pixels at 64x64: 18 to 24 px across, about three latent cells, and four still fit (with
# a gap of 5 px, so that blurred edges do not join two shapes into one). Corners must span more than one latent
# cell for the 8x-down VAE to keep them; smaller squares and triangles come back rounded (README: the toy world).
RADIUS = (9.0, 12.0)

# Named only, never drawn under their names: a world that never drew them at all taught the MM-DiT each shape's
# colours as a closed list, and held-out colour prompts fell the longer it trained (README: the toy world).
HELD_OUT_COLORS = {("red", "triangle"), ("blue", "circle"), ("yellow", "square"), ("purple", "triangle"),
                   ("green", "circle"), ("white", "square")}
HELD_OUT_COUNTS = {(3, "triangle"), (4, "circle"), (2, "square")}
HELD_OUT_POSITIONS = {("circle", "left of", "square"), ("triangle", "above", "circle"),
                      ("square", "below", "triangle"), ("triangle", "right of", "square")}
HELD_OUT_PAIRS = {("triangle", "circle"), ("square", "triangle")}   # "a photo of a triangle and a circle"
TASK_WEIGHTS = {"colors": 0.2, "two_object": 0.15, "counting": 0.25, "position": 0.15, "color_attr": 0.25}
# The chance that a counting scene is captioned without its number ("a photo of squares"), every count and shape
# alike, so that a held-out count can be drawn without the numberless caption coming to mean "a held-out count".
# Numbered scenes of a held-out count are drawn again, so about a third of the counting scenes kept are numberless.
NUMBERLESS = 0.25
# Raised whenever one seed draws other pictures or captions than before, so that images and shards of an earlier
# world are refused rather than trained on (2: held-out colour-shape pairs drawn, unnamed, in colour-free scenes;
# 3: their words never split over a colour-attribution caption, held-out counts drawn under numberless captions).
VERSION = 3
STAMP = "toy_world.json"   # {"version": VERSION} in every folder of the world's images and shards


@dataclass
class ToyObject:
    shape: str
    color: str
    cx: float
    cy: float
    r: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r)


def render(objects: list[ToyObject], side: int = SIDE, supersample: int = 4) -> np.ndarray:
    """(side, side, 3) uint8: each shape filled in its colour, drawn at supersample x and box-filtered down."""
    from PIL import Image, ImageDraw

    s = supersample
    image = Image.new("RGB", (side * s, side * s), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in objects:
        x1, y1, x2, y2 = (v * s for v in o.box)
        if o.shape == "circle":
            draw.ellipse((x1, y1, x2, y2), fill=PALETTE[o.color])
        elif o.shape == "square":
            draw.rectangle((x1, y1, x2, y2), fill=PALETTE[o.color])
        else:   # an upright triangle filling its box
            draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=PALETTE[o.color])
    return np.asarray(image.resize((side, side), Image.BOX))


# ---- scenes and their captions ----------------------------------------------------------------------------------

def nameable_colors(shape: str) -> list[str]:
    """The colours a training caption may name on shape: all but its held-out pairs (drawn only unnamed)."""
    return [c for c in COLORS if (c, shape) not in HELD_OUT_COLORS]


def splits_held_out_pair(pairs) -> bool:
    """Whether a colour attribution's two (colour, shape) pairs give a held-out pair's colour to one object and its
    shape to the other: such captions taught world 2's model to swap the colours of prompts naming held-out pairs."""
    (ca, a), (cb, b) = pairs
    return (ca, b) in HELD_OUT_COLORS or (cb, a) in HELD_OUT_COLORS


def _place(rng, objects, shape, color, side, near=None, relation=None, tries=200):
    """A new object that overlaps nothing (a gap of side / 12); with near/relation, placed clearly in that
    relation."""
    margin, gap = side / 40, side / 12
    for _ in range(tries):
        r = float(rng.uniform(*RADIUS)) * side / 64
        if near is None:
            cx, cy = rng.uniform(r + margin, side - r - margin, size=2)
        else:
            axis = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}[relation]
            dist = rng.uniform(near.r + r + 2 * gap, side * 0.6)
            off = rng.uniform(-0.35, 0.35) * dist   # within about 20 degrees of the axis
            cx = near.cx + axis[0] * dist + (off if axis[0] == 0 else 0)
            cy = near.cy + axis[1] * dist + (off if axis[1] == 0 else 0)
            if not (r + margin <= cx <= side - r - margin and r + margin <= cy <= side - r - margin):
                continue
        if all(max(abs(cx - o.cx), abs(cy - o.cy)) >= r + o.r + gap for o in objects):
            return ToyObject(shape, color, float(cx), float(cy), r)
    return None


def sample_scene(rng: np.random.Generator, task: str, side: int = SIDE):
    """(objects, caption, GenEval metadata) for one training scene of a task, avoiding every held-out item: a
    held-out colour-shape pair is drawn only where the caption names no colour."""
    named = task in ("colors", "color_attr")   # the tasks whose captions name colours
    while True:
        objects, shapes = [], list(rng.permutation(SHAPES))
        a, b = shapes[0], shapes[1]
        ca, cb = (rng.choice(nameable_colors(s) if named else COLORS) for s in (a, b))
        if task == "colors":
            caption, meta = f"a photo of a {ca} {a}", prompt_metadata("colors", [(a, 1, ca)])
            specs = [(a, ca, None, None)]
        elif task == "two_object":
            if (a, b) in HELD_OUT_PAIRS:
                continue
            caption, meta = f"a photo of a {a} and a {b}", prompt_metadata("two_object", [(a, 1, None), (b, 1, None)])
            specs = [(a, ca, None, None), (b, cb, None, None)]
        elif task == "counting":
            n = int(rng.integers(2, 5))
            if rng.random() < NUMBERLESS:
                caption, meta = f"a photo of {a}s", prompt_metadata("numberless", [(a, n, None)])
            elif (n, a) in HELD_OUT_COUNTS:
                continue
            else:
                caption, meta = f"a photo of {NUMBERS[n]} {a}s", prompt_metadata("counting", [(a, n, None)])
            specs = [(a, rng.choice(COLORS), None, None) for _ in range(n)]
        elif task == "position":
            relation = RELATIONS[int(rng.integers(4))]
            if (a, relation, b) in HELD_OUT_POSITIONS:
                continue
            caption = f"a photo of a {a} {relation} a {b}"
            meta = prompt_metadata("position", [(b, 1, None), (a, 1, None)], relation=relation)
            specs = [(b, cb, None, None), (a, ca, 0, relation)]
        elif task == "color_attr":
            if splits_held_out_pair([(ca, a), (cb, b)]):
                continue
            caption = f"a photo of a {ca} {a} and a {cb} {b}"
            meta = prompt_metadata("color_attr", [(a, 1, ca), (b, 1, cb)])
            specs = [(a, ca, None, None), (b, cb, None, None)]
        else:
            raise ValueError(f"unknown toy task {task!r}; known: {', '.join(TASK_WEIGHTS)}")
        for shape, color, near, relation in specs:
            placed = _place(rng, objects, shape, str(color), side, objects[near] if near is not None else None,
                            relation)
            if placed is None:
                break
            objects.append(placed)
        else:
            return objects, caption, meta


def prompt_metadata(tag: str, clauses: list[tuple], relation: str | None = None, held_out: bool | None = None):
    """GenEval's metadata for a prompt: clauses are (shape, count, colour or None); with a relation the second
    clause is positioned relative to the first. Counting prompts exclude count + 1 ("exactly n"). The tag
    "numberless" (not a GenEval task) is a counting scene whose caption names no number."""
    include = []
    for i, (shape, count, color) in enumerate(clauses):
        clause = {"class": shape, "count": count}
        if color is not None:
            clause["color"] = str(color)
        if relation is not None and i == 1:
            clause["position"] = [relation, 0]
        include.append(clause)
    meta = {"tag": tag, "include": include}
    if tag == "counting":
        meta["exclude"] = [{"class": clauses[0][0], "count": clauses[0][1] + 1}]
    if held_out is not None:
        meta["held_out"] = held_out
    return meta


def caption_of(meta: dict) -> str:
    """The caption (GenEval's phrasing) of a prompt's metadata: the inverse of how scenes are captioned."""
    tag, clauses = meta["tag"], meta["include"]
    if tag == "single_object":
        return f"a photo of a {clauses[0]['class']}"
    if tag == "colors":
        return f"a photo of a {clauses[0]['color']} {clauses[0]['class']}"
    if tag == "two_object":
        return f"a photo of a {clauses[0]['class']} and a {clauses[1]['class']}"
    if tag == "counting":
        return f"a photo of {NUMBERS[clauses[0]['count']]} {clauses[0]['class']}s"
    if tag == "numberless":
        return f"a photo of {clauses[0]['class']}s"
    if tag == "position":
        return f"a photo of a {clauses[1]['class']} {clauses[1]['position'][0]} a {clauses[0]['class']}"
    if tag == "color_attr":
        (a, b) = clauses
        return f"a photo of a {a['color']} {a['class']} and a {b['color']} {b['class']}"
    raise ValueError(f"unknown toy task {tag!r}; known: single_object, numberless, {', '.join(TASK_WEIGHTS)}")


def is_held_out(meta: dict) -> bool:
    """Whether a prompt's combination or phrasing is held out of training (HELD_OUT_*): never a training caption."""
    tag, clauses = meta["tag"], meta["include"]
    if tag == "single_object":
        return True
    if tag == "numberless":
        return False
    if tag == "two_object":
        return (clauses[0]["class"], clauses[1]["class"]) in HELD_OUT_PAIRS
    if tag == "counting":
        return (clauses[0]["count"], clauses[0]["class"]) in HELD_OUT_COUNTS
    if tag == "position":
        return (clauses[1]["class"], clauses[1]["position"][0], clauses[0]["class"]) in HELD_OUT_POSITIONS
    pairs = [(c.get("color"), c["class"]) for c in clauses]
    return any(p in HELD_OUT_COLORS for p in pairs) or (tag == "color_attr" and splits_held_out_pair(pairs))


def near_miss(meta: dict, rng: np.random.Generator, tries: int = 20) -> dict | None:
    """The metadata of a prompt one attribute away from meta that shows a different picture (another colour,
    count or shape; the two colours swapped; the relation's objects swapped), never a held-out one; None when
    none was found."""
    tag = meta["tag"]
    for _ in range(tries):
        clauses = [dict(c) for c in meta["include"]]
        if tag == "colors":
            clauses[0]["color"] = str(rng.choice([c for c in COLORS if c != clauses[0]["color"]]))
        elif tag == "counting":
            clauses[0]["count"] = int(rng.choice([n for n in NUMBERS if n != clauses[0]["count"]]))
        elif tag == "numberless":
            clauses[0]["class"] = str(rng.choice([s for s in SHAPES if s != clauses[0]["class"]]))
        elif tag == "two_object":
            k = int(rng.integers(2))
            clauses[k]["class"] = next(s for s in SHAPES if s not in (clauses[0]["class"], clauses[1]["class"]))
        elif tag == "position":
            if rng.random() < 0.5:
                clauses[0]["class"], clauses[1]["class"] = clauses[1]["class"], clauses[0]["class"]
            else:
                clauses[1]["position"] = [str(rng.choice([r for r in RELATIONS if r != clauses[1]["position"][0]])), 0]
        elif tag == "color_attr":
            if clauses[0]["color"] == clauses[1]["color"] or rng.random() < 0.3:
                k = int(rng.integers(2))
                clauses[k]["color"] = str(rng.choice([c for c in COLORS if c != clauses[k]["color"]]))
            else:
                clauses[0]["color"], clauses[1]["color"] = clauses[1]["color"], clauses[0]["color"]
        else:
            return None
        candidate = {**meta, "include": clauses}
        if tag == "counting":
            candidate["exclude"] = [{"class": clauses[0]["class"], "count": clauses[0]["count"] + 1}]
        if not is_held_out(candidate):
            return candidate
    return None


def evaluation_prompts() -> list[dict]:
    """The toy GenEval prompt file: every combination of the small tasks, a fixed sample of colour attribution,
    each marked held_out when its combination or phrasing never appears in training."""
    out = []

    def add(prompt, meta):
        out.append({**meta, "prompt": prompt})

    for s in SHAPES:
        add(f"a photo of a {s}", prompt_metadata("single_object", [(s, 1, None)], held_out=True))
    for a, b in itertools.permutations(SHAPES, 2):
        add(f"a photo of a {a} and a {b}",
            prompt_metadata("two_object", [(a, 1, None), (b, 1, None)], held_out=(a, b) in HELD_OUT_PAIRS))
    for n, s in itertools.product(NUMBERS, SHAPES):
        add(f"a photo of {NUMBERS[n]} {s}s",
            prompt_metadata("counting", [(s, n, None)], held_out=(n, s) in HELD_OUT_COUNTS))
    for c, s in itertools.product(COLORS, SHAPES):
        add(f"a photo of a {c} {s}", prompt_metadata("colors", [(s, 1, c)], held_out=(c, s) in HELD_OUT_COLORS))
    for a, b in itertools.permutations(SHAPES, 2):
        for rel in RELATIONS:
            add(f"a photo of a {a} {rel} a {b}", prompt_metadata("position", [(b, 1, None), (a, 1, None)],
                                                                   relation=rel,
                                                                   held_out=(a, rel, b) in HELD_OUT_POSITIONS))
    rng = np.random.default_rng(0)
    combos = [(ca, a, cb, b) for a, b in itertools.permutations(SHAPES, 2) for ca in COLORS for cb in COLORS]
    held = [x for x in combos if (x[0], x[1]) in HELD_OUT_COLORS or (x[2], x[3]) in HELD_OUT_COLORS]
    rest = [x for x in combos if x not in held]
    chosen_held = [held[i] for i in rng.choice(len(held), 12, replace=False)]
    # World 2's sample, kept where it is still a training caption: a held-out pair split over the two objects has
    # not been one since world 3 (and names no held-out pair, so it is in neither set); later draws replace those.
    draws = [rest[i] for i in rng.choice(len(rest), 12, replace=False)] + [rest[i] for i in rng.permutation(len(rest))]
    chosen_seen = [x for x in dict.fromkeys(draws) if not splits_held_out_pair([x[:2], x[2:]])][:12]
    for group, flag in ((chosen_held, True), (chosen_seen, False)):
        for ca, a, cb, b in group:
            add(f"a photo of a {ca} {a} and a {cb} {b}",
                prompt_metadata("color_attr", [(a, 1, ca), (b, 1, cb)], held_out=flag))
    return out


def caption_corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """Training captions and every evaluation prompt: the text a toy T5 tokenizer is trained on."""
    rng = np.random.default_rng(seed)
    tasks, weights = list(TASK_WEIGHTS), np.array(list(TASK_WEIGHTS.values()))
    captions = [sample_scene(rng, tasks[rng.choice(len(tasks), p=weights / weights.sum())])[1] for _ in range(n)]
    return captions + [p["prompt"] for p in evaluation_prompts()]


# ---- the dataset, in img2dataset's webdataset layout -------------------------------------------------------------

def stamp(folder) -> None:
    """Mark folder as made by this version of the world."""
    path = Path(folder) / STAMP
    tmp = path.with_name(f".{STAMP}.tmp")
    tmp.write_text(json.dumps({"version": VERSION}) + "\n")
    os.replace(tmp, path)


def stamp_problem(folder) -> str | None:
    """Why folder's stamp does not say that this version of the world made it; None when it does."""
    path = Path(folder) / STAMP
    if not path.is_file():
        return f"{folder} has no {STAMP} (world 1 made it, before stamps)"
    try:
        found = json.loads(path.read_text())["version"]
    except (ValueError, KeyError, TypeError):
        return f"{path} is unreadable"
    return None if found == VERSION else f"{folder} was made by world {found}"


def check_stamps(folders, remove: str) -> None:
    """ValueError naming every folder of folders that this version of the world did not make, and what to remove."""
    problems = [p for p in map(stamp_problem, folders) if p]
    if problems:
        raise ValueError(f"{'; '.join(problems)}; this code makes world {VERSION}: remove {remove} to make them "
                         f"anew (a newer world needs the code that made it)")


def write_dataset(out, num_samples: int, seed: int = 0, per_shard: int = 1000, progress=None) -> list[Path]:
    """out/NNNNN.tar of KEY.png, KEY.txt (the caption) and KEY.json (caption, task, objects), as img2dataset
    writes; shard k depends only on (seed, k), and tar headers carry no time or owner, so the bytes are
    reproducible. Each shard is written under a temporary name and renamed; existing shards are kept when the
    folder's stamp says this version of the world wrote them (another version's folder is refused: ValueError) and
    they hold the samples asked of them; one that does not (the short last shard of a smaller set, or one cut short)
    is written again in full."""
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")):
        check_stamps([out], str(out))
    else:
        stamp(out)
    tasks, weights = list(TASK_WEIGHTS), np.array(list(TASK_WEIGHTS.values()))
    paths = []
    for k, start in enumerate(range(0, num_samples, per_shard)):
        path = out / f"{k:05d}.tar"
        paths.append(path)
        count = min(per_shard, num_samples - start)
        if path.is_file() and shard_samples(path) == count:
            if progress:
                progress(count)
            continue
        rng = np.random.default_rng([seed, k])
        tmp = path.with_name(f".{path.name}.tmp")
        with tarfile.open(tmp, "w") as tar:
            for i in range(start, start + count):
                task = tasks[rng.choice(len(tasks), p=weights / weights.sum())]
                objects, caption, meta = sample_scene(rng, task)
                png = io.BytesIO()
                Image.fromarray(render(objects)).save(png, format="PNG")
                record = {"caption": caption, "task": task, "metadata": meta,
                          "objects": [asdict(o) for o in objects], "width": SIDE, "height": SIDE}
                for ext, data in (("png", png.getvalue()), ("txt", caption.encode()),
                                  ("json", json.dumps(record).encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size, info.mode = len(data), 0o644
                    tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, path)
        if progress:
            progress(count)
    return paths


def shard_samples(path: Path) -> int | None:
    """How many samples (png, txt and json) a shard of the world's images holds; None if it cannot be read."""
    try:
        with tarfile.open(path) as tar:
            names = tar.getnames()
    except (tarfile.TarError, OSError):
        return None
    return len(names) // 3 if len(names) % 3 == 0 else None


def read_dataset(paths):
    """(image uint8 array, record) for every sample of the toy tars, in order."""
    from PIL import Image

    for path in paths:
        with tarfile.open(path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".png")):
                key = name[:-4]
                image = np.asarray(Image.open(io.BytesIO(tar.extractfile(members[name]).read())).convert("RGB"))
                yield image, json.loads(tar.extractfile(members[key + ".json"]).read())
