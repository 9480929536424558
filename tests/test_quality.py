"""bench/quality.py at toy size on the NumPy reference: every method scored, JSON and panel
written (Topaz's methods only where torch and topaz import and a GPU is there)."""
import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality  # noqa: E402
from cryokern.model import UNet  # noqa: E402


def test_quality_benchmark_at_toy_size(tmp_path, capsys):
    report = quality.main(["--size", "32", "--pixel-size", "4", "--train", "2", "--test", "1",
                           "--budget-s", "0.2", "--nets", "1,2,1", "unet:2,3+residual",
                           "--optimizer", "adam", "--device", "cpu",
                           "--no-topaz", "--panel-crop", "24", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["methods"].keys() == report["methods"].keys()
    names = list(saved["methods"])
    assert names[0] == "noisy" and names[1].startswith("gaussian")
    assert names[2:] == ["cryokern 1,2,1", "cryokern unet:2,3+residual"]
    for name in names[2:]:
        training = saved["methods"][name]["training"]
        assert training["steps"] >= 1 and training["train_s"] >= 0.2
        assert training["optimizer"] == {"kind": "adam", "lr": 1e-3, "momentum": 0.9}
    assert saved["methods"]["cryokern unet:2,3+residual"]["training"]["network"] == \
        UNet((2, 3), residual=True).describe()
    for method in saved["methods"].values():
        assert set(method["scores"]["mean"]) == {"pearson", "psnr_fit", "ssim_fit",
                                                 "pearson_highpass"}
        assert len(method["scores"]["images"]) == 1
    assert saved["settings"]["budget_s"] == 0.2 and "Topaz skipped: --no-topaz" in saved["notes"]
    assert (tmp_path / "quality.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "training budget 0.2 s" in out and "cryokern 1,2,1" in out


def test_nets_are_chains_or_unets_read_by_train():
    assert quality.parse_net("unet:16,24,32+residual").network == UNet((16, 24, 32),
                                                                      residual=True)
    assert quality.parse_net("chain:1,8,1").network == quality.parse_net("1,8,1").network
    for bad in ("unet", "unet:4", "chain:1,8,1+residual", "unet:4,8+skip", "mlp:1,2"):
        with pytest.raises(argparse.ArgumentTypeError, match="unet:16,24,32,48,64"):
            quality.parse_net(bad)
    with pytest.raises(SystemExit) as exit_:
        quality.build_parser().parse_args(["--nets", "unet:4"])
    assert exit_.value.code == 2


def test_topaz_is_skipped_with_a_reason_where_it_cannot_run():
    try:
        import torch
        if torch.cuda.is_available():
            pytest.skip("torch with a GPU is here: Topaz can run")
    except ImportError:
        pass
    topaz, why_not = quality.import_topaz()
    assert topaz is None and why_not
