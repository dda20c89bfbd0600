#!/usr/bin/env python3
"""Interleaved A/B of gate variants: which of two builds (or settings) draws faster.

    python3 bench/ab.py --variant old=/path/to/old/chuzhan-gate --variant new=target/release/chuzhan-gate
    python3 bench/ab.py --variant a2=BIN --variant a4=BIN:GLIBC_TUNABLES=glibc.malloc.arena_max=4
    python3 bench/ab.py --variant s0=BIN:@config-with-sync0.toml --variant s10=BIN

A variant is LABEL=BINARY, optionally followed by `:NAME=VALUE` environment settings
and `:@FILE` for a config file (a `{schema}` in it becomes a fresh PostgreSQL schema for
each run, dropped after it). Each round starts, for every variant in turn, a fresh
simulator and gate (SQLite ledger and audit in a new temporary directory, as in
bench/load.py), warms it up for 1 s and drives `POST /aiapi/v1/draw` with wrk (64
connections) for --seconds; it records requests/s and the gate's CPU per request
(utime + stime from /proc). It prints the medians and, per variant, the median of the
per-round ratios to the first variant. With --rate R it measures latency instead: oha
at R requests/s (latency correction on), after a 2 s warm-up at that rate, and prints each
variant's median p50 and p99 over the rounds. --keys N spreads the draws over N keys, round-robin
(for the PostgreSQL ledger, where one key's account row is the point of contention);
--key-fields '{"rps": 1000000}' gives every key those settings too. --pin PROXY/DRIVER runs
the gate on the CPUs PROXY and the simulator and load generator on DRIVER (taskset), as
in bench/load.py.

Why interleaved rounds and ratios: on the shared 2-core benchmark machine the same
binary runs in two speeds for minutes at a time (about 70 and 130 µs of gate CPU per
draw), so only variants measured side by side in the same round can be compared.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402  (bench/load.py: process, gate and wrk helpers)

RUNS = itertools.count()


def parse_variant(spec: str) -> tuple[str, str, dict, Path | None]:
    label, _, rest = spec.partition("=")
    parts = rest.split(":")
    binary, env, config = parts[0], {}, None
    for p in parts[1:]:
        if p.startswith("@"):
            config = Path(p[1:])
        else:
            name, _, value = p.partition("=")
            env[name] = value
    if not label or not binary:
        raise SystemExit(f"bad --variant {spec!r}: want LABEL=BINARY[:NAME=VALUE][:@CONFIG]")
    return label, binary, env, config


def one_run(binary: str, env: dict, config: Path | None, seconds: int, conns: int, keys: int,
            fields: dict, rate: int = 0) -> tuple[float, float]:
    """(req/s, gate CPU µs per request), or with `rate` (p50, p99) in ms."""
    procs = load.Procs()
    schema = None
    with tempfile.TemporaryDirectory(prefix="gate-ab-") as d:
        tmp = Path(d)
        if config is not None and "{schema}" in config.read_text():
            # A PostgreSQL variant: every run on a schema of its own, dropped after it.
            schema = f"gate_ab_{os.getpid()}_{next(RUNS)}"
            text = config.read_text().replace("{schema}", schema)
            config = tmp / "gate.toml"
            config.write_text(text)
        try:
            sim = load.start_sim(procs, binary, tmp)
            g = load.start_gate(procs, binary, tmp, "ab", sim, env, config)
            key: str | list[str] = load.create_key(g, "ab", load.HUGE_BUDGET, fields)
            if keys > 1:
                key = [key] + [load.create_key(g, f"ab-{i}", load.HUGE_BUDGET, fields) for i in range(1, keys)]
            url = g.url + load.DRAW_PATH
            if rate:
                oha = load.oha_bin()
                if oha is None or keys > 1:
                    raise load.BenchError("--rate needs oha, and one key")
                load.run_oha_rate(oha, url, key, conns, 2, rate)
                lat = load.run_oha_rate(oha, url, key, conns, seconds, rate)
                return lat.p50_ms, lat.p99_ms
            load.run_wrk(url, key, conns, 1, tmp)
            before = load.cpu_seconds(g.proc.pid)
            res = load.run_wrk(url, key, conns, seconds, tmp)
            if res.errors:
                raise load.BenchError(f"wrk reported errors: {res.errors}")
            used = load.cpu_seconds(g.proc.pid) - before
        finally:
            procs.stop_all()
            if schema is not None:
                url = re.search(r'^url\s*=\s*"([^"]+)"', text, re.M)
                if url:
                    load.drop_pg_schema(url.group(1), schema)
    return res.rps, used * 1e6 / max(res.rps * seconds, 1.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", required=True, help="LABEL=BINARY[:NAME=VALUE][:@CONFIG]")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--keys", type=int, default=1, help="spread the draws over this many keys, round-robin")
    ap.add_argument("--key-fields", type=json.loads, default={}, help="more settings for every key, as JSON")
    ap.add_argument("--rate", type=int, default=0, help="measure p50/p99 with oha at this fixed rate instead")
    ap.add_argument("--pin", type=load.parse_pin, metavar="PROXY/DRIVER",
                    help="taskset CPU lists for the gate and for the simulator and load generator (e.g. 1/0)")
    a = ap.parse_args()
    load.PIN = a.pin
    variants = [parse_variant(v) for v in a.variant]
    rps: dict[str, list[float]] = {v[0]: [] for v in variants}
    cpu: dict[str, list[float]] = {v[0]: [] for v in variants}
    for r in range(a.rounds):
        line = []
        for label, binary, env, config in variants:
            x, c = one_run(binary, env, config, a.seconds, a.connections, a.keys, a.key_fields, a.rate)
            rps[label].append(x)
            cpu[label].append(c)
            line.append(f"{label} p50 {x:.3f} ms p99 {c:.3f} ms" if a.rate else
                        f"{label} {x:,.0f} req/s {c:.0f} µs/req")
        print(f"round {r + 1}: " + " | ".join(line), flush=True)
    if a.rate:
        for label, *_ in variants:
            print(f"{label}: at {a.rate:,} req/s median p50 {statistics.median(rps[label]):.3f} ms "
                  f"({min(rps[label]):.3f}–{max(rps[label]):.3f}), median p99 {statistics.median(cpu[label]):.3f} ms "
                  f"({min(cpu[label]):.3f}–{max(cpu[label]):.3f})")
        return 0
    base = variants[0][0]
    for label, *_ in variants:
        ratio = statistics.median(x / b for x, b in zip(rps[label], rps[base]))
        cratio = statistics.median(x / b for x, b in zip(cpu[label], cpu[base]))
        print(f"{label}: median {statistics.median(rps[label]):,.0f} req/s, "
              f"{statistics.median(cpu[label]):.0f} µs CPU/req; vs {base}: req/s ×{ratio:.3f}, CPU/req ×{cratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
