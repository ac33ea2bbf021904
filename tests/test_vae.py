"""The VAE wrapper against diffusers' AutoencoderKL, and Stability's LDM key layout against diffusers' converter."""

import pytest
import torch

from mmdit.vae import SD3_SCALING_FACTOR, SD3_SHIFT_FACTOR, load_diffusers_vae, to_ldm, vae_from_ldm_state


@pytest.fixture(scope="module")
def vae(tiny_pipeline):
    return load_diffusers_vae(tiny_pipeline)


def images(batch=2, size=32, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_factors_and_downsampling(vae):
    assert (vae.scaling_factor, vae.shift_factor, vae.downsample) == (SD3_SCALING_FACTOR, SD3_SHIFT_FACTOR, 8)


def test_encode_decode_equal_diffusers_with_latent_transform(vae):
    ae = vae.autoencoder
    x = images()
    with torch.no_grad():
        mean = ae.encode(x).latent_dist.mean
        z = vae.encode(x)
        torch.testing.assert_close(z, (mean - SD3_SHIFT_FACTOR) * SD3_SCALING_FACTOR, rtol=0, atol=1e-6)
        torch.testing.assert_close(vae.decode(z), ae.decode(mean).sample, rtol=0, atol=1e-5)
        # A sample is mean + std * noise, drawn from the generator.
        s1 = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
        s2 = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
        assert torch.equal(s1, s2) and not torch.equal(s1, z)


def test_latent_transform_round_trips(vae):
    z_vae = torch.randn(2, 16, 4, 4)
    z = (z_vae - vae.shift_factor) * vae.scaling_factor
    torch.testing.assert_close(z / vae.scaling_factor + vae.shift_factor, z_vae)


def test_slicing_and_tiling_decode_the_same(vae):
    z = vae.encode(images(batch=3))
    full = vae.decode(z)
    vae.memory_saving(slicing=True)
    torch.testing.assert_close(vae.decode(z), full, rtol=0, atol=1e-5)
    vae.memory_saving(slicing=False)


def test_ldm_layout_matches_diffusers_converter_and_loads_back(vae):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = vae.autoencoder.state_dict()
    ldm = to_ldm(state, num_levels=4)
    assert len(ldm) == len(state) and any(k.startswith("decoder.up.3.") for k in ldm)
    converted = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in ldm.items()},
                                           dict(vae.autoencoder.config))
    assert set(converted) == set(state)
    assert all(torch.equal(converted[k].reshape(state[k].shape), state[k]) for k in state)

    loaded = vae_from_ldm_state(ldm)
    z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded.decode(z), vae.decode(z))
    del ldm["decoder.conv_out.bias"]
    with pytest.raises(ValueError, match="missing decoder.conv_out.bias"):
        vae_from_ldm_state(ldm)
