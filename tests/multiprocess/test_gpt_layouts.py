"""A tiny Megatron-style GPT trained at several (tp, pp, dp) layouts, saved at one, loaded at another.

Each job starts ``_gpt_worker.py`` once per rank (gloo on loopback, at most 4 ranks) and reads
what each rank saw from a JSON file. The test process hosts the rendezvous ``TCPStore`` on port 0
and hands the port to the ranks, so two jobs never race for a port. A watchdog bounds every job:
if any rank fails the others are killed at once (they would wait in a collective); if the job
outlives ``DEADLINE_S`` all ranks are killed. Either way the test fails with the ranks' logs.

Every layout slices its shards out of the same global tensors, so losses agree across layouts
up to reduction order (``REL_TOL``). Checksums per logical tensor (``tiny_gpt.checksums``,
summed over ranks) show which tensor a load got wrong.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import ckpt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for any --import-mode
import _gpt_worker as worker  # noqa: E402
import tiny_gpt as gpt  # noqa: E402
import _procs  # noqa: E402

WORKER = Path(worker.__file__).resolve()
#: A job (up to four interpreters importing torch, then a few steps) must finish by this.
DEADLINE_S = 150.0
#: Losses at different layouts differ only by reduction order.
REL_TOL = 1e-5
#: Checksums are float64 sums of the same float32 values in a different order.
SUM_TOL = 1e-9
STEPS = 4
INIT_SEED, LOADER_SEED, DATA_SEED = 1234, 99, 7

# Tests that start rank processes are marked slow with a 300 s timeout; the pure rules check at
# the end runs in the fast part of the suite.


def _layout_api() -> bool:
    if importlib.util.find_spec("ckpt.rules") is None:
        return False
    params = inspect.signature(ckpt.save).parameters
    return "layout" in params and "rules" in params and "layout" in inspect.signature(ckpt.load).parameters


needs_layout_api = pytest.mark.xfail(
    not _layout_api(), reason="layout save/load not integrated yet", strict=False
)

# --------------------------------------------------------------------------------------------
# Running a job
# --------------------------------------------------------------------------------------------


def run_job(job_dir: Path, tp: int, pp: int, dp: int, actions: list[dict[str, Any]],
            init_seed: int = INIT_SEED) -> list[dict[str, Any]]:
    """Run ``actions`` on ``tp * pp * dp`` ranks; returns each rank's report, by rank."""
    world, what = tp * pp * dp, f"tp={tp} pp={pp} dp={dp}"
    job_dir.mkdir(parents=True)
    job = json.dumps({"init_seed": init_seed, "data_seed": DATA_SEED, "actions": actions})
    env = _procs.rank_env()
    store = None
    if world > 1:
        store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, timeout=timedelta(seconds=DEADLINE_S),
                              wait_for_workers=False)
    procs: list[subprocess.Popen] = []
    try:
        for rank in range(world):
            args = ["--rank", rank, "--world", world, "--store-port", store.port if store else 0,
                    "--tp", tp, "--pp", pp, "--dp", dp, "--job", job, "--out", job_dir / f"rank{rank}.json"]
            procs.append(_procs.start_rank([WORKER, *args], job_dir / f"rank{rank}.log", env))
        _procs.wait_all(procs, what, job_dir, DEADLINE_S)
    finally:
        _procs.stop(procs)
        del store
    return [json.loads((job_dir / f"rank{r}.json").read_text()) for r in range(world)]


def losses(reports: list[dict[str, Any]]) -> dict[int, float]:
    """The job's losses by step; every rank must report the same ones."""
    first = reports[0]["losses"]
    for r in reports[1:]:
        assert r["losses"] == first, f"rank {r['rank']} saw losses {r['losses']}, rank 0 saw {first}"
    return {int(k): v for k, v in first.items()}


def assert_losses_close(got: dict[int, float], want: dict[int, float], what: str) -> None:
    bad = {s: (got.get(s), want[s]) for s in want if got.get(s) is None
           or not math.isclose(got[s], want[s], rel_tol=REL_TOL)}
    assert not bad, f"{what}: loss per step (got, want) beyond {REL_TOL} relative: {bad}\nall: {got} vs {want}"


