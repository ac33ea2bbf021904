"""The toy world: its data generator, held-out set and prompt file, its detector, its pipeline's formats, the
recipe end to end through train.py, sample.py and the GenEval judge, and the bundled default model."""

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmdit.toy import world as toy
from mmdit.checkpoint import load_mmdit
from mmdit.eval.geneval import judge, keep_detections, read_metadata, summarize
from mmdit.toy.detector import ToyDetector

ROOT = Path(__file__).resolve().parents[1]


def load_entry_point(name):
    spec = importlib.util.spec_from_file_location(name.replace("/", "_")[:-3], ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dataset_is_deterministic_in_img2dataset_layout(tmp_path):
    a = toy.write_dataset(tmp_path / "a", 50, seed=3, per_shard=20)
    b = toy.write_dataset(tmp_path / "b", 50, seed=3, per_shard=20)
    c = toy.write_dataset(tmp_path / "c", 50, seed=4, per_shard=20)
    assert [p.name for p in a] == ["00000.tar", "00001.tar", "00002.tar"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert a[0].read_bytes() != c[0].read_bytes()
    import tarfile

    with tarfile.open(a[2]) as tar:
        names = tar.getnames()
    assert names[:3] == ["000000040.png", "000000040.txt", "000000040.json"] and len(names) == 30


def test_a_short_last_shard_is_written_again_in_full(tmp_path):
    """Asking an existing folder for more samples completes the shard that was the last of the smaller set (and
    rewrites a truncated one), so the folder holds what a fresh write of the larger set holds."""
    toy.write_dataset(tmp_path / "grown", 15, per_shard=10)
    (tmp_path / "grown" / "00000.tar").write_bytes(b"not a tar")       # a shard cut short by a crash
    grown = toy.write_dataset(tmp_path / "grown", 30, per_shard=10)
    fresh = toy.write_dataset(tmp_path / "fresh", 30, per_shard=10)
    assert [toy.shard_samples(p) for p in grown] == [10, 10, 10]
    assert [p.read_bytes() for p in grown] == [p.read_bytes() for p in fresh]


def test_images_of_an_earlier_world_are_refused(tmp_path):
    toy.write_dataset(tmp_path, 10, per_shard=10)
    assert json.loads((tmp_path / toy.STAMP).read_text()) == {"version": toy.VERSION}
    toy.write_dataset(tmp_path, 20, per_shard=10)   # this world's shards are kept and the folder grows
    (tmp_path / toy.STAMP).unlink()                 # as every world before stamps left its folder
    with pytest.raises(ValueError, match=f"has no toy_world.json .world 1 made it, before stamps.; this code makes "
                                         f"world {toy.VERSION}: remove {tmp_path} to make them anew"):
        toy.write_dataset(tmp_path, 30, per_shard=10)
    (tmp_path / toy.STAMP).write_text(json.dumps({"version": toy.VERSION + 1}))
    with pytest.raises(ValueError, match=f"was made by world {toy.VERSION + 1}; this code makes world {toy.VERSION}"):
        toy.write_dataset(tmp_path, 30, per_shard=10)
    (tmp_path / toy.STAMP).write_text("[2]")
    with pytest.raises(ValueError, match="toy_world.json is unreadable"):
        toy.write_dataset(tmp_path, 30, per_shard=10)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["00000.tar", "00001.tar"]   # nothing written


def test_detector_reads_back_every_training_image(tmp_path):
    """Captions match images, and the detector is right on every clean image (which also validates it)."""
    paths = toy.write_dataset(tmp_path, 400, seed=0, per_shard=200)
    detector = ToyDetector()
    tasks = Counter()
    for image, record in toy.read_dataset(paths):
        found = detector(Image.fromarray(image))
        got = Counter((shape, d.color) for shape, ds in found.items() for d in ds)
        assert got == Counter((o["shape"], o["color"]) for o in record["objects"]), record["caption"]
        meta = record["metadata"]
        correct, reasons = judge(meta, keep_detections(found, meta["tag"]))
        assert correct, (record["caption"], reasons)
        tasks[record["task"]] += 1
    assert set(tasks) == set(toy.TASK_WEIGHTS)


def test_detector_rejects_what_a_caption_does_not_show():
    red_circle = [toy.ToyObject("circle", "red", 20, 30, 6)]
    found = ToyDetector()(Image.fromarray(toy.render(red_circle)))
    for prompt, ok in [("a photo of a red circle", True), ("a photo of a blue circle", False),
                       ("a photo of a red square", False), ("a photo of two circles", False)]:
        meta = next(p for p in toy.evaluation_prompts() if p["prompt"] == prompt)
        assert judge(meta, keep_detections(found, meta["tag"]))[0] == ok, prompt
    # position: the circle is left of a square placed to its right, not above it
    scene = red_circle + [toy.ToyObject("square", "blue", 45, 31, 6)]
    found = ToyDetector()(Image.fromarray(toy.render(scene)))
    left = next(p for p in toy.evaluation_prompts() if p["prompt"] == "a photo of a circle left of a square")
    above = next(p for p in toy.evaluation_prompts() if p["prompt"] == "a photo of a circle above a square")
    assert judge(left, keep_detections(found, "position"))[0] and not judge(above, found)[0]
    assert ToyDetector()(Image.new("RGB", (64, 64), toy.BACKGROUND)) == {}


def test_held_out_combinations_never_reach_training():
    rng = np.random.default_rng(1)
    captions, named, unnamed, counts, numberless = set(), set(), set(), set(), set()
    for i in range(3000):
        task = list(toy.TASK_WEIGHTS)[i % 5]
        objects, caption, meta = toy.sample_scene(rng, task)
        captions.add(caption)
        (named if task in ("colors", "color_attr") else unnamed).update((o.color, o.shape) for o in objects)
        if meta["tag"] == "counting":
            counts.add((len(objects), objects[0].shape))
        if meta["tag"] == "numberless":
            assert caption == f"a photo of {objects[0].shape}s" and {o.shape for o in objects} == {objects[0].shape}
            numberless.add((len(objects), objects[0].shape))
        if task == "color_attr":   # never "a green square and a red circle": the words of a held-out pair split
            words = caption.split()
            assert not {(words[3], words[7]), (words[6], words[4])} & toy.HELD_OUT_COLORS, caption
    prompts = toy.evaluation_prompts()
    held = [p for p in prompts if p["held_out"]]
    assert not {p["prompt"] for p in held} & captions
    # a held-out colour-shape pair is drawn, but only in scenes whose captions name no colour
    assert not named & toy.HELD_OUT_COLORS and len(named) == 30 - len(toy.HELD_OUT_COLORS)
    assert toy.HELD_OUT_COLORS <= unnamed and len(unnamed) == 30
    assert not any(f"{c} {s}" in caption for c, s in toy.HELD_OUT_COLORS for caption in captions)
    # a held-out count is drawn, but only under a caption that names no number, as every count and shape is
    assert not counts & toy.HELD_OUT_COUNTS and len(counts) == 9 - len(toy.HELD_OUT_COUNTS)
    assert len(numberless) == 9
    # every seen prompt of the small tasks is a training caption
    small = [p for p in prompts if not p["held_out"] and p["tag"] != "color_attr"]
    assert {p["prompt"] for p in small} <= captions
    assert {p["tag"] for p in held} == {"single_object", "two_object", "counting", "colors", "position",
                                        "color_attr"}


def test_shipped_prompt_file_is_genevals_format_and_current(tmp_path):
    shipped = ROOT / "data" / "toy_geneval.jsonl"
    entries = read_metadata(shipped)
    assert entries == toy.evaluation_prompts()
    for e in entries:
        assert {c["class"] for c in e["include"]} <= set(toy.SHAPES)
        assert all(c.get("color", "red") in toy.COLORS for c in e["include"])
    counting = next(e for e in entries if e["prompt"] == "a photo of three squares")
    assert counting["include"] == [{"class": "square", "count": 3}]
    assert counting["exclude"] == [{"class": "square", "count": 4}]


@pytest.fixture(scope="module")
def toy_pipeline(tmp_path_factory):
    """A toy pipeline as data/make_toy.py builds it, with a VAE and towers trained for a few steps only."""
    from mmdit.toy.components import save_toy_pipeline

    rng = np.random.default_rng(0)
    scenes = [toy.sample_scene(rng, "colors") for _ in range(8)]
    images = np.stack([toy.render(objects) for objects, _, _ in scenes])
    return save_toy_pipeline(tmp_path_factory.mktemp("toy") / "pipeline", images, [m for _, _, m in scenes],
                             toy.caption_corpus(n=200), vae_steps=3, tower_steps=2)


def test_toy_pipeline_loads_as_any_diffusers_pipeline(toy_pipeline):
    from diffusers import StableDiffusion3Pipeline

    from mmdit.pipeline import SD3Pipeline, Settings

    ours = SD3Pipeline.load(toy_pipeline)
    assert ours.default_side == 64 and ours.shift == 1.0
    assert (ours.text.layout.clip_tokens, ours.text.layout.t5_tokens) == (13, 12)
    config = json.loads((toy_pipeline / "vae" / "config.json").read_text())
    assert config["latent_channels"] == 16 and config["scaling_factor"] != 1.0   # factors measured on the data
    prompt = "a photo of a purple triangle and a white circle"   # the longest caption shape: no truncation
    assert len(ours.text.t5.tokenizer(prompt)["input_ids"]) <= 12
    image = ours.generate([prompt], [0], Settings(steps=3, cfg=5.0, width=64, height=64))[0]
    ref = StableDiffusion3Pipeline.from_pretrained(toy_pipeline)
    theirs = ref(prompt, num_inference_steps=3, guidance_scale=5.0, width=64, height=64, output_type="np",
                 max_sequence_length=12, generator=torch.Generator().manual_seed(0)).images[0]
    assert np.abs(image / 255.0 - theirs).mean() < 0.5 / 255


def test_recipe_end_to_end_through_the_entry_points(tmp_path, capsys):
    """train.py prepares the toy world itself (mmdit.toy.prepare: the world, then precompute), trains and exports a
    pipeline; sample.py draws from it; the GenEval generator, toy judge and summary score it; the float16 bundle changes nothing."""
    train, sample = load_entry_point("train.py"), load_entry_point("sample.py")
    run = tmp_path / "run"
    world_args = json.dumps(["--out", str(tmp_path / "world"), "--train-samples", "64", "--val-samples", "16",
                             "--components", "bundled"])   # the shipped VAE and towers, as configs/toy.yaml
    assert train.main([f"data.shards={tmp_path / 'shards/train'}",
                       f"data.val_shards={tmp_path / 'shards/val'}", f"data.prepare_args={world_args}",
                       "train.steps=4", f"train.out_dir={run}", f"train.sample_model={tmp_path / 'world/pipeline'}",
                       "train.val_every=4", "train.log_every=2", "train.sample_steps=2", "data.shuffle_buffer=8",
                       "data.num_workers=0", "data.batch_size=8",
                       f"align.encoder={tmp_path / 'world/pipeline/align_encoder'}"]) == 0
    assert any("align_loss" in line for line in (run / "log.jsonl").read_text().splitlines())   # REPA is on
    manifest = json.loads((tmp_path / "shards" / "train" / "manifest.json").read_text())
    assert manifest["samples"] == 64 and manifest["identities"]["t5_tokens"] == 12
    # The recipe's shards of an earlier world, and its unfinished shards, are refused before any compute with one
    # line; shards that this world's prepare did not make (real data: another model in the manifest) are not judged.
    import shutil

    shutil.copytree(tmp_path / "shards" / "val", tmp_path / "mine")
    mine = json.loads((tmp_path / "mine" / "manifest.json").read_text())
    mine["identities"]["model"] = str(tmp_path / "elsewhere")
    (tmp_path / "mine" / "manifest.json").write_text(json.dumps(mine))
    (tmp_path / "mine" / toy.STAMP).unlink()
    (tmp_path / "shards" / "val" / toy.STAMP).unlink()
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "00000.tar").write_bytes(b"")
    capsys.readouterr()
    for val, refused in (("shards/val", "shards/val has no toy_world.json"), ("half", "half has no toy_world.json")):
        with pytest.raises(SystemExit) as e:
            train.main([f"data.shards={tmp_path / 'shards/train'}", f"data.val_shards={tmp_path / val}",
                        f"data.prepare_args={world_args}", f"train.out_dir={tmp_path / 'run2'}"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and refused in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "run2").exists()
    assert train.main([f"data.shards={tmp_path / 'shards/train'}", f"data.val_shards={tmp_path / 'mine'}",
                       f"data.prepare_args={world_args}", "train.steps=1", f"train.out_dir={tmp_path / 'run3'}",
                       f"train.sample_model={tmp_path / 'world/pipeline'}", "data.shuffle_buffer=8",
                       "data.batch_size=8", "data.num_workers=0", "align.weight=0"]) == 0
    assert json.loads((run / "run.json").read_text())["precision"] in ("bf16", "fp32")
    exported = run / "export" / "pipeline"
    ema = load_mmdit(run / "export" / "ema.safetensors").state_dict()   # the pipeline carries exactly the EMA
    assert all(torch.equal(ema[k], v) for k, v in load_mmdit(exported / "transformer").state_dict().items())
    sample.main(["--model", str(exported), "--prompt", "a photo of a red circle", "--steps", "2",
                 "--out", str(tmp_path / "a.png")])
    sample.main(["--model", str(exported), "--prompt", "a photo of a red circle", "--steps", "2", "--no-t5",
                 "--out", str(tmp_path / "b.png")])
    assert Image.open(tmp_path / "a.png").size == (64, 64) and Image.open(tmp_path / "b.png").size == (64, 64)
    from mmdit.sampling_cli import sampling_defaults
    from mmdit.toy import TOY_SAMPLING

    # the recipe's export samples with the toy guidance and skip-layer guidance by default
    assert sampling_defaults(str(exported)) == {**TOY_SAMPLING, "slg_scale": 2.8}

    from mmdit.eval.cli import main as geneval

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in toy.evaluation_prompts()[:4]))
    out = tmp_path / "geneval"
    geneval(["generate", "--metadata", str(prompts), "--outdir", str(out), "--model", str(exported),
             "--samples-per-prompt", "2", "--steps", "2"])
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["width"] == 64 and recorded["slg_layers"] == [2, 3]   # the export's recommended guidance
    geneval(["score", str(out), "--detector", "toy"])
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(results) == 8 and summarize(results)["images"] == 8
    geneval(["summary", str(out / "results.jsonl")])
    assert "overall" in capsys.readouterr().out

    make_toy = load_entry_point("data/make_toy.py")
    make_toy.main(["bundle", str(exported), "--to", str(tmp_path / "bundled")])
    sample.main(["--model", str(tmp_path / "bundled"), "--prompt", "a photo of a red circle", "--steps", "2",
                 "--out", str(tmp_path / "c.png")])
    a, c = (np.asarray(Image.open(tmp_path / f), dtype=float) for f in ("a.png", "c.png"))
    assert np.abs(a - c).mean() < 1.0   # float16 storage moves pixels by less than one level on average
    # the recipe's alignment targets are kept as trained: a new bundle does not move what the recipe aligns to
    aligned = "align_encoder/model.safetensors"
    assert (tmp_path / "bundled" / aligned).read_bytes() == (exported / aligned).read_bytes()


