"""benchmarks/gpu_voices.sh (issue 22's GPU item) in its CPU dry run: the same commands at a toy size."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_voices_dry_run_writes_the_report_against_joint_and_alone(data_dir, tmp_path):
    out = tmp_path / "gpu_voices"
    env = os.environ | {"SMALL": "1", "OUT": str(out), "PY": sys.executable, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_voices.sh")], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert set(json.loads((out / "timings.json").read_text())) == {"prepare", "train", "baselines", "eval"}
    report = json.loads((out / "report" / "report.json").read_text())
    sources = report["sources"]
    assert len(sources) == 20
    own = report["corners"]["own"]
    assert set(own) == set(sources)
    for s in sources:  # each corner against both baselines, from the baselines the script trained
        assert own[s]["joint"] is not None and own[s]["alone"] is not None, s
    assert (out / "metrics_joint.jsonl").is_file() and (out / "metrics_alone_bible_kjv.jsonl").is_file()
    # what is left is small enough to come back from the GPU machine: no checkpoints, no data
    assert not list(out.rglob("*.safetensors")) and not (out / "data").exists()
