"""Two CPU processes (gloo) train one DDP model on different data: with the controller's reductions
every rank takes the same decisions and the banks stay bit-identical; without them they diverge."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
STEPS = 14


def _config(birth, death):
    from gsa_core.config import GSAConfig

    return GSAConfig.from_dict({
        "seed": 3,
        "bank": {"n_splats": 8, "min_alive": 2},
        "backend": "dense",
        "adaptation": {"enabled": True, "window": 4,
                       "scheduler": {"name": "interval", "params": {"start": 3, "every": 3}},
                       "death": death, "birth": birth},
    })


CASES = {
    "relocate": ("relocate", {"name": "low-mass", "params": {"relative_threshold": 0.7}}),
    "coverage": ({"name": "coverage", "params": {"radius": 0.3, "relative_radius": None}},
                 {"name": "low-mass", "params": {"relative_threshold": 0.7}}),
}


def _train(rank: int, case: str, synchronize: bool) -> dict[str, torch.Tensor]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gsa_core.adaptation import AdaptationController
    from gsa_core.attention import GSAAttention
    from gsa_core.masks import MaskSpec

    cfg = _config(*CASES[case])
    torch.manual_seed(0)  # identical initial model on every rank
    layer = GSAAttention(2, 4, cfg)
    model = DDP(layer, broadcast_buffers=False)  # `alive` is never copied between ranks: decisions must agree
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    ctl = AdaptationController(model, cfg, opt, grace_steps=0, stats_every=1, synchronize=synchronize)
    births = 0
    for step in range(STEPS):
        g = torch.Generator().manual_seed(1000 * rank + step)  # different data on each rank
        q, k, v = (torch.randn(2, 2, 10, 4, generator=g) * (1 + rank) for _ in range(3))
        loss = (model(q, k, v, MaskSpec(causal=True)) - v).square().mean()
        loss.backward()
        ctl.after_backward(step)
        opt.step()
        report = ctl.step(step)
        births += report.births if report else 0
        opt.zero_grad()
    ctl.remove_hooks()
    out = {k: v.detach().clone() for k, v in layer.bank.state_dict().items()}
    out["births"] = torch.tensor(births)
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        results = {f"{case}/{sync}": _train(rank, case, sync) for case in CASES for sync in (True, False)}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed with gloo")
def test_ranks_take_identical_decisions(tmp_path: Path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    for case in CASES:
        synced0, synced1 = r0[f"{case}/True"], r1[f"{case}/True"]
        assert int(synced0["births"]) > 0, f"{case}: no births happened, the test proves nothing"
        for key in synced0:
            assert torch.equal(synced0[key], synced1[key]), f"{case}: ranks differ in {key} after several refines"
        # the negative control: deciding on local statistics makes the ranks diverge
        local0, local1 = r0[f"{case}/False"], r1[f"{case}/False"]
        assert any(not torch.equal(local0[k], local1[k]) for k in local0 if k != "births"), (
            f"{case}: ranks agreed even without synchronisation, so the test cannot see a broken reduction")