def assert_checksums_equal(got: dict[str, Any], want: dict[str, Any], what: str) -> None:
    """Per logical tensor: equal [sum, weighted sum, abs sum] (the abs sum sets the scale)."""
    assert got["step"] == want["step"], f"{what}: optimizer step {got['step']} != {want['step']}"
    bad = []
    for key in ("params", "exp_avg", "exp_avg_sq"):
        assert set(got[key]) == set(want[key]), f"{what}: {key} tensors {sorted(set(got[key]) ^ set(want[key]))}"
        for name, w in want[key].items():
            g, scale = got[key][name], w[2] + 1e-30
            if any(abs(a - b) > SUM_TOL * scale for a, b in zip(g, w)):
                bad.append(f"{key} {name}: got {g}, want {w}")
    assert not bad, f"{what}: {len(bad)} logical tensors differ:\n" + "\n".join(bad)


def assert_replicas_equal(reports: list[dict[str, Any]], tag: str, tp: int, pp: int, dp: int) -> None:
    """DP replicas hold identical model tensors; tied ``lm_head`` copies equal the embeddings."""
    by_coords = {(r["coords"]["pp"], r["coords"]["dp"], r["coords"]["tp"]): r["digests"][tag] for r in reports}
    for (p, d, t), digests in by_coords.items():
        models = {n: v for n, v in digests.items() if n.startswith("model.")}
        assert models == {n: v for n, v in by_coords[(p, 0, t)].items() if n.startswith("model.")}, \
            f"{tag}: dp replica (pp={p}, dp={d}, tp={t}) differs from dp rank 0"
        if pp > 1 and p == pp - 1:
            assert digests["model.lm_head.weight"] == by_coords[(0, d, t)]["model.embedding.word_embeddings.weight"], \
                f"{tag}: tied lm_head on (pp={p}, dp={d}, tp={t}) differs from the first stage's embeddings"


def combined(reports: list[dict[str, Any]], tag: str) -> dict[str, Any]:
    return gpt.combine([r["checksums"][tag] for r in reports])


# --------------------------------------------------------------------------------------------
# Fixtures: jobs shared by several tests
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """One process, no process group: the losses every layout must reproduce."""
    actions = [{"op": "checksums", "tag": "init"}, {"op": "train", "steps": STEPS}]
    return run_job(tmp_path_factory.mktemp("reference") / "job", 1, 1, 1, actions)


