"""The LightningModule on the real (shrunk) configs: gradients, checkpoints, sharding."""

import pytorch_lightning as pl
import torch

from asd3d.build import build_system

from conftest import bare_trainer


class GradientProbe(pl.Callback):
    def __init__(self):
        self.generator_grads = None

    def on_after_backward(self, trainer, pl_module):
        self.generator_grads = [
            p.grad is not None and p.grad.abs().sum() > 0
            for p in pl_module.generator.parameters()
            if p.requires_grad
        ]


def fit(system, steps=1, callbacks=()):
    trainer = bare_trainer(steps, callbacks=list(callbacks))
    trainer.fit(system)
    return trainer


def test_gradient_reaches_generator_never_prior(tiny_cfg):
    system = build_system(tiny_cfg, {})
    prior_params = set(map(id, system.prior.parameters()))
    assert not prior_params & set(map(id, system.parameters())), "prior inside the trained module"
    assert not [k for k in system.state_dict() if k.startswith("prior")]
    probe = GradientProbe()
    fit(system, callbacks=[probe])
    assert probe.generator_grads and sum(probe.generator_grads) / len(probe.generator_grads) > 0.5
    assert all(p.grad is None for p in system.prior.parameters())


def test_training_changes_generator_and_is_seeded(tiny_cfg):
    a, b = build_system(tiny_cfg, {}), build_system(tiny_cfg, {})
    b.load_state_dict(a.state_dict())
    before = [p.detach().clone() for p in a.generator.parameters()]
    pl.seed_everything(0)
    fit(a, steps=2)
    pl.seed_everything(0)
    fit(b, steps=2)
    changed = any(not torch.equal(x, y) for x, y in zip(before, a.generator.parameters()))
    assert changed
    for x, y in zip(a.generator.parameters(), b.generator.parameters()):
        torch.testing.assert_close(x, y)


def test_prompts_are_sharded_per_rank(tiny_cfg):
    system = build_system(tiny_cfg, {})
    seen = []
    for rank in range(2):
        system._rank_and_world = lambda rank=rank: (rank, 2)
        seen.append({i for batch in system.train_dataloader() for i in batch.ids.tolist()})
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(4))
    val = [{i for batch in _val(system, r) for i in batch.ids.tolist()} for r in range(2)]
    assert val[0].isdisjoint(val[1]) and len(val[0]) + len(val[1]) == 4


def _val(system, rank):
    system._rank_and_world = lambda: (rank, 2)
    return system.val_dataloader()
