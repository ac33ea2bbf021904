"""The toy world's measuring tools: the text probes (what the towers tell, on seen and held-out prompts) and the
evaluation's tables (per-attribute scores, the learning curve, what each held-out prompt drew)."""

import json
import re

import pytest
import torch
from PIL import Image


def test_probes_see_more_in_the_shipped_towers_than_in_random_ones():
    """Linear probes (mmdit.toy.probes) on the bundled towers against the same architecture at random weights:
    the shipped ones must tell which shape carries which colour (binding) clearly better."""
    from mmdit.loading import load_conditioning
    from mmdit.toy import BUNDLED_MODEL, probes

    shipped, _ = load_conditioning(BUNDLED_MODEL)
    prompts, labels = probes.probe_prompts()["binding"]
    scores = {name: probes.probe_accuracy(probes.tower_features(text, prompts)["pooled"], labels)
              for name, text in (("shipped", shipped), ("random", probes.random_towers(shipped)))}
    assert scores["shipped"] >= scores["random"] + 0.2, scores


def test_learning_curve_scores_attributes_per_split_and_plots(tmp_path):
    """mmdit.toy.evaluate: per-attribute image accuracy for seen and held-out prompts, a table and a PNG curve."""
    from mmdit.toy.evaluate import attribute_scores, curve_table, plot_curve

    def result(tag, held_out, correct):
        return {"tag": tag, "correct": correct, "metadata": json.dumps({"tag": tag, "held_out": held_out})}

    results = [result("colors", False, True), result("colors", False, False), result("color_attr", False, True),
               result("single_object", True, True), result("counting", True, False)]
    scores = attribute_scores(results)
    assert scores["seen"]["colour"] == 0.5 and scores["seen"]["binding"] == 1.0 and scores["seen"]["shape"] is None
    assert scores["held_out"]["shape"] == 1.0 and scores["held_out"]["count"] == 0.0
    assert scores["seen"]["overall"] == 0.75 and scores["held_out"]["overall"] == 0.5   # GenEval's task mean
    rows = [{"step": s, "samples": 32 * s, **scores} for s in (100, 200)]
    assert "| 200 | 6400 | held_out | 0.500 |" in curve_table(rows)
    plot_curve(rows, tmp_path / "curve.png")
    assert Image.open(tmp_path / "curve.png").size == (640, 400)


def test_held_out_probes_test_on_exactly_the_held_out_combinations():
    """The held-out probes train on the prompts training shows and test on those world.HELD_OUT_* holds out (for
    binding, only those whose square is a seen pair: a held-out square colour is never a training label)."""
    from mmdit.toy import probes
    from mmdit.toy.world import (
        HELD_OUT_COLORS,
        HELD_OUT_COUNTS,
        HELD_OUT_POSITIONS,
    )

    prompts = probes.probe_prompts()
    for probe, held in (("colour", {f"a photo of a {c} {s}" for c, s in HELD_OUT_COLORS}),
                        ("layout", {f"a photo of a {a} {r} a {b}" for a, r, b in HELD_OUT_POSITIONS}),
                        ("count", {f"a photo of {['two', 'three', 'four'][n - 2]} {s}s" for n, s in HELD_OUT_COUNTS})):
        train, test = probes.held_out_split(probe)
        assert {prompts[probe][0][i] for i in test} == held
        assert len(train) + len(test) == len(prompts[probe][0]) and not set(train) & set(test)
    train, test = probes.held_out_split("binding")
    texts = prompts["binding"][0]
    pairs = [[(w[4], w[5]), (w[8], w[9])] for w in (texts[i].split() for i in range(len(texts)))]
    assert len(test) == 56 and all(
        any(p in HELD_OUT_COLORS for p in pairs[i]) and not any(p in HELD_OUT_COLORS and p[1] == "square"
                                                                for p in pairs[i]) for i in test)
    assert not any(p in HELD_OUT_COLORS for i in train for p in pairs[i])


def test_layout_labels_say_what_the_picture_shows():
    """One label per picture: mirrored phrasings of one layout share it, another axis or another shape at the
    top or left end does not."""
    from mmdit.toy import probes

    layout = dict(zip(*probes.probe_prompts()["layout"]))
    same = [("a triangle above a circle", "a circle below a triangle"),
            ("a circle left of a square", "a square right of a circle")]
    other = [("a triangle above a circle", "a circle above a triangle"),
             ("a triangle above a circle", "a triangle left of a circle"),
             ("a circle left of a square", "a circle right of a square")]
    for a, b in same:
        assert layout[f"a photo of {a}"] == layout[f"a photo of {b}"], (a, b)
    for a, b in other:
        assert layout[f"a photo of {a}"] != layout[f"a photo of {b}"], (a, b)