def test_the_bundled_model_is_the_default_and_small(tmp_path):
    from mmdit.cli import UsageError
    from mmdit.config import SAMPLING_DEFAULTS_FILE
    from mmdit.sampling_cli import BUNDLED_MODEL, SD3_CFG, sampling_defaults
    from mmdit.toy import TOY_CFG, TOY_SAMPLING

    size = sum(f.stat().st_size for f in BUNDLED_MODEL.rglob("*") if f.is_file())
    assert (BUNDLED_MODEL / "model_index.json").is_file() and size < 20 * 2**20
    sample = load_entry_point("sample.py")
    sample.main(["--prompt", "a photo of a red circle left of a blue square", "--out", str(tmp_path / "a.png")])
    sample.main(["--prompt", "a photo of a red circle left of a blue square", "--no-t5", "--slg-layers",
                 "--out", str(tmp_path / "b.png")])
    assert Image.open(tmp_path / "a.png").size == (64, 64) and Image.open(tmp_path / "b.png").size == (64, 64)
    # Guidance defaults to what a model folder recommends (the toy pipelines: their own scale and skip-layer
    # guidance), else SD3's; --slg-layers alone turns skip-layer guidance off.
    drawn = [json.loads(Image.open(tmp_path / f).text["parameters"]) for f in ("a.png", "b.png")]
    assert drawn[0]["cfg"] == TOY_CFG == 2.0 and drawn[0]["slg_layers"] == [2, 3] and drawn[1]["slg_layers"] == []
    assert json.loads((BUNDLED_MODEL / SAMPLING_DEFAULTS_FILE).read_text()) == TOY_SAMPLING

    def default_cfg(model, **otherwise):
        return sampling_defaults(model, **otherwise)["cfg"]

    assert default_cfg(None) == default_cfg(str(BUNDLED_MODEL) + "/") == 2.0
    assert default_cfg(tmp_path) == default_cfg("stabilityai/stable-diffusion-3.5-medium") == SD3_CFG == 7.0
    assert default_cfg(tmp_path, cfg_otherwise=5.0) == 5.0   # train.py's sample grid: its own fallback
    (tmp_path / SAMPLING_DEFAULTS_FILE).write_text("{}")
    assert default_cfg(tmp_path, cfg_otherwise=5.0) == 5.0 and default_cfg(tmp_path) == SD3_CFG
    (tmp_path / SAMPLING_DEFAULTS_FILE).write_text('{"cfg": 3}')
    assert default_cfg(tmp_path) == 3.0
    assert sampling_defaults(tmp_path) == {"cfg": 3.0, "slg_layers": [], "slg_scale": 2.8}
    (tmp_path / SAMPLING_DEFAULTS_FILE).write_text('{"cfg": 3, "slg_layers": [1, 2], "slg_scale": 2}')
    assert sampling_defaults(tmp_path) == {"cfg": 3.0, "slg_layers": [1, 2], "slg_scale": 2.0}
    assert sampling_defaults(tmp_path, depth=2)["slg_layers"] == [1]   # a shallower model: the blocks it has
    for text, problem in (("[2]", "not a JSON object"), ('{"cfg": "high"}', "cfg must be a number"),
                          ('{"cfg": 1e400}', "must be a number"), ("{", "not a JSON object"),
                          ('{"cfg": ' + "9" * 400 + "}", "must be a number"), ('{"cfgg": 2}', "unknown key 'cfgg'"),
                          ('{"slg_scale": NaN}', "slg_scale must be a number"),
                          ('{"slg_layers": 2}', "slg_layers must be a list of block indices"),
                          ('{"slg_layers": [-1]}', "slg_layers must be a list of block indices"),
                          ('{"slg_layers": [true]}', "slg_layers must be a list of block indices")):
        (tmp_path / SAMPLING_DEFAULTS_FILE).write_text(text)
        with pytest.raises(UsageError, match=problem):
            sampling_defaults(tmp_path)


