#!/usr/bin/env python3
"""Benchmarks for tsmd. Prints figures; asserts nothing about speed.

    python3 bench_tsmd.py sync [--torrents 5000] [--files 100]
    python3 bench_tsmd.py scrape [--hashes 20000] [--no-libtorrent]
    python3 bench_tsmd.py dht [--nodes 1000000] [--only simulated|libtorrent]
    python3 bench_tsmd.py report [--torrents 100000] [--days 30]
    python3 bench_tsmd.py run [--torrents 20000]
    python3 bench_tsmd.py fuzz [--inputs 1000000] [--seed 1]
    python3 bench_tsmd.py decode [--files 1000000]
    python3 bench_tsmd.py startup [--torrents 2000]
    python3 bench_tsmd.py probe [--torrents 200] [--sessions 8] [--peers 1000]

`sync`: generates a collection of .torrent files (libgen-like: many files per torrent, a few
trackers), serves it from a separate process on 127.0.0.1 (an HTML index page, ETags, conditional
requests), then runs `tsmd sync` as a subprocess twice: the first sync and the re-sync. For each it
prints wall time, torrents/s, requests seen by the server, downloads and the peak RSS of tsmd.
`scrape`: starts Debian's opentracker on 127.0.0.1, populates it by real BEP 15 announces from
distinct 127.x addresses, scrapes every hash with `tsmd scrape` over UDP and HTTP and checks every
count; then libtorrent scrapes the same hashes for comparison; then a run where half of the
trackers are dead.
`dht`: a simulated DHT of up to 9 million nodes in a separate process (recall, wrong peers, packets
per lookup cold and warm, the rate limit as the nodes saw it), then a network of real libtorrent
nodes where tsmd and libtorrent's own `dht_get_peers` look up the same infohashes, both timed
until every announced peer had arrived and until every lookup had ended.
`probe`: first exactness against libtorrent: torrents held by real libtorrent sessions on distinct
127.x addresses, some whole, some in part (upload mode), half of them listed as magnets only;
`tsmd probe` must find the verified seeds and availability that the sessions themselves report,
and fetch every magnet's metadata (BEP 9). Then speed and memory for 1,000 honest fake peers in
a process of their own (50 torrents x 20, seeds and partial holders), at the default concurrency
and at 200, beside one libtorrent session connecting to the same peers until every bitfield has
arrived. Then hostile peers among honest ones (garbage, another torrent's handshake, a 4 GiB
length, a wrong bitfield, a trickle, silence, a hang-up, forged metadata): tsmd must exit 0,
the honest numbers stay exact and the forged metadata is not stored.
`fuzz`: test_tsmd's seeded mutation fuzzer over every `_untrusted` parser, in worker processes
that may crash or hang without stopping the count.
`decode`: what the bencode scan costs beside bencoder.pyx's own decode (10,000 DHT replies, two
5 MB .torrent files), then `tsmd sync` of one .torrent of a million files, with its peak RSS.
Everything runs on loopback and stops by itself.
"""

from __future__ import annotations

import argparse
import json
import hashlib
import html
import math
import multiprocessing
import os
import platform
import random
import re
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Final

import bencoder

HERE = Path(__file__).resolve().parent



# The columns a sample is written with; the others have their defaults.
INSERT_SAMPLES = ("INSERT INTO tracker_samples (torrent_id, tracker_id, run_id, measured, "
                  "seeders, leechers, completed) VALUES ")