def test_a_held_out_probe_scores_the_held_out_prompts():
    """probe_accuracy with a split tests on that split's prompts: features right for every seen pair and wrong for
    every held-out one score 0 there, and well above 0 on a random 70/30 split."""
    from mmdit.toy import probes
    from mmdit.toy.world import COLORS, HELD_OUT_COLORS

    texts, labels = probes.probe_prompts()["colour"]
    colour = [COLORS.index(t.split()[4]) for t in texts]
    wrong = [(c + 1) % len(COLORS) if (t.split()[4], t.split()[5]) in HELD_OUT_COLORS else c
             for t, c in zip(texts, colour)]
    features = torch.eye(len(COLORS))[wrong]
    assert probes.probe_accuracy(features, labels, split=probes.held_out_split("colour")) == 0.0
    assert probes.probe_accuracy(features, labels) > 0.5
    assert probes.probe_accuracy(torch.eye(len(COLORS))[colour], labels, split=probes.held_out_split("colour")) == 1.0


@pytest.mark.parametrize("relation, circle_x, circle_y", [("left of", (5, 40, 50), 5), ("right of", (50, 5, 8), 5),
                                                           ("above", 20, (5, 40, 50)), ("below", 20, (50, 5, 8))])
def test_drawn_table_reads_what_each_held_out_prompt_drew(tmp_path, relation, circle_x, circle_y):
    """What was drawn: the detector's readings of each held-out prompt's images, most common first, and a position
    prompt's layouts as asked or the other way round (GenEval's relation test); seen prompts are left out."""
    from mmdit.toy.detector import ToyDetector
    from mmdit.toy.evaluate import drawn_table, readings
    from mmdit.toy.world import ToyObject, render

    def picture(name, *objects):
        Image.fromarray(render(list(objects))).save(tmp_path / name)
        return str(tmp_path / name)

    swapped = picture("a.png", ToyObject("circle", "brown", 16, 16, 10), ToyObject("triangle", "green", 46, 46, 10))
    right = picture("b.png", ToyObject("triangle", "brown", 16, 16, 10), ToyObject("circle", "green", 46, 46, 10))
    empty = picture("c.png")
    assert readings(Image.open(swapped), ToyDetector()) == "brown circle + green triangle"
    assert readings(Image.open(empty), ToyDetector()) == "nothing"
    meta = json.dumps({"held_out": True})
    prompt = "a photo of a brown triangle and a green circle"
    results = [{"prompt": prompt, "filename": f, "correct": f == right, "metadata": meta}
               for f in (swapped, swapped, right)]
    results.append({"prompt": "a photo of a red square", "filename": empty, "correct": False,
                    "metadata": json.dumps({"held_out": False})})
    where = {"tag": "position", "held_out": True,
             "include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": [relation, 0]}]}
    xs = circle_x if isinstance(circle_x, tuple) else (circle_x,) * 3
    ys = circle_y if isinstance(circle_y, tuple) else (circle_y,) * 3
    for x, y in zip(xs, ys):   # the square at (20-30, 20-30): one circle as asked, two the other way round
        results.append({"prompt": f"a photo of a circle {relation} a square", "filename": empty, "correct": False,
                        "metadata": json.dumps(where),
                        "details": json.dumps({"circle": [[x, y, x + 10, y + 10, 1.0]], "square": [[20, 20, 30, 30, 1.0]]})})
    table = drawn_table(results, ToyDetector())
    assert f"| {prompt} | 1/3 | brown circle + green triangle (2); brown triangle + green circle (1) |" in table
    assert f"| a photo of a circle {relation} a square | 0/3 | nothing (3); layout as asked 1, reversed 2 |" in table
    assert "red square" not in table


def fake_run(tmp_path):
    """A run folder as train.py leaves it, enough for mmdit.toy.evaluate to find its export and components."""
    run, components = tmp_path / "run", tmp_path / "components"
    (run / "export").mkdir(parents=True)
    (run / "export" / "ema.safetensors").write_bytes(b"")
    components.mkdir()
    (components / "model_index.json").write_text("{}")
    (run / "config.json").write_text(json.dumps({"train": {"sample_model": str(components), "steps": 10},
                                                 "data": {"batch_size": 4}, "optim": {"grad_accum": 1}}))
    return run


