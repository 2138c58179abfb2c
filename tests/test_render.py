"""Figures are drawn without pyplot, so rendering leaves the user's matplotlib backend as it was."""

import subprocess
import sys

SCRIPT = """
import matplotlib
matplotlib.use("pdf")  # what a user may have chosen; the figures must not switch it
from sparsediff.layout import TokenLayout
from sparsediff.patterns import get_pattern
from sparsediff.plan import ModelFingerprint, SparsePlan
from sparsediff.render import render_plan
from sparsediff.pipelines.embedded.train import plot_loss

model = ModelFingerprint("Toy", num_layers=2, num_heads=3, head_dim=8, config_hash="0")
render_plan(SparsePlan.uniform(model, "diagonal_w1", block_size=8), "{out}/plan.png", layout=TokenLayout.parse("video:2x4x4"))
plot_loss([{{"step": s, "loss": 1.0 / s}} for s in range(1, 10)], "{out}/loss.png", window=3)
print(matplotlib.get_backend(), "matplotlib.pyplot" in __import__("sys").modules)
"""


def test_figures_keep_the_users_backend_and_write_pngs(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(out=tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["pdf", "False"]
    for name in ("plan.png", "loss.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
