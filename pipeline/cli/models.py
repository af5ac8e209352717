"""`coatnet models`: every variant with its parameters and GMACs at 224/384/512, beside the paper's figures."""

from __future__ import annotations

import argparse
import json

RESOLUTIONS = (224, 384, 512)


def _fmt_params(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _fmt_g(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def model_table(num_classes: int = 1000) -> list[dict]:
    # lazy: `coatnet --help` imports every sub-command module; this one pulls in torch (see pipeline.cli)
    import coatnet

    rows = []
    for name in coatnet.list_models():
        paper = coatnet.PAPER_FIGURES.get(name, {})
        row = {"name": name, "paper_params": paper.get("params"), "gmacs": {}, "paper_gmacs": {}}
        for r in RESOLUTIONS:
            params, macs = coatnet.count(name, r, num_classes=num_classes)
            if r == 224:  # tables grow with resolution; quote the 224 size, as the paper does
                row["params"] = params
            row["gmacs"][r] = macs / 1e9
            row["paper_gmacs"][r] = paper.get("gmacs", {}).get(r)
        doc = coatnet.DOCUMENTED_PARAMS.get(name)
        row["note"] = doc[1] if doc else ""
        rows.append(row)
    return rows


def render(rows: list[dict]) -> str:
    head = ["variant", "params@224", "paper"] + [f"GMACs@{r}" for r in RESOLUTIONS] + [f"paper@{r}" for r in RESOLUTIONS]
    lines = [head]
    for row in rows:
        lines.append(
            [row["name"], _fmt_params(row["params"]), _fmt_params(row["paper_params"])]
            + [_fmt_g(row["gmacs"][r]) for r in RESOLUTIONS]
            + [_fmt_g(row["paper_gmacs"][r]) for r in RESOLUTIONS]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"{row['name']}: {row['note']}" for row in rows if row["note"]]
    out += ["", "GMACs: analytic multiply-adds per image (convs, linears, attention matmuls); paper FLOPs count the same."]
    out += notes
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    rows = model_table(args.num_classes)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(render(rows))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="list CoAtNet variants with params and GMACs vs the paper")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier size counted (default 1000)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