def test_evaluate_scores_at_another_guidance_into_its_own_files(tmp_path, monkeypatch, capsys):
    """--cfg samples at that guidance and writes beside, not over, the default's images and curve."""
    from mmdit.toy import evaluate

    run, calls = fake_run(tmp_path), []

    def fake_score(weights, components, outdir, samples_per_prompt, no_t5, cfg=None, steps=28, device="cpu",
                   shift=None, slg_layers=None):
        calls.append((outdir.name, cfg, shift) if slg_layers is None else (outdir.name, cfg, shift, slg_layers))
        outdir.mkdir(parents=True)
        (outdir / "results.jsonl").write_text("")
        return evaluate.attribute_scores([])

    monkeypatch.setattr(evaluate, "score_weights", fake_score)
    evaluate.main([str(run), "--only-export", "--cfg", "3"])
    evaluate.main([str(run), "--only-export", "--no-t5", "--cfg", str(evaluate.TOY_CFG)])
    assert calls == [("t5_cfg3_step_00000010", 3.0, None), ("no_t5_step_00000010", evaluate.TOY_CFG, None)]
    assert (run / "eval" / "curve_t5_cfg3.md").is_file() and (run / "eval" / "drawn_t5_cfg3.md").is_file()
    assert not (run / "eval" / "curve_t5.md").exists()
    assert json.loads((run / "eval" / "curve_t5_cfg3.json").read_text())[0]["cfg"] == 3.0
    evaluate.main([str(run), "--only-export", "--shift", "3"])   # a sampling shift: its own files too
    assert calls[-1] == ("t5_shift3_step_00000010", evaluate.TOY_CFG, 3.0)
    assert (run / "eval" / "curve_t5_shift3.md").is_file() and not (run / "eval" / "curve_t5.md").exists()
    evaluate.main([str(run), "--only-export", "--slg-layers", "2", "3"])   # skip-layer guidance the components lack
    assert calls[-1] == ("t5_slg2-3_step_00000010", evaluate.TOY_CFG, None, [2, 3])
    assert (run / "eval" / "curve_t5_slg2-3.md").is_file() and not (run / "eval" / "curve_t5.md").exists()
    # components that recommend blocks 2 and 3 (as the toy ones do): those are the default files; none is its own
    (tmp_path / "components" / "mmdit_sampling.json").write_text('{"cfg": 2.0, "slg_layers": [2, 3]}')
    evaluate.main([str(run), "--only-export", "--slg-layers", "2", "3"])
    evaluate.main([str(run), "--only-export", "--slg-layers"])
    assert calls[-2:] == [("t5_step_00000010", 2.0, None, [2, 3]), ("t5_noslg_step_00000010", 2.0, None, [])]
    assert (run / "eval" / "curve_t5_noslg.md").is_file()
    (tmp_path / "components" / "mmdit_sampling.json").write_text('{"slg_layers": [-2]}')
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(run), "--only-export"])
    assert e.value.code == 2 and "slg_layers must be a list of block indices" in capsys.readouterr().err


RECOMMENDED = '{"cfg": 2.5, "slg_layers": [2], "slg_scale": 2.0}'


@pytest.mark.parametrize("recommended, cfg, shift, layers, expected", [
    (None, None, None, None, (2.0, 1.0, (), 2.8)),                 # no sampling file: the toy guidance, no SLG
    (RECOMMENDED, None, None, None, (2.5, 1.0, (2,), 2.0)),        # the components' own
    (RECOMMENDED, 3.5, 3.0, [], (3.5, 3.0, (), 2.0)),              # flags win; an empty list turns SLG off
    ('{"slg_layers": [4, 6]}', None, None, None, (2.0, 1.0, (4,), 2.8)),   # recommended blocks it lacks: left out
    (RECOMMENDED, None, None, [6], "blocks [6] lie outside the MM-DiT's blocks 0..5")])
