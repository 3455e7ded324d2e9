"""Smoke test of the benchmarks: each script runs its tiny CPU case and prints well-formed JSON
lines with both figures; the scan, generation and scale cases must also agree with their
reference."""

import json
import os
import subprocess
import sys
import pytest
from conftest import ROOT


@pytest.mark.parametrize(
    "script", ["bench_train.py", "bench_generate.py", "bench_scan.py", "bench_scale.py"]
)
def test_bench_tiny(script):
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", script), "--tiny", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    assert rows and all(row["ratio"] > 0 and row["date"] and row["device"] == "cpu" for row in rows)
    for row in rows:
        assert row.get("identical", True) is True and row.get("rows_identical", 1.0) == 1.0
        assert row.get("max_diff_naive", 0.0) < 1e-5
        ours, theirs = row.get("first_loss", (0.0, 0.0))  # the same weights, the same first loss
        assert abs(ours - theirs) < 2e-2
