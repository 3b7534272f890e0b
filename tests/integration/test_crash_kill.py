"""``kill -9`` of a saving process never leaves a torn or half-visible step, and never damages a
committed one (``docs/format.md`` section 2, ``docs/design/0001``).

Two directories are saved into by child processes that are SIGKILLed, round after round, so
orphans of killed saves pile up the way they do in a crash-looping job:

* ``inproc``: kill points are deterministic. The child's ``KillingStore`` kills its own process
  at the N-th data or manifest put, either mid-write (part of the object is in ``LocalStore``'s
  temporary file) or right after the put is durable. Each child re-saves existing steps
  (step 1 with new contents, among others) and saves new ones; the journal says which save was
  in flight and which put was hit, so the outcome is known exactly: a kill after the manifest
  put commits the save, any other kill leaves no trace visible to readers.
* ``timed``: the parent SIGKILLs a child that saves a 32 MiB state (64 objects) in a loop,
  after a seeded random delay. The in-flight save may or may not be committed; either way every
  committed save must be whole.

After every kill, both directories are checked: every manifest parses and names a save whose
data is all there and verifies; saves seen before are unchanged on disk (same inode, size,
mtime for the manifest and every object: nothing is overwritten in place); step 1 is always
committed; every committed step verifies and loads exactly the content the child wrote for the
attempt its manifest records (``extras["attempt"]``). At the end ``ckpt.retain(keep_last=1)``
must remove the orphans of older steps and keep the newest step loadable.

Children are forked from a forkserver that imported torch once, so a kill point costs a fork
rather than a fresh interpreter (importing torch takes 2-4 s, more on a busy machine). The
seeds are fixed; change ``SEED`` to explore other kill points.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import re
import shutil
import signal
import sys
import time
from datetime import timedelta
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
import torch

import ckpt
from ckpt import _commit, _verify
from ckpt.metadata import SaveRef, parse_manifest_key
from ckpt.store.local import TMP_PREFIX, LocalStore

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for any --import-mode
import _crash_child as child  # noqa: E402

SEED = 20240611
INPROC_ROUNDS = 20
TIMED_ROUNDS = 16
#: Every wait on a child (start, run, death) ends by this; only a hang gets near it.
DEADLINE_S = 120.0
#: Timed kills land this long after the child's first save began (a save takes ~0.1-0.5 s).
TIMED_DELAY_S = (0.0, 0.6)

log = logging.getLogger(__name__)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

_DATA_KEY = re.compile(r"^data/step-(\d{12})\.([0-9a-f]{16}-[0-9a-f]{8})/")


@dataclass(frozen=True)
class Layout:
    """The size and chunking of one directory's states."""

    tensors: int
    numel: int
    chunk_bytes: int
    object_bytes: int
    io_threads: int


INPROC = Layout(tensors=6, numel=48 * 1024, chunk_bytes=128 * 1024, object_bytes=512 * 1024, io_threads=1)
TIMED = Layout(tensors=16, numel=256 * 1024, chunk_bytes=256 * 1024, object_bytes=512 * 1024, io_threads=2)


@dataclass
class Seen:
    """A committed save as first seen: its attempt and a fingerprint of its files."""

    step: int
    attempt: int
    files: dict[str, tuple[int, int, int]]


@dataclass
class Root:
    """One checkpoint directory and what the parent knows about it."""

    path: Path
    layout: Layout
    seen: dict[str, Seen] = field(default_factory=dict)  # save id -> save
    data_puts: int = 0  # data objects per save (set by the first save)
    buffers: dict[str, Any] = field(default_factory=dict)  # reused: allocating is slow in VMs

    def __post_init__(self) -> None:
        self.buffers = {
            "target": child.template(self.layout.tensors, self.layout.numel),
            "want": torch.empty(self.layout.numel, dtype=torch.int64),
        }

    @property
    def url(self) -> str:
        return str(self.path)

    def spec(self, journal: Path, **extra: Any) -> dict[str, Any]:
        lay = self.layout
        return {"root": self.url, "journal": str(journal), "tensors": lay.tensors, "numel": lay.numel,
                "chunk_bytes": lay.chunk_bytes, "object_bytes": lay.object_bytes,
                "io_threads": lay.io_threads, **extra}


