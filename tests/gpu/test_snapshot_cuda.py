"""The CUDA path of the snapshot engine: pinned slots, a side stream, events. Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ckpt.snapshot import PinnedBuffers, SnapshotEngine, restore_from_snapshot

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DEADLINE = 120.0


def test_pinned_buffers_are_pinned_and_prefaulted() -> None:
    bufs = PinnedBuffers()
    a = bufs.allocate(0, 1 << 20)
    assert a.size >= 1 << 20
    assert bufs.as_tensor(0).is_pinned()
    assert bufs.as_tensor(0).data_ptr() == a.ctypes.data
    bufs.close()
    assert bufs.memory_bytes == 0


def test_cuda_snapshot_holds_pre_step_values_and_guard_orders_streams() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)]).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    x = torch.randn(64, 1024, device="cuda")
    model(x).square().mean().backward()
    opt.step()
    state = {"model": model, "optim": opt, "view": model[0].weight.t()}
    expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    with SnapshotEngine(state, buffers=PinnedBuffers()) as engine:
        engine.register_guard(opt)
        for _ in range(3):
            expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            assert engine.snapshot(1)
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()  # the guard makes the compute stream wait for the side stream's copies
            engine.wait(timeout=DEADLINE)
            with engine.latest_complete() as snap:
                for k, v in expected.items():
                    assert torch.equal(snap.tensor(f"model.{k}"), v), k
                assert torch.equal(snap.tensor("view"), expected["0.weight"].t())
                assert snap.verify() == []
        torch.cuda.synchronize()
        fresh = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)]).cuda()
        with engine.latest_complete() as snap:
            restore_from_snapshot({"model": fresh}, snap)
        for k, v in expected.items():
            assert torch.equal(fresh.state_dict()[k].cpu(), v)


def test_mixed_cpu_and_cuda_tensors() -> None:
    state = {"gpu": torch.arange(1000, device="cuda", dtype=torch.float32), "cpu": np.arange(10), "step": 3}
    with SnapshotEngine(state, buffers=PinnedBuffers()) as engine:
        engine.snapshot(3)
        engine.wait_for(state["gpu"], timeout=DEADLINE)
        state["gpu"].add_(1)  # ordered after the copy on the compute stream
        engine.wait(timeout=DEADLINE)
        with engine.latest_complete() as snap:
            assert torch.equal(snap.tensor("gpu"), torch.arange(1000, dtype=torch.float32))
            assert snap.tensor("cpu").tolist() == list(range(10))
