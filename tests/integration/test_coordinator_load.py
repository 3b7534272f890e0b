"""A bounded load test on loopback: 200 simulated agents (one grpc.aio client) register and
heartbeat against a coordinator subprocess for ~6 s; no call fails, every agent stays live, and
the 20 agents that stop heartbeating midway are all declared failed, each within
timeout + interval + generous slack of its last heartbeat."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("prometheus_client")

from ckpt.layout import Layout  # noqa: E402
from recovery import wire  # noqa: E402
from recovery._proto import coordinator_pb2 as pb  # noqa: E402
from recovery._proto import coordinator_pb2_grpc as pb_grpc  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
AGENTS, KILLED = 200, 20
INTERVAL_S, TIMEOUT_S = 0.25, 1.0
RUN_S, KILL_AT_S = 6.0, 2.0
SLACK_S = 2.0  # loopback on a loaded CI machine; the bound itself is timeout + interval
DEADLINE = 5.0
JOB = "load"

pytestmark = pytest.mark.slow


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=DEADLINE) as r:
        lines = r.read().decode().splitlines()
    return {k: float(v) for k, _, v in (x.rpartition(" ") for x in lines if x and not x.startswith("#"))}


async def agent(stub, rank: int, layout: Layout, t0: float, stop_at: float, errors: list) -> float:
    """Register, heartbeat every interval until ``stop_at``; return the wall time of the last beat."""
    gen = (await stub.Register(pb.RegisterRequest(job=JOB, rank=rank, node=f"node{rank // 8}",
                                                  agent_address=f"127.0.0.1:{9000 + rank}",
                                                  layout=wire.layout_to_pb(layout.with_rank(rank), with_coords=True)),
                               timeout=DEADLINE)).generation
    member = pb.MemberId(job=JOB, rank=rank, generation=gen)
    last = time.time()
    await asyncio.sleep((rank % 50) / 50 * INTERVAL_S)  # spread the beats over the interval
    while time.monotonic() - t0 < stop_at:
        try:
            resp = await stub.Heartbeat(pb.HeartbeatRequest(member=member), timeout=DEADLINE)
            last = time.time()
            if resp.generation < gen:
                errors.append((rank, f"generation went back to {resp.generation}"))
        except grpc.aio.AioRpcError as e:
            errors.append((rank, f"{e.code().name}: {e.details()}"))
        await asyncio.sleep(INTERVAL_S)
    return last


async def watch_failures(stub, want: int, until: float) -> dict[int, float]:
    """``{rank: detection wall time}`` of FAILED events until ``want`` are seen or ``until``."""
    got: dict[int, float] = {}
    call = stub.WatchMembership(pb.WatchMembershipRequest(job=JOB), timeout=until - time.monotonic())
    try:
        async for ev in call:
            if ev.kind == pb.MembershipEvent.FAILED:
                got[ev.rank] = ev.time_unix_ms / 1000
                if len(got) >= want:
                    break
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    finally:
        call.cancel()
    return got


async def run_load(port: int, mport: int) -> tuple[list, dict, dict, dict]:
    layout = Layout.grid(dp=AGENTS)
    errors: list = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        t0 = time.monotonic()
        tasks = [asyncio.create_task(agent(stub, r, layout, t0, KILL_AT_S if r < KILLED else RUN_S, errors))
                 for r in range(AGENTS)]
        await asyncio.sleep(0.5)
        watcher = asyncio.create_task(watch_failures(stub, KILLED, t0 + RUN_S + 2))
        await asyncio.sleep(RUN_S - 1.0 - (time.monotonic() - t0))
        mid = await asyncio.to_thread(scrape, mport)  # while the survivors still beat
        last = dict(enumerate(await asyncio.gather(*tasks)))
        failed = await watcher
    return errors, last, failed, mid


def test_200_agents_heartbeat_and_a_killed_subset_is_detected(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CKPT_COORDINATOR_TOKEN"}
    proc = subprocess.Popen([sys.executable, "-m", "recovery", "--listen", "127.0.0.1:0", "--state-dir",
                             str(tmp_path / "state"), "--metrics-port", "0",
                             "--heartbeat-interval-ms", str(int(INTERVAL_S * 1000)),
                             "--heartbeat-timeout-ms", str(int(TIMEOUT_S * 1000))],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = int(proc.stdout.readline().rsplit(":", 1)[1])
        mport = int(proc.stdout.readline().rsplit(":", 1)[1])
        errors, last, failed, mid = asyncio.run(asyncio.wait_for(run_load(port, mport), timeout=30))
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
    assert rc == 0
    assert errors == [], errors[:5]
    assert mid["ckpt_coordinator_members"] == AGENTS - KILLED  # every survivor stayed live
    assert mid[f'ckpt_coordinator_failures_total{{job="{JOB}"}}'] == KILLED
    assert mid['ckpt_coordinator_rpc_latency_seconds_count{code="OK",method="Heartbeat"}'] > AGENTS * 10
    assert set(failed) == set(range(KILLED))  # exactly the killed subset was detected
    for r, when in failed.items():
        # never before the timeout (less the reply's trip back), never long after timeout + interval
        assert TIMEOUT_S - 0.2 <= when - last[r] <= TIMEOUT_S + INTERVAL_S + SLACK_S, (r, when - last[r])
