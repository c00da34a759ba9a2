"""benchmarks/cpu.py's schedule (issue 14): both sides compile and warm up, then their timed
calls alternate, so a change in the machine's speed during a run hits both columns alike;
a side that fails or dies is null, never a number."""

from __future__ import annotations

import argparse
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import cpu  # noqa: E402

CFG = {"precisions": ["float32"], "warmup": 2, "steps": 4}


class FakePeer:
    """Answers as peer_server does; `die_at` makes the n-th timed call fail."""

    def __init__(self, log: list[str], build_error: str = "", die_at: int = -1):
        self.log, self.build_error, self.die_at, self.calls = log, build_error, die_at, 0

    def ask(self, op: str, **fields):
        if op == "build":
            self.log.append(f"peer build {fields['workload']}")
            if self.build_error:
                return {"error": self.build_error}
            return {"first_s": 0.5, "what": "fake peer"}
        if op == "call":
            self.calls += 1
            if self.calls == self.die_at:
                return {"error": "peer process exited with -9"}
            self.log.append("peer")
            return {"s": 0.2}
        self.log.append(f"peer {op}")
        return {}


def _makers(log: list[str]) -> dict:
    def make(workload):
        def build(arch, precision):
            return (lambda: log.append("ours")), f"fake {workload}"

        return build

    return {w: make(w) for w in cpu.WORKLOADS}


def test_timed_calls_alternate_and_each_pair_starts_in_turn():
    log: list[str] = []
    ours, peers = cpu.run_pairs(_makers(log), FakePeer(log), "resnet50", CFG)
    first = log[: log.index("peer drop") + 1]
    assert first == [
        "peer build train",
        "ours",  # our first call (the compile) ...
        "ours",  # ... and the second warm-up call, both after the peer's
        "peer", "ours",  # step 0
        "ours", "peer",  # step 1
        "peer", "ours",  # step 2
        "ours", "peer",  # step 3
        "peer drop",
    ]  # fmt: skip
    for workload in cpu.WORKLOADS:
        name = cpu.key("resnet50", workload, "float32")
        assert len(ours[name]["step_s"]) == len(peers[name]["step_s"]) == CFG["steps"]
        assert peers[name]["img_s"] == pytest.approx(cpu.BATCH / 0.2)
        assert peers[name]["first_s"] == 0.5 and ours[name]["what"] == f"fake {workload}"


def test_a_peer_that_fails_to_build_or_dies_is_an_error_not_a_number():
    log: list[str] = []
    ours, peers = cpu.run_pairs(
        _makers(log), FakePeer(log, build_error="RuntimeError: no torch"), "densenet121", CFG
    )
    assert "peer" not in log  # never asked for a timed call
    for name, entry in peers.items():
        assert entry == {"error": "RuntimeError: no torch"}
        assert len(ours[name]["step_s"]) == CFG["steps"]  # ours measured all the same
    log.clear()
    ours, peers = cpu.run_pairs(_makers(log), FakePeer(log, die_at=2), "densenet121", CFG)
    train = cpu.key("densenet121", "train", "float32")
    assert peers[train] == {"error": "peer process exited with -9"}
    assert len(ours[train]["step_s"]) == CFG["steps"]
    rows, _ = cpu.assemble(ours, peers, dict(CFG, precisions=["float32"]))
    assert rows[train]["peer"] is None and rows[train]["ratio"] is None
    assert rows[train]["ours"] > 0


def test_peer_process_answers_one_json_line_per_request():
    """The real child: whatever peers this environment has (none, or torch without
    torchvision, or all of them), it answers every request and exits when told."""
    args = argparse.Namespace(
        peer_python=sys.executable, peer_site="", steps=1, warmup=1, image_size=0,
        peer_threads=1, dry_run=True, bf16=False,
    )  # fmt: skip
    peer = cpu.PeerProcess(args)
    try:
        assert "numpy" in peer.notes  # the versions it found
        built = peer.ask("build", arch="resnet50", workload="infer", precision="float32")
        if "error" in built:  # no torchvision here: said, not measured
            assert built["error"].startswith("RuntimeError: peers not importable")
            assert "error" in peer.ask("call")  # nothing built: an error, and still alive
        else:
            assert built["first_s"] > 0 and peer.ask("call")["s"] > 0
        assert peer.ask("drop") == {}
    finally:
        peer.close()
    assert peer.proc.returncode == 0
    assert "error" in peer.ask("call")  # gone: an error, not a hang
