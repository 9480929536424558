"""Where a kernel's stalls sit, by basic block: Nsight Compute's source page summed over runs
of SASS instructions executed equally often (a basic block, or a straight stretch of one), each
with its share of the executed instructions and of the warp-stall samples, its instruction mix
and its top stall reasons. A block with a larger share of samples than of instructions is
where warps wait (NOTES v47: the weight gradients' row staging, 16 % of the instructions and
~40 % of the samples, beside the fmas' 76 % and 45 %).

    ncu --kernel-name regex:^kernel --launch-skip 3 --launch-count 1 --set full \
        --import-source yes -o REPORT python3 bench/tune_conv.py ...
    ncu --import REPORT.ncu-rep --page source --print-source sass --csv > REPORT.csv
    python3 bench/ncu_blocks.py REPORT.csv [--top 12]
"""
import argparse
import collections
import csv


def number(text):
    return float(text.replace(",", "")) if text not in ("", "-") else 0.0


def opcode(source):
    words = source.split()
    if words and words[0].startswith("@"):      # a predicate guard
        words = words[1:]
    return words[0].split(".")[0] if words else "?"


def blocks(rows, header):
    """[(times executed, [row, ...])] in address order: runs of equal execution counts."""
    executed = header.index("Instructions Executed")
    runs = []
    for row in rows:
        count = number(row[executed])
        if not runs or runs[-1][0] != count:
            runs.append((count, []))
        runs[-1][1].append(row)
    return runs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", help="ncu --page source --print-source sass --csv output")
    ap.add_argument("--top", type=int, default=12, help="blocks shown, by instructions executed")
    args = ap.parse_args()
    with open(args.csv, newline="") as f:
        table = list(csv.reader(f))
    start = next(i for i, row in enumerate(table) if "Address" in row and "Source" in row)
    header, rows = table[start], [r for r in table[start + 1:] if len(r) == len(table[start])]
    source, samples = header.index("Source"), header.index("Warp Stall Sampling (All Samples)")
    reasons = [i for i, name in enumerate(header)
               if name.startswith("stall_") and "Not Issued" not in name]
    runs = blocks(rows, header)
    total = sum(count * len(block) for count, block in runs) or 1
    sampled = sum(number(r[samples]) for r in rows) or 1
    print(f"{len(rows)} instructions, {total:.3g} executed (warp level), {sampled:.0f} samples")
    print(f"{'times':>10s} {'length':>6s} {'% instr':>7s} {'% samples':>9s}  mix; top stalls")
    for count, block in sorted(runs, key=lambda run: -run[0] * len(run[1]))[:args.top]:
        mix = collections.Counter(opcode(r[source]) for r in block)
        stalls = collections.Counter()
        for r in block:
            for i in reasons:
                stalls[header[i][len("stall_"):]] += number(r[i])
        print(f"{count:10.0f} {len(block):6d} {100 * count * len(block) / total:7.1f} "
              f"{100 * sum(number(r[samples]) for r in block) / sampled:9.1f}  "
              f"{' '.join(f'{op} {n}' for op, n in mix.most_common(5))}; "
              f"{', '.join(name for name, _ in stalls.most_common(3))}")


if __name__ == "__main__":
    main()
