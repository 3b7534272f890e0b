"""Save and load throughput of ``ckpt`` against ``torch.distributed.checkpoint`` and torch.save.

Usage::

    python tests/benchmarks/bench_save_load.py [--gib 1.0] [--runs 3] [--load-repeats 3]
        [--dir DIR] [--json bench-results/save_load.json] [--io-threads N] [--drop-caches]

The state is ~``--gib`` GiB of GPT-like training state in one process: a model state dict of
float32 weights (token and position embeddings, transformer blocks with qkv/proj/mlp weights,
biases and layer norms; about a third of the bytes) and the Adam ``exp_avg``/``exp_avg_sq`` of
every weight plus a step count::

    {"model": {name: tensor}, "optim": {"state": {name: {"exp_avg", "exp_avg_sq"}}, "step": t}}

Each run saves the state with every method to a fresh directory on local disk, loads it back,
and deletes it; the order of the methods rotates from run to run to spread the machine's
noise. Methods, each with its library defaults:

* ``ckpt``: ``ckpt.save(compression=None)`` (crc32c per chunk, fsync, atomic rename) and
  ``ckpt.load(verify=True)`` into preallocated tensors; also ``ckpt.load(verify=False)`` on
  the same files, which gives the cost of checksum verification on load.
* ``dcp``: ``torch.distributed.checkpoint.save/load`` without a process group (``no_dist``),
  ``FileSystemWriter`` defaults (one thread, one file per rank, fsync), load in place.
* ``torch``: ``torch.save`` to one file (no fsync: its fsync is timed apart and reported) and
  ``torch.load(weights_only=True, mmap=False)``, which allocates new tensors instead of filling
  the preallocated ones (that allocation is part of its time).
* ``raw``: the physical limit of this machine: every tensor's bytes written back to back into
  one file with ``writev`` and fsynced, then read back with ``preadv`` into the preallocated
  tensors. No format, no checksums, one thread.

The baseline of the targets is ``dcp``: ckpt's save and load throughput should be at least
DCP's (ratio >= 1.0) and verifying checksums should add at most 10% to ckpt's load time.

Page cache: loads run right after the save, so unless ``--drop-caches`` works (it needs root),
every method reads from the page cache alike: the load figures measure the software path, not
the disk. Every figure is the median of ``--runs`` runs (after ``--warmup`` untimed rounds,
which let the first touches of fresh memory and page cache fall outside the measurement); a
run's load figure is itself the median of ``--load-repeats`` loads of the same files, the
load variants alternating (a warm load takes ~0.1 s, so single loads are too noisy to give
the checksum overhead). Ratios are ratios of the medians; the per-run ratios, paired within a
run, are printed beside them. GB/s counts the state's tensor bytes (1 GB = 1e9 bytes). Every
method's loaded data is compared with the original once. Prints a Markdown table; writes
every run's numbers, the machine and the verdict on each target to ``--json``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed.checkpoint as dcp

import ckpt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (needs the path above when run from the repo root)
    drop_page_cache,
    filesystem_of,
    free_bytes,
    gbps,
    machine,
    markdown_table,
    median,
    timed,
    write_json,
)

DEFAULT_JSON = Path("bench-results/save_load.json")
METHODS = ("ckpt", "dcp", "torch", "raw")
TARGETS = {"save_vs_dcp_min": 1.0, "load_vs_dcp_min": 1.0, "checksum_overhead_max": 0.10}
_IOV_MAX = 512


# --------------------------------------------------------------------------------------------
# the state
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GptShape:
    """Sizes of the GPT-like model; ``for_gib`` picks them for a total state size."""

    vocab: int
    context: int
    d_model: int
    layers: int

    @classmethod
    def for_gib(cls, gib: float) -> "GptShape":
        """Width grows with sqrt(size), then layers fill the model's third of the bytes."""
        d = max(64, 64 * round(16 * math.sqrt(gib)))  # 1024 at 1 GiB
        vocab = max(1024, round(50304 * min(1.0, gib)))  # GPT-2's padded vocabulary at >= 1 GiB
        context = max(256, round(2048 * min(1.0, gib)))
        model_bytes = gib * 2**30 / 3
        fixed = 4 * (vocab * d + context * d + 2 * d)
        per_block = 4 * (12 * d * d + 13 * d)
        layers = max(1, round((model_bytes - fixed) / per_block))
        return cls(vocab, context, d, layers)

    def parameters(self) -> list[tuple[str, tuple[int, ...]]]:
        """Parameter names and shapes, in ``nn.Module`` order (Linear weights are (out, in))."""
        d = self.d_model
        out = [("tok_emb.weight", (self.vocab, d)), ("pos_emb.weight", (self.context, d))]
        for i in range(self.layers):
            p = f"blocks.{i}."
            out += [
                (p + "ln1.weight", (d,)), (p + "ln1.bias", (d,)),
                (p + "attn.qkv.weight", (3 * d, d)), (p + "attn.qkv.bias", (3 * d,)),
                (p + "attn.proj.weight", (d, d)), (p + "attn.proj.bias", (d,)),
                (p + "ln2.weight", (d,)), (p + "ln2.bias", (d,)),
                (p + "mlp.fc.weight", (4 * d, d)), (p + "mlp.fc.bias", (4 * d,)),
                (p + "mlp.proj.weight", (d, 4 * d)), (p + "mlp.proj.bias", (d,)),
            ]
        return out + [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]


