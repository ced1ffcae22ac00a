"""Plot the benchmark CSV written by `cargo bench --bench merge -- run`.

Usage: python plot.py BENCH.csv OUT.png "subtitle"
Needs matplotlib only. Left: wall time against base size (log-log), median of the repeats.
Right: peak anonymous memory against base size, with the target bound 2 x largest tensor + 64 MiB.
"""

import csv
import statistics
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402


def main():
    path, out, subtitle = sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""
    rows = list(csv.DictReader(open(path)))
    wall = defaultdict(list)
    anon = defaultdict(list)
    bound = {}
    for r in rows:
        if r["threads"] != "0":
            continue
        gb = int(r["base_bytes"]) / 1e9
        key = (r["mode"], r["cache"])
        wall[key].append((gb, float(r["wall_s"])))
        anon[key].append((gb, int(r["peak_anon_kib"]) / 1024))
        bound[gb] = (2 * int(r["largest_tensor_bytes"]) + (64 << 20)) / 2**20

    def med(points):
        by = defaultdict(list)
        for x, y in points:
            by[x].append(y)
        xs = sorted(by)
        return xs, [statistics.median(by[x]) for x in xs]

    def peak(points):
        by = defaultdict(list)
        for x, y in points:
            by[x].append(y)
        xs = sorted(by)
        return xs, [max(by[x]) for x in xs]

    series = [
        (("merge", "warm"), "boft-merge (warm cache)", "C0", "o", "-"),
        (("merge", "cold"), "boft-merge (cold cache)", "C0", "o", "--"),
        (("unmerge", "warm"), "boft-merge --unmerge (warm)", "C2", "^", "-"),
        (("floor_cfr", "warm"), "floor: copy_file_range + fsync (warm)", "k", "s", "-"),
        (("floor_cfr", "cold"), "floor: copy_file_range + fsync (cold)", "k", "s", "--"),
        (("floor_rw", "warm"), "floor: read/write + fsync (warm)", "0.55", "D", "-"),
        (("peft", "warm"), "PEFT merge_and_unload + save_pretrained", "C3", "v", "-"),
    ]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 6.4))
    for key, label, color, marker, ls in series:
        if key in wall:
            xs, ys = med(wall[key])
            ax.plot(xs, ys, ls, color=color, marker=marker, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("base checkpoint size (GB)")
    ax.set_ylabel("wall time (s), median")
    ax.set_title("Time vs model size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)

    for key, label, color, marker in [
        (("merge", "warm"), "boft-merge", "C0", "o"),
        (("unmerge", "warm"), "boft-merge --unmerge", "C2", "^"),
        (("peft", "warm"), "PEFT recipe", "C3", "v"),
    ]:
        if key in anon:
            xs, ys = peak(anon[key])
            bx.plot(xs, ys, "-", color=color, marker=marker, label=label)
    xs = sorted(bound)
    bx.plot(xs, [bound[x] for x in xs], ":", color="k", label="target: 2 x largest tensor + 64 MiB")
    bx.set_xscale("log")
    bx.set_yscale("log")
    bx.set_xlabel("base checkpoint size (GB)")
    bx.set_ylabel("peak anonymous memory (MiB)")
    bx.set_title("Peak anonymous memory (RssAnon, sampled)")
    bx.grid(True, which="both", alpha=0.3)
    bx.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    sizes = sorted({int(r["base_bytes"]) / 1e9 for r in rows})
    for a in (ax, bx):
        a.set_xticks(sizes)
        a.set_xticklabels([f"{x:.2g}" for x in sizes])
        a.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        a.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    fig.suptitle(subtitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
