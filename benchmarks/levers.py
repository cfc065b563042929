"""Each speed lever of the recipe, measured on its own against the plain settings, in one run.

Every variant is `python -m benchmarks.throughput` with the base arguments plus the variant's switches,
each in a fresh process (its own compile caches and memory peak). With --rounds > 1 the variants
alternate, round after round, and each figure is the median over rounds. Writes JSON with one row
per variant (tokens/s, MFU, peak memory, ratio to plain, or the error that stopped it) and
prints a Markdown table.

    python -m benchmarks.levers --out benchmarks/results/levers-h100.json -- \\
        --preset tinyllama-1.1b --micro_batch 8 --accum 2 --steps 10
    python -m benchmarks.levers --only plain compile fused-adamw -- --preset tiny --seq 256   # CPU
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import command, split_at_dashes, write_result

ROOT = Path(__file__).resolve().parents[1]

# name -> switches added to the base arguments. "plain" is throughput.py's defaults: SDPA with
# PyTorch's choice of kernel, eager blocks, the plain cross-entropy, for-each AdamW, no FSDP.
VARIANTS: dict[str, list[str]] = {
    "plain": [],
    "sdpa-flash": ["--attention", "sdpa-flash"],
    "sdpa-cudnn": ["--attention", "sdpa-cudnn"],
    "sdpa-efficient": ["--attention", "sdpa-efficient"],
    "flash-attn": ["--attention", "flash-attn"],
    "compile": ["--compile"],
    "compile+loss": ["--compile", "--compile_loss"],
    "chunked-loss": ["--loss_chunk_size", "4096"],
    "fused-adamw": ["--fused_adamw", "on"],
    "micro-4": ["--micro_batch", "4"],
    "micro-16": ["--micro_batch", "16"],
    "fsdp": ["--fsdp"],
    "activation-checkpointing": ["--activation_checkpointing"],
    "float8": ["--float8"],
    "document-masking": ["--document_masking"],
}


def run_variant(base: list[str], switches: list[str], out: Path, timeout: float) -> dict:
    # A later flag wins in argparse, so a variant's --micro_batch overrides the base's.
    cmd = [sys.executable, "-m", "benchmarks.throughput", *base, *switches, "--out", str(out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return {"error": lines[-1][:300] if lines else f"exit {proc.returncode}"}
    return json.loads(out.read_text())


def main(argv=None) -> dict:
    argv, own, base = split_at_dashes(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     usage="levers.py [options] -- [throughput.py arguments]")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), default=None,
                        help="these variants (plain is always run first)")
    parser.add_argument("--combined", default=None,
                        help="also run these throughput.py switches together, e.g. \"--compile --fused_adamw on\"")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per variant run")
    parser.add_argument("--out", default="benchmarks/results/levers.json")
    args = parser.parse_args(own)

    names = ["plain"] + [n for n in (args.only or VARIANTS) if n != "plain"]
    variants = {n: VARIANTS[n] for n in names}
    if args.combined:
        variants["combined"] = shlex.split(args.combined)
    runs: dict[str, list[dict]] = {n: [] for n in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, switches in variants.items():
                result = run_variant(base, switches, Path(tmp) / f"{name}-{r}.json", args.timeout)
                runs[name].append(result)
                print(f"round {r} {name}: " + (result["error"] if "error" in result else
                                               f"{result['tokens_per_s']:,.0f} tokens/s"), flush=True)

    rows = []
    for name, results in runs.items():
        good = [x for x in results if "error" not in x]
        row = {"name": name, "switches": " ".join(variants[name]), "runs": len(results), "succeeded": len(good)}
        if good:
            med = lambda key: statistics.median(x[key] for x in good) if good[0][key] is not None else None  # noqa: E731
            row.update(tokens_per_s=med("tokens_per_s"), mfu=med("mfu"), tokens_per_s_at_accum=med("tokens_per_s_at_accum"),
                       mfu_at_accum=med("mfu_at_accum"), peak_memory_bytes=max(x["peak_memory_bytes"] for x in good),
                       median_step_s=med("median_step_s"), warmup_s=med("warmup_s"), attention=good[0]["attention"],
                       micro_batch=good[0]["micro_batch"], tokens_per_s_rounds=[x["tokens_per_s"] for x in good])
        else:
            row["error"] = results[0]["error"]
        rows.append(row)
    plain = rows[0].get("tokens_per_s")
    for row in rows:
        if plain and row.get("tokens_per_s"):
            row["ratio_to_plain"] = row["tokens_per_s"] / plain
    first = next((x for results in runs.values() for x in results if "error" not in x), {})
    result = {"benchmark": "levers", "base_arguments": base, "rounds": args.rounds, "device": first.get("device"),
              "machine": first.get("machine"), "command": command("levers", argv),
              "rows": rows}
    write_result(result, args.out)
    print(table(result))
    return result


def table(result: dict) -> str:
    lines = [f"{result['device']}: python -m benchmarks.throughput {' '.join(result['base_arguments'])} [+ switches]",
             "", "| variant | switches | tokens/s | MFU | at recipe accumulation | peak memory GiB | vs plain |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | `{r['switches']}` | failed: {r['error']} | | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        at = (f"{r['tokens_per_s_at_accum']:,.0f} ({r['mfu_at_accum']:.1%})" if r["mfu_at_accum"] is not None
              else f"{r['tokens_per_s_at_accum']:,.0f}")
        lines.append(f"| {r['name']} | `{r['switches']}` | {r['tokens_per_s']:,.0f} | {mfu} | {at} | "
                     f"{r['peak_memory_bytes'] / 2**30:.1f} | {r.get('ratio_to_plain', 0):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
