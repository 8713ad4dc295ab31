"""The tables every benchmark writes, the issues' targets judged from them, and one plot per table.

A benchmark writes ``<stem>.md`` and ``<stem>.csv`` with :func:`write_tables`: the header lines STYLE.md
asks for (device, date, commit, versions, command) and one row per configuration, mode and provider.
:func:`write_tables` then appends to the Markdown a **Targets** section, each of the issues' benchmark
targets with the rows it reads, the figures measured and a verdict, and draws ``<stem>.png``:
throughput per provider, one panel per mode (peak memory as well where it was measured).

A verdict is one of
    met               every row the target names was measured, on a device the target names, within the bound
    missed            a row measured on such a device is outside the bound (whatever the other rows show)
    not judged        the rows were measured, but on another device (a CPU smoke run, an A100, ...)
    not measured      no row at the target's shape, or the provider was skipped or failed (the note says why)
so a smoke run never reports a GPU target as met, and a run cut short says which rows it lacks.

Re-judge and re-plot committed results (e.g. after fetching them from the GPU machine):

    python benchmarks/report.py benchmarks/results/packed_attention_nvidia-h100-80gb-hbm3.csv ...
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

TARGETS_HEADING = "## Targets"
BEGIN, END = "<!-- benchmarks/report.py: begin -->", "<!-- benchmarks/report.py: end -->"


# ------------------------------------------------------------------------------------------ tables


def write_tables(title: str, rows: list[dict], header: list[str], out_dir: Path, stem: str,
                 columns: Sequence[str] | None = None) -> tuple[Path, Path]:
    """``<stem>.md`` (header, table, targets, plot) and ``<stem>.csv`` (header as "# " lines, then the rows).

    ``columns`` fixes the column order; by default, every key in order of first appearance, "note" last.
    Called after every configuration, so a run cut short still leaves its finished rows, judged.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if columns is None:
        columns = []
        for row in rows:
            columns += [c for c in row if c not in columns and c != "note"]
        columns.append("note")
    md_path, csv_path = out_dir / f"{stem}.md", out_dir / f"{stem}.csv"
    text = [f"# {title} ({stem})", ""] + [f"- {line}" for line in header] + [""]
    text.append(_md_row(columns))
    text.append("|" + "---|" * len(columns))
    text += [_md_row(row.get(c, "") for c in columns) for row in rows]
    md_path.write_text("\n".join(text) + "\n")
    with csv_path.open("w", newline="") as handle:
        for line in header:  # comment lines; read_table (and csv readers filtering "# ") skip them
            handle.write(f"# {line}\n")
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row.get(c, "") for c in columns])
    if rows:
        summarize(md_path, csv_path)
    return md_path, csv_path


ECHOED = ("ms", "TFLOP/s", "GB/s", "peak MiB", "x vs ours", "peak / eager", "note")  # the cells echo_rows prints


def echo_rows(rows: list[dict], done: str) -> None:
    """Print a configuration's figures to stderr as they are measured, so a log holds them even where the
    tables do not come back: provider, mode, then the measured cells (ms, rates, ratios, notes)."""
    for row in rows:
        cells = [f"{key} {value}" for key, value in row.items() if key in ECHOED and value != ""]
        print(f"  {row.get('provider', '')} {row.get('mode', '')}: " + ", ".join(cells), file=sys.stderr)
    print(done, file=sys.stderr)


def _md_row(cells) -> str:
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


def read_table(csv_path: Path) -> tuple[dict[str, str], list[dict[str, str]]]:
    """(header as {key: value} from the "# key: value" lines, rows as dicts of strings)."""
    header: dict[str, str] = {}
    body: list[str] = []
    for line in Path(csv_path).read_text().splitlines():
        if line.startswith("# "):
            key, _, value = line[2:].partition(": ")
            header[key] = value
        else:
            body.append(line)
    if not body:
        raise ValueError(f"{csv_path}: no table (only header lines)")
    return header, list(csv.DictReader(body))