def test_the_bundled_model_as_a_stability_single_file_draws_the_same(tmp_path):
    """The toy pipeline exported as one all-in-one file (its VAE has 16 norm groups, which the weights do not show:
    the file's metadata does) loads through the single-file loaders and draws what the directory draws."""
    from mmdit.loading import export_single_file
    from mmdit.toy import BUNDLED_MODEL

    single = tmp_path / "toy_incl_clips_t5.safetensors"
    export_single_file(BUNDLED_MODEL, single)
    sample = load_entry_point("sample.py")
    common = ["--prompt", "a photo of a red circle", "--steps", "4", "--seed", "3", "--dtype", "fp32", "--cfg", "2",
              "--slg-layers", "2", "3"]   # the single file carries no sampling defaults: both sample alike
    sample.main([*common, "--out", str(tmp_path / "dir.png")])
    sample.main([*common, "--model", str(single), "--t5-tokenizer", str(BUNDLED_MODEL / "tokenizer_3"),
                 "--out", str(tmp_path / "file.png")])
    a, b = (np.asarray(Image.open(tmp_path / f), dtype=float) for f in ("dir.png", "file.png"))
    assert np.abs(a - b).mean() < 0.5


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    make_toy = load_entry_point("data/make_toy.py")
    with pytest.raises(SystemExit) as e:
        make_toy.main(["bundle", str(tmp_path), "--to", str(tmp_path / "out")])
    assert e.value.code == 2 and "is not a diffusers pipeline directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        make_toy.main(["bundle", str(tmp_path), "--to", str(tmp_path / "out")])
    assert e.value.code == 2 and "has no mmdit_sampling.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "mmdit_sampling.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        make_toy.main(["bundle", str(tmp_path), "--to", str(tmp_path / "out")])
    assert e.value.code == 2 and "has no align_encoder/" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as e:
        make_toy.main(["world", "--out", str(tmp_path / "world"), "--vae-images", "0"])
    assert e.value.code == 2 and "--vae-images must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "world").exists()
    train = load_entry_point("train.py")
    with pytest.raises(SystemExit) as e:
        train.main(["data.prepare=imagenet", f"train.out_dir={tmp_path / 'run'}"])
    assert e.value.code == 2 and "data.prepare 'imagenet': accepted: a module of mmdit" in capsys.readouterr().err


