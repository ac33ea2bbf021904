"""The toy world's VAE: its locality splices, the decoder's second phase (train_vae with decoder_only, and
`data/make_toy.py decoder`), and the bundled VAE's plain background."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from mmdit.toy import world as toy

ROOT = Path(__file__).resolve().parents[1]


def load_make_toy():
    spec = importlib.util.spec_from_file_location("make_toy", ROOT / "data" / "make_toy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vae_locality_splices():
    """The VAE's locality term splices two items at a cut of the latent grid; the same cut, scaled up, splices
    their pictures (mmdit.toy.components.train_vae)."""
    from mmdit.toy.components import _splice, latent_cuts

    cuts = latent_cuts(64, 8, np.random.default_rng(0))
    assert cuts.shape == (64, 1, 8, 8) and set(cuts.unique().tolist()) == {0.0, 1.0}
    vertical = horizontal = 0
    for m in cuts[:, 0]:
        assert 0 < m.sum() < 64   # both images contribute
        vertical += bool((m == m[:1]).all())      # every row the same: a vertical cut
        horizontal += bool((m == m[:, :1]).all())
    assert vertical + horizontal == 64 and vertical > 10 and horizontal > 10
    x = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    spliced = _splice(x, torch.tensor([[1.0, 0.0], [1.0, 0.0]]).expand(3, 1, 2, 2))
    assert spliced[1, 0].tolist() == [[1, 0], [1, 0]] and spliced[0, 0].tolist() == [[0, 2], [0, 2]]


def test_vae_decoder_only_training_keeps_every_latent():
    """train_vae(decoder_only=True) mends the decoder and leaves the encoder, and so the latents and their factors
    that shards and MM-DiTs were made from, exactly as they were."""
    from mmdit.toy.components import toy_vae, train_vae

    torch.manual_seed(0)
    vae = toy_vae(side=16)
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    encoder = {k: v.clone() for k, v in vae.encoder.state_dict().items()}
    decoder = {k: v.clone() for k, v in vae.decoder.state_dict().items()}
    factors = (vae.config.shift_factor, vae.config.scaling_factor)
    train_vae(vae, images, steps=2, batch_size=2, decoder_only=True)
    assert all(torch.equal(v, encoder[k]) for k, v in vae.encoder.state_dict().items())
    assert any(not torch.equal(v, decoder[k]) for k, v in vae.decoder.state_dict().items())
    assert (vae.config.shift_factor, vae.config.scaling_factor) == factors
    assert all(p.requires_grad for p in vae.parameters())   # the module is handed back as it came


def test_the_worst_background_term_sees_a_mark_of_a_few_pixels():
    """A 2x2 mark on the background barely moves the mean error (it is 4 pixels of 4096); the worst-background term
    of the decoder's phase weighs it as a quarter of its 16 worst pixels. Pixels near an object are not background,
    so a blurred edge is left to the mean."""
    from mmdit.toy.components import DECODER_PHASE, _weighted_error

    rng = np.random.default_rng(0)
    picture = toy.render(toy.sample_scene(rng, "two_object")[0])
    x = torch.from_numpy(picture.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    marked = x.clone()
    marked[..., :2, :2] = -1.0   # a black mark in the corner, where no object is drawn
    edge = torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)   # every object's edge blurred
    weights = {"object_weight": DECODER_PHASE["object_weight"]}
    plain = _weighted_error(marked, x, **weights) - _weighted_error(x, x, **weights)
    term = DECODER_PHASE["worst_background_weight"]
    with_term = _weighted_error(marked, x, worst_background_weight=term, **weights)
    assert with_term > 50 * plain > 0
    assert _weighted_error(edge, x, worst_background_weight=term, **weights) == _weighted_error(edge, x, **weights)


def test_the_bundled_vae_decodes_a_plain_background_without_a_corner_mark():
    """Before its decoder's second phase the bundled VAE turned a plain grey picture into one with a dark block in
    the top-left corner (errors up to 128/255 there, 29 on average over the corner's 8x8 pixels); now at most about
    32 anywhere, 6 on average in that corner (about 4 and 2 since the worst-background phase). The bounds leave room
    for rounding, not for the mark."""
    from diffusers import AutoencoderKL

    from mmdit.toy import BUNDLED_MODEL

    vae = AutoencoderKL.from_pretrained(BUNDLED_MODEL / "vae", torch_dtype=torch.float32).eval()
    grey = torch.full((1, 3, 64, 64), toy.BACKGROUND[0] / 127.5 - 1)
    with torch.no_grad():
        decoded = vae.decode(vae.encode(grey).latent_dist.mean).sample.clamp(-1, 1)
    error = ((decoded - grey).abs() * 127.5)[0].amax(0)
    assert error.max() < 48 and error[:8, :8].mean() < 10 and error[24:40, 24:40].mean() < 3


def test_the_bundled_vae_leaves_the_background_of_drawn_scenes_as_it_was():
    """With objects in the picture the decoder still drew a mark of a few pixels in the top-left corner (the plain
    grey picture above does not show it): on these 32 world scenes its worst background pixel, 4 px clear of every
    object, was 80/255 from the picture on average, and the top-left 4x4 pixels 36. The decoder's phase with the
    worst-background term (`data/make_toy.py decoder`, 2000 steps) brought them to 6 and 3."""
    from diffusers import AutoencoderKL

    from mmdit.toy import BUNDLED_MODEL

    rng = np.random.default_rng(0)
    tasks = list(toy.TASK_WEIGHTS)
    pictures = np.stack([toy.render(toy.sample_scene(rng, tasks[i % len(tasks)])[0]) for i in range(32)])
    x = torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 127.5 - 1
    vae = AutoencoderKL.from_pretrained(BUNDLED_MODEL / "vae", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        decoded = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    distance = ((decoded - x) * 127.5).norm(dim=1)   # per pixel, as far as the colours are apart
    grey = torch.tensor(toy.BACKGROUND).view(1, 3, 1, 1) / 127.5 - 1
    objects = ((x - grey).abs().sum(1, keepdim=True) > 0.2).float()
    away = torch.nn.functional.max_pool2d(objects, 9, 1, 4)[:, 0] == 0   # 4 px clear of every object
    worst = torch.where(away, distance, torch.zeros_like(distance)).flatten(1).amax(1)
    assert worst.mean() < 20 and distance[:, :4, :4].mean() < 10


def test_make_toy_decoder_mends_a_pipelines_decoder_and_keeps_its_latents(tmp_path, capsys):
    """`data/make_toy.py decoder` trains a built pipeline's VAE decoder in place, in the dtype it was stored in; the
    encoder (every latent) stays bit for bit. Bad input is one line and exit 2, with nothing written."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    make_toy = load_make_toy()
    make_toy.main(["world", "--out", str(tmp_path / "w"), "--train-samples", "8", "--val-samples", "2",
                   "--vae-steps", "1", "--vae-images", "8", "--decoder-steps", "0", "--tower-steps", "0",
                   "--align-steps", "1"])   # a bundle carries the recipe's alignment encoder
    pipeline = tmp_path / "w" / "pipeline"
    make_toy.main(["bundle", str(pipeline), "--to", str(tmp_path / "b")])   # float16, as the bundled model is
    weights = tmp_path / "b" / "vae" / "diffusion_pytorch_model.safetensors"
    before = load_file(weights)
    make_toy.main(["decoder", str(tmp_path / "b"), "--images", str(tmp_path / "w" / "images" / "train"),
                   "--steps", "2", "--precision", "fp32"])
    after = load_file(weights)
    assert set(after) == set(before) and all(t.dtype == torch.float16 for t in after.values())
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("encoder."))
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("decoder."))
    AutoencoderKL.from_pretrained(tmp_path / "b" / "vae")
    assert sorted(p.name for p in weights.parent.iterdir()) == ["config.json", weights.name]   # no temporary left
    make_toy.main(["decoder", str(pipeline), "--images", str(tmp_path / "w" / "images" / "train"), "--steps", "1",
                   "--precision", "fp32"])   # the world's own pipeline, stored in float32, stays float32
    assert {t.dtype for t in load_file(pipeline / "vae" / weights.name).values()} == {torch.float32}
    capsys.readouterr()
    for argv, problem in ((["decoder", str(tmp_path / "nothing"), "--images", str(tmp_path)], "has no vae/"),
                          (["decoder", str(tmp_path / "b"), "--images", str(tmp_path)], "no pictures in .tar"),
                          (["decoder", str(tmp_path / "b"), "--images", str(tmp_path / "w" / "images" / "train"),
                            "--seed", "-1"], "--seed must be >= 0"),
                          (["decoder", str(tmp_path / "b"), "--images", str(tmp_path / "w" / "images" / "train"),
                            "--steps", "0"], "--steps must be >= 1")):
        with pytest.raises(SystemExit) as e:
            make_toy.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and problem in err and len(err.splitlines()) == 1
    unchanged = load_file(weights)
    assert unchanged.keys() == after.keys() and all(torch.equal(unchanged[k], after[k]) for k in after)