def _saver(tmp_path_factory: pytest.TempPathFactory, name: str, tp: int, pp: int, dp: int,
           saves: list[tuple[str, str]]) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Train 2 steps, save (each of ``saves``: (mode, key)), train 2 more; returns (urls, reports)."""
    root = tmp_path_factory.mktemp(name)
    urls = {key: str(root / key) for _, key in saves}
    actions: list[dict[str, Any]] = [{"op": "train", "steps": 2}, {"op": "checksums", "tag": "saved"}]
    actions += [{"op": "save", "url": urls[key], "step": 2, "mode": mode} for mode, key in saves]
    actions += [{"op": "train", "steps": STEPS - 2}]
    return urls, run_job(root / "job", tp, pp, dp, actions)


@pytest.fixture(scope="module")
def saved_tp2_dp2(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """(tp=2, pp=1, dp=2): rank-local save (same layout only), plus a layout save once available."""
    saves = [("rank_local", "rank_local")] + ([("layout", "layout")] if _layout_api() else [])
    return _saver(tmp_path_factory, "saved_tp2_dp2", 2, 1, 2, saves)


@pytest.fixture(scope="module")
def saved_pp2_dp2(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """(tp=1, pp=2, dp=2), saved through the layout API."""
    if not _layout_api():
        pytest.xfail("layout save/load not integrated yet")
    return _saver(tmp_path_factory, "saved_pp2_dp2", 1, 2, 2, [("layout", "layout")])


def _load_and_train(tmp_path: Path, url: str, mode: str, tp: int, pp: int, dp: int) -> list[dict[str, Any]]:
    """Build the model from a different seed, load ``url``, then train the last two steps."""
    actions = [{"op": "load", "url": url, "mode": mode}, {"op": "checksums", "tag": "loaded"},
               {"op": "train", "steps": STEPS - 2}]
    return run_job(tmp_path / "job", tp, pp, dp, actions, init_seed=LOADER_SEED)


def _check_resumed(loaded: list[dict[str, Any]], saver: list[dict[str, Any]], tp: int, pp: int, dp: int) -> None:
    what = f"saved at tp/pp/dp {saver_layout(saver)}, loaded at {tp}/{pp}/{dp}"
    assert {s for r in loaded for s in r["loaded_steps"]} == {2}
    assert_checksums_equal(combined(loaded, "loaded"), combined(saver, "saved"), what)
    assert_replicas_equal(loaded, "loaded", tp, pp, dp)
    want = {s: v for s, v in losses(saver).items() if s > 2}
    assert_losses_close(losses(loaded), want, what)


def saver_layout(reports: list[dict[str, Any]]) -> str:
    tp, dp, pp = (max(r["coords"][a] for r in reports) + 1 for a in ("tp", "dp", "pp"))
    return f"{tp}/{pp}/{dp}"


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,pp,dp", [(2, 1, 2), (4, 1, 1), (1, 2, 2), (2, 2, 1)])
def test_layout_trains_like_one_process(tmp_path: Path, reference: list[dict[str, Any]],
                                        tp: int, pp: int, dp: int) -> None:
    actions = [{"op": "checksums", "tag": "init"}, {"op": "train", "steps": STEPS}]
    reports = run_job(tmp_path / "job", tp, pp, dp, actions)
    what = f"tp={tp} pp={pp} dp={dp}"
    # The same logical model: every logical tensor's checksums match the unsharded one.
    assert_checksums_equal(combined(reports, "init"), combined(reference, "init"), what)
    assert_losses_close(losses(reports), losses(reference), what)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_same_layout_resume_is_bit_exact(tmp_path: Path, saved_tp2_dp2: Any) -> None:
    urls, saver = saved_tp2_dp2
    loaded = _load_and_train(tmp_path, urls["rank_local"], "rank_local", 2, 1, 2)
    assert_checksums_equal(combined(loaded, "loaded"), combined(saver, "saved"), "rank-local resume")
    by_rank = {r["rank"]: r for r in saver}
    for r in loaded:
        assert r["digests"]["loaded"] == by_rank[r["rank"]]["digests"]["saved"], f"rank {r['rank']} loaded other bytes"
    assert losses(loaded) == {s: v for s, v in losses(saver).items() if s > 2}  # bit-exact


@pytest.mark.slow
@pytest.mark.timeout(300)
@needs_layout_api
@pytest.mark.parametrize("tp,pp,dp", [(4, 1, 1), (1, 2, 2), (1, 1, 1)])
def test_save_tp2_dp2_loads_at_other_layouts(tmp_path: Path, saved_tp2_dp2: Any, tp: int, pp: int, dp: int) -> None:
    urls, saver = saved_tp2_dp2
    assert "layout" in urls, "the saver ran without the layout API"
    _check_resumed(_load_and_train(tmp_path, urls["layout"], "layout", tp, pp, dp), saver, tp, pp, dp)


@pytest.mark.slow
@pytest.mark.timeout(300)
@needs_layout_api
def test_save_pp2_dp2_loads_at_tp2(tmp_path: Path, saved_pp2_dp2: Any) -> None:
    urls, saver = saved_pp2_dp2
    _check_resumed(_load_and_train(tmp_path, urls["layout"], "layout", 2, 1, 1), saver, 2, 1, 1)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_saver_trains_like_one_process(saved_tp2_dp2: Any, reference: list[dict[str, Any]]) -> None:
    """The saving job's own losses (steps 1-4, a save in between) match the one-process run."""
    assert_losses_close(losses(saved_tp2_dp2[1]), losses(reference), "saver tp=2 dp=2")


