"""Writes the result tables of docs/experiments.md from the committed JSON records.

    python benchmarks/experiments/tables.py            # rewrite the tables in docs/experiments.md
    python benchmarks/experiments/tables.py --check    # exit 1 if a table is out of date
    python benchmarks/experiments/tables.py --print    # print them instead

A table in the doc sits between ``<!-- table: NAME -->`` and ``<!-- /table -->``; NAME is
one of TABLES below, each a function of the records in benchmarks/results/experiments/.
Text around the tables (the reading of the numbers) stays hand-written.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import kit

DOC = kit.REPO / "docs" / "experiments.md"
MARKER = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def load(results: Path, name: str) -> dict:
    return json.loads((results / f"{name}.json").read_text())


def mean_std(stats: dict, digits: int = 3) -> str:
    if not stats or stats.get("mean") is None:
        return "-"
    text = f"{stats['mean']:.{digits}f}"
    if stats["n"] > 1:
        text += f" ± {stats['std']:.{digits}f} [{stats['min']:.{digits}f}, {stats['max']:.{digits}f}]"
    return text


def rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.0f}k" if value >= 1e3 else f"{value:.0f}"


def row(cells) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def lm_equal_tokens(results: Path) -> list[str]:
    record = load(results, "lm_equal_tokens")
    lines = [row(["kind", "bits per byte (mean ± std [min, max])", "seeds", "training tokens/s (eager, median)"]),
             row(["---"] * 4)]
    for kind, stats in record["results"]["final_heldout_bits"].items():
        speed = record["results"]["median_tokens_per_s"][kind]["mean"]
        lines.append(row([kind, mean_std(stats), stats["n"], rate(speed)]))
    return lines


def associative_recall(results: Path) -> list[str]:
    record = load(results, "associative_recall")
    edges = record["config"]["distance_edges"]
    bins = [f"d {lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:])]
    lines = [row(["kind", "window", "width", "seeds", "accuracy"] + bins), row(["---"] * (5 + len(bins)))]
    for entry in record["results"]["summary"]:
        lines.append(row([entry["kind"], entry["window"] or "-", entry["width"], entry["accuracy"]["n"],
                          mean_std(entry["accuracy"], 2)]
                         + [mean_std({**b, "n": 1}, 2) for b in entry["accuracy_by_distance"]]))
    return lines


def cost(results: Path) -> list[str]:
    record = load(results, "cost")
    found = record["results"]
    train, decoding = found.get("training_tokens_per_s", {}), found.get("decoding", {})
    prompts = record["config"]["decode_prompts"]
    kinds = list(dict.fromkeys([label.split()[0] for label in train] + [label.split()[0] for label in decoding]))
    short = "/".join(f"{p // 1024}k" for p in prompts)
    lines = [row(["kind", "eager tokens/s", "compiled tokens/s", f"decode tokens/s ({short} prompt)", "decode repeats",
                  f"cache MiB ({short})"]), row(["---"] * 6)]
    for kind in kinds:
        decode = [decoding.get(f"{kind} prompt {p}") for p in prompts]
        lines.append(row([
            kind, rate(train.get(f"{kind} eager", {}).get("mean")), rate(train.get(f"{kind} compiled", {}).get("mean")),
            " / ".join(f"{d['tokens_per_s']['mean']:.0f}" if d else "-" for d in decode),
            " / ".join(str(d["tokens_per_s"]["n"]) if d else "-" for d in decode),
            " / ".join(f"{d['cache_bytes_at_end'] / 2**20:.0f}" if d else "-" for d in decode)]))
    return lines


TABLES = {"lm_equal_tokens": lm_equal_tokens, "associative_recall": associative_recall, "cost": cost}


def render(text: str, results: Path) -> str:
    def replace(match):
        name = match["name"]
        if name not in TABLES:
            raise ValueError(f"{DOC}: unknown table {name!r}; known: {', '.join(TABLES)}")
        return match[1] + "\n".join(TABLES[name](results)) + "\n" + match[4]

    return MARKER.sub(replace, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tables.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=kit.DEFAULT_OUT, help="folder of the JSON records")
    parser.add_argument("--doc", type=Path, default=DOC)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if the doc's tables differ from the records")
    mode.add_argument("--print", action="store_true", help="print the tables, change nothing")
    args = parser.parse_args(argv)
    if args.print:
        for name, table in TABLES.items():
            print(f"<!-- table: {name} -->\n" + "\n".join(table(args.results)) + "\n<!-- /table -->\n")
        return 0
    text = args.doc.read_text()
    updated = render(text, args.results)
    if args.check:
        if updated != text:
            print(f"{args.doc}: tables out of date; run python benchmarks/experiments/tables.py", file=sys.stderr)
            return 1
        return 0
    args.doc.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
