"""Streaming conversion: DCP -> universal -> safetensors against a raw copy and DCP's converter.

Usage::

    python tests/benchmarks/bench_convert.py [--gib 2.0] [--runs 3] [--dir DIR]
        [--json bench-results/convert.json] [--threads 2]

The source is a ~``--gib`` GiB GPT-like model state dict (float32: a 50304 x 2048 token
embedding, the largest tensor, and blocks of qkv / proj / mlp weights with biases and layer
norms) saved by ``torch.distributed.checkpoint.save`` itself, in a subprocess. Then, each run,
every step runs in a **fresh subprocess** that reports its wall time and its peak resident set
(``VmHWM``) along with the footprint right after its imports:

* ``dcp -> universal``: ``ckpt.convert`` of the DCP checkpoint to a ckpt checkpoint root
  (crc32c per chunk and per 256 KiB block, fsync per object, manifest last);
* ``universal -> safetensors``: ``ckpt.convert`` to one ``.safetensors`` file (fsync, rename);
* ``raw read+write`` of each step's bytes: the same source files read with ``preadv`` into one
  64 MiB buffer and written back to back into one file, fsynced. No format, no checksums: the
  speed limit of this machine for moving those bytes, measured in the same run;
* ``dcp -> torch`` with ``ckpt.convert`` and with DCP's own
  ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` (the baseline for time and
  memory: it loads the whole model into one process; ckpt's ``torch`` output must hold the whole
  state too, since ``torch.save`` cannot stream).

Targets: each ckpt step moves bytes at >= 0.5x the raw read+write throughput of the same bytes,
and its peak RSS is <= 2 x the largest tensor + 256 MiB. Figures are medians over ``--runs``;
the page cache is warm (the source was just written) unless the machine's memory is smaller
than the checkpoint. GB/s counts tensor bytes (1 GB = 1e9 bytes). Prints a Markdown table and
writes the JSON record (every run, the machine, the verdicts) to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import filesystem_of, free_bytes, gbps, machine, markdown_table, median, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_JSON = ROOT / "bench-results" / "convert.json"
MiB = 1 << 20
VOCAB, HIDDEN = 50304, 2048

CHILD = r"""
import json, os, sys, time
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0
mode, args = sys.argv[1], sys.argv[2:]
import torch, numpy
if mode == "make":
    import warnings
    import torch.distributed.checkpoint as dcp
    vocab, hidden, layers = int(args[1]), int(args[2]), int(args[3])
    g = torch.Generator().manual_seed(0)
    sd = {"embed.weight": torch.randn(vocab, hidden, generator=g)}
    for i in range(layers):
        p = f"layers.{i}."
        sd[p + "ln1.weight"] = torch.ones(hidden); sd[p + "ln1.bias"] = torch.zeros(hidden)
        sd[p + "attn.qkv.weight"] = torch.randn(3 * hidden, hidden, generator=g); sd[p + "attn.qkv.bias"] = torch.zeros(3 * hidden)
        sd[p + "attn.proj.weight"] = torch.randn(hidden, hidden, generator=g); sd[p + "attn.proj.bias"] = torch.zeros(hidden)
        sd[p + "mlp.up.weight"] = torch.randn(4 * hidden, hidden, generator=g); sd[p + "mlp.up.bias"] = torch.zeros(4 * hidden)
        sd[p + "mlp.down.weight"] = torch.randn(hidden, 4 * hidden, generator=g); sd[p + "mlp.down.bias"] = torch.zeros(hidden)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": sd}, checkpoint_id=args[0])
    print(json.dumps({"bytes": sum(t.nbytes for t in sd.values()), "largest": max(t.nbytes for t in sd.values()), "tensors": len(sd)}))
    sys.exit(0)
if mode == "dcp_to_torch":
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    import warnings
    warnings.simplefilter("ignore")
    base = hwm(); t0 = time.perf_counter()
    dcp_to_torch_save(args[0], args[1])
    fd = os.open(args[1], os.O_RDONLY); os.fsync(fd); os.close(fd)
    print(json.dumps({"seconds": time.perf_counter() - t0, "base": base, "peak": hwm()})); sys.exit(0)
