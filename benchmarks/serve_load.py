"""Load on the search service: a mixed load (text, photo and filtered text searches),
requests/s and latency at several client counts, and a promotion plus a rollback under
load.

Starts `python -m components serve` on 127.0.0.1 over the promoted release of `--workdir`
(default `artifacts/`, after `make run`). First a mixed load at `--mix-clients` (16):
each client sends in turn 8 text searches, a photo search (one of 64 catalog photos,
multipart) and a text search filtered by a top-level category, reported per kind. Then
for each client count it runs that many
concurrent clients (asyncio, keep-alive HTTP/1.1) sending text searches drawn from the
catalog's queries for `--seconds`. With `--swap` (the default), a last run at 16 clients
rebuilds the index as another type, promotes it, waits until the service answers with it,
and rolls back, the load running until the rollback is served, counting failed requests,
answers per release and the time until each release is served. Then (unless
`--no-remove`) a last run at 16 clients removes 20 listings that searches return and reports the
last time one of them was answered after `remove` returned.
127.0.0.1 only; every run is bounded in time.

With `--compare REV`, only text-only rows, alternating between this checkout's service and
the service of revision REV (a git worktree of it, run by the same interpreter) on the same
release, `--rounds` (3) each per client count, then each one's median req/s and their
ratio: what a change costs, as a ratio from one run. A revision from before the store
shared objects between versions reads a release only from a flat copy
(`--compare-flat-store`).

    .venv/bin/python benchmarks/serve_load.py [--clients 1 4 16 64] [--seconds 10] \
        [--mix-clients 16] [--mix text=8,photo=1,filtered=1] [--text-only] [--no-swap] \
        [--no-remove] [--set KEY=VALUE ...]
    .venv/bin/python benchmarks/serve_load.py --compare fc305b8 --compare-flat-store \
        --clients 1 16 --seconds 15 [--this-set serve.facet_hits=0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
POLL_S = 0.5  # the service's serve.poll_s here


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def queries(workdir: Path) -> list[str]:
    table = pq.read_table(workdir / "featurize" / "queries.parquet", columns=["query"])
    found = sorted(set(table.column(0).to_pylist()))
    random.Random(0).shuffle(found)
    return found


class Connection:
    """A minimal keep-alive HTTP/1.1 GET client on asyncio streams: the load generator
    shares the 2 cores with the service, so it must cost little (httpx cost about as
    much CPU per request as the service itself)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, target: str) -> tuple[int, bytes]:
        return await self.request(f"GET {target} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())

    async def post(self, target: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        head = (
            f"POST {target} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return await self.request(head.encode() + body)

    async def request(self, data: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def load(
    url: str,
    texts: list[str],
    clients: int,
    seconds: float,
    until: threading.Event | None = None,
    answers: list | None = None,
) -> dict:
    """`clients` concurrent clients for `seconds`, or (`until`) for at least `seconds` and
    until the event is set. `answers`: each answer's (sent, received, listing ids) is
    appended (perf_counter seconds)."""
    latencies: list[float] = []
    failures: list[str] = []
    versions: dict[str, int] = {}
    deadline = time.perf_counter() + seconds
    parts = urllib.parse.urlsplit(url)

    def going() -> bool:
        return time.perf_counter() < deadline or (until is not None and not until.is_set())

    async def client(offset: int) -> None:
        i = offset
        connection = Connection(parts.hostname, parts.port)
        try:
            while going():
                target = "/search?" + urllib.parse.urlencode({"q": texts[i % len(texts)], "k": 10})
                i += clients
                start = time.perf_counter()
                try:
                    status, body = await connection.get(target)
                except (OSError, asyncio.IncompleteReadError, ValueError) as err:
                    failures.append(f"{type(err).__name__}: {err}")
                    connection.close()
                    connection = Connection(parts.hostname, parts.port)
                    continue
                if status != 200:
                    failures.append(f"{status}: {body[:100]!r}")
                    continue
                received = time.perf_counter()
                latencies.append(received - start)
                answer = json.loads(body)
                versions[answer["release"]] = versions.get(answer["release"], 0) + 1
                if answers is not None:
                    found = [hit["listing_id"] for hit in answer["results"]]
                    answers.append((start, received, found))
        finally:
            connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {
        "clients": clients,
        "requests": len(latencies),
        "failed": len(failures),
        "qps": len(latencies) / elapsed,
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "versions": versions,
        "failures": failures[:3],
    }


MIX = "text=8,photo=1,filtered=1"  # 80% text, 10% photo, 10% filtered text
KINDS = ("text", "filtered", "photo")


def parse_mix(text: str) -> tuple[str, ...]:
    """`text=8,photo=1,filtered=1` as the sequence each client sends in turn."""
    mix = []
    for part in text.split(","):
        kind, _, count = part.partition("=")
        if kind.strip() not in KINDS or not count.strip().isdigit():
            raise SystemExit(f"--mix {text!r}: expected kind=count with kinds {KINDS}")
        mix += [kind.strip()] * int(count)
    return tuple(mix)


def photo_bodies(workdir: Path, count: int = 64) -> list[tuple[bytes, str]]:
    """Multipart bodies of `count` catalog photos (primary photos of listings), ready to
    post to /search/image, with their content type."""
    catalog = workdir / "catalog"
    rows = pq.read_table(catalog / "listings.parquet", columns=["image_uris"]).to_pylist()
    bodies = []
    for row in rows[:: max(1, len(rows) // count)][:count]:
        data = (catalog / row["image_uris"][0]).read_bytes()
        boundary = f"load{len(bodies):06d}"
        body = (
            (
                f"--{boundary}\r\nContent-Disposition: form-data; "
                f'name="photo"; filename="p.png"\r\n'
                f"Content-Type: image/png\r\n\r\n"
            ).encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        bodies.append((body, f"multipart/form-data; boundary={boundary}"))
    return bodies


def top_categories(workdir: Path) -> list[str]:
    table = pq.read_table(workdir / "catalog" / "listings.parquet", columns=["category"])
    return sorted({c.split(">")[0].strip() for c in table.column(0).to_pylist() if c})


async def mixed_load(
    url: str,
    texts: list[str],
    photos: list,
    categories: list[str],
    clients: int,
    seconds: float,
    mix: tuple[str, ...] = parse_mix(MIX),
) -> dict[str, dict]:
    """`clients` concurrent clients for `seconds`, each sending `mix` in turn: text
    searches, photo searches and text searches filtered by a top-level category. Per kind:
    requests, failures (503s among them: `refused`), rate and latency percentiles."""
    latencies: dict[str, list[float]] = {kind: [] for kind in KINDS}
    failures: dict[str, list[str]] = {kind: [] for kind in KINDS}
    deadline = time.perf_counter() + seconds
    parts = urllib.parse.urlsplit(url)

    async def client(offset: int) -> None:
        i = offset
        connection = Connection(parts.hostname, parts.port)
        try:
            while time.perf_counter() < deadline:
                kind = mix[i % len(mix)]
                text = texts[i % len(texts)]
                start = time.perf_counter()
                try:
                    if kind == "photo":
                        body, content_type = photos[i % len(photos)]
                        status, answer = await connection.post(
                            "/search/image?k=10", body, content_type
                        )
                    else:
                        query = {"q": text, "k": 10}
                        if kind == "filtered":
                            query["category"] = categories[i % len(categories)]
                        status, answer = await connection.get(
                            "/search?" + urllib.parse.urlencode(query)
                        )
                except (OSError, asyncio.IncompleteReadError, ValueError) as err:
                    failures[kind].append(f"{type(err).__name__}: {err}")
                    connection.close()
                    connection = Connection(parts.hostname, parts.port)
                    continue
                finally:
                    i += clients
                if status != 200:
                    failures[kind].append(f"{status}: {answer[:100]!r}")
                    continue
                latencies[kind].append(time.perf_counter() - start)
        finally:
            connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    elapsed = time.perf_counter() - started
    rows = {}
    for kind in sorted(set(mix), key=KINDS.index):
        ms = np.array(latencies[kind]) * 1000 if latencies[kind] else np.zeros(1)
        rows[kind] = {
            "requests": len(latencies[kind]),
            "failed": len(failures[kind]),
            "refused": sum(f.startswith("503") for f in failures[kind]),
            "qps": len(latencies[kind]) / elapsed,
            "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99)),
            "failures": failures[kind][:3],
        }
    everything = np.concatenate([np.array(v) for v in latencies.values()]) * 1000
    rows["all"] = {
        "requests": len(everything),
        "failed": sum(len(v) for v in failures.values()),
        "refused": sum(f.startswith("503") for v in failures.values() for f in v),
        "qps": len(everything) / elapsed,
        "p50": float(np.percentile(everything, 50)) if len(everything) else 0.0,
        "p99": float(np.percentile(everything, 99)) if len(everything) else 0.0,
        "failures": [],
    }
    return rows


def step(name: str, workdir: Path, *overrides: str, args: tuple[str, ...] = ()) -> None:
    argv = [sys.executable, "-m", "components", name, *args, "--set", f"paths.workdir={workdir}"]
    for override in overrides:
        argv += ["--set", override]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")


def wait_for_release(url: str, version: str, timeout: float = 120.0) -> float:
    """Seconds until /version answers with `version`."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        try:
            if httpx.get(f"{url}/version", timeout=5).json().get("release") == version:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"the service did not serve {version} within {timeout}s")


def current_version(workdir: Path) -> str:
    from components.config import StorageConfig
    from components.release import production
    from components.release.storage import open_storage

    store = open_storage(StorageConfig(uri=str(workdir / "production")))
    return production.read_pointer(store).version


def swap_under_load(url: str, workdir: Path, texts: list[str], seconds: float, pid: int) -> None:
    """16 clients while a new release is promoted and rolled back."""
    first = current_version(workdir)
    timings: dict[str, float] = {}
    peak = {"rss": rss_mb(pid)}
    stop = threading.Event()

    def watch_memory() -> None:
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], rss_mb(pid))
            time.sleep(0.05)

    def operator() -> None:
        time.sleep(1)
        step("index", workdir, "index.factory=HNSW32", "index.ef_search=256")
        step("evaluate", workdir, "evaluate.champion=null")
        step("promote", workdir)
        second = current_version(workdir)
        timings["promote -> served s"] = wait_for_release(url, second)
        step("rollback", workdir, args=("--to", first))
        timings["rollback -> served s"] = wait_for_release(url, first)

    def operate() -> None:
        try:
            operator()
        except BaseException as err:  # a failed step ends the benchmark, loudly
            timings["operator failed"] = float("nan")
            print(f"operator failed: {err}", file=sys.stderr)

    done = threading.Event()

    def operate_then_stop() -> None:
        operate()
        done.set()

    watcher = threading.Thread(target=watch_memory, daemon=True)
    worker = threading.Thread(target=operate_then_stop)
    before = rss_mb(pid)
    watcher.start()
    worker.start()
    # at least `seconds`, and until the operator has rolled back
    result = asyncio.run(load(url, texts, 16, seconds, until=done))
    worker.join()
    stop.set()
    print()
    print(
        f"promotion and rollback under load (16 clients, {seconds:.0f} s): "
        f"{result['requests']} requests, {result['failed']} failed, "
        f"{result['qps']:.0f} req/s, p99 {result['p99']:.0f} ms; answers by release "
        f"{result['versions']}; "
        + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
        + f"; server RSS {before:.0f} MB before, {peak['rss']:.0f} MB peak, "
        f"{rss_mb(pid):.0f} MB after"
    )
    if result["failures"]:
        print("failures:", result["failures"])
    step("index", workdir)  # the workdir as it was: the default index, evaluated again
    step("evaluate", workdir, "evaluate.champion=null")


def removal_under_load(url: str, workdir: Path, texts: list[str], poll_s: float) -> None:
    """16 clients while `remove` takes 20 listings that searches return out of search:
    the last time each came back after `remove` returned, against serve.poll_s + 1 s.
    The tombstones are retired afterwards (the store as it was)."""
    from components.config import StorageConfig
    from components.release import tombstones
    from components.release.storage import open_storage

    found = asyncio.run(_first_results(url, texts[:200]))
    removed = sorted(found)[:20]
    answers: list = []
    done = threading.Event()
    moments: dict[str, float] = {}

    def operator() -> None:
        time.sleep(3)
        moments["remove called"] = time.perf_counter()
        step("remove", workdir, args=(*removed, "--reason", "benchmark"))
        moments["remove returned"] = time.perf_counter()
        time.sleep(poll_s + 5)
        done.set()

    worker = threading.Thread(target=operator)
    worker.start()
    result = asyncio.run(load(url, texts, 16, 10.0, until=done, answers=answers))
    worker.join()
    gone = set(removed)
    returned = moments["remove returned"]
    # when each answer holding a removed listing arrived, against when remove returned
    late = [received - returned for sent, received, ids in answers if gone & set(ids)]
    over = [sent for sent, _, ids in answers if sent > returned + poll_s + 1 and gone & set(ids)]
    called = moments["remove called"]
    before = sum(1 for sent, _, ids in answers if sent < called and gone & set(ids))
    print()
    print(
        f"removal under load (16 clients, {len(removed)} listings returned by searches "
        f"removed, serve.poll_s {poll_s}): {result['requests']} requests, "
        f"{result['failed']} failed, {result['qps']:.0f} req/s, p99 {result['p99']:.0f} ms; "
        f"{before} answers before remove held one of them; "
        f"remove took {returned - called:.2f} s; the last answer holding one arrived "
        f"{max(late):+.2f} s from remove's return (bound +{poll_s + 1:.1f} s); "
        f"{len(over)} answers sent later than the bound held one"
    )
    if result["failures"]:
        print("failures:", result["failures"])
    store = open_storage(StorageConfig(uri=str(workdir / "production")))
    tombstones.retire(store, [t.key for t in tombstones.read_all(store)])


async def _first_results(url: str, texts: list[str]) -> set[str]:
    parts = urllib.parse.urlsplit(url)
    connection = Connection(parts.hostname, parts.port)
    seen: set[str] = set()
    try:
        for text in texts:
            _, body = await connection.get("/search?" + urllib.parse.urlencode({"q": text}))
            seen.update(hit["listing_id"] for hit in json.loads(body)["results"][:3])
    finally:
        connection.close()
    return seen


def start_service(
    workdir: Path, overrides: list[str], cwd: Path = REPO
) -> tuple[subprocess.Popen, str, float]:
    """`python -m components serve` of the code in `cwd` over `workdir` on a free port,
    once it is ready: the process, its URL and the seconds it took."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "components", "serve", "--set", f"paths.workdir={workdir}"]
    command += ["--set", f"serve.port={port}", "--set", f"serve.poll_s={POLL_S}"]
    command += [item for override in overrides for item in ("--set", override)]
    # the service's log: a pipe nobody reads would fill and block it; a file lives with it
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115
    server = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=log)
    start = time.perf_counter()
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return server, url, time.perf_counter() - start
            reason = httpx.get(f"{url}/readyz", timeout=2).json().get("reason")
        except httpx.HTTPError:
            reason = None
        if server.poll() is not None or time.perf_counter() - start > 300:
            server.kill()
            log.seek(0)
            tail = log.read()[-1500:]
            raise SystemExit(
                f"the service of {cwd} did not become ready over {workdir}: "
                f"{reason or 'it stopped'}\n{tail}"
            )
        time.sleep(0.2)


def flat_store_copy(workdir: Path, copy: Path) -> Path:
    """A copy of `workdir` (hard links; its MLflow database copied) whose current release
    also has its files at `indices/<version>/<name>`, where revisions before the store
    shared objects between versions read them."""
    copy.mkdir(parents=True)
    for entry in workdir.iterdir():
        if entry.name == "mlflow.db":
            shutil.copy2(entry, copy / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, copy / entry.name, copy_function=os.link)
        else:
            os.link(entry, copy / entry.name)
    store = copy / "production"
    version = json.loads((store / "indices" / "CURRENT").read_text())["version"]
    manifest = json.loads((store / "indices" / version / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        flat = store / "indices" / version / name
        if "object" in entry and not flat.exists():
            flat.parent.mkdir(parents=True, exist_ok=True)
            os.link(store / entry["object"], flat)
    return copy


def compare(args, workdir: Path) -> None:
    """Text-only rows against this checkout's service and revision `args.compare`'s
    (a git worktree of it, run by the same interpreter), alternating, `args.rounds` each,
    on the same release; each revision's median req/s and the ratio."""
    other_dir = Path(tempfile.mkdtemp(prefix="serve-compare-")) / "tree"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(other_dir), args.compare],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    other_workdir = (args.compare_workdir or workdir).resolve()
    if args.compare_flat_store:
        other_workdir = flat_store_copy(other_workdir, other_dir.parent / "work")
    servers = {}
    try:
        servers["this"] = start_service(workdir, args.set + args.this_set)
        servers[args.compare] = start_service(other_workdir, args.set, cwd=other_dir)
        texts = queries(workdir)
        print(f"{args.seconds:.0f} s per row, alternating; text searches only")
        print("| clients | round | service | requests | failed | req/s | p50 ms | p99 ms |")
        print("|---|---|---|---|---|---|---|---|")
        for clients in args.clients:
            rates: dict[str, list[float]] = {name: [] for name in servers}
            for round_ in range(1, args.rounds + 1):
                for name, (_, url, _) in servers.items():
                    row = asyncio.run(load(url, texts, clients, args.seconds))
                    rates[name].append(row["qps"])
                    print(
                        f"| {clients} | {round_} | {name} | {row['requests']} | {row['failed']} "
                        f"| {row['qps']:.0f} | {row['p50']:.1f} | {row['p99']:.1f} |",
                        flush=True,
                    )
            ours, theirs = (float(np.median(rates[name])) for name in servers)
            print(
                f"{clients} clients: this checkout {ours:.0f} req/s, {args.compare} "
                f"{theirs:.0f} req/s (medians): ratio {ours / theirs:.2f}"
            )
    finally:
        for server, _, _ in servers.values():
            server.terminate()
            server.wait(timeout=30)
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(other_dir)], cwd=REPO, check=False
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "artifacts")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--no-swap", action="store_true")
    parser.add_argument("--no-remove", action="store_true")
    parser.add_argument(
        "--mix-clients", type=int, nargs="*", default=[16], help="mixed load rows (none: skip)"
    )
    parser.add_argument("--text-only", action="store_true", help="skip the text-only rows")
    parser.add_argument("--mix", default=MIX, help=f"the mixed load's kinds and counts ({MIX})")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a param override for the service (serve.photo_priority=normal, ...); repeatable",
    )
    parser.add_argument(
        "--compare",
        metavar="REV",
        help="only text-only rows, alternating between this checkout's service and REV's",
    )
    parser.add_argument(
        "--compare-workdir",
        type=Path,
        help="with --compare: the workdir REV's service serves (default --workdir; an older "
        "revision may not read a newer store: give one it promoted)",
    )
    parser.add_argument(
        "--compare-flat-store",
        action="store_true",
        help="with --compare: serve REV a linked copy of the workdir whose release files are "
        "also where revisions before the shared-object store read them",
    )
    parser.add_argument(
        "--this-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --compare: an override for this checkout's service only (a key REV has not)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="with --compare: rows each")
    args = parser.parse_args()
    mix = parse_mix(args.mix)
    workdir = args.workdir.resolve()
    if args.compare:
        compare(args, workdir)
        return
    server, url, ready_s = start_service(workdir, args.set)
    start = time.perf_counter() - ready_s
    try:
        texts = queries(workdir)
        version = httpx.get(f"{url}/version").json()
        print(
            f"release {version['release']} ({version['listings']} listings, model "
            f"v{version['model']['version']}), ready after {time.perf_counter() - start:.1f} s; "
            f"{len(texts)} distinct queries; {args.seconds:.0f} s per row; server RSS "
            f"{rss_mb(server.pid):.0f} MB"
        )
        if args.mix_clients:
            photos, categories = photo_bodies(workdir), top_categories(workdir)
            print(
                f"mixed load: {' '.join(mix)} in turn; filters: {len(categories)} "
                "top-level categories"
            )
            print("| clients | kind | requests | failed | of them 503 | req/s | p50 ms | p99 ms |")
            print("|---|---|---|---|---|---|---|---|")
            for clients in args.mix_clients:
                rows = asyncio.run(
                    mixed_load(url, texts, photos, categories, clients, args.seconds, mix)
                )
                for kind, row in rows.items():
                    print(
                        f"| {clients} | {kind} | {row['requests']} | {row['failed']} | "
                        f"{row['refused']} | "
                        f"{row['qps']:.0f} | {row['p50']:.1f} | {row['p99']:.1f} |"
                    )
                    for failure in row["failures"]:
                        print(f"  failed: {failure}")
            filters = httpx.get(f"{url}/metrics").text.splitlines()
            print(
                "\n".join(
                    line for line in filters if line.startswith("search_filter_strategy_total")
                )
            )
        print("| clients | requests | failed | req/s | p50 ms | p99 ms |")
        print("|---|---|---|---|---|---|")
        for clients in [] if args.text_only else args.clients:
            row = asyncio.run(load(url, texts, clients, args.seconds))
            print(
                f"| {clients} | {row['requests']} | {row['failed']} | {row['qps']:.0f} | "
                f"{row['p50']:.1f} | {row['p99']:.1f} |"
            )
        if not args.no_swap:
            swap_under_load(url, workdir, texts, max(args.seconds, 40.0), server.pid)
        if not args.no_remove:
            removal_under_load(url, workdir, texts, POLL_S)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
