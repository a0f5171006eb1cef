#!/usr/bin/env python3
"""Regenerates the README's Performance section from the JSON files under bench/results/.

Each file is one `fastattn bench --out` run; the table shows, per configuration, fastattn's fastest
backend against the fastest PyTorch provider of the same run. Usage: python scripts/perf_table.py
[--check] (--check exits 1 if the README is not up to date).
"""
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BEGIN, END = "<!-- perf-table:begin (scripts/perf_table.py) -->", "<!-- perf-table:end -->"


def _key(r):
    return (r["op"], r["mode"], r["dtype"], r["B"], r["Hq"], r["Hkv"], r["Lq"], r["Lk"], r["D"], r["causal"], r["gate"])


def table(result, source):
    dev = result["device"]
    lines = [f"**{dev['name']}** ({dev['type']}{', ' + str(dev.get('threads')) + ' threads' if dev['type'] == 'cpu' else ''}), "
             f"torch {result['torch']}, triton {result['triton']}, fastattn {result['fastattn']} at commit "
             f"`{(result.get('commit') or 'unknown')[:10]}`, {result['timestamp'][:10]}: [`{source}`]({source})", "",
             "| op | mode | dtype | B·H·L·D | causal | fastattn | ms | TFLOP/s or GB/s | best PyTorch | ms | speed-up |",
             "| --- | --- | --- | --- | --- | --- | ---: | ---: | --- | ---: | ---: |"]
    groups = {}
    for r in result["results"]:
        groups.setdefault(_key(r), []).append(r)
    for rs in groups.values():
        ours = [r for r in rs if r["provider"].startswith("fastattn-")]
        theirs = [r for r in rs if r["provider"].startswith("torch-")]
        if not ours or not theirs:
            continue
        a, b = min(ours, key=lambda r: r["ms"]), min(theirs, key=lambda r: r["ms"])
        rate = a["tflops"] if a["tflops"] is not None else a["gbps"]
        unit = "TFLOP/s" if a["tflops"] is not None else "GB/s"
        if a.get("read_frac") is not None:  # decode: the fraction of the read bandwidth measured in the same run
            unit += f" ({a['read_frac']:.0%} of the {a['read_gbps']:.0f} GB/s read)"
        # query / kv heads and query / key lengths where they differ (GQA, decoding)
        heads = f"{a['Hq']}" if a.get("Hkv", a["Hq"]) == a["Hq"] else f"{a['Hq']}/{a['Hkv']}"
        length = f"{a['Lq']}" if a["Lk"] == a["Lq"] else f"{a['Lq']}/{a['Lk']}"
        # a sliding window's size, dropout's p
        op = a["op"] + (f" {a['window']}" if a.get("window", -1) >= 0 else "") + (
            f" {a['dropout']}" if a.get("dropout") else "")
        lines.append(f"| {op} | {a['mode']} | {a['dtype']} | {a['B']}·{heads}·{length}·{a['D']} | "
                     f"{'yes' if a['causal'] else 'no'} | {a['provider']} | {a['ms']:.2f} | {rate:.3f} {unit} | "
                     f"{b['provider']} | {b['ms']:.2f} | {b['ms'] / a['ms']:.2f}× |")
    return "\n".join(lines)


def render():
    files = sorted(glob.glob(os.path.join(ROOT, "bench", "results", "*.json")))
    parts = [BEGIN, "", "Generated from the committed result files; speed-up = best PyTorch ms / fastattn ms, "
             "measured in the same run (median of repetitions). B·H·L·D gives query / kv heads and query / key "
             "lengths where they differ.", ""]
    for f in files:
        with open(f) as fh:
            parts += [table(json.load(fh), os.path.relpath(f, ROOT)), ""]
    if not files:
        parts += ["No results committed yet.", ""]
    parts.append(END)
    return "\n".join(parts)


def main():
    readme = os.path.join(ROOT, "README.md")
    text = open(readme).read()
    if BEGIN not in text or END not in text:
        sys.exit(f"README.md lacks the markers {BEGIN} ... {END}")
    new = text[:text.index(BEGIN)] + render() + text[text.index(END) + len(END):]
    if "--check" in sys.argv:
        sys.exit(0 if new == text else "README.md's performance table is stale: run python scripts/perf_table.py")
    with open(readme, "w") as fh:
        fh.write(new)


if __name__ == "__main__":
    main()
