"""GenEval's judge on hand-built detections, the evaluator's folder rules, the summary's arithmetic, metadata."""

import json

import pytest

from mmdit.eval.geneval import (Detection, judge, keep_detections, read_layout, read_metadata, relative_position,
                                summarize)


def det(x, y, size=10, score=0.95, color=None):
    """A size x size box centred at (x, y)."""
    return Detection((x - size / 2, y - size / 2, x + size / 2, y + size / 2), score, color)


def test_single_object_and_missing_object():
    meta = {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    assert judge(meta, {"cat": [det(50, 50)]}) == (True, [])
    correct, reasons = judge(meta, {"dog": [det(50, 50)]})
    assert not correct and reasons == ["expected cat>=1, found 0"]


def test_counting_exact_with_exclude_and_its_threshold():
    meta = {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}]}
    two = [det(20, 20), det(60, 60)]
    assert judge(meta, keep_detections({"clock": two}, "counting"))[0]
    assert not judge(meta, keep_detections({"clock": two + [det(90, 90)]}, "counting"))[0]   # three: excluded
    # 0.9 for counting prompts: a 0.5 detection does not count there, but does elsewhere.
    weak = [det(20, 20), det(60, 60, score=0.5)]
    assert not judge(meta, keep_detections({"clock": weak}, "counting"))[0]
    assert len(keep_detections({"clock": weak}, "two_object")["clock"]) == 2
    assert keep_detections({"clock": [det(1, 1, score=0.3)]}, "single_object") == {}        # strictly above 0.3


def test_at_most_16_per_class_most_confident_first():
    found = [det(i, i, score=0.4 + i / 100) for i in range(20)]
    kept = keep_detections({"apple": found}, "single_object")["apple"]
    assert len(kept) == 16 and kept[0].score == max(d.score for d in found)


def test_colour_goes_to_the_top_objects():
    meta = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "purple"},
                                             {"class": "apple", "count": 1, "color": "black"}]}
    right = {"car": [det(20, 20, color="purple")], "apple": [det(70, 70, color="black")]}
    swapped = {"car": [det(20, 20, color="black")], "apple": [det(70, 70, color="purple")]}
    assert judge(meta, right)[0] and not judge(meta, swapped)[0]
    # Only the most confident `count` objects are checked: a purple car further down does not help.
    ranked = {"car": [det(20, 20, 10, 0.99, "red"), det(50, 50, 10, 0.8, "purple")], "apple": right["apple"]}
    assert not judge(meta, ranked)[0]
    # A classifier can be plugged in instead of the detections' own colours.
    assert judge(meta, swapped, lambda cls, objs: ["purple" if cls == "car" else "black"] * len(objs))[0]


@pytest.mark.parametrize("relation,dx,dy", [("left of", -40, 0), ("right of", 40, 0), ("above", 0, -40),
                                            ("below", 0, 40)])
def test_each_position_relation(relation, dx, dy):
    meta = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                           {"class": "cat", "count": 1, "position": [relation, 0]}]}
    assert judge(meta, {"dog": [det(50, 50)], "cat": [det(50 + dx, 50 + dy)]})[0]
    assert not judge(meta, {"dog": [det(50, 50)], "cat": [det(50 - dx, 50 - dy)]})[0]


def test_position_dead_zone_and_diagonals():
    a = det(50, 50, size=20)                              # dead zone 0.1 * (20 + 20) = 4 px
    assert relative_position(det(53, 50, size=20), a) == set()                 # inside it
    assert relative_position(det(57, 50, size=20), a) == set()                 # (7 - 4) / 7 = 0.43: not past 0.5
    assert relative_position(det(60, 50, size=20), a) == {"right of"}          # (10 - 4) / 10 = 0.6
    # Diagonal at 45 degrees: each normalised component is 0.707 minus the dead zone's share.
    assert relative_position(det(100, 100, size=2), det(0, 0, size=2)) == {"right of", "below"}
    # A target clause that failed leaves nothing to be positioned against.
    meta = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                           {"class": "cat", "count": 1, "position": ["left of", 0]}]}
    correct, reasons = judge(meta, {"cat": [det(10, 50)]})
    assert not correct and "no target for cat to be left of" in reasons


