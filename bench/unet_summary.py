"""The short table that ends bench/unet_acceptance.sh: what each stage's files in OUT say.

Quality (OUT/quality/quality.json: r, PSNR, steps per method), the step benchmark
(OUT/step.json: ms/step, ratio to PyTorch fp32, GiB), the denoising forward (OUT/denoise.json),
and the exit lines of the pytest groups and compute-sanitizer (OUT/*.status). A stage that did
not run or failed shows as missing, not as a figure.
Usage: python bench/unet_summary.py OUT
"""
import json
import sys
from pathlib import Path


def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"  {path.name}: missing or unreadable ({e.__class__.__name__})")
        return None


def gib(nbytes):
    return "-" if nbytes is None else f"{nbytes / 2 ** 30:.2f}"


def quality(out):
    report = load(out / "quality" / "quality.json")
    if not report:
        return
    print(f"quality ({report['device']}, {report['date']}, budget "
          f"{report['settings']['budget_s']:g} s per trained method):")
    for name, m in report["methods"].items():
        if "error" in m:
            print(f"  {name:40s} failed: {m['error'].strip().splitlines()[-1]}")
            continue
        s, t = m["scores"]["mean"], m.get("training", {})
        print(f"  {name:40s} r {s['pearson']:.3f}  PSNR {s['psnr_fit']:6.2f}  steps "
              f"{t.get('steps', '-')}")


def step(out):
    report = load(out / "step.json")
    if not report:
        return
    print(f"training step ({report['device']}, {report['date']}; x fp32 = PyTorch fp32 ms / "
          "this ms; GiB: cryokern held, PyTorch peak):")
    for r in report["results"]:
        torch = r.get("pytorch", {})
        fp32 = torch.get("fp32", {}).get("median_ms")
        c = r["cryokern"]
        rows = [("cryokern", c["median_ms"], c.get("held_bytes", c["array_bytes"]))]
        rows += [(f"PyTorch {m}", t["median_ms"], t["peak_bytes"]) for m, t in torch.items()]
        print(f"  {r['network']}")
        for what, ms, nbytes in rows:
            ratio = f"{fp32 / ms:5.2f}x" if fp32 else "   - "
            print(f"    {what:16s} {ms:9.2f} ms  {ratio}  {gib(nbytes)} GiB")


def denoise(out):
    report = load(out / "denoise.json")
    if not report:
        return
    print(f"denoising forward, one image ({report['device']}, {report['date']}):")
    for r in report["results"]:
        torch = r["pytorch"] or {}
        fp32 = torch.get("fp32_ms")
        tiled = r["rows"]["  stage: TiledDenoiser incl. copies"]
        kernels = r["rows"]["forward kernels alone, whole image"]
        rows = [(f"cryokern ({r['tiling']})", tiled, r["tiled_bytes"]),
                ("cryokern whole", kernels, r["whole_bytes"]),
                ("PyTorch fp32", fp32, torch.get("peak_bytes"))]
        print(f"  {r['network']}")
        for what, ms, nbytes in rows:
            if ms is None:
                continue
            ratio = f"{fp32 / ms:5.2f}x" if fp32 else "   - "
            print(f"    {what:16s} {ms:9.1f} ms  {ratio}  {gib(nbytes)} GiB")


def statuses(out):
    for path in sorted(out.glob("*.status")):
        print(f"  {path.read_text().strip()}")


def main():
    out = Path(sys.argv[1])
    print(f"\n=== U-Net acceptance summary ({out}) ===")
    quality(out)
    step(out)
    denoise(out)
    statuses(out)


if __name__ == "__main__":
    main()