def test_score_weights_samples_with_the_settings_asked(tmp_path, monkeypatch, recommended, cfg, shift, layers,
                                                       expected):
    """The guidance, shift and skip-layer blocks given reach the sampler's settings; those not given are the
    components' own (their mmdit_sampling.json, else the toy guidance) and their scheduler's shift."""
    import types

    import mmdit.checkpoint
    import mmdit.eval.geneval
    import mmdit.pipeline
    from mmdit.toy import evaluate

    class SixBlocks(torch.nn.Identity):
        config = types.SimpleNamespace(depth=6)

    used = []
    pipe = types.SimpleNamespace(shift=1.0, default_side=64)
    pipe.check_skip_layers = types.MethodType(mmdit.pipeline.SD3Pipeline.check_skip_layers, pipe)   # the real check
    devices = []
    monkeypatch.setattr(mmdit.pipeline.SD3Pipeline, "load",
                        classmethod(lambda cls, path, no_t5=False, device="cpu": devices.append(device) or pipe))
    monkeypatch.setattr(mmdit.checkpoint, "load_mmdit",
                        lambda weights, dtype=None: devices.append(dtype) or SixBlocks())
    monkeypatch.setattr(evaluate, "made_with", lambda *args: {})
    monkeypatch.setattr(mmdit.eval.geneval, "generate",
                        lambda prompts, outdir, p, settings, **kw: used.append(settings))

    def fake_score(outdir, detector, results):
        results.write_text("")
        return results

    monkeypatch.setattr(mmdit.eval.geneval, "score", fake_score)
    (tmp_path / "out").mkdir()
    if recommended:
        (tmp_path / "mmdit_sampling.json").write_text(recommended)
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=re.escape(expected)):
            evaluate.score_weights(tmp_path / "w.safetensors", tmp_path, tmp_path / "out", 1, False,
                                   slg_layers=layers)
        assert used == []
        return
    scores = evaluate.score_weights(tmp_path / "w.safetensors", tmp_path, tmp_path / "out", 1, False, cfg=cfg,
                                    device="meta", shift=shift, slg_layers=layers)
    assert [(s.cfg, s.shift, s.slg_layers, s.slg_scale) for s in used] == [expected] and evaluate.TOY_CFG == 2.0
    assert (scores["shift"], tuple(scores["slg_layers"])) == expected[1:3]
    assert devices == ["meta", torch.float32]   # the pipeline on the device asked for; the MM-DiT read as fp32


@pytest.mark.parametrize("flags, message", [(["--cfg", "nan"], "--cfg must be a finite number in [0, 100]"),
                                            (["--cfg", "-1"], "--cfg must be a finite number in [0, 100]"),
                                            (["--cfg", "101"], "--cfg must be a finite number in [0, 100]"),
                                            (["--cfg", "inf"], "--cfg must be a finite number in [0, 100]"),
                                            (["--shift", "0"], "--shift must be a finite number in (0, 100]"),
                                            (["--shift", "nan"], "--shift must be a finite number in (0, 100]"),
                                            (["--shift", "101"], "--shift must be a finite number in (0, 100]"),
                                            (["--slg-layers", "-1"], "--slg-layers must be block indices >= 0"),
                                            (["--device", "tpu"], "unknown --device 'tpu'; accepted: cpu, cuda"),
                                            (["--device", "cuda"], "--device cuda asked for, but no CUDA device")])
def test_evaluate_refuses_a_guidance_or_device_it_cannot_use(tmp_path, capsys, monkeypatch, flags, message):
    from mmdit.toy import evaluate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    run = fake_run(tmp_path)
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(run), "--only-export", *flags])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1
    assert not (run / "eval").exists()


def test_evaluate_scores_a_pipeline_into_the_folder_given(tmp_path, monkeypatch, capsys):
    """A pipeline directory (the bundled model's layout) is scored with its own MM-DiT and components into --out,
    never inside it; without --out, or with a folder that is neither a run nor a pipeline, one line and exit 2."""
    from mmdit.toy import evaluate

    pipeline, calls = tmp_path / "pipeline", []
    (pipeline / "transformer").mkdir(parents=True)
    (pipeline / "model_index.json").write_text("{}")

    def fake_score(weights, components, outdir, samples_per_prompt, no_t5, cfg=None, steps=28, device="cpu",
                   shift=None, slg_layers=None):
        calls.append((weights, components, outdir, device))
        outdir.mkdir(parents=True)
        (outdir / "results.jsonl").write_text("")
        return evaluate.attribute_scores([])

    monkeypatch.setattr(evaluate, "score_weights", fake_score)
    for argv, message in (([str(pipeline)], "is a pipeline: give --out DIR"),
                          ([str(tmp_path)], "is neither a training run (config.json) nor a pipeline")):
        with pytest.raises(SystemExit) as e:
            evaluate.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and len(err.splitlines()) == 1
    assert calls == []
    evaluate.main([str(pipeline), "--out", str(tmp_path / "scores"), "--device", "cpu"])
    assert calls == [(pipeline / "transformer", pipeline, tmp_path / "scores" / "t5_step_00000000", "cpu")]
    assert (tmp_path / "scores" / "curve_t5.md").is_file() and (tmp_path / "scores" / "drawn_t5.md").is_file()
    assert sorted(p.name for p in pipeline.iterdir()) == ["model_index.json", "transformer"]