def make_info(number: int, files: int) -> dict:
    piece_length = 4 * 1024 * 1024
    sizes = [1_000_000 + 37 * ((number * 7919 + i) % 100_000) for i in range(files)]
    pieces = hashlib.sha1(str(number).encode()).digest() * max(1, -(-sum(sizes) // piece_length))
    return {b"name": f"{number:05d}".encode(), b"piece length": piece_length, b"pieces": pieces,
            b"files": [{b"length": size, b"path": [f"{number * 1000 + i}".encode()]}
                       for i, size in enumerate(sizes)]}


def make_torrent(number: int, files: int,
                 trackers: tuple[str, ...] = ("udp://tracker.example.org:1337/announce",
                                              "http://tracker.example.net/announce")) -> bytes:
    return bencoder.bencode({
        b"announce": trackers[0].encode(),
        b"announce-list": [[url.encode()] for url in trackers],
        b"creation date": 1_500_000_000 + number, b"created by": b"bench_tsmd",
        b"info": make_info(number, files)})


def serve(files: str | dict[str, tuple[bytes, str]], port_queue: multiprocessing.Queue,
          requests, stop) -> None:
    """Serves `files` (path -> body, type; or a folder, its index.html as /) with ETags, every
    other path a 404, counting requests in `requests`, until `stop` is set: the tests'
    collection server, in a process of its own."""
    from test_tsmd import CollectionServer

    class CountingServer(CollectionServer):
        def respond(self, handler, path):
            with requests.get_lock():
                requests.value += 1
            return super().respond(handler, path)

    with CountingServer() as server:
        if isinstance(files, str):
            for file in Path(files).iterdir():
                path = "/" if file.name == "index.html" else f"/{file.name}"
                server.files[path] = (file.read_bytes(), "text/html" if path == "/" else
                                      "application/x-bittorrent")
        else:
            server.files.update(files)
        port_queue.put(server.port)
        stop.wait(3600)  # never outlive a forgotten benchmark


# Runs tsmd as its installed command does and reports the child's own peak RSS on stderr
# when it exits. Linux's VmHWM belongs to the process's own memory; getrusage's maxrss also
# counts the peak of the parent it was forked from.
PEAK_RSS_WRAPPER = """
import atexit, resource, sys

def peak_kib():
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

atexit.register(lambda: sys.stderr.write("\\npeak-rss-kib %d\\n" % peak_kib()))
sys.path.insert(0, sys.argv[1])
sys.argv = ["tsmd", *sys.argv[2:]]
from tsmd import app  # as the installed `tsmd` command does: the module's bytecode is cached
sys.exit(app())
"""


# tsmd as a user's install runs it: its bytecode cached. (This VM's environment sets
# PYTHONDONTWRITEBYTECODE, which would make every run compile tsmd.py again, about 80 ms.)
USER_ENV: Final = {key: value for key, value in os.environ.items()
                   if key != "PYTHONDONTWRITEBYTECODE"}


def run_tsmd(config: Path, *args: str, ok_codes: tuple[int, ...] = (0,)) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in KiB, last line tsmd said) of one tsmd invocation."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK_RSS_WRAPPER, str(HERE),
                           "--config", str(config), *args], env=USER_ENV,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=1800)
    wall = time.perf_counter() - started
    if done.returncode not in ok_codes:
        sys.exit(f"tsmd {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    lines = done.stderr.strip().splitlines()
    peak = int(lines[-1].split()[-1])
    said = next((line for line in reversed(lines[:-1]) if line.strip()), "")
    return wall, peak, said


def bench_sync(torrents: int, files: int) -> None:
    with tempfile.TemporaryDirectory(prefix="tsmd-bench-") as tmp:
        root = Path(tmp)
        served = root / "served"
        served.mkdir()
        total_bytes = 0
        for number in range(torrents):
            data = make_torrent(number, files)
            total_bytes += len(data)
            (served / f"r_{number:05d}.torrent").write_bytes(data)
        links = "".join(f'<a href="r_{n:05d}.torrent">r_{n:05d}.torrent</a>\n'
                        for n in range(torrents))
        (served / "index.html").write_text(f"<html><body>\n{links}</body></html>\n")
        served_requests = multiprocessing.Value("q", 0)
        stop = multiprocessing.Event()
        ports: multiprocessing.Queue = multiprocessing.Queue()
        server = multiprocessing.Process(target=serve, daemon=True,
                                         args=(str(served), ports, served_requests, stop))
        server.start()
        try:
            port = ports.get(timeout=60)
            config = root / "tsmd.toml"
            # Per-host pacing lifted: one loopback server, throughput is what is measured.
            config.write_text(f'database = "bench.sqlite3"\n[network]\nallow_private = true\n'
                              f'[sync]\nper_host_rate = 0\nper_host_concurrency = 0\n'
                              f'[[collections]]\nname = "bench"\n'
                              f'url = "http://127.0.0.1:{port}/"\ntype = "books"\n')
            print(f"machine: {platform.node()}, {os.cpu_count()} cores, Python "
                  f"{platform.python_version()}, {platform.platform()}")
            print(f"collection: {torrents} torrents x {files} files, "
                  f"{total_bytes / torrents / 1024:.1f} KiB per .torrent on average")
            for label in ("first sync", "re-sync"):
                requests_before = served_requests.value
                wall, peak_kib, summary = run_tsmd(config, "sync")
                requests = served_requests.value - requests_before
                print(f"{label:>10}: {wall:6.2f} s, {torrents / wall:7.0f} torrents/s, "
                      f"{requests} requests, peak RSS {peak_kib / 1024:.0f} MiB")
                print(f"{'':>12}tsmd said: {summary}")
        finally:
            stop.set()
            server.join(timeout=5)
            if server.is_alive():
                server.kill()


def bench_listings(items: int, junk_lines: int) -> None:
    """A feed whose .torrent links all fail, a junk text file, and the parsers' speed."""
    import tsmd

    feed = [{"name": f"r_{n}.torrent", "link": f"/gone/r_{n}.torrent",
             "infohash": hashlib.sha1(b"%d" % n).hexdigest(), "size_bytes": 1_000_000 + n,
             "type": "books"} for n in range(items)]
    junk = "".join(f"<item>junk line {n}</item>\n" for n in range(junk_lines))
    files = {"/feed.json": (json.dumps(feed).encode(), "application/json"),
             "/junk.txt": (junk.encode(), "text/plain")}
    with tempfile.TemporaryDirectory(prefix="tsmd-bench-") as tmp:
        root = Path(tmp)
        served_requests = multiprocessing.Value("q", 0)
        stop = multiprocessing.Event()
        ports: multiprocessing.Queue = multiprocessing.Queue()
        server = multiprocessing.Process(target=serve, daemon=True,
                                         args=(files, ports, served_requests, stop))
        server.start()
        try:
            port = ports.get(timeout=60)
            print(f"machine: {platform.node()}, {os.cpu_count()} cores, Python "
                  f"{platform.python_version()}")
            for name, path, pacing in (("feed", "/feed.json", "per_host_rate = 0\n"
                                        "per_host_concurrency = 0\n"),
                                       ("junk", "/junk.txt", "")):
                config = root / f"{name}.toml"
                config.write_text(f'database = "{root / name}.sqlite3"\n[network]\n'
                                  f'allow_private = true\n[sync]\n{pacing}'
                                  f'[[collections]]\nname = "{name}"\n'
                                  f'url = "http://127.0.0.1:{port}{path}"\ntype = "books"\n')
                before = served_requests.value
                wall, peak_kib, said = run_tsmd(config, "-q", "sync", ok_codes=(1,))
                database = sqlite3.connect(root / f"{name}.sqlite3")
                listed, sized = database.execute(
                    "SELECT count(*), count(t.size_bytes) FROM memberships m JOIN torrents t "
                    "ON t.id = m.torrent_id WHERE m.removed IS NULL").fetchone()
                database.close()
                what = (f"{items:,}-item JSON feed, every .torrent link a 404 (pacing lifted)"
                        if name == "feed" else f"{junk_lines:,}-line junk text file")
                print(f"{what}: {wall:.2f} s, {served_requests.value - before:,} requests, "
                      f"{listed:,} listed, {sized:,} with a size, peak RSS "
                      f"{peak_kib / 1024:.0f} MiB")
        finally:
            stop.set()
            server.join(timeout=5)
            if server.is_alive():
                server.kill()
    rss = ('<?xml version="1.0"?><rss version="2.0"><channel>' + "".join(
        f'<item><title>t{n}</title><infohash>{hashlib.sha1(b"%d" % n).hexdigest()}</infohash>'
        f'<size>{n}</size><enclosure url="https://a.example/{n}.torrent" '
        f'type="application/x-bittorrent"/></item>' for n in range(items))
        + "</channel></rss>").encode()
    csv_text = ("infohash,name,size\n" + "".join(
        f"{hashlib.sha1(b'%d' % n).hexdigest()},t{n},{n}\n" for n in range(items))).encode()
    base = "https://a.example/"
    for label, body in (("RSS", rss), ("CSV", csv_text), ("JSON", files["/feed.json"][0])):
        seconds = best_of(3, lambda: tsmd.parse_index_untrusted(body, base))
        print(f"parse {label} of {items:,} items ({len(body) / 1e6:.1f} MB): "
              f"{seconds * 1000:.0f} ms, {items / seconds:,.0f} items/s")


def udp_datagrams() -> int:
    """Datagrams sent on this machine so far (/proc/net/snmp); on loopback every one sent is
    also received, so a delta counts both directions of an exchange once each."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()
             if line.startswith("Udp:")]
    return int(dict(zip(lines[0], lines[1]))["OutDatagrams"])


def make_scrape_db(path: Path, hashes: list[bytes], trackers_of) -> None:
    import tsmd

    db = tsmd.open_database(path)
    with tsmd.Transaction(db):
        collection_id = tsmd.upsert_collection(db, "bench", "http://bench.invalid/", "books", True)
        for n, infohash in enumerate(hashes):
            meta = tsmd.decode_magnet_untrusted(tsmd.magnet_uri(infohash.hex(), f"t{n}",
                                                                trackers_of(n)))
            torrent_id = tsmd.upsert_torrent(db, meta, 1)
            db.execute("INSERT INTO memberships (collection_id, source, torrent_id, file_name, "
                       "first_seen, last_seen) VALUES (?, ?, ?, ?, 1, 1)",
                       (collection_id, infohash.hex(), torrent_id, f"r_{n}.torrent"))
    db.close()


def scrape_config(root: Path, database: Path, dht: str = "", **scrape: object) -> Path:
    config = root / "scrape.toml"
    options = "".join(f"{key} = {value!r}\n".replace("'", '"') for key, value in scrape.items())
    config.write_text(f'database = "{database}"\n[network]\nallow_private = true\n'
                      f'[scrape]\nbind = "127.0.0.1:0"\n{options}[dht]\n{dht}'
                      f'[[collections]]\nname = "bench"\nurl = "http://bench.invalid/"\n'
                      f'type = "books"\n')
    return config


def last_run_counts(database: Path) -> dict:
    import json
    import sqlite3

    db = sqlite3.connect(database)
    counts = json.loads(db.execute("SELECT counts FROM runs ORDER BY id DESC LIMIT 1").fetchone()[0])
    db.close()
    return counts


def libtorrent_scrape(hashes: list[bytes], tracker: str, timeout: float,
                      window: int = 64) -> tuple[dict, float, int]:
    """libtorrent's own scrape of every hash: it asks one hash per request. Fired all at once,
    most of its requests are lost in the tracker's receive buffer and fail, so it is paced
    here: at most `window` scrapes outstanding, a failed one retried up to twice."""
    import libtorrent as lt

    session = lt.session({"enable_dht": False, "enable_lsd": False, "enable_upnp": False,
                          "enable_natpmp": False, "listen_interfaces": "127.0.0.1:0",
                          "alert_mask": lt.alert.category_t.tracker_notification
                          | lt.alert.category_t.error_notification,
                          "active_downloads": -1, "active_seeds": -1, "active_limit": -1,
                          "alert_queue_size": 100000})
    handles = []
    for infohash in hashes:
        params = lt.add_torrent_params()
        params.info_hashes = lt.info_hash_t(lt.sha1_hash(infohash))
        params.trackers = [tracker]
        params.save_path = tempfile.gettempdir()
        params.flags = (lt.torrent_flags.paused | lt.torrent_flags.upload_mode) \
            & ~lt.torrent_flags.auto_managed
        handles.append(session.add_torrent(params))
    by_hash = {bytes.fromhex(str(h.info_hashes().v1)): h for h in handles}
    results: dict[bytes, tuple[int, int]] = {}
    failures: dict[bytes, int] = {}
    waiting = list(reversed(handles))
    outstanding = 0
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    while (waiting or outstanding) and time.monotonic() < deadline:
        while waiting and outstanding < window:
            waiting.pop().scrape_tracker()
            outstanding += 1
        session.wait_for_alert(100)
        for alert in session.pop_alerts():
            if isinstance(alert, (lt.scrape_reply_alert, lt.scrape_failed_alert)):
                outstanding -= 1
                infohash = bytes.fromhex(str(alert.handle.info_hashes().v1))
                if isinstance(alert, lt.scrape_reply_alert):
                    results[infohash] = (alert.complete, alert.incomplete)
                elif failures.get(infohash, 0) < 2:
                    failures[infohash] = failures.get(infohash, 0) + 1
                    waiting.append(by_hash[infohash])
    wall = time.perf_counter() - started
    del session
    return results, wall, sum(failures.values())


def bench_scrape(count: int, with_libtorrent: bool, libtorrent_hashes: int) -> None:
    import hashlib

    from test_tsmd import OpenTracker, populate_opentracker

    hashes = [hashlib.sha1(f"bench {n}".encode()).digest() for n in range(count)]
    swarms = {h: (n % 4, n % 3, n % 4 + (n % 5 == 0)) for n, h in enumerate(hashes) if n % 5}
    with tempfile.TemporaryDirectory(prefix="tsmd-bench-") as tmp:
        root = Path(tmp)
        tracker = OpenTracker(root / "opentracker", hashes)
        try:
            started = time.perf_counter()
            populate_opentracker(tracker, swarms)
            print(f"machine: {platform.node()}, {os.cpu_count()} cores, Python "
                  f"{platform.python_version()}")
            print(f"opentracker populated with {count} hashes by real BEP 15 announces in "
                  f"{time.perf_counter() - started:.1f} s")
            udp = f"udp://127.0.0.1:{tracker.udp_port}/announce"
            http = f"http://127.0.0.1:{tracker.http_port}/announce"
            database = root / "scrape.sqlite3"
            make_scrape_db(database, hashes, lambda n: [udp])
            expected = {h.hex(): swarms.get(h, (0, 0, 0)) for h in hashes}
            for label, url, trusted in (("UDP", udp, []), ("UDP, no canaries", udp, [udp]),
                                        ("HTTP", http, [])):
                config = scrape_config(root, database, trusted=trusted)
                before_drops = tracker.udp_drops()
                # Exit 1 over HTTP: opentracker does not answer for hashes it never saw.
                wall, peak, said = run_tsmd(config, "scrape", "--tracker", url, ok_codes=(0, 1))
                counts = last_run_counts(database)
                packets = counts["packets_sent"] + counts["packets_received"]
                exact = scraped_exactly(database, url, expected, skip_unknown=label == "HTTP")
                print(f"tsmd {label}: {counts['hashes_answered']} hashes, network phase "
                      f"{counts['seconds']:.3f} s = {counts['hashes_answered'] / counts['seconds']:,.0f}"
                      f" hashes/s; whole command {wall:.2f} s, peak RSS {peak / 1024:.0f} MiB; "
                      f"{counts['requests']} requests ({counts['canaries']} canaries answered), "
                      f"{counts['retries']} retries, "
                      f"{packets} UDP datagrams sent and received; counts exact: {exact}; "
                      f"drops at the tracker: {tracker.udp_drops() - before_drops}")
            if with_libtorrent:
                scrape_whole_processes(root, hashes[:2000], udp, expected)
                subset = hashes[:libtorrent_hashes]
                before_packets = udp_datagrams()
                results, wall, retried = libtorrent_scrape(subset, udp, timeout=600)
                packets = udp_datagrams() - before_packets
                same = sum(1 for h in subset if results.get(h) == swarms.get(h, (0, 0, 0))[:2])
                database2 = root / "same-hashes.sqlite3"
                make_scrape_db(database2, subset, lambda n: [udp])
                _, _, _ = run_tsmd(scrape_config(root, database2), "scrape")
                ours = last_run_counts(database2)
                ours_packets = ours["packets_sent"] + ours["packets_received"]
                print(f"libtorrent: {len(results)} of {len(subset)} hashes answered in "
                      f"{wall:.2f} s ({retried} scrapes retried), {packets} UDP datagrams "
                      f"(machine-wide); same seeders and leechers as planted: {same}")
                print(f"tsmd, same {len(subset)} hashes: {ours['seconds']:.3f} s, "
                      f"{ours_packets} UDP datagrams -> libtorrent / tsmd: wall time "
                      f"x{wall / ours['seconds']:,.0f}, packets x{packets / ours_packets:,.0f}")
            bench_hostile_trackers(root, hashes[:2000], swarms, udp)
        finally:
            tracker.stop()
        bench_dead_trackers(root, hashes[: min(count, 2000)], swarms)
        bench_other_trackers(root, hashes[:2000], swarms)


LIBTORRENT_SCRAPE_PROCESS: Final = """
import hashlib, sys
sys.path.insert(0, sys.argv[1])
from bench_tsmd import libtorrent_scrape
hashes = [hashlib.sha1(f"bench {n}".encode()).digest() for n in range(int(sys.argv[2]))]
results, _, _ = libtorrent_scrape(hashes, sys.argv[3], timeout=600)
print(len(results))
"""


def scrape_whole_processes(root: Path, hashes: list[bytes], udp: str, expected: dict,
                           rounds: int = 3) -> None:
    """`tsmd scrape` and a libtorrent process scraping the same hashes on the same tracker,
    each a whole process from start to exit, side by side, `rounds` times."""
    database = root / "whole.sqlite3"
    make_scrape_db(database, hashes, lambda n: [udp])
    config = scrape_config(root, database)
    ours, theirs = [], []
    for _ in range(rounds):
        wall, _, _ = run_tsmd(config, "scrape", "--stale-after", "0")
        ours.append(wall)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", LIBTORRENT_SCRAPE_PROCESS, str(HERE),
                               str(len(hashes)), udp], capture_output=True, text=True,
                              timeout=600, env=USER_ENV)
        theirs.append(time.perf_counter() - started)
        assert done.stdout.strip() == str(len(hashes)), done.stderr
    exact = scraped_exactly(database, udp, {h.hex(): expected[h.hex()] for h in hashes},
                            skip_unknown=False)
    print(f"whole processes, {len(hashes)} hashes on one UDP tracker: tsmd scrape "
          f"{', '.join(f'{t:.2f}' for t in ours)} s, libtorrent "
          f"{', '.join(f'{t:.2f}' for t in theirs)} s -> tsmd / libtorrent "
          f"x{min(ours) / min(theirs):.2f} (best of {rounds} each); counts exact: {exact}")


def serve_fabricating_tracker(sock: socket.socket, numbers: tuple[int, int, int]) -> None:
    """A BEP 15 tracker that answers `numbers` (seeders, leechers, completed) for every hash, as
    public trackers documented in tracker-list issues do; until its socket is closed."""
    while True:
        try:
            data, address = sock.recvfrom(2048)
        except OSError:
            return
        if len(data) < 16:
            continue
        _, action, tid = struct.unpack_from("!QII", data)
        if action == 0:
            reply = struct.pack("!IIQ", 0, tid, 0x5EED)
        elif action == 2:
            count = (len(data) - 16) // 20
            seeders, leechers, completed = numbers
            reply = struct.pack("!II", 2, tid) + struct.pack(
                "!III", seeders, completed, leechers) * count
        else:
            continue
        sock.sendto(reply, address)


def report_numbers(database: Path) -> dict:
    """infohash -> (seeders, leechers, completed) as the reports publish them."""
    import tsmd

    db = tsmd.open_database(database)
    rows = {row.infohash: (row.seeders, row.leechers, row.completed)
            for row in tsmd.load_report_rows(db)}
    db.close()
    return rows


def bench_hostile_trackers(root: Path, hashes: list[bytes], swarms: dict, honest: str) -> None:
    """Every torrent on an honest opentracker and on a tracker inventing 14 seeders for every
    hash: the published numbers must be the honest ones."""
    liar = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    liar.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=serve_fabricating_tracker, args=(liar, (14, 3, 40)),
                              daemon=True)
    thread.start()
    try:
        lying = f"udp://127.0.0.1:{liar.getsockname()[1]}"
        database = root / "hostile.sqlite3"
        make_scrape_db(database, hashes, lambda n: [honest, lying])
        wall, _, said = run_tsmd(scrape_config(root, database), "scrape")
        counts = last_run_counts(database)
        expected = {h.hex(): swarms.get(h, (0, 0, 0)) for h in hashes}
        exact = report_numbers(database) == expected
        print(f"honest opentracker + fabricating tracker, {len(hashes)} torrents: "
              f"{counts['trackers_fabricating']} fabricating found, published numbers exactly "
              f"the honest ones: {exact}; {counts['requests']} requests (connects included) "
              f"for {2 * len(hashes)} hashes, {counts['canaries']} canaries answered (one per "
              f"scrape request); whole command {wall:.2f} s")
    finally:
        liar.close()
        thread.join(5)


def bench_other_trackers(root: Path, hashes: list[bytes], swarms: dict) -> None:
    """A full-scrape-only tracker (academictorrents' behaviour), and webtorrent's
    bittorrent-tracker over HTTP alone and over WebSocket alone."""
    from test_tsmd import FakeHttpTracker, WebTorrentTracker, populate_opentracker

    expected = {h.hex(): swarms.get(h, (0, 0, 0)) for h in hashes}
    others = {hashlib.sha1(b"other %d" % n).digest(): (1, 1, 1) for n in range(50_000)}
    with FakeHttpTracker({**{h: swarms[h] for h in hashes if h in swarms}, **others},
                         full_scrape_only=True) as tracker:
        database = root / "full-scrape.sqlite3"
        make_scrape_db(database, hashes, lambda n: [tracker.url])
        config = scrape_config(root, database)
        for run_number in (1, 2):
            asked = tracker.scrapes
            wall, _, _ = run_tsmd(config, "scrape", "--stale-after", "0")
            counts = last_run_counts(database)
            got = report_numbers(database)
            # Never-announced hashes are not in a full scrape: unknown, like opentracker's HTTP.
            exact = got == {h.hex(): swarms.get(h, (-1, -1, -1)) for h in hashes}
            print(f"full-scrape-only tracker ({len(tracker.counts):,} swarms), run "
                  f"{run_number}: {tracker.scrapes - asked} HTTP requests, "
                  f"{counts['full_scrapes']} full scrape; numbers exact: {exact}; whole command "
                  f"{wall:.2f} s")
    webtorrent = WebTorrentTracker()
    try:
        populate_opentracker(webtorrent, {h: swarms[h] for h in hashes if h in swarms})
        for label, url in (("HTTP", f"http://127.0.0.1:{webtorrent.http_port}/announce"),
                           ("WebSocket", f"ws://127.0.0.1:{webtorrent.http_port}")):
            database = root / f"webtorrent-{label}.sqlite3"
            make_scrape_db(database, hashes, lambda n: [url])
            wall, _, _ = run_tsmd(scrape_config(root, database), "scrape")
            counts = last_run_counts(database)
            # It answers every hash, 0 for one it never saw; its `downloaded` is its seeders.
            exact = {h: c[:2] for h, c in report_numbers(database).items()} == \
                {h: c[:2] for h, c in expected.items()}
            print(f"bittorrent-tracker over {label} only, {len(hashes)} torrents: "
                  f"{counts['hashes_answered']} answered in {counts['requests']} requests, "
                  f"seeders and leechers exact: {exact}; network phase {counts['seconds']:.2f} s,"
                  f" whole command {wall:.2f} s")
    finally:
        webtorrent.stop()


def scraped_exactly(database: Path, url: str, expected: dict, skip_unknown: bool) -> bool:
    import sqlite3

    import tsmd

    url = tsmd.normalise_tracker_url(url) or url  # as tsmd keeps it (a UDP path is dropped)
    db = sqlite3.connect(database)
    got = {h: (s, l, c) for h, s, l, c in db.execute(
        "SELECT t.infohash, s.seeders, s.leechers, s.completed FROM tracker_samples s "
        "JOIN torrents t ON t.id = s.torrent_id JOIN trackers tr ON tr.id = s.tracker_id "
        "WHERE tr.url = ? AND s.run_id = (SELECT max(id) FROM runs)", (url,))}
    db.close()
    if skip_unknown:  # opentracker leaves never-announced hashes out of HTTP scrapes
        expected = {h: c for h, c in expected.items() if c != (0, 0, 0)}
    return got == expected


def bench_dead_trackers(root: Path, hashes: list[bytes], swarms: dict) -> None:
    """Half the trackers silent (UDP sockets that never answer), one live opentracker."""
    from test_tsmd import OpenTracker, populate_opentracker

    tracker = OpenTracker(root / "opentracker-2", hashes)
    silent = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(4)]
    try:
        populate_opentracker(tracker, {h: swarms[h] for h in hashes if h in swarms})
        for sock in silent:
            sock.bind(("127.0.0.1", 0))
        dead = [f"udp://127.0.0.1:{s.getsockname()[1]}/announce" for s in silent]
        live = [f"udp://127.0.0.1:{tracker.udp_port}/announce",
                f"http://127.0.0.1:{tracker.http_port}/announce",
                "udp://127.0.0.1:1/announce", "http://127.0.0.1:1/announce"]  # last two: refused
        # Every torrent: the live opentracker (UDP or HTTP) plus two dead ones; 8 trackers in all,
        # half of them dead.
        database = root / "dead.sqlite3"
        make_scrape_db(database, hashes, lambda n: [live[n % 2], dead[n % 4], dead[(n + 1) % 4],
                                                    live[2 + n % 2]])
        timeout, attempts = 1.0, 3
        config = scrape_config(root, database, timeout=timeout, attempts=attempts)
        wall, _, said = run_tsmd(config, "scrape", ok_codes=(0, 1))
        counts = last_run_counts(database)
        # The live UDP tracker answers for every hash (zeros when unknown); over HTTP,
        # opentracker leaves out hashes nobody announced, so those cannot be answered.
        answerable = sum(1 for n, h in enumerate(hashes) if n % 2 == 0 or h in swarms)
        print(f"half the trackers dead: {counts['trackers_ok']} ok, {counts['trackers_failed']} "
              f"failed; {counts['torrents_answered']} of {len(hashes)} torrents answered "
              f"({answerable} answerable by the live tracker); whole "
              f"command {wall:.2f} s, network phase {counts['seconds']:.2f} s "
              f"(bound: attempts x timeout = {attempts * timeout:.1f} s per dead tracker, "
              f"asked in parallel)")
    finally:
        for sock in silent:
            sock.close()
        tracker.stop()


SIMULATION_RATE: Final = 2000  # packets/s the simulated DHT process answers without loss


def bench_swarms(count: int) -> dict:
    import random

    chooser = random.Random(5)
    swarms = {}
    for n in range(count):
        infohash = hashlib.sha1(f"bench swarm {n}".encode()).digest()
        swarms[infohash] = {(f"127.{200 + p}.{(n // 250) % 250}.{n % 250 + 1}", 6881 + p, p == 0)
                            for p in range(chooser.randint(1, 4))}
    return swarms


class DelayLine:
    """Datagrams held back until they are due, in one heap served by one task, however many
    wait: `later(delay, *arguments)`, and `deliver_forever(send)` calls `send(*arguments)`."""

    def __init__(self) -> None:
        import itertools

        self._line: list = []  # (due, sequence, arguments)
        self._order = itertools.count()
        self._wake = None

    def later(self, delay: float, *arguments) -> None:
        import heapq

        import trio

        heapq.heappush(self._line, (trio.current_time() + delay, next(self._order), arguments))
        if self._wake is not None:
            self._wake.set()

    async def deliver_forever(self, send) -> None:
        import heapq

        import trio

        line = self._line
        while True:
            now = trio.current_time()
            while line and line[0][0] <= now:
                await send(*heapq.heappop(line)[2])
            self._wake = trio.Event()
            with trio.move_on_after(line[0][0] - now if line else math.inf):
                await self._wake.wait()


IP_PKTINFO: Final = 8  # Linux's value; Python's socket module does not name it
WIDE_SUBNETS: Final = 144 * 250  # the /24s of 127.20.0.0 to 127.163.249.255
WIDE_NODES_MAX: Final = 250 * WIDE_SUBNETS  # 9,000,000, below the peers' 127.200+


class WideDht:
    """A simulated DHT of up to millions of nodes behind one UDP socket.

    Node n lives at its own 127.x address (`address`: consecutive nodes in consecutive /24s),
    all on one port. The socket listens on the wildcard address and learns with IP_PKTINFO to which
    127.x address a query was sent; it answers from that very address. It answers nothing that
    does not come from 127/8. As in FakeDhtNetwork, each node has Kademlia buckets (up to 8
    nodes per length of the shared id prefix, chosen at random from the whole network), built
    when the node is first asked; `silent_fraction` of the nodes sit in routing tables and never
    answer (NAT-ed and departed nodes: about half of the public DHT's queries time out); each
    infohash's peers are stored on the 8 closest nodes that answer; the first `routers` nodes are
    bootstrap routers that answer with 8 random nodes. With `rtt`, node n answers after its
    own round trip, drawn from that range."""

    def __init__(self, count: int, swarms: dict[bytes, set[tuple[str, int, bool]]],
                 silent_fraction: float, rtt: tuple[float, float] | None, routers: int) -> None:
        import bisect
        import random

        if not routers < count <= WIDE_NODES_MAX:
            raise ValueError(f"nodes: between {routers + 1} and {WIDE_NODES_MAX:,}")
        self.count, self.routers, self.rtt = count, routers, rtt
        self.key = [int.from_bytes(hashlib.sha1(f"wide {n}".encode()).digest(), "big")
                    for n in range(count)]
        chooser = random.Random(7)
        # (The first 3 answer: with no routers, they are the bootstrap nodes.)
        self.silent = bytearray(n >= max(routers, 3) and chooser.random() < silent_fraction
                                for n in range(count))
        # The ordinary nodes sorted by id: bucket members and closest nodes are ranges of it.
        order = sorted(range(routers, count), key=self.key.__getitem__)
        self.sorted_keys = [self.key[n] for n in order]
        self.sorted_nodes = order
        self.tables: dict[int, list[int]] = {}
        self.stored: dict[int, dict[bytes, list[bytes]]] = {}
        for infohash, peers in swarms.items():
            values = [socket.inet_aton(host) + port.to_bytes(2, "big")
                      for host, port, _ in sorted(peers)]
            for n in self._closest_answering(int.from_bytes(infohash, "big"), 8, bisect):
                self.stored.setdefault(n, {})[infohash] = values
        self.random = random.Random(11)
        self.port = 0
        self.per_second: dict[int, int] = {}
        self.answered = 0

    def _closest_answering(self, target: int, count: int, bisect) -> list[int]:
        """The `count` answering nodes closest to `target`: all lie in the narrowest range of
        ids sharing a prefix with it that holds `count` of them."""
        for shift in range(0, 161):
            low = bisect.bisect_left(self.sorted_keys, (target >> shift) << shift)
            high = bisect.bisect_left(self.sorted_keys, ((target >> shift) + 1) << shift)
            members = [self.sorted_nodes[i] for i in range(low, high)
                       if not self.silent[self.sorted_nodes[i]]]
            if len(members) >= count:
                return sorted(members, key=lambda n: self.key[n] ^ target)[:count]
        return []

    def _table(self, n: int) -> list[int]:
        import random

        from test_tsmd import kademlia_buckets

        table = self.tables.get(n)
        if table is None:
            table = self.tables[n] = kademlia_buckets(self.key[n], self.sorted_keys,
                                                      self.sorted_nodes, random.Random(n))
        return table

    def address(self, n: int) -> str:
        # Consecutive nodes in consecutive /24s (127.20.0 to 127.163.249), the host byte
        # counting rounds: a lookup keeps one node per /24, and the public DHT's nodes are
        # spread over millions of them, not packed 250 to one.
        subnet = n % WIDE_SUBNETS
        return f"127.{20 + subnet // 250}.{subnet % 250}.{n // WIDE_SUBNETS + 1}"

    def number(self, packed: bytes) -> int | None:
        """The node at an IPv4 address (4 bytes), or None."""
        first, second, third, fourth = packed
        n = (fourth - 1) * WIDE_SUBNETS + (second - 20) * 250 + third
        if first != 127 or not 20 <= second < 164 or not 0 <= third < 250 or \
                not 1 <= fourth <= 250 or not 0 <= n < self.count:
            return None
        return n

    def compact(self, n: int) -> bytes:
        return (self.key[n].to_bytes(20, "big") + socket.inet_aton(self.address(n))
                + self.port.to_bytes(2, "big"))

    @property
    def bootstrap(self) -> list[str]:
        return [f"{self.address(n)}:{self.port}" for n in range(self.routers or 3)]

    def answer(self, n: int, query: dict) -> bytes | None:
        if self.silent[n] or query.get(b"q") != b"get_peers" or query.get(b"ro") != 1:
            return None
        infohash = query[b"a"][b"info_hash"]
        if n < self.routers:
            body = {b"id": self.key[n].to_bytes(20, "big"), b"nodes": b"".join(
                self.compact(m) for m in self.random.sample(range(self.routers, self.count), 8))}
        else:
            target = int.from_bytes(infohash, "big")
            closest = sorted(self._table(n), key=lambda m: self.key[m] ^ target)[:8]
            body = {b"id": self.key[n].to_bytes(20, "big"), b"token": b"tok",
                    b"nodes": b"".join(self.compact(m) for m in closest)}
            values = self.stored.get(n, {}).get(infohash)
            if values:
                body[b"values"] = values
        return bencoder.bencode({b"t": query[b"t"], b"y": b"r", b"r": body})

    async def serve(self, task_status=None) -> None:
        import random
        import struct

        import trio

        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 1 << 22)
        sock.setsockopt(trio.socket.IPPROTO_IP, IP_PKTINFO, 1)
        await sock.bind(("0.0.0.0", 0))
        self.port = sock.getsockname()[1]
        delays = random.Random(f"rtt {self.count}")
        replies = DelayLine()  # replies waiting for their node's round trip

        async def send(reply: bytes, source: bytes, client) -> None:
            try:
                await sock.sendmsg([reply], [(trio.socket.IPPROTO_IP, IP_PKTINFO,
                                              struct.pack("=I4s4s", 0, source, bytes(4)))],
                                   0, client)
            except OSError:
                pass

        with sock:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(replies.deliver_forever, send)
                if task_status is not None:
                    task_status.started()
                while True:
                    data, ancillary, _, client = await sock.recvmsg(4096,
                                                                    socket.CMSG_SPACE(12))
                    second = int(time.time())
                    self.per_second[second] = self.per_second.get(second, 0) + 1
                    if not client[0].startswith("127.") or not ancillary:
                        continue
                    destination = ancillary[0][2][8:12]
                    n = self.number(destination)
                    try:
                        reply = None if n is None else self.answer(n, bencoder.bdecode(data))
                    except Exception:
                        continue  # not a query this simulation answers
                    if reply is None:
                        continue
                    self.answered += 1
                    if self.rtt:
                        delays.seed(n)
                        replies.later(delays.uniform(*self.rtt), reply, destination, client)
                    else:
                        await send(reply, destination, client)


def serve_wide_dht(nodes: int, swarms_count: int, silent_fraction: float,
                   rtt: tuple[float, float] | None, routers: int,
                   ports: multiprocessing.Queue, stop, report: multiprocessing.Queue) -> None:
    """The simulated DHT in its own process (the other core), until `stop` is set."""
    network = WideDht(nodes, bench_swarms(swarms_count), silent_fraction, rtt, routers)
    serve_network_until(network, stop, lambda: ports.put((network.bootstrap,
                                                          sum(network.silent))))
    report.put(dict(network.per_second))


def serve_network_until(network, stop, ready) -> None:
    """Serve a FakeDhtNetwork in this process until `stop` is set; `ready()` once it listens."""
    import trio

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(network.serve)
            ready()
            while not stop.is_set():
                await trio.sleep(0.2)
            nursery.cancel_scope.cancel()

    trio.run(main)


def bench_dht(nodes: int, count: int, silent_fraction: float, in_flight: int,
              rtt: tuple[float, float] | None, routers: int) -> None:
    import trio

    import tsmd
    from test_tsmd import survey_all, dht_test_options

    swarms = bench_swarms(count)
    announced = sum(len(peers) for peers in swarms.values())
    ports: multiprocessing.Queue = multiprocessing.Queue()
    report: multiprocessing.Queue = multiprocessing.Queue()
    stop = multiprocessing.Event()
    server = multiprocessing.Process(target=serve_wide_dht, daemon=True,
                                     args=(nodes, count, silent_fraction, rtt, routers, ports,
                                           stop, report))
    started = time.perf_counter()
    server.start()
    try:
        bootstrap, silent = ports.get(timeout=300)
        print(f"machine: {platform.node()}, {os.cpu_count()} cores, Python "
              f"{platform.python_version()}")
        latency = (f"round trips {rtt[0] * 1000:.0f}-{rtt[1] * 1000:.0f} ms per node"
                   if rtt else "no added latency")
        routing = (f"{routers} bootstrap routers answering with random nodes" if routers
                   else "3 ordinary nodes as bootstrap")
        print(f"simulated DHT: {nodes:,} nodes on 127.x behind one socket ({silent:,} of them "
              f"silent, as dead routing entries), {routing}, {latency}; {count} infohashes, "
              f"{announced} announced peers; built in {time.perf_counter() - started:.1f} s")

        # 1. Correctness at scale, in process: every lookup at once, up to `in_flight` at a time.
        class Bootstrap:
            pass
        network = Bootstrap()
        network.bootstrap = bootstrap
        # Paced at 2,000 packets/s: one Python process simulating 1,200 nodes loses packets
        # beyond that, and a loss it causes is not tsmd's. Lookups still wait in flight.
        options = dht_test_options(concurrency=in_flight, stall_timeout=1.0, query_timeout=4.0,
                                   rate=SIMULATION_RATE, per_ip_rate=50, per_ip_burst=10)
        started = time.perf_counter()
        results, survey, udp = trio.run(survey_all, network, list(swarms), options)
        wall = time.perf_counter() - started
        expected = {h: {(host, port) for host, port, _ in peers} for h, peers in swarms.items()}
        found = sum(len(results[h].peers & expected[h]) for h in swarms)
        wrong = sum(len(results[h].peers - expected[h]) for h in swarms)
        empty = sum(1 for h in swarms if not results[h].peers)
        print(f"survey, {in_flight} lookups in flight: {found}/{announced} announced peers found "
              f"({100 * found / announced:.2f} %), {wrong} wrong peers, {empty} empty lookups, "
              f"{udp.sent / count:.1f} packets per lookup, {udp.send_errors} send errors, "
              f"{survey.counters.timeouts} timeouts (silent nodes); {wall:.1f} s, "
              f"{count / wall:,.0f} lookups/s")

        # 2. What a lookup costs with nothing cached: each one from the bootstrap routers, as
        # a lookup of a tool without a node cache would go.
        class NothingCached(tsmd.NodeCache):
            def __len__(self):
                # The lookups in flight ramp up with the nodes cached; a tool without a cache
                # has no such ramp (left at 4, 500 slow lookups took 20 minutes).
                return 1 << 20

            def add(self, node, seen, failures=0):
                pass

            def failed(self, host, port):
                pass

        sample = list(swarms)[:500]
        started = time.perf_counter()
        _, cold_survey, cold_udp = trio.run(survey_all, network, sample,
                                            dht_test_options(concurrency=50, stall_timeout=1.0,
                                                             query_timeout=4.0,
                                                             rate=SIMULATION_RATE,
                                                             per_ip_rate=50, per_ip_burst=10),
                                            NothingCached())
        cold_per_lookup = cold_udp.sent / len(sample)
        print(f"lookups with no cache (each from the bootstrap routers): "
              f"{cold_per_lookup:.1f} packets per lookup, {cold_survey.counters.timeouts} "
              f"timeouts in {len(sample)} lookups, {time.perf_counter() - started:.1f} s")

        # 3. Cold and warm runs of the command, on a fresh database.
        with tempfile.TemporaryDirectory(prefix="tsmd-bench-") as tmp:
            root = Path(tmp)
            database = root / "dht.sqlite3"
            make_scrape_db(database, list(swarms), lambda n: [])
            config = scrape_config(root, database, dht="per_ip_rate = 50.0\nper_ip_burst = 10\n")
            arguments = ["dht", "--rate", str(SIMULATION_RATE), "--concurrency", str(in_flight),
                         "--bind", "127.0.0.1:0"]
            for entry in bootstrap:
                arguments += ["--bootstrap", entry]
            per_lookup = {}
            for label in ("cold (empty cache)", "warm (cache of the cold run)"):
                wall, peak, _ = run_tsmd(config, *arguments)
                counts = last_run_counts(database)
                per_lookup[label.split()[0]] = counts["packets_sent"] / counts["lookups"]
                print(f"tsmd dht, {label}: {counts['lookups']} lookups, {counts['peers']} "
                      f"peers, {per_lookup[label.split()[0]]:.1f} packets per lookup, "
                      f"{counts['timeouts']} timeouts, {counts['nodes_cached']} nodes cached; "
                      f"{wall:.1f} s, peak RSS {peak / 1024:.0f} MiB")
            print(f"  -> packets per lookup: cold run {per_lookup['cold']:.1f}, warm run "
                  f"{per_lookup['warm']:.1f}, no cache {cold_per_lookup:.1f}; cold / warm = "
                  f"x{per_lookup['cold'] / per_lookup['warm']:.2f} (the cold run's cache warms "
                  f"within its first lookups), no cache / warm = "
                  f"x{cold_per_lookup / per_lookup['warm']:.2f}")

            # 4. The rate limit, measured by the network: packets received per second.
            rate = 250  # the default for the public DHT
            subset = 400
            rate_args = [a if a != str(SIMULATION_RATE) else str(rate) for a in arguments]
            database2 = root / "rate.sqlite3"
            make_scrape_db(database2, list(swarms)[:subset], lambda n: [])
            # The per-node limit (1/s) would bind first in a network this small: raise it so
            # that the global limit is what is measured.
            wall, _, _ = run_tsmd(scrape_config(root, database2, dht="per_ip_rate = 100.0\n"
                                                "per_ip_burst = 10\n"), *rate_args)
            counts = last_run_counts(database2)
            print(f"tsmd dht --rate {rate}: {counts['lookups']} lookups, "
                  f"{counts['packets_sent']} packets in {wall:.1f} s "
                  f"(= {counts['packets_sent'] / counts['seconds']:,.0f}/s)")
            rate_window = (time.time() - wall, time.time())
    finally:
        stop.set()
        per_second = report.get(timeout=60)
        server.join(timeout=10)
        if server.is_alive():
            server.kill()
    seconds = [per_second.get(s, 0) for s in range(int(rate_window[0]) + 1, int(rate_window[1]))]
    if seconds:
        print(f"  packets the nodes received per whole second during that run: max "
              f"{max(seconds)}, median {sorted(seconds)[len(seconds) // 2]} (limit {rate})")


def serve_delay_relay(nodes: list[tuple[str, int]], relay_hosts: list[str], rtts: list[float],
                      ready: multiprocessing.Queue, stop) -> None:
    """A UDP relay in front of each libtorrent node, in its own process, until `stop` is set.

    Relay i listens on relay_hosts[i]; a packet from a client goes out to node i half of
    rtts[i] later, from a socket of relay i kept for that client, and what node i sends back
    to that socket reaches the client half of rtts[i] later, from relay i. Replies name other
    nodes by their real addresses in compact node info (BEP 5 `nodes`); those are rewritten to
    the relays' addresses, so a client that starts from the relays only ever talks to relays,
    and every packet of every lookup pays the node's round trip, for tsmd and libtorrent
    alike."""
    import trio

    def compact(host: str, port: int) -> bytes:
        return socket.inet_aton(host) + port.to_bytes(2, "big")

    def rewrite(data: bytes, table: dict[bytes, bytes]) -> bytes:
        try:
            message = bencoder.bdecode(data)
            body = message[b"r"]
            found = body[b"nodes"]
        except Exception:
            return data
        if not isinstance(found, bytes) or len(found) % 26:
            return data
        body[b"nodes"] = b"".join(found[k:k + 20] + table.get(found[k + 20:k + 26],
                                                              found[k + 20:k + 26])
                                  for k in range(0, len(found), 26))
        return bencoder.bencode(message)

    async def main() -> None:
        fronts = []
        for host in relay_hosts:
            sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 1 << 21)
            await sock.bind((host, 0))
            fronts.append(sock)
        table = {compact(*node): compact(*front.getsockname()) for node, front in
                 zip(nodes, fronts)}
        packets = DelayLine()  # every packet, in both directions: (socket, data, address)
        backs: dict[tuple[int, tuple], trio.socket.SocketType] = {}

        async def send(sock, data: bytes, address) -> None:
            try:
                await sock.sendto(data, address)
            except OSError:
                pass

        async def back(n: int, client: tuple, sock) -> None:
            while True:
                data, _ = await sock.recvfrom(65536)
                packets.later(rtts[n] / 2, fronts[n], rewrite(data, table), client)

        async def front(n: int, nursery) -> None:
            while True:
                data, client = await fronts[n].recvfrom(65536)
                sock = backs.get((n, client))
                if sock is None:
                    sock = backs[n, client] = trio.socket.socket(trio.socket.AF_INET,
                                                                 trio.socket.SOCK_DGRAM)
                    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 1 << 21)
                    await sock.bind((relay_hosts[n], 0))
                    nursery.start_soon(back, n, client, sock)
                packets.later(rtts[n] / 2, sock, data, nodes[n])

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(packets.deliver_forever, send)
                for n in range(len(nodes)):
                    nursery.start_soon(front, n, nursery)
                ready.put([front.getsockname() for front in fronts])
                while not stop.is_set():
                    await trio.sleep(0.2)
                nursery.cancel_scope.cancel()
        finally:
            for sock in [*fronts, *backs.values()]:
                sock.close()

    trio.run(main)


LT_CLIENT_ADDRESS: Final = "127.79.1.1"  # libtorrent's querying session behind the relays
LT_RELAY_OCTET: Final = 70  # relays on 127.70.n.1, one /24 each like the nodes (libtorrent
# keeps one node per /24 in its routing table and in a search)


def libtorrent_client(bootstrap: list[tuple[str, int]]):
    """A libtorrent session that is no DHT node of the network, only a read-only client of it
    (BEP 43, like tsmd), bootstrapped from `bootstrap` alone; settings as the nodes'."""
    import libtorrent as lt

    alerts = lt.alert.category_t
    session = lt.session({
        "listen_interfaces": f"{LT_CLIENT_ADDRESS}:0", "listen_system_port_fallback": False,
        "max_retry_port_bind": 0, "enable_dht": True, "dht_bootstrap_nodes": "",
        "dht_read_only": True, "enable_upnp": False, "enable_natpmp": False,
        "enable_lsd": False, "enable_ip_notifier": False, "alert_queue_size": 100000,
        "alert_mask": int(alerts.dht_notification | alerts.dht_operation_notification
                          | alerts.stats_notification),
        "dht_block_ratelimit": 1_000_000, "dht_block_timeout": 1,
        "dht_upload_rate_limit": 100_000_000, "recv_socket_buffer_size": 1 << 21,
        "send_socket_buffer_size": 1 << 21})
    loopback_only = lt.ip_filter()
    loopback_only.add_rule("0.0.0.0", "255.255.255.255", 1)
    loopback_only.add_rule("127.0.0.0", "127.255.255.255", 0)
    session.set_ip_filter(loopback_only)
    for node in bootstrap:
        session.add_dht_node(node)
    return session


def libtorrent_dht_sent(session) -> tuple[int, int]:
    """(DHT messages, bytes) the session has sent so far, from its own counters."""
    import libtorrent as lt

    session.post_session_stats()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        session.wait_for_alert(1000)
        for alert in session.pop_alerts():
            if isinstance(alert, lt.session_stats_alert):
                return alert.values["dht.dht_messages_out"], alert.values["dht.dht_bytes_out"]
    raise TimeoutError("libtorrent posted no session statistics")


def libtorrent_get_peers(session, infohashes: list[bytes], expected: dict,
                         timeout: float) -> tuple[float, float | None, dict]:
    """dht_get_peers for every hash at once: seconds until every expected peer had arrived,
    seconds until libtorrent had no get_peers lookup left (from its DHT statistics, asked for
    again as soon as each answer arrives; None if that never happened within `timeout`), and
    what arrived."""
    import libtorrent as lt

    session.pop_alerts()
    found: dict[bytes, set] = {}
    all_peers_at = ended_at = None
    started = time.monotonic()
    for infohash in infohashes:
        session.dht_get_peers(lt.sha1_hash(infohash))
    session.post_dht_stats()
    while time.monotonic() - started < timeout and (all_peers_at is None or ended_at is None):
        session.wait_for_alert(5)
        for alert in session.pop_alerts():
            if isinstance(alert, lt.dht_get_peers_reply_alert):
                found.setdefault(alert.info_hash.to_bytes(), set()).update(
                    (str(host), int(port)) for host, port in alert.peers())
            elif isinstance(alert, lt.dht_stats_alert) and ended_at is None:
                if any(lookup["type"] == "get_peers" for lookup in alert.active_requests):
                    session.post_dht_stats()
                else:
                    ended_at = time.monotonic() - started
        if all_peers_at is None and all(expected[h] <= found.get(h, set()) for h in infohashes):
            all_peers_at = time.monotonic() - started
    return (time.monotonic() - started if all_peers_at is None else all_peers_at), ended_at, found


DHT_BUDGET: Final = 250  # packets/s: tsmd's default on the public DHT


def tsmd_side_by_side(label: str, network, swarms: dict, expected: dict, cache, bep33: bool,
                      budget: int | None) -> None:
    """One survey of every infohash by tsmd, timed like libtorrent_get_peers: seconds until
    every expected peer had arrived (and until every lookup had ended)."""
    import trio

    from test_tsmd import survey_all, dht_test_options

    count = len(swarms)
    complete_at: dict[bytes, float] = {}

    def watch(result) -> None:
        if result.infohash not in complete_at and expected[result.infohash] <= result.peers:
            complete_at[result.infohash] = time.perf_counter()

    # With a budget, only the global limit: in a network of 40 nodes the per-node one would
    # be all there is to measure.
    limits = (dict(rate=0) if budget is None else
              dict(rate=budget, per_ip_rate=budget, per_ip_burst=budget))
    started = time.perf_counter()
    options = dht_test_options(concurrency=count, bep33=bep33, stall_timeout=1.0,
                               query_timeout=4.0, **limits)
    results, survey, udp = trio.run(survey_all, network, list(swarms), options, cache, watch)
    wall = time.perf_counter() - started
    found = sum(len(results[h].peers & expected[h]) for h in swarms)
    wrong = sum(len(results[h].peers - expected[h]) for h in swarms)
    times = sorted(at - started for at in complete_at.values())
    all_peers = (f"{times[-1]:.2f} s until every announced peer had arrived (half the lookups "
                 f"by {times[len(times) // 2]:.2f} s)" if len(complete_at) == count else
                 "not every announced peer arrived")
    print(f"{label}: {found} found, {wrong} wrong, {all_peers}, {wall:.2f} s until every lookup "
          f"had ended ({udp.sent / count:.1f} packets per lookup, {survey.counters.timeouts} "
          f"timeouts)")


def bench_dht_hostile(nodes: int, count: int) -> None:
    """Issue 15's hostile network, in process: the FakeDhtNetwork of the tests with 8 sybils
    on two addresses (one bit from every target, the same 20 made-up peers, saturated
    filters), a bootstrap router handing them all out, another router and two nodes handing
    them out one at a time, two id-changers, a node answering 8,000 values and one answering
    saturated filters. A cold survey and a warm one from its cache, then the same network
    with no liar."""
    import trio

    import tsmd
    from test_tsmd import FakeDhtNetwork, survey_all, dht_test_options

    swarms = bench_swarms(count)
    truth = {h: {(host, port) for host, port, _ in peers} for h, peers in swarms.items()}
    hostile = {0: "sybil-router", 1: "sybil-gateway", 60: "sybil-gateway",
               90: "sybil-gateway", 11: "id-changer", 23: "id-changer", 35: "many-values",
               47: "saturated"}
    for label, behaviours, sybils in (("hostile", hostile, 8), ("the same, honest", {}, 0)):
        network = FakeDhtNetwork(nodes, swarms, style="libtorrent", hostile=behaviours,
                                 routers=3, sybils=sybils)
        liars = {network.addresses[n] for n in [*behaviours, *network.sybils]
                 if behaviours.get(n, "sybil") not in ("saturated", "sybil-gateway")}
        cache = tsmd.NodeCache()

        async def surveys(network=network, cache=cache):
            async with trio.open_nursery() as nursery:
                await nursery.start(network.serve)
                runs = [await survey_all(network, list(swarms),
                                         dht_test_options(stall_timeout=1.0, query_timeout=4.0),
                                         cache) for _ in ("cold", "warm")]
                nursery.cancel_scope.cancel()
            return runs

        if sybils:
            print(f"{label} network: {nodes} nodes and {sybils} sybils on two addresses; "
                  f"{count} infohashes, {sum(map(len, truth.values()))} announced peers")
        for run, (results, survey, udp) in zip(("cold", "warm"), trio.run(surveys)):
            exact = sum(results[h].peers == truth[h] for h in swarms)
            made_up = sum(len(results[h].peers - truth[h]) for h in swarms)
            worst, within = 0.0, 0
            for h, peers in swarms.items():
                seeds, everyone = results[h].bep33_estimates()
                real = (sum(seed for _, _, seed in peers), len(peers))
                errors = [abs((estimate if estimate is not None else math.inf) - actual)
                          for estimate, actual in zip((seeds, everyone), real)]
                within += all(error <= 0.1 * actual + 2 for error, actual in zip(errors, real))
                worst = max(worst, *errors)
            cached = liars & {node.host for node in cache.nodes()}
            print(f"  {label}, {run}: exact peers for {exact}/{count} infohashes, {made_up} "
                  f"made-up peers counted; BEP 33 within +-10 % + 2 for {within}/{count} "
                  f"(worst error {worst:.1f}); {len(cached)} liars cached; "
                  f"{udp.sent / count:.1f} packets per lookup")
            # (getattr: the code before the sybil defences runs this bench too, for comparison.)
            defences = getattr(survey.counters, "_sybil_summary", lambda: "")()
            left_out = sum(results[h].implausible_filters() for h in swarms)
            if defences or left_out:
                print(f"    {defences}{left_out} BEP 33 filters left out")


# A read-only libtorrent client as a process of its own, from start to exit: bootstrapped
# from the routers alone, then dht_get_peers for every infohash until no lookup is left.
LIBTORRENT_DHT_PROCESS: Final = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from bench_tsmd import libtorrent_client, libtorrent_get_peers, libtorrent_routing_nodes
routers = [(host, int(port)) for host, port in json.loads(sys.argv[2])]
infohashes = [bytes.fromhex(h) for h in json.loads(sys.argv[3])]
session = libtorrent_client(routers)
libtorrent_routing_nodes(session, at_least=8, timeout=30)
_, ended, found = libtorrent_get_peers(session, infohashes, {h: set() for h in infohashes}, 120)
print(json.dumps({h.hex(): sorted(found.get(h, ())) for h in infohashes}))
"""


def libtorrent_routing_nodes(session, at_least: int, timeout: float) -> int:
    """Wait until the session's DHT routing table holds `at_least` nodes (its bootstrap)."""
    import libtorrent as lt

    deadline = time.monotonic() + timeout
    nodes = 0
    while time.monotonic() < deadline:
        session.post_dht_stats()
        session.wait_for_alert(100)
        for alert in session.pop_alerts():
            if isinstance(alert, lt.dht_stats_alert):
                nodes = sum(bucket["num_nodes"] for bucket in alert.routing_table)
        if nodes >= at_least:
            break
        time.sleep(0.01)
    return nodes


def dht_processes_side_by_side(routers: list[tuple[str, int]], swarms: dict, expected: dict,
                               rounds: int) -> None:
    """`tsmd dht` (cold: no node cache; then warm: the cache the cold run left) and a libtorrent
    process, each a whole process from start to exit, knowing only the same three routers."""
    infohashes = list(swarms)
    with tempfile.TemporaryDirectory(prefix="tsmd-bench-") as tmp:
        root = Path(tmp)
        database = root / "dht.sqlite3"
        # As libtorrent's dht_get_peers: peers only, no BEP 33 scrape, every lookup at once.
        bootstrap = ", ".join(f'"{host}:{port}"' for host, port in routers)
        config = scrape_config(root, database, dht=f'bootstrap = [{bootstrap}]\n'
                               f'bind = "127.0.0.1:0"\nbep33 = false\n'
                               f'concurrency = {len(infohashes)}\n')
        results: dict[str, list[float]] = {"cold": [], "warm": [], "libtorrent": []}
        exact: dict[str, int] = {}
        for _ in range(rounds):
            database.unlink(missing_ok=True)
            make_scrape_db(database, infohashes, lambda n: [])
            for label in ("cold", "warm"):
                # --rate 0: libtorrent, beside it, keeps no packet budget either.
                wall, _, _ = run_tsmd(config, "-q", "dht", "--rate", "0")
                results[label].append(wall)
                db = sqlite3.connect(database)
                counts = dict(db.execute(
                    "SELECT t.infohash, d.peers FROM dht_samples d JOIN torrents t ON "
                    "t.id = d.torrent_id WHERE d.run_id = (SELECT max(run_id) FROM dht_samples)"))
                db.close()
                exact[label] = min(exact.get(label, len(infohashes)), sum(  # the worst round
                    counts.get(h.hex()) == len(expected[h]) for h in infohashes))
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", LIBTORRENT_DHT_PROCESS, str(HERE),
                                   json.dumps(routers), json.dumps([h.hex() for h in infohashes])],
                                  capture_output=True, text=True, timeout=600, env=USER_ENV,
                                  stdin=subprocess.DEVNULL)
            results["libtorrent"].append(time.perf_counter() - started)
            if done.returncode:
                sys.exit(f"the libtorrent process failed ({done.returncode}):\n{done.stderr}")
            found = {bytes.fromhex(h): {(host, port) for host, port in peers}
                     for h, peers in json.loads(done.stdout).items()}
            exact["libtorrent"] = min(exact.get("libtorrent", len(infohashes)),
                                      sum(found[h] == expected[h] for h in infohashes))
        theirs = min(results["libtorrent"])
        print(f"  whole processes, {len(infohashes)} lookups from the same 3 routers, best of "
              f"{rounds}: libtorrent {theirs:.2f} s ({exact['libtorrent']} exact); tsmd dht "
              f"cold {min(results['cold']):.2f} s (x{min(results['cold']) / theirs:.2f}, "
              f"{exact['cold']} exact), warm {min(results['warm']):.2f} s "
              f"(x{min(results['warm']) / theirs:.2f}, {exact['warm']} exact)")


def bench_dht_libtorrent(nodes: int, count: int, rtt: tuple[float, float] | None,
                         repeat: int) -> None:
    import random

    import trio

    import tsmd
    from test_tsmd import LibtorrentDht, survey_all, dht_test_options

    network = LibtorrentDht(nodes)
    relay = client = None
    stop = multiprocessing.Event()
    try:
        swarms = {}
        for n in range(count):
            infohash = hashlib.sha1(f"lt bench {n}".encode()).digest()
            swarms[infohash] = [((n * 7 + a * 3) % nodes, 7000 + a, a == 0) for a in range(1 + n % 4)]
        expected = network.announce(swarms, timeout=120)
        announced = sum(len(p) for p in expected.values())
        warm_up = [hashlib.sha1(f"lt warm-up {n}".encode()).digest() for n in range(20)]
        if rtt:
            chooser = random.Random(3)
            rtts = [chooser.uniform(*rtt) for _ in range(nodes)]
            ready: multiprocessing.Queue = multiprocessing.Queue()
            relay = multiprocessing.Process(target=serve_delay_relay, daemon=True, args=(
                network.nodes, [f"127.{LT_RELAY_OCTET}.{n + 1}.1" for n in range(nodes)], rtts,
                ready, stop))
            relay.start()
            relays = [tuple(address) for address in ready.get(timeout=60)]
            client = libtorrent_client(relays)
            where = (f"through a UDP relay per node that delays both directions (round trips "
                     f"{rtt[0] * 1000:.0f}-{rtt[1] * 1000:.0f} ms, mean "
                     f"{sum(rtts) / nodes * 1000:.0f} ms); tsmd and a separate read-only "
                     f"libtorrent client both know only the relays")
        else:
            relays = network.nodes
            client = libtorrent_client(relays)
            where = "no added latency; a separate read-only libtorrent client beside tsmd"

        class Relayed:  # what survey_all needs of a network: its bootstrap nodes
            bootstrap = [f"{host}:{port}" for host, port in relays[:3]]

        # Both clients warm from an earlier run: libtorrent's routing table (bootstrapped from
        # every node, then 20 lookups), tsmd's node cache (20 lookups from 3 nodes).
        time.sleep(1.0 + (rtt[1] if rtt else 0))
        libtorrent_get_peers(client, warm_up, {h: set() for h in warm_up}, timeout=10)
        cache = tsmd.NodeCache()
        trio.run(survey_all, Relayed, warm_up, dht_test_options(), cache)
        print(f"real libtorrent network, {nodes} nodes, {count} infohashes, {announced} announced "
              f"peers; {where}; tsmd's cache holds {len(cache)} nodes:")
        # Without limits, both clients are bound by CPU (or by latency). On the public DHT,
        # tsmd keeps to 250 packets/s; libtorrent cannot be held to such a budget (its
        # dht_upload_rate_limit only throttles its answers), so what compares there is the
        # packets each spends per lookup.
        for attempt in range(repeat):
            lt_sent = libtorrent_dht_sent(client)
            lt_wall, lt_ended, lt_found = libtorrent_get_peers(client, list(swarms), expected,
                                                               timeout=120)
            lt_after = libtorrent_dht_sent(client)
            found = sum(len(lt_found.get(h, set()) & expected[h]) for h in swarms)
            wrong = sum(len(lt_found.get(h, set()) - expected[h]) for h in swarms)
            ended = ("no end seen" if lt_ended is None else
                     f"{lt_ended:.2f} s until every lookup had ended")
            print(f"  [{attempt + 1}] libtorrent dht_get_peers: {found} found, {wrong} wrong, "
                  f"{lt_wall:.2f} s until every announced peer had arrived, {ended} "
                  f"({(lt_after[0] - lt_sent[0]) / count:.1f} packets per lookup)")
            for label, bep33, budget in (("tsmd", False, None), ("tsmd with BEP 33", True, None),
                                         (f"tsmd at {DHT_BUDGET} packets/s", False, DHT_BUDGET)):
                tsmd_side_by_side(f"  [{attempt + 1}] {label}", Relayed, swarms, expected, cache,
                                  bep33, budget)
        dht_processes_side_by_side(relays[:3], swarms, expected, repeat)
    finally:
        stop.set()
        if relay is not None:
            relay.join(timeout=10)
            if relay.is_alive():
                relay.kill()
        if client is not None:
            client.pause()
            client.apply_settings({"enable_dht": False})
        network.stop()


def make_history_db(path: Path, torrents: int, days: int, dead_every: int = 0) -> None:
    """A database as a month of daily cron leaves it: `torrents` torrents in two collections with
    three trackers each, a scrape run and a DHT run per day for `days` days, one or two tracker
    samples per torrent and run, written by the same SQL triggers and fold the stages use.
    With `dead_every`, every such torrent has had no seeder on any tracker nor in the DHT."""
    import random

    import tsmd

    tsmd.open_database(path).close()
    chooser = random.Random(11)
    db = sqlite3.connect(path)
    now = int(time.time())
    db.execute("INSERT INTO collections (name, url, type) VALUES ('books', 'http://b.invalid/', "
               "'books'), ('scimag', 'http://s.invalid/', 'scimag')")
    db.execute("INSERT INTO trackers (url) VALUES ('udp://tracker.example.org:1337/announce'), "
               "('http://tracker.example.net/announce'), ('udp://tracker.example.com:80')")
    db.executemany(
        "INSERT INTO torrents (id, infohash, name, size_bytes, file_count, created_unix, "
        "has_metainfo, first_seen, updated) VALUES (?, ?, ?, ?, 1000, ?, 1, 1, 1)",
        ((n, hashlib.sha1(f"big {n}".encode()).hexdigest(), f"book collection part {n}",
          chooser.randint(10**8, 10**11), 1_200_000_000 + n) for n in range(1, torrents + 1)))
    db.executemany(
        "INSERT INTO memberships (collection_id, source, torrent_id, file_name, first_seen, "
        "last_seen) VALUES (?, ?, ?, ?, 1, 1)",
        ((1 + n % 2, f"http://b.invalid/r_{n}.torrent", n, f"r_{n}.torrent")
         for n in range(1, torrents + 1)))
    db.executemany("INSERT INTO torrent_trackers VALUES (?, ?, 0, ?)",
                   ((n, tracker, tracker - 1) for n in range(1, torrents + 1) for tracker in (1, 2, 3)))
    base = {n: chooser.randint(0, 40) for n in range(1, torrents + 1)}
    dead = {n for n in base if dead_every and n % dead_every == 0}
    for day in range(days):
        started = now - (days - 1 - day) * 86400
        scrape_run = db.execute("INSERT INTO runs (stage, started, finished, outcome) VALUES "
                                "('scrape', ?, ?, 'ok')", (started, started + 60)).lastrowid
        dht_run = db.execute("INSERT INTO runs (stage, started, finished, outcome) VALUES "
                             "('dht', ?, ?, 'ok')", (started, started + 600)).lastrowid
        db.executemany(INSERT_SAMPLES + "(?, 1, ?, ?, ?, ?, ?)",
                       ((n, scrape_run, started + 30, 0 if n in dead else
                         max(0, seeders + chooser.randint(-3, 3)), chooser.randint(0, 9),
                         1000 + day) for n, seeders in base.items()))
        # A second tracker knows every other torrent, and fewer of its seeders.
        db.executemany(INSERT_SAMPLES + "(?, 2, ?, ?, ?, ?, ?)",
                       ((n, scrape_run, started + 40, 0 if n in dead else seeders // 2,
                         chooser.randint(0, 9), 900 + day) for n, seeders in base.items() if n % 2))
        db.executemany("INSERT INTO dht_samples VALUES (?, ?, ?, ?, NULL, NULL, 8)",
                       ((n, dht_run, started + 300, 0 if n in dead else seeders // 2)
                        for n, seeders in base.items()))
    db.commit()
    db.close()
    db = tsmd.open_database(path)
    with tsmd.Transaction(db):
        tsmd.fill_magnets(db)  # as sync stores them
    tsmd.summarize_scrape_runs(db)  # as each scrape run does when it ends
    db.close()


def bench_report(torrents: int, days: int, keep: Path | None) -> None:
    with tempfile.TemporaryDirectory(prefix="tsmd-bench-") as tmp:
        root = Path(tmp)
        database = keep or root / "report.sqlite3"
        started = time.perf_counter()
        made = "made earlier (--keep)"
        if not database.exists():
            make_history_db(database, torrents, days)
            made = f"made in {time.perf_counter() - started:.0f} s"
        print(f"machine: {platform.node()}, {os.cpu_count()} cores, Python "
              f"{platform.python_version()}")
        db = sqlite3.connect(database)
        samples = [db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                   for table in ("tracker_samples", "dht_samples")]
        db.close()
        print(f"database: {torrents} torrents, {days} days of history ({samples[0]} tracker "
              f"and {samples[1]} DHT samples), {database.stat().st_size / 2**20:.0f} MiB, {made}")
        config = scrape_config(root, database)
        for fmt, *options in (("json",), ("html",), ("csv",), ("ndjson",), ("prometheus",),
                              ("rss", "--pick", "2TB"), ("json", "--pick", "2TB")):
            output = root / f"report.{fmt}"
            wall, peak, _ = run_tsmd(config, "report", "--format", fmt, *options,
                                     "--output", str(output))
            label = " ".join([fmt, *options])
            print(f"report --format {label:20}: {wall:5.2f} s, peak RSS {peak / 1024:4.0f} MiB, "
                  f"{output.stat().st_size / 2**20:5.1f} MiB written")
        page = root / "report.html"
        # A copy of the page that logs, from the browser's own clock, when its data was read,
        # its first 500 rows drawn, and a click on "seeders" sorted 100,000 rows.
        probe = root / "probe.html"
        probe.write_text(page.read_text().replace(
            "const clicks = fromHash(); render();",
            'const clicks = fromHash(); console.log("tsmd-probe parsed " + performance.now());'
            ' render(); console.log("tsmd-probe drawn " + performance.now());'
            ' document.querySelector(\'th[data-key="seeders"]\').click();'
            ' console.log("tsmd-probe sorted " + performance.now());'))
        empty = root / "empty.html"
        empty.write_text("<!DOCTYPE html><title>empty</title>")
        for label, target in (("an empty page", empty.as_uri()), ("the report", page.as_uri()),
                              ("the report, filtered", page.as_uri() + "#q=r_1234"),
                              ("the report, timed inside", probe.as_uri())):
            with tempfile.TemporaryDirectory() as profile:
                started = time.perf_counter()
                done = subprocess.run(
                    ["/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu",
                     "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                     "--enable-logging=stderr", "--v=0", "--dump-dom", target],
                    capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
                wall = time.perf_counter() - started
            rows = done.stdout.count("<tr data-name=")
            marks = dict(re.findall(r'"tsmd-probe (\w+) ([0-9.]+)"', done.stderr))
            inside = ", ".join(f"{name} at {float(ms) / 1000:.2f} s" for name, ms in marks.items())
            print(f"headless Chromium, {label:26}: {wall:5.2f} s from start to DOM dump, "
                  f"{rows} rows drawn" + (f"; since navigation: {inside}" if inside else ""))


def page_charts(text: str) -> dict[tuple[str, int, str], int]:
    """(collection, day, band) -> bytes, as the page's charts draw them."""
    drawn = {}
    for figure in re.findall(r"<figure>.*?</figure>", text):
        collection = html.unescape(re.search(r'aria-label="(.*?): bytes per seeder band', figure)
                                   .group(1))
        for day, band, size in re.findall(
                r'data-day="(\d+)" data-band="(\w+)" data-bytes="(\d+)"', figure):
            drawn[(collection, int(day), band)] = int(size)
    return drawn


def history_charts(database: Path, today: int) -> dict[tuple[str, int, str], int]:
    """What the charts should hold, from the samples themselves: per collection and UTC day of
    the last month, the bytes of its torrents by their seeders at that day's last scrape run
    (the largest count of a trusted tracker), and the rest of its bytes as not measured."""
    import tsmd

    db = sqlite3.connect(database)
    collection_of = dict(db.execute(
        "SELECT m.torrent_id, c.name FROM memberships m JOIN collections c "
        "ON c.id = m.collection_id WHERE m.removed IS NULL"))
    size_of = dict(db.execute("SELECT id, max(size_bytes, 0) FROM torrents"))
    totals: dict[str, int] = {}
    for torrent, collection in collection_of.items():
        totals[collection] = totals.get(collection, 0) + size_of[torrent]
    last_run = {}  # (torrent, day) -> (measured, seeders) of the day's last run
    for torrent, measured, seeders in db.execute(
            "SELECT torrent_id, max(measured), max(seeders) FROM tracker_samples WHERE trusted "
            "GROUP BY torrent_id, run_id"):
        key = (torrent, measured // 86400)
        if key not in last_run or last_run[key][0] < measured:
            last_run[key] = (measured, seeders)
    db.close()
    expected: dict[tuple[str, int, str], int] = {}
    for (torrent, day), (_, seeders) in last_run.items():
        if today - tsmd.CHART_DAYS < day <= today and size_of[torrent] > 0:
            key = (collection_of[torrent], day, tsmd.seeder_band_value(seeders))
            expected[key] = expected.get(key, 0) + size_of[torrent]
    for collection, day in {(c, d) for c, d, _ in expected}:
        measured = sum(expected.get((collection, day, band), 0) for band in tsmd.CHART_BANDS)
        if totals[collection] > measured:
            expected[(collection, day, "grey")] = totals[collection] - measured
    return expected


def bench_plan(torrents: int, days: int, dead_every: int, budget: str) -> None:
    """Issue 17's figures: a database where a quarter of the torrents are dead, and what pick,
    the seedtools feed and the page make of it, the page checked in headless Chromium at 1400
    and 400 pixels by the tests' own probe."""
    import tsmd
    from test_tsmd import PAGE_PROBE, chromium, framed, seedtools_models

    with tempfile.TemporaryDirectory(prefix="tsmd-bench-") as tmp:
        root = Path(tmp)
        database = root / "plan.sqlite3"
        started = time.perf_counter()
        make_history_db(database, torrents, days, dead_every)
        print(f"machine: {platform.node()}, {os.cpu_count()} cores, Python "
              f"{platform.python_version()}")
        db = tsmd.open_database(database)
        rows = tsmd.select_report_rows(tsmd.load_report_rows(db), "need", None, None)
        db.close()
        by_name = {row.name: row for row in rows}
        groups = Counter(tsmd.plan_group(row) for row in rows)
        print(f"database: {torrents:,} torrents, {days} days of history, made in "
              f"{time.perf_counter() - started:.0f} s; plan: {groups[tsmd.PLAN_RED]:,} red, "
              f"{groups[tsmd.PLAN_YELLOW]:,} yellow, {groups[tsmd.PLAN_GREEN]:,} green, "
              f"{groups[tsmd.PLAN_DEAD]:,} dead ({groups[tsmd.PLAN_DEAD] / len(rows):.0%}), "
              f"{groups[tsmd.PLAN_UNMEASURED]:,} not measured")
        config = scrape_config(root, database)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", PEAK_RSS_WRAPPER, str(HERE), "--config",
                               str(config), "pick", "--budget", budget, "--format", "json"],
                              env=USER_ENV, capture_output=True, text=True, check=True,
                              stdin=subprocess.DEVNULL, timeout=600)
        wall = time.perf_counter() - started
        picked = json.loads(done.stdout)
        dead_picked = sum(tsmd.plan_group(by_name[item["name"]]) == tsmd.PLAN_DEAD
                          for item in picked)
        print(f"pick --budget {budget}: {len(picked):,} torrents in {wall:.2f} s, "
              f"{dead_picked} dead, bands {dict(Counter(item['band'] for item in picked))}")
        feed = root / "torrents.json"
        wall, _, done = run_tsmd(config, "report", "--format", "json", "--output", str(feed))
        items = json.loads(feed.read_text())
        accepted = []
        for model in seedtools_models():
            count = 0
            for item in items:
                model(**item)  # raises on the first row the model refuses
                count += 1
            accepted.append(count)
        print(f"report --format json: {len(items):,} rows in {wall:.2f} s; seedtools' model "
              f"accepted {accepted[0]:,} under pydantic 1 (release 0.4.0) and {accepted[1]:,} "
              "under pydantic 2")
        page = root / "index.html"
        wall, _, _ = run_tsmd(config, "report", "--format", "html", "--output", str(page))
        text = page.read_text()
        today = int(time.time()) // 86400
        drawn, expected = page_charts(text), history_charts(database, today)
        print(f"report --format html: {wall:.2f} s; charts: {len(drawn)} bars' parts drawn, "
              f"{'equal to' if drawn == expected else 'DIFFERENT FROM'} the samples' own "
              f"history ({len(expected)} parts)")
        pick_feed = root / "pick.ndjson"
        run_tsmd(config, "report", "--format", "ndjson", "--pick", budget, "--output",
                 str(pick_feed))
        published = [json.loads(line)["name"] for line in pick_feed.read_text().splitlines()]
        probed = root / "probed.html"
        probed.write_text(text.replace("</body>", PAGE_PROBE + "</body>"))
        for width in (1400, 400):
            started = time.perf_counter()
            window = f"--window-size={width + 100},1300"
            dom = chromium(framed(probed, "", width, 1200), "", window, "--dump-dom")
            probe = json.loads(html.unescape(re.search(r'data-probe="([^"]*)"', dom).group(1)))
            first = [by_name[name] for name, *_ in probe["first"]]
            red_downloadable = sum(tsmd.plan_group(row) == tsmd.PLAN_RED and row.seeders > 0
                                   for row in first)
            drawn_red = sum(colour == "rgb(251, 213, 213)" for _, colour, *_ in probe["first"])
            _, followed = json.loads(html.unescape(
                re.search(r'data-followed="([^"]*)"', dom).group(1)))
            dead_listed = sum(tsmd.plan_group(by_name[name]) == tsmd.PLAN_DEAD
                              for name in followed)
            dom = chromium(framed(probed, f"list=pick&space={budget}", width, 1200), "", window,
                           "--dump-dom")
            listed = json.loads(html.unescape(re.search(r'data-listed="([^"]*)"', dom).group(1)))
            same = listed["names"] == published[:500]
            print(f"Chromium at {width} px: page {probe['scroll']} px wide in {probe['inner']}; "
                  f"first 20 rows: {red_downloadable} red and downloadable, {drawn_red} drawn red; "
                  f"filters labelled: {probe['labelled']}, headers are buttons: "
                  f"{probe['buttons']}, aria-sort {probe['sorted']}; #list=dead followed: "
                  f"{dead_listed} of {len(followed)} drawn are dead; pick list "
                  f"{'equal to' if same else 'DIFFERENT FROM'} report --pick "
                  f"({len(listed['names'])} drawn); {time.perf_counter() - started:.1f} s")


def serve_run_dht(hashes: list[bytes], nodes: int, ports: multiprocessing.Queue, stop) -> None:
    """A simulated DHT in its own process, where every other torrent of the run bench has a
    swarm of one to three peers, until `stop` is set."""
    from test_tsmd import FakeDhtNetwork

    swarms = {infohash: {(f"127.{200 + p}.{(n // 250) % 250}.{n % 250 + 1}", 6881 + p, p == 0)
                         for p in range(1 + n % 3)}
              for n, infohash in enumerate(hashes) if n % 2 == 0}
    network = FakeDhtNetwork(nodes, swarms)
    serve_network_until(network, stop, lambda: ports.put(network.bootstrap))


def bench_run(torrents: int, dht_nodes: int) -> None:
    """`tsmd -q run` as cron runs it, over a whole collection on loopback peers: a served index of
    .torrent files, a real opentracker that knows every swarm, a simulated DHT."""
    import sqlite3

    from test_tsmd import OpenTracker, populate_opentracker

    hashes = [hashlib.sha1(bencoder.bencode(make_info(n, 10))).digest() for n in range(torrents)]
    swarms = {h: (n % 4, n % 3, n % 4) for n, h in enumerate(hashes) if n % 5}
    with tempfile.TemporaryDirectory(prefix="tsmd-bench-") as tmp:
        root = Path(tmp)
        tracker = OpenTracker(root / "opentracker", hashes)
        stop = multiprocessing.Event()
        workers = []
        try:
            started = time.perf_counter()
            populate_opentracker(tracker, swarms)
            announce = f"udp://127.0.0.1:{tracker.udp_port}/announce"
            served = root / "served"
            served.mkdir()
            for n in range(torrents):
                (served / f"r_{n:05d}.torrent").write_bytes(make_torrent(n, 10, (announce,)))
            (served / "index.html").write_text("<html><body>\n" + "".join(
                f'<a href="r_{n:05d}.torrent">r_{n:05d}.torrent</a>\n' for n in range(torrents))
                + "</body></html>\n")
            ports: multiprocessing.Queue = multiprocessing.Queue()
            dht_ports: multiprocessing.Queue = multiprocessing.Queue()
            workers = [
                multiprocessing.Process(target=serve, daemon=True, args=(
                    str(served), ports, multiprocessing.Value("q", 0), stop)),
                multiprocessing.Process(target=serve_run_dht, daemon=True, args=(
                    hashes, dht_nodes, dht_ports, stop))]
            for worker in workers:
                worker.start()
            port, bootstrap = ports.get(timeout=120), dht_ports.get(timeout=600)
            print(f"machine: {platform.node()}, {os.cpu_count()} cores, Python "
                  f"{platform.python_version()}")
            print(f"world: {torrents} .torrent files served on loopback, opentracker with "
                  f"{len(swarms)} swarms, a simulated DHT of {dht_nodes} nodes with "
                  f"{(torrents + 1) // 2} swarms; made in {time.perf_counter() - started:.0f} s")
            database = root / "run.sqlite3"
            config = root / "tsmd.toml"
            bootstrap_list = ", ".join(f'"{b}"' for b in bootstrap)
            config.write_text(f"""database = "{database}"
[network]
allow_private = true
[sync]
per_host_rate = 0
per_host_concurrency = 0
[scrape]
bind = "127.0.0.1:0"
[dht]
bootstrap = [{bootstrap_list}]
bind = "127.0.0.1:0"
# The simulated DHT is one Python process: it answers {SIMULATION_RATE} packets/s without loss.
rate = {SIMULATION_RATE}
per_ip_rate = 50
per_ip_burst = 10
concurrency = 500
[probe]
# The DHT's peers here are addresses nobody listens on: refused at once on loopback. At the
# default 20 connections a second, its 10,000 swarms' peers would take a quarter of an hour.
rate = 0
[report]
outputs = [{{ format = "json", path = "{root / 'www' / 'torrents.json'}" }},
           {{ format = "html", path = "{root / 'www' / 'index.html'}" }},
           {{ format = "prometheus", path = "{root / 'metrics' / 'tsmd.prom'}" }}]
[[collections]]
name = "bench"
url = "http://127.0.0.1:{port}/"
type = "books"
""")
            for label in ("first run", "next run"):
                wall, peak, _ = run_tsmd(config, "-q", "run")
                db = sqlite3.connect(database)
                last = db.execute("SELECT max(id) FROM runs WHERE stage = 'run'").fetchone()[0]
                stages = ", ".join(f"{stage} {finished - begun:.1f} s" for stage, begun, finished
                                   in db.execute("SELECT stage, started, finished FROM runs "
                                                 "WHERE id > ? ORDER BY id", (last,)))
                measured = db.execute(
                    "SELECT (SELECT count(*) FROM tracker_latest), (SELECT count(*) FROM "
                    "dht_latest WHERE peers > 0)").fetchone()
                db.close()
                print(f"tsmd -q run, {label}: {wall:.1f} s, peak RSS {peak / 1024:.0f} MiB "
                      f"({stages}); {measured[0]} torrents with tracker numbers, "
                      f"{measured[1]} with DHT peers")
        finally:
            stop.set()
            for worker in workers:
                worker.join(timeout=5)
                if worker.is_alive():
                    worker.kill()
            tracker.stop()


# ---- Peer probe: exactness against libtorrent, 1,000 peers, hostile peers ----

PROBE_PIECE: Final = 16384  # bytes a piece, in every torrent the probe bench makes
HOLDERS_OCTET: Final = 96  # libtorrent session n listens on 127.96.n.1 (and 127.96.n.t)
FAKE_PEERS_OCTET: Final = 94  # the honest fake peers: 127.94.t.k
HOSTILE_OCTET: Final = 93  # the hostile run's peers: 127.93.t.k
FAKE_PEERS_PER_TORRENT: Final = 20
FAKE_PIECES: Final = 200
# FakePeers' hostile behaviours, and the tsmd.ProbeOutcome each must be counted as.
HOSTILE_BEHAVIOURS: Final = {"garbage": "MALFORMED", "wrong torrent": "WRONG_TORRENT",
                             "huge length": "MALFORMED", "bad bitfield": "MALFORMED",
                             "trickle": "SILENT", "silent": "SILENT", "hang up": "CLOSED"}
# libtorrent's defaults open 30 connections a second (connection_speed), 200 in all
# (connections_limit), try new ones twice a second (tick_interval) and drop a connection
# neither side needs (close_redundant_connections: a seed, seen from an upload-only torrent),
# keep few torrents active and check one torrent's files at a time, one a second.
# Lifted, so what is timed is libtorrent reading bitfields, not its pacing.
LT_UNTHROTTLED: Final = {"connections_limit": 10_000, "connection_speed": 10_000,
                         "torrent_connect_boost": 255, "tick_interval": 50,
                         "close_redundant_connections": False, "active_downloads": -1,
                         "active_seeds": -1, "active_limit": -1, "active_checking": 1000}
# By default libtorrent tries uTP before TCP and an encrypted handshake (MSE) before a plain
# one; the fake peers know neither: plain TCP, as tsmd connects.
LT_PLAINTEXT: Final = {"out_enc_policy": 2, "enable_outgoing_utp": False}
LT_QUIET: Final = {"enable_dht": False, "enable_lsd": False, "enable_upnp": False,
                   "enable_natpmp": False, "enable_ip_notifier": False,
                   "listen_system_port_fallback": False, "max_retry_port_bind": 0,
                   "alert_mask": 0}


def probe_config(root: Path, database: Path, variant: str = "", **probe: object) -> Path:
    config = root / f"{database.stem}{variant}.toml"
    options = "".join(f"{key} = {value!r}\n".replace("'", '"') for key, value in probe.items())
    config.write_text(f'database = "{database}"\n[network]\nallow_private = true\n'
                      f'[probe]\n{options}[[collections]]\nname = "bench"\n'
                      f'url = "http://bench.invalid/"\ntype = "books"\n')
    return config


def make_probe_db(path: Path, swarms: list[tuple[object, list[tuple[str, int]]]]) -> None:
    """One collection of the torrents given (a tsmd.Metainfo each), each with the peer
    addresses the DHT stage would have stored for it, found now."""
    import tsmd

    now = int(time.time())
    db = tsmd.open_database(path)
    with tsmd.Transaction(db):
        collection_id = tsmd.upsert_collection(db, "bench", "http://bench.invalid/", "books", True)
        for meta, peers in swarms:
            torrent_id = tsmd.upsert_torrent(db, meta, now)
            db.execute("INSERT INTO memberships (collection_id, source, torrent_id, first_seen, "
                       "last_seen) VALUES (?, ?, ?, ?, ?)",
                       (collection_id, meta.infohash, torrent_id, now, now))
            db.executemany("INSERT INTO swarm_peers (torrent_id, host, port, found) "
                           "VALUES (?, ?, ?, ?)", [(torrent_id, h, p, now) for h, p in peers])
    db.close()


def single_file_info(name: str, length: int, piece_hashes: bytes) -> bytes:
    return bencoder.bencode({b"name": name.encode(), b"length": length,
                             b"piece length": PROBE_PIECE, b"pieces": piece_hashes})


def torrent_of(info: bytes) -> bytes:
    """A .torrent of nothing but `info` (bencoded exactly as given: its hash is the infohash)."""
    return b"d4:info" + info + b"e"


def copies_held(holdings: list[list[bool]]) -> float:
    """libtorrent's distributed copies, counted a piece at a time: how many hold the rarest
    piece, plus the fraction of pieces more of them hold."""
    per_piece = [sum(held) for held in zip(*holdings)]
    rarest = min(per_piece)
    return rarest + sum(count > rarest for count in per_piece) / len(per_piece)


def bitfield_of(held: list[bool]) -> bytes:
    """BEP 3: piece 0 is the first byte's high bit."""
    bits = bytearray((len(held) + 7) // 8)
    for piece, has in enumerate(held):
        if has:
            bits[piece >> 3] |= 0x80 >> (piece & 7)
    return bytes(bits)


def probe_results(database: Path) -> dict[str, tuple]:
    """infohash -> (verified seeds, availability, answering, has_metainfo, piece_count, name,
    size) after the last probe run; the first three None for a torrent it stored nothing for."""
    db = sqlite3.connect(database)
    rows = {infohash: tuple(rest) for infohash, *rest in db.execute(
        "SELECT t.infohash, p.verified_seeds, p.availability, p.answering, t.has_metainfo, "
        "t.piece_count, t.name, t.size_bytes FROM torrents t LEFT JOIN probe_samples p "
        "ON p.torrent_id = t.id AND p.run_id = (SELECT max(run_id) FROM probe_samples)")}
    db.close()
    return rows


def same_swarm(got: tuple, seeds: int, copies: float) -> bool:
    return got[0] == seeds and got[1] is not None and abs(got[1] - copies) < 1e-9


def free_port(host: str) -> int:
    """A TCP port free on `host` now; nothing else on the machine listens on 127.96/16."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def bench_probe_libtorrent(root: Path, torrents: int, sessions: int, seed: int) -> None:
    """Torrents held by real libtorrent sessions, in whole or in part, half of them known to
    tsmd as magnets only: its verified seeds and availability must be what the sessions
    themselves say they hold, and every magnet's metadata must be fetched.

    Two layouts of the same holdings. As BitTorrent clients are: session n at one address
    for all its torrents, which tsmd asks about each torrent on one connection at a time
    (PeerProber's politeness), so the run takes as long as the busiest session's torrents one
    after the other. And one address per holding: session n also listens on 127.96.n.t for
    torrent t, so that no address holds two torrents and nothing waits for another."""
    import libtorrent as lt

    import tsmd

    if not 1 <= sessions <= 250 or not 1 <= torrents <= 250:
        sys.exit("probe bench: --sessions and --torrents from 1 to 250 (an address each)")
    rng = random.Random(f"probe holders {seed}")
    holders = []
    try:
        ports = []
        for n in range(sessions):
            ports.append(free_port(f"127.{HOLDERS_OCTET}.{n + 1}.1"))
            holders.append(lt.session({
                **LT_QUIET, **LT_UNTHROTTLED, "listen_interfaces": ",".join(
                    f"127.{HOLDERS_OCTET}.{n + 1}.{t + 1}:{ports[n]}" for t in range(torrents))}))
        made = []  # (Metainfo as tsmd is told, Metainfo of the .torrent, {session: handle})
        started = time.perf_counter()
        for number in range(torrents):
            pieces = rng.randint(4, 40)
            data = rng.randbytes(pieces * PROBE_PIECE - rng.randrange(PROBE_PIECE))
            name = f"probe-{number:03d}.bin"
            info = single_file_info(name, len(data), b"".join(
                hashlib.sha1(data[at:at + PROBE_PIECE]).digest()
                for at in range(0, len(data), PROBE_PIECE)))
            torrent = torrent_of(info)
            handles = {}
            for n in sorted(rng.sample(range(sessions), rng.randint(1, sessions))):
                whole = rng.random() < 0.4
                held = range(pieces) if whole else rng.sample(range(pieces),
                                                               rng.randint(1, pieces - 1))
                folder = root / f"holder{n}"
                folder.mkdir(exist_ok=True)
                with open(folder / name, "wb") as file:  # sparse: only the pieces it holds
                    file.truncate(len(data))
                    for piece in held:
                        file.seek(piece * PROBE_PIECE)
                        file.write(data[piece * PROBE_PIECE:(piece + 1) * PROBE_PIECE])
                params = lt.add_torrent_params()
                params.ti, params.save_path = lt.torrent_info(torrent), str(folder)
                if not whole:
                    params.flags |= lt.torrent_flags.upload_mode  # never downloads the rest
                handles[n] = holders[n].add_torrent(params)
            full = tsmd.decode_metainfo_untrusted(torrent)
            told = full if number % 2 else tsmd.decode_magnet_untrusted(
                tsmd.magnet_uri(full.infohash))
            made.append((told, full, handles))
        deadline = time.monotonic() + 600
        checking = (lt.torrent_status.checking_files, lt.torrent_status.checking_resume_data)
        while any(h.status().state in checking for _, _, handles in made
                  for h in handles.values()):
            if time.monotonic() > deadline:
                sys.exit("probe bench: libtorrent did not check its files in 10 minutes")
            time.sleep(0.2)
        held = [{n: list(h.status(lt.status_flags_t.query_pieces).pieces)
                 for n, h in handles.items()} for _, _, handles in made]
        print(f"{torrents} torrents of 4 to 40 pieces of 16 KiB held by {sessions} libtorrent "
              f"sessions ({sum(map(len, held))} holdings, "
              f"{sum(all(p) for h in held for p in h.values())} of them whole), made and "
              f"checked in {time.perf_counter() - started:.1f} s; half listed as magnets only")
        for layout, variant, address in (
                ("one address per session, as a client has", "session", lambda n, t: 1),
                ("one address per holding (127.96.n.t)", "holding", lambda n, t: t + 1)):
            database = root / f"libtorrent-{variant}.sqlite3"
            make_probe_db(database, [(told, [(f"127.{HOLDERS_OCTET}.{n + 1}.{address(n, t)}",
                                              ports[n]) for n in handles])
                                     for t, (told, _, handles) in enumerate(made)])
            wall, peak, said = run_tsmd(probe_config(root, database), "probe", "--rate", "0")
            got = probe_results(database)
            exact, fetched, wrong = 0, 0, []
            for (told, full, _), holdings in zip(made, held):
                row = got[full.infohash]
                seeds = sum(all(pieces) for pieces in holdings.values())
                copies = copies_held(list(holdings.values()))
                right = same_swarm(row, seeds, copies)
                if not told.has_metainfo:
                    learnt = row[3:] == (1, full.piece_count, full.name, full.size_bytes)
                    fetched += learnt
                    right = right and learnt
                exact += right
                if not right:
                    wrong.append(f"{full.infohash[:8]}{' (magnet)' if not told.has_metainfo else ''}"
                                 f": tsmd (seeds, copies, answering) {row[:3]}, libtorrent "
                                 f"({seeds}, {copies:.4f}, {len(holdings)})")
            counts = last_run_counts(database)
            print(f"{layout}: tsmd probe --rate 0: exact {exact}/{torrents} torrents; metadata "
                  f"fetched {fetched}/{(torrents + 1) // 2} magnets; {wall:.2f} s (network phase "
                  f"{counts['seconds']:.2f} s), peak RSS {peak / 1024:.0f} MiB; "
                  f"{counts['peers_tried']} of {sum(map(len, held))} holdings asked; outcomes "
                  f"{json.dumps(counts['outcomes'])}")
            print(f"    tsmd said: {said}")
            for line in wrong[:3]:
                print(f"    not exact: {line}")
            if len(wrong) > 3:
                print(f"    ... and {len(wrong) - 3} more")
    finally:
        for session in holders:
            session.pause()
        holders.clear()


def fake_peer_swarms(torrents: int, seed: int, octet: int) -> list[tuple[bytes, list]]:
    """Per torrent: its info dict of FAKE_PIECES pieces, and FAKE_PEERS_PER_TORRENT peers
    (host, bitfield), seeds and partial holders drawn from `seed`."""
    rng = random.Random(f"fake peers {seed}")
    swarms = []
    for t in range(torrents):
        info = single_file_info(f"fake-{t:03d}.bin", FAKE_PIECES * PROBE_PIECE,
                                rng.randbytes(20 * FAKE_PIECES))
        peers = []
        for k in range(FAKE_PEERS_PER_TORRENT):
            share = 1.0 if rng.random() < 0.3 else rng.uniform(0.2, 0.9)
            held = [rng.random() < share for _ in range(FAKE_PIECES)]
            peers.append((f"127.{octet}.{t + 1}.{k + 1}", held))
        swarms.append((info, peers))
    return swarms


async def serve_fake_peers_until(specs: list[tuple[str, str, bytes, bytes]], ports, stop) -> None:
    import functools

    import trio

    from test_tsmd import fake_peer, metadata_peer

    addresses = []
    async with trio.open_nursery() as nursery:
        for number, (host, behaviour, infohash, payload) in enumerate(specs):
            listeners = await trio.open_tcp_listeners(0, host=host, backlog=64)
            addresses.append((host, listeners[0].socket.getsockname()[1]))
            if behaviour in ("honest", "forged"):  # a magnet's metadata, served (BEP 9)
                handler = functools.partial(metadata_peer, payload, behaviour, [])
            else:
                # Each its own peer id: libtorrent drops a second peer with the same one.
                handler = functools.partial(fake_peer, behaviour, infohash, payload,
                                            b"-FK0001-%012d" % number)
            nursery.start_soon(trio.serve_listeners, handler, listeners)
        ports.put(addresses)
        deadline = trio.current_time() + 3600  # never outlive a forgotten benchmark
        while not stop.is_set() and trio.current_time() < deadline:
            await trio.sleep(0.1)
        nursery.cancel_scope.cancel()


def serve_fake_peers(specs: list[tuple[str, str, bytes, bytes]], ports, stop) -> None:
    """Fake peers, each (host, behaviour, infohash, bitfield or info dict) on its own address,
    in a process of their own (their CPU is not tsmd's), until `stop` is set; their
    addresses go to `ports`, in the order of `specs`."""
    import trio

    trio.run(serve_fake_peers_until, specs, ports, stop)


def start_fake_peers(specs: list[tuple[str, str, bytes, bytes]]):
    """(process, stop event, addresses); spawned, not forked: libtorrent's threads may run."""
    context = multiprocessing.get_context("spawn")
    stop, ports = context.Event(), context.Queue()
    process = context.Process(target=serve_fake_peers, args=(specs, ports, stop), daemon=True)
    process.start()
    try:
        return process, stop, ports.get(timeout=120)
    except BaseException:
        stop_fake_peers(process, stop)
        raise


def stop_fake_peers(process, stop) -> None:
    stop.set()
    process.join(timeout=10)
    if process.is_alive():
        process.kill()
        process.join(timeout=5)


def libtorrent_bitfields(root: Path, swarms: list[tuple[bytes, list[tuple[tuple[str, int], list[bool]]]]],
                         timeout: float) -> tuple[float, int, int]:
    """One libtorrent session adds every torrent (upload mode: it downloads nothing) and
    connects to each of its peers: (seconds until every peer's bitfield had arrived, or the
    timeout; peers whose bitfield arrived; of them, those libtorrent read the same bits of)."""
    import libtorrent as lt

    session = lt.session({**LT_QUIET, **LT_UNTHROTTLED, **LT_PLAINTEXT,
                          "listen_interfaces": "127.0.0.1:0"})
    try:
        handles = []
        for info, _ in swarms:
            params = lt.add_torrent_params()
            params.ti, params.save_path = lt.torrent_info(torrent_of(info)), str(root)
            params.flags |= lt.torrent_flags.upload_mode
            handles.append(session.add_torrent(params))
        deadline = time.monotonic() + 60
        while any(h.status().state in (lt.torrent_status.checking_files,
                                       lt.torrent_status.checking_resume_data)
                  for h in handles) and time.monotonic() < deadline:
            time.sleep(0.05)
        expected = {address: held for _, peers in swarms for address, held in peers}
        arrived: dict[tuple[str, int], list[bool]] = {}
        waiting = {h: {address for address, _ in peers} for h, (_, peers) in zip(handles, swarms)}
        started = time.perf_counter()
        for handle, (_, peers) in zip(handles, swarms):
            for address, _ in peers:
                handle.connect_peer(address)
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            time.sleep(0.02)
            for handle in list(waiting):
                for peer in handle.get_peer_info():
                    address = (str(peer.ip[0]), int(peer.ip[1]))
                    if address in waiting[handle] and any(peer.pieces):
                        arrived[address] = list(peer.pieces)
                        waiting[handle].discard(address)
                if not waiting[handle]:
                    del waiting[handle]
        seconds = time.perf_counter() - started
        return seconds, len(arrived), sum(bits == expected[a] for a, bits in arrived.items())
    finally:
        session.pause()
        del session


def bench_probe_peers(root: Path, peers: int, seed: int) -> None:
    """`tsmd probe` of fake peers in a process of their own, at the default concurrency, at
    200, and with no have window at 1000; then libtorrent connecting to the same peers."""
    import tsmd

    torrents = max(1, peers // FAKE_PEERS_PER_TORRENT)
    if torrents > 250:
        sys.exit("probe bench: --peers at most 5000 (250 torrents of 20 peers on 127.94/16)")
    swarms = fake_peer_swarms(torrents, seed, FAKE_PEERS_OCTET)
    specs = [(host, "bitfield", hashlib.sha1(info).digest(), bitfield_of(held))
             for info, swarm in swarms for host, held in swarm]
    process, stop, addresses = start_fake_peers(specs)
    try:
        at = dict(zip((host for host, *_ in specs), addresses))
        expected = {hashlib.sha1(info).hexdigest(): (
            sum(all(held) for _, held in swarm), copies_held([held for _, held in swarm]))
            for info, swarm in swarms}
        database = root / "peers.sqlite3"
        make_probe_db(database, [(tsmd.decode_metainfo_untrusted(torrent_of(info)),
                                  [at[host] for host, _ in swarm]) for info, swarm in swarms])
        partial = sum(not all(held) for _, swarm in swarms for _, held in swarm)
        print(f"{torrents * FAKE_PEERS_PER_TORRENT} fake peers in a process of their own: "
              f"{torrents} torrents x {FAKE_PEERS_PER_TORRENT} peers, {FAKE_PIECES} pieces; "
              f"{partial} partial holders (tsmd reads `have` messages for [probe].have_window, "
              f"1 s, after a partial bitfield), "
              f"{sum(s for s, _ in expected.values())} seeds")
        config = probe_config(root, database)
        # Like for like with libtorrent, timed to the bitfield: no have window, no bound.
        no_window = probe_config(root, database, "no-window", have_window="0s")
        network_phase = {}
        for label, chosen, extra in (
                (f"default concurrency ({tsmd.ProbeSettings().concurrency})", config, ()),
                ("--concurrency 200", config, ("--concurrency", "200")),
                ("have_window 0 s, --concurrency 1000", no_window, ("--concurrency", "1000"))):
            wall, peak, said = run_tsmd(chosen, "probe", "--rate", "0", *extra)
            counts = last_run_counts(database)
            got = probe_results(database)
            exact = sum(same_swarm(got[h], *expected[h]) for h in expected)
            network_phase[label] = counts["seconds"]
            print(f"tsmd probe --rate 0, {label}: {wall:.2f} s (network phase "
                  f"{counts['seconds']:.2f} s), {counts['peers_answering']} of "
                  f"{counts['peers_tried']} peers answered, peak RSS {peak / 1024:.0f} MiB; "
                  f"verified seeds and availability exact for {exact}/{torrents} torrents")
            print(f"    tsmd said: {said}")
        print("libtorrent " + lt_version() + ", one session, settings: " + ", ".join(
            f"{key} = {value}" for key, value in {**LT_UNTHROTTLED, **LT_PLAINTEXT}.items()))
        seconds, arrived, same = libtorrent_bitfields(
            root, [(info, [(at[host], held) for host, held in swarm]) for info, swarm in swarms],
            timeout=120)
        print(f"libtorrent connect_peer to the same {len(specs)} peers: {arrived} bitfields "
              f"arrived in {seconds:.2f} s ({same} with the bits sent)")
        print(f"    network phase tsmd / libtorrent: --concurrency 200 "
              f"x{network_phase['--concurrency 200'] / seconds:.1f} (tsmd waits the 1 s have "
              f"window after each of the {partial} partial bitfields; libtorrent is timed to "
              f"the bitfield alone); have_window 0 s, --concurrency 1000 x"
              f"{network_phase['have_window 0 s, --concurrency 1000'] / seconds:.1f}")
    finally:
        stop_fake_peers(process, stop)


def lt_version() -> str:
    import libtorrent as lt

    return lt.__version__


def bench_probe_hostile(root: Path, seed: int) -> None:
    """Ten torrents, each with ten honest peers and one peer of each hostile behaviour; a
    magnet whose only peer forges its metadata, and one with a forger and an honest peer."""
    import tsmd

    swarms = fake_peer_swarms(10, seed + 1, HOSTILE_OCTET)
    swarms = [(info, peers[:10]) for info, peers in swarms]
    specs = []
    for t, (info, peers) in enumerate(swarms):
        infohash = hashlib.sha1(info).digest()
        specs += [(host, "bitfield", infohash, bitfield_of(held)) for host, held in peers]
        specs += [(f"127.{HOSTILE_OCTET}.{t + 1}.{100 + k}", behaviour, infohash,
                   bitfield_of(peers[0][1])) for k, behaviour in enumerate(HOSTILE_BEHAVIOURS)]
    rng = random.Random(f"hostile magnets {seed}")
    # Over 16 KiB of metadata (1,000 pieces of 20 bytes): two ut_metadata pieces each.
    magnets = [single_file_info(f"magnet-{n}.bin", 1000 * PROBE_PIECE, rng.randbytes(20_000))
               for n in range(2)]
    specs += [(f"127.{HOSTILE_OCTET}.200.1", "forged", b"", magnets[0]),
              (f"127.{HOSTILE_OCTET}.201.1", "forged", b"", magnets[1]),
              (f"127.{HOSTILE_OCTET}.201.2", "honest", b"", magnets[1])]
    process, stop, addresses = start_fake_peers(specs)
    try:
        of_torrent: dict[bytes, list] = {}
        for (host, _, infohash, payload), address in zip(specs, addresses):
            of_torrent.setdefault(infohash or hashlib.sha1(payload).digest(), []).append(address)
        listed = [tsmd.decode_metainfo_untrusted(torrent_of(info)) for info, _ in swarms]
        listed += [tsmd.decode_magnet_untrusted(tsmd.magnet_uri(hashlib.sha1(info).hexdigest()))
                   for info in magnets]
        database = root / "hostile.sqlite3"
        make_probe_db(database, [(meta, of_torrent[bytes.fromhex(meta.infohash)])
                                 for meta in listed])
        wall, peak, said = run_tsmd(probe_config(root, database), "probe", "--rate", "0")
        counts = last_run_counts(database)
        # Ten honest peers a torrent and the honest metadata peer tell, the lone forger breaks
        # the protocol. The other forger does if it is asked for the metadata (one peer at a
        # time); if the honest peer was asked first, it only tells its (whole) bitfield.
        told, broke = tsmd.ProbeOutcome.TOLD.value, tsmd.ProbeOutcome.MALFORMED.value
        planted = Counter({told: 10 * len(swarms) + 1, broke: 1})
        for outcome in HOSTILE_BEHAVIOURS.values():
            planted[tsmd.ProbeOutcome[outcome].value] += len(swarms)
        as_planted = counts["outcomes"] in (dict(planted + Counter({broke: 1})),
                                            dict(planted + Counter({told: 1})))
        got = probe_results(database)
        exact = sum(same_swarm(got[hashlib.sha1(info).hexdigest()],
                               sum(all(held) for _, held in peers),
                               copies_held([held for _, held in peers]))
                    for info, peers in swarms)
        forged_only, mixed = (got[hashlib.sha1(info).hexdigest()] for info in magnets)
        true_pieces = 1000
        print(f"hostile peers: {len(swarms)} torrents x (10 honest + {len(HOSTILE_BEHAVIOURS)} "
              f"hostile: {', '.join(HOSTILE_BEHAVIOURS)}), and 2 magnets: one whose only peer "
              f"forges the metadata, one with a forger and an honest peer")
        print(f"tsmd probe --rate 0: exit 0 in {wall:.2f} s, peak RSS {peak / 1024:.0f} MiB; "
              f"outcomes {json.dumps(counts['outcomes'])} (as planted: {as_planted})")
        print(f"    honest peers' verified seeds and availability exact for "
              f"{exact}/{len(swarms)} torrents; forged-only magnet: has_metainfo "
              f"{forged_only[3]}, piece_count {forged_only[4]} (forged metadata not stored: "
              f"{forged_only[3] == 0 and forged_only[4] is None}); forger + honest magnet: "
              f"has_metainfo {mixed[3]}, piece_count {mixed[4]} (the true one: "
              f"{mixed[4] == true_pieces}), verified seeds {mixed[0]}")
        print(f"    tsmd said: {said}")
    finally:
        stop_fake_peers(process, stop)


def bench_probe(torrents: int, sessions: int, peers: int, seed: int,
                only: str | None) -> None:
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="tsmd-bench-") as tmp:
        root = Path(tmp)
        if only in (None, "libtorrent"):
            bench_probe_libtorrent(root, torrents, sessions, seed)
        if only in (None, "peers"):
            bench_probe_peers(root, peers, seed)
        if only in (None, "hostile"):
            bench_probe_hostile(root, seed)


# ---- Hostile bytes: fuzzing, the bencode scan's cost, a million-file .torrent ----


def bench_fuzz(inputs: int, seed: int, workers: int) -> None:
    """test_tsmd's mutation fuzzer over every `_untrusted` parser, at length."""
    from test_tsmd import run_fuzz
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"seed {seed}, {workers} worker processes")
    summary = run_fuzz(inputs, seed=seed, workers=workers, chunk=20_000)
    print(summary.describe(seed))


def dht_replies(count: int) -> list[bytes]:
    """KRPC packets as a survey receives them: mostly 8 nodes and a token, some with values,
    some with BEP 33 filters, some errors."""
    rng = random.Random(5)
    packets = []
    for number in range(count):
        reply: dict = {b"id": rng.randbytes(20), b"token": rng.randbytes(8),
                       b"nodes": rng.randbytes(26 * 8)}
        if number % 10 == 1:
            reply[b"values"] = [rng.randbytes(6) for _ in range(rng.randrange(1, 60))]
        elif number % 10 == 2:
            reply[b"BFsd"], reply[b"BFpe"] = rng.randbytes(256), rng.randbytes(256)
        packet = {b"t": rng.randbytes(4), b"y": b"r", b"r": reply, b"ip": rng.randbytes(6)}
        if number % 50 == 3:
            packet = {b"t": rng.randbytes(4), b"y": b"e", b"e": [202, b"Server Error"]}
        packets.append(bencoder.bencode(packet))
    return packets


def five_megabyte_torrents() -> dict[str, bytes]:
    pieces = {b"name": b"big.iso", b"piece length": 16384, b"length": 16384 * 260_000,
              b"pieces": hashlib.sha1(b"p").digest() * 260_000}
    files = make_info(7, 40_000)
    return {"pieces-heavy (1 file, 260,000 pieces)": bencoder.bencode(
                {b"announce": b"udp://t.example:1/announce", b"info": pieces}),
            "file-heavy (40,000 files)": bencoder.bencode(
                {b"announce": b"udp://t.example:1/announce", b"info": files})}


def best_of(rounds: int, work) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def bench_decode(files: int) -> None:
    import tsmd
    from test_tsmd import write_torrent_of_many_files
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}")
    started = time.perf_counter()
    tsmd.scan_bencode_untrusted(b"le")  # the token regexes compile on first use
    print(f"first scan, regexes compiled: {(time.perf_counter() - started) * 1000:.1f} ms")
    packets = dht_replies(10_000)
    scan = best_of(5, lambda: [tsmd.scan_bencode_untrusted(p) for p in packets])
    plain = best_of(5, lambda: [bencoder.bdecode(p) for p in packets])
    krpc = best_of(5, lambda: [tsmd.decode_krpc_untrusted(p) for p in packets])
    print(f"10,000 DHT replies ({sum(map(len, packets)) / len(packets):.0f} bytes on average): "
          f"scan {scan * 1000:.1f} ms, bencoder.bdecode {plain * 1000:.1f} ms "
          f"(scan = {scan / plain:.0%} of a decode), decode_krpc_untrusted with its scan "
          f"{krpc * 1000:.1f} ms, {krpc / len(packets) * 1e6:.2f} µs a reply")
    for label, data in five_megabyte_torrents().items():
        scan = best_of(3, lambda: tsmd.scan_bencode_untrusted(data))
        plain = best_of(3, lambda: bencoder.bdecode(data))
        meta = best_of(3, lambda: tsmd.decode_metainfo_untrusted(data))
        print(f"{len(data) / 1e6:.1f} MB .torrent, {label}: scan {scan * 1000:.1f} ms, "
              f"bencoder.bdecode {plain * 1000:.1f} ms (scan = {scan / plain:.0%} of a decode), "
              f"decode_metainfo_untrusted with its scan {meta * 1000:.1f} ms")
    with tempfile.TemporaryDirectory(prefix="tsmd-bench-") as tmp:
        root = Path(tmp)
        folder = root / "torrents"
        folder.mkdir()
        write_torrent_of_many_files(folder / "r_0.torrent", files)
        data = (folder / "r_0.torrent").read_bytes()
        assert tsmd.decode_metainfo_untrusted(data).size_bytes == files * (files - 1) // 2
        config = root / "tsmd.toml"
        config.write_text(f'database = "bench.sqlite3"\n[sync]\nmax_torrent_bytes = '
                          f'"{len(data) + 1}"\n[[collections]]\nname = "m"\n'
                          f'url = "{folder.as_uri()}/"\ntype = "books"\n')
        wall, peak_kib, said = run_tsmd(config, "sync")
        print(f"tsmd sync of one .torrent of {files:,} files ({len(data) / 1e6:.1f} MB): "
              f"{wall:.2f} s, peak RSS {peak_kib / 1024:.0f} MiB; tsmd said: {said}")
        wall, peak_kib, said = run_tsmd(config, "--version")
        print(f"tsmd --version for comparison: peak RSS {peak_kib / 1024:.0f} MiB")


def median_seconds(command: list[str], runs: int = 10) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, capture_output=True, env=USER_ENV, stdin=subprocess.DEVNULL,
                       timeout=60, check=True)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def bench_startup(torrents: int) -> None:
    """How long tsmd takes before it does anything: --version, --help, and a stage command
    from its start to its first packet, whole processes, bytecode cached."""
    tsmd_command = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(HERE)!r}); "
                    "sys.argv[0] = 'tsmd'; from tsmd import app; sys.exit(app())"]
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}")
    bare = median_seconds([sys.executable, "-c", "pass"])
    print(f"python -c pass: {bare * 1000:.0f} ms (median of 10)")
    for arguments in (["--version"], ["--help"], ["sync", "--help"]):
        print(f"tsmd {' '.join(arguments)}: "
              f"{median_seconds(tsmd_command + arguments) * 1000:.0f} ms (median of 10)")
    importtime = subprocess.run([sys.executable, "-X", "importtime", "-c", "import tsmd"],
                                capture_output=True, text=True, env=USER_ENV, cwd=HERE)
    heaviest = sorted(((int(line.split("|")[1]), line.split("|")[2].strip())
                       for line in importtime.stderr.splitlines() if line.count("|") == 2
                       and line.split("|")[1].strip().isdigit()), reverse=True)[:6]
    print("import tsmd, cumulative µs: " + ", ".join(f"{name} {us:,}" for us, name in heaviest))
    with tempfile.TemporaryDirectory(prefix="tsmd-bench-") as tmp:
        root = Path(tmp)
        hashes = [hashlib.sha1(f"startup {n}".encode()).digest() for n in range(torrents)]
        first_packets = []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
            listener.bind(("127.0.0.1", 0))
            address = f"127.0.0.1:{listener.getsockname()[1]}"
            database = root / "startup.sqlite3"
            make_scrape_db(database, hashes, lambda n: [f"udp://{address}/announce"])
            for stage, config in (("scrape", scrape_config(root, database)),
                                  ("dht", scrape_config(root, database,
                                                        dht=f'bootstrap = ["{address}"]\n'
                                                            'bind = "127.0.0.1:0"\n'))):
                for _ in range(5):
                    started = time.perf_counter()
                    process = subprocess.Popen([*tsmd_command, "--config", str(config), stage],
                                               env=USER_ENV, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL)
                    listener.settimeout(30)
                    listener.recvfrom(65536)
                    first_packets.append((stage, time.perf_counter() - started))
                    process.kill()
                    process.wait()
        for stage in ("scrape", "dht"):
            times = sorted(t for s, t in first_packets if s == stage)
            print(f"tsmd {stage} of {torrents:,} torrents, start to first packet: "
                  f"{times[len(times) // 2] * 1000:.0f} ms (median of {len(times)})")


