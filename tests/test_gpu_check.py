"""benchmarks/gpu_check.py --cpu-smoke: every part of the one-shot GPU check runs on the tiny model (CPU, fp32,
compile through the "eager" backend), so the GPU script cannot rot between GPU sessions."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert set(res["parts"]) == {f"{p}:{v}" for p in ("parity", "sampler", "grpo") for v in ("eager", "compiled")}
    errors = {k: r["error"] for k, r in res["parts"].items() if "error" in r}
    assert not errors, errors
    for v in ("eager", "compiled"):
        par = res["parts"][f"parity:{v}"]
        assert par["ok"], f"tiny fp32 parity with transformers failed ({v}): {par}"
        smp = res["parts"][f"sampler:{v}"]
        assert smp["ours_tok_s"] > 0 and smp["generate_tok_s"] > 0
        grpo = res["parts"][f"grpo:{v}"]
        assert grpo["steps"] == 2 and grpo["loss_finite"] and grpo["skipped_updates"] == 0
    md = (out / "gpu_check.md").read_text()
    assert "| parity | eager |" in md and "| grpo | compiled |" in md
