"""Resharding load: ``ckpt`` against ``torch.distributed.checkpoint`` with DTensor resharding.

Usage::

    python tests/benchmarks/bench_reshard.py [--gib 1.0] [--matrices 24] [--source-tp 2]
        [--targets 4,1] [--runs 3] [--warmup 1] [--dir DIR] [--json bench-results/reshard.json]
        [--io-threads N] [--drop-caches] [--profile]

The logical state is ~``--gib`` GiB of float32 MLP weights: ``--matrices / 2`` layers, each
with a column-parallel ``layers.i.mlp.w_in`` (ffn x hidden, split on dim 0) and a row-parallel
``layers.i.mlp.w_out`` (hidden x ffn, split on dim 1); 4096 x 2816 each at 1 GiB. Every
element is a hash of its global index, so every rank computes its own shard only.

Each rank is a process (``_reshard_worker.py``, one intra-op thread, gloo on loopback,
rendezvous through a ``TCPStore`` on port 0). One job of ``--source-tp`` ranks saves the state
at ``tp = source`` twice, into two directories on local disk:

* ``ckpt``: ``ckpt.save(layout=Layout.grid(tp=source), rules=Split(w_in, 0), Split(w_out, 1),
  compression=None)``: crc32c per chunk and per 256 KiB block, fsync, atomic commit.
* ``dcp``: ``torch.distributed.checkpoint.save`` of ``DTensor``s with ``Shard(0)``/``Shard(1)``
  on a 1-D CPU ``DeviceMesh``; ``FileSystemWriter`` defaults (one file per rank, fsync).

Then, for every target ``tp`` in ``--targets`` (4 and 1 by default), one job of that many ranks
allocates zero shards at the target layout and loads both checkpoints ``--warmup + --runs``
times, ckpt and DCP alternating (the first alternates too): ``ckpt.load(layout=Layout.grid(
tp=target), rules=same rules)`` (library defaults: checksums verified) and ``dcp.load`` into
DTensors with the same placements on a mesh of the target size (default load planner). A load
is timed on every rank from a barrier to the end of its own work; the load's time is the
maximum over ranks. The first round of each job compares every loaded shard with the logical
data, outside the timing. The save is timed too (one save, for information only).

Bytes: "held" is what the target ranks hold (sum of their shards' bytes; every logical byte
once). ckpt's ``LoadResult.bytes_read`` is summed over ranks; for both libraries each rank's
``/proc/self/io`` deltas around the load are summed too: ``rchar`` (bytes its read calls
returned, page cache hits included, plus small metadata reads) and ``read_bytes`` (fetched from
the disk: only meaningful with ``--drop-caches``).

Page cache: the loads read files just written, for both libraries alike (the 2 x state fits in
memory many times over), unless ``--drop-caches`` (root): rank 0 runs ``sync; echo 1 >
/proc/sys/vm/drop_caches`` between two barriers before every load.

Targets (from the issue), per target layout: ckpt's resharding load throughput at least DCP's
(ratio of the median load times >= 1.0), and ckpt's bytes read (``LoadResult.bytes_read``) at
most 1.1 x the bytes the target ranks hold. Prints a Markdown table; writes every rank's
numbers of every round, the machine and the verdicts to ``--json``. ``--profile`` runs one more
load of each library under cProfile on rank 0 of each target job and prints the top entries.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (needs the path above when run from the repo root)
    filesystem_of,
    free_bytes,
    gbps,
    machine,
    markdown_table,
    median,
    write_json,
)

WORKER = Path(__file__).resolve().parent / "_reshard_worker.py"
DEFAULT_JSON = Path("bench-results/reshard.json")
METHODS = ("ckpt", "dcp")
TARGETS = {"load_vs_dcp_min": 1.0, "bytes_read_over_held_max": 1.1}
MAX_RANKS = 4
#: A job (interpreters importing torch, shards built, the loads) must finish by this.
DEADLINE_S = 420.0
HIDDEN = 2816


# --------------------------------------------------------------------------------------------
# the state
# --------------------------------------------------------------------------------------------
def tensor_spec(gib: float, matrices: int) -> list[dict[str, Any]]:
    """``matrices`` float32 matrices, half column-parallel, half row-parallel, ~``gib`` GiB."""
    layers = max(1, matrices // 2)
    ffn = max(64, 64 * round(4096 * gib * 12 / layers / 64))  # 4096 at 1 GiB and 24 matrices
    spec = []
    for i in range(layers):
        spec.append({"name": f"layers.{i}.mlp.w_in", "rows": ffn, "cols": HIDDEN, "dim": 0})
        spec.append({"name": f"layers.{i}.mlp.w_out", "rows": HIDDEN, "cols": ffn, "dim": 1})
    return spec


def state_bytes(spec: list[dict[str, Any]]) -> int:
    return sum(4 * t["rows"] * t["cols"] for t in spec)


# --------------------------------------------------------------------------------------------
# jobs
# --------------------------------------------------------------------------------------------
def _logs(work: Path, world: int) -> str:
    parts = []
    for rank in range(world):
        log = work / f"rank{rank}.log"
        text = log.read_text(errors="replace") if log.exists() else "(no log)"
        parts.append(f"--- rank {rank} ---\n{text[-4000:]}")
    return "\n".join(parts)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


def run_job(job: dict[str, Any], world: int, work: Path) -> list[dict[str, Any]]:
    """Runs ``job`` on ``world`` rank processes; returns each rank's report (by rank)."""
    work.mkdir(parents=True)
    rdv = work / "rendezvous"
    rdv.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs: list[subprocess.Popen] = []
    what = f"{job['role']} job on {world} rank(s)"
    try:
        for rank in range(world):
            with open(work / f"rank{rank}.log", "wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, str(WORKER), json.dumps(job), str(rank), str(world), str(rdv),
                     str(work / f"rank{rank}.json")],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                ))
        deadline = time.monotonic() + DEADLINE_S
        while any(p.poll() is None for p in procs):
            failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:
                _stop(procs)
                raise RuntimeError(f"{what}: rank(s) {failed} failed\n{_logs(work, world)}")
            if time.monotonic() > deadline:
                _stop(procs)
                raise RuntimeError(f"{what}: still running after {DEADLINE_S} s (hang?)\n{_logs(work, world)}")
            time.sleep(0.05)
        codes = [p.returncode for p in procs]
        if codes != [0] * world:
            raise RuntimeError(f"{what}: exit codes {codes}\n{_logs(work, world)}")
    finally:
        _stop(procs)
    return [json.loads((work / f"rank{r}.json").read_text()) for r in range(world)]


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------
def _io_sum(per_rank: list[dict[str, Any]], key: str) -> Optional[int]:
    values = [f["io"].get(key) for f in per_rank]
    return None if any(v is None for v in values) else int(sum(values))


