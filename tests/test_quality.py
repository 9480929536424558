"""bench/quality.py at toy size on the NumPy reference: every method scored, JSON and panel
written (Topaz's methods only where torch and topaz import and a GPU is there)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality  # noqa: E402


def test_quality_benchmark_at_toy_size(tmp_path, capsys):
    report = quality.main(["--size", "32", "--pixel-size", "4", "--train", "2", "--test", "1",
                           "--budget-s", "0.2", "--nets", "1,2,1", "--device", "cpu",
                           "--no-topaz", "--panel-crop", "24", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["methods"].keys() == report["methods"].keys()
    names = list(saved["methods"])
    assert names[0] == "noisy" and names[1].startswith("gaussian") and names[2] == "cryokern 1,2,1"
    net = saved["methods"]["cryokern 1,2,1"]
    assert net["training"]["steps"] >= 1 and net["training"]["train_s"] >= 0.2
    for method in saved["methods"].values():
        assert set(method["scores"]["mean"]) == {"pearson", "psnr_fit", "ssim_fit",
                                                 "pearson_highpass"}
        assert len(method["scores"]["images"]) == 1
    assert saved["settings"]["budget_s"] == 0.2 and "Topaz skipped: --no-topaz" in saved["notes"]
    assert (tmp_path / "quality.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "training budget 0.2 s" in out and "cryokern 1,2,1" in out


def test_nets_must_be_channel_lists():
    with pytest.raises(SystemExit, match="give channel counts like 1,16,16,1"):
        quality.parse_net("unet")


def test_topaz_is_skipped_with_a_reason_where_it_cannot_run():
    try:
        import torch
        if torch.cuda.is_available():
            pytest.skip("torch with a GPU is here: Topaz can run")
    except ImportError:
        pass
    topaz, why_not = quality.import_topaz()
    assert topaz is None and why_not
