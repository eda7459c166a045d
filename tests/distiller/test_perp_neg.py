"""Perp-Neg: the combination by hand, the view weights of the release, one batched prior call with
4 (SDS, CSD) or 5 (ASD) blocks of rows, and the SD prior's conditions."""

import math as pymath
import sys
from pathlib import Path

import pytest
import torch

from asd3d.distiller import math
from asd3d.distiller.asd import ASDDistiller
from asd3d.distiller.csd import CSDDistiller
from asd3d.distiller.sds import SDSDistiller
from asd3d.prior.schedule import ddpm_alphas_cumprod, gather_abar
from asd3d.prior.view_prompts import PerpNegWeights, perp_neg_views
from asd3d.types import Cameras, Condition, ConditionPair, PerpNegConditions, PromptBatch

sys.path.insert(0, str(Path(__file__).parents[1] / "prior"))
from tiny_sd import RESOLUTION, TEXT_DIM, save_tiny_sd  # noqa: E402


def test_perpendicular_component_hand_values():
    x = torch.tensor([1.0, 1.0]).view(1, 1, 1, 2)
    torch.testing.assert_close(
        math.perpendicular_component(x, torch.tensor([2.0, 0.0]).view(1, 1, 1, 2)),
        torch.tensor([0.0, 1.0]).view(1, 1, 1, 2),
    )
    torch.testing.assert_close(math.perpendicular_component(x, torch.zeros_like(x)), x)


def test_perp_neg_combination_hand_values():
    """e_pos = [2, 0]; negatives' parts orthogonal to it: [0, 1] and [0, -3]; weights -0.5 and 1:
    eps_cond' = [2, 0] - 0.5 [0, 1] + [0, -3] = [2, -3.5]; CFG 7.5 of it = [15, -26.25], which
    is the release's ``uncond + s (e_pos + sum_k w_k perp(e_k, e_pos))``."""
    row = lambda *v: torch.tensor(v).view(1, 1, 1, 2)  # noqa: E731
    cond, uncond = row(2.0, 0.0), row(0.0, 0.0)
    negatives = [row(1.0, 1.0), row(0.0, -3.0)]
    weights = torch.tensor([[-0.5, 1.0]])
    effective = math.perp_neg_conditional(cond, uncond, negatives, weights)
    torch.testing.assert_close(effective, row(2.0, -3.5))
    torch.testing.assert_close(
        math.classifier_free_guidance(effective, uncond, 7.5), row(15.0, -26.25)
    )
    with pytest.raises(ValueError, match="2 negative predictions but 3 weights"):
        math.perp_neg_conditional(cond, uncond, negatives, torch.zeros(1, 3))


def f(a, b, c, r):
    return a * pymath.exp(-b * r) + c


@pytest.mark.parametrize(
    ("azimuth", "elevation", "mix", "ratio", "negatives", "weights"),
    [
        (0.0, 10.0, ("front", "side"), 1.0, ("front", "side"), (f(4, .5, -2.426, 1), f(4, .5, -2.426, 0))),
        (-45.0, 0.0, ("front", "side"), 0.5, ("front", "side"), (f(4, .5, -2.426, .5),) * 2),
        (90.0, 0.0, ("side", "back"), 1.0, ("side", "front"), (f(1, .5, -.606, 1), f(1, .5, .967, 1))),
        (180.0, 30.0, ("side", "back"), 0.0, ("side", "front"), (f(1, .5, -.606, 0), f(1, .5, .967, 0))),
        (315.0, 0.0, ("front", "side"), 0.5, ("front", "side"), (f(4, .5, -2.426, .5),) * 2),
        (120.0, 70.0, ("overhead", "overhead"), 1.0, (None, None), (0.0, 0.0)),
    ],
)  # fmt: skip
def test_release_view_weights(azimuth, elevation, mix, ratio, negatives, weights):
    views = perp_neg_views(
        torch.deg2rad(torch.tensor([azimuth])), torch.deg2rad(torch.tensor([elevation])),
        PerpNegWeights(),
    )  # fmt: skip
    assert views.mix == [mix] and views.negatives == [negatives]
    assert views.ratio.item() == pytest.approx(ratio, abs=1e-6)
    expected = torch.tensor([[-0.5 * w for w in weights]])
    torch.testing.assert_close(views.weights, expected, atol=1e-6, rtol=1e-5)