def combine_round(reports: list[dict[str, Any]], index: int, method: str) -> dict[str, Any]:
    """One load of ``method`` in round ``index``, over all ranks."""
    per_rank = [rep["rounds"][index][method] for rep in reports]
    out: dict[str, Any] = {
        "load_s": max(f["seconds"] for f in per_rank),
        "rank_load_s": [f["seconds"] for f in per_rank],
        "rchar": _io_sum(per_rank, "rchar"),
        "read_bytes": _io_sum(per_rank, "read_bytes"),
    }
    if method == "ckpt":
        out["bytes_read"] = sum(f["bytes_read"] for f in per_rank)
        out["rank_library_s"] = [f["library_seconds"] for f in per_rank]
    return out


def summarize_target(reports: list[dict[str, Any]], tp: int, source_tp: int) -> dict[str, Any]:
    """Medians, ratios against DCP and the verdicts for one target layout."""
    held = sum(rep["held_bytes"] for rep in reports)
    rounds = reports[0]["rounds"]
    timed = [i for i, rnd in enumerate(rounds) if not rnd["warmup"]]
    runs = [{m: combine_round(reports, i, m) for m in METHODS} | {"order": rounds[i]["order"]} for i in timed]
    drop_errors = {rnd.get("drop_caches_error") for rnd in rounds} - {None}
    rows = {}
    for m in METHODS:
        times = [r[m]["load_s"] for r in runs]
        row: dict[str, Any] = {"load_runs_s": times, "load_s": median(times)}
        row["load_gbps"] = gbps(held, row["load_s"])
        for key in ("rchar", "read_bytes", "bytes_read"):
            values = [r[m].get(key) for r in runs]
            if values and all(v is not None for v in values):
                row[key] = int(median(values))
                row[f"{key}_over_held"] = row[key] / held
        rows[m] = row
    ck, base = rows["ckpt"], rows["dcp"]
    for row in rows.values():
        row["load_vs_dcp"] = base["load_s"] / row["load_s"]
    per_run = [r["dcp"]["load_s"] / r["ckpt"]["load_s"] for r in runs]
    ratios = {
        "load_vs_dcp": {
            "value": ck["load_vs_dcp"], "per_run": per_run, "per_run_median": median(per_run),
            "target": f">= {TARGETS['load_vs_dcp_min']}", "met": ck["load_vs_dcp"] >= TARGETS["load_vs_dcp_min"],
        },
        "bytes_read_over_held": {
            "value": ck["bytes_read_over_held"],
            "target": f"<= {TARGETS['bytes_read_over_held_max']}",
            "met": ck["bytes_read_over_held"] <= TARGETS["bytes_read_over_held_max"],
        },
    }
    return {
        "layout": f"tp={source_tp} -> tp={tp}",
        "target_tp": tp,
        "ranks": len(reports),
        "held_bytes": held,
        "rows": rows,
        "ratios": ratios,
        "runs": runs,
        "drop_caches_error": sorted(drop_errors)[0] if drop_errors else None,
        "profile": reports[0].get("profile"),
    }


