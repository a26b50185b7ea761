"""Perplexity-per-epoch plot of one run, or of the fused and torch.nn runs of `--compare`."""
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

STYLES = ("-", "--")


def supported_formats():
    """File extensions matplotlib can write (png, pdf, svg, ...)."""
    return set(Figure().canvas.get_supported_filetypes())


def plot_perplexity(path, runs, title):
    """Write a log-scale perplexity curve per run to `path`; runs: [(label, [EpochStats, ...])]."""
    fig = Figure(figsize=(7, 4.2), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    for (label, history), style in zip(runs, STYLES):
        ax.plot(range(1, len(history) + 1), [s.perplexity for s in history], style, label=label)
    ax.set(xlabel="epoch", ylabel="perplexity", yscale="log", title=title)
    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 2, 5, 10 rather than 2x10^0 on the log axis
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(path)