# --------------------------------------------------------------------------------------------
# Children
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def forkserver() -> Iterator[Any]:
    """A forkserver context whose server has imported torch and ckpt; stopped afterwards."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "ckpt._save", "ckpt._load", "_crash_child"])
    yield ctx
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    if server is not None and hasattr(server, "_stop"):
        server._stop()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Element-wise checks on one thread: OpenMP spinning on a busy 2-core box is 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Children:
    """Every child started by a test; ``close`` kills and reaps whatever is still running."""

    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx
        self._procs: list[Any] = []

    def start(self, spec: dict[str, Any]) -> Any:
        proc = self._ctx.Process(target=child.child_main, args=(spec,), daemon=True)
        self._procs.append(proc)
        proc.start()
        return proc

    def close(self) -> None:
        for proc in self._procs:
            if proc.pid is not None and proc.exitcode is None:
                proc.kill()
                proc.join(DEADLINE_S)


def _join(proc: Any, what: str) -> int:
    proc.join(DEADLINE_S)
    if proc.exitcode is None:
        proc.kill()
        proc.join(DEADLINE_S)
        pytest.fail(f"{what}: child {proc.pid} still running after {DEADLINE_S} s (hang?)")
    return proc.exitcode


def _wait_for_event(proc: Any, journal: Path, event: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not any(e["ev"] == event for e in child.read_journal(str(journal))):
        if proc.exitcode is not None or time.monotonic() > deadline:
            pytest.fail(f"child {proc.pid} never wrote {event!r} (exit code {proc.exitcode})")
        time.sleep(0.005)


def _first_save(children: Children, root: Root, tmp: Path) -> None:
    """Commit step 1 (attempt 0) without a kill; learn how many data puts a save makes."""
    journal = tmp / f"{root.path.name}-init.jsonl"
    proc = children.start(root.spec(journal, mode="inproc", plan=[[1, 0]]))
    assert _join(proc, "first save") == 0
    finished = [e for e in child.read_journal(str(journal)) if e["ev"] == "finished"]
    assert finished and finished[0]["manifest"] == 1, finished
    root.data_puts = finished[0]["data"]
    assert root.data_puts >= 4, f"{root.path.name}: want many objects per save, got {root.data_puts}"


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------
def _fingerprint(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _check_manifests(root: Root) -> dict[str, SaveRef]:
    """Every manifest is whole and its data verifies; saves seen before are untouched."""
    store = LocalStore(root.url)
    keys = store.list("manifests/")
    refs = {}
    for key in keys:
        ref = parse_manifest_key(key)
        assert ref is not None, f"{root.url}: stray object {key!r} under manifests/"
        refs[ref.save_id] = ref
        manifest = _commit.read_manifest(store, ref)  # a torn manifest fails to parse
        files = {key: _fingerprint(root.path / key)}
        files.update({o: _fingerprint(root.path / (ref.data_prefix + o)) for o in manifest.objects()})
        attempt = manifest.extras["attempt"]
        old = root.seen.get(ref.save_id)
        if old is not None:
            assert (old.step, old.attempt, old.files) == (ref.step, attempt, files), f"{key} changed on disk"
            continue
        assert all(s.attempt != attempt for s in root.seen.values()), f"attempt {attempt} committed twice"
        report = _verify.verify(store, manifest)
        assert report.ok, f"{key}: {[f.describe() for f in report.failures]}"
        root.seen[ref.save_id] = Seen(ref.step, attempt, files)
    vanished = set(root.seen) - set(refs)
    assert not vanished, f"{root.url}: committed saves vanished: {sorted(vanished)}"
    return refs


def _check_loads(root: Root, refs: dict[str, SaveRef], *, step_1: bool) -> None:
    """Every committed step verifies and loads the exact content of its recorded attempt."""
    steps = ckpt.list_steps(root.url)
    assert not step_1 or 1 in steps, f"{root.url}: step 1 is gone; committed steps {steps}"
    assert steps == sorted({r.step for r in refs.values()})
    lay = root.layout
    for step in steps:
        report = ckpt.verify(root.url, step=step)
        assert report.ok, f"step {step}: {[f.describe() for f in report.failures]}"
        target = root.buffers["target"]
        for t in target["model"].values():
            t.fill_(-1)  # a tensor the load failed to fill cannot pass for an earlier check's
        result = ckpt.load(target, root.url, step=step)
        newest = max(r.save_id for r in refs.values() if r.step == step)
        assert (result.step, result.save_id) == (step, newest)
        attempt = result.manifest.extras["attempt"]
        assert result.state["meta"] == {"step": step, "attempt": attempt, "tag": f"step {step} attempt {attempt}"}
        for i in range(lay.tensors):
            got = target["model"][f"w{i:02d}"]
            assert result.state["model"][f"w{i:02d}"] is got  # filled in place
            want = child.tensor_value(step, attempt, i, lay.numel, out=root.buffers["want"])
            assert torch.equal(got, want), f"step {step} attempt {attempt} tensor w{i:02d} differs"


def _check_root(root: Root, *, step_1: bool = True) -> dict[str, SaveRef]:
    """All checks of one directory; ``step_1``: step 1 must be committed (until retention)."""
    refs = _check_manifests(root)
    _check_loads(root, refs, step_1=step_1)
    return refs


def _attempts(root: Root) -> dict[int, Seen]:
    return {s.attempt: s for s in root.seen.values()}


def _check_journal_outcome(root: Root, events: list[dict[str, Any]], *, in_flight_known: bool) -> Optional[dict]:
    """Finished saves are committed; the killed one is committed only if its manifest was.

    Returns the in-flight save's ``begin`` event (None if the kill fell between saves).
    """
    committed = _attempts(root)
    begun = [e for e in events if e["ev"] == "begin"]
    done = {e["attempt"]: e for e in events if e["ev"] == "done"}
    for attempt, e in done.items():
        assert attempt in committed, f"save of step {e['step']} attempt {attempt} returned but is not committed"
        assert [sid for sid, s in root.seen.items() if s.attempt == attempt] == [e["save_id"]]
    in_flight = begun[-1] if begun and begun[-1]["attempt"] not in done else None
    if in_flight is None or not in_flight_known:
        return in_flight
    kills = [e for e in events if e["ev"] == "kill"]
    assert len(kills) == 1, kills
    kill = kills[0]
    assert f"step-{in_flight['step']:012d}." in kill["key"], (kill, in_flight)
    manifest_durable = kill["key"].startswith("manifests/") and kill["phase"] == "after"
    assert (in_flight["attempt"] in committed) == manifest_durable, (kill, in_flight)
    if manifest_durable:
        latest = _commit.resolve_save(LocalStore(root.url), in_flight["step"])
        assert root.seen[latest.save_id].attempt == in_flight["attempt"]
    return in_flight


# --------------------------------------------------------------------------------------------
# Rounds
# --------------------------------------------------------------------------------------------
def _inproc_kills(rng: random.Random, rounds: int, data_puts: int) -> list[dict[str, Any]]:
    """Kill points stratified over (data, manifest) x (mid, after), then shuffled."""
    kinds = [("data", "mid"), ("data", "after"), ("manifest", "mid"), ("data", "mid"), ("manifest", "after")]
    specs = []
    for i in range(rounds):
        kind, phase = kinds[i % len(kinds)]
        nth = rng.randint(1, 2 * data_puts) if kind == "data" else rng.randint(1, 2)
        specs.append({"kind": kind, "phase": phase, "nth": nth, "fraction": rng.random()})
    rng.shuffle(specs)
    return specs


def _inproc_plan(rng: random.Random, root: Root, round_no: int) -> list[list[int]]:
    """Three saves, each a re-save of step 1, a re-save of another step, or a new step."""
    steps = sorted({s.step for s in root.seen.values()})
    new = max(steps) + 1
    plan = []
    for i in range(3):
        kind = rng.choice(["resave-1", "resave", "new"])
        if kind == "resave-1":
            step = 1
        elif kind == "resave":
            step = rng.choice(steps)
        else:
            step, new = new, new + 1
        plan.append([step, 100 * (round_no + 1) + i])
    return plan


def _run_round(children: Children, tmp: Path, rngs: tuple[random.Random, random.Random],
               inproc: Optional[tuple[Root, dict]], timed: Optional[Root], round_no: int) -> dict[str, Any]:
    """One kill of each kind (run side by side), then the checks of both directories."""
    rng_a, rng_b = rngs
    procs = {}
    journals = {name: tmp / f"{name}-{round_no:02d}.jsonl" for name in ("inproc", "timed")}
    if inproc is not None:
        root, kill = inproc
        committed_before = {s.step for s in root.seen.values()}
        plan = _inproc_plan(rng_a, root, round_no)
        procs["inproc"] = children.start(root.spec(journals["inproc"], mode="inproc", plan=plan, kill=kill))
    if timed is not None:
        cycle = [2, 3, 1, 4, 5]
        k = rng_b.randrange(len(cycle))
        spec = timed.spec(journals["timed"], mode="loop", cycle=cycle[k:] + cycle[:k],
                          attempt_base=1000 * (round_no + 1))
        procs["timed"] = proc = children.start(spec)
        _wait_for_event(proc, journals["timed"], "begin")
        time.sleep(rng_b.uniform(*TIMED_DELAY_S))
        proc.kill()
    outcome: dict[str, Any] = {}
    for name, proc in procs.items():
        code = _join(proc, f"{name} round {round_no}")
        assert code == -signal.SIGKILL, f"{name} round {round_no}: child exited with {code}, not by SIGKILL"
    if inproc is not None:
        _check_root(inproc[0])
        events = child.read_journal(str(journals["inproc"]))
        in_flight = _check_journal_outcome(inproc[0], events, in_flight_known=True)
        assert in_flight is not None
        step = in_flight["step"]
        outcome["inproc_killed"] = "resave-1" if step == 1 else "resave" if step in committed_before else "new"
    if timed is not None:
        _check_root(timed)
        events = child.read_journal(str(journals["timed"]))
        in_flight = _check_journal_outcome(timed, events, in_flight_known=False)
        outcome["timed_mid_save"] = in_flight is not None
        outcome["timed_saves_done"] = sum(e["ev"] == "done" for e in events)
    return outcome


def _data_ref(key: str) -> SaveRef:
    m = _DATA_KEY.match(key)
    assert m is not None, f"stray data key {key!r}"
    return SaveRef(int(m.group(1)), m.group(2))


def _check_retain(root: Root) -> int:
    """``retain(keep_last=1)`` removes older orphans, keeps the newest step; returns orphans."""
    store = LocalStore(root.url)
    refs = set(_commit.list_saves(store))
    newest = max(r.step for r in refs)
    kept = _commit.resolve_save(store, newest)
    before = store.list("data/")
    old_orphans = [k for k in before if _data_ref(k) not in refs and _data_ref(k).step <= newest]
    old_saves = [k for k in before if _data_ref(k) in refs and _data_ref(k) != kept]
    # Young uncommitted data may be a save in flight: the default grace period keeps it.
    young = ckpt.retain(root.url, keep_last=1)
    assert young.deleted_objects == len(old_saves), "retain deleted uncommitted data inside the grace period"
    assert all(k in store.list("data/") for k in old_orphans)
    report = ckpt.retain(root.url, keep_last=1, grace=timedelta(0))
    assert report.kept_steps == [newest]
    assert store.list("manifests/") == [kept.manifest_key]
    after = store.list("data/")
    for key in after:
        ref = _data_ref(key)
        assert ref == kept or (ref.step > newest and ref not in refs), f"retain left {key!r}"
    assert report.deleted_objects == len(old_orphans)
    root.seen = {sid: s for sid, s in root.seen.items() if sid == kept.save_id}
    _check_root(root, step_1=False)  # the kept save is unchanged on disk, verifies and loads
    return len(old_orphans)


def test_sigkill_at_seeded_points_never_tears_or_damages_a_step(forkserver, one_torch_thread, tmp_path: Path) -> None:
    started = time.monotonic()
    inproc, timed = Root(tmp_path / "inproc", INPROC), Root(tmp_path / "timed", TIMED)
    rngs = (random.Random(SEED), random.Random(SEED + 1))
    children = Children(forkserver)
    outcomes = []
    try:
        for root in (inproc, timed):
            _first_save(children, root, tmp_path)
            _check_root(root)
        kills = _inproc_kills(rngs[0], INPROC_ROUNDS, inproc.data_puts)
        for r in range(max(INPROC_ROUNDS, TIMED_ROUNDS)):
            outcomes.append(_run_round(
                children, tmp_path, rngs,
                (inproc, kills[r]) if r < INPROC_ROUNDS else None,
                timed if r < TIMED_ROUNDS else None,
                r,
            ))
        orphans = _check_retain(inproc)
        _check_retain(timed)
        assert orphans > 0, "no killed save left orphans of an older step; the retain check saw nothing"
        killed = [o["inproc_killed"] for o in outcomes if "inproc_killed" in o]
        assert {"resave-1", "new"} <= set(killed), f"the seeded plans missed a kind of save: {killed}"
    finally:
        children.close()
    shutil.rmtree(tmp_path, ignore_errors=True)  # ~1 GiB of killed saves; kept when the test fails
    mid_save = sum(o["timed_mid_save"] for o in outcomes if "timed_mid_save" in o)
    log.info("%d in-process and %d timed kills (%d mid-save) in %.1f s; retain removed %d orphaned objects",
             INPROC_ROUNDS, TIMED_ROUNDS, mid_save, time.monotonic() - started, orphans)


def test_retain_removes_temp_files_of_puts_killed_mid_write(forkserver, tmp_path: Path) -> None:
    root = Root(tmp_path / "ckpt", INPROC)
    children = Children(forkserver)
    try:
        _first_save(children, root, tmp_path)
        journal = tmp_path / "kill.jsonl"
        kill = {"kind": "data", "phase": "mid", "nth": 2, "fraction": 0.5}
        proc = children.start(root.spec(journal, mode="inproc", plan=[[2, 1]], kill=kill))
        assert _join(proc, "mid-write kill") == -signal.SIGKILL
        proc = children.start(root.spec(tmp_path / "after.jsonl", mode="inproc", plan=[[3, 2]]))
        assert _join(proc, "save after the kill") == 0
        ckpt.retain(root.url, keep_last=1, grace=timedelta(0))
        leftovers = [str(p.relative_to(root.path)) for p in root.path.rglob(f"{TMP_PREFIX}*")]
        assert leftovers == [], f"retain left temporary files of killed puts: {leftovers}"
    finally:
        children.close()
