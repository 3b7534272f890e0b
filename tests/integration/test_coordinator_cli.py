"""The coordinator as a subprocess: ``--metrics-port 0`` serves /metrics, ``--log-format json``
writes JSON lines, ``plan --explain`` as a subprocess prints the plan, SIGTERM stops it cleanly,
and neither the server nor the client imports torch."""

from __future__ import annotations

import json
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
from ckpt.regions import Box  # noqa: E402
from recovery import wire  # noqa: E402
from recovery._proto import coordinator_pb2 as pb  # noqa: E402
from recovery._proto import coordinator_pb2_grpc as pb_grpc  # noqa: E402
from recovery.model import HeldRegion, SnapshotReport  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LAYOUT = Layout.grid(dp=2)
DEADLINE = 5.0


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=DEADLINE) as r:
        return r.read().decode()


def test_neither_server_nor_client_imports_torch() -> None:
    code = ("import sys, recovery.cli, recovery.server, recovery._client, recovery._metrics, recovery._logging;"
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 0


def test_metrics_json_logs_plan_explain_and_sigterm(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CKPT_COORDINATOR_TOKEN"}
    proc = subprocess.Popen([sys.executable, "-m", "recovery", "--listen", "127.0.0.1:0", "--state-dir",
                             str(tmp_path / "state"), "--metrics-port", "0", "--log-format", "json",
                             "--heartbeat-interval-ms", "100", "--heartbeat-timeout-ms", "3000"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        port = int(line.rsplit(":", 1)[1])
        line = proc.stdout.readline()
        assert line.startswith("metrics on 127.0.0.1:"), line
        mport = int(line.rsplit(":", 1)[1])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            for r in range(2):
                gen = stub.Register(pb.RegisterRequest(job="cli", rank=r, node="n", agent_address=f"h:{r + 1}",
                                                       layout=wire.layout_to_pb(LAYOUT.with_rank(r), with_coords=True)),
                                    timeout=DEADLINE).generation
                stub.ReportSnapshot(wire.snapshot_to_pb(SnapshotReport(
                    "cli", r, gen, 4, LAYOUT.with_rank(r), (HeldRegion("w", Box((0,), (8,)), 1, 32),))),
                    timeout=DEADLINE)
        plan = subprocess.run([sys.executable, "-m", "recovery", "plan", "--address", f"127.0.0.1:{port}",
                               "--job", "cli", "--layout", "dp=2", "--explain", "--timeout", "10"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert plan.returncode == 0, plan.stderr
        assert plan.stdout.startswith("step 4") and "why:" in plan.stdout and "new rank 1" in plan.stdout
        text = scrape(mport)
        assert 'ckpt_coordinator_registrations_total{job="cli"} 2.0' in text
        assert 'ckpt_coordinator_latest_recoverable_step{job="cli"} 4.0' in text
        deadline = time.monotonic() + 20  # nobody heartbeats: both fail after the 3 s timeout
        while 'ckpt_coordinator_failures_total{job="cli"} 2.0' not in text and time.monotonic() < deadline:
            time.sleep(0.1)
            text = scrape(mport)
        assert 'ckpt_coordinator_failures_total{job="cli"} 2.0' in text
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
    err = proc.stderr.read()
    assert rc == 0, err
    records = [json.loads(x) for x in err.splitlines() if x.strip()]  # every line is one JSON object
    assert {(r.get("event"), r.get("job"), r.get("rank")) for r in records} >= {("registered", "cli", 0),
                                                                                ("registered", "cli", 1)}
    assert {r["rank"] for r in records if r.get("event") == "failed"} == {0, 1}