def number(cell: str) -> float | None:
    """A table cell as a float ("1,234" and "45.6%" included); None where it is empty or not a number."""
    text = (cell or "").replace(",", "").strip().rstrip("%")
    try:
        return float(text)
    except ValueError:
        return None


def script_of(header: dict[str, str]) -> str:
    """The benchmark that wrote a table, from its command line (``bench_projector.py`` ...)."""
    for word in header.get("command", "").strip("`").split():
        if word.endswith(".py"):
            return Path(word).name
    return ""


# ------------------------------------------------------------------------------------------ targets


@dataclasses.dataclass(frozen=True)
class Target:
    """One benchmark target of an issue: which rows it reads, which figure, and the bound."""

    issue: int
    text: str  # the issue's words
    script: str  # the benchmark whose table holds the rows
    where: dict[str, tuple[str, ...]]  # column -> accepted values (as the table writes them)
    provider: str
    mode: str
    column: str  # the figure read: "x vs ours", "TFLOP/s", "peak / eager", "MFU", ...
    op: str  # ">=" or "<="
    bound: float
    devices: tuple[str, ...]  # substrings of the header's device that the target is for
    label: tuple[str, ...] = ()  # columns that tell the matched rows apart in the verdict

    def holds(self, value: float) -> bool:
        return value >= self.bound if self.op == ">=" else value <= self.bound


HOPPER = ("H100", "H200")
_ATTENTION = {"total": ("16384",), "Dh": ("128",), "dtype": ("bf16",)}
_PROJECTOR = {"P": ("576",), "D_v": ("1024",), "D_h": ("4096",), "D": ("4096",), "images": ("16", "32", "64"),
              "LayerNorm": ("False",)}  # fmt: skip
_LINEAR_CE = {"tokens": ("16384",), "D": ("2048",), "V": ("151936",)}

TARGETS = (
    Target(3, "forward+backward >= 1.2x torch varlen_attn (FA2) on causal-only packing", "bench_packed_attention.py",
           {**_ATTENTION, "workload": ("causal",)}, "varlen", "full", "x vs ours", ">=", 1.2, HOPPER, ("Hq", "Hkv")),
    Target(3, ">= 2x FlexAttention on the multimodal mask (forward+backward)", "bench_packed_attention.py",
           {**_ATTENTION, "workload": ("llava",)}, "flex", "full", "x vs ours", ">=", 2.0, HOPPER, ("Hq", "Hkv")),
    Target(3, "forward >= 450 TFLOP/s", "bench_packed_attention.py", _ATTENTION, "ours", "forward", "TFLOP/s", ">=",
           450.0, HOPPER, ("workload", "Hq", "Hkv")),
    Target(3, "backward >= 300 TFLOP/s", "bench_packed_attention.py", _ATTENTION, "ours", "backward", "TFLOP/s", ">=",
           300.0, HOPPER, ("workload", "Hq", "Hkv")),
    Target(7, "projector forward+backward >= 1.5x eager", "bench_projector.py", _PROJECTOR, "eager", "full",
           "x vs ours", ">=", 1.5, ("H100",), ("images",)),
    Target(7, "projector forward+backward >= 1.2x torch.compile", "bench_projector.py", _PROJECTOR, "compiled", "full",
           "x vs ours", ">=", 1.2, ("H100",), ("images",)),
    Target(7, "fused linear-CE peak memory <= 30% of the unfused path", "bench_linear_cross_entropy.py", _LINEAR_CE,
           "ours", "full", "peak / eager", "<=", 0.30, HOPPER),
    Target(7, "fused linear-CE at equal speed (unfused time / ours >= 1.0)", "bench_linear_cross_entropy.py",
           _LINEAR_CE, "eager", "full", "x vs ours", ">=", 1.0, HOPPER),
    Target(6, "training step >= 2x Hugging Face's LLaVA on CPU (tokens/s, tiny model)", "bench_train.py",
           {"model": ("tiny",)}, "ours", "full", "x vs hf", ">=", 2.0, ("CPU",), ("batch",)),
    Target(6, ">= 45% MFU for the small model at TP=1 on an H100", "bench_train.py", {"model": ("small",)}, "ours",
           "full", "MFU", ">=", 45.0, ("H100",), ("batch",)),
)  # fmt: skip


