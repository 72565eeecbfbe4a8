"""Run every benchmark; each writes bench/results/<name>.json. `scale.py` runs in its
quick mode here (100 simulated workers and more, 10k queued); run it alone, without
`--quick`, for 100k queued and longer windows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
BENCHMARKS: tuple[str | tuple[str, ...], ...] = (
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
    "p12_speech.py",
    "faults.py",
    ("scale.py", "--quick"),
)

for entry in BENCHMARKS:
    script, *args = (entry,) if isinstance(entry, str) else entry
    print(f"== {script} {' '.join(args)}".rstrip(), flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args], cwd=HERE, check=True)
