"""KL / VQ autoencoders: parity with diffusers through the key map, configs, the VQ estimator, seeding, errors.

Parity models get their random weights perturbed (GroupNorm affine included) so that no parameter sits at a
trivial init value; float32 outputs agree with diffusers to ATOL.
"""
import json

import pytest
import torch
from diffusers import AutoencoderKL, VQModel

from ldm.nn.autoencoder import Autoencoder, AutoencoderConfig, DiagonalGaussian, VectorQuantizer
from ldm.nn.autoencoder_keys import (autoencoder_from_diffusers, autoencoder_state_dict_from_diffusers,
                                     autoencoder_state_dict_from_single_file, autoencoder_state_dict_to_diffusers,
                                     config_from_state_dict)

ATOL = 1e-5


def _perturb(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _tiny_kl(block_out=(32, 64), layers=1, groups=8, latent=4, **extra) -> AutoencoderKL:
    n = len(block_out)
    return _perturb(AutoencoderKL(block_out_channels=block_out, down_block_types=("DownEncoderBlock2D",) * n,
                                  up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=layers,
                                  norm_num_groups=groups, latent_channels=latent, sample_size=32, **extra))


def _images(b=2, c=3, size=32, seed=0) -> torch.Tensor:
    return torch.rand(b, c, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def _check_kl_parity(vae: AutoencoderKL, ours: Autoencoder, x: torch.Tensor, decode_atol: float = ATOL
                     ) -> dict[str, float]:
    sf = vae.config.scaling_factor
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        q = ours.posterior(x)
        z_ref = dist.sample(torch.Generator().manual_seed(7)) * sf
        z = ours.encode(x, torch.Generator().manual_seed(7))
        diffs = {"mean": _max_diff(dist.mean, q.mean), "logvar": _max_diff(dist.logvar, q.logvar),
                 "seeded encode": _max_diff(z_ref, z),
                 "mode": _max_diff(dist.mode() * sf, ours.encode(x, sample=False)),
                 "decode": _max_diff(vae.decode(z_ref / sf).sample, ours.decode(z_ref))}
    assert all(d < (decode_atol if k == "decode" else ATOL) for k, d in diffs.items()), diffs
    return diffs


@pytest.mark.parametrize("block_out,layers,groups", [((32, 64), 1, 8), ((32, 32, 64), 2, 32)])
def test_kl_parity_with_diffusers_and_round_trip(block_out, layers, groups):
    vae = _tiny_kl(block_out, layers, groups)
    ours = autoencoder_from_diffusers(vae).eval()
    assert ours.config.ch_mult == tuple(w // block_out[0] for w in block_out)
    x = _images()
    _check_kl_parity(vae, ours, x)

    # ours -> diffusers names -> a fresh diffusers model built from our config: same outputs as ours.
    back = AutoencoderKL.from_config(ours.config.to_diffusers_config()).eval()
    back.load_state_dict(autoencoder_state_dict_to_diffusers(ours.state_dict()), strict=True)
    _check_kl_parity(back, ours, x)
    ref = vae.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in back.state_dict().items())


@pytest.mark.slow
def test_kl_parity_full_size_sd15_vae():
    """Full SD 1.5 VAE at 256 px. float32 decode outputs reach |x| ~ 4 through ~30 layers of 512 channels and
    differ by ~2e-5 from op-order rounding alone: in float64 (128 px, to save time) they agree to ~1e-13."""
    config = AutoencoderConfig.sd()
    vae = _perturb(AutoencoderKL.from_config(config.to_diffusers_config()), seed=2)
    ours = autoencoder_from_diffusers(vae).eval()
    assert ours.config == config
    x = _images(b=1, size=256)
    _check_kl_parity(vae, ours, x, decode_atol=1e-4)
    vae.double(), ours.double()
    with torch.no_grad():
        z = vae.encode(_images(b=1, size=128).double()).latent_dist.mean
        assert _max_diff(vae.decode(z).sample, ours.decode(z * config.scaling_factor)) < 1e-10


def test_vq_parity_with_diffusers():
    vq = _perturb(VQModel(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                          latent_channels=3, vq_embed_dim=3, num_vq_embeddings=16, sample_size=32))
    with torch.no_grad():  # a codebook at the scale of the encodings, so nearest-code choices vary
        vq.quantize.embedding.weight.normal_(0, 1, generator=torch.Generator().manual_seed(3))
    ours = autoencoder_from_diffusers(vq).eval()
    assert (ours.config.kind, ours.config.n_embed, ours.latent_channels) == ("vq", 16, 3)
    x = _images()
    with torch.no_grad():
        h = vq.encode(x).latents
        z = ours.encode(x)
        assert _max_diff(h * vq.config.scaling_factor, z) < ATOL
        assert len(ours.quantize.indices(h).unique()) > 1
        assert _max_diff(vq.decode(h).sample, ours.decode(z)) < ATOL
    assert set(autoencoder_state_dict_to_diffusers(ours.state_dict())) == set(vq.state_dict())


def test_config_dict_and_diffusers_round_trips():
    for config in (AutoencoderConfig.sd(), AutoencoderConfig.sdxl(shift_factor=0.1),
                   AutoencoderConfig.vq_f4(dropout=0.1, attn_resolutions=(4,))):
        d = json.loads(json.dumps(config.to_dict()))
        assert isinstance(d["ch_mult"], list)
        assert AutoencoderConfig.from_dict(d) == config
    for config in (AutoencoderConfig.sd(), AutoencoderConfig.sdxl(shift_factor=0.1),
                   AutoencoderConfig.vq_f4(n_embed=512)):
        assert AutoencoderConfig.from_diffusers_config(config.to_diffusers_config()) == config
    d = AutoencoderConfig.sd().to_diffusers_config()
    assert (d["block_out_channels"], d["layers_per_block"], d["latent_channels"]) == ([128, 256, 512, 512], 2, 4)
    # The real SD config.json as diffusers writes it (model defaults included) reads back as the SD config.
    diffusers_sd = dict(AutoencoderKL.from_config(d).config)
    assert AutoencoderConfig.from_diffusers_config(diffusers_sd) == AutoencoderConfig.sd()
    with pytest.raises(ValueError, match="bogus"):
        AutoencoderConfig.from_dict({**AutoencoderConfig.sd().to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="down_block_types"):
        AutoencoderConfig.from_diffusers_config({**d, "down_block_types": ["AttnDownEncoderBlock2D"] * 4})
    with pytest.raises(ValueError, match="attn_resolutions"):
        AutoencoderConfig(attn_resolutions=(2,)).to_diffusers_config()
    with pytest.raises(ValueError, match="kind"):
        AutoencoderConfig(kind="gan")


def test_latent_shape_and_downsample_factor():
    config = AutoencoderConfig(ch=16, ch_mult=(1, 2, 4, 4), num_res_blocks=1, num_groups=8)
    model = Autoencoder(config).eval()
    assert config.downsample_factor == model.downsample_factor == 8 and model.latent_channels == 4
    with torch.no_grad():
        z = model.encode(_images(b=1, size=64))
        assert z.shape == (1, 4, 8, 8)
        assert model.decode(z).shape == (1, 3, 64, 64)


def test_attention_levels_use_original_keys_and_inference_recovers_config():
    config = AutoencoderConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, num_groups=8, attn_resolutions=(2,))
    model = Autoencoder(config)
    keys = set(model.state_dict())
    assert "encoder.down.1.attn.0.q.weight" in keys and "decoder.up.1.attn.1.proj_out.weight" in keys
    assert not any(k.startswith("encoder.down.0.attn") for k in keys)
    assert "encoder.down.0.downsample.conv.weight" in keys and "encoder.down.1.downsample.conv.weight" not in keys
    assert "decoder.up.1.upsample.conv.weight" in keys and "decoder.up.0.upsample.conv.weight" not in keys
    assert config_from_state_dict(model.state_dict(), num_groups=8) == config
    with torch.no_grad():
        assert model(_images(b=1, size=16)).reconstruction.shape == (1, 3, 16, 16)


def _tiny_vq(**kw) -> Autoencoder:
    return Autoencoder(AutoencoderConfig(kind="vq", ch=16, ch_mult=(1, 2), num_res_blocks=1, num_groups=8,
                                         z_channels=3, embed_dim=3, n_embed=8, **kw))


def test_vq_quantization_returns_nearest_codebook_vectors():
    vq = VectorQuantizer(n_embed=8, embed_dim=3, beta=0.25)
    with torch.no_grad():
        vq.embedding.weight.normal_()
    z = torch.randn(2, 3, 4, 4)
    z_q, _, idx = vq(z)
    codes = vq.embedding.weight
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    brute = ((flat[:, None, :] - codes[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(idx.flatten(), brute)
    assert torch.equal(z_q.permute(0, 2, 3, 1).reshape(-1, 3), codes[brute])


def test_vq_loss_terms_and_straight_through_gradient():
    vq = VectorQuantizer(n_embed=8, embed_dim=3, beta=0.25)
    with torch.no_grad():
        vq.embedding.weight.normal_()
    # Encodings that are codebook entries: codebook and commitment terms both vanish.
    on_codes = vq.lookup(torch.tensor([[[0, 3], [5, 5]]]))
    z_q, loss, idx = vq(on_codes)
    assert loss.item() == 0.0 and torch.equal(z_q, on_codes) and torch.equal(idx, torch.tensor([[[0, 3], [5, 5]]]))
    # Off the codebook: loss = (1 + beta) * mse; d/dz = beta * 2 (z - z_q) / N (commitment only),
    # d/de flows from the codebook term only; the straight-through output passes d(out)/dz = identity.
    z = torch.randn(1, 3, 2, 2, requires_grad=True)
    z_q, loss, idx = vq(z)
    mse = ((z - vq.lookup(idx)) ** 2).mean()
    assert torch.allclose(loss, 1.25 * mse)
    (g_loss,) = torch.autograd.grad(loss, z, retain_graph=True)
    assert torch.allclose(g_loss, 0.25 * 2 * (z - vq.lookup(idx)).detach() / z.numel())
    (g_st,) = torch.autograd.grad((z_q * 3.0).sum(), z)
    assert torch.equal(g_st, torch.full_like(z, 3.0))

    # Through the whole model: a reconstruction-only loss reaches the encoder via the straight-through path.
    model = _tiny_vq()
    model(_images(b=1, size=16)).reconstruction.pow(2).mean().backward()
    grad = model.encoder.conv_in.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad is None or model.quantize.embedding.weight.grad.abs().sum() == 0


def test_vq_usage_tracking():
    vq = VectorQuantizer(n_embed=8, embed_dim=3, beta=0.25)
    with torch.no_grad():
        vq.embedding.weight.normal_()
    hits = torch.tensor([[[0, 2], [2, 5]]])
    vq.train()
    vq(vq.lookup(hits))
    vq(vq.lookup(hits))
    assert vq.usage_counts.tolist() == [2, 0, 4, 0, 0, 2, 0, 0]
    assert vq.usage_fraction() == pytest.approx(3 / 8)
    p = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)
    assert vq.perplexity() == pytest.approx(torch.exp(-(p * p.log()).sum()).item())
    vq.eval()
    vq(vq.lookup(hits))  # inference does not count
    assert vq.usage_counts.sum() == 8
    vq.reset_usage()
    assert vq.usage_counts.sum() == 0 and vq.usage_fraction() == 0.0 and vq.perplexity() == 0.0
    assert "quantize.usage_counts" not in _tiny_vq().state_dict()


def test_kl_regularizer_is_the_closed_form_kl():
    model = Autoencoder(AutoencoderConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, num_groups=8))
    x = _images(b=2, size=16)
    q = model.posterior(x)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(q.mean, q.std),
                                            torch.distributions.Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    assert torch.allclose(q.kl(), ref, rtol=1e-5, atol=1e-5)
    out = model(x, torch.Generator().manual_seed(0))
    assert torch.allclose(out.reg_loss, ref.mean(), rtol=1e-5)
    assert DiagonalGaussian.from_moments(torch.full((1, 2, 1, 1), 50.0)).logvar.item() == 20.0


def test_seeded_encode_and_per_row_generators():
    model = Autoencoder(AutoencoderConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, num_groups=8)).eval()
    x = _images(b=3, size=16)
    with torch.no_grad():
        a = model.encode(x, torch.Generator().manual_seed(5))
        b = model.encode(x, torch.Generator().manual_seed(5))
        c = model.encode(x, torch.Generator().manual_seed(6))
        assert torch.equal(a, b) and not torch.allclose(a, c)
        rows = model.encode(x, [torch.Generator().manual_seed(10 + i) for i in range(3)])
        for i in range(3):
            alone = model.encode(x[i:i + 1], torch.Generator().manual_seed(10 + i))
            assert _max_diff(rows[i:i + 1], alone) < 1e-6
        mean = model.posterior(x).mean
        assert torch.allclose(model.encode(x, sample=False), 0.18215 * mean)


def test_shift_factor_is_applied_and_undone():
    base = AutoencoderConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, num_groups=8)
    plain = Autoencoder(base).eval()
    shifted = Autoencoder(AutoencoderConfig.from_dict({**base.to_dict(), "shift_factor": 0.3, "scaling_factor": 1.5}))
    shifted.load_state_dict(plain.state_dict())
    x = _images(b=1, size=16)
    with torch.no_grad():
        mean = plain.posterior(x).mean
        z = shifted.eval().encode(x, sample=False)
        assert torch.allclose(z, 1.5 * (mean - 0.3), atol=1e-6)
        assert torch.allclose(shifted.decode(z), plain.decode(0.18215 * mean), atol=1e-5)


def test_bad_inputs_name_the_argument_and_expected_value():
    model = Autoencoder(AutoencoderConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, num_groups=8))
    with pytest.raises(ValueError, match=r"img.*in_channels=3"):
        model.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"img.*downsample_factor=4"):
        model.encode(torch.zeros(1, 3, 16, 18))
    with pytest.raises(ValueError, match=r"z.*latent_channels=4"):
        model.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="generator"):
        model.encode(torch.zeros(2, 3, 16, 16), [torch.Generator()])
    with pytest.raises(ValueError, match="kind='kl'"):
        _tiny_vq().posterior(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="num_groups"):
        AutoencoderConfig(ch=12, num_groups=8)