def test_an_export_recommends_only_the_skip_layer_blocks_its_model_has(tmp_path, capsys):
    """A recipe exported with a shallower MM-DiT than its components recommend skip-layer guidance for keeps the
    blocks it has, so sample.py's defaults fit it; a deep enough one gets the components' defaults unchanged."""
    train = load_entry_point("train.py")
    base, transformer = tmp_path / "base", tmp_path / "transformer"
    (base / "vae").mkdir(parents=True)
    transformer.mkdir()
    (transformer / "config.json").write_text("{}")
    recommended = {"cfg": 2.0, "slg_layers": [2, 3]}
    (base / "mmdit_sampling.json").write_text(json.dumps(recommended))
    train.export_pipeline(transformer, base, tmp_path / "deep", depth=6)
    assert json.loads((tmp_path / "deep" / "mmdit_sampling.json").read_text()) == recommended
    train.export_pipeline(transformer, base, tmp_path / "shallow", depth=3)
    assert json.loads((tmp_path / "shallow" / "mmdit_sampling.json").read_text()) == {"cfg": 2.0, "slg_layers": [2]}
    assert "recommends [2]" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "shallow").iterdir()) == ["mmdit_sampling.json", "transformer", "vae"]
    assert json.loads((base / "mmdit_sampling.json").read_text()) == recommended   # the components stay as they are