def build_state(shape: GptShape, seed: int = 0) -> dict[str, Any]:
    """Model weights (randn * 0.02) and Adam moments of the same shapes, float32."""
    gen = torch.Generator().manual_seed(seed)
    model: dict[str, torch.Tensor] = {}
    moments: dict[str, dict[str, torch.Tensor]] = {}
    for name, size in shape.parameters():
        model[name] = torch.randn(size, generator=gen).mul_(0.02)
        moments[name] = {
            "exp_avg": torch.randn(size, generator=gen).mul_(1e-3),
            "exp_avg_sq": torch.randn(size, generator=gen).square_().mul_(1e-6),
        }
    return {"model": model, "optim": {"state": moments, "step": torch.tensor(1000.0)}}


def leaves(tree: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a nested dict, with its dotted path, in insertion order."""
    if isinstance(tree, torch.Tensor):
        yield path, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from leaves(v, f"{path}.{k}" if path else str(k))


def zeros_like_state(tree: Any) -> Any:
    """The same structure with zero tensors (pages touched now, not inside a timed load)."""
    if isinstance(tree, torch.Tensor):
        return torch.zeros_like(tree)
    return {k: zeros_like_state(v) for k, v in tree.items()}


def zero_state(tree: Any) -> None:
    for _, t in leaves(tree):
        t.zero_()


def check_equal(method: str, original: Any, loaded: Any) -> None:
    """Raises ``RuntimeError`` naming the first tensor that differs or is missing."""
    got = dict(leaves(loaded))
    for name, t in leaves(original):
        other = got.get(name)
        if other is None or other.shape != t.shape or other.dtype != t.dtype or not torch.equal(other, t):
            raise RuntimeError(f"{method}: tensor {name!r} did not round-trip; the benchmark is invalid")
    if len(got) != sum(1 for _ in leaves(original)):
        raise RuntimeError(f"{method}: loaded {len(got)} tensors, saved a different number")


def _byte_views(tree: Any) -> list[memoryview]:
    return [memoryview(t.reshape(-1).view(torch.uint8).numpy()) for _, t in leaves(tree) if t.numel()]


# --------------------------------------------------------------------------------------------
# the methods: save(state, dir) and load variants (target, dir) -> loaded tree
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """One way to save and load; ``loads`` maps a variant label to its load function."""

    name: str
    save: Callable[[Any, str], None]
    loads: dict[str, Callable[[Any, str], Any]]
    in_place: bool = True  # loads fill the preallocated target (else they return new tensors)


def make_methods(io_threads: Optional[int]) -> dict[str, Method]:
    def ckpt_save(state: Any, d: str) -> None:
        ckpt.save(state, d, step=1, compression=None, io_threads=io_threads)

    def ckpt_load(verify: bool) -> Callable[[Any, str], Any]:
        def load(target: Any, d: str) -> Any:
            ckpt.load(target, d, verify=verify, io_threads=io_threads)
            return target
        return load

    def dcp_save(state: Any, d: str) -> None:
        dcp.save(state, checkpoint_id=d, no_dist=True)

    def dcp_load(target: Any, d: str) -> Any:
        dcp.load(target, checkpoint_id=d, no_dist=True)
        return target

    def torch_save(state: Any, d: str) -> None:
        torch.save(state, os.path.join(d, "state.pt"))

    def torch_load(target: Any, d: str) -> Any:
        return torch.load(os.path.join(d, "state.pt"), weights_only=True, mmap=False)

    def raw_save(state: Any, d: str) -> None:
        views = _byte_views(state)
        fd = os.open(os.path.join(d, "raw.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for i in range(0, len(views), _IOV_MAX):
                batch = views[i : i + _IOV_MAX]
                if os.writev(fd, batch) != sum(v.nbytes for v in batch):
                    raise RuntimeError("raw: short write")
            os.fsync(fd)
        finally:
            os.close(fd)

    def raw_load(target: Any, d: str) -> Any:
        views = _byte_views(target)
        fd = os.open(os.path.join(d, "raw.bin"), os.O_RDONLY)
        try:
            offset = 0
            for i in range(0, len(views), _IOV_MAX):
                batch = views[i : i + _IOV_MAX]
                want = sum(v.nbytes for v in batch)
                if os.preadv(fd, batch, offset) != want:
                    raise RuntimeError("raw: short read")
                offset += want
        finally:
            os.close(fd)
        return target

    return {
        "ckpt": Method("ckpt", ckpt_save, {"verify=True": ckpt_load(True), "verify=False": ckpt_load(False)}),
        "dcp": Method("dcp", dcp_save, {"": dcp_load}),
        "torch": Method("torch", torch_save, {"": torch_load}, in_place=False),
        "raw": Method("raw", raw_save, {"": raw_load}),
    }


def _fsync_tree(d: str) -> None:
    for root, _, files in os.walk(d):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _disk_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------
def measure_once(method: Method, state: Any, target: Any, base: str, label: str, *, check: bool, drop: bool, flip: bool, load_repeats: int) -> dict[str, Any]:
    """Saves once with ``method`` into a fresh directory, loads it back, deletes it."""
    d = os.path.join(base, f"{label}-{method.name}")
    os.makedirs(d)
    try:
        out: dict[str, Any] = {}
        out["save_s"], _ = timed(lambda: method.save(state, d))
        out["bytes_on_disk"] = _disk_bytes(d)
        if method.name == "torch":  # torch.save does not fsync: time that apart, for fairness
            out["fsync_after_s"], _ = timed(lambda: _fsync_tree(d))
        out.update(_time_loads(method, state, target, d, check=check, drop=drop, flip=flip, repeats=load_repeats))
        return out
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _time_loads(method: Method, state: Any, target: Any, d: str, *, check: bool, drop: bool, flip: bool, repeats: int) -> dict[str, Any]:
    """Loads ``repeats`` times per variant; a variant's figure is the median of its repeats.

    The variants alternate within the run (and which goes first alternates between runs):
    loads from the page cache take a tenth of a second, where one scheduler hiccup would
    otherwise decide the checksum overhead.
    """
    times: dict[str, list[float]] = {variant: [] for variant in method.loads}
    out: dict[str, Any] = {}
    for rep in range(repeats):
        variants = list(method.loads.items())
        if (rep + flip) % 2:
            variants.reverse()
        for variant, load in variants:
            if method.in_place:
                zero_state(target)
            if drop:
                why = drop_page_cache()
                if why:
                    out.setdefault("drop_caches_error", why)
            seconds, loaded = timed(lambda: load(target, d))
            times[variant].append(seconds)
            if check and rep == 0:
                check_equal(f"{method.name} {variant}".strip(), state, loaded)
            del loaded
    for variant, values in times.items():
        suffix = f"[{variant}]" if variant else ""
        out[f"load_s{suffix}"] = median(values)
        out[f"load_repeats_s{suffix}"] = values
    return out


def _measure_all(args: argparse.Namespace, state: Any, target: Any, parent: str) -> tuple[list[dict[str, Any]], Optional[str]]:
    """Every round (warm-up ones first), the method order rotating; returns the run records."""
    base = tempfile.mkdtemp(prefix="ckpt-bench-save-load-", dir=parent)
    methods = make_methods(args.io_threads)
    runs: list[dict[str, Any]] = []
    drop_error = None
    try:
        for r in range(-args.warmup, args.runs):
            k = r % len(METHODS)
            order = METHODS[k:] + METHODS[:k]
            record: dict[str, Any] = {"run": r, "warmup": r < 0, "order": list(order), "results": {}}
            for name in order:
                res = measure_once(
                    methods[name], state, target, base, f"run{r}",
                    check=(r == 0), drop=args.drop_caches, flip=bool(r % 2),
                    load_repeats=args.load_repeats,
                )
                drop_error = drop_error or res.pop("drop_caches_error", None)
                record["results"][name] = res
                figures = ", ".join(f"{key}={v:.3f}" for key, v in res.items() if isinstance(v, float))
                sys.stderr.write(f"run {r}: {name} {figures}\n")  # progress; the table goes to stdout
            runs.append(record)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return runs, drop_error


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs every measurement and returns the JSON record."""
    shape = GptShape.for_gib(args.gib)
    state = build_state(shape)
    target = zeros_like_state(state)
    tensors = list(leaves(state))
    nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
    model_bytes = sum(t.numel() * t.element_size() for _, t in leaves(state["model"]))

    base_parent = args.dir or tempfile.gettempdir()
    os.makedirs(base_parent, exist_ok=True)
    need = 2 * nbytes + (1 << 30)
    if free_bytes(base_parent) < need:
        raise SystemExit(f"{base_parent}: {free_bytes(base_parent) >> 20} MiB free, need {need >> 20} MiB; pass --dir")
    runs, drop_error = _measure_all(args, state, target, base_parent)
    timed_runs = [rec for rec in runs if not rec["warmup"]]
    summary = summarize(timed_runs, nbytes)
    if not args.drop_caches:
        page_cache = "warm: every load read files just written (page cache), for every method alike"
    elif drop_error:
        page_cache = f"warm: --drop-caches failed ({drop_error}); every load read from the page cache"
    else:
        page_cache = "cold: page cache dropped (sync; echo 1 > /proc/sys/vm/drop_caches) before every load"
    return {
        "benchmark": "save_load",
        "machine": machine(),
        "config": {
            "gib": args.gib,
            "state_bytes": nbytes,
            "model_bytes": model_bytes,
            "tensors": len(tensors),
            "shape": asdict(shape),
            "runs": args.runs,
            "warmup": args.warmup,
            "load_repeats": args.load_repeats,
            "statistic": "median",
            "io_threads": args.io_threads or f"library default (min(4, cpus) = {min(4, os.cpu_count() or 1)})",
            "dir": base_parent,
            "filesystem": filesystem_of(base_parent),
            "page_cache": page_cache,
            "ckpt": {"version": getattr(ckpt, "__version__", "?"), "compression": None, "checksum": "crc32c"},
            "dcp": "FileSystemWriter defaults: thread_count=1, sync_files=True, single_file_per_rank=True",
            "torch": "torch.save (no fsync; fsync_after_s timed apart) / torch.load(weights_only=True, mmap=False), allocates",
            "raw": "writev + fsync of one file / preadv into the preallocated tensors, one thread",
        },
        "baseline": "dcp",
        "targets": TARGETS,
        "summary": summary,
        "runs": timed_runs,
        "warmup_runs": [rec for rec in runs if rec["warmup"]],
    }


def summarize(runs: list[dict[str, Any]], nbytes: int) -> dict[str, Any]:
    """Medians per method, the ratios against DCP and the verdict on each target."""

    def series(method: str, key: str) -> list[float]:
        return [rec["results"][method][key] for rec in runs]

    rows = []
    for method, save_key, load_key, label in (
        ("ckpt", "save_s", "load_s[verify=True]", "ckpt (checksums, verify=True)"),
        ("ckpt", None, "load_s[verify=False]", "ckpt load verify=False (same files)"),
        ("dcp", "save_s", "load_s", "dcp (baseline)"),
        ("torch", "save_s", "load_s", "torch.save / torch.load"),
        ("raw", "save_s", "load_s", "raw writev+fsync / preadv (limit)"),
    ):
        row: dict[str, Any] = {"method": label, "key": method}
        for what, key in (("save", save_key), ("load", load_key)):
            if key is None:
                continue
            values = series(method, key)
            row[f"{what}_runs_s"] = values
            row[f"{what}_s"] = median(values)
            row[f"{what}_gbps"] = gbps(nbytes, row[f"{what}_s"])
        if method == "torch":
            row["fsync_after_s"] = median(series("torch", "fsync_after_s"))
        rows.append(row)
    by = {r["method"]: r for r in rows}
    ck, ck_nv, base = by["ckpt (checksums, verify=True)"], by["ckpt load verify=False (same files)"], by["dcp (baseline)"]
    for row in rows:
        for what in ("save", "load"):
            if f"{what}_s" in row:
                row[f"{what}_vs_dcp"] = base[f"{what}_s"] / row[f"{what}_s"]

    def paired(a: list[float], b: list[float], fn: Callable[[float, float], float]) -> list[float]:
        return [fn(x, y) for x, y in zip(a, b)]

    save_ratio = base["save_s"] / ck["save_s"]
    load_ratio = base["load_s"] / ck["load_s"]
    overhead = (ck["load_s"] - ck_nv["load_s"]) / ck_nv["load_s"]
    ratios = {
        "save_vs_dcp": {
            "value": save_ratio,
            "per_run": paired(base["save_runs_s"], ck["save_runs_s"], lambda b, c: b / c),
            "target": f">= {TARGETS['save_vs_dcp_min']}",
            "met": save_ratio >= TARGETS["save_vs_dcp_min"],
        },
        "load_vs_dcp": {
            "value": load_ratio,
            "per_run": paired(base["load_runs_s"], ck["load_runs_s"], lambda b, c: b / c),
            "target": f">= {TARGETS['load_vs_dcp_min']}",
            "met": load_ratio >= TARGETS["load_vs_dcp_min"],
        },
        "checksum_overhead_on_load": {
            "value": overhead,
            "per_run": paired(ck["load_runs_s"], ck_nv["load_runs_s"], lambda v, n: (v - n) / n),
            "target": f"<= {TARGETS['checksum_overhead_max']}",
            "met": overhead <= TARGETS["checksum_overhead_max"],
        },
    }
    for ratio in ratios.values():
        ratio["per_run_median"] = median(ratio["per_run"])
    return {"rows": rows, "ratios": ratios}


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------
def format_report(record: dict[str, Any]) -> str:
    """The Markdown table, the ratios against DCP and the notes a reader needs."""
    cfg, m, s = record["config"], record["machine"], record["summary"]

    def f(row: dict[str, Any], key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else "-"

    def runs_of(row: dict[str, Any], key: str) -> str:
        return " / ".join(f"{v:.2f}" for v in row[key]) if key in row else "-"

    table = markdown_table(
        ["method", "save s", "save GB/s", "vs DCP", "load s", "load GB/s", "vs DCP", "save runs s", "load runs s"],
        [
            [
                r["method"], f(r, "save_s", ".3f"), f(r, "save_gbps", ".2f"), f(r, "save_vs_dcp", ".2f"),
                f(r, "load_s", ".3f"), f(r, "load_gbps", ".2f"), f(r, "load_vs_dcp", ".2f"),
                runs_of(r, "save_runs_s"), runs_of(r, "load_runs_s"),
            ]
            for r in s["rows"]
        ],
        right=[False] + [True] * 8,
    )
    lines = [
        f"save/load, {cfg['state_bytes'] / 2**30:.3f} GiB state ({cfg['tensors']} float32 tensors, "
        f"model {cfg['model_bytes'] / 2**20:.0f} MiB + Adam), median of {cfg['runs']} runs "
        f"(+{cfg['warmup']} warm-up), {m['cpu']} ({m['cpu_count']} cpus), torch {m.get('torch')}, "
        f"python {m['python']}, {cfg['filesystem']['type']} on {cfg['filesystem']['device']} ({cfg['dir']})",
        "",
        table,
        "",
        "Ratios (throughput, ratio of medians; per run in brackets):",
    ]
    labels = {
        "save_vs_dcp": "ckpt save / DCP save",
        "load_vs_dcp": "ckpt load (verify) / DCP load",
        "checksum_overhead_on_load": "checksum overhead on load (verify - noverify) / noverify",
    }
    for key, ratio in s["ratios"].items():
        per_run = ", ".join(f"{v:+.1%}" if key.startswith("checksum") else f"{v:.2f}" for v in ratio["per_run"])
        value = f"{ratio['value']:+.1%}" if key.startswith("checksum") else f"{ratio['value']:.2f}x"
        lines.append(f"- {labels[key]}: {value} [{per_run}]  target {ratio['target']}: {'met' if ratio['met'] else 'MISSED'}")
    torch_row = next(r for r in s["rows"] if r["key"] == "torch")
    lines += [
        "",
        f"Page cache: {cfg['page_cache']}.",
        f"torch.save does not fsync (an fsync right after took {torch_row['fsync_after_s']:.3f} s, median); "
        "torch.load allocates new tensors, the others fill preallocated ones.",
        f"ckpt io_threads: {cfg['io_threads']}; DCP: {cfg['dcp']}.",
    ]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--gib", type=float, default=1.0, help="state size in GiB (default 1.0)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per method (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--load-repeats", type=int, default=3, help="loads per save and variant; their median counts (default 3)")
    parser.add_argument("--dir", default=None, help="parent of the scratch directory (default: the temp dir)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"JSON output (default {DEFAULT_JSON})")
    parser.add_argument("--io-threads", type=int, default=None, help="ckpt io_threads (default: the library's)")
    parser.add_argument("--drop-caches", action="store_true", help="drop the page cache before every load (root only)")
    args = parser.parse_args(argv)
    if args.gib <= 0 or args.runs < 1 or args.warmup < 0 or args.load_repeats < 1:
        parser.error("--gib must be > 0, --runs >= 1, --load-repeats >= 1, --warmup >= 0")
    warnings.filterwarnings("ignore", module=r"torch\.distributed")
    record = run(args)
    sys.stdout.write(format_report(record) + "\n")
    write_json(args.json, record)
    sys.stdout.write(f"wrote {args.json}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
