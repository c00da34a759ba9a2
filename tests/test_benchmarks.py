"""benchmarks/gpu.py and benchmarks/replicate.py at tiny size on the CPU (their --dry_run).

They exist to run on a GPU; here they only prove that the code paths work and that the
JSON they write has the schema of docs/RESULTS.md. Both share the test suite's persistent
compilation cache, so a second run of this file is much faster than the first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

pytestmark = pytest.mark.slow  # every test here shares one expensive fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_NAMES = (
    "resnet50_train_bs256_bf16",
    "resnet50_train_bs32",
    "resnet50_gradcam_bs32",
    "resnet50_gradcam_bs256",
)


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _cache() -> str:
    return jax.config.jax_compilation_cache_dir or ""


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("bench") / "benchmarks.json")
    _run(
        [
            "benchmarks/gpu.py",
            "--dry_run",
            "--only=resnet50,ours",
            "--programs=gradcam_bf16_small",
            f"--cache_dir={_cache()}",
            f"--out={out}",
        ]
    )
    return out


def test_gpu_dry_run_writes_the_results_schema(bench_json):
    with open(bench_json) as f:
        result = json.load(f)
    rows = result["benchmarks"]
    for name in RESULT_NAMES:
        assert name in rows, name
        assert set(rows[name]) >= {"ours", "peer", "ratio"}
    assert rows["resnet50_train_bs256_bf16"]["ours"] > 0  # the cold-compiled train step always runs
    assert rows["resnet50_gradcam_bs32"]["ours"] > 0
    assert rows["resnet50_gradcam_bs256"]["ours"] is None  # not asked for (--programs)
    assert rows["resnet50_compile_cold"]["ours"] > 0
    assert rows["resnet50_compile_warm_cache"]["ours"] > 0
    for r in rows.values():  # a missing peer is null, never a made-up number
        assert (r["peer"] is None) == (r["peer_source"] == "n/a")
        assert r["ratio"] is None or r["ratio"] > 0
    assert result["meta"]["dry_run"] is True


def test_replicate_dry_run_merges_and_reports_dedup(bench_json, tmp_path):
    out = str(tmp_path / "results.json")
    proc = _run(
        [
            "benchmarks/replicate.py",
            "--dry_run",
            "--models=brain_resnet50",
            "--parallel=1",
            f"--cache_dir={_cache()}",
            f"--out={out}",
            f"--bench_json={bench_json}",
            "--override=training.max_steps=2",
        ]
    )
    assert "brain_resnet50" in proc.stdout
    with open(out) as f:
        result = json.load(f)
    entry = result["replication"]["brain_resnet50"]
    assert entry["status"] == "ok", entry
    assert entry["from_scratch"] is True
    for key in (
        "accuracy",
        "accuracy_dedup",
        "auc_roc",
        "auc_roc_dedup",
        "f1",
        "average_precision",
    ):
        assert entry[key] is not None and 0.0 <= entry[key] <= 1.0, key
    assert set(entry["ci95"]) >= {"accuracy", "auc_roc", "f1", "average_precision"}
    assert 0 < entry["n_test_dedup"] < entry["n_test"]  # the planted train->test copies are dropped
    assert "resnet50_train_bs256_bf16" in result["benchmarks"]
    assert result["replication_meta"]["dry_run"] is True


CPU_NAMES = tuple(
    name
    for arch in ("resnet50", "densenet121")
    for workload in ("train", "infer", "gradcam")
    for name in (f"{arch}_{workload}_bs8", f"{arch}_{workload}_compile_s")
)


@pytest.mark.slow  # about 20 s with the test cache warm, a minute cold, on 2 shared cores
def test_cpu_dry_run_writes_every_name(tmp_path):
    """benchmarks/cpu.py's contract: every name of both architectures, numbers or null."""
    out = str(tmp_path / "cpu.json")
    _run(
        [
            "benchmarks/cpu.py",
            "--dry_run",
            "--archs=resnet50",
            "--xla_flags=--xla_cpu_enable_fast_math=false",
            f"--cache_dir={_cache()}",
            f"--out={out}",
        ]
    )
    with open(out) as f:
        result = json.load(f)
    assert set(result) == {"meta", "benchmarks"}
    rows = result["benchmarks"]
    for name in CPU_NAMES:
        r = rows[name]
        assert set(r) == {"ours", "peer", "ratio", "unit"}, name
        assert r["unit"] == ("s" if name.endswith("_compile_s") else "img/s"), name
        assert all(r[k] is None or r[k] > 0 for k in ("ours", "peer", "ratio")), name
        assert (r["ratio"] is None) == (r["ours"] is None or r["peer"] is None), name
        assert (r["ours"] is None) == name.startswith("densenet121"), name  # not asked for
    meta = result["meta"]
    assert meta["dry_run"] is True and meta["complete"] is True
    assert "--xla_cpu_enable_fast_math=false" in meta["xla_flags"]
    assert meta["cpu"]["cores"] >= 1 and len(meta["load_average"]["start"]) == 3
    assert meta["versions"]["jax"]