def test_key_map_rejects_unknown_and_missing_keys():
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8)
    sd = vae.state_dict()
    bad = {**sd, "encoder.down_blocks.0.attentions.0.to_q.weight": torch.zeros(8, 8)}
    del bad["decoder.up_blocks.1.resnets.1.conv2.bias"]
    with pytest.raises(ValueError, match=r"unknown keys: encoder\.down_blocks\.0\.attentions.*"
                                         r"missing keys: decoder\.up_blocks\.1\.resnets\.1\.conv2\.bias"):
        autoencoder_state_dict_from_diffusers(bad)
    ours = autoencoder_state_dict_from_diffusers(sd)
    with pytest.raises(ValueError, match=r"unknown keys: extra\.weight; missing keys: encoder\.mid\.attn_1\.k\.bias"):
        autoencoder_state_dict_to_diffusers({**{k: v for k, v in ours.items() if k != "encoder.mid.attn_1.k.bias"},
                                             "extra.weight": torch.zeros(1)})
    # diffusers < 0.14 attention names (still in many hub VAE weights) map to the same keys.
    legacy = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value")
              .replace("to_out.0", "proj_attn"): v for k, v in sd.items()}
    assert autoencoder_state_dict_from_diffusers(legacy).keys() == ours.keys()
    with pytest.raises(ValueError, match="unknown keys"):
        autoencoder_state_dict_from_diffusers({**sd, **legacy})


def test_single_file_weights_load_without_renaming():
    model = Autoencoder(AutoencoderConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, num_groups=8))
    ckpt = {f"first_stage_model.{k}": v for k, v in model.state_dict().items()}
    ckpt["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)
    loaded = autoencoder_state_dict_from_single_file(ckpt, model.config)
    fresh = Autoencoder(model.config)
    fresh.load_state_dict(loaded, strict=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=r"first_stage_model\.loss\.w"):
        autoencoder_state_dict_from_single_file({**ckpt, "first_stage_model.loss.w": torch.zeros(1)}, model.config)