def test_layout_rules(tmp_path):
    for i, name in enumerate(["00000", "00001", "notes"]):
        (tmp_path / name / "samples").mkdir(parents=True)
        (tmp_path / name / "metadata.jsonl").write_text(json.dumps({"tag": "single_object", "prompt": f"p{i}"}))
        for f in ("0000.png", "0001.png", "grid.png", "x.jpg"):
            (tmp_path / name / "samples" / f).write_bytes(b"")
    tasks = read_layout(tmp_path)
    assert [(p.parent.parent.name, p.name) for p, _ in tasks] == [("00000", "0000.png"), ("00000", "0001.png"),
                                                                  ("00001", "0000.png"), ("00001", "0001.png")]
    assert tasks[2][1]["prompt"] == "p1"


def test_summary_arithmetic():
    rows = [("single_object", "a", True), ("single_object", "a", False), ("single_object", "b", True),
            ("single_object", "b", True), ("counting", "c", False), ("counting", "c", False),
            ("position", "d", True), ("position", "d", False)]
    results = [{"tag": t, "metadata": json.dumps({"prompt": p}), "correct": c} for t, p, c in rows]
    s = summarize(results)
    assert s["tasks"] == {"single_object": 0.75, "counting": 0.0, "position": 0.5}
    assert s["overall"] == pytest.approx((0.75 + 0.0 + 0.5) / 3)      # unweighted over tasks, not images
    assert s["correct_images"] == 4 / 8 and s["correct_prompts"] == 3 / 4 and s["prompts"] == 4


def test_shipped_metadata_reads_and_bad_lines_are_named(tmp_path):
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[2] / "shared" / "geneval" / "evaluation_metadata.jsonl"
    if shipped.is_file():   # beside the checkout in this project's CI
        entries = read_metadata(shipped)
        assert len(entries) == 553 and {e["tag"] for e in entries} == {
            "single_object", "two_object", "counting", "colors", "position", "color_attr"}
    (tmp_path / "bad.jsonl").write_text('{"tag": "x", "prompt": "a", "include": []}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_metadata(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"tag": "x", "include": []}\n')
    with pytest.raises(ValueError, match='line 1 has no "prompt"'):
        read_metadata(tmp_path / "bad.jsonl")


# ---- generation in the evaluator's layout (tiny pipeline) ------------------------------------------------------

PROMPTS = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
           {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
            "prompt": "a photo of two clocks"},
           {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}],
            "prompt": "a photo of a red car"}]


@pytest.fixture(scope="module")
def pipe(tiny_pipeline):
    from mmdit.pipeline import SD3Pipeline

    return SD3Pipeline.load(tiny_pipeline, t5_tokens=20)


def run_generate(pipe, tmp_path, outdir, **kw):
    from mmdit.eval.geneval import generate
    from mmdit.pipeline import Settings

    meta = tmp_path / "meta.jsonl"
    meta.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    settings = Settings(steps=2, cfg=3.0, width=32, height=32)
    return generate(meta, outdir, pipe, settings, samples_per_prompt=2, seed=42, batch_size=3, **kw)


def pngs(outdir):
    return {str(p.relative_to(outdir)): p.read_bytes() for p in sorted(outdir.glob("*/samples/*.png"))}


