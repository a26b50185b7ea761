"""bench/run.py's reports of measured rows: the terminal table, the CSV and JSON written as rows come in, the
markdown block for the README and the PNG chart (bench/plot.py)."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
from pathlib import Path

import torch

from bench.measure import BASELINE, Config, Row
from bench.provenance import provenance

# ----------------------------------------------------------------------------------------- records


def _column(field: str) -> str:
    return "pass" if field == "pass_" else field  # a Python keyword cannot name a field


COLUMNS = tuple(_column(f.name) for f in dataclasses.fields(Row))


def record(row: Row) -> dict:
    """A row as the CSV and JSON hold it: {column: value}, in the fields' order."""
    return dict(zip(COLUMNS, dataclasses.astuple(row)))


CSV_META = ("device", "date", "torch", "triton", "python", "git_commit")


def metadata(config: Config, argv: list[str]) -> dict:
    """Everything needed to read the numbers later: machine, versions, commit, date, command."""
    meta = {
        **provenance(config.device),
        "dtypes": list(config.sweep.dtypes),
        "command": " ".join(["python", "bench/run.py", *argv]),
        "preset": config.preset,
        "backends": list(config.backends),
        "schedule": dataclasses.asdict(config.schedule),
        "seed": config.seed,
        "peak_memory": "max_memory_allocated - memory_allocated before the call"
        if config.device.type == "cuda"
        else "peak RSS (VmHWM after clear_refs) - RSS before the call, after malloc_trim",
    }
    if config.device.type == "cuda":
        meta.update(
            cudnn=torch.backends.cudnn.version(),
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        )
    return meta


class RowWriter:
    """The CSV and JSON results, written as the rows are measured, so that a run cut off (a time limit, a kill)
    leaves every row measured until then: the CSV gains each point's rows and is flushed; the JSON is replaced
    whole (atomically) after each point, with "complete": false until close(). One CSV row per (point,
    backend), each carrying the device, date, versions and commit."""

    def __init__(self, csv_path: Path, json_path: Path, meta: dict):
        self.json_path, self.meta, self.rows = json_path, meta, []
        self.csv_file = csv_path.open("w", newline="")
        self.csv = csv.DictWriter(self.csv_file, fieldnames=[*COLUMNS, *CSV_META])
        self.csv.writeheader()
        self.add([])

    def add(self, rows: list[Row]) -> None:
        for row in rows:
            self.csv.writerow({**record(row), **{k: self.meta[k] for k in CSV_META}})
        self.csv_file.flush()
        self.rows.extend(rows)
        self._write_json(complete=False)

    def close(self) -> None:
        self.csv_file.close()
        self._write_json(complete=True)

    def _write_json(self, complete: bool) -> None:
        partial = self.json_path.with_name(self.json_path.name + ".partial")
        data = {"meta": self.meta, "complete": complete, "results": [record(r) for r in self.rows]}
        partial.write_text(json.dumps(data, indent=1))
        os.replace(partial, self.json_path)


# -------------------------------------------------------------------------------------- the table


TABLE_HEADER = ("cell", "pass", "dtype", "T", "B", "I", "H", "L", "backend", "median ms", "IQR ms",
                "tokens/s", "speed-up", "peak MB", "max diff")  # fmt: skip
LEFT_ALIGNED = {0, 1, 2, 8}


def _num(value: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, fmt) + suffix


def table_line(r: Row) -> tuple[str, ...]:
    """A row's table entries; a failed row ends with its status instead of numbers."""
    cell = r.cell + ("*" if r.tag == "book" else "")
    shape = (cell, r.pass_, r.dtype, *(str(v) for v in (r.seq_len, r.batch, r.input_size, r.hidden, r.layers)))
    backend = r.backend if r.ran in (None, r.backend) else f"{r.backend}->{r.ran}"
    if r.status != "ok":
        return (*shape, backend, r.status[:100])
    return (*shape, backend, f"{r.median_ms:.3f}", f"{r.q25_ms:.3f}-{r.q75_ms:.3f}", f"{r.tokens_per_s:,.0f}",
            _num(r.speedup, ".2f", "x"), _num(r.peak_mem_mb, ".1f"), _num(r.max_diff, ".1e"))  # fmt: skip


