"""PNG chart of speed-up over torch.nn against batch size and hidden size.

One row of panels per (dtype, pass); the left panel varies the batch at the largest hidden size,
the right one varies the hidden size at the largest batch (sequence length and layers at their
largest swept values, the book's model left out). One line per (cell, backend); y = 1 is torch.nn.
"""

from __future__ import annotations

from pathlib import Path

from fusedrnn.cells import CELL_NAMES

AXES = (("batch", "hidden"), ("hidden", "batch"))  # (x axis, dimension held at its largest value)
STYLES = {"reference": ":", "cpp": "-", "triton": "--", "cuda": "-", "auto": "-."}
MARKERS = {"reference": "x", "cpp": "o", "triton": "s", "cuda": "^", "auto": "d"}


def _largest(rows: list[dict], key: str) -> int:
    return max(r[key] for r in rows)


def _series(rows: list[dict], x: str, held: str) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """{(cell, backend): [(x value, speed-up)]} with held, seq_len and layers at their largest."""
    fixed = {k: _largest(rows, k) for k in (held, "seq_len", "layers")}
    lines: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in rows:
        if all(r[k] == v for k, v in fixed.items()):
            lines.setdefault((r["cell"], r["backend"]), []).append((r[x], r["speedup"]))
    return {key: sorted(points) for key, points in lines.items()}


def plot_speedups(rows: list[dict], path: Path, title: str) -> None:
    """Draw the fused backends' speed-ups in rows (bench/report.py's records) into path; one colour per cell
    (matplotlib's cycle in registry order), one line style and marker per backend."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    grid = [r for r in rows if r["tag"] != "book"]
    usable = [r for r in grid if r["status"] == "ok" and r["speedup"] and r["backend"] != "torch.nn"]
    groups = sorted({(r["dtype"], r["pass"]) for r in grid})
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 3.8 * len(groups)), squeeze=False)
    for (dtype, pass_), panels in zip(groups, axes):
        group = [r for r in usable if r["dtype"] == dtype and r["pass"] == pass_]
        for ax, (x, held) in zip(panels, AXES):
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")  # speed-ups are ratios: 2x and 0.5x equally far from 1
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel(x)
            ax.set_ylabel("speed-up vs torch.nn")
            if not group:
                ax.set_title(f"{dtype} {pass_}: no fused backend ran")
                continue
            ax.set_title(f"{dtype} {pass_}, {held}={_largest(group, held)}, T={_largest(group, 'seq_len')}, "
                         f"L={_largest(group, 'layers')}", fontsize=9)  # fmt: skip
            for (cell, backend), points in sorted(_series(group, x, held).items()):
                xs, ys = zip(*points)
                ax.plot(xs, ys, color=f"C{CELL_NAMES.index(cell)}", linestyle=STYLES[backend], marker=MARKERS[backend],
                        label=f"{cell} / {backend}")  # fmt: skip
                ax.set_xticks(sorted({r[x] for r in group}))
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