def test_captions_are_their_metadata_and_near_misses_stay_seen():
    """caption_of inverts how scenes are captioned; a near miss changes the picture and is never held out."""
    rng = np.random.default_rng(0)
    for i in range(500):
        _, caption, meta = toy.sample_scene(rng, list(toy.TASK_WEIGHTS)[i % 5])
        assert toy.caption_of(meta) == caption and not toy.is_held_out(meta)
        miss = toy.near_miss(meta, rng)
        if miss is not None:
            assert toy.caption_of(miss) != caption and not toy.is_held_out(miss)
    for prompt in toy.evaluation_prompts():
        assert toy.caption_of(prompt) == prompt["prompt"] and toy.is_held_out(prompt) == prompt["held_out"]


def test_every_toy_prompt_fits_the_bundled_tokenizers(caplog):
    """No prompt of the toy GenEval file or the README is truncated by the bundled model's tokenizers."""
    import logging

    from mmdit.loading import load_conditioning
    from mmdit.toy import BUNDLED_MODEL

    text, _ = load_conditioning(BUNDLED_MODEL)
    prompts = [p["prompt"] for p in toy.evaluation_prompts()]
    readme = (ROOT / "README.md").read_text()
    prompts += [p for p in set(re.findall(r'--prompt "([^"]+)"', readme)) if "photo of a" in p and "cat" not in p]
    with caplog.at_level(logging.WARNING, logger="mmdit.text"):
        text.encode(prompts)
    assert len(prompts) > 96 and not [r for r in caplog.records if "dropped" in r.getMessage()]


