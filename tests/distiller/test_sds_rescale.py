"""SDS* (MVDream's CFG-rescaled SDS): the x0-space rescale by hand, and the distiller option."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from asd3d.distiller import math
from asd3d.distiller.sds import SDSDistiller
from asd3d.prior.schedule import ddpm_alphas_cumprod, gather_abar
from asd3d.types import Condition, ConditionPair

CONF = Path(__file__).parents[2] / "conf" / "distiller"


def eps_for_x0(x0, x_t, abar):
    """The noise prediction whose clean-image estimate is ``x0``."""
    return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()


def x0_of(eps, x_t, abar):
    return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()


def test_rescale_hand_values():
    """x0_cfg = [2, 6] (std 2 sqrt 2), x0_cond = [1, 3] (std sqrt 2): factor 1/2, so with phi 0.5
    x0* = 0.5 [1, 3] + 0.5 [2, 6] = [1.5, 4.5]."""
    abar = torch.tensor(0.36).view(1, 1, 1, 1)
    x_t = torch.tensor([0.5, -1.0]).view(1, 1, 1, 2)
    eps_cfg = eps_for_x0(torch.tensor([2.0, 6.0]).view(1, 1, 1, 2), x_t, abar)
    eps_cond = eps_for_x0(torch.tensor([1.0, 3.0]).view(1, 1, 1, 2), x_t, abar)
    eps_star = math.rescale_guidance_x0(eps_cfg, eps_cond, x_t, abar, 0.5)
    torch.testing.assert_close(x0_of(eps_star, x_t, abar).flatten(), torch.tensor([1.5, 4.5]))


def random_inputs(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    eps_cfg, eps_cond, x_t = torch.randn(3, batch, 4, 8, 8, generator=g)
    abar = gather_abar(ddpm_alphas_cumprod(), torch.tensor([100, 400, 700, 950][:batch]))
    return eps_cfg, eps_cond, x_t, abar


def test_phi_zero_is_plain_cfg_and_phi_one_matches_std():
    eps_cfg, eps_cond, x_t, abar = random_inputs()
    torch.testing.assert_close(
        math.rescale_guidance_x0(eps_cfg, eps_cond, x_t, abar, 0.0), eps_cfg, atol=1e-4, rtol=1e-4
    )
    x0_star = x0_of(math.rescale_guidance_x0(eps_cfg, eps_cond, x_t, abar, 1.0), x_t, abar)
    torch.testing.assert_close(
        x0_star.flatten(1).std(1), x0_of(eps_cond, x_t, abar).flatten(1).std(1), rtol=1e-4, atol=0
    )


def test_std_is_shared_by_a_group_of_views():
    """MVDream: one factor per 4-view group (std over the group jointly), not per image."""
    eps_cfg, eps_cond, x_t, abar = random_inputs()
    abar = abar[:1].expand(4, 1, 1, 1)  # one timestep per group, as MVDream samples it
    x0_cfg = x0_of(eps_cfg, x_t, abar)
    grouped = x0_of(math.rescale_guidance_x0(eps_cfg, eps_cond, x_t, abar, 1.0, 2), x_t, abar)
    ratios = (grouped / x0_cfg).flatten(1).mean(1)
    torch.testing.assert_close(ratios[0], ratios[1])
    torch.testing.assert_close(ratios[2], ratios[3])
    x0_cond = x0_of(eps_cond, x_t, abar)
    expected_first = x0_cond[:2].std() / x0_cfg[:2].std()
    torch.testing.assert_close(ratios[0], expected_first, rtol=1e-4, atol=1e-6)
    per_image = x0_of(math.rescale_guidance_x0(eps_cfg, eps_cond, x_t, abar, 1.0, 1), x_t, abar)
    assert not torch.allclose(per_image, grouped)
    with pytest.raises(ValueError, match="multiple of group 3"):
        math.rescale_guidance_x0(eps_cfg, eps_cond, x_t, abar, 1.0, 3)


def test_recon_weighting_is_the_x0_loss_gradient():
    """w = sqrt((1-abar)/abar) makes w (eps_hat - eps) = z - x0_hat (MVDream's recon loss)."""
    g = torch.Generator().manual_seed(1)
    z, eps, eps_hat = torch.randn(3, 2, 4, 4, 4, generator=g)
    abar = torch.tensor([0.9, 0.05]).view(2, 1, 1, 1)
    x_t = math.add_noise(z, eps, abar)
    grad = math.sds_gradient(eps_hat, eps, math.timestep_weight(abar, "recon"))
    torch.testing.assert_close(grad, z - x0_of(eps_hat, x_t, abar), atol=1e-5, rtol=1e-5)
    assert math.timestep_weight(torch.tensor(0.2), "recon").item() == pytest.approx(2.0)


def linear_prior(x, t, condition):
    cond = (~condition.unconditional).float().view(-1, 1, 1, 1)
    return 0.5 * x + 0.3 * cond + 0.01 * t.view(-1, 1, 1, 1) / 1000


def pair(batch):
    off = torch.zeros(batch, dtype=torch.bool)
    texts = tuple(f"p{i}" for i in range(batch))
    return ConditionPair(Condition(texts, off, None), Condition(texts, ~off, None))


def schedules():
    return {"t_min": lambda f: 20.0, "t_max": lambda f: 980.0}


def test_sds_star_gradient_is_recon_loss_of_rescaled_cfg():
    """The distiller's update equals ``z - x0*`` computed step by step from the same predictions."""
    g = torch.Generator().manual_seed(2)
    z, eps = torch.randn(2, 8, 4, 4, 4, generator=g)
    t = torch.tensor([300] * 4 + [800] * 4)
    alphas = ddpm_alphas_cumprod()
    d = SDSDistiller(50.0, guidance_rescale=0.5, weighting="recon", **schedules())
    grad, shifted = d.gradient(z, t, eps, pair(8), linear_prior, alphas, 20, 4, None)
    assert shifted is None
    abar = gather_abar(alphas, t)
    x_t = math.add_noise(z, eps, abar)
    eps_c = 0.5 * x_t + 0.3 + 0.01 * t.view(-1, 1, 1, 1) / 1000
    eps_u = 0.5 * x_t + 0.01 * t.view(-1, 1, 1, 1) / 1000
    x0_cfg, x0_cond = x0_of(eps_u + 50 * (eps_c - eps_u), x_t, abar), x0_of(eps_c, x_t, abar)
    factor = torch.stack(
        [x0_cond[i : i + 4].std() / x0_cfg[i : i + 4].std() for i in (0, 4)]
    ).repeat_interleave(4)
    x0_star = 0.5 * factor.view(-1, 1, 1, 1) * x0_cfg + 0.5 * x0_cfg
    torch.testing.assert_close(grad, z - x0_star, atol=1e-4, rtol=1e-4)


def test_rescale_zero_is_the_old_sds():
    g = torch.Generator().manual_seed(3)
    z, eps = torch.randn(2, 3, 4, 4, 4, generator=g)
    t = torch.tensor([100, 500, 900])
    alphas = ddpm_alphas_cumprod()
    plain = SDSDistiller(100.0, **schedules())
    grad, _ = plain.gradient(z, t, eps, pair(3), linear_prior, alphas, 20, 1, None)
    abar = gather_abar(alphas, t)
    x_t = math.add_noise(z, eps, abar)
    eps_c = 0.5 * x_t + 0.3 + 0.01 * t.view(-1, 1, 1, 1) / 1000
    eps_u = 0.5 * x_t + 0.01 * t.view(-1, 1, 1, 1) / 1000
    expected = (1 - abar) * (math.classifier_free_guidance(eps_c, eps_u, 100.0) - eps)
    torch.testing.assert_close(grad, expected)


def test_sds_star_yaml_has_the_release_numbers():
    d = instantiate(OmegaConf.load(CONF / "sds_star.yaml"))
    assert isinstance(d, SDSDistiller)
    assert (d.guidance_scale, d.guidance_rescale, d.weighting) == (50.0, 0.5, "recon")


def test_bad_rescale_is_named():
    with pytest.raises(ValueError, match="guidance_rescale=1.5"):
        SDSDistiller(50.0, guidance_rescale=1.5, **schedules())
