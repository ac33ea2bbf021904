"""The sampling command line that sample.py and `geneval generate` share: the same flags, every value checked before
a model loads or a file is written, and a huge job that starts at once."""

import importlib.util
import json
from pathlib import Path

import pytest

from mmdit.eval import cli as geneval_cli

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sample_for_cli_tests", ROOT / "sample.py")
sample_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sample_cli)

SAMPLE_ONLY = {"--prompt", "--prompts-file", "--num-images", "--out"}
GENERATE_ONLY = {"--metadata", "--outdir", "--samples-per-prompt", "--overwrite", "--grid"}
OWN_DEFAULTS = {"--seed", "--batch-size"}   # GenEval's convention (42, 4) against sample.py's (0, 1)


def options(parser) -> dict:
    """{option string: (default, type, nargs, choices)} of an argparse parser."""
    return {s: (a.default, a.type, a.nargs, a.choices) for a in parser._actions for s in a.option_strings
            if s.startswith("--") and s != "--help"}


def parser_of(parse_args, argv):
    """The parser a command line's parse_args(argv) builds, caught at the moment it parses."""
    import argparse

    captured = {}

    def parse(self, args=None, namespace=None):
        captured["parser"] = self
        raise SystemExit(0)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = parse
    try:
        with pytest.raises(SystemExit):
            parse_args(argv)
    finally:
        argparse.ArgumentParser.parse_args = original
    return captured["parser"]


def sample_parser():
    return parser_of(sample_cli.parse_args, [])


def generate_parser():
    subparsers = next(a for a in parser_of(geneval_cli.parse_args, [])._actions if a.dest == "command")
    return subparsers.choices["generate"]


def test_both_command_lines_take_the_same_sampling_flags():
    ours, theirs = options(sample_parser()), options(generate_parser())
    assert set(ours) - SAMPLE_ONLY == set(theirs) - GENERATE_ONLY
    shared = set(ours) - SAMPLE_ONLY - OWN_DEFAULTS
    assert len(shared) >= 18 and {"--negative-prompt", "--slg-layers", "--device", "--dtype"} <= shared
    assert {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}
    assert (ours["--seed"][0], theirs["--seed"][0]) == (0, 42)


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        sample_cli.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "sampling steps (default: 28)" in text and "(default: euler)" in text and "own, else 2.8)" in text


BAD_VALUES = [
    (["--cfg", "nan"], "--cfg must be a finite number in [0, 100]"),
    (["--cfg", "inf"], "--cfg must be a finite number"),
    (["--cfg", "-3"], "--cfg must be a finite number"),
    (["--shift", "nan"], "--shift must be a finite number in (0, 100]"),
    (["--shift", "-1"], "--shift must be a finite number"),
    (["--steps", "0"], "--steps must be an integer in [1, 10000]"),
    (["--steps", "100000"], "--steps must be an integer in [1, 10000]"),
    (["--sampler", "bogus"], "--sampler must be one of euler, heun, dpmpp_2m"),
    (["--width", "30"], "--width must be a multiple of 8"),
    (["--slg-scale", "nan"], "--slg-scale must be a finite number"),
    (["--batch-size", "0"], "--batch-size must be in [1, 1024]"),
    (["--max-sequence-length", "0"], "--max-sequence-length must be in [1, 512]"),
    (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
]


@pytest.mark.parametrize("extra,message", BAD_VALUES + [
    (["--num-images", "0"], "--num-images must be >= 1, got 0"),
    (["--num-images", "-1"], "--num-images must be >= 1, got -1"),
])
def test_sample_refuses_bad_values_before_loading(tmp_path, capsys, extra, message):
    """The model path does not exist: had the value been checked after loading, the error would be about it."""
    with pytest.raises(SystemExit) as exit_info:
        sample_cli.main(["--model", str(tmp_path / "no-model"), "--prompt", "x", "--out", str(tmp_path / "o" / "a.png"),
                         *extra])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and message in err, err
    assert err.startswith("sample.py: error: ")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture()
def metadata(tmp_path):
    path = tmp_path / "meta.jsonl"
    path.write_text("".join(json.dumps({"tag": "single_object", "prompt": f"a photo of a {c}",
                                        "include": [{"class": c, "count": 1}]}) + "\n" for c in ("cat", "dog")))
    return path


@pytest.mark.parametrize("extra,message", BAD_VALUES + [
    (["--samples-per-prompt", "0"], "--samples-per-prompt must be >= 1, got 0"),
    (["--samples-per-prompt", "-1"], "--samples-per-prompt must be >= 1, got -1"),
])
def test_generate_refuses_bad_values_and_writes_nothing(tiny_pipeline, metadata, tmp_path, capsys, extra, message):
    """Against a real model: refused before it loads, with no config.json and no prompt folder written."""
    outdir = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        geneval_cli.main(["generate", "--metadata", str(metadata), "--outdir", str(outdir),
                          "--model", str(tiny_pipeline), *extra])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and message in err, err
    assert not outdir.exists()


def test_generate_refuses_a_size_the_model_cannot_make_and_writes_nothing(tiny_pipeline, metadata, tmp_path, capsys):
    outdir = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        geneval_cli.main(["generate", "--metadata", str(metadata), "--outdir", str(outdir),
                          "--model", str(tiny_pipeline), "--width", "40", "--height", "64"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "multiples of 16 for this model" in err and "\n" not in err
    assert not outdir.exists()
    geneval_cli.main(["generate", "--metadata", str(metadata), "--outdir", str(outdir), "--model", str(tiny_pipeline),
                      "--samples-per-prompt", "1", "--steps", "1", "--width", "32", "--height", "32"])
    assert sorted(p.name for p in outdir.iterdir()) == ["00000", "00001", "config.json"]


def test_a_huge_job_starts_without_building_its_job_list(tiny_pipeline, tmp_path, monkeypatch):
    """A billion images: the first is written at once (the job list is not built first), named for the count."""
    import mmdit.images

    written = []

    class Enough(Exception):
        pass

    def save_png(image, path, info):
        written.append((Path(path).name, info["seed"]))
        if len(written) == 2:
            raise Enough

    monkeypatch.setattr(mmdit.images, "save_png", save_png)
    with pytest.raises(Enough):
        sample_cli.main(["--model", str(tiny_pipeline), "--prompt", "x", "--num-images", "1000000000",
                         "--steps", "1", "--width", "32", "--height", "32", "--seed", "5",
                         "--out", str(tmp_path / "img.png")])
    assert written == [("img-000000000.png", 5), ("img-000000001.png", 6)]