if mode == "raw":
    srcs, dst = args[:-1], args[-1]
    base = hwm(); t0 = time.perf_counter()
    buf = bytearray(64 << 20); view = memoryview(buf); total = 0
    out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    for src in srcs:
        fd = os.open(src, os.O_RDONLY); pos = 0
        while True:
            n = os.preadv(fd, [view], pos)
            if n <= 0: break
            done = 0
            while done < n: done += os.write(out, view[done:n])
            pos += n
        os.close(fd); total += pos
    os.fsync(out); os.close(out)
    print(json.dumps({"seconds": time.perf_counter() - t0, "base": base, "peak": hwm(), "bytes": total})); sys.exit(0)
import ckpt, ckpt.convert, ckpt._read, ckpt._save, ckpt.formats.dcp, ckpt.formats.universal, ckpt.formats.safetensors, ckpt.formats.torchsave
base = hwm(); t0 = time.perf_counter()
r = ckpt.convert.convert(args[0], args[1], dst_format=args[2], io_threads=int(args[3]))
print(json.dumps({"seconds": time.perf_counter() - t0, "base": base, "peak": hwm(), "bytes": r.bytes_in, "largest": r.largest_tensor_bytes}))
"""


def child(*args: str) -> dict[str, Any]:
    res = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"benchmark step {args[:1]} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def files_under(path: Path) -> list[str]:
    return sorted(str(p) for p in path.rglob("*") if p.is_file())


def layers_for(gib: float) -> int:
    per_layer = (12 * HIDDEN * HIDDEN + 13 * HIDDEN) * 4
    return max(1, round((gib * 2**30 - VOCAB * HIDDEN * 4) / per_layer))


def one_run(work: Path, src: Path, threads: int) -> dict[str, Any]:
    uni, st, pt, dcp_pt = work / "uni", work / "model.safetensors", work / "ckpt.pt", work / "dcp.pt"
    out: dict[str, Any] = {}
    out["raw_dcp"] = child("raw", *files_under(src), str(work / "raw1.bin"))
    out["dcp_to_universal"] = child("convert", str(src), str(uni), "universal", str(threads))
    out["raw_universal"] = child("raw", *files_under(uni / "data"), str(work / "raw2.bin"))
    out["universal_to_safetensors"] = child("convert", str(uni), str(st), "safetensors", str(threads))
    out["ckpt_dcp_to_torch"] = child("convert", str(src), str(pt), "torch", str(threads))
    out["dcp_to_torch_save"] = child("dcp_to_torch", str(src), str(dcp_pt))
    for p in (uni, st, pt, dcp_pt, work / "raw1.bin", work / "raw2.bin"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return out


def summarize(runs: list[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    nbytes, largest = info["bytes"], info["largest"]
    bound = 2 * largest + 256 * MiB

    def med(step: str, key: str) -> float:
        return median([r[step][key] for r in runs])

    rows = {}
    for step, raw in (("dcp_to_universal", "raw_dcp"), ("universal_to_safetensors", "raw_universal"), ("ckpt_dcp_to_torch", "raw_dcp"),
                      ("dcp_to_torch_save", "raw_dcp")):
        secs, raw_secs = med(step, "seconds"), med(raw, "seconds")
        peak = max(r[step]["peak"] for r in runs)
        rows[step] = {
            "seconds": secs, "gbps": gbps(nbytes, secs), "raw_seconds": raw_secs, "raw_gbps": gbps(nbytes, raw_secs),
            "ratio_vs_raw": raw_secs / secs, "peak_rss_bytes": peak, "base_rss_bytes": median([r[step]["base"] for r in runs]),
        }
    streaming = ("dcp_to_universal", "universal_to_safetensors")
    verdict = {
        "throughput_ge_0.5x_raw": all(rows[s]["ratio_vs_raw"] >= 0.5 for s in streaming),
        "peak_rss_le_2x_largest_plus_256MiB": all(rows[s]["peak_rss_bytes"] <= bound for s in streaming),
    }
    chain = rows["dcp_to_universal"]["seconds"] + rows["universal_to_safetensors"]["seconds"]
    return {"rows": rows, "bound_bytes": bound, "verdict": verdict, "chain_seconds": chain,
            "chain_peak_rss_bytes": max(rows[s]["peak_rss_bytes"] for s in streaming)}


def format_report(record: dict[str, Any]) -> str:
    s, info = record["summary"], record["checkpoint"]
    labels = {"dcp_to_universal": "ckpt convert dcp -> universal", "universal_to_safetensors": "ckpt convert universal -> safetensors",
              "ckpt_dcp_to_torch": "ckpt convert dcp -> torch (holds all)", "dcp_to_torch_save": "DCP dcp_to_torch_save (baseline)"}
    rows = []
    for key, label in labels.items():
        r = s["rows"][key]
        rows.append([label, f"{r['seconds']:.2f}", f"{r['gbps']:.2f}", f"{r['raw_gbps']:.2f}", f"{r['ratio_vs_raw']:.2f}x",
                     f"{r['peak_rss_bytes'] / MiB:.0f}", f"{(r['peak_rss_bytes'] - r['base_rss_bytes']) / MiB:.0f}"])
    table = markdown_table(["step", "s", "GB/s", "raw read+write GB/s", "vs raw", "peak RSS MiB", "above imports MiB"], rows,
                           right=[False] + [True] * 6)
    base = s["rows"]["dcp_to_torch_save"]
    lines = [
        f"checkpoint: {info['tensors']} tensors, {info['bytes'] / 2**30:.2f} GiB, largest tensor {info['largest'] / MiB:.0f} MiB; "
        f"{record['runs']} run(s), medians; {record['filesystem']['type']} at {record['filesystem']['mount']}",
        "",
        table,
        "",
        f"DCP -> universal -> safetensors: {s['chain_seconds']:.2f} s, peak RSS {s['chain_peak_rss_bytes'] / MiB:.0f} MiB; "
        f"DCP's dcp_to_torch_save: {base['seconds']:.2f} s, peak RSS {base['peak_rss_bytes'] / MiB:.0f} MiB",
        f"bound 2 x largest + 256 MiB = {s['bound_bytes'] / MiB:.0f} MiB; verdict: {json.dumps(s['verdict'])}",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    parent = args.dir or tempfile.gettempdir()
    need = int(args.gib * 2**30 * 5.5)
    if free_bytes(parent) < need:
        raise SystemExit(f"{parent}: needs ~{need / 2**30:.1f} GiB free (source, outputs, raw copies); use --dir")
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-convert-", dir=parent))
    try:
        src = work / "dcp"
        info = child("make", str(src), str(VOCAB), str(HIDDEN), str(layers_for(args.gib)))
        runs = []
        for i in range(args.runs):
            runs.append(one_run(work, src, args.threads))
            print(f"run {i + 1}/{args.runs} done", file=sys.stderr)
        import torch

        record = {"benchmark": "convert", "checkpoint": info, "runs": args.runs, "threads": args.threads, "machine": machine(),
                  "torch": torch.__version__, "filesystem": filesystem_of(str(work)), "raw_runs": runs}
        record["summary"] = summarize(runs, info)
        return record
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--gib", type=float, default=2.0, help="checkpoint size in GiB (default 2.0)")
    parser.add_argument("--runs", type=int, default=3, help="runs, medians reported (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="convert io_threads (default 2)")
    parser.add_argument("--dir", default=None, help="parent of the scratch directory (default: the temp dir)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"JSON output (default {DEFAULT_JSON})")
    args = parser.parse_args(argv)
    if not Path("/proc/self/status").exists():
        raise SystemExit("this benchmark reads peak RSS from /proc (Linux only)")
    record = run(args)
    print(format_report(record))
    write_json(args.json, record)
    print(f"\nJSON record: {args.json}")
    return 0 if all(record["summary"]["verdict"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
