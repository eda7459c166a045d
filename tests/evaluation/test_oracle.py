"""Oracle metrics of the procedural world against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from asd3d.evaluation.oracle import (
    PSNR_MAX_DB,
    OracleMetrics,
    mask_iou,
    oracle_retrieval,
    prompt_oracle_scores,
    psnr,
    retrieval_mse,
    retrieves_own,
)


def test_psnr_identical_images_is_capped():
    image = torch.rand(2, 3, 8, 8)
    assert torch.equal(psnr(image, image.clone()), torch.full((2,), PSNR_MAX_DB))
    assert PSNR_MAX_DB == 100.0


def test_psnr_constant_offset_matches_hand_value():
    target = torch.rand(3, 3, 5, 7) * 0.8
    offsets = torch.tensor([0.1, 0.01, 0.5]).view(3, 1, 1, 1)
    # MSE = offset^2, so PSNR = -20 log10(offset): 20, 40 and 6.0206 dB.
    expected = torch.tensor([20.0, 40.0, -20 * math.log10(0.5)])
    torch.testing.assert_close(psnr(target + offsets, target), expected, atol=1e-3, rtol=0)


def test_psnr_half_precision_input():
    target = torch.zeros(1, 3, 4, 4, dtype=torch.bfloat16)
    value = psnr(target + 0.25, target)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, torch.tensor([-20 * math.log10(0.25)]))


def test_psnr_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))


def _mask(rows):
    return torch.tensor(rows, dtype=torch.float32).view(1, 1, len(rows), len(rows[0]))


def test_mask_iou_hand_cases():
    pred = _mask([[1, 1, 0], [0, 0, 0]])
    target = _mask([[0, 1, 1], [0, 0, 0]])
    assert mask_iou(pred, target).item() == pytest.approx(1 / 3)  # 1 shared of 3 covered
    assert mask_iou(pred, pred).item() == 1.0
    assert mask_iou(pred, _mask([[0, 0, 1], [1, 1, 1]])).item() == 0.0


def test_mask_iou_both_empty_is_one():
    empty = torch.zeros(2, 1, 4, 4)
    assert torch.equal(mask_iou(empty, empty), torch.ones(2))
    full = torch.ones(2, 1, 4, 4)
    assert torch.equal(mask_iou(empty, full), torch.zeros(2))


def test_mask_iou_threshold_is_strict():
    half = torch.full((1, 1, 2, 2), 0.5)
    full = torch.ones(1, 1, 2, 2)
    assert mask_iou(half, full).item() == 0.0  # 0.5 is not > 0.5
    assert mask_iou(half, full, threshold=0.4).item() == 1.0


def _world(num_prompts=5, views=4, size=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(num_prompts, views, 3, size, size, generator=generator)


def test_retrieval_picks_own_prompt():
    gt = _world()
    for own in range(gt.shape[0]):
        render = (gt[own] + 0.05 * torch.randn_like(gt[own])).clamp(0, 1)
        assert oracle_retrieval(render, gt, own).all()
        assert not oracle_retrieval(render, gt, (own + 1) % gt.shape[0]).any()


def test_retrieval_per_view():
    gt = _world()
    render = gt[2].clone()
    render[1] = gt[4, 1]  # view 1 looks exactly like prompt 4 from that camera
    assert oracle_retrieval(render, gt, own=2).tolist() == [True, False, True, True]


def test_retrieval_ties_count_as_misses_whatever_the_order():
    gt = _world()
    gt[3, 0] = gt[1, 0]  # prompts 1 and 3 share a ground truth at view 0
    render = gt[1].clone()
    assert oracle_retrieval(render, gt, own=1).tolist() == [False, True, True, True]
    reordered = gt[[3, 0, 2, 1, 4]]  # the same tie with prompt 1 placed after prompt 3
    assert oracle_retrieval(render, reordered, own=3).tolist() == [False, True, True, True]
    # A blank render equally far from two identical blank scenes retrieves neither.
    blank = torch.zeros(2, 1, 3, 4, 4)
    assert not oracle_retrieval(torch.zeros(1, 3, 4, 4), blank, own=0).any()


def test_retrieval_single_prompt_and_bad_index():
    gt = _world(num_prompts=1)
    assert oracle_retrieval(torch.zeros(4, 3, 6, 6), gt, 0).all()
    with pytest.raises(IndexError):
        oracle_retrieval(torch.zeros(4, 3, 6, 6), gt, 1)


def test_retrieval_mse_chunks_concatenate():
    gt = _world(num_prompts=7)
    render = torch.rand(4, 3, 6, 6)
    whole = retrieval_mse(render, gt)
    chunked = torch.cat([retrieval_mse(render, gt[:3]), retrieval_mse(render, gt[3:])])
    assert whole.shape == (7, 4)
    assert torch.equal(whole, chunked)
    torch.testing.assert_close(whole[5, 2], (render[2] - gt[5, 2]).square().mean())
    assert torch.equal(retrieves_own(whole, 5), oracle_retrieval(render, gt, 5))


def test_prompt_oracle_scores():
    gt = _world()
    gt_opacity = torch.ones(4, 1, 6, 6)
    rgb = gt[0].clone()
    rgb[3] = gt[1, 3]
    opacity = gt_opacity.clone()
    opacity[:2] = 0.0
    scores = prompt_oracle_scores(rgb, opacity, gt, gt_opacity, own=0)
    assert scores.r_at_1.item() == pytest.approx(0.75)
    assert scores.mask_iou.item() == pytest.approx(0.5)
    expected_psnr = psnr(rgb, gt[0]).mean()
    assert scores.psnr.item() == pytest.approx(expected_psnr.item())
    assert scores.psnr.item() > 75  # three views at the cap, one far off


def _per_prompt(num_prompts=10, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.rand(num_prompts, generator=generator),
        torch.rand(num_prompts, generator=generator) * 40,
        torch.rand(num_prompts, generator=generator),
    )


def test_oracle_metrics_means():
    r1, p, iou = _per_prompt()
    metric = OracleMetrics()
    metric.update(r1[:4], p[:4], iou[:4])
    metric.update(r1[4:], p[4:], iou[4:])
    out = metric.compute()
    assert set(out) == {"oracle_r1", "psnr", "mask_iou"}
    torch.testing.assert_close(out["oracle_r1"], r1.mean())
    torch.testing.assert_close(out["psnr"], p.mean())
    torch.testing.assert_close(out["mask_iou"], iou.mean())


def test_oracle_metrics_sharded_equals_unsharded():
    r1, p, iou = _per_prompt(num_prompts=11)
    whole = OracleMetrics()
    whole.update(r1, p, iou)
    expected = whole.compute()
    # Two "ranks" with uneven shards (6 and 5 prompts), merged as DDP's sum-reduction would.
    rank0, rank1 = OracleMetrics(), OracleMetrics()
    rank0.update(r1[::2], p[::2], iou[::2])
    rank1.update(r1[1::2], p[1::2], iou[1::2])
    rank0.merge_state(rank1)
    merged = rank0.compute()
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key])


def test_oracle_metrics_distributed_sync_path():
    # torchmetrics' own DDP path (all-gather every state, then reduce) with a fake two-rank
    # all-gather, so the real reduction functions run without starting processes.
    r1, p, iou = _per_prompt(num_prompts=9)
    whole = OracleMetrics()
    whole.update(r1, p, iou)
    other_rank = OracleMetrics()
    other_rank.update(r1[5:], p[5:], iou[5:])
    states: dict[int, torch.Tensor] = {}
    gathered = []

    def all_gather(tensor, group=None):
        gathered.append(tensor)
        return [tensor, states[id(tensor)]]

    rank0 = OracleMetrics(dist_sync_fn=all_gather, distributed_available_fn=lambda: True)
    rank0.update(r1[:5], p[:5], iou[:5])
    states.update({id(getattr(rank0, n)): getattr(other_rank, n) for n in rank0._reductions})
    synced = rank0.compute()
    assert len(gathered) == 4  # every state went through the all-gather
    for key, value in whole.compute().items():
        torch.testing.assert_close(synced[key], value)


def test_oracle_metrics_reset_and_validation():
    metric = OracleMetrics()
    metric.update(torch.tensor([1.0]), torch.tensor([30.0]), torch.tensor([1.0]))
    metric.reset()
    metric.update(torch.tensor([0.0, True]), torch.tensor([10.0, 20.0]), torch.tensor([0.5, 0.5]))
    assert metric.compute()["psnr"].item() == pytest.approx(15.0)
    with pytest.raises(ValueError, match="one value per prompt"):
        metric.update(torch.ones(2), torch.ones(3), torch.ones(2))


def test_best_matching_variant_scores_any_valid_scene_as_the_scene_itself():
    from asd3d.evaluation.oracle import best_matching_variants, take_variants

    g = torch.Generator().manual_seed(0)
    variants = torch.rand(4, 3, 2, 3, 5, 5, generator=g)  # Q=4 prompts, K=3 scenes, V=2 views
    render = torch.stack([variants[1, 2, 0], variants[1, 0, 1]])  # prompt 1, a scene per view
    index = best_matching_variants(render, variants)
    assert index[1].tolist() == [2, 0]
    matched = take_variants(variants, index)
    assert matched.shape == (4, 2, 3, 5, 5)
    assert oracle_retrieval(render, matched, own=1).all()
    assert (psnr(render, matched[1]) == 100.0).all()
    # Against the canonical scene alone, the same render would not retrieve its prompt.
    assert not oracle_retrieval(render, variants[:, 0], own=1).all()
    with pytest.raises(ValueError, match="Q x K x V"):
        best_matching_variants(render, variants[:, :, :1])