# --------------------------------------------------------------------------------------------
# The shipped rules describe exactly what tiny_gpt holds (pure: no processes)
# --------------------------------------------------------------------------------------------


def _expected_elements(mesh: gpt.Mesh, names: dict[str, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per local tensor: (global name id, global flat index) of each element, -1 for padding."""
    cfg, out, gnames = gpt.GPTConfig(), {}, {}
    for n in gpt.local_names(cfg, mesh):
        g = gnames["model." + n] = "model." + gpt.global_name(n, cfg, mesh)
        shape = gpt.global_params_shape(cfg, g[len("model."):])
        index = gpt.shard(n, torch.arange(math.prod(shape)).reshape(shape), cfg, mesh, fill=-1)
        out["model." + n] = (torch.where(index >= 0, names.setdefault(g, len(names)), -1), index)
    numel = sum(i.numel() for _, i in out.values())
    part = -(-numel // mesh.dp)
    lo = mesh.dp_rank * part
    for state in ("exp_avg", "exp_avg_sq"):
        ids = torch.cat([torch.where(i.reshape(-1) >= 0, names.setdefault(f"optim.{state}.{gnames[m]}", len(names)), -1)
                         for m, (_, i) in out.items() if m.startswith("model.")])
        index = torch.cat([i.reshape(-1) for m, (_, i) in out.items() if m.startswith("model.")])
        pad = part * mesh.dp - numel
        ids, index = (torch.cat([t, torch.full((pad,), -1)])[lo: lo + part] for t in (ids, index))
        out[f"optim.{state}"] = (ids, index)
    out["optim.step"] = (torch.tensor(names.setdefault("optim.step", len(names))), torch.tensor(0))
    return out


def _elements_from_rules(mapping: Any, names: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full(mapping.local_shape, -1, dtype=torch.long)
    index = torch.full(mapping.local_shape, -1, dtype=torch.long)
    for piece in mapping.pieces:
        shape = mapping.global_shapes[piece.name]
        region = torch.arange(math.prod(shape)).reshape(shape)[
            tuple(slice(o, o + s) for o, s in zip(piece.region.offsets, piece.region.sizes))]
        box = tuple(slice(o, o + s) for o, s in zip(piece.local.offsets, piece.local.sizes))
        index[box] = region.reshape(piece.local.sizes)
        ids[box] = names.setdefault(piece.name, len(names))
    return ids, index


@pytest.mark.parametrize("tp,pp,dp", [(1, 1, 1), (2, 1, 2), (4, 1, 1), (1, 2, 2), (2, 2, 1), (2, 2, 2),
                                      (4, 2, 1), (1, 4, 2), (1, 1, 8), (4, 4, 1)])
def test_shipped_rules_place_every_element_where_tiny_gpt_holds_it(tp: int, pp: int, dp: int) -> None:
    """Element by element: the ``megatron_gpt`` rules and the model's slicing agree."""
    from ckpt.layout import Layout

    load_rules = pytest.importorskip("ckpt.rules").load_rules
    cfg = gpt.GPTConfig()
    rules = load_rules("megatron_gpt", **cfg.rules_kwargs())
    for rank in range(tp * pp * dp):
        mesh, names = gpt.Mesh(tp=tp, pp=pp, dp=dp, rank=rank), {}
        want = _expected_elements(mesh, names)
        layout = Layout.grid(tp=tp, pp=pp, dp=dp, rank=rank)
        got = rules.resolve({n: tuple(i.shape) for n, (_, i) in want.items()}, layout)
        assert list(got) == list(want)
        for n, (ids, index) in want.items():
            got_ids, got_index = _elements_from_rules(got[n], names)
            assert torch.equal(got_ids, ids) and torch.equal(got_index, index), \
                f"{n} at tp={tp} pp={pp} dp={dp} rank {rank}: the rules place elements elsewhere"