def test_generate_layout_resume_determinism_and_ranks(pipe, tmp_path):
    assert run_generate(pipe, tmp_path, tmp_path / "a") == 6
    tasks = read_layout(tmp_path / "a")
    assert len(tasks) == 6 and [t[1]["prompt"] for t in tasks[::2]] == [p["prompt"] for p in PROMPTS]
    assert json.loads((tmp_path / "a" / "00001" / "metadata.jsonl").read_text()) == PROMPTS[1]
    first = pngs(tmp_path / "a")
    # resume: a half-finished run completes without remaking finished images
    (tmp_path / "a" / "00002" / "samples" / "0001.png").unlink()
    assert run_generate(pipe, tmp_path, tmp_path / "a") == 1 and pngs(tmp_path / "a") == first
    # determinism, and two processes make the same set as one
    run_generate(pipe, tmp_path, tmp_path / "b")
    assert pngs(tmp_path / "b") == first
    made = [run_generate(pipe, tmp_path, tmp_path / "c", rank=r, world_size=2) for r in (0, 1)]
    assert made == [4, 2] and pngs(tmp_path / "c") == first
    # an optional grid per prompt, which the evaluator's reader ignores
    run_generate(pipe, tmp_path, tmp_path / "a", grid=True)
    from PIL import Image

    assert Image.open(tmp_path / "a" / "00001" / "grid.png").size == (64, 32) and len(read_layout(tmp_path / "a")) == 6


def test_generate_refuses_another_runs_folder(pipe, tmp_path):
    from mmdit.eval.geneval import generate
    from mmdit.pipeline import Settings

    run_generate(pipe, tmp_path, tmp_path / "a")
    meta = tmp_path / "meta.jsonl"
    with pytest.raises(ValueError, match="holds another run .*--overwrite"):
        generate(meta, tmp_path / "a", pipe, Settings(steps=3, cfg=3.0, width=32, height=32), samples_per_prompt=2,
                 seed=42)
    before = (tmp_path / "a" / "00000" / "samples" / "0000.png").read_bytes()
    made = generate(meta, tmp_path / "a", pipe, Settings(steps=3, cfg=3.0, width=32, height=32), samples_per_prompt=2,
                    seed=42, overwrite=True)
    assert made == 2 * len(read_metadata(meta))   # every image made again: the other run's do not mix in
    assert (tmp_path / "a" / "00000" / "samples" / "0000.png").read_bytes() != before


def test_summary_command(tmp_path, capsys):
    from mmdit.eval.cli import main

    rows = [{"tag": "single_object", "metadata": '{"prompt": "a"}', "correct": True},
            {"tag": "counting", "metadata": '{"prompt": "b"}', "correct": False}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["summary", str(tmp_path / "results.jsonl"), "--json", str(tmp_path / "s.json")])
    assert "overall        0.5000" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.json").read_text())["overall"] == 0.5


def test_summary_of_held_out_prompts_only(tmp_path, capsys):
    from mmdit.eval.cli import main

    rows = [{"tag": "colors", "metadata": json.dumps({"prompt": "a", "held_out": True}), "correct": True},
            {"tag": "colors", "metadata": json.dumps({"prompt": "b", "held_out": False}), "correct": False},
            {"tag": "colors", "metadata": json.dumps({"prompt": "c"}), "correct": False}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["summary", str(tmp_path / "results.jsonl"), "--only", "held_out", "--json", str(tmp_path / "h.json")])
    assert json.loads((tmp_path / "h.json").read_text())["images"] == 1
    main(["summary", str(tmp_path / "results.jsonl"), "--only", "seen", "--json", str(tmp_path / "s.json")])
    assert json.loads((tmp_path / "s.json").read_text())["overall"] == 0.0


def test_the_pipeline_refuses_skip_layer_blocks_its_model_lacks(pipe):
    """A block past the MM-DiT's depth would skip nothing (the guidance pass would equal the conditional one):
    generate refuses it before any sampling, and takes the blocks it has."""
    from mmdit.pipeline import Settings

    depth = pipe.transformer.config.depth
    with pytest.raises(ValueError, match=rf"blocks \[{depth}\] lie outside the MM-DiT's blocks 0..{depth - 1}"):
        pipe.generate(["a red car"], [0], Settings(steps=2, cfg=3.0, width=32, height=32, slg_layers=[depth]))
    image = pipe.generate(["a red car"], [0], Settings(steps=2, cfg=3.0, width=32, height=32, slg_layers=[0]))
    assert image.shape == (1, 32, 32, 3)
