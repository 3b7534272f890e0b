"""``python -m recovery plan``: ask a running coordinator for a restore plan and print it.

A thin gRPC client: every call carries a deadline (``--timeout``), the token (from
``--token-file`` or ``$CKPT_COORDINATOR_TOKEN``) travels as ``authorization: Bearer`` metadata,
``--tls-ca`` switches to a TLS channel that trusts that PEM bundle. ``--explain`` also prints why
each source was chosen (the coordinator's ``explanation`` lines).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, TextIO

from ckpt.layout import Layout

__all__ = ["plan_main", "parse_layout_arg", "parse_ranks_arg"]


def parse_layout_arg(text: str) -> Layout:
    """``"tp=2,pp=1,dp=4"`` -> a ``Layout`` with those axes in that order (slowest first)."""
    axes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, size = part.partition("=")
        if not eq or not name.isidentifier() or not size.isdigit() or int(size) < 1:
            raise argparse.ArgumentTypeError(f"layout axis {part!r}: write NAME=SIZE, e.g. tp=2,pp=1,dp=4")
        axes.append((name, int(size)))
    if not axes or len({n for n, _ in axes}) != len(axes):
        raise argparse.ArgumentTypeError(f"layout {text!r}: give each axis once, e.g. tp=2,pp=1,dp=4")
    return Layout(tuple(axes), 0)


def parse_ranks_arg(text: str) -> tuple[int, ...]:
    """``"1,5,7"`` -> ``(1, 5, 7)``."""
    try:
        return tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"ranks {text!r}: write comma-separated integers, e.g. 1,5") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ckpt-coordinator plan", description=__doc__.splitlines()[0])
    p.add_argument("--address", required=True, help="HOST:PORT of the coordinator")
    p.add_argument("--job", required=True)
    p.add_argument("--layout", required=True, type=parse_layout_arg, help="the new layout, e.g. tp=2,pp=1,dp=4")
    p.add_argument("--failed", type=parse_ranks_arg, default=(), help="old ranks known to have failed, e.g. 1,5")
    p.add_argument("--rank", type=int, help="only print this new rank's plan")
    p.add_argument("--approximate", action="store_true", help="allow a neighbour-stage rebuild")
    p.add_argument("--explain", action="store_true", help="print why each source was chosen")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline of the call in seconds")
    p.add_argument("--token-file", type=Path, help="file holding the shared token (else $CKPT_COORDINATOR_TOKEN)")
    p.add_argument("--tls-ca", type=Path, help="PEM bundle to trust: connect with TLS")
    return p


def _print_plan(resp, explain: bool, out: TextIO) -> None:
    from recovery import wire

    plan = wire.plan_from_pb(resp)
    print(f"step {plan.step}{' (approximate)' if resp.approximate else ''}: {len(plan.ranks)} rank(s)", file=out)
    for rank in sorted(plan.ranks):
        for it in plan.ranks[rank]:
            box = ",".join(f"{o}:{o + s}" for o, s in zip(it.box.offsets, it.box.sizes))
            src = it.source
            where = src.manifest_key or src.agent_address or (f"group {src.parity_group}" if src.parity_group else "")
            ranks = ",".join(map(str, src.ranks))
            print(f"rank {rank}: {it.tensor}[{box}] <- {src.kind.name}"
                  f"{f' ranks {ranks}' if ranks else ''}{f' {where}' if where else ''}", file=out)
    if explain:
        print("why:", file=out)
        for line in resp.explanation:
            print(f"  {line}", file=out)


def plan_main(argv: list[str], out: TextIO = sys.stdout) -> int:
    """Run ``plan``; return the exit status (0 ok, 1 the coordinator refused, 2 usage)."""
    args = _parser().parse_args(argv)
    import grpc

    from recovery import wire
    from recovery._proto import coordinator_pb2 as pb
    from recovery._proto import coordinator_pb2_grpc as pb_grpc

    token: Optional[str] = args.token_file.read_text().strip() if args.token_file else (
        os.environ.get("CKPT_COORDINATOR_TOKEN") or None)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    if args.tls_ca:
        channel = grpc.secure_channel(args.address, grpc.ssl_channel_credentials(root_certificates=args.tls_ca.read_bytes()))
    else:
        channel = grpc.insecure_channel(args.address)
    req = pb.GetRestorePlanRequest(job=args.job, target_layout=wire.layout_to_pb(args.layout, with_coords=False),
                                   failed_ranks=args.failed, allow_approximate=args.approximate)
    if args.rank is not None:
        req.for_rank = args.rank
    with channel:
        try:
            resp = pb_grpc.CoordinatorStub(channel).GetRestorePlan(req, timeout=args.timeout, metadata=metadata)
        except grpc.RpcError as e:
            print(f"ckpt-coordinator plan: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    _print_plan(resp, args.explain, out)
    return 0