def test_named_hand_weights():
    """f_fs(1) = 4 e^-0.5 - 2.426 ~ 0 at the front; the side negative there gets -0.5 * 1.574."""
    views = perp_neg_views(torch.zeros(1), torch.zeros(1), PerpNegWeights())
    assert views.weights[0, 0].item() == pytest.approx(-0.5 * 1.2e-4, abs=1e-5)
    assert views.weights[0, 1].item() == pytest.approx(-0.787, abs=1e-6)
    with pytest.raises(ValueError, match=r"f_sb=\[1.0, 0.5\] must be \[a, b, c\]"):
        PerpNegWeights(f_sb=[1.0, 0.5])


# ----------------------------------------------------------------------------- distillers
class RecordingPrior:
    """eps = tagged(x, tag of the condition) + t/1000; records the rows of every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, condition):
        self.calls.append((x.shape[0], t.clone(), condition.tokens.clone()))
        return tagged(x, condition.tokens.view(-1, 1, 1, 1)) + t.view(-1, 1, 1, 1) / 1000


def tagged(x, tag):
    """Non-linear in the tag, so the branches' differences are not parallel."""
    return 0.5 * x + tag + 0.1 * tag**2 * x**2


def conditions(batch, perp_neg=True, weights=None):
    """Tokens are one number per row that tags the branch: 1 cond, 0 uncond, 2 / -1 negatives."""
    off = torch.zeros(batch, dtype=torch.bool)
    texts = tuple(f"p{i}" for i in range(batch))

    def condition(tag, flags=off):
        return Condition(texts, flags, None, tokens=torch.full((batch, 1, 1), float(tag)))

    extra = None
    if perp_neg:
        weights = weights if weights is not None else torch.tensor([[-0.3, -0.8]]).repeat(batch, 1)
        extra = PerpNegConditions((condition(2.0), condition(-1.0)), weights)
    return ConditionPair(condition(1.0), condition(0.0, ~off), extra)


def schedules():
    return {"t_min": lambda f: 20.0, "t_max": lambda f: 980.0}


DISTILLERS = {
    "sds": (lambda: SDSDistiller(100.0, **schedules()), 4),
    "csd": (lambda: CSDDistiller(1.0, **schedules()), 4),
    "asd": (lambda: ASDDistiller(7.5, eta=0.1, **schedules()), 5),
}


@pytest.mark.parametrize("name", DISTILLERS)
def test_one_prior_call_with_all_perp_neg_rows(name):
    make, blocks = DISTILLERS[name]
    prior = RecordingPrior()
    z = torch.randn(3, 4, 4, 4)
    make()(z, conditions(3), prior, ddpm_alphas_cumprod(), 0.3, generator=torch.Generator())
    assert len(prior.calls) == 1
    rows, t, tags = prior.calls[0]
    assert rows == blocks * 3
    expected_tags = [1.0, 0.0, 2.0, -1.0] + ([1.0] if name == "asd" else [])
    assert tags.view(blocks, 3)[:, 0].tolist() == expected_tags
    if name == "asd":  # the shifted block is last and the only one at t + dt
        assert (t[12:] >= t[:3]).all() and torch.equal(t[:3], t[3:6])


@pytest.mark.parametrize("name", DISTILLERS)
def test_switched_off_or_zero_weights_give_the_old_update(name):
    make, _ = DISTILLERS[name]
    z = torch.randn(3, 4, 4, 4)

    def run(pair):
        alphas, rng = ddpm_alphas_cumprod(), torch.Generator().manual_seed(0)
        return make()(z, pair, RecordingPrior(), alphas, 0.3, generator=rng).grad

    old = run(conditions(3, perp_neg=False))
    torch.testing.assert_close(run(conditions(3, weights=torch.zeros(3, 2))), old)
    assert not torch.allclose(run(conditions(3)), old)