def test_make_toy_world_trains_components_once_and_recipes_copy_them(tmp_path, capsys):
    """`data/make_toy.py world` trains the VAE, the towers and the alignment encoder (a few steps here) into a
    pipeline the real loaders read; with --components it copies given ones instead, and refuses training flags
    beside it."""
    from mmdit.align import load_encoder
    from mmdit.loading import load_conditioning

    make_toy = load_entry_point("data/make_toy.py")
    make_toy.main(["world", "--out", str(tmp_path / "w"), "--train-samples", "16", "--val-samples", "4",
                   "--vae-steps", "2", "--vae-images", "8", "--decoder-steps", "2", "--tower-steps", "2",
                   "--align-steps", "2"])
    text, vae = load_conditioning(tmp_path / "w" / "pipeline")
    assert (text.layout.clip_tokens, text.layout.t5_tokens, vae.latent_channels) == (13, 12, 16)
    encoder = load_encoder(tmp_path / "w" / "pipeline" / "align_encoder")
    assert encoder(torch.zeros(1, 16, 8, 8)).shape == (1, encoder.config["dim"], 8, 8)
    # `align` trains a built pipeline's encoder again (here on the world's own images), replacing it whole
    before = (tmp_path / "w" / "pipeline" / "align_encoder" / "model.safetensors").read_bytes()
    make_toy.main(["align", str(tmp_path / "w" / "pipeline"), "--images", str(tmp_path / "w" / "images" / "train"),
                   "--steps", "2", "--seed", "5"])
    assert (tmp_path / "w" / "pipeline" / "align_encoder" / "model.safetensors").read_bytes() != before
    assert not list((tmp_path / "w").glob(".*")) and not list((tmp_path / "w" / "pipeline").glob(".*"))
    for bad, says in ((["align", str(tmp_path), "--images", str(tmp_path)], "is not a toy pipeline directory"),
                      (["align", str(tmp_path / "w" / "pipeline"), "--images", str(tmp_path)], "no pictures in .tar"),
                      (["align", str(tmp_path / "w" / "pipeline"), "--images", str(tmp_path), "--steps", "0"],
                       "--steps must be >= 1")):
        with pytest.raises(SystemExit) as e:
            make_toy.main(bad)
        assert e.value.code == 2 and says in capsys.readouterr().err
    make_toy.main(["world", "--out", str(tmp_path / "copy"), "--train-samples", "16", "--val-samples", "4",
                   "--components", str(tmp_path / "w" / "pipeline")])
    copied = tmp_path / "copy" / "pipeline" / "text_encoder_3" / "model.safetensors"
    assert copied.read_bytes() == (tmp_path / "w" / "pipeline" / "text_encoder_3" / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit) as e:
        make_toy.main(["world", "--out", str(tmp_path / "x"), "--components", "bundled", "--vae-steps", "5"])
    assert e.value.code == 2 and "--vae-steps train components" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # a world folder whose validation images an earlier world wrote: one line, and the training images (a shard of
    # them missing) are not written either: both splits are checked before either grows
    (tmp_path / "copy" / "images" / "val" / toy.STAMP).unlink()
    (tmp_path / "copy" / "images" / "train" / "00000.tar").rename(tmp_path / "copy" / "images" / "train" / "x.tar")
    with pytest.raises(SystemExit) as e:
        make_toy.main(["world", "--out", str(tmp_path / "copy"), "--train-samples", "16", "--val-samples", "4",
                       "--components", str(tmp_path / "w" / "pipeline")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "images/val has no toy_world.json (world 1 made it" in err
    assert not (tmp_path / "copy" / "images" / "train" / "00000.tar").exists()


def test_toy_geneval_images_are_kept_only_for_the_same_weights_and_components(toy_pipeline, tmp_path):
    """A rerun of the toy GenEval keeps earlier images only when they were made with the same MM-DiT and the same
    components: a pipeline whose VAE was mended draws other pictures from the same MM-DiT."""
    import shutil

    from mmdit.toy.evaluate import made_with

    components = tmp_path / "components"
    shutil.copytree(toy_pipeline, components)
    weights = components / "transformer" / "diffusion_pytorch_model.safetensors"
    first = made_with(weights, components, no_t5=False)
    assert made_with(weights, components, no_t5=False) == first
    assert set(first["components"]) == {"vae", "text_encoder", "text_encoder_2", "text_encoder_3"}
    assert set(made_with(weights, components, no_t5=True)["components"]) == {"vae", "text_encoder", "text_encoder_2"}
    vae = components / "vae" / "diffusion_pytorch_model.safetensors"
    vae.write_bytes(vae.read_bytes()[:-1] + bytes([vae.read_bytes()[-1] ^ 1]))
    assert made_with(weights, components, no_t5=False)["components"]["vae"] != first["components"]["vae"]
    assert made_with(weights, components, no_t5=False)["weights_sha256"] == first["weights_sha256"]


def test_the_bundle_recipe_is_the_toy_recipe_on_more_images_for_longer():
    """configs/toy-bundle.yaml (the bundled model) differs from configs/toy.yaml (`python3 train.py`) only in its
    length, its EMA's half-life, where it writes and its lack of a time budget (it runs for hours, resumed): the
    data, the model, the optimiser and the flow are the recipe's."""
    from mmdit.config import config_to_dict, load_config

    recipe = config_to_dict(load_config(ROOT / "configs" / "toy.yaml"))
    bundle = config_to_dict(load_config(ROOT / "configs" / "toy-bundle.yaml"))
    differ = {(section, key) for section in recipe for key in recipe[section]
              if recipe[section][key] != bundle[section][key]}
    assert differ == {("optim", "cooldown_steps"), ("train", "steps"), ("train", "out_dir"), ("train", "val_every"),
                      ("train", "checkpoint_every"), ("train", "keep_checkpoints"), ("train", "ema_decay"),
                      ("train", "time_budget_s")}
    assert bundle["train"]["ema_decay"] > recipe["train"]["ema_decay"]   # the EMA's half-life grows with the run
    assert bundle["train"]["steps"] > 4 * recipe["train"]["steps"]
