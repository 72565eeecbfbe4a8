"""Run every benchmark; each writes bench/results/<name>.json."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
BENCHMARKS = (
    "p1_queue_overhead.py",
    "p2_head_of_line.py",
    "p3_ar_throughput.py",
    "p4_dit_cache.py",
    "p4_batch.py",
    "p5_affinity.py",
    "p6_preemption.py",
    "p10_video.py",
    "p8_lora.py",
    "p7_api.py",
    "p9_mixed_cluster.py",
    "p11_ttft.py",
    "faults.py",
)

for script in BENCHMARKS:
    print(f"== {script}", flush=True)
    subprocess.run([sys.executable, str(HERE / script)], cwd=HERE, check=True)