@dataclasses.dataclass
class Verdict:
    target: Target
    verdict: str  # "met", "missed", "not judged", "not measured"
    measured: str  # the figures, one per matched row, or why there are none


def _describe(where: dict[str, tuple[str, ...]]) -> str:
    return ", ".join(f"{column} {'/'.join(values)}" for column, values in where.items())


def judge(header: dict[str, str], rows: list[dict[str, str]], targets: Sequence[Target] = TARGETS) -> list[Verdict]:
    """Every target of the table's benchmark, judged from its rows (see the module docstring)."""
    script, device = script_of(header), header.get("device", "")
    verdicts = []
    for target in (t for t in targets if t.script == script):
        matched = [r for r in rows if r.get("provider") == target.provider and r.get("mode") == target.mode
                   and all(r.get(c) in values for c, values in target.where.items())]  # fmt: skip
        if not matched:
            where = _describe(target.where)
            verdicts.append(Verdict(target, "not measured", f"no {target.provider} {target.mode} row at {where}"))
            continue
        figures, values = [], []
        for row in matched:
            name = " ".join(f"{c} {row.get(c, '')}" for c in target.label)
            value = number(row.get(target.column, ""))
            if value is None:
                figures.append(f"{name}: {row.get('note') or 'no figure'}".strip(": "))
            else:
                values.append(value)
                figures.append(f"{name}: {row[target.column]}".strip(": "))
        measured = "; ".join(figures)
        on_device = any(d in device for d in target.devices)
        if on_device and not all(target.holds(v) for v in values):
            verdict = "missed"  # a row that fails decides it, whatever the rows without a figure would show
        elif len(values) < len(matched):
            verdict = "not measured"
        elif not on_device:
            verdict = f"not judged ({'/'.join(target.devices)} only)"
        else:
            verdict = "met"
        verdicts.append(Verdict(target, verdict, measured))
    return verdicts


def targets_section(verdicts: list[Verdict]) -> list[str]:
    lines = [TARGETS_HEADING, "",
             "Judged by `benchmarks/report.py` from the table above (a target is judged only on the device it names).", "",
             "| issue | target | rows | measured | verdict |", "|---|---|---|---|---|"]  # fmt: skip
    for v in verdicts:
        t = v.target
        rows = f"{t.provider}, {t.mode}, {_describe(t.where)}; `{t.column}` {t.op} {t.bound:g}"
        lines.append(f"| {t.issue} | {t.text} | {rows} | {v.measured} | **{v.verdict}** |")
    return lines


# ------------------------------------------------------------------------------------------ plot

RATE_COLUMNS = ("tokens/s", "TFLOP/s", "GB/s")  # the first a table has is plotted


