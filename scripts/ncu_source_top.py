"""The SASS instructions where a kernel's warps stall most, from Nsight Compute's source page.

    python scripts/ncu_source_top.py SOURCE_CSV [--top N]

SOURCE_CSV is what `ncu --import REPORT --page source --print-source sass --csv` prints: per
kernel, a header row naming the columns (the instruction's address and text, and the PC-sampling
counts) and a row per instruction. Prints, per kernel, the N instructions with the most stall
samples as a Markdown table: address, instruction, samples, share of the kernel's samples. Written
for scripts/gpu_check.sh's report; where the file has no recognisable table it prints its first
lines instead, so that the report always shows what ncu wrote.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def find_column(header: list[str], *needles: str) -> int | None:
    """The first column whose name contains every needle (case-insensitive)."""
    for index, name in enumerate(header):
        if all(needle.lower() in name.lower() for needle in needles):
            return index
    return None


def parse_tables(rows: list[list[str]]) -> list[tuple[str, list[tuple[str, str, float]]]]:
    """[(kernel title, [(address, instruction, samples)])], one entry per header row found."""
    tables: list[tuple[str, list[tuple[str, str, float]]]] = []
    title = ""
    columns: tuple[int, int, int] | None = None
    for row in rows:
        cells = [cell.strip() for cell in row]
        source = find_column(cells, "source")
        samples = find_column(cells, "sampling", "all")
        for fallback in ("sampling", "samples"):  # other ncu versions' names for the count
            if samples is None:
                samples = find_column(cells, fallback)
        if source is not None and samples is not None:
            address = find_column(cells, "address")
            columns = (address if address is not None else source, source, samples)
            tables.append((title, []))
            continue
        if columns is None or len(cells) <= max(columns):
            named = [c for c in cells if c]
            if len(named) == 1:  # a line naming the kernel before its table
                title = named[0]
            elif len(named) == 2 and "kernel" in named[0].lower():  # "Kernel Name", name
                title = named[1]
            continue
        try:
            count = float(cells[columns[2]].replace(",", "") or 0)
        except ValueError:
            continue
        tables[-1][1].append((cells[columns[0]], cells[columns[1]].rstrip(" ;"), count))
    return tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source_csv", type=Path)
    parser.add_argument("--top", type=int, default=25, help="instructions per kernel (default 25)")
    args = parser.parse_args(argv)
    text = args.source_csv.read_text(errors="replace")
    tables = [t for t in parse_tables(list(csv.reader(text.splitlines()))) if t[1]]
    if not tables:
        print(f"(no table of stall samples recognised in {args.source_csv.name}; its first lines:)")
        print("```")
        print("\n".join(text.splitlines()[:40]))
        print("```")
        return 0
    for title, instructions in tables:
        total = sum(count for _, _, count in instructions)
        print(f"{title or 'kernel'}: {len(instructions)} instructions, {total:.0f} stall samples")
        print()
        print("| address | instruction | samples | share |")
        print("|---|---|---:|---:|")
        for address, instruction, count in sorted(instructions, key=lambda i: -i[2])[: args.top]:
            share = count / total if total else 0.0
            print(f"| {address} | `{instruction.replace('|', '/')}` | {count:.0f} | {share:.1%} |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
