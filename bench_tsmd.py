#!/usr/bin/env python3
"""Benchmarks for tsmd. Prints figures; asserts nothing about speed.

    python3 bench_tsmd.py sync [--torrents 5000] [--files 100]

`sync`: generates a collection of .torrent files (libgen-like: many files per torrent, a few
trackers), serves it from a separate process on 127.0.0.1 (an HTML index page, ETags, conditional
requests), then runs `tsmd sync` as a subprocess twice: the first sync and the re-sync. For each it
prints wall time, torrents/s, requests seen by the server, downloads and the peak RSS of tsmd.
Everything runs on loopback and stops by itself.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import multiprocessing
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bencoder

HERE = Path(__file__).resolve().parent


def make_torrent(number: int, files: int) -> bytes:
    piece_length = 4 * 1024 * 1024
    sizes = [1_000_000 + 37 * ((number * 7919 + i) % 100_000) for i in range(files)]
    pieces = hashlib.sha1(str(number).encode()).digest() * max(1, -(-sum(sizes) // piece_length))
    info = {b"name": f"{number:05d}".encode(), b"piece length": piece_length, b"pieces": pieces,
            b"files": [{b"length": size, b"path": [f"{number * 1000 + i}".encode()]}
                       for i, size in enumerate(sizes)]}
    return bencoder.bencode({
        b"announce": b"udp://tracker.example.org:1337/announce",
        b"announce-list": [[b"udp://tracker.example.org:1337/announce"],
                           [b"http://tracker.example.net/announce"]],
        b"creation date": 1_500_000_000 + number, b"created by": b"bench_tsmd", b"info": info})


def serve(files_dir: str, port_queue: multiprocessing.Queue, count_file: str) -> None:
    """Serves files_dir with ETags; writes the number of requests to count_file on each one."""
    root = Path(files_dir)
    cache = {f"/{p.name}": p.read_bytes() for p in root.iterdir()}
    cache["/"] = cache.pop("/index.html")
    counter = [0]

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def setup(self):
            super().setup()
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def do_GET(self):
            counter[0] += 1
            Path(count_file).write_text(str(counter[0]))
            body = cache.get(self.path)
            if body is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            etag = '"%s"' % hashlib.sha1(body).hexdigest()[:16]
            if self.headers.get("If-None-Match") == etag:
                self.send_response(304)
                self.send_header("ETag", etag)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", etag)
            self.send_header("Content-Type", "text/html" if self.path == "/" else
                             "application/x-bittorrent")
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    port_queue.put(httpd.server_address[1])
    httpd.timeout = 1
    deadline = time.monotonic() + 3600  # never outlive a forgotten benchmark
    while time.monotonic() < deadline and not Path(count_file + ".stop").exists():
        httpd.handle_request()
    httpd.server_close()


# Runs tsmd.py as __main__ and reports the child's own peak RSS on stderr when it exits.
PEAK_RSS_WRAPPER = """
import atexit, resource, runpy, sys
atexit.register(lambda: sys.stderr.write(
    "\\npeak-rss-kib %d\\n" % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_tsmd(config: Path, *args: str) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in KiB, last line tsmd said) of one tsmd invocation."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK_RSS_WRAPPER, str(HERE / "tsmd.py"),
                           "--config", str(config), *args],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=1800)
    wall = time.perf_counter() - started
    if done.returncode != 0:
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
        count_file = str(root / "requests")
        ports: multiprocessing.Queue = multiprocessing.Queue()
        server = multiprocessing.Process(target=serve, args=(str(served), ports, count_file),
                                         daemon=True)
        server.start()
        try:
            port = ports.get(timeout=60)
            config = root / "tsmd.toml"
            config.write_text(f'database = "bench.sqlite3"\n[network]\nallow_private = true\n'
                              f'[[collections]]\nname = "bench"\n'
                              f'url = "http://127.0.0.1:{port}/"\ntype = "books"\n')
            print(f"machine: {platform.node()}, {os.cpu_count()} cores, Python "
                  f"{platform.python_version()}, {platform.platform()}")
            print(f"collection: {torrents} torrents x {files} files, "
                  f"{total_bytes / torrents / 1024:.1f} KiB per .torrent on average")
            for label in ("first sync", "re-sync"):
                requests_before = int(Path(count_file).read_text()) if Path(count_file).exists() else 0
                wall, peak_kib, summary = run_tsmd(config, "sync")
                requests = int(Path(count_file).read_text()) - requests_before
                print(f"{label:>10}: {wall:6.2f} s, {torrents / wall:7.0f} torrents/s, "
                      f"{requests} requests, peak RSS {peak_kib / 1024:.0f} MiB")
                print(f"{'':>12}tsmd said: {summary}")
        finally:
            Path(count_file + ".stop").touch()
            server.join(timeout=5)
            if server.is_alive():
                server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    sync = sub.add_parser("sync", help="first sync and re-sync of a generated collection")
    sync.add_argument("--torrents", type=int, default=5000)
    sync.add_argument("--files", type=int, default=100, help="files per torrent")
    args = parser.parse_args()
    if args.bench == "sync":
        bench_sync(args.torrents, args.files)


if __name__ == "__main__":
    main()