def format_table(rows: list[Row]) -> str:
    """A fixed-width table: one line per (point, backend); failed rows say why."""
    lines = [TABLE_HEADER, *map(table_line, rows)]
    widths = [0] * len(TABLE_HEADER)
    for line in lines:
        sized = line if len(line) == len(TABLE_HEADER) else line[:-1]  # a status spans the rest
        widths = [max(w, len(v)) for w, v in itertools.zip_longest(widths, sized, fillvalue="")]
    text = []
    for line in lines:
        padded = [v.ljust(w) if i in LEFT_ALIGNED else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))]
        if len(line) < len(TABLE_HEADER):
            padded[-1] = line[-1]
        text.append("  ".join(padded).rstrip())
    text.insert(1, "-" * len(text[0]))
    legend = "(* the book's model; speed-up = torch.nn median / this median; IQR = 25th-75th percentile)"
    return "\n".join([*text, legend])


# --------------------------------------------------------------------------------------- markdown


def markdown_table(header: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(l) + " |" for l in lines)]


def _brief_status(r: Row) -> str:
    return r.status.split(":")[0]  # "n/a" or "error"; the CSV has the reason


def book_table(rows: list[Row]) -> list[str]:
    """Every backend on the book's model: time, spread, throughput, speed-up, memory."""
    lines = [
        [r.pass_, r.dtype, r.backend, f"{r.median_ms:.2f} ({r.q25_ms:.2f}-{r.q75_ms:.2f})", f"{r.tokens_per_s:,.0f}",
         _num(r.speedup, ".2f", "x"), _num(r.peak_mem_mb, ".1f")]
        if r.status == "ok" else [r.pass_, r.dtype, r.backend, _brief_status(r), "", "", ""]
        for r in rows if r.tag == "book"
    ]  # fmt: skip
    return markdown_table(["pass", "dtype", "backend", "median ms (IQR)", "tokens/s", "speed-up", "peak MB"], lines)


def speedup_table(rows: list[Row]) -> list[str]:
    """Speed-up of each fused backend over torch.nn: one line per (backend, cell, pass, dtype, T, L),
    one column per (batch, hidden)."""
    grid = [r for r in rows if r.tag != "book" and r.backend != BASELINE]
    columns = sorted({(r.batch, r.hidden) for r in grid})
    lines: dict[tuple, dict] = {}
    for r in grid:
        key = (r.backend, r.cell, r.pass_, r.dtype, str(r.seq_len), str(r.layers))
        value = _num(r.speedup, ".2f", "x") if r.status == "ok" else _brief_status(r)
        lines.setdefault(key, {})[(r.batch, r.hidden)] = value
    header = ["backend", "cell", "pass", "dtype", "T", "L", *(f"B={b} H={h}" for b, h in columns)]
    return markdown_table(header, [[*key, *(cells.get(c, "") for c in columns)] for key, cells in lines.items()])


def markdown_report(rows: list[Row], meta: dict) -> str:
    """The README's results block: machine, date, command, the book's model, speed-up grid."""
    return "\n".join([
        (f"{meta['device']}; torch {meta['torch']}, Python {meta['python']}, commit {meta['git_commit'][:12]}, "
         f"{meta['date']} (1-min load average before the run: {meta['load_average_1min']:.2f})."),
        "", f"Reproduce: `{meta['command']}`", "",
        "The book's model (LSTM, T=35, B=32, I=28, H=256, 2 layers):", "", *book_table(rows), "",
        "Speed-up over torch.nn (torch.nn median time / backend median time; > 1 is faster):", "",
        *speedup_table(rows), "",
    ])  # fmt: skip


def write_summaries(rows: list[Row], meta: dict, markdown: Path, plot: Path | None) -> None:
    """The markdown block and, unless plot is None, the PNG chart."""
    markdown.write_text(markdown_report(rows, meta))
    if plot:
        from bench.plot import plot_speedups  # matplotlib only when a chart is drawn

        plot_speedups([record(r) for r in rows], plot, f"{meta['device']}, torch {meta['torch']}")
