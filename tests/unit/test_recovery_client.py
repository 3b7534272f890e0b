"""``python -m recovery plan [--explain]``: the thin client against an in-process server (port 0)."""

from __future__ import annotations

import argparse
import io

import pytest

grpc = pytest.importorskip("grpc")

from ckpt.layout import Layout  # noqa: E402
from ckpt.regions import Box  # noqa: E402
from recovery import wire  # noqa: E402
from recovery._client import parse_layout_arg, parse_ranks_arg, plan_main  # noqa: E402
from recovery._proto import coordinator_pb2 as pb  # noqa: E402
from recovery._proto import coordinator_pb2_grpc as pb_grpc  # noqa: E402
from recovery.model import HeldRegion, SnapshotReport  # noqa: E402
from recovery.server import build_server  # noqa: E402

TOKEN = "t0ken"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
LAYOUT = Layout.grid(tp=2, dp=2)  # dp outer: ranks 0,1 and 2,3 are tp pairs; (0,2) and (1,3) replicas


def test_parse_layout_and_ranks() -> None:
    assert parse_layout_arg("tp=2,dp=2").axes == (("tp", 2), ("dp", 2))
    assert parse_ranks_arg("3,1,3") == (1, 3)
    for bad in ("tp", "tp=0", "tp=2,tp=2", "", "t-p=2"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_layout_arg(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_ranks_arg("1,x")


@pytest.fixture()
def served(tmp_path, monkeypatch):
    monkeypatch.delenv("CKPT_COORDINATOR_TOKEN", raising=False)
    srv, port = build_server("127.0.0.1:0", state_dir=None, token=TOKEN, interval=5, timeout=30)
    srv.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        for r in range(4):
            lay = LAYOUT.with_rank(r)
            gen = stub.Register(pb.RegisterRequest(job="j", rank=r, node=f"n{r}", agent_address=f"h:{7000 + r}",
                                                   layout=wire.layout_to_pb(lay, with_coords=True)),
                                timeout=5, metadata=AUTH).generation
            tp = lay.coord("tp")
            stub.ReportSnapshot(wire.snapshot_to_pb(SnapshotReport(
                "j", r, gen, 3, lay, (HeldRegion("w", Box((tp * 4, 0), (4, 8)), 1, 128),))), timeout=5, metadata=AUTH)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    yield port, token_file
    srv.stop(1)


def test_plan_prints_each_item_and_explains_with_explain(served) -> None:
    port, token_file = served
    out = io.StringIO()
    args = ["--address", f"127.0.0.1:{port}", "--job", "j", "--layout", LAYOUT.describe(), "--failed", "1",
            "--token-file", str(token_file), "--timeout", "5"]
    assert plan_main(args, out) == 0
    text = out.getvalue()
    assert text.startswith("step 3: 4 rank(s)") and "why:" not in text
    assert "rank 0: w[0:4,0:8] <- OWN_MEMORY ranks 0 h:7000" in text
    assert "rank 1: w[4:8,0:8] <- PEER_REPLICA ranks 3 h:7003" in text
    out = io.StringIO()
    assert plan_main([*args, "--explain"], out) == 0
    why = out.getvalue().split("why:\n", 1)[1]
    assert "step 3" in why and "new rank 1" in why and "alive replica on old rank 3" in why


def test_plan_errors_exit_1_with_the_status(served, capsys) -> None:
    port, token_file = served
    base = ["--address", f"127.0.0.1:{port}", "--layout", "tp=2,dp=2", "--timeout", "5"]
    assert plan_main([*base, "--job", "j"], io.StringIO()) == 1  # no token
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert plan_main([*base, "--job", "nojob", "--token-file", str(token_file)], io.StringIO()) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
