"""Target-driven loads (``layout=``/``rules=``) into stateful objects: an object whose
``state_dict()`` returns fresh tensors each call gets the loaded values, and a fresh optimizer
(no state yet) gets its moments, as with a plain load; a failed load leaves it as it was."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt.errors import StateMismatchError
from ckpt.layout import Layout
from ckpt.rules import Replicated, Rules

EVERYTHING = Rules(shards=(Replicated(pattern=r".+"),), name="all-replicated")


class FreshTensors:
    """Like the hook's RNG state: every ``state_dict()`` builds new tensors."""

    def __init__(self, value: float) -> None:
        self.value = torch.full((4,), value)

    def state_dict(self) -> dict[str, Any]:
        return {"v": self.value.clone(), "n": int(self.value[0])}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.value = sd["v"].clone()


def _model_and_opt(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    m = torch.nn.Linear(6, 3)
    return m, torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.1)


@pytest.mark.parametrize("layout", [None, Layout.single()])
def test_object_returning_fresh_tensors_is_restored(tmp_path: Path, layout: Any) -> None:
    ckpt.save({"obj": FreshTensors(7.0)}, str(tmp_path), step=1)
    target = FreshTensors(0.0)
    ckpt.load({"obj": target}, str(tmp_path), layout=layout, rules=EVERYTHING if layout else None)
    assert torch.equal(target.value, torch.full((4,), 7.0))


def test_fresh_optimizer_gets_its_state_through_rules(tmp_path: Path) -> None:
    m, o = _model_and_opt(0)
    for _ in range(3):
        o.zero_grad()
        m(torch.randn(5, 6)).square().mean().backward()
        o.step()
    ckpt.save({"model": m, "optim": o}, str(tmp_path), step=3)

    m2, o2 = _model_and_opt(1)
    assert not o2.state
    ckpt.load({"model": m2, "optim": o2}, str(tmp_path), layout=Layout.single(), rules=EVERYTHING)
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p, q)
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(o.state[p][k], o2.state[q][k]), k
    # the next step is the same
    x = torch.randn(5, 6)
    for mm, oo in ((m, o), (m2, o2)):
        oo.zero_grad()
        mm(x).square().mean().backward()
        oo.step()
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), m2.parameters()))


def test_failed_load_leaves_a_fresh_optimizer_without_state(tmp_path: Path) -> None:
    m, o = _model_and_opt(0)
    o.zero_grad()
    m(torch.randn(5, 6)).square().mean().backward()
    o.step()
    ckpt.save({"model": m, "optim": o}, str(tmp_path), step=1)
    bigger = torch.nn.Linear(6, 4)  # shapes differ: the load fails
    o2 = torch.optim.AdamW(bigger.parameters(), lr=0.01)
    before = [p.detach().clone() for p in bigger.parameters()]
    with pytest.raises(StateMismatchError):
        ckpt.load({"model": bigger, "optim": o2}, str(tmp_path), layout=Layout.single(), rules=EVERYTHING)
    assert not o2.state
    assert all(torch.equal(a, b) for a, b in zip(before, bigger.parameters()))
