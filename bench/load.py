#!/usr/bin/env python3
"""Load benchmark of chuzhan-gate beside the simulator direct and nginx.

Run from anywhere in a clone (Python 3.11+, wrk, oha; nginx and PostgreSQL optional):

    python3 bench/load.py                 # build, measure, write docs/benchmarks.md "## Load"
    python3 bench/load.py --no-write      # measure and print only
    python3 bench/load.py --only memory   # just step 4 (memory), printed, nothing written
    python3 bench/load.py --pin 1/0       # the proxy under test on CPU 1, the rest on CPU 0

What it does, in one bounded run (a watchdog stops it after --deadline seconds, 570 by
default, leaving every process it started stopped):

1. `cargo build --release` (honours CARGO_TARGET_DIR), unless --bin is given.
2. Starts `chuzhan-gate sim --task-ms 0` (the 触站 simulator in zero-latency mode).
3. For each target -- the simulator direct, the gate with the embedded SQLite ledger and
   the audit log, the gate with the PostgreSQL ledger (a fresh schema per run), nginx as
   a plain pass-through proxy, and the gate's HTTP stack alone (examples/bare_proxy.rs:
   hyper + reqwest + tokio with none of the gate's work, built like the gate unless
   --bare is given) -- drives `POST /aiapi/v1/draw` with a small JSON body:
   a) maximum requests/second: wrk, --connections (64) connections, --seconds (10 s),
      after a 2 s warm-up, and the proxy's own CPU per request over that run (utime +
      stime of its processes, from /proc: not the load generator's or the simulator's);
   b) latency at a fixed rate: oha -q RATE with latency correction (coordinated
      omission), same connections and duration, where RATE is half of that gate's
      maximum; --repeats rounds, each running every target measured at that rate once,
      in turn (the simulator direct too), so that all of them see the same phases of the
      machine; per target the run with the median p99 is kept, and "added latency" is
      that target minus the simulator direct at the same rate.
   Each run's answers are checked: the simulator's own count of accepted draws must grow
   by the number of requests the load generator completed (the gate answers refusals
   with HTTP 200 like the upstream, so status codes alone prove nothing).
4. Memory: a fresh gate gets --keys (100 000) keys -- 1 000 through the admin API, the
   rest written into its stopped ledger file as the same rows the admin API writes (see
   bulk_insert_keys; `ledger verify` must pass afterwards) -- is restarted so that it
   loads them as in production, idles 8 s, takes 5 s of draws, and VmRSS / VmHWM are
   read from /proc/PID/status.

With --pin PROXY/DRIVER every proxy under test (the gates, nginx with one worker per CPU
of PROXY, the bare stack) runs under `taskset -c PROXY`, and the simulator, wrk and oha
under `taskset -c DRIVER`, so the load generator no longer takes the proxy's core in the
middle of a request; the PostgreSQL server is not pinned.

Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BARE_ROW = "hyper + reqwest pass-through, nothing else (`examples/bare_proxy.rs`)"
DRAW_PATH = "/aiapi/v1/draw"
# A small, valid txt2img body (a few points at the provider's formula).
DRAW_BODY = (
    '{"prompt":"a lighthouse at dusk, watercolor","negativePrompt":"blurry",'
    '"modelStyleId":1,"width":512,"height":512,"steps":20}'
)
SIM_TOKEN = "sim-token"
ADMIN_TOKEN = "bench-admin-token"
HUGE_BUDGET = 10**15


# `--pin PROXY/DRIVER`: the CPUs (taskset lists) for the proxy under test (the gate,
# nginx, the bare stack) and for everything driving it (the simulator, wrk, oha).
# None: no pinning, every process on every core.
PIN: tuple[str, str] | None = None


def pinned(role: str, argv: list[str]) -> list[str]:
    """`argv` under taskset on the CPUs of `role` ("proxy" or "driver") when pinning."""
    if PIN is None:
        return argv
    return ["taskset", "-c", PIN[0] if role == "proxy" else PIN[1], *argv]


def parse_pin(spec: str) -> tuple[str, str]:
    proxy, sep, driver = spec.partition("/")
    if not sep or not re.fullmatch(r"[\d,-]+", proxy) or not re.fullmatch(r"[\d,-]+", driver):
        raise argparse.ArgumentTypeError(f"--pin wants PROXY_CPUS/DRIVER_CPUS, e.g. 1/0, got {spec!r}")
    return proxy, driver


def cpu_count(cpus: str) -> int:
    n = 0
    for part in cpus.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


class Deadline(Exception):
    """The watchdog fired."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes and ports


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_tcp(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


class Procs:
    """Every process the benchmark starts, so that all of them are stopped at the end."""

    def __init__(self) -> None:
        self.running: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict | None = None, log_path: Path | None = None) -> subprocess.Popen:
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL
        p = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.running.append((name, p))
        return p

    def stop(self, p: subprocess.Popen, timeout: float = 10.0) -> None:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.running = [(n, q) for (n, q) in self.running if q is not p]

    def stop_all(self) -> None:
        for _, p in reversed(list(self.running)):
            try:
                self.stop(p, timeout=5)
            except Exception:  # noqa: BLE001 -- cleanup goes on for the others
                pass


