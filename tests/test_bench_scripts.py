"""bench/step.py, bench/denoise.py and bench/unet_summary.py at toy sizes on the compiled CPU
backend (--device cpu), so that a GPU session's call does not fail on a typo; and bench/nets.py's
FLOP counts against the issue's figures (PyTorch beside cryokern only where torch imports)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import denoise  # noqa: E402
import nets  # noqa: E402
import step  # noqa: E402


def test_flop_counts():
    """The lean U-Net has the issue's 254k parameters; the chain's step is the ~62 GFLOP on
    4 x 1024^2 of bench/NOTES.md; a step is three forward passes but the first layer's input
    gradient."""
    lean = nets.parse_net("unet:16,24,32,48,64").network
    assert lean.param_count() == 253_761
    chain = nets.parse_net("1,16,16,1").network
    assert 4 * nets.step_flops(chain, 1024, 1024) == 3 * 4 * 2 * 9 * 1024 ** 2 * (
        16 + 256 + 16) - 4 * 2 * 9 * 1024 ** 2 * 16
    # a U-Net's levels: 2**-l of the padded sides (33 -> 36 for two poolings)
    small = nets.parse_net("unet:2,3,4").network
    flops = dict(nets.conv_flops(small, 33, 33))
    assert flops["enc.2.conv1"] == 2 * 9 * 4 * 4 * 9 * 9
    assert flops["dec.0.conv0"] == 2 * 9 * (3 + 2) * 2 * 36 * 36


def test_step_and_denoise_benchmarks_and_summary(tmp_path):
    steps = step.main(["--preset", "unets", "--device", "cpu", "--batch", "1", "--size", "32",
                       "--steps", "1", "--json", str(tmp_path / "step.json")])
    assert [r["network"] for r in steps] == list(nets.PRESETS["unets"])
    for r in steps:
        assert r["cryokern"]["median_ms"] > 0 and r["cryokern"]["array_bytes"] > 0
        assert r["optimizer"] == "adam lr 0.001"
    chain = step.main(["--device", "cpu", "--batch", "1", "--size", "16", "--steps", "1"])
    assert chain[0]["optimizer"] == "sgd lr 0.01"
    results = denoise.main(["--arch", "unet", "--unet-widths", "4,8", "--residual", "--device",
                            "cpu", "--size", "40", "--count", "2", "--repeats", "1", "--tile",
                            "16", "--dir", str(tmp_path), "--json",
                            str(tmp_path / "denoise.json")])
    assert results[0]["network"] == "unet:4,8+residual" and results[0]["halo"] == 10
    assert results[0]["rows"]["command in a fresh process (rc 0), start-up included"] > 0
    assert json.loads((tmp_path / "denoise.json").read_text())["results"][0]["tiled_bytes"] > 0
    (tmp_path / "step_0.status").write_text("step: exit 0  done\n")
    summary = subprocess.run([sys.executable, str(BENCH / "unet_summary.py"), str(tmp_path)],
                             capture_output=True, text=True, check=True).stdout
    assert "unet:16,24,32,48,64" in summary and "unet:4,8+residual" in summary
    assert "quality.json: missing" in summary and "step: exit 0  done" in summary
    if any("pytorch" in r for r in steps):          # torch imports here
        assert set(steps[0]["pytorch"]) == {"fp32", "tf32", "bf16"}


def test_bad_network_exits_2():
    with pytest.raises(SystemExit) as exit_:
        step.main(["--arch", "unet", "--unet-widths", "4", "--device", "cpu"])
    assert exit_.value.code == 2
