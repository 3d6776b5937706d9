"""bench/peers.py at a tiny size: its three sides run on 2 CPU ranks and its last line parses."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"peers: megatrain (\S+) tok/s, trainer (\S+) tok/s, ddp (\S+) tok/s, "
                  r"ratio_trainer (\S+), ratio_ddp (\S+)")


def test_peers_tiny(deepspeed_ops):
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "peers.py"), "--steps", "2", "--rounds", "2", "--warmup", "1",
         "--hidden", "64", "--layers", "1", "--heads", "2", "--ffn", "128", "--seq", "32", "--micro-batch", "2",
         "--vocab", "256"],
        cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    match = LINE.fullmatch(last)
    assert match, last
    megatrain, trainer, ddp, ratio_trainer, ratio_ddp = map(float, match.groups())
    assert megatrain > 0 and trainer > 0 and ddp > 0
    assert abs(ratio_trainer - megatrain / trainer) < 0.01 and abs(ratio_ddp - megatrain / ddp) < 0.01
    assert "Trainer batches on every rank = megatrain's: yes" in result.stdout