def plot(header: dict[str, str], rows: list[dict[str, str]], png_path: Path, title: str) -> Path | None:
    """Throughput per provider and configuration, a panel per mode; peak memory (full mode) below where measured.

    Returns None (and draws nothing) where no row has a throughput figure."""
    rate = next((c for c in RATE_COLUMNS if any(number(r.get(c, "")) for r in rows)), None)
    if rate is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(rows[0])
    config_columns = columns[: columns.index("mode")] if "mode" in columns else []
    varying: list[str] = []  # columns that tell configurations apart, less those the earlier ones determine
    for column in config_columns:
        seen: dict[tuple, str | None] = {}
        for row in rows:
            key = tuple(row.get(c) for c in varying)
            if seen.setdefault(key, row.get(column)) != row.get(column):
                varying.append(column)
                break
    varying = varying or config_columns[:1]

    def config(row: dict[str, str]) -> str:
        return "\n".join(f"{c} {row.get(c, '')}" for c in varying)

    configs = list(dict.fromkeys(config(r) for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows if "mode" in r)) or [""]
    providers = list(dict.fromkeys(r.get("provider", "") for r in rows))
    has_peak = any(number(r.get("peak MiB", "")) for r in rows)
    ceiling = number(header.get("bandwidth ceiling", "").split(" GB/s")[0]) if rate == "GB/s" else None

    memory_modes = ["full"] if "full" in modes else modes  # peak memory of a training step is the one that bites
    panels = [(rate, mode) for mode in modes] + [("peak MiB", mode) for mode in memory_modes if has_peak]
    width = min(30.0, max(8.0, 0.2 * len(configs) * len(providers) + 2.0))
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 3.2 * len(panels)), squeeze=False, layout="constrained")
    bar = 0.8 / len(providers)
    colors = plt.get_cmap("tab10").colors
    cell: dict[tuple[str, str, str], dict[str, str]] = {}  # (configuration, mode, provider) -> its first row
    for r in rows:
        cell.setdefault((config(r), r.get("mode", ""), r.get("provider", "")), r)
    for (metric, mode), (ax,) in zip(panels, axes):
        values = []
        for p, provider in enumerate(providers):
            xs, ys = [], []
            for x, name in enumerate(configs):
                value = number(cell.get((name, mode, provider), {}).get(metric, ""))
                if value:
                    xs.append(x + (p - (len(providers) - 1) / 2) * bar)
                    ys.append(value)
            ax.bar(xs, ys, bar, label=provider, color=colors[p % len(colors)])
            values += ys
        if ceiling and metric == "GB/s":
            ax.axhline(ceiling, color="black", linestyle="--", linewidth=1, label="copy ceiling")
        if values and max(values) / min(values) > 30:
            ax.set_yscale("log")
        ax.set_xticks(range(len(configs)), configs, fontsize=7)
        ax.set_ylabel(metric)
        ax.set_title(f"{mode} ({metric})" if mode else metric, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=min(4, len(providers)))
    fig.suptitle(f"{title}\n{header.get('device', '')}, {header.get('date', '')}, commit {header.get('commit', '')[:12]}",
                 fontsize=10)  # fmt: skip
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


# ------------------------------------------------------------------------------------------ both


def summarize(md_path: Path, csv_path: Path) -> list[Verdict]:
    """Judge the table's targets and plot it; (re)write the generated block of the Markdown.

    The block sits between two HTML comments, so re-judging a committed table keeps whatever was
    written by hand before or after it."""
    md_path, csv_path = Path(md_path), Path(csv_path)
    header, rows = read_table(csv_path)
    text = md_path.read_text()
    before, found, rest = text.partition(BEGIN)
    after = rest.partition(END)[2] if found else ""
    title = text.splitlines()[0].lstrip("# ") if text.strip() else csv_path.stem
    verdicts = judge(header, rows)
    block = targets_section(verdicts) + [""] if verdicts else []
    png = plot(header, rows, md_path.with_suffix(".png"), title) if rows else None
    if png is not None:
        block += [f"![throughput per provider]({png.name})", ""]
    if block:
        md_path.write_text(before.rstrip("\n") + "\n\n" + BEGIN + "\n" + "\n".join(block) + END + (after or "\n"))
    return verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tables", nargs="+", type=Path, help="<stem>.csv files written by the benchmarks")
    args = parser.parse_args(argv)
    for csv_path in args.tables:
        md_path = csv_path.with_suffix(".md")
        if csv_path.suffix != ".csv" or not csv_path.is_file() or not md_path.is_file():
            print(f"{csv_path}: expected a benchmark's .csv with its .md beside it", file=sys.stderr)
            return 2
        for v in summarize(md_path, csv_path):
            print(f"{csv_path.name}: issue {v.target.issue}: {v.target.text}: {v.verdict} ({v.measured})")
        print(f"wrote {md_path} and {md_path.with_suffix('.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
