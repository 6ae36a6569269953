"""The FLUX autoencoder: naming conversion, ae.safetensors I/O, latent normalisation, token packing."""

import pytest
import torch
from diffusers import AutoencoderKL
from hypothesis import given, settings
from hypothesis import strategies as st
from opsd_thinkmorph.vae import (
    decode,
    diffusers_to_flux,
    encode,
    flux_to_diffusers,
    flux_vae_config,
    latent_position_ids,
    latents_to_tokens,
    load_vae,
    save_vae,
    to_pil,
    tokens_to_latents,
)
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return AutoencoderKL(**flux_vae_config("debug")).eval()


@pytest.fixture(scope="module")
def saved(vae, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ae.safetensors"
    save_vae(vae, path)
    return path


@pytest.fixture(scope="module")
def pixels():
    return torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _meta_state(flavour):
    with torch.device("meta"):
        return AutoencoderKL(**flux_vae_config(flavour)).state_dict()


def _spec_flux_names(levels=4, encoder_blocks=2):
    """FLUX module names of ae.safetensors written out from the layout (attention and resnets per level)."""
    resnet = ("norm1", "conv1", "norm2", "conv2")
    names = []
    for side in ("encoder", "decoder"):
        names += [f"{side}.conv_in", f"{side}.norm_out", f"{side}.conv_out"]
        names += [f"{side}.mid.{block}.{leaf}" for block in ("block_1", "block_2") for leaf in resnet]
        names += [f"{side}.mid.attn_1.{leaf}" for leaf in ("norm", "q", "k", "v", "proj_out")]
    for level in range(levels):
        names += [f"encoder.down.{level}.block.{j}.{leaf}" for j in range(encoder_blocks) for leaf in resnet]
        names += [f"decoder.up.{level}.block.{j}.{leaf}" for j in range(encoder_blocks + 1) for leaf in resnet]
        if level < levels - 1:
            names.append(f"encoder.down.{level}.downsample.conv")
        if level > 0:
            names.append(f"decoder.up.{level}.upsample.conv")
    return names


# ---- configuration and naming


def test_flavours_and_unknown_flavour():
    config = flux_vae_config("7b")
    assert config["block_out_channels"] == (128, 256, 512, 512)
    assert (config["latent_channels"], config["scaling_factor"], config["shift_factor"]) == (16, 0.3611, 0.1159)
    assert not config["use_quant_conv"] and not config["use_post_quant_conv"]
    assert sum(p.numel() for p in _meta_state("7b").values()) == 83_819_683  # ~335 MB in float32
    with pytest.raises(ValueError, match=r"'7B'.*known flavours: 7b, debug"):
        flux_vae_config("7B")


def test_7b_flux_names_and_shapes_match_the_file_layout():
    flux = diffusers_to_flux(_meta_state("7b"))
    shortcuts = [
        "encoder.down.1.block.0.nin_shortcut",
        "encoder.down.2.block.0.nin_shortcut",
        "decoder.up.0.block.0.nin_shortcut",
        "decoder.up.1.block.0.nin_shortcut",
    ]
    modules = _spec_flux_names() + shortcuts
    assert set(flux) == {f"{module}.{param}" for module in modules for param in ("weight", "bias")}
    shapes = {
        "encoder.conv_out.weight": (32, 512, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "decoder.conv_in.weight": (512, 16, 3, 3),
        "decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),  # FLUX's up.3 is the lowest resolution
        "decoder.up.1.block.0.conv1.weight": (256, 512, 3, 3),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    assert {name: tuple(flux[name].shape) for name in shapes} == shapes


def test_conversion_is_an_exact_inverse_on_a_real_state_dict(vae):
    state = vae.state_dict()
    flux = diffusers_to_flux(state)
    assert len(flux) == len(state)
    back = flux_to_diffusers(flux)
    assert set(back) == set(state)
    for name, tensor in state.items():
        assert back[name].shape == tensor.shape and torch.equal(back[name], tensor), name
    assert flux_to_diffusers(diffusers_to_flux(back)).keys() == back.keys()
    assert set(diffusers_to_flux(flux_to_diffusers(flux))) == set(flux)


def test_up_levels_are_reversed_and_attention_is_reshaped(vae):
    state = vae.state_dict()
    flux = diffusers_to_flux(state)
    assert torch.equal(flux["decoder.up.3.upsample.conv.weight"], state["decoder.up_blocks.0.upsamplers.0.conv.weight"])
    assert torch.equal(flux["decoder.up.0.block.1.conv2.bias"], state["decoder.up_blocks.3.resnets.1.conv2.bias"])
    assert torch.equal(
        flux["decoder.up.0.block.0.nin_shortcut.weight"], state["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"]
    )
    linear = state["encoder.mid_block.attentions.0.to_out.0.weight"]
    conv = flux["encoder.mid.attn_1.proj_out.weight"]
    assert linear.shape == (16, 16) and conv.shape == (16, 16, 1, 1)
    assert torch.equal(conv[:, :, 0, 0], linear)
    assert flux["encoder.mid.attn_1.proj_out.bias"].shape == (16,)


def test_conversion_agrees_with_diffusers_own_ldm_converter(vae):
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    state = vae.state_dict()
    reference = single_file_utils.convert_ldm_vae_checkpoint(diffusers_to_flux(state), flux_vae_config("debug"))
    ours = flux_to_diffusers(diffusers_to_flux(state))
    assert set(reference) == set(ours)
    assert all(torch.equal(reference[name], ours[name]) for name in ours)


def test_conversion_rejects_foreign_names():
    with pytest.raises(ValueError, match=r"encoder\.mystery\.weight"):
        flux_to_diffusers({"encoder.mystery.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"quant_conv\.weight"):
        diffusers_to_flux({"quant_conv.weight": torch.zeros(1)})


# ---- ae.safetensors


def test_save_load_round_trip_is_bit_exact(vae, saved, pixels):
    assert set(load_file(str(saved))) == set(diffusers_to_flux(vae.state_dict()))
    loaded = load_vae(saved, "debug")
    assert not loaded.training
    for name, tensor in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    latents = encode(vae, pixels, sample=False)
    assert torch.equal(decode(loaded, latents), decode(vae, latents))


def test_load_casts_to_the_requested_dtype(saved):
    loaded = load_vae(saved, "debug", device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_missing_file_names_what_belongs_there(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"ae\.safetensors.*FLUX\.1 autoencoder|FLUX\.1 autoencoder.*ae\.safetensors"
    ):
        load_vae(tmp_path / "ae.safetensors", "debug")


def test_wrong_keys_are_listed(saved, tmp_path):
    state = load_file(str(saved))
    del state["decoder.up.0.block.1.conv2.bias"]
    state["decoder.up.0.block.9.conv2.bias"] = torch.zeros(8)
    state["model.extra"] = torch.zeros(1)
    path = tmp_path / "ae.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError) as error:
        load_vae(path, "debug")
    message = str(error.value)
    assert "missing keys: decoder.up.0.block.1.conv2.bias;" in message
    assert "unexpected keys: decoder.up.0.block.9.conv2.bias, model.extra" in message


def test_wrong_shapes_are_listed(saved, tmp_path):
    state = load_file(str(saved))
    state["encoder.conv_in.weight"] = torch.zeros(9, 3, 3, 3)
    path = tmp_path / "ae.safetensors"
    save_file(state, str(path))
    with pytest.raises(
        ValueError, match=r"shape mismatches: encoder\.conv_in\.weight \(9, 3, 3, 3\) in file vs \(8, 3, 3, 3\)"
    ):
        load_vae(path, "debug")


def test_a_debug_file_is_not_a_7b_autoencoder(saved):
    with pytest.raises(ValueError, match=r"'7b'.*missing keys.*shape mismatches.*and \d+ more"):
        load_vae(saved, "7b")


# ---- encode / decode


def test_encode_decode_shapes(vae, pixels):
    latents = encode(vae, pixels)
    assert latents.shape == (2, 16, 4, 6) and latents.dtype == torch.float32
    assert decode(vae, latents).shape == pixels.shape


@pytest.mark.parametrize("size", [(24, 32), (32, 40), (8, 8)])
def test_sides_must_be_multiples_of_16(vae, size):
    with pytest.raises(ValueError, match="multiple of 16"):
        encode(vae, torch.zeros(1, 3, *size))


def test_mean_is_deterministic_and_sampling_follows_the_generator(vae, pixels):
    assert torch.equal(encode(vae, pixels, sample=False), encode(vae, pixels, sample=False))
    first = encode(vae, pixels, generator=torch.Generator().manual_seed(7))
    again = encode(vae, pixels, generator=torch.Generator().manual_seed(7))
    other = encode(vae, pixels, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, encode(vae, pixels, sample=False))


def test_scale_and_shift_are_applied_in_the_right_direction(vae, pixels):
    scale, shift = 0.3611, 0.1159
    latents = encode(vae, pixels, sample=False)
    with torch.no_grad():
        z = vae.encode(pixels).latent_dist.mode()
        torch.testing.assert_close(latents, scale * (z - shift))
        torch.testing.assert_close(decode(vae, latents), vae.decode(latents / scale + shift).sample)
        # Undoing the normalisation gives back the raw posterior mean the decoder expects.
        torch.testing.assert_close(vae.decode(z).sample, decode(vae, latents))


def test_to_pil_clamps_and_scales():
    pixels = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    (image,) = to_pil(pixels)
    assert image.mode == "RGB" and image.size == (5, 1)
    assert [image.getpixel((x, 0))[0] for x in range(5)] == [0, 0, 127, 255, 255]


# ---- latent tokens


def test_token_order_by_hand():
    latents = torch.arange(16 * 4 * 4, dtype=torch.float32).view(1, 16, 4, 4)  # value = ch*16 + row*4 + col
    tokens = latents_to_tokens(latents)
    assert tokens.shape == (1, 4, 64)
    assert tokens[0, 0, :16].tolist() == [16.0 * ch for ch in range(16)]  # (p_row 0, p_col 0), all channels
    assert tokens[0, 1, 0] == 2  # token (r 0, c 1): latent pixel (0, 2), channel 0
    assert tokens[0, 1, 1] == 18  # channel 1 of the same pixel
    assert tokens[0, 1, 16] == 3  # p_col 1: latent pixel (0, 3)
    assert tokens[0, 1, 32] == 6  # p_row 1: latent pixel (1, 2)
    assert tokens[0, 2, 0] == 8  # token (r 1, c 0): latent pixel (2, 0)
    assert tokens[0, 3, 63] == 15 * 16 + 3 * 4 + 3  # last feature of the last token: channel 15 at (3, 3)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 2),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    channels=st.sampled_from([1, 16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_tokens_and_latents_are_inverse(batch, h, w, channels, seed):
    latents = torch.randn(batch, channels, 2 * h, 2 * w, generator=torch.Generator().manual_seed(seed))
    tokens = latents_to_tokens(latents)
    assert tokens.shape == (batch, h * w, 4 * channels)
    assert torch.equal(tokens_to_latents(tokens, h, w), latents)
    assert torch.equal(latents_to_tokens(tokens_to_latents(tokens, h, w)), tokens)


def test_token_shape_errors():
    with pytest.raises(ValueError, match="even"):
        latents_to_tokens(torch.zeros(1, 16, 3, 4))
    with pytest.raises(ValueError, match="3x2 grid"):
        tokens_to_latents(torch.zeros(1, 5, 64), 3, 2)


def test_latent_position_ids():
    ids = latent_position_ids(2, 3)
    assert ids.dtype == torch.int64
    assert ids.tolist() == [0, 1, 2, 64, 65, 66]
    assert latent_position_ids(2, 2, max_latent_size=4).tolist() == [0, 1, 4, 5]
    assert latent_position_ids(64, 64)[-1] == 64 * 64 - 1
    with pytest.raises(ValueError, match="65x1 token grid"):
        latent_position_ids(65, 1)
