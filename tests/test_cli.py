import json
import subprocess
import sys

from PIL import Image

from sparsediff.cli import main
from sparsediff.layout import TokenLayout
from sparsediff.plan import ModelFingerprint, SparsePlan
from sparsediff.render import plan_figure_width


def test_version_and_help():
    out = subprocess.run([sys.executable, "-m", "sparsediff.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "sparsediff 0.1.0"
    out = subprocess.run([sys.executable, "-m", "sparsediff.cli", "--help"], capture_output=True, text=True, check=True)
    assert "show" in out.stdout


def test_show_pattern_writes_token_mask_png(tmp_path, capsys):
    out = tmp_path / "mask.png"
    layout = "text:5+video:3x4x4"
    assert main(["show", "--pattern", "multi_diagonal_w1", "--layout", layout, "--out", str(out), "--scale", "3"]) == 0
    S = TokenLayout.parse(layout).num_tokens
    img = Image.open(out)
    assert img.size == (3 * S, 3 * S)
    assert "multi_diagonal_w1" in capsys.readouterr().out


def test_show_pattern_block_mask_png_and_json(tmp_path, capsys):
    out = tmp_path / "blocks.png"
    assert main(["show", "--pattern", "diagonal_w1", "--layout", "video:8x8x8", "--block-size", "64",
                 "--out", str(out), "--json"]) == 0
    assert Image.open(out).size == (8, 8)
    info = json.loads(capsys.readouterr().out)
    assert 0.0 < info["density"] < 1.0


def test_show_plan_writes_png_of_expected_size(tmp_path, capsys):
    plan = SparsePlan.uniform(ModelFingerprint("M", 4, 6, 64, "h"), "diagonal_w1", layout="video:4x8x8")
    path = plan.save(tmp_path / "plan.json")
    out = tmp_path / "plan.png"
    assert main(["show", str(path), "--out", str(out), "--json"]) == 0
    assert Image.open(out).size == (round(plan_figure_width(plan) * 100), 480)
    info = json.loads(capsys.readouterr().out)
    assert len(info["layer_density"]) == 4


def test_show_errors_are_one_sentence_on_stderr(tmp_path, capsys):
    assert main(["show", "--pattern", "diagonal_w1", "--out", str(tmp_path / "x.png")]) == 2
    assert "needs --layout" in capsys.readouterr().err
    assert main(["show", str(tmp_path / "nope.json"), "--out", str(tmp_path / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
