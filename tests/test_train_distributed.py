"""Data parallelism: sharding, identity without torchrun, and 2-process gradients equal to 1-process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from gsa_train.distributed import DataParallel


def test_single_process_is_identity():
    dp = DataParallel.from_env({})
    assert (dp.rank, dp.world_size, dp.is_main, dp.active) == (0, 1, True, False)
    x = torch.arange(6)
    assert torch.equal(dp.shard(x), x)
    assert dp.mean(3.0) == 3.0
    model = torch.nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    g = model.weight.grad.clone()
    dp.average_gradients(model)
    assert torch.equal(model.weight.grad, g)


def test_shards_cover_the_batch_once():
    x = torch.arange(12)
    parts = [DataParallel(rank=r, world_size=3).shard({"ids": x, "rows": list(range(12))}) for r in range(3)]
    assert torch.equal(torch.cat([p["ids"] for p in parts]), x)
    assert [r for p in parts for r in p["rows"]] == list(range(12))


def test_bad_sizes_and_environment_are_clear_errors():
    with pytest.raises(ValueError, match="not divisible"):
        DataParallel(rank=0, world_size=2).shard(torch.arange(3))
    with pytest.raises(ValueError, match="inconsistent"):
        DataParallel.from_env({"WORLD_SIZE": "2", "RANK": "5"})
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        DataParallel.from_env({"WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(ValueError, match="integer"):
        DataParallel.from_env({"WORLD_SIZE": "two"})


WORKER = textwrap.dedent("""
    import sys, torch
    from gsa_train.distributed import DataParallel

    def grads(dp):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        dp.broadcast_parameters(model)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(6, 4, generator=g), torch.randn(6, 1, generator=g)
        xs, ys = dp.shard(x), dp.shard(y)
        torch.nn.functional.mse_loss(model(xs), ys).backward()
        dp.average_gradients(model)
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    with DataParallel.from_env() as dp:
        g = grads(dp)
        assert dp.mean(float(dp.rank)) == (dp.world_size - 1) / 2
        if dp.is_main:
            torch.save(g, sys.argv[1])
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path, *args: str, nproc: int = 2, timeout: float = 120) -> None:
    """Run ``torchrun ARGS`` (a script or ``-m module``, then its arguments) with ``nproc`` CPU processes."""
    exe = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    cmd = [exe, "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow  # torchrun start-up; tests/test_train_cli.py checks the same agreement on a model by default
def test_two_processes_average_to_the_full_batch_gradient(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    torchrun(tmp_path, str(script), str(tmp_path / "g2.pt"))
    subprocess.run([sys.executable, str(script), str(tmp_path / "g1.pt")], check=True, env={
        k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")})
    g1, g2 = torch.load(tmp_path / "g1.pt"), torch.load(tmp_path / "g2.pt")
    assert torch.allclose(g1, g2, atol=1e-6, rtol=1e-5)