def http(method: str, url: str, body: dict | None = None, headers: dict | None = None, timeout: float = 10) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def vm_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its children (nginx's workers under its master)."""
    total = cpu_seconds(pid)
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                total += cpu_seconds(int(child))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return total


# ---------------------------------------------------------------- load generators


@dataclass
class MaxResult:
    rps: float
    requests: int
    errors: str
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_us: float | None = None  # the server's CPU per request (µs), when its pid was given


@dataclass
class RateResult:
    rate: int
    achieved: float
    requests: int
    p50_ms: float
    p99_ms: float
    success_rate: float
    p99_runs: list[float] = field(default_factory=list)
    rounds: list["RateResult"] = field(default_factory=list)  # every run, in round order


def wrk_script(tmp: Path, token: str) -> Path:
    p = tmp / f"draw-{abs(hash(token)) % 10**8}.lua"
    body = DRAW_BODY.replace("\\", "\\\\").replace('"', '\\"')
    p.write_text(
        'wrk.method = "POST"\n'
        f'wrk.body = "{body}"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Auth-Token"] = "{token}"\n'
    )
    return p


def wrk_script_many(tmp: Path, tokens: list[str]) -> Path:
    """A wrk script that spreads requests over several keys, round-robin."""
    p = tmp / f"draw-many-{len(tokens)}.lua"
    body = DRAW_BODY.replace("\\", "\\\\").replace('"', '\\"')
    toks = ", ".join(f'"{t}"' for t in tokens)
    p.write_text(
        'wrk.method = "POST"\n'
        f'local body = "{body}"\n'
        f"local tokens = {{{toks}}}\n"
        "local i = 0\n"
        "request = function()\n"
        "  i = i + 1\n"
        '  return wrk.format(nil, nil, {["Content-Type"] = "application/json", '
        '["Auth-Token"] = tokens[(i % #tokens) + 1]}, body)\n'
        "end\n"
    )
    return p


def parse_wrk_latency(text: str, pct: str) -> float | None:
    m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if not m:
        return None
    v = float(m.group(1))
    return {"us": v / 1000, "ms": v, "s": v * 1000}[m.group(2)]


def run_wrk(url: str, token: str | list[str], conns: int, seconds: int, tmp: Path, threads: int = 1) -> MaxResult:
    script = wrk_script_many(tmp, token) if isinstance(token, list) else wrk_script(tmp, token)
    argv = pinned("driver", ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", str(script), url])
    r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    if r.returncode != 0:
        raise BenchError(f"wrk failed: {r.stderr.strip() or r.stdout.strip()}")
    out = r.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rps or not total:
        raise BenchError(f"cannot read wrk's output:\n{out}")
    errs = []
    m = re.search(r"Socket errors:(.*)", out)
    if m:
        errs.append("socket errors:" + m.group(1).strip())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errs.append(f"non-2xx: {m.group(1)}")
    return MaxResult(
        rps=float(rps.group(1)),
        requests=int(total.group(1)),
        errors="; ".join(errs),
        p50_ms=parse_wrk_latency(out, "50"),
        p99_ms=parse_wrk_latency(out, "99"),
    )


def oha_bin() -> str | None:
    found = shutil.which("oha")
    if found:
        return found
    cand = Path.home() / ".cargo" / "bin" / "oha"
    return str(cand) if cand.exists() else None


def oha_json_flag(oha: str) -> list[str]:
    help_text = subprocess.run([oha, "--help"], capture_output=True, text=True, timeout=10).stdout
    return ["--output-format", "json"] if "--output-format" in help_text else ["--json"]


def run_oha_rate(oha: str, url: str, token: str, conns: int, seconds: int, rate: int) -> RateResult:
    argv = pinned("driver", [
        oha, "--no-tui", *oha_json_flag(oha), "-z", f"{seconds}s", "-c", str(conns), "-q", str(rate),
        "--latency-correction",
        "-m", "POST", "-H", f"Auth-Token: {token}", "-H", "Content-Type: application/json", "-d", DRAW_BODY, url])
    r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    if r.returncode != 0:
        raise BenchError(f"oha failed: {r.stderr.strip()}")
    j = json.loads(r.stdout)
    pct = j["latencyPercentiles"]
    total = sum(int(v) for v in j.get("statusCodeDistribution", {}).values())
    return RateResult(
        rate=rate,
        achieved=float(j["summary"]["requestsPerSec"]),
        requests=total,
        p50_ms=float(pct["p50"]) * 1000,
        p99_ms=float(pct["p99"]) * 1000,
        success_rate=float(j["summary"]["successRate"]),
    )


def run_oha_count(oha: str, url: str, body: str, headers: list[str], n: int, conns: int, timeout: float) -> dict:
    argv = [oha, "--no-tui", *oha_json_flag(oha), "-n", str(n), "-c", str(conns), "-m", "POST", "-d", body]
    for h in headers:
        argv += ["-H", h]
    argv.append(url)
    r = subprocess.run(pinned("driver", argv), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise BenchError(f"oha failed: {r.stderr.strip()}")
    return json.loads(r.stdout)


# ---------------------------------------------------------------- the pieces under test


@dataclass
class Sim:
    proc: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def accepted_draws(self) -> int:
        status, body = http("GET", self.url + "/sim/stats")
        if status != 200:
            raise BenchError(f"/sim/stats answered {status}")
        return int(json.loads(body).get("submits", {}).get(DRAW_PATH, 0))


@dataclass
class Gate:
    name: str
    proc: subprocess.Popen
    port: int
    admin_port: int
    env: dict
    argv: list[str]
    log_path: Path
    key: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def admin_headers(self) -> dict:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def start_sim(procs: Procs, bin_: str, tmp: Path) -> Sim:
    port = free_port()
    p = procs.start(
        "sim",
        pinned("driver", [bin_, "sim", "--listen", f"127.0.0.1:{port}", "--token", SIM_TOKEN, "--task-ms", "0",
                          "--latency-ms", "0", "--balance", str(10**15), "--task-limit", "1000000"]),
        log_path=tmp / "sim.log",
    )
    wait_tcp(port, 20, p)
    return Sim(p, port)


def start_gate(procs: Procs, bin_: str, tmp: Path, name: str, sim: Sim, extra_env: dict, config: Path | None) -> Gate:
    port, admin_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATE_")}
    env.update({
        "GATE_LISTEN": f"127.0.0.1:{port}",
        "GATE_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
        "GATE_UPSTREAM_URL": sim.url,
        "GATE_UPSTREAM_TOKEN": SIM_TOKEN,
        "GATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "GATE_DATA_DIR": str(tmp / f"data-{name}"),
    })
    env.update(extra_env)
    argv = pinned("proxy", [bin_])
    if config is not None:
        argv += ["--config", str(config)]
    argv.append("serve")
    log_path = tmp / f"gate-{name}.log"
    p = procs.start(f"gate-{name}", argv, env=env, log_path=log_path)
    try:
        wait_tcp(admin_port, 60, p)
        wait_tcp(port, 10, p)
    except BenchError as e:
        raise BenchError(f"gate ({name}) did not start: {e}; its log:\n{tail(log_path)}") from None
    return Gate(name, p, port, admin_port, env, argv, log_path)


def restart_gate(procs: Procs, g: Gate) -> None:
    procs.stop(g.proc, timeout=40)
    g.proc = procs.start(f"gate-{g.name}", g.argv, env=g.env, log_path=g.log_path)
    try:
        wait_tcp(g.admin_port, 120, g.proc)
        wait_tcp(g.port, 10, g.proc)
    except BenchError as e:
        raise BenchError(f"gate ({g.name}) did not restart: {e}; its log:\n{tail(g.log_path)}") from None


def create_key(g: Gate, name: str, budget: int, fields: dict | None = None) -> str:
    """A new key's secret; `fields` are more of the key's settings (`{"rps": 100}`)."""
    status, body = http("POST", g.admin + "/admin/keys", {"name": name, "budget": budget, **(fields or {})},
                        g.admin_headers())
    if status not in (200, 201):
        raise BenchError(f"POST /admin/keys answered {status}: {body[:300]!r}")
    return json.loads(body)["key"]


def tail(p: Path, n: int = 20) -> str:
    try:
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def start_nginx(procs: Procs, tmp: Path, sim: Sim) -> tuple[subprocess.Popen, int] | None:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not nginx:
        return None
    port = free_port()
    root = tmp / "nginx"
    (root / "logs").mkdir(parents=True)
    (root / "temp").mkdir()
    conf = root / "nginx.conf"
    # A plain pass-through: keep-alive to the upstream, no access log, the client's
    # token swapped for the upstream's (the least any gate does).
    conf.write_text(f"""
worker_processes {cpu_count(PIN[0]) if PIN else "auto"};
pid {root}/nginx.pid;
error_log {root}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/temp/body;
    proxy_temp_path {root}/temp/proxy;
    fastcgi_temp_path {root}/temp/fastcgi;
    uwsgi_temp_path {root}/temp/uwsgi;
    scgi_temp_path {root}/temp/scgi;
    client_max_body_size 20m;
    upstream sim {{
        server 127.0.0.1:{sim.port};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Auth-Token "{SIM_TOKEN}";
        }}
    }}
}}
""")
    p = procs.start("nginx", pinned("proxy", [nginx, "-p", str(root), "-c", str(conf), "-g", "daemon off;"]), log_path=root / "logs" / "stdout.log")
    wait_tcp(port, 10, p)
    return p, port


def pg_reachable(url: str) -> bool:
    m = re.match(r"postgres(?:ql)?://(?:[^@/]*@)?([^:/]+)(?::(\d+))?/", url)
    if not m:
        return False
    host, port = m.group(1), int(m.group(2) or 5432)
    if host not in ("127.0.0.1", "localhost"):
        raise BenchError(f"--pg-url must point at 127.0.0.1, got {host}")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def drop_pg_schema(url: str, schema: str) -> None:
    if shutil.which("psql"):
        subprocess.run(["psql", url, "-qc", f"DROP SCHEMA IF EXISTS {schema} CASCADE"], capture_output=True, timeout=60)


# ---------------------------------------------------------------- the run


@dataclass
class Row:
    target: str
    max: MaxResult | None = None
    max_ok: str = ""
    rate: dict[int, RateResult] = field(default_factory=dict)
    note: str = ""


def measure_max(name: str, url: str, token: str | list[str], sim: Sim, a, tmp: Path,
                server_pid: int | None = None) -> tuple[MaxResult, str]:
    run_wrk(url, token, a.connections, 2, tmp)  # warm-up: pools, caches, page faults
    before = sim.accepted_draws()
    cpu_before = tree_cpu_seconds(server_pid) if server_pid else 0.0
    res = run_wrk(url, token, a.connections, a.seconds, tmp)
    if server_pid and res.requests:
        res.cpu_us = (tree_cpu_seconds(server_pid) - cpu_before) / res.requests * 1e6
    time.sleep(0.3)
    accepted = sim.accepted_draws() - before
    # wrk counts only complete answers; the ones cut at the end of the run may still
    # have reached the simulator, hence >=.
    ok = "all accepted" if accepted >= res.requests else f"only {accepted} of {res.requests} accepted upstream"
    cpu = f", {res.cpu_us:.0f} µs CPU per request" if res.cpu_us is not None else ""
    log(f"{name}: {res.rps:,.0f} req/s max{cpu} ({res.requests} requests; {ok}; {res.errors or 'no errors'})")
    return res, ok


def measure_rates(targets: list[tuple[Row, str, str]], rate: int, sim: Sim, a, oha: str,
                  probe_dir: Path) -> list[tuple[float, float, float]]:
    """a.repeats rounds of fixed-rate runs at `rate`, one run per target in turn, so that
    every target sees the same phases of the shared machine (a stray stall moves one
    run's p99 by tens of ms); per target, the run with the median p99 is kept in
    row.rate[rate], with every run's p99. Returns the disk's sync time (fsync_ms in
    probe_dir) before each round: after the max runs have written gigabytes, this
    machine's syncs stay several times slower for minutes, and a durable gate's
    fixed-rate runs wait for them."""
    runs: dict[str, list[RateResult]] = {row.target: [] for row, _, _ in targets}
    syncs = []
    for _ in range(a.repeats):
        syncs.append(fsync_ms(probe_dir))
        log(f"disk before the round at {rate}/s: a 4 KiB write + fdatasync {syncs[-1][0]:.2f} ms median, "
            f"{syncs[-1][2]:.2f} ms p99")
        for row, url, token in targets:
            before = sim.accepted_draws()
            r = run_oha_rate(oha, url, token, a.connections, a.seconds, rate)
            time.sleep(0.3)
            accepted = sim.accepted_draws() - before
            if accepted < r.requests:
                raise BenchError(f"{row.target}: only {accepted} of {r.requests} draws accepted upstream")
            runs[row.target].append(r)
    for row, _, _ in targets:
        got = sorted(runs[row.target], key=lambda r: r.p99_ms)
        best = got[len(got) // 2]
        best.p99_runs = [r.p99_ms for r in got]
        best.rounds = runs[row.target]
        row.rate[rate] = best
        log(f"{row.target} @ {rate}/s: achieved {best.achieved:,.0f}/s, p50 {best.p50_ms:.3f} ms, "
            f"p99 {best.p99_ms:.3f} ms (p99 of the runs: {', '.join(f'{x:.2f}' for x in best.p99_runs)})")
    return syncs


def gate_state(g: Gate) -> dict:
    """RSS, draws admitted so far and reservations still in flight, from /proc and /metrics."""
    st = vm_status(g.proc.pid)
    status, body = http("GET", g.admin + "/metrics", timeout=30)
    admitted, in_flight = 0, None
    for line in body.decode(errors="replace").splitlines() if status == 200 else []:
        if line.startswith("gate_requests_total{") and 'decision="admitted"' in line:
            admitted += int(float(line.rsplit(" ", 1)[1]))
        elif line.startswith("gate_reservations_in_flight "):
            in_flight = int(float(line.rsplit(" ", 1)[1]))
    return {"rss_kib": st["VmRSS"], "admitted": admitted, "in_flight": in_flight}


def bulk_insert_keys(db: Path, n: int) -> None:
    """Add n keys to a stopped gate's SQLite ledger, as the admin API would.

    The same rows `POST /admin/keys` writes -- an `accounts` row, an `open` transfer, a
    `keys` row with the record as JSON -- in one transaction (seconds instead of
    minutes). `chuzhan-gate ledger verify` is run on the file afterwards, so rows that
    no longer match the ledger's schema or invariants fail the run instead of passing
    silently.
    """
    import hashlib
    import secrets
    import sqlite3

    now_ms = int(time.time() * 1000)
    ts = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    con = sqlite3.connect(db)
    try:
        with con:
            for i in range(n):
                kid = "key_" + secrets.token_hex(8)
                secret = "czg_" + secrets.token_hex(24)
                h = hashlib.sha256(secret.encode()).hexdigest()
                rec = {"id": kid, "name": f"bulk-{i}", "secret_hash": h, "secret_prefix": secret[:8],
                       "rate_milli": 1000, "concurrency": None, "rps": None, "burst": None, "disabled": False,
                       "expires_at": None, "note": "", "created_at": ts, "updated_at": ts}
                con.execute("INSERT INTO accounts (key, budget, spent, reserved, period, window_ms) "
                            "VALUES (?, 1000, 0, 0, 'none', 0)", (kid,))
                con.execute("INSERT INTO transfers (id, key, kind, points, overage, remaining, period, window_ms, "
                            "reset_spent, actor, note, at_ms) VALUES (NULL, ?, 'open', 1000, 0, 1000, 'none', 0, "
                            "NULL, 'bench', 'key created', ?)", (kid, now_ms))
                con.execute("INSERT INTO keys (id, secret_hash, record) VALUES (?, ?, ?)",
                            (kid, h, json.dumps(rec, separators=(",", ":"))))
    finally:
        con.close()


def time_key_creates(g: Gate, oha: str | None, n: int) -> float:
    """Seconds for n `POST /admin/keys` over 8 connections (one at a time without oha)."""
    t = time.monotonic()
    if oha is None:
        for i in range(n):
            create_key(g, f"bench-client-{i}", 1000)
        return time.monotonic() - t
    j = run_oha_count(oha, g.admin + "/admin/keys", json.dumps({"name": "bench-client", "budget": 1000}),
                      [f"Authorization: Bearer {ADMIN_TOKEN}", "Content-Type: application/json"], n, 8, timeout=300)
    codes = j.get("statusCodeDistribution", {})
    if int(codes.get("201", 0)) + int(codes.get("200", 0)) != n:
        raise BenchError(f"key creation answered {codes}")
    return time.monotonic() - t


def pg_memory_run(procs: Procs, bin_: str, sim: Sim, a, tmp: Path, schema: str) -> dict:
    """RSS and idle CPU of a PostgreSQL-ledger gate holding a.keys keys (rows added with
    psql in the same shape as the admin API's, then `ledger verify`)."""
    cfg = tmp / "pg-mem.toml"
    cfg.write_text(f'[ledger]\nbackend = "postgres"\nschema = "{schema}"\n')
    g = start_gate(procs, bin_, tmp, "pgmem", sim, {"GATE_LEDGER_URL": a.pg_url}, cfg)
    procs.stop(g.proc, timeout=40)  # the schema now exists
    kid = "'key_' || lpad(to_hex(g), 16, '0')"
    h = "md5(g::text) || md5((g + 1)::text)"
    sql = f"""
SET search_path = {schema};
INSERT INTO accounts SELECT {kid}, 1000, 0, 0, 'none', 0 FROM generate_series(1, {a.keys}) g;
INSERT INTO transfers (id, key, kind, points, overage, remaining, period, window_ms, actor, note, at_ms)
  SELECT NULL, {kid}, 'open', 1000, 0, 1000, 'none', 0, 'bench', 'key created', 0 FROM generate_series(1, {a.keys}) g;
INSERT INTO keys SELECT {kid}, {h}, json_build_object('id', {kid}, 'name', 'bulk-' || g, 'secret_hash', {h},
  'secret_prefix', 'czg_0000', 'rate_milli', 1000, 'concurrency', null, 'rps', null, 'burst', null,
  'disabled', false, 'expires_at', null, 'note', '', 'created_at', '2026-01-01T00:00:00Z',
  'updated_at', '2026-01-01T00:00:00Z')::text FROM generate_series(1, {a.keys}) g;
"""
    r = subprocess.run(["psql", a.pg_url, "-v", "ON_ERROR_STOP=1", "-q"], input=sql, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise BenchError(f"psql bulk insert failed: {r.stderr}")
    v = subprocess.run([bin_, "--config", str(cfg), "ledger", "verify"], env=g.env | {"HOSTNAME": "bench-verify"},
                       capture_output=True, text=True, timeout=300)
    if v.returncode != 0:
        raise BenchError(f"ledger verify (PostgreSQL) after the bulk insert failed:\n{v.stdout}{v.stderr}")
    restart_gate(procs, g)
    time.sleep(3)
    idle = vm_status(g.proc.pid)
    c0 = cpu_seconds(g.proc.pid)
    time.sleep(10)
    idle_cpu = (cpu_seconds(g.proc.pid) - c0) / 10
    after = vm_status(g.proc.pid)
    procs.stop(g.proc, timeout=40)
    log(f"memory (PostgreSQL): {a.keys} keys: RSS {idle['VmRSS'] / 1024:.1f} MiB 3 s after start, "
        f"{after['VmRSS'] / 1024:.1f} MiB 10 s later (peak {after['VmHWM'] / 1024:.1f}); idle CPU {idle_cpu * 100:.0f}%")
    return {"keys": a.keys, "rss_start_kib": idle["VmRSS"], "rss_idle_kib": after["VmRSS"], "hwm_kib": after["VmHWM"],
            "idle_cpu": idle_cpu}


def memory_run(procs: Procs, bin_: str, sim: Sim, a, oha: str | None, tmp: Path) -> dict:
    """RSS of a gate (SQLite ledger, audit on) that starts with a.keys keys."""
    g = start_gate(procs, bin_, tmp, "mem", sim, {}, None)
    g.key = create_key(g, "bench", HUGE_BUDGET)
    small = min(1000, a.keys)
    create_small = time_key_creates(g, oha, small)
    procs.stop(g.proc, timeout=40)
    bulk = a.keys - 1 - small
    if bulk > 0:
        log(f"memory: adding {bulk} keys to the stopped gate's ledger file")
        bulk_insert_keys(Path(g.env["GATE_DATA_DIR"]) / "ledger.db", bulk)
    v = subprocess.run([bin_, "ledger", "verify"], env=g.env, capture_output=True, text=True, timeout=300)
    if v.returncode != 0:
        raise BenchError(f"ledger verify after the bulk insert failed:\n{v.stdout}{v.stderr}")
    m = re.search(r"(\d+) accounts", v.stdout)
    accounts = int(m.group(1)) if m else None
    restart_gate(procs, g)
    time.sleep(3)
    idle = vm_status(g.proc.pid)
    c0 = cpu_seconds(g.proc.pid)
    time.sleep(5)
    idle_cpu = (cpu_seconds(g.proc.pid) - c0) / 5
    before = sim.accepted_draws()
    res = run_wrk(g.url + DRAW_PATH, g.key, a.connections, 5, tmp)
    loaded = vm_status(g.proc.pid)
    time.sleep(0.3)
    if sim.accepted_draws() - before < res.requests:
        _, sample = http("POST", g.url + DRAW_PATH, json.loads(DRAW_BODY), {"Auth-Token": g.key})
        raise BenchError(f"memory run: draws were not accepted upstream; one answer: {sample[:300]!r}")
    log(f"memory: {accounts} keys: RSS idle {idle['VmRSS'] / 1024:.1f} MiB (peak so far "
        f"{idle['VmHWM'] / 1024:.1f}), after 5 s of draws "
        f"{loaded['VmRSS'] / 1024:.1f} MiB (peak {loaded['VmHWM'] / 1024:.1f}); idle CPU {idle_cpu * 100:.0f}%")
    # Side observations, after the RSS readings (they allocate).
    create_large = time_key_creates(g, oha, small)
    status, body = http("GET", g.admin + "/metrics", timeout=60)
    metrics_bytes = len(body) if status == 200 else None
    procs.stop(g.proc, timeout=40)
    log(f"memory: {small} key creations took {create_small:.1f} s with 1 key, {create_large:.1f} s with {accounts}")
    return {
        "keys": accounts, "rss_idle_kib": idle["VmRSS"], "hwm_idle_kib": idle["VmHWM"],
        "rss_kib": loaded["VmRSS"], "hwm_kib": loaded["VmHWM"],
        "idle_cpu": idle_cpu, "draw_rps": res.rps, "small": small, "create_small_s": create_small,
        "create_large_s": create_large, "metrics_bytes": metrics_bytes,
    }


def fsync_ms(dir_: Path, n: int = 200) -> tuple[float, float, float]:
    """Median, p90 and p99 time of a 4 KiB write + fdatasync in dir_: what a durable commit costs."""
    path = dir_ / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    times = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            os.write(fd, b"x" * 4096)
            os.fdatasync(fd)
            times.append((time.perf_counter() - t) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    times.sort()
    return times[len(times) // 2], times[len(times) * 9 // 10], times[len(times) * 99 // 100]


def machine() -> dict:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    return {
        "nproc": os.cpu_count(), "cpu": cpu, "mem_gib": mem_kib / 1024 / 1024,
        "kernel": platform.release(), "rev": rev + ("+dirty" if dirty else ""),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def tool_version(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (r.stdout or r.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def fmt_ms(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def added(rr: RateResult, base: RateResult, what: str) -> float:
    """Target minus simulator direct: the median of the differences within each round
    (both ran in it, one after the other), or of the kept runs without rounds."""
    if rr.rounds and len(rr.rounds) == len(base.rounds):
        diffs = sorted(getattr(x, what) - getattr(y, what) for x, y in zip(rr.rounds, base.rounds))
        n = len(diffs)
        return diffs[n // 2] if n % 2 else (diffs[n // 2 - 1] + diffs[n // 2]) / 2
    return getattr(rr, what) - getattr(base, what)


def render(rows: list[Row], mem: dict | None, m: dict, a, cmd: str, tools: dict, gate_rate_for: dict[str, int]) -> str:
    direct = next((r for r in rows if r.target.startswith("simulator")), None)
    out = ["## Load", ""]
    out.append(
        f"Made by `{cmd}` on {m['date']} at commit `{m['rev']}`: {m['nproc']} cores "
        f"({m['cpu']}), {m['mem_gib']:.1f} GiB RAM, Linux {m['kernel']}. Load generators "
        f"{tools['wrk']} and {tools['oha']}, on the same machine as the servers"
        + (f" (pinned: the proxy under test on CPU {a.pin[0]}, the simulator and the load "
           f"generators on CPU {a.pin[1]}; the PostgreSQL server unpinned)" if a.pin else "")
        + ". Disk: a "
        f"4 KiB write + `fdatasync` in the data directory took {m['fsync_ms'][0]:.2f} ms median, "
        f"{m['fsync_ms'][1]:.2f} ms p90, {m['fsync_ms'][2]:.2f} ms p99 at the start"
        + (", and before each round of the SQLite gate's fixed-rate runs (after its max runs) "
           + ", ".join(f"{p50:.2f}/{p99:.2f}" for p50, _, p99 in m["sync_at_rates"]) + " ms (median/p99)"
           if m.get("sync_at_rates") else "")
        + " (it varies with the other work on the machine, and stays slower for minutes after "
        f"gigabytes are written); "
        f"1-min load average at the start {m['load']:.1f}"
        + ("; the run's processes at nice −10." if m["priority"] else ".")
    )
    out.append("")
    out.append(
        f"Request: `POST {DRAW_PATH}` with a {len(DRAW_BODY)}-byte JSON body (priced, reserved, "
        f"forwarded, committed, audited by the gate). Upstream: `chuzhan-gate sim --task-ms 0` "
        f"(answers at once). **Max** = wrk, {a.connections} connections, {a.seconds} s, after a "
        f"2 s warm-up (the two SQLite rows: the median of {a.max_rounds} rounds taken in turn); "
        f"**CPU/req** = the proxy's own CPU (its processes' utime + stime) per request of that run, "
        f"in µs: not the load generator's or the simulator's. "
        f"**Latency** = oha at a fixed rate (`-q`, latency correction on), "
        f"{a.connections} connections, {a.seconds} s, at half of that gate's max, in {a.repeats} rounds that "
        f"each run every target measured at that rate once, in turn, the simulator direct included "
        f"(the run with the median p99 is shown, with the range of the runs' p99 in brackets); "
        f"*added* = target − simulator direct: the median over the rounds of the difference within a round. Latencies in ms."
    )
    out.append("")
    out.append("| target | max req/s | CPU/req | answers checked | fixed rate (req/s) | p50 | p99 | added p50 | added p99 |")
    out.append("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        rates = sorted(r.rate) or [None]
        for i, rate in enumerate(rates):
            rr = r.rate.get(rate) if rate is not None else None
            base = direct.rate.get(rate) if (direct and rate is not None and r is not direct) else None
            first = i == 0
            out.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                r.target if first else "″",
                (f"{r.max.rps:,.0f}" if r.max else "–") if first else "",
                (f"{r.max.cpu_us:.0f}" if r.max and r.max.cpu_us is not None else "–") if first else "",
                (r.max_ok or r.note) if first else "",
                f"{rate:,} (got {rr.achieved:,.0f})" if rr else "–",
                fmt_ms(rr.p50_ms) if rr else "–",
                (fmt_ms(rr.p99_ms) + (f" ({min(rr.p99_runs):.2f}–{max(rr.p99_runs):.2f})" if len(rr.p99_runs) > 1 else "")) if rr else "–",
                f"{added(rr, base, 'p50_ms'):+.3f}" if (rr and base) else "–",
                f"{added(rr, base, 'p99_ms'):+.3f}" if (rr and base) else "–",
            ))
    out.append("")
    notes = [r for r in rows if r.note]
    for r in notes:
        out.append(f"- {r.target}: {r.note}")
    if notes:
        out.append("")
    by = {r.target.split(" (")[0]: r for r in rows if r.max}
    disk, ram = by.get("gate, SQLite ledger + audit"), by.get("gate, SQLite ledger + audit on tmpfs")
    if disk and ram:
        ratio = m.get("disk_ram_ratio") or (disk.max.rps / ram.max.rps if ram.max.rps else 1.0)
        share = 1 - ratio
        if share > 0.15:
            verdict = (f"the disk's syncs, not the request path's code, set most of the durable gate's "
                       f"cost on this machine; at a fixed connection count its throughput is bounded "
                       f"by connections ÷ (time of the syncs in turn).")
        else:
            verdict = (f"the syncs cost {max(share, 0.0):.0%} of the throughput; the request path's CPU, "
                       f"not the disk, sets the limit on this machine.")
        out.append(
            f"What it shows: each admitted draw waits for two durable writes in turn (the "
            f"reservation before forwarding, the settlement before the answer), each one a group "
            f"commit ending in an `fdatasync`. With the same gate's data directory "
            f"in RAM it serves {ram.max.rps:,.0f} req/s instead of {disk.max.rps:,.0f} (median of the "
            f"rounds' ratios: {ratio:.2f}): {verdict}"
        )
        out.append("")
    one, many = by.get("gate, PostgreSQL ledger + audit"), next(
        (r for r in rows if r.max and "keys round-robin" in r.target), None)
    if one and many:
        out.append(
            f"PostgreSQL: with one key every reservation and commit updates the same account row; "
            f"the gate applies the writes that arrive together in one transaction (a group commit, "
            f"`src/ledger/pgbatch.rs`), so they share its row lock and its WAL flush "
            f"({one.max.rps:,.0f} req/s); spread over {a.pg_keys} keys the same gate does "
            f"{many.max.rps:,.0f} req/s. The PostgreSQL server runs on the same 2 cores."
        )
        out.append("")
    bare, ngx_ = by.get(BARE_ROW.split(" (")[0]), by.get("nginx pass-through")
    if bare and ngx_ and disk:
        out.append(
            f"The gate's stack alone: hyper + reqwest + tokio forwarding the same draws with none of "
            f"the gate's work serves {bare.max.rps:,.0f} req/s, {bare.max.rps / ngx_.max.rps:.2f} of "
            f"nginx's {ngx_.max.rps:,.0f}"
            + (f", at {bare.max.cpu_us:.0f} µs of CPU per request against nginx's {ngx_.max.cpu_us:.0f}"
               if bare.max.cpu_us is not None and ngx_.max.cpu_us is not None else "")
            + f". The billed gate serves {disk.max.rps:,.0f} ({disk.max.rps / bare.max.rps:.2f} of the bare "
            f"stack): the rest of the distance to nginx is the gate's own work (key check, pricing, two "
            f"durable ledger writes, the task record, the audit records)."
        )
        out.append("")
    after = m.get("sql_after")
    if after:
        out.append(
            f"The SQLite gate of the table, after its runs (1 key, {after['admitted']:,} draws admitted): "
            f"VmRSS {after['rss_kib'] / 1024:.1f} MiB; `gate_reservations_in_flight` "
            f"{after['in_flight']} one second after the load stopped (anything but 0 is a reservation "
            f"left pending: oha hangs up on its in-flight requests when its time is up)."
        )
        out.append("")
    if mem:
        out.append(
            f"Memory: a gate (SQLite ledger, audit on) started on a ledger holding **{mem['keys']:,} keys** "
            f"(1 + {mem['small']:,} created through `POST /admin/keys`, the rest written into the stopped "
            f"gate's `ledger.db` as the same rows the admin API writes, then checked by `chuzhan-gate ledger "
            f"verify`): **VmRSS {mem['rss_idle_kib'] / 1024:.1f} MiB idle**, {mem['rss_kib'] / 1024:.1f} MiB "
            f"after 5 s of draws at {mem['draw_rps']:,.0f} req/s (peak VmHWM {mem['hwm_kib'] / 1024:.1f} MiB); "
            f"idle CPU {mem['idle_cpu'] * 100:.0f}% of one core. Creating {mem['small']:,} keys through the "
            f"admin API took {mem['create_small_s']:.1f} s on a gate with 1 key and "
            f"{mem['create_large_s']:.1f} s on the one with {mem['keys']:,}"
            + (f"; `/metrics` is {mem['metrics_bytes'] / 1e6:.1f} MB with that many keys." if mem["metrics_bytes"] else ".")
        )
        out.append("")
        if mem.get("pg"):
            pm = mem["pg"]
            out.append(
                f"The same with the PostgreSQL ledger ({pm['keys']:,} keys added with `psql` in the admin "
                f"API's shape, `ledger verify` clean), idle: VmRSS {pm['rss_start_kib'] / 1024:.1f} MiB 3 s after "
                f"start, {pm['rss_idle_kib'] / 1024:.1f} MiB 10 s later (peak {pm['hwm_kib'] / 1024:.1f} MiB), "
                f"CPU {pm['idle_cpu'] * 100:.0f}% of one core (a replica polls the key table every second for "
                f"changes made on other replicas, `server::housekeeping`)."
            )
            out.append("")
    # The aims, checked by this run.
    gate = next((r for r in rows if r.target.startswith("gate, SQLite")), None)
    ngx = next((r for r in rows if r.target.startswith("nginx")), None)
    aims = []
    if gate and gate.max and ngx and ngx.max:
        ok = gate.max.rps >= ngx.max.rps
        aims.append(f"gate (SQLite) max ≥ nginx max: {'**met**' if ok else '**not met**'} ({gate.max.rps:,.0f} vs {ngx.max.rps:,.0f} req/s)"
                    + (f"; the gate's HTTP stack alone, with no gate in it, does {bare.max.rps:,.0f}"
                       if bare else ""))
    for r in rows:
        if r.target.startswith("gate") and r.rate and direct:
            rate = gate_rate_for.get(r.target)
            rr, base = r.rate.get(rate), direct.rate.get(rate)
            if rr and base:
                plus = added(rr, base, "p99_ms")
                aims.append(f"{r.target}: added p99 ≤ 1 ms at half load: {'**met**' if plus <= 1.0 else '**not met**'} ({plus:+.3f} ms)")
    if mem:
        ok = mem["rss_kib"] / 1024 < 64
        aims.append(f"resident memory < 64 MiB with {mem['keys']:,} keys: {'**met**' if ok else '**not met**'} "
                    f"({mem['rss_kib'] / 1024:.1f} MiB after 5 s of draws, {mem['rss_idle_kib'] / 1024:.1f} MiB idle)")
    if aims:
        out.append("Aims of issue 7:")
        out.append("")
        out.extend(f"- {x}" for x in aims)
        out.append("")
    out.append(
        (f"Caveat: every proxy had only CPU {a.pin[0]}, and the load generator and the simulator "
         f"shared CPU {a.pin[1]}; " if a.pin else
         "Caveat: 2 cores are shared by the load generator, the simulator and the proxy under "
         "test, so every figure is a lower bound of what the proxy does on its own; ")
        + "compare rows with each other, not with other machines."
    )
    out.append("")
    return "\n".join(out)


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    pat = re.compile(r"^## Load\n.*?(?=^## |\Z)", re.S | re.M)
    if pat.search(text):
        text = pat.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def cargo_release(what: list[str], given: str | None, relpath: str, deadline: int) -> str:
    """`cargo build --release WHAT` (honours CARGO_TARGET_DIR) and the path of what it
    built, unless a binary was given."""
    if given:
        return given
    log("cargo build --release " + " ".join(what))
    r = subprocess.run(["cargo", "build", "--release", *what], cwd=REPO, timeout=deadline)
    if r.returncode != 0:
        raise BenchError(f"cargo build --release {' '.join(what)} failed")
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    if not target.is_absolute():
        target = REPO / target
    b = target / "release" / relpath
    if not b.exists():
        raise BenchError(f"no binary at {b}")
    return str(b)


def build(a) -> str:
    return cargo_release(["--bin", "chuzhan-gate"], a.bin, "chuzhan-gate", a.deadline)


def build_bare(a) -> str:
    """examples/bare_proxy.rs, built in release mode like the gate (or --bare)."""
    return cargo_release(["--example", "bare_proxy"], a.bare, "examples/bare_proxy", a.deadline)


def memory_only(a, oha: str | None) -> int:
    """Step 4 alone: the memory of a gate holding a.keys keys, printed as JSON.

    Without oha the 1,000 admin-API key creations are made one at a time (the
    timings then say less; the memory figures are the same)."""
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="gate-bench-"))
    schema = f"bench_{os.getpid()}_{int(time.time())}_mem"
    pg_used = False
    try:
        bin_ = str(shutil.copy2(build(a), tmp / "chuzhan-gate"))
        sim = start_sim(procs, bin_, tmp)
        mem = memory_run(procs, bin_, sim, a, oha, tmp)
        if not a.no_pg and pg_reachable(a.pg_url) and shutil.which("psql"):
            pg_used = True
            mem["pg"] = pg_memory_run(procs, bin_, sim, a, tmp, schema)
    except (BenchError, Deadline) as e:
        log(f"FAILED: {e}")
        log(f"logs kept in {tmp}")
        return 1
    finally:
        signal.alarm(0)
        procs.stop_all()
        if pg_used:
            drop_pg_schema(a.pg_url, schema)
    print(json.dumps(mem, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", help="use this chuzhan-gate binary instead of building")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="fixed-rate runs per point (the median p99 is kept)")
    ap.add_argument("--keys", type=int, default=100_000, help="keys for the memory run (0: skip)")
    ap.add_argument("--pg-url", default=os.environ.get("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--no-pg", action="store_true")
    ap.add_argument("--max-rounds", type=int, default=3,
                    help="alternating max runs of the SQLite gate and its tmpfs twin (median kept)")
    ap.add_argument("--no-shm", dest="shm_row", action="store_false",
                    help="skip the diagnostic run with the data dir on tmpfs")
    ap.add_argument("--pg-keys", type=int, default=64, help="also drive the PostgreSQL gate with this many keys (<2: skip)")
    ap.add_argument("--priority", action="store_true",
                    help="run everything at nice -10 (root), so that other work on the machine disturbs less")
    ap.add_argument("--no-nginx", action="store_true")
    ap.add_argument("--pin", type=parse_pin, metavar="PROXY/DRIVER",
                    help="taskset CPU lists: the proxy under test on PROXY, the simulator and the load "
                         "generators on DRIVER (e.g. 1/0), so that they do not take each other's core")
    ap.add_argument("--bare", help="use this bare_proxy binary (examples/bare_proxy.rs) instead of building it")
    ap.add_argument("--no-bare", action="store_true", help="skip the row of the gate's HTTP stack alone")
    ap.add_argument("--no-write", action="store_true", help="print the section instead of writing docs/benchmarks.md")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    ap.add_argument("--deadline", type=int, default=570, help="stop everything after this many seconds")
    ap.add_argument("--only", choices=["memory"],
                    help="run only this step (memory: step 4, SQLite and, unless --no-pg, PostgreSQL); "
                         "prints its figures as JSON and writes nothing")
    a = ap.parse_args()
    cmd = "python3 bench/load.py" + ("" if len(sys.argv) == 1 else " " + " ".join(sys.argv[1:]))

    def on_alarm(*_):
        raise Deadline(f"the run passed its {a.deadline} s deadline")

    def on_term(*_):
        raise Deadline("terminated")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.alarm(a.deadline)

    if a.priority:
        try:
            os.nice(-10)
        except OSError as e:
            print(f"--priority needs root: {e}", file=sys.stderr)
            return 2

    if not shutil.which("wrk"):
        print("wrk is needed (apt-get install wrk)", file=sys.stderr)
        return 2
    if a.pin:
        global PIN
        PIN = a.pin
    oha = oha_bin()
    if a.only == "memory":
        return memory_only(a, oha)
    if not oha:
        print("oha is needed for the fixed-rate latency runs (cargo install --locked oha)", file=sys.stderr)
        return 2
    tools = {"wrk": tool_version(["wrk", "--version"]).split(" [")[0].replace("debian/", ""),
             "oha": tool_version([oha, "--version"])}

    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="gate-bench-"))
    pg_schema = f"bench_{os.getpid()}_{int(time.time())}"
    pg_used = False
    pg_schemas: list[str] = []
    rows: list[Row] = []
    gate_rate_for: dict[str, int] = {}
    mem = None
    env_info: dict = {}
    mem_error = ""
    shm_dirs: list[Path] = []
    try:
        # A private copy: a rebuild in a shared target dir during the run must not
        # change the binary under the restart of the memory run.
        bin_ = str(shutil.copy2(build(a), tmp / "chuzhan-gate"))
        bare = None if a.no_bare else str(shutil.copy2(build_bare(a), tmp / "bare_proxy"))
        t_start = time.monotonic()
        env_info = {"fsync_ms": fsync_ms(tmp), "load": os.getloadavg()[0], "priority": a.priority}
        sim = start_sim(procs, bin_, tmp)
        direct = Row("simulator direct")
        rows.append(direct)
        direct.max, direct.max_ok = measure_max(direct.target, sim.url + DRAW_PATH, SIM_TOKEN, sim, a, tmp,
                                                  sim.proc.pid)

        # Gate, embedded SQLite ledger + audit log (the defaults: nothing to configure).
        g_sql = start_gate(procs, bin_, tmp, "sqlite", sim, {}, None)
        g_sql.key = create_key(g_sql, "bench", HUGE_BUDGET)
        row = Row("gate, SQLite ledger + audit")
        rows.append(row)
        pair = [(row, g_sql)]
        # Diagnostic: the same gate with its data dir in RAM, where fdatasync costs
        # nothing. Not a way to run it (a power cut loses the ledger): it separates
        # what the gate's code costs from what the disk's syncs cost. The two are
        # measured in alternating rounds: this machine changes speed for minutes at
        # a time, and one run each, minutes apart, once put them in different speeds.
        g_shm = None
        if a.shm_row and Path("/dev/shm").is_dir():
            shm = Path(tempfile.mkdtemp(prefix="gate-bench-", dir="/dev/shm"))
            shm_dirs.append(shm)
            g_shm = start_gate(procs, bin_, tmp, "shm", sim, {"GATE_DATA_DIR": str(shm)}, None)
            g_shm.key = create_key(g_shm, "bench", HUGE_BUDGET)
            shm_row = Row("gate, SQLite ledger + audit on tmpfs (diagnostic: no real fsync)")
            rows.append(shm_row)
            pair.append((shm_row, g_shm))
        rounds = a.max_rounds if len(pair) > 1 else 1
        got: dict[str, list[tuple[MaxResult, str]]] = {r.target: [] for r, _ in pair}
        for _ in range(rounds):
            for r, g in pair:
                got[r.target].append(measure_max(r.target, g.url + DRAW_PATH, g.key, sim, a, tmp, g.proc.pid))
        for r, _ in pair:
            runs = sorted(got[r.target], key=lambda x: x[0].rps)
            r.max, r.max_ok = runs[len(runs) // 2]
            if rounds > 1:
                r.max_ok += (f"; median of {rounds} rounds alternating with the other SQLite row "
                             f"({runs[0][0].rps:,.0f}–{runs[-1][0].rps:,.0f})")
        if rounds > 1:
            ratios = sorted(a_[0].rps / b_[0].rps for a_, b_ in zip(got[pair[0][0].target], got[pair[1][0].target]))
            env_info["disk_ram_ratio"] = ratios[len(ratios) // 2]
        rate_sql = max(1, int(row.max.rps / 2))
        gate_rate_for[row.target] = rate_sql
        at_rate_sql = [(direct, sim.url + DRAW_PATH, SIM_TOKEN)] + [(r, g.url + DRAW_PATH, g.key) for r, g in pair]

        # nginx as a plain pass-through proxy.
        ngx = None
        if not a.no_nginx:
            row = Row("nginx pass-through")
            started = start_nginx(procs, tmp, sim)
            rows.append(row)
            if started:
                ngx, ngx_port = started
                url = f"http://127.0.0.1:{ngx_port}{DRAW_PATH}"
                row.max, row.max_ok = measure_max(row.target, url, "client-token", sim, a, tmp, ngx.pid)
                at_rate_sql.append((row, url, "client-token"))
            else:
                row.note = "skipped: nginx is not installed"

        # The gate's HTTP stack with none of the gate's work: how much of the distance
        # to nginx is hyper + reqwest + tokio, and how much is billing.
        bare_proc = None
        if bare:
            row = Row(BARE_ROW)
            rows.append(row)
            port = free_port()
            bare_proc = procs.start("bare", pinned("proxy", [bare, f"127.0.0.1:{port}", sim.url]),
                                    env=os.environ | {"BARE_PROXY_TOKEN": SIM_TOKEN}, log_path=tmp / "bare.log")
            wait_tcp(port, 10, bare_proc)
            url = f"http://127.0.0.1:{port}{DRAW_PATH}"
            row.max, row.max_ok = measure_max(row.target, url, "client-token", sim, a, tmp, bare_proc.pid)
            at_rate_sql.append((row, url, "client-token"))

        # Latency at half the SQLite gate's max, every target in each round.
        env_info["sync_at_rates"] = measure_rates(at_rate_sql, rate_sql, sim, a, oha, tmp)
        time.sleep(1)
        env_info["sql_after"] = gate_state(g_sql)
        for p in [g_sql.proc] + ([g_shm.proc] if g_shm else []):
            procs.stop(p, timeout=40)
        for p in (ngx, bare_proc):
            if p is not None:
                procs.stop(p, timeout=10)

        # Gate, PostgreSQL ledger in a fresh schema.
        if not a.no_pg:
            row = Row("gate, PostgreSQL ledger + audit")
            if pg_reachable(a.pg_url):
                cfg = tmp / "pg.toml"
                cfg.write_text(f'[ledger]\nbackend = "postgres"\nschema = "{pg_schema}"\n')
                pg_used = True
                pg_schemas.append(pg_schema)
                g_pg = start_gate(procs, bin_, tmp, "pg", sim, {"GATE_LEDGER_URL": a.pg_url}, cfg)
                g_pg.key = create_key(g_pg, "bench", HUGE_BUDGET)
                rows.append(row)
                row.max, row.max_ok = measure_max(row.target, g_pg.url + DRAW_PATH, g_pg.key, sim, a, tmp,
                                                      g_pg.proc.pid)
                rate_pg = max(1, int(row.max.rps / 2))
                gate_rate_for[row.target] = rate_pg
                measure_rates([(direct, sim.url + DRAW_PATH, SIM_TOKEN), (row, g_pg.url + DRAW_PATH, g_pg.key)],
                              rate_pg, sim, a, oha, tmp)
                if a.pg_keys > 1:
                    # One key means one hot account row that every reservation locks in
                    # turn; a fleet's load is spread over many keys.
                    many = Row(f"gate, PostgreSQL ledger + audit, {a.pg_keys} keys round-robin")
                    toks = [create_key(g_pg, f"bench-{i}", HUGE_BUDGET) for i in range(a.pg_keys)]
                    rows.append(many)
                    many.max, many.max_ok = measure_max(many.target, g_pg.url + DRAW_PATH, toks, sim, a, tmp,
                                                            g_pg.proc.pid)
                    many.note = (f"wrk latency at max load: p50 {fmt_ms(many.max.p50_ms)} ms, p99 "
                                 f"{fmt_ms(many.max.p99_ms)} ms (oha cannot vary the key, so no fixed-rate run)")
                procs.stop(g_pg.proc, timeout=40)
            else:
                row.note = f"skipped: no PostgreSQL at {a.pg_url}"
                rows.append(row)

        if a.keys > 0:
            # A failed memory run must not throw away the table measured above.
            try:
                mem = memory_run(procs, bin_, sim, a, oha, tmp)
            except BenchError as e:
                log(f"memory run failed: {e}")
                mem_error = str(e)
            if mem and not a.no_pg and pg_used and shutil.which("psql"):
                pg_schemas.append(pg_schema + "_mem")
                try:
                    mem["pg"] = pg_memory_run(procs, bin_, sim, a, tmp, pg_schema + "_mem")
                except BenchError as e:
                    log(f"PostgreSQL memory run failed: {e}")
        log(f"measured in {time.monotonic() - t_start:.0f} s")
    except (BenchError, Deadline) as e:
        log(f"FAILED: {e}")
        log(f"logs kept in {tmp}")
        procs.stop_all()
        for sc in pg_schemas:
            drop_pg_schema(a.pg_url, sc)
        return 1
    finally:
        signal.alarm(0)
        procs.stop_all()
        for d in shm_dirs:
            shutil.rmtree(d, ignore_errors=True)

    for sc in pg_schemas:
        drop_pg_schema(a.pg_url, sc)
    section = render(rows, mem, machine() | env_info, a, cmd, tools, gate_rate_for)
    if mem_error:
        section += f"\nThe memory run failed: {mem_error.splitlines()[0]}\n"
    if a.no_write:
        print(section)
    else:
        write_section(Path(a.out), section)
        log(f"wrote the Load section of {a.out}")
        print(section)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