def test_asd_update_with_perp_neg_by_hand():
    g = torch.Generator().manual_seed(4)
    z, eps = torch.randn(2, 2, 4, 4, 4, generator=g)
    t = torch.tensor([600, 900])
    alphas = ddpm_alphas_cumprod()
    d = ASDDistiller(7.5, eta=0.1, shift_mode="deterministic", **schedules())
    grad, t_shifted = d.gradient(z, t, eps, conditions(2), RecordingPrior(), alphas, 500, 1, None)
    torch.testing.assert_close(t_shifted, t + torch.tensor([10, 40]))
    abar = gather_abar(alphas, t)
    x_t = math.add_noise(z, eps, abar)
    x_s = math.add_noise(z, eps, gather_abar(alphas, t_shifted))
    time = t.view(-1, 1, 1, 1) / 1000
    cond, uncond, neg_a, neg_b = (tagged(x_t, tag) + time for tag in (1.0, 0.0, 2.0, -1.0))
    e_pos = cond - uncond
    guided = uncond + 7.5 * (
        e_pos
        - 0.3 * math.perpendicular_component(neg_a - uncond, e_pos)
        - 0.8 * math.perpendicular_component(neg_b - uncond, e_pos)
    )
    shifted = tagged(x_s, 1.0) + t_shifted.view(-1, 1, 1, 1) / 1000
    torch.testing.assert_close(grad, (1 - abar) * (guided - shifted))


# ----------------------------------------------------------------------------- SD prior
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield save_tiny_sd(tmp_path_factory.mktemp("tiny_sd_perp_neg"))
    torch.set_num_threads(threads)


def sd_prior(path, **kwargs):
    from asd3d.prior.stable_diffusion import StableDiffusionPrior

    options = {"text_dim": TEXT_DIM, "resolution": RESOLUTION, "dtype": "fp32", **kwargs}
    return StableDiffusionPrior(pretrained=str(path), **options)


def cameras(azimuth_deg, elevation_deg, views):
    n = len(azimuth_deg)
    return Cameras(
        c2w=torch.eye(4).expand(n, 4, 4).clone(),
        fovy=torch.full((n,), 0.9),
        elevation=torch.deg2rad(torch.tensor(elevation_deg)),
        azimuth=torch.deg2rad(torch.tensor(azimuth_deg)),
        distance=torch.full((n,), 1.5),
        views_per_prompt=views,
    )


def test_sd_prior_perp_neg_conditions(tiny_dir):
    prior = sd_prior(tiny_dir, perp_neg=True)
    prompts = PromptBatch(ids=torch.arange(2), texts=("a red cube", "a blue cone"))
    pair = prior.condition(prompts, cameras([45.0, 180.0, 0.0, 100.0], [0.0, 0.0, 75.0, 10.0], 2))
    assert pair.perp_neg is not None and len(pair.perp_neg.negatives) == 2
    encoded = lambda texts: prior.encode_text(texts).tokens  # noqa: E731
    front, side, back, overhead = encoded(
        [f"a red cube, {v} view" for v in ("front", "side", "back", "overhead")]
    )
    # row 0: 45° -> halfway front/side; row 1: back; row 2 (prompt 2): overhead.
    torch.testing.assert_close(pair.positive.tokens[0], 0.5 * front + 0.5 * side)
    torch.testing.assert_close(pair.positive.tokens[1], back)
    torch.testing.assert_close(pair.perp_neg.negatives[0].tokens[0], front)
    torch.testing.assert_close(pair.perp_neg.negatives[1].tokens[1], front)
    torch.testing.assert_close(pair.perp_neg.negatives[0].tokens[1], side)
    cone_overhead = encoded(["a blue cone, overhead view"])[0]
    torch.testing.assert_close(pair.positive.tokens[2], cone_overhead)
    empty = encoded([""])[0]
    torch.testing.assert_close(pair.perp_neg.negatives[0].tokens[2], empty)
    assert pair.perp_neg.weights[2].abs().max() == 0
    assert not pair.perp_neg.negatives[0].unconditional.any()
    # Off (the default): no negatives, the discrete view prompts of before.
    plain = sd_prior(tiny_dir).condition(prompts, cameras([45.0, 180.0, 0.0, 100.0], [0.0] * 4, 2))
    assert plain.perp_neg is None
    torch.testing.assert_close(plain.positive.tokens[1], back)


def test_perp_neg_needs_view_prompts(tiny_dir):
    with pytest.raises(ValueError, match="perp_neg=true needs prior.view_dependent_prompting"):
        sd_prior(tiny_dir, perp_neg=True, view_dependent_prompting=False)