def round_trips(text: str) -> tuple[float, float] | None:
    """Milliseconds as "LOW-HIGH" or "MS" -> seconds (low, high); "0" -> None."""
    low, _, high = text.partition("-")
    if float(low) == 0 and not high:
        return None
    return float(low) / 1000, float(high or low) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    sync = sub.add_parser("sync", help="first sync and re-sync of a generated collection")
    sync.add_argument("--torrents", type=int, default=5000)
    sync.add_argument("--files", type=int, default=100, help="files per torrent")
    scrape = sub.add_parser("scrape", help="scrape a local opentracker; libtorrent alongside")
    scrape.add_argument("--hashes", type=int, default=20000)
    scrape.add_argument("--no-libtorrent", action="store_true")
    scrape.add_argument("--libtorrent-hashes", type=int, default=5000,
                        help="how many of the hashes libtorrent scrapes alongside")
    dht = sub.add_parser("dht", help="a simulated DHT, cold and warm runs, rate limit; "
                                     "then libtorrent nodes side by side")
    dht.add_argument("--nodes", type=int, default=1_000_000,
                     help=f"simulated nodes, up to {WIDE_NODES_MAX:,}")
    dht.add_argument("--routers", type=int, default=3,
                     help="bootstrap routers answering with random nodes (0: 3 ordinary nodes)")
    dht.add_argument("--rtt", type=round_trips, default=None, metavar="LOW-HIGH",
                     help="round-trip time of each simulated node, ms, e.g. 50-300")
    dht.add_argument("--lt-rtt", type=round_trips, action="append", metavar="LOW-HIGH",
                     help="round trips through a relay in front of each libtorrent node, ms; "
                          "0 for none; repeatable (default: 0 and 50-300)")
    dht.add_argument("--repeat", type=int, default=2, help="rounds of the side-by-side")
    dht.add_argument("--only", choices=("simulated", "hostile", "libtorrent"))
    dht.add_argument("--hostile-nodes", type=int, default=500)
    dht.add_argument("--hostile-infohashes", type=int, default=500)
    dht.add_argument("--infohashes", type=int, default=5000)
    dht.add_argument("--silent", type=float, default=0.5,
                     help="fraction of nodes that never answer (on the public DHT about half "
                          "of all queries time out)")
    dht.add_argument("--in-flight", type=int, default=1000)
    dht.add_argument("--lt-nodes", type=int, default=40)
    dht.add_argument("--lt-infohashes", type=int, default=400)
    whole = sub.add_parser("run", help="tsmd -q run over a whole collection on loopback peers")
    whole.add_argument("--torrents", type=int, default=20_000)
    whole.add_argument("--dht-nodes", type=int, default=600)
    report = sub.add_parser("report", help="reports of a big database with a month of history")
    report.add_argument("--torrents", type=int, default=100_000)
    report.add_argument("--days", type=int, default=30)
    report.add_argument("--keep", type=Path, metavar="FILE",
                        help="make the database there, or use the one already there")
    plan = sub.add_parser("plan", help="pick, seedtools feed and page when a quarter are dead")
    plan.add_argument("--torrents", type=int, default=20_000)
    plan.add_argument("--days", type=int, default=30)
    plan.add_argument("--dead-every", type=int, default=4)
    plan.add_argument("--budget", default="2TB")
    fuzz = sub.add_parser("fuzz", help="mutation fuzzing of every untrusted parser")
    fuzz.add_argument("--inputs", type=int, default=1_000_000)
    fuzz.add_argument("--seed", type=int, default=1)
    fuzz.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    startup = sub.add_parser("startup", help="--version, --help, start to first packet")
    startup.add_argument("--torrents", type=int, default=2000)
    listings = sub.add_parser("listings", help="a feed whose links all fail, a junk text file, "
                                               "listing parsers")
    listings.add_argument("--items", type=int, default=10_000)
    listings.add_argument("--junk-lines", type=int, default=100_000)
    decode = sub.add_parser("decode", help="cost of the bencode scan; sync of a huge .torrent")
    decode.add_argument("--files", type=int, default=1_000_000,
                        help="files in the huge .torrent")
    probe = sub.add_parser("probe", help="tsmd probe against libtorrent holders, 1,000 fake "
                                         "peers beside libtorrent, hostile peers")
    probe.add_argument("--torrents", type=int, default=200,
                       help="torrents held by the libtorrent sessions")
    probe.add_argument("--sessions", type=int, default=8, help="libtorrent sessions")
    probe.add_argument("--peers", type=int, default=1000, help="honest fake peers, 20 a torrent")
    probe.add_argument("--seed", type=int, default=1)
    probe.add_argument("--only", choices=("libtorrent", "peers", "hostile"))
    args = parser.parse_args()
    if args.bench == "startup":
        bench_startup(args.torrents)
    elif args.bench == "fuzz":
        bench_fuzz(args.inputs, args.seed, args.workers)
    elif args.bench == "decode":
        bench_decode(args.files)
    elif args.bench == "sync":
        bench_sync(args.torrents, args.files)
    elif args.bench == "listings":
        bench_listings(args.items, args.junk_lines)
    elif args.bench == "dht":
        if args.only in (None, "simulated"):
            bench_dht(args.nodes, args.infohashes, args.silent, args.in_flight, args.rtt,
                      args.routers)
        if args.only in (None, "hostile"):
            bench_dht_hostile(args.hostile_nodes, args.hostile_infohashes)
        if args.only in (None, "libtorrent"):
            for rtt in args.lt_rtt or (None, (0.05, 0.3)):
                bench_dht_libtorrent(args.lt_nodes, args.lt_infohashes, rtt, args.repeat)
    elif args.bench == "report":
        bench_report(args.torrents, args.days, args.keep)
    elif args.bench == "plan":
        bench_plan(args.torrents, args.days, args.dead_every, args.budget)
    elif args.bench == "run":
        bench_run(args.torrents, args.dht_nodes)
    elif args.bench == "probe":
        bench_probe(args.torrents, args.sessions, args.peers, args.seed, args.only)
    elif args.bench == "scrape":
        bench_scrape(args.hashes, not args.no_libtorrent, args.libtorrent_hashes)


if __name__ == "__main__":
    main()