def summarize_save(reports: list[dict[str, Any]], nbytes: int) -> dict[str, Any]:
    out = {}
    for m in METHODS:
        s = max(rep[m]["seconds"] for rep in reports)
        out[m] = {"save_s": s, "save_gbps": gbps(nbytes, s), "rank_save_s": [rep[m]["seconds"] for rep in reports],
                  "wchar": sum(rep[m]["io"].get("wchar", 0) for rep in reports)}
    out["ckpt"]["stored_bytes"] = sum(rep["ckpt"]["rank_bytes"] for rep in reports)
    return out


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Saves once, loads at every target layout, and returns the JSON record."""
    spec = tensor_spec(args.gib, args.matrices)
    nbytes = state_bytes(spec)
    parent = args.dir or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    need = 2 * nbytes + (1 << 30)
    if free_bytes(parent) < need:
        raise SystemExit(f"{parent}: {free_bytes(parent) >> 20} MiB free, need {need >> 20} MiB; pass --dir")
    base = Path(tempfile.mkdtemp(prefix="ckpt-bench-reshard-", dir=parent))
    common = {"tensors": spec, "ckpt_dir": str(base / "ckpt"), "dcp_dir": str(base / "dcp"),
              "io_threads": args.io_threads}
    started = time.perf_counter()
    try:
        saved = run_job({"role": "save", **common}, args.source_tp, base / "job-save")
        save = summarize_save(saved, nbytes)
        _progress(f"saved at tp={args.source_tp}: " + ", ".join(f"{m} {save[m]['save_s']:.2f} s" for m in METHODS))
        layouts = []
        for tp in args.targets:
            job = {"role": "load", **common, "runs": args.runs, "warmup": args.warmup,
                   "drop_caches": args.drop_caches, "profile": args.profile}
            reports = run_job(job, tp, base / f"job-load-tp{tp}")
            layouts.append(summarize_target(reports, tp, args.source_tp))
            rows = layouts[-1]["rows"]
            _progress(f"loaded at tp={tp}: " + ", ".join(f"{m} {rows[m]['load_s']:.3f} s" for m in METHODS))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    drop_error = next((lay["drop_caches_error"] for lay in layouts if lay["drop_caches_error"]), None)
    if not args.drop_caches:
        page_cache = "warm: every load read files written just before (page cache), for both libraries alike"
    elif drop_error:
        page_cache = f"warm: --drop-caches failed ({drop_error}); every load read from the page cache"
    else:
        page_cache = "cold: page cache dropped (sync; echo 1 > /proc/sys/vm/drop_caches) before every load"
    return {
        "benchmark": "reshard",
        "machine": machine_record(),
        "config": {
            "gib": args.gib,
            "state_bytes": nbytes,
            "tensors": spec,
            "source_tp": args.source_tp,
            "target_tps": args.targets,
            "runs": args.runs,
            "warmup": args.warmup,
            "statistic": "median over runs of the max over ranks",
            "threads_per_rank": 1,
            "io_threads": args.io_threads or "library default (min(4, cpus))",
            "dir": parent,
            "filesystem": filesystem_of(parent),
            "page_cache": page_cache,
            "ckpt": "ckpt.save(compression=None) crc32c; ckpt.load(layout, rules) verify=True",
            "dcp": "dcp.save/load of DTensors (Shard(0)/Shard(1), 1-D CPU mesh), FileSystemWriter/Reader defaults",
            "total_seconds": time.perf_counter() - started,
        },
        "baseline": "dcp",
        "targets": TARGETS,
        "save": save,
        "layouts": layouts,
        "all_met": all(r["met"] for lay in layouts for r in lay["ratios"].values()),
        "raw_save_reports": saved,
    }


def machine_record() -> dict[str, Any]:
    import torch  # noqa: F401  (only so that machine() records its version)

    return machine()


def _progress(line: str) -> None:
    sys.stderr.write(line + "\n")  # progress; the table goes to stdout


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------
def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_report(record: dict[str, Any]) -> str:
    """The Markdown table, the verdicts and the notes a reader needs."""
    cfg, m = record["config"], record["machine"]
    spec = cfg["tensors"]
    shapes = sorted({f"{t['rows']}x{t['cols']}" for t in spec})
    rows = []
    for lay in record["layouts"]:
        for name in METHODS:
            r = lay["rows"][name]
            rows.append([
                lay["layout"], name if name == "ckpt" else "dcp (baseline)",
                f"{r['load_s']:.3f}", f"{r['load_gbps']:.2f}", f"{r['load_vs_dcp']:.2f}",
                _ratio(r.get("bytes_read_over_held")), _ratio(r.get("rchar_over_held")),
                _ratio(r.get("read_bytes_over_held")),
                " / ".join(f"{v:.3f}" for v in r["load_runs_s"]),
            ])
    table = markdown_table(
        ["layout", "method", "load s", "load GB/s", "vs DCP", "read/held (lib)", "rchar/held", "disk/held",
         "load runs s"],
        rows, right=[False, False] + [True] * 7,
    )
    save = record["save"]
    lines = [
        f"reshard load, {cfg['state_bytes'] / 2**30:.3f} GiB logical state ({len(spec)} float32 matrices "
        f"{', '.join(shapes)}; half split on dim 0, half on dim 1), saved at tp={cfg['source_tp']}, "
        f"median of {cfg['runs']} runs (+{cfg['warmup']} warm-up) of the max over ranks, "
        f"{m['cpu']} ({m['cpu_count']} cpus), torch {m.get('torch')}, python {m['python']}, "
        f"{cfg['filesystem']['type']} on {cfg['filesystem']['device']} ({cfg['dir']})",
        "",
        table,
        "",
        "Targets (ckpt, per target layout):",
    ]
    for lay in record["layouts"]:
        lr, br = lay["ratios"]["load_vs_dcp"], lay["ratios"]["bytes_read_over_held"]
        per_run = ", ".join(f"{v:.2f}" for v in lr["per_run"])
        lines.append(f"- {lay['layout']}: load throughput vs DCP {lr['value']:.2f}x [{per_run}] target "
                     f"{lr['target']}: {'met' if lr['met'] else 'MISSED'}; bytes read / held {br['value']:.3f} "
                     f"target {br['target']}: {'met' if br['met'] else 'MISSED'}")
    lines += [
        "",
        f"Save at tp={cfg['source_tp']} (one save each, information only): "
        + ", ".join(f"{k} {save[k]['save_s']:.2f} s ({save[k]['save_gbps']:.2f} GB/s)" for k in METHODS) + ".",
        f"Page cache: {cfg['page_cache']}.",
        "GB/s counts the bytes the target ranks hold (1 GB = 1e9 bytes). read/held (lib): ckpt's "
        "LoadResult.bytes_read summed over ranks; rchar/held: /proc/self/io rchar deltas summed over "
        "ranks (read calls, page cache included); disk/held: read_bytes deltas (block device).",
        f"Total time {cfg['total_seconds']:.0f} s.",
    ]
    for lay in record["layouts"]:
        for name, text in (lay.get("profile") or {}).items():
            lines += ["", f"cProfile, rank 0 of {lay['layout']}, one {name} load:", "```", text.strip(), "```"]
    return "\n".join(lines)


def _tp_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 or v > MAX_RANKS for v in values):
        raise argparse.ArgumentTypeError(f"target tp sizes must be in [1, {MAX_RANKS}], got {text!r}")
    return values


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--gib", type=float, default=1.0, help="logical state size in GiB (default 1.0)")
    parser.add_argument("--matrices", type=int, default=24, help="number of matrices, even (default 24)")
    parser.add_argument("--source-tp", type=int, default=2, help=f"ranks that save (default 2, at most {MAX_RANKS})")
    parser.add_argument("--targets", type=_tp_list, default=[4, 1], help="target tp sizes to load at (default 4,1)")
    parser.add_argument("--runs", type=int, default=3, help="timed loads per library and target (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed load rounds first (default 1)")
    parser.add_argument("--dir", default=None, help="parent of the scratch directory (default: the temp dir)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"JSON output (default {DEFAULT_JSON})")
    parser.add_argument("--io-threads", type=int, default=None, help="ckpt io_threads (default: the library's)")
    parser.add_argument("--drop-caches", action="store_true", help="drop the page cache before every load (root only)")
    parser.add_argument("--profile", action="store_true", help="cProfile one more load of each library on rank 0")
    args = parser.parse_args(argv)
    if args.gib <= 0 or args.runs < 1 or args.warmup < 0 or args.matrices < 2 or args.matrices % 2:
        parser.error("--gib must be > 0, --runs >= 1, --warmup >= 0, --matrices even and >= 2")
    if not 1 <= args.source_tp <= MAX_RANKS:
        parser.error(f"--source-tp must be in [1, {MAX_RANKS}]")
    ffn = tensor_spec(args.gib, args.matrices)[0]["rows"]
    lcm = math.lcm(args.source_tp, *args.targets)
    if ffn % lcm:
        parser.error(f"ffn size {ffn} is not divisible by every tp size (lcm {lcm}); change --gib")
    record = run(args)
    sys.stdout.write(format_report(record) + "\n")
    write_json(args.json, record)
    sys.stdout.write(f"wrote {args.json}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
