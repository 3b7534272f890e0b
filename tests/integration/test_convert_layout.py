"""Reshard-on-convert (``convert(..., layout=, rules=)``) against load-with-resharding.

A small Megatron-style model (vocab-parallel embedding, fused QKV with GQA, column/row-parallel
weights, replicated norms, pipeline-renumbered layers) is stored as global tensors (no layout),
then converted with a ``tp=2, pp=2`` layout. Every rank of that layout (threads as ranks) loads
its local tensors from both checkpoints; both must equal the slices cut here by hand. From the
converted checkpoint every rank reads whole chunks only and exactly the bytes it needs; from
the unsharded one it reads more.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt._comm import ThreadGroup
from ckpt._read import stored_chunks
from ckpt._plan_load import plan_load
from ckpt.convert import convert
from ckpt.layout import Layout
from ckpt.rules import Fused, Pipeline, Replicated, Rules, Split, Vocab

VOCAB, H, LAYERS, Q, KV, HD, FFN = 50, 8, 4, 4, 2, 3, 12
RULES = Rules(
    renames=(Pipeline(r"model\.layers\.(?P<layer>\d+)\..+", axis="pp", layers=LAYERS),),
    shards=(
        Vocab(r"model\.embed\.weight", size=VOCAB, pad_to_multiple=4),
        Fused(r"model\.layers\.\d+\.qkv\.weight", dim=0, parts=(("q", Q), ("k", KV), ("v", KV)), unit=HD),
        Split(r"model\.layers\.\d+\.up\.weight", dim=0),
        Split(r"model\.layers\.\d+\.down\.weight", dim=1),
        Replicated(r"model\.layers\.\d+\.norm\.weight|step_count"),
    ),
    name="convert-test",
)
LAYOUT = Layout.grid(tp=2, pp=2)


def logical() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    out = {"model.embed.weight": torch.randn(VOCAB, H, generator=g)}
    for i in range(LAYERS):
        out[f"model.layers.{i}.qkv.weight"] = torch.randn((Q + 2 * KV) * HD, H, generator=g).to(torch.bfloat16)
        out[f"model.layers.{i}.up.weight"] = torch.randn(FFN, H, generator=g)
        out[f"model.layers.{i}.down.weight"] = torch.randn(H, FFN, generator=g)
        out[f"model.layers.{i}.norm.weight"] = torch.randn(H, generator=g)
    out["step_count"] = torch.tensor(7)
    return out


def local_state(rank: int, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s tensors, cut by hand (Megatron conventions, independent of ckpt.rules)."""
    coords = LAYOUT.with_rank(rank).coords
    tp, pp = coords["tp"], coords["pp"]
    per = 28  # vocab 50 padded to a multiple of 4 x 2 = 56 rows, 28 per rank
    emb = torch.zeros(per, H)
    real = full["model.embed.weight"][tp * per : (tp + 1) * per]
    emb[: real.shape[0]] = real
    out = {"model.embed.weight": emb, "step_count": full["step_count"]}
    for local in range(LAYERS // 2):
        g = pp * (LAYERS // 2) + local
        qkv = full[f"model.layers.{g}.qkv.weight"]
        q, k, v = qkv[: Q * HD], qkv[Q * HD : (Q + KV) * HD], qkv[(Q + KV) * HD :]
        half_q, one = Q // 2 * HD, HD
        out[f"model.layers.{local}.qkv.weight"] = torch.cat([q[tp * half_q : (tp + 1) * half_q], k[tp * one : (tp + 1) * one], v[tp * one : (tp + 1) * one]])
        out[f"model.layers.{local}.up.weight"] = full[f"model.layers.{g}.up.weight"][tp * 6 : (tp + 1) * 6]
        out[f"model.layers.{local}.down.weight"] = full[f"model.layers.{g}.down.weight"][:, tp * 6 : (tp + 1) * 6]
        out[f"model.layers.{local}.norm.weight"] = full[f"model.layers.{g}.norm.weight"]
    return out


def load_all(url: str, full: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    group, results, errors = ThreadGroup(LAYOUT.world_size), [None] * LAYOUT.world_size, []

    def rank_main(r: int) -> None:
        try:
            state = {k: torch.full_like(v, 9) for k, v in local_state(r, full).items()}
            ckpt.load(state, url, layout=LAYOUT.with_rank(r), rules=RULES, comm=group.comm(r))
            results[r] = state
        except Exception as e:  # reported below
            errors.append((r, e))

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(LAYOUT.world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results  # type: ignore[return-value]


def read_plan(url: str, rank: int, full: dict[str, torch.Tensor]) -> Any:
    _, manifest = ckpt.open_manifest(url)
    local = {k: tuple(v.shape) for k, v in local_state(rank, full).items()}
    mappings = RULES.resolve(local, LAYOUT.with_rank(rank))
    names = sorted({p.name for m in mappings.values() for p in m.pieces})
    return plan_load(stored_chunks(manifest, names), mappings)


def test_reshard_on_convert_matches_load_with_resharding(tmp_path: Path) -> None:
    full = logical()
    src, out = str(tmp_path / "global"), str(tmp_path / "tp2pp2")
    ckpt.save(full, src, step=3)
    report = convert(src, out, dst_format="universal", layout="tp=2,pp=2", rules=RULES)
    assert not report.warnings, report.warnings
    _, manifest = ckpt.open_manifest(out)
    assert manifest.step == 3 and manifest.world_size == 4
    assert manifest.layout["axes"] == [["pp", 2], ["tp", 2]] and manifest.layout["rules"]["name"] == "convert-test"
    assert len(manifest.tensors["model.layers.0.qkv.weight"].chunks) == 6, "q, k, v regions of each of 2 tp ranks"
    assert [c.order for c in manifest.tensors["model.layers.1.down.weight"].chunks] == [(1, 0), (1, 0)], "split dim stored outermost"
    assert len(manifest.tensors["model.embed.weight"].chunks) == 2
    from_src, from_out = load_all(src, full), load_all(out, full)
    for r in range(LAYOUT.world_size):
        want = local_state(r, full)
        for name, t in want.items():
            assert torch.equal(from_out[r][name], t), (r, name)
            assert torch.equal(from_src[r][name], t), (r, name)
    for r in range(LAYOUT.world_size):
        plan = read_plan(out, r, full)
        assert all(op.whole for op in plan.reads), f"rank {r} reads part of a chunk"
        assert plan.bytes_read == plan.bytes_needed, f"rank {r} reads {plan.bytes_read} bytes for {plan.bytes_needed}"
    assert sum(read_plan(src, r, full).bytes_read for r in range(4)) > sum(read_plan(out, r, full).bytes_read for r in range(4))
    assert ckpt.verify(out).ok
    convert(out, str(tmp_path / "export.safetensors"))  # back to global tensors, e.g. for an HF export
    from ckpt.convert import diff

    assert diff(src, str(tmp_path / "export.safetensors")).equal


def test_layout_problems_are_reported(tmp_path: Path) -> None:
    full = logical()
    full["model.extra.weight"] = torch.ones(3)
    torch.save(full, tmp_path / "g.pt")
    report = convert(str(tmp_path / "g.pt"), str(tmp_path / "u"), dst_format="universal", layout=LAYOUT, rules=RULES)
    assert any("model.extra.weight" in w and "stored whole" in w for w in report.warnings)
    with pytest.raises(ValueError, match="universal"):
        convert(str(tmp_path / "g.pt"), str(tmp_path / "x.safetensors"), layout=LAYOUT, rules=RULES)
    bad = Rules(shards=(Split(r".*", dim=0),), name="bad")
    with pytest.raises(ValueError, match="does not split evenly over tp=4"):
        convert(str(tmp_path / "g.pt"), str(tmp_path / "u2"), dst_format="universal", layout="tp=4", rules=bad)
    assert not (tmp_path / "u2").exists()


def test_cli_layout_with_a_rules_file(tmp_path: Path) -> None:
    import contextlib
    import io
    import json

    from ckpt.cli import main

    torch.save(logical(), tmp_path / "g.pt")
    (tmp_path / "rules.json").write_text(json.dumps(RULES.to_json()))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["convert", str(tmp_path / "g.pt"), str(tmp_path / "u"), "--to", "universal", "--layout", "tp=2,pp=2",
                     "--rules", str(tmp_path / "rules.json"), "--json"])
        assert code == 0, err.getvalue()
        bad = main(["convert", str(tmp_path / "g.pt"), str(tmp_path / "v"), "--to", "universal", "--layout", "tp=x", "--rules", "ddp"])
    assert bad == 2 and "AXIS=SIZE" in err.getvalue()
    _, manifest = ckpt.open_manifest(str(tmp_path / "u"))
    assert manifest.world_size == 4 and len(manifest.tensors["model.layers.0.up.weight"].chunks) == 2
