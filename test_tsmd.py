"""Tests for tsmd, in the order of tsmd.py: codecs, address policy, fetch, storage, config, sync,
reports, command line. Network tests use loopback only and run under trio.fail_after."""

from __future__ import annotations

import bisect
import collections
import contextlib
import copy
import errno
import dataclasses
import functools
import gzip
import hashlib
import html
import heapq
import http.server
import io
import itertools
import signal
import ipaddress
import json
import math
import os
import random
import re
import select
import shlex
import shutil
import socket
import sqlite3
import struct
import subprocess
import tempfile
import sys
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import bencoder
import libtorrent as lt
import pytest
import trio
import trio_websocket
import rich.console as rich_console
from hypothesis import given, settings as hsettings, strategies as st
from typer.testing import CliRunner

import tsmd

HERE = Path(__file__).resolve().parent


# The columns a sample is written with; the others have their defaults.
INSERT_SAMPLES = ("INSERT INTO tracker_samples (torrent_id, tracker_id, run_id, measured, "
                  "seeders, leechers, completed) VALUES ")


def run(async_fn, *args, timeout: float = 30, **kwargs):
    async def bounded():
        with trio.fail_after(timeout):
            return await async_fn(*args, **kwargs)
    return trio.run(bounded)


def cannot_test(why: str) -> None:
    """Skip a test that this machine cannot run, saying why; under CI (CI=true) fail instead:
    CI runs the README's test command as root with every tool installed, and a skip there
    would hide what it cannot check."""
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


# ---- Torrent fixtures ----


def v1_torrent(name: str = "file.bin", length: int = 1000, *, files: list[int] | None = None,
               trackers: list[list[str]] | None = None, announce: str | None = None,
               seed: int = 0, canonical: bool = True) -> bytes:
    """A v1 .torrent; with canonical=False the keys are deliberately out of order."""
    total = sum(files) if files else length
    piece = hashlib.sha1(f"{name}{seed}".encode()).digest()
    pieces = piece * max(1, -(-total // 16384))  # libtorrent checks the piece count
    if files:
        info_items = [(b"name", name.encode()), (b"piece length", 16384), (b"pieces", pieces),
                      (b"files", [{b"length": n, b"path": [f"f{i}".encode()]}
                                  for i, n in enumerate(files)])]
    else:
        info_items = [(b"name", name.encode()), (b"piece length", 16384), (b"pieces", pieces),
                      (b"length", length)]
    top: list[tuple[bytes, object]] = [(b"creation date", 1_600_000_000 + seed),
                                       (b"created by", b"test_tsmd")]
    if announce:
        top.append((b"announce", announce.encode()))
    if trackers:
        top.append((b"announce-list", [[u.encode() for u in tier] for tier in trackers]))
    if canonical:
        return bencoder.bencode({**dict(top), b"info": dict(info_items)})
    # Hand-encode with keys reversed: valid bencode, but not the canonical sorted form.
    def enc_dict(items):
        return b"d" + b"".join(bencoder.bencode(k) + (v if isinstance(v, bytes) and v[:1] == b"d"
                                                       and k == b"info" else bencoder.bencode(v))
                               for k, v in items) + b"e"
    info_raw = b"d" + b"".join(bencoder.bencode(k) + bencoder.bencode(v)
                               for k, v in reversed(info_items)) + b"e"
    return enc_dict(list(reversed(top)) + [(b"info", info_raw)])


def write_torrent_of_many_files(path: Path, files: int) -> None:
    """A .torrent of `files` files of 0, 1, 2... bytes, written a slice at a time: building it as
    one dictionary would take gigabytes (and a child process inherits its parent's peak RSS)."""
    with path.open("wb") as torrent:
        torrent.write(b"d8:announce26:udp://t.example:1/announce4:infod5:filesl")
        for first in range(0, files, 10_000):
            torrent.write(b"".join(bencoder.bencode({b"length": n, b"path": [b"%x" % n]})
                                   for n in range(first, min(first + 10_000, files))))
        torrent.write(b"e4:name4:many12:piece lengthi16777216e6:pieces20:" + b"\0" * 20 + b"ee")


def lt_torrent(tmp_path: Path, name: str, sizes: list[int], flags: int) -> bytes:
    """A v2 or hybrid .torrent made by libtorrent from real files (independent implementation)."""
    root = tmp_path / name
    root.mkdir(parents=True)
    for i, size in enumerate(sizes):
        (root / f"part{i}.bin").write_bytes(os.urandom(size))
    storage = lt.file_storage()
    lt.add_files(storage, str(root))
    creator = lt.create_torrent(storage, 16384, flags=flags)
    creator.add_tracker("udp://tracker.example.org:1337/announce", 0)
    lt.set_piece_hashes(creator, str(tmp_path))
    return lt.bencode(creator.generate())


def lt_hashes(data: bytes) -> tuple[str, str | None]:
    info = lt.torrent_info(data)
    hashes = info.info_hashes()
    v2 = str(hashes.v2) if hashes.has_v2() else None
    return str(hashes.v1), v2


# ---- Bencode and metainfo ----

# The two inputs of issue 12: bencoder.pyx, unguarded, segfaults on the first (a negative length
# as a dictionary key) and loops for ever on the second.
SEGFAULT_PACKET = b"d1:rd-4:failure reason7:go awaye1:t2:aa1:y1:re"
ENDLESS_LOOP_PACKET = b"d2:1:d-6:"


def test_bdecode_refuses_deep_nesting_without_crashing():
    for depth in (tsmd.MAX_BENCODE_DEPTH + 1, 60_000, 1_000_000):
        with pytest.raises(tsmd.ProtocolError, match="nested deeper"):
            tsmd.bdecode_untrusted(b"l" * depth + b"e" * depth)
    # Nesting hidden behind dictionaries and strings that contain 'l' bytes is still counted.
    hostile = b"d1:a" + b"l" * 70_000 + b"e" * 70_000 + b"e"
    with pytest.raises(tsmd.ProtocolError):
        tsmd.bdecode_untrusted(hostile)
    # Strings full of 'l' are skipped by length and do not count as nesting.
    assert tsmd.bdecode_untrusted(b"l100000:" + b"l" * 100_000 + b"e") == [b"l" * 100_000]


def test_deep_nesting_in_a_subprocess_does_not_kill_the_interpreter(tmp_path):
    # The crash being guarded against is a segfault, which pytest could not report, so it runs apart.
    script = ("import tsmd\n"
              "try:\n    tsmd.decode_metainfo_untrusted(b'd4:info' + b'l'*200000 + b'e'*200000 + b'e')\n"
              "except tsmd.ProtocolError as e:\n    print('refused:', e)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=HERE, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "refused: bencode nested deeper" in done.stdout


@pytest.mark.parametrize("hostile,message", [
    (SEGFAULT_PACKET, "string length with a sign or a space at byte 5"),
    (ENDLESS_LOOP_PACKET, "string length with a sign or a space at byte 6"),
    (b"d +4:abcdi1ee", "sign or a space"), (b"d+4:abcdi1ee", "sign or a space"),
    (b"d4_0:abcdi1ee", "malformed string length"), (b"d04:abcdi1ee", "leading zero"),
    (b"d9223372036854775807:ae", "more than 10 digits"), (b"4294967296:a", "runs past the end"),
    (b"i" + b"7" * 5000 + b"e", "more than 19 digits"), (b"i9223372036854775808e", "64 bits"),
    (b"i-9223372036854775809e", "64 bits"), (b"i-0e", "leading zero"), (b"i007e", "leading zero"),
    (b"l1:ax", "unexpected byte b'x'"),
])
def test_scan_refuses_what_bencoder_pyx_would_misread(hostile, message):
    for parse in (tsmd.scan_bencode_untrusted, tsmd.bdecode_untrusted,
                  tsmd.decode_metainfo_untrusted, tsmd.decode_krpc_untrusted):
        with pytest.raises(tsmd.ProtocolError, match=message):
            parse(hostile)


def test_scan_accepts_every_canonical_token_and_the_int64_range():
    value = {b"": b"", b"a": [0, -1, (1 << 63) - 1, -(1 << 63), 12345678901234567],
             b"s" * 99: [b"x" * n for n in (0, 1, 99, 100, 208, 256, 1000, 70_000)],
             b"d": {b"e": [[[]], {}, [{b"l": []}]]}}
    data = bencoder.bencode(value)
    tsmd.scan_bencode_untrusted(data)
    assert tsmd.bdecode_untrusted(data) == value
    # Nesting at the limit passes, one level more does not, closed or not, in a short input and
    # in one long enough for the counting scan.
    limit = tsmd.MAX_BENCODE_DEPTH
    for filler in (b"", b"4:dddd" * 300):
        tsmd.scan_bencode_untrusted(b"l" * limit + filler + b"e" * limit)
        for closed in (limit + 1, 0):
            with pytest.raises(tsmd.ProtocolError, match="nested deeper"):
                tsmd.scan_bencode_untrusted(b"l" * (limit + 1) + filler + b"e" * closed)
    with pytest.raises(tsmd.ProtocolError, match="nested deeper than 3"):
        tsmd.scan_bencode_untrusted(b"llll", limit=3)
    # More `l` and `d` bytes than the limit in strings and shallow values: no false alarm.
    shallow = bencoder.bencode([{b"path": [b"dl" * 40], b"length": n} for n in range(3000)])
    assert len(tsmd.bdecode_untrusted(shallow)) == 3000


def test_metainfo_sizes_are_bounded_and_never_pass_int64():
    def torrent(info):
        return bencoder.bencode({b"info": {b"name": b"x", b"pieces": b"", **info}})

    big = tsmd.MAX_FILE_BYTES
    assert tsmd.decode_metainfo_untrusted(torrent({b"length": big})).size_bytes == big
    with pytest.raises(tsmd.ProtocolError, match="claims"):
        tsmd.decode_metainfo_untrusted(torrent({b"length": big + 1}))
    many = [{b"length": big, b"path": [b"%d" % n]} for n in range(8)]
    assert tsmd.decode_metainfo_untrusted(torrent({b"files": many})).size_bytes == 8 * big
    with pytest.raises(tsmd.ProtocolError, match="add up to over"):
        tsmd.decode_metainfo_untrusted(torrent({b"files": many + many[:1]}))
    meta = tsmd.decode_metainfo_untrusted(torrent({b"length": 1, b"piece length": 1 << 40}))
    assert meta.piece_length is None
    magnet = f"magnet:?xt=urn:btih:{'a' * 40}&xl="
    assert tsmd.decode_magnet_untrusted(magnet + str(1 << 53)).size_bytes == 1 << 53
    assert tsmd.decode_magnet_untrusted(magnet + str((1 << 53) + 1)).size_bytes is None
    text = tsmd.decode_metainfo_untrusted(torrent({b"length": 1, b"name": b"n" * 100_000}))
    assert len(text.name) == tsmd.MAX_METAINFO_TEXT


def test_files_are_decoded_an_entry_at_a_time(tmp_path):
    path = tmp_path / "many.torrent"
    write_torrent_of_many_files(path, 200_000)
    script = ("import resource, sys, tsmd\n"
              "data = open(sys.argv[1], 'rb').read()\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "meta = tsmd.decode_metainfo_untrusted(data)\n"
              "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
              "print(meta.file_count, meta.size_bytes, grown)\n")
    done = subprocess.run([sys.executable, "-c", script, str(path)], cwd=HERE, timeout=120,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    files, size, grown_kib = map(int, done.stdout.split())
    assert (files, size) == (200_000, 200_000 * 199_999 // 2)
    # Decoding the whole list at once took 45 MB for 200,000 files, 500 MB for a million.
    assert grown_kib < 20 * 1024, f"{grown_kib} KiB"


def test_metainfo_refuses_only_the_parts_it_uses():
    def torrent(info, **top):
        return bencoder.bencode({b"info": {b"name": b"x", b"piece length": 16384, **info}, **top})

    v2_tree = {b"a": {b"": {b"length": 5}}}
    # A v1 torrent with a junk `file tree` (not v2 without `meta version` 2): the junk is not
    # used. A hybrid with junk `files` has a v1 view nobody can download: invalid.
    meta = tsmd.decode_metainfo_untrusted(torrent({b"length": 9, b"pieces": b"",
                                                   b"file tree": b"junk"}))
    assert (meta.size_bytes, meta.infohash_v2) == (9, None)
    with pytest.raises(tsmd.ProtocolError, match="hybrid torrent whose v1 view is broken"):
        tsmd.decode_metainfo_untrusted(torrent({b"meta version": 2, b"file tree": v2_tree,
                                                b"files": []}))
    for info, message in (({b"meta version": 2, b"file tree": {b"a": 1}}, "not a dictionary"),
                          ({b"pieces": b"", b"files": []}, "non-empty list"),
                          ({b"pieces": b"", b"files": [{b"path": [b"a"]}]}, "no valid 'length'")):
        with pytest.raises(tsmd.ProtocolError, match=message):
            tsmd.decode_metainfo_untrusted(torrent(info))
    # Names in a file tree are in order and unique, so that none is counted twice.
    repeated = (b"d4:infod9:file treed1:ad0:d6:lengthi5eee1:ad0:d6:lengthi7eeee"
                b"12:meta versioni2e4:name1:xee")
    with pytest.raises(tsmd.ProtocolError, match="out of order or repeated"):
        tsmd.decode_metainfo_untrusted(repeated)
    # The last `info` counts, whatever it is.
    first = bencoder.bencode({b"length": 1, b"name": b"a", b"pieces": b""})
    second = bencoder.bencode({b"length": 2, b"name": b"b", b"pieces": b""})
    assert tsmd.decode_metainfo_untrusted(b"d4:info" + first + b"4:info" + second + b"e"
                                          ).size_bytes == 2
    with pytest.raises(tsmd.ProtocolError, match="no 'info'"):
        tsmd.decode_metainfo_untrusted(b"d4:info" + first + b"4:infoi1ee")


def test_announce_list_is_read_a_url_at_a_time():
    urls = [[f"udp://t{n}.example:1/a".encode()] for n in range(tsmd.MAX_ANNOUNCE_URLS + 50)]
    data = bencoder.bencode({b"announce-list": [b"udp://bare.example:1/a", [], *urls],
                             b"announce": b"http://last.example/announce",
                             b"info": {b"length": 1, b"name": b"x", b"pieces": b""}})
    trackers = tsmd.decode_metainfo_untrusted(data).trackers
    assert len(trackers) == tsmd.MAX_ANNOUNCE_URLS + 1
    assert trackers[0] == tsmd.Tracker("udp://bare.example:1", 0)
    assert trackers[1] == tsmd.Tracker("udp://t0.example:1", 2)  # the empty tier keeps its place
    assert trackers[-1] == tsmd.Tracker("http://last.example/announce", len(urls) + 2)


def test_hostile_bencode_costs_no_memory_beyond_its_bytes():
    # Each decoded whole, or matched by an unbounded regex repeat, took 0.5 to 2 GB. One process
    # a case: the peak RSS only ever grows.
    script = """
import resource, sys, tsmd
info = b"4:infod6:lengthi1e4:name1:x6:piecesd" + b"1:xl" + b"de" * 10 + b"eee"
parse, data = [
    (tsmd.scan_bencode_untrusted, b"l" + b"le" * 501 + b"i0e" * 4_000_000 + b"e"),
    (tsmd.scan_bencode_untrusted, b"d1:xl" + b"de" * 8_000_000 + b"ee"),
    (tsmd.scan_bencode_untrusted, b"l" * 499 + b"le" * 4_000_000 + b"e" * 499),
    (tsmd.decode_metainfo_untrusted, b"d" + info + b"3:zzzl" + b"de" * 7_000_000 + b"ee"),
    (tsmd.decode_metainfo_untrusted,
     b"d13:announce-listl" + b"ll0:ee" * 2_000_000 + b"e" + info + b"e"),
][int(sys.argv[1])]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
parse(data)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
    for case in range(5):
        done = subprocess.run([sys.executable, "-c", script, str(case)], cwd=HERE, timeout=300,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert int(done.stdout) < 20 * 1024, f"case {case}: {done.stdout} KiB"

@pytest.mark.parametrize("bad", [b"", b"l", b"i", b"ie", b"i01e", b"i-0e", b"5:ab", b"d1:a",
                                 b"di1ei2ee", b"-1:a", b"99999999999999999999:a", b"x",
                                 b"d1:ai1eeXYZ"])
def test_bdecode_rejects_malformed(bad):
    with pytest.raises(tsmd.ProtocolError):
        tsmd.bdecode_untrusted(bad)


def test_v1_single_and_multi_file_match_libtorrent():
    single = v1_torrent("single.iso", 123_456, announce="http://t.example/announce")
    multi = v1_torrent("dir", files=[10, 20, 30], trackers=[["udp://a.example:80/announce"],
                                                            ["http://b.example/announce"]])
    for data, size, count in ((single, 123_456, 1), (multi, 60, 3)):
        meta = tsmd.decode_metainfo_untrusted(data)
        assert meta.infohash == lt_hashes(data)[0]
        assert meta.infohash_v2 is None
        assert (meta.size_bytes, meta.file_count) == (size, count)
        assert meta.piece_length == 16384 and meta.has_metainfo
    meta = tsmd.decode_metainfo_untrusted(multi)
    assert [(t.url, t.tier) for t in meta.trackers] == [("udp://a.example:80", 0),
                                                        ("http://b.example/announce", 1)]
    assert tsmd.decode_metainfo_untrusted(single).created_by == "test_tsmd"


def test_non_canonical_key_order_hashes_the_raw_info_bytes():
    data = v1_torrent("noncanon.bin", 5000, canonical=False, announce="udp://x.example:6969")
    assert bencoder.bencode(bencoder.bdecode(data)) != data  # really non-canonical
    meta = tsmd.decode_metainfo_untrusted(data)
    assert meta.infohash == lt_hashes(data)[0]
    reencoded = hashlib.sha1(bencoder.bencode(bencoder.bdecode(data)[b"info"])).hexdigest()
    assert meta.infohash != reencoded


def test_v2_and_hybrid_match_libtorrent(tmp_path):
    v2 = lt_torrent(tmp_path / "a", "v2only", [40_000, 1_000], lt.create_torrent.v2_only)
    hybrid = lt_torrent(tmp_path / "b", "hybrid", [70_000, 5, 16384], 0)
    meta = tsmd.decode_metainfo_untrusted(v2)
    _, lt_v2 = lt_hashes(v2)
    assert meta.infohash_v2 == lt_v2 and meta.infohash == lt_v2[:40]
    assert (meta.size_bytes, meta.file_count) == (41_000, 2)
    meta = tsmd.decode_metainfo_untrusted(hybrid)
    lt_v1, lt_v2 = lt_hashes(hybrid)
    assert (meta.infohash, meta.infohash_v2) == (lt_v1, lt_v2)
    assert meta.size_bytes == 70_000 + 5 + 16384
    assert meta.trackers == (tsmd.Tracker("udp://tracker.example.org:1337", 0),)


def test_pad_files_are_not_content_and_web_seeds_are_kept(tmp_path):
    # libtorrent pads v1 files to piece boundaries with canonical_files (BEP 47); its own
    # total counts the padding, which nobody downloads as content.
    sizes = [70_000, 5, 16384]
    data = lt_torrent(tmp_path, "padded", sizes,
                      lt.create_torrent.v1_only | lt.create_torrent.canonical_files)
    storage = lt.torrent_info(data).files()
    pads = [storage.file_size(i) for i in range(storage.num_files())
            if storage.file_flags(i) & lt.file_storage.flag_pad_file]
    assert pads and storage.total_size() == sum(sizes) + sum(pads)
    meta = tsmd.decode_metainfo_untrusted(data)
    assert (meta.size_bytes, meta.file_count) == (sum(sizes), 3)
    # Web seeds: BEP 19 `url-list` as a string or a list, BEP 17 `httpseeds`; junk is dropped.
    document = bencoder.bdecode(data)
    document[b"url-list"] = [b"http://ws.example/files/", b"ftp://no.example/", b"junk",
                             b"http://ws.example/files/"]
    document[b"httpseeds"] = [b"http://hs.example/seed.php"]
    meta = tsmd.decode_metainfo_untrusted(bencoder.bencode(document))
    assert meta.web_seeds == (tsmd.WebSeed("http://hs.example/seed.php", "httpseeds"),
                              tsmd.WebSeed("http://ws.example/files/", "url-list"))
    document[b"url-list"] = b"https://mirror.example/padded"
    del document[b"httpseeds"]
    # libtorrent reads it as a folder (a multi-file torrent's web seed): it adds the slash.
    assert [seed["url"] for seed in lt.torrent_info(bencoder.bencode(document)).web_seeds()
            ] == ["https://mirror.example/padded/"]
    assert tsmd.decode_metainfo_untrusted(bencoder.bencode(document)).web_seeds == (
        tsmd.WebSeed("https://mirror.example/padded", "url-list"),)
    magnet = tsmd.decode_magnet_untrusted(
        f"magnet:?xt=urn:btih:{meta.infohash}&ws=http%3A%2F%2Fws.example%2Fa&ws=junk")
    assert magnet.web_seeds == (tsmd.WebSeed("http://ws.example/a", "url-list"),)


def test_a_hybrid_whose_two_views_disagree_is_invalid(tmp_path):
    hybrid = lt_torrent(tmp_path, "hybrid", [70_000, 5, 16384], 0)
    single = lt_torrent(tmp_path / "s", "single", [20_000], 0)
    for data in (hybrid, single):  # libtorrent's own hybrids agree, pads and all
        assert tsmd.decode_metainfo_untrusted(data).infohash == lt_hashes(data)[0]
    document = bencoder.bdecode(hybrid)
    files = document[b"info"][b"files"]
    content = [i for i, f in enumerate(files) if b"p" not in f.get(b"attr", b"")]
    for change in ("length", "name", "order"):
        broken = copy.deepcopy(document)
        entries = broken[b"info"][b"files"]
        if change == "length":
            entries[content[1]][b"length"] += 1
        elif change == "name":
            entries[content[1]][b"path"] = [b"other.bin"]
        else:
            entries[content[0]], entries[content[2]] = entries[content[2]], entries[content[0]]
        data = bencoder.bencode(broken)
        with pytest.raises(tsmd.ProtocolError, match="v1 files and v2 'file tree' disagree"):
            tsmd.decode_metainfo_untrusted(data)
        with pytest.raises(RuntimeError):  # libtorrent refuses it too
            lt.torrent_info(data)


def test_every_truncation_and_corruption_of_a_torrent_raises_only_protocol_error():
    data = v1_torrent("t.bin", 99, files=[1, 2], trackers=[["udp://a.example:1/x"]])
    for end in range(len(data)):
        with pytest.raises(tsmd.ProtocolError):
            tsmd.decode_metainfo_untrusted(data[:end])
    for position in range(len(data)):
        for replacement in (b"x", b"e", b"9", b"l", b":"):
            corrupted = data[:position] + replacement + data[position + 1:]
            try:
                tsmd.decode_metainfo_untrusted(corrupted)
            except tsmd.ProtocolError:
                pass


@given(st.binary(max_size=300))
@hsettings(max_examples=300, deadline=None)
def test_metainfo_parser_raises_only_protocol_error_on_random_bytes(data):
    try:
        tsmd.decode_metainfo_untrusted(data)
    except tsmd.ProtocolError:
        pass


@pytest.mark.parametrize("data,message", [
    (b"le", "not a bencoded dictionary"), (b"d1:ai1e1:be", "unexpected byte"), (b"d1:ai1e", "truncated"), (b"di1ei1ee", "not a string"),
    (b"d4:infoi1ee", "no 'info'"),
    (b"d4:infod4:name1:xee", "neither"),
    (bencoder.bencode({b"info": {b"name": b"x", b"length": -5, b"pieces": b""}}), "length"),
    (bencoder.bencode({b"info": {b"name": b"x", b"files": [{b"path": []}], b"pieces": b""}}),
     "files"),
    (bencoder.bencode({b"info": {b"meta version": 2, b"file tree": {b"a": {b"": {}}}}}), "length"),
])
def test_metainfo_semantic_errors_are_named(data, message):
    with pytest.raises(tsmd.ProtocolError, match=message):
        tsmd.decode_metainfo_untrusted(data)


def test_magnet_links():
    infohash = "63a04291a8b266d968aa7ab8a276543fa63a9e84"
    meta = tsmd.decode_magnet_untrusted(
        f"magnet:?xt=urn:btih:{infohash.upper()}&dn=r_000&tr=udp%3A%2F%2Ft.example%3A80%2Fannounce"
        "&tr=http://u.example/announce&tr=udp://t.example:80/announce&xl=6874163906")
    assert meta.infohash == infohash and meta.name == "r_000" and not meta.has_metainfo
    assert [t.url for t in meta.trackers] == ["udp://t.example:80", "http://u.example/announce"]
    assert meta.size_bytes == 6_874_163_906
    b32 = __import__("base64").b32encode(bytes.fromhex(infohash)).decode()
    assert tsmd.decode_magnet_untrusted(f"magnet:?xt=urn:btih:{b32}").infohash == infohash
    v2 = "a" * 64
    meta = tsmd.decode_magnet_untrusted(f"magnet:?xt=urn:btmh:1220{v2}")
    assert (meta.infohash, meta.infohash_v2) == (v2[:40], v2)
    for bad in ("magnet:?dn=x", "magnet:?xt=urn:btih:xyz", "http://x", "magnet:?xt=urn:btih:" + "g" * 40):
        with pytest.raises(tsmd.ProtocolError):
            tsmd.decode_magnet_untrusted(bad)
    assert tsmd.decode_magnet_untrusted(tsmd.magnet_uri(infohash, "n 1", ["udp://a:1"])).name == "n 1"


@given(st.text(max_size=60))
def test_magnet_names_round_trip_through_the_fast_quoting(name):
    assert tsmd._quote_component(name) == urllib.parse.quote(name, safe="")
    magnet = tsmd.magnet_uri("ab" * 20, name or None)
    assert tsmd.decode_magnet_untrusted(magnet).name == (name or None)


def test_magnet_trackers_are_kept_once_in_order_and_bounded():
    trackers = [f"udp://t{n}.example:1" for n in range(1500)]
    repeated = [url for url in trackers[:300] for _ in (0, 1)] + trackers[300:]
    magnet = f"magnet:?xt=urn:btih:{'a' * 40}" + "".join(f"&tr={t}" for t in repeated)
    meta = tsmd.decode_magnet_untrusted(magnet)
    # The first 1,000 `tr` hold 700 distinct trackers: kept once each, in order. 800 more are
    # counted, not read.
    assert [t.url for t in meta.trackers] == trackers[:700]
    assert [t.tier for t in meta.trackers] == list(range(700))
    assert meta.trackers_skipped == 800
    huge = tsmd.decode_magnet_untrusted(magnet + "&tr=udp://x.example:1" * 50_000)  # linear
    assert len(huge.trackers) == 700 and huge.trackers_skipped == 801


def test_tracker_url_normalisation():
    norm = tsmd.normalise_tracker_url
    assert norm(" HTTP://Tracker.Example:80/announce ") == "http://tracker.example/announce"
    # BEP 15 ignores a UDP tracker's path: these are one tracker. HTTP paths and passkeys count.
    for same in ("udp://t.example:1337/announce", "udp://t.example:1337", "udp://t.example:1337/",
                 "UDP://T.example:1337/announce?x=1"):
        assert norm(same) == "udp://t.example:1337"
    assert norm("http://t.example/a?passkey=1") != norm("http://t.example/a?passkey=2")
    assert norm("http://t.example/a") != norm("http://t.example/b")
    assert norm("udp://[2001:db8::1]:6969") == "udp://[2001:db8::1]:6969"
    for bad in ("udp://t.example", "ftp://t.example/", "http://", "not a url", "http://h:99999/",
                "wss://", "ws://h:0/"):
        assert norm(bad) is None
    # WebTorrent trackers: default ports like http(s), path and query kept like HTTP trackers.
    assert norm("WSS://Tracker.Example:443") == "wss://tracker.example/"
    assert norm("ws://t.example:80/announce") == "ws://t.example/announce"
    assert norm("ws://t.example:8000") == "ws://t.example:8000/"
    assert norm("wss://t.example/a?passkey=1") != norm("wss://t.example/a?passkey=2")
    assert norm("wss://t.example/") != norm("ws://t.example/") != norm("http://t.example/")


# ---- Collection index pages ----

BASE = "http://archive.example/repository_torrent/"


def parse_index(body: bytes, base: str = BASE, **options) -> tuple[list, list[str]]:
    """Entries and problems of one listing page, with ListingOptions given as keywords."""
    page = tsmd.parse_index_untrusted(body, base, options=tsmd.ListingOptions(**options))
    return page.entries, page.problems


def test_html_index_resolves_filters_and_keeps_same_origin():
    page = f"""<!DOCTYPE html><html><body>
    <a href="r_0.torrent">r_0</a> <a href='/repository_torrent/r_1000.torrent'>r_1000</a>
    <a href="sub/r_2000.TORRENT?x=1">upper</a> <a href="r_0.torrent">duplicate</a>
    <a href="http://other.example/r_3000.torrent">elsewhere</a> <a href="readme.txt">no</a>
    <a href="magnet:?xt=urn:btih:{'b' * 40}&amp;dn=m_1">magnet</a> <a href="magnet:?xt=bad">bad</a>
    <a>no href</a></body></html>""".encode()
    entries, problems = parse_index(page)
    assert [e.source for e in entries] == [
        BASE + "r_0.torrent", BASE + "r_1000.torrent", BASE + "sub/r_2000.TORRENT?x=1",
        f"magnet:?xt=urn:btih:{'b' * 40}&dn=m_1"]
    assert entries[0].file_name == "r_0.torrent" and entries[3].kind is tsmd.EntryKind.MAGNET
    assert len(problems) == 1 and "magnet link without a usable" in problems[0]
    entries, _ = parse_index(page, same_origin=False, required_substring="r_")
    assert "http://other.example/r_3000.torrent" in [e.source for e in entries]
    assert all("r_" in e.source for e in entries)


def test_text_and_json_lists():
    text = f"""# a comment
    r_1.torrent
    https://mirror.example/r_2.torrent
    magnet:?xt=urn:btih:{'c' * 40}
    {'D' * 40}
    ftp://nope.example/x.torrent
    """.encode()
    entries, problems = parse_index(text)
    assert [(e.kind.value, e.source) for e in entries] == [
        ("url", BASE + "r_1.torrent"), ("url", "https://mirror.example/r_2.torrent"),
        ("magnet", f"magnet:?xt=urn:btih:{'c' * 40}"), ("infohash", "d" * 40)]
    assert len(problems) == 1 and "ftp://" in problems[0]
    feed = json.dumps([{"name": "r_5.torrent", "link": "r_5.torrent", "infohash": "e" * 40},
                       "e" * 40, 7, {"nothing": 1}]).encode()
    entries, problems = parse_index(feed)
    assert [(e.source, e.file_name) for e in entries] == [(BASE + "r_5.torrent", "r_5.torrent"),
                                                          ("e" * 40, None)]
    assert len(problems) == 2
    with pytest.raises(tsmd.ProtocolError):
        tsmd.parse_index_untrusted(b"[" * 100_000, BASE)
    with pytest.raises(tsmd.ProtocolError):
        tsmd.parse_index_untrusted(b'{"no": "list"}', BASE)


def test_remote_index_cannot_point_at_local_files():
    page = b"file:///etc/passwd.torrent\n/ok.torrent\n"
    entries, problems = parse_index(page)
    assert [e.source for e in entries] == ["http://archive.example/ok.torrent"]
    assert "local file" in problems[0]
    entries, problems = parse_index(page, "file:///srv/list.txt")
    assert len(entries) == 2 and not problems


# ---- Tracker scrape codecs ----


def test_udp_tracker_packets_both_ways():
    connect = tsmd.encode_udp_connect(0x01020304)
    assert connect == bytes.fromhex("0000041727101980") + bytes.fromhex("00000000 01020304")
    hashes = [bytes([n]) * 20 for n in range(3)]
    scrape = tsmd.encode_udp_scrape(0x1122334455667788, 7, hashes)
    assert scrape[:16] == bytes.fromhex("1122334455667788 00000002 00000007") and len(scrape) == 76
    with pytest.raises(ValueError):
        tsmd.encode_udp_scrape(1, 1, [b"short"])
    reply = tsmd.decode_udp_tracker_reply_untrusted(
        bytes.fromhex("00000000 01020304 aabbccddeeff0011"))
    assert (reply.action, reply.transaction_id, reply.connection_id) == (
        tsmd.TrackerAction.CONNECT, 0x01020304, 0xAABBCCDDEEFF0011)
    # BEP 15 order on the wire: seeders, completed, leechers.
    body = struct.pack("!II", 2, 9) + struct.pack("!III", 5, 100, 3) + struct.pack("!III", 0, 0, 0)
    reply = tsmd.decode_udp_tracker_reply_untrusted(body)
    assert reply.entries == (tsmd.ScrapeCounts(seeders=5, leechers=3, completed=100),
                             tsmd.ScrapeCounts(0, 0, 0))
    error = tsmd.decode_udp_tracker_reply_untrusted(struct.pack("!II", 3, 9) + b"bad hash\x00")
    assert error.error == "bad hash" and tsmd.udp_transaction_id_untrusted(body) == 9


def test_every_truncation_and_corruption_of_tracker_replies_raises_only_protocol_error():
    valid = [bytes.fromhex("00000000 01020304 aabbccddeeff0011"),
             struct.pack("!II", 2, 9) + struct.pack("!III", 5, 100, 3) * 3,
             struct.pack("!II", 3, 9) + b"message"]
    for packet in valid:
        for end in range(len(packet)):
            try:
                tsmd.decode_udp_tracker_reply_untrusted(packet[:end])
            except tsmd.ProtocolError:
                pass
        for position in range(len(packet)):
            for byte in (0, 0xFF, 0x07):
                try:
                    tsmd.decode_udp_tracker_reply_untrusted(
                        packet[:position] + bytes([byte]) + packet[position + 1:])
                except tsmd.ProtocolError:
                    pass
    for short in (b"", b"\x00" * 7, bytes.fromhex("00000000 01020304 aabb"),
                  struct.pack("!II", 2, 1) + b"\x00" * 11, struct.pack("!II", 9, 1)):
        with pytest.raises(tsmd.ProtocolError):
            tsmd.decode_udp_tracker_reply_untrusted(short)


@given(st.binary(max_size=200))
@hsettings(max_examples=300, deadline=None)
def test_tracker_reply_parsers_raise_only_protocol_error(data):
    for parse in (tsmd.decode_udp_tracker_reply_untrusted, tsmd.decode_http_scrape_untrusted,
                  tsmd.decode_ws_scrape_untrusted):
        try:
            parse(data)
        except tsmd.ProtocolError:
            pass


def test_http_scrape_url_and_body():
    assert tsmd.http_scrape_url("http://t.example/announce") == "http://t.example/scrape"
    assert tsmd.http_scrape_url("http://t.example/x/announce.php?k=1") == \
        "http://t.example/x/scrape.php?k=1"
    assert tsmd.http_scrape_url("http://t.example/a") is None
    assert tsmd.http_scrape_url("http://t.example/announce/x") is None
    url = tsmd.encode_http_scrape_url("http://t.example/scrape?k=1", [b"\x00\xff" + b"a" * 18])
    assert url == "http://t.example/scrape?k=1&info_hash=%00%FF" + "a" * 18
    body = bencoder.bencode({b"files": {b"h" * 20: {b"complete": 4, b"incomplete": 1,
                                                    b"downloaded": 30}}})
    assert tsmd.decode_http_scrape_untrusted(body) == tsmd.HttpScrapeReply(
        {b"h" * 20: tsmd.ScrapeCounts(4, 1, 30)}, 0)
    # webtorrent's bittorrent-tracker sends each hash's latin-1 "binary string" UTF-8-encoded;
    # a malformed entry is counted and left out, the others count.
    binary = bytes(range(236, 256))
    body = bencoder.bencode({b"files": {binary.decode("latin-1").encode("utf-8"): {
        b"complete": 2, b"incomplete": 1, b"downloaded": 2}, b"short": {b"complete": 1},
        b"x" * 20: {b"complete": -1}, b"y" * 20: {b"incomplete": 3}}})
    assert tsmd.decode_http_scrape_untrusted(body) == tsmd.HttpScrapeReply(
        {binary: tsmd.ScrapeCounts(2, 1, 2), b"y" * 20: tsmd.ScrapeCounts(0, 3, 0)}, 2)
    # One byte over 0x7f: 21 bytes. A code point over U+00FF is no byte: refused. A hash sent
    # both raw and mangled: the second is counted, not taken twice.
    one_high = b"\x80" + b"z" * 19
    body = bencoder.bencode({b"files": {
        one_high.decode("latin-1").encode("utf-8"): {b"complete": 1},
        ("\u0100" + "z" * 19).encode("utf-8"): {b"complete": 2},
        one_high: {b"complete": 3}}})
    reply = tsmd.decode_http_scrape_untrusted(body)
    # The first of the two in the reply's (sorted) order counts: here the raw key.
    assert reply.files == {one_high: tsmd.ScrapeCounts(3, 0, 0)} and reply.bad_entries == 2
    for bad, message in ((bencoder.bencode({b"failure reason": b"go away"}), "go away"),
                         (b"le", "not a bencoded dictionary"), (b"de", "no 'files'"),
                         (bencoder.bencode({b"files": {b"short": {}}}), "none of its 1"),
                         (bencoder.bencode({b"files": {b"h" * 20: {b"complete": -1}}}), "none")):
        with pytest.raises(tsmd.ProtocolError, match=message):
            tsmd.decode_http_scrape_untrusted(bad)
    for end in range(len(body)):
        with pytest.raises(tsmd.ProtocolError):
            tsmd.decode_http_scrape_untrusted(body[:end])


def ws_reply(files: dict[bytes, dict], **extra) -> str:
    """A WebTorrent scrape reply as bittorrent-tracker writes it: keys are binary strings."""
    return json.dumps({"action": "scrape", "files": {h.decode("latin-1"): c for h, c in
                                                     files.items()}, **extra}, ensure_ascii=False)


def test_ws_scrape_message_and_reply():
    hashes = [bytes(range(20)), bytes(range(236, 256)), b"a" * 20]
    message = tsmd.encode_ws_scrape(hashes)
    assert json.loads(message) == {"action": "scrape", "info_hash": [
        "".join(map(chr, range(20))), "".join(map(chr, range(236, 256))), "a" * 20]}
    # One code point per byte: bytes over 0x7f are two UTF-8 bytes on the wire, never escapes
    # that a tracker would have to undo.
    assert bytes(range(236, 256)).decode("latin-1") in message
    for bad in ([], [b"short"], [b"x" * 21]):
        with pytest.raises(ValueError):
            tsmd.encode_ws_scrape(bad)
    # bittorrent-tracker's reply, verbatim in form: raw latin-1 characters, control characters
    # escaped, `downloaded` equal to `complete`, and flags.
    raw = ('{"action":"scrape","files":{"' + "".join(map(chr, range(236, 256))) + '":{"complete":3,'
           '"incomplete":1,"downloaded":3},"\\u0000\\u0001' + "b" * 18 + '":{"complete":0,'
           '"incomplete":0,"downloaded":0}},"flags":{"min_request_interval":600}}')
    expected = tsmd.HttpScrapeReply({bytes(range(236, 256)): tsmd.ScrapeCounts(3, 1, 3),
                                     b"\x00\x01" + b"b" * 18: tsmd.ScrapeCounts(0, 0, 0)}, 0)
    assert tsmd.decode_ws_scrape_untrusted(raw) == expected
    assert tsmd.decode_ws_scrape_untrusted(raw.encode("utf-8")) == expected  # a binary frame
    # Entries are read one by one, as for HTTP: the bad ones are counted, the good ones kept.
    text = json.dumps({"action": "scrape", "files": {
        "a" * 20: {"complete": 2, "incomplete": 5, "downloaded": 9},
        "short": {"complete": 1},  # not 20 code points
        "b" * 21: {"complete": 1},
        "\u0100" + "c" * 19: {"complete": 1},  # a code point over U+00FF is no byte
        "\ud800" + "d" * 19: {"complete": 1},  # a lone surrogate
        "e" * 20: {"complete": True},  # a bool is no count
        "f" * 20: {"complete": -1}, "g" * 20: {"complete": 1.0}, "h" * 20: {"complete": "1"},
        "i" * 20: {"complete": 2 ** 63}, "j" * 20: {"complete": int("9" * 30)},
        "k" * 20: [1, 2, 3], "l" * 20: {"incomplete": 4}}})
    assert tsmd.decode_ws_scrape_untrusted(text) == tsmd.HttpScrapeReply(
        {b"a" * 20: tsmd.ScrapeCounts(2, 5, 9), b"l" * 20: tsmd.ScrapeCounts(0, 4, 0)}, 11)
    assert tsmd.decode_ws_scrape_untrusted(ws_reply({})) == tsmd.HttpScrapeReply({}, 0)


def test_ws_scrape_reply_flaws_are_protocol_errors():
    with pytest.raises(tsmd.NotAScrapeReply):  # the client skips these and reads on
        tsmd.decode_ws_scrape_untrusted('{"action": "announce", "offer": {}, "info_hash": "x"}')
    with pytest.raises(tsmd.NotAScrapeReply):
        tsmd.decode_ws_scrape_untrusted('{"action": "announce", "failure reason": "not ours"}')
    for bad, message in (
            ("not json", "not JSON"), (b"\xff\xfe", "not JSON"), ("", "not JSON"),
            ("[1, 2]", "not a JSON object"), ('"scrape"', "not a JSON object"),
            ("null", "not a JSON object"),
            # bittorrent-tracker's answer to a request it cannot parse has no action.
            ('{"failure reason":"invalid info_hash"}', "tracker failure: 'invalid info_hash'"),
            ('{"action":"scrape","failure reason":"closed"}', "tracker failure: 'closed'"),
            ('{"failure reason":{"deep":[[[]]]}}', "tracker failure: of type dict"),
            ('{"action":"scrape"}', "no 'files'"), ('{"action":"scrape","files":[]}', "no 'files'"),
            ('{"action":"scrape","files":{"x":{}}}', "none of its 1"),
            ("[" * 100_000 + "]" * 100_000, "not JSON"), ('{"a":' * 100_000, "not JSON"),
            ('{"action":"scrape","files":{},"x":' + "9" * 10_000 + "}", ""),  # 10,000 digits
            ("x" * (tsmd.MAX_WS_MESSAGE_CHARS + 1), "over the 1,048,576 limit")):
        if not message:
            assert tsmd.decode_ws_scrape_untrusted(bad).files == {}
            continue
        with pytest.raises(tsmd.ProtocolError, match=re.escape(message)) as raised:
            tsmd.decode_ws_scrape_untrusted(bad)
        assert not isinstance(raised.value, tsmd.NotAScrapeReply)
    # Every truncated prefix of a valid reply: only ProtocolError.
    valid = ws_reply({bytes(range(230, 250)): {"complete": 1, "incomplete": 2, "downloaded": 3}},
                     flags={"min_request_interval": 600})
    for end in range(len(valid)):
        with pytest.raises(tsmd.ProtocolError):
            tsmd.decode_ws_scrape_untrusted(valid[:end])


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=25),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["action", "files", "failure reason", "complete", "incomplete",
                         "downloaded", "flags"]) | st.text(min_size=18, max_size=22),
        children, max_size=4), max_leaves=20)


@given(st.dictionaries(st.sampled_from(["action", "files", "failure reason", "flags"]),
                       _JSON_VALUES | st.just("scrape"), max_size=4),
       st.text(max_size=30))
@hsettings(max_examples=400, deadline=None)
def test_ws_scrape_reply_parser_raises_only_protocol_error(document, noise):
    """JSON shaped like a reply, and its text cut or spliced with noise: a reply or a
    ProtocolError, nothing else."""
    text = json.dumps(document, ensure_ascii=bool(len(noise) % 2))
    for candidate in (text, text[:len(text) // 2] + noise, noise + text, text.encode("utf-8")):
        try:
            reply = tsmd.decode_ws_scrape_untrusted(candidate)
        except tsmd.ProtocolError:
            continue
        assert all(len(h) == 20 for h in reply.files) and reply.bad_entries >= 0


# ---- Address policy ----


@pytest.mark.parametrize("address,allowed", [
    ("93.184.216.34", True), ("2606:2800:220:1:248:1893:25c8:1946", True), ("1.1.1.1", True),
    ("127.0.0.1", False), ("127.3.2.1", False), ("::1", False), ("10.1.2.3", False),
    ("172.16.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False),
    ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False), ("255.255.255.255", False),
    ("240.0.0.1", False), ("fe80::1", False), ("fc00::1", False), ("ff02::1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("::", False), ("192.0.0.8", False),
    ("198.18.0.1", False), ("2001:db8::1", False), ("not-an-ip", False),
    ("64:ff9b::808:808", True), ("64:ff9b::a00:1", False), ("2002:a00:1::", False),
    ("2002:808:808::", True), ("fec0::1", False), ("2001:0:4136:e378:8000:63bf:f5ff:fffe", False),
])
def test_is_global_address(address, allowed):
    assert tsmd.is_global_address(address) is allowed


# ---- A loopback HTTP server serving generated collections ----


class LoopbackHttpServer:
    """An HTTP/1.1 server on 127.0.0.1:0 in a thread; subclasses answer in `respond`."""

    def __init__(self) -> None:
        self.requests: list[list[str]] = []  # [path, status]
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                # Headers and body go out in two writes; without this Nagle's algorithm and the
                # client's delayed ACK add 40 ms to every response.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_GET(self):
                # Counted before anything is sent: a client may act on the answer (and the test
                # count requests) before this thread runs again.
                self.entry = [urllib.parse.unquote(urllib.parse.urlsplit(self.path).path), "?"]
                with server.lock:
                    server.requests.append(self.entry)
                server.respond(self, self.entry[0])

            def send_response(self, code, message=None):
                self.entry[1] = str(code) + ("-truncated" if self.entry[0].startswith(
                    "/truncated/") else "")
                super().send_response(code, message)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def respond(self, handler, path: str) -> None:
        raise NotImplementedError

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


class CollectionServer(LoopbackHttpServer):
    """Serves files from a dict, counts requests, answers conditional requests, and misbehaves
    on special paths (/redirect/URL, /loop, /slow/, /slow-redirect/HOPS, /truncated/,
    /chunked-huge/)."""

    def __init__(self) -> None:
        super().__init__()
        # path -> (body, Content-Type) or (body, Content-Type, {extra header: value})
        self.files: dict[str, tuple] = {}
        self.slow_seconds = 3.0  # how long /slow/ paths take
        self.busy: dict[str, list[str]] = {}  # path -> Retry-After values of 429s, one a request
        self.started: list[float] = []  # when each request came in (time.monotonic)


    def count(self, prefix: str = "/") -> int:
        with self.lock:
            return sum(1 for path, _ in self.requests if path.startswith(prefix))

    def respond(self, handler, path: str) -> str:
        if path.startswith("/redirect/"):
            handler.send_response(302)
            handler.send_header("Location", path[len("/redirect/"):])
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return "302"
        if path == "/loop":
            handler.send_response(301)
            handler.send_header("Location", "/loop")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return "301"
        if path.startswith("/slow/"):
            time.sleep(self.slow_seconds)
        if path.startswith("/slow-redirect/"):  # each hop as slow as /slow/, then the next
            time.sleep(self.slow_seconds)
            hops = int(path.split("/")[2])
            handler.send_response(302 if hops else 200)
            handler.send_header("Location", f"/slow-redirect/{hops - 1}")
            handler.send_header("Content-Length", "4")
            handler.end_headers()
            handler.wfile.write(b"done")
            return "302" if hops else "200"
        if path.startswith("/truncated/"):
            handler.send_response(200)
            handler.send_header("Content-Length", "100000")
            handler.end_headers()
            handler.wfile.write(b"d8:announce")
            handler.close_connection = True
            return "200-truncated"
        if path.startswith("/chunked-huge/"):
            handler.send_response(200)
            handler.send_header("Transfer-Encoding", "chunked")
            handler.end_headers()
            chunk = b"x" * 65536
            try:
                for _ in range(1000):  # 64 MiB at most, a client must stop long before
                    handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:
                pass
            handler.close_connection = True
            return "200-huge"
        with self.lock:
            self.started.append(time.monotonic())
            retry_after = self.busy.get(path, []).pop(0) if self.busy.get(path) else None
        if retry_after is not None:
            handler.send_response(429)
            handler.send_header("Retry-After", retry_after)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return "429"
        body_type = self.files.get(path)
        if body_type is None:
            handler.send_response(404)
            handler.send_header("Content-Length", "9")
            handler.end_headers()
            handler.wfile.write(b"not found")
            return "404"
        body, content_type, *extra = body_type
        etag = '"' + hashlib.sha1(body).hexdigest() + '"'
        if handler.headers.get("If-None-Match") == etag:
            handler.send_response(304)
            handler.send_header("ETag", etag)
            handler.end_headers()
            return "304"
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("ETag", etag)
        for name, value in (extra[0] if extra else {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)
        return "200"



@pytest.fixture
def server():
    with CollectionServer() as running:
        yield running


def publish_collection(server: CollectionServer, prefix: str, count: int,
                       start: int = 0) -> dict[str, str]:
    """r_N.torrent files plus an index page linking them; returns file name -> infohash."""
    hashes = {}
    for n in range(start, start + count):
        data = v1_torrent(f"book{n}.zip", 1000 + n, seed=n,
                          trackers=[[f"udp://t{n % 3}.example:1337/announce"]])
        server.files[f"{prefix}r_{n}.torrent"] = (data, "application/x-bittorrent")
        hashes[f"r_{n}.torrent"] = lt_hashes(data)[0]
    index_page(server, prefix, [f"r_{n}.torrent" for n in range(start, start + count)])
    return hashes


def index_page(server: CollectionServer, prefix: str, names: list[str]) -> None:
    links = "\n".join(f'<a href="{name}">{name}</a>' for name in names)
    server.files[prefix] = (f"<html><body>{links}</body></html>".encode(), "text/html")


def make_settings(tmp_path: Path, collections: list[dict], **sections) -> tsmd.Settings:
    """Settings for a loopback test: private addresses allowed, short timeouts, per-host pacing
    lifted (unless `sync` sets it)."""
    sections["sync"] = {"per_host_rate": 0, **sections.get("sync", {})}
    document = {"database": "tsmd.sqlite3", "network": {"allow_private": True, "timeout": 2,
                                                        "connect_timeout": 2},
                "collections": collections, **sections}
    return tsmd.settings_from_document(document, tmp_path / "tsmd.toml")


def do_sync(settings: tsmd.Settings, names=(), **kwargs) -> tuple[tsmd.SyncCounts, sqlite3.Connection]:
    db = tsmd.open_database(settings.database)
    chosen = tsmd.select_collections(settings, names)
    counts = run(tsmd.run_sync, db, settings, chosen, tsmd.Reporter(-1), **kwargs)
    return counts, db


def listed(db: sqlite3.Connection, collection: str) -> dict[str, str]:
    return dict(db.execute(
        "SELECT m.file_name, t.infohash FROM memberships m JOIN torrents t ON t.id = m.torrent_id "
        "JOIN collections c ON c.id = m.collection_id WHERE c.name = ? AND m.removed IS NULL",
        (collection,)))


# ---- Fetch policy ----


def test_fetch_limits_and_errors(server):
    server.files["/small"] = (b"hello", "text/plain")
    server.files["/big"] = (b"x" * 5000, "text/plain")
    settings = make_settings(Path("/tmp"), [])

    async def scenario():
        fetcher = tsmd.make_fetcher(settings)
        try:
            ok = await fetcher.fetch(server.url("/small"), max_bytes=100)
            assert (ok.status, ok.body) == (200, b"hello")
            again = await fetcher.fetch(server.url("/small"), max_bytes=100, etag=ok.etag)
            assert again.status == 304 and again.body == b""
            redirected = await fetcher.fetch(server.url("/redirect/%2Fsmall"), max_bytes=100)
            assert redirected.body == b"hello" and redirected.url == server.url("/small")
            expectations = [
                ("/big", "5,000 bytes, over the 1,000-byte limit"), ("/missing", "HTTP 404"),
                ("/loop", "more than 5 redirects"), ("/truncated/x", "broken HTTP response"),
                ("/chunked-huge/x", "more than 1,000,000 bytes"),
                ("/redirect/ftp%3A%2F%2Fx.example%2F", "only http, https and file"),
            ]
            for path, message in expectations:
                limit = 1000 if path in ("/big", "/loop") else 1_000_000
                with pytest.raises(tsmd.FetchError, match=message):
                    await fetcher.fetch(server.url(path), max_bytes=limit)
        finally:
            await fetcher.aclose()

    run(scenario)


def test_fetch_times_out(server):
    server.files["/slow/page"] = (b"late", "text/plain")
    settings = make_settings(Path("/tmp"), [])
    settings = tsmd.dataclasses.replace(
        settings, network=tsmd.dataclasses.replace(settings.network, timeout=0.5))

    async def scenario():
        fetcher = tsmd.make_fetcher(settings)
        started = trio.current_time()
        with pytest.raises(tsmd.FetchError, match="timed out"):
            await fetcher.fetch(server.url("/slow/page"), max_bytes=100)
        assert trio.current_time() - started < 2.9
        await fetcher.aclose()

    run(scenario)


def test_fetch_deadline_covers_a_whole_redirect_chain(server):
    server.slow_seconds = 0.6  # well under the read timeout at each hop
    settings = make_settings(Path("/tmp"), [], network={"timeout": 1.0, "connect_timeout": 1.0,
                                                       "allow_private": True},
                             sync={"max_redirects": 15})

    async def scenario():
        fetcher = tsmd.make_fetcher(settings)
        try:
            assert fetcher.deadline == pytest.approx(5.0)
            done = await fetcher.fetch(server.url("/slow-redirect/3"), max_bytes=100)
            assert done.body == b"done"  # 2.4 s in all
            with pytest.raises(tsmd.FetchError, match="timed out after 5 s"):
                await fetcher.fetch(server.url("/slow-redirect/11"), max_bytes=100)  # 7.2 s
        finally:
            await fetcher.aclose()

    run(scenario)


class ChunkTrickler:
    """An HTTP server on 127.0.0.1:0 that answers one request with a body of `chunks` 1-byte
    chunks, all sent at once."""

    def __init__(self, chunks: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.body = b"1\r\nx\r\n" * chunks + b"0\r\n\r\n"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        connection, _ = self.listener.accept()
        with connection:
            connection.recv(65536)
            try:  # (two sends: no copy of the body while the client's memory is measured)
                connection.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                connection.sendall(self.body)
            except OSError:
                pass  # the client gave up: what it should do

    def stop(self) -> None:
        self.listener.close()
        self.thread.join(timeout=10)


def test_fetch_memory_stays_bounded_under_one_byte_chunks(tmp_path):
    import tracemalloc
    cap = 200_000
    warm_up, trickler = ChunkTrickler(10), ChunkTrickler(2 * cap)
    settings = make_settings(tmp_path, [], network={"allow_private": True})

    async def fetch(server: ChunkTrickler) -> bytes:
        fetcher = tsmd.make_fetcher(settings)
        try:
            return (await fetcher.fetch(f"http://127.0.0.1:{server.port}/x", max_bytes=cap)).body
        finally:
            await fetcher.aclose()

    try:
        assert run(fetch, warm_up) == b"x" * 10  # what is imported on first use is not counted
        tracemalloc.start()
        try:
            with pytest.raises(tsmd.FetchError, match="6,154 bytes in 6,154 pieces, over the"):
                run(fetch, trickler)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    finally:
        warm_up.stop()
        trickler.stop()
    print(f"peak memory of the download: {peak:,} bytes")
    # A list of one bytes object a chunk took 13 MB here, as it went on to 200,000 chunks.
    assert peak < 2 * cap, peak


def test_private_addresses_refused_by_default(server):
    server.files["/index"] = (b"r_1.torrent\n", "text/plain")
    settings = make_settings(Path("/tmp"), [], network={"allow_private": False})

    async def scenario():
        fetcher = tsmd.make_fetcher(settings)
        for url in (server.url("/index"), f"http://localhost:{server.port}/index",
                    f"http://[::1]:{server.port}/index"):
            with pytest.raises(tsmd.FetchError, match="not a public address"):
                await fetcher.fetch(url, max_bytes=100)
        await fetcher.aclose()

    run(scenario)
    assert server.count() == 0  # refused before connecting, not after


def test_redirects_and_dns_answers_into_loopback_are_refused(server):
    """127.0.0.1 plays a public server here; 127.0.0.2 and names resolving to it play the LAN."""
    server.files["/index"] = (b"ok", "text/plain")
    settings = make_settings(Path("/tmp"), [], network={"allow_private": False})

    async def resolve(host, port):
        return {"public.test": ["127.0.0.1"], "rebind.test": ["127.0.0.2"]}.get(host, [host])

    async def scenario():
        fetcher = tsmd.make_fetcher(settings, resolve=resolve,
                                    address_allowed=lambda address: address == "127.0.0.1")
        ok = await fetcher.fetch(f"http://public.test:{server.port}/index", max_bytes=100)
        assert ok.body == b"ok"
        to_lan = urllib.parse.quote(f"http://127.0.0.2:{server.port}/index", safe="")
        with pytest.raises(tsmd.FetchError, match="127.0.0.2.*not a public address"):
            await fetcher.fetch(f"http://public.test:{server.port}/redirect/{to_lan}", max_bytes=100)
        to_name = urllib.parse.quote(f"http://rebind.test:{server.port}/index", safe="")
        with pytest.raises(tsmd.FetchError, match="rebind.test.*not a public address"):
            await fetcher.fetch(f"http://public.test:{server.port}/redirect/{to_name}", max_bytes=100)
        await fetcher.aclose()

    run(scenario)
    assert server.count("/index") == 1


# ---- Storage ----


def test_migrations_create_the_model_and_newer_databases_are_refused(tmp_path):
    path = tmp_path / "t.sqlite3"
    db = tsmd.open_database(path)
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"collections", "torrents", "memberships", "trackers", "torrent_trackers", "runs",
            "tracker_samples", "dht_samples", "dht_nodes"} <= tables
    assert db.execute("PRAGMA user_version").fetchone()[0] == tsmd.SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    db.execute(f"PRAGMA user_version = {tsmd.SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(tsmd.DatabaseError, match="newer than this"):
        tsmd.open_database(path)
    tsmd.open_database(tmp_path / "again.sqlite3").close()
    reopened = tsmd.open_database(tmp_path / "again.sqlite3")  # idempotent
    assert reopened.execute("PRAGMA user_version").fetchone()[0] == tsmd.SCHEMA_VERSION


def test_version_1_database_is_upgraded_with_its_history_summarised(tmp_path):
    """A database from before v2 keeps every sample, and reports read the same numbers from the
    summary tables v2 fills in."""
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(tsmd.MIGRATIONS[0])
    old.execute("PRAGMA user_version = 1")
    now = int(time.time())
    old.executescript(f"""
        INSERT INTO collections (id, name, url, type) VALUES (1, 'c', 'http://x/', 'books');
        INSERT INTO torrents (id, infohash, name, size_bytes, first_seen, updated)
            VALUES (1, '{"ab" * 20}', 'old 1', 100, 1, 1);
        INSERT INTO memberships (collection_id, source, torrent_id, first_seen, last_seen)
            VALUES (1, '{"ab" * 20}', 1, 1, 1);
        INSERT INTO trackers (id, url) VALUES (1, 'udp://a.example:1/announce'),
                                              (2, 'udp://b.example:1/announce');
        INSERT INTO runs (id, stage, started, finished, outcome) VALUES
            (1, 'scrape', {now - 2 * 86400}, {now - 2 * 86400 + 9}, 'ok'),
            (2, 'scrape', {now - 60}, {now - 50}, 'ok'), (3, 'dht', {now - 3000}, {now - 20}, 'ok');
        {INSERT_SAMPLES} (1, 1, 1, {now - 2 * 86400}, 7, 1, 50),
            (1, 2, 1, {now - 2 * 86400}, 2, 1, 60), (1, 1, 2, {now - 60}, 4, 2, 55),
            (1, 2, 2, {now - 60}, 5, 0, 61);
        INSERT INTO dht_samples VALUES (1, 3, {now - 3000}, 3, NULL, NULL, 8),
            (1, 3, {now - 30}, 9, 4.4, 12.6, 8);
        """)
    old.commit()
    old.close()
    db = tsmd.open_database(path)
    assert db.execute("SELECT count(*) FROM tracker_samples").fetchone()[0] == 4
    assert sorted(db.execute("SELECT tracker_id, seeders FROM tracker_latest")) == [(1, 4), (2, 5)]
    # The first thing after the upgrade prunes the samples of two days ago: folded first, their
    # seeders stay in the history.
    pruned = tsmd.prune_database(db, now - 86400, None)
    assert (pruned.tracker_samples, pruned.runs) == (2, 1)
    (row,) = tsmd.load_report_rows(db)
    assert (row.seeders, row.leechers, row.completed, row.tracker) == (
        5, 0, 61, "udp://b.example:1")  # BEP 15 ignores the path: v7 dropped it
    assert (row.dht_peers, row.dht_seeds_estimate, row.dht_peers_estimate) == (9, 4, 13)
    # Per run, the best tracker: 7 seeders two days ago, 5 now.
    assert (row.seeders_change_previous, row.seeders_change_1d) == (-2, -2)
    days = [(now - 2 * 86400) // 86400, (now - 60) // 86400]  # an empty day between, or none
    assert tsmd.load_trends(db) == {"ab" * 20: f"{days[0]};7," + "," * (days[1] - days[0] - 1)
                                    + "5"}
    assert tsmd.summarize_scrape_runs(db) == 0  # folded once


def magnets_from_scratch(db: sqlite3.Connection) -> dict[str, str]:
    """Each torrent's magnet as reports built it before schema v4, from its name and trackers."""
    urls: dict[str, list[str]] = {}
    for infohash, url in db.execute(
            "SELECT t.infohash, tr.url FROM torrents t JOIN torrent_trackers tt ON tt.torrent_id "
            "= t.id JOIN trackers tr ON tr.id = tt.tracker_id ORDER BY t.id, tt.position"):
        urls.setdefault(infohash, []).append(url)
    return {infohash: tsmd.magnet_uri(infohash, name, urls.get(infohash, [])[:10])
            for infohash, name in db.execute("SELECT infohash, name FROM torrents")}


def version_2_database(path: Path) -> sqlite3.Connection:
    old = sqlite3.connect(path)
    old.executescript(tsmd.MIGRATIONS[0])
    old.executescript(tsmd.MIGRATIONS[1])
    old.execute("PRAGMA user_version = 2")
    trackers = [f"udp://t{n}.example:{n + 1}/announce" for n in range(12)]
    old.executemany("INSERT INTO trackers (id, url) VALUES (?, ?)", enumerate(trackers, 1))
    old.executescript(f"""
        INSERT INTO collections (id, name, url, type) VALUES (1, 'c', 'http://x/', 'books');
        INSERT INTO torrents (id, infohash, name, size_bytes, first_seen, updated) VALUES
            (1, '{"ab" * 20}', 'old 1', 100, 1, 1),
            (2, '{"cd" * 20}', '</script><b>"x" \\ & é 2' || char(8232), 200, 1, 1),
            (3, '{"ef" * 20}', NULL, NULL, 1, 1);
        INSERT INTO memberships (collection_id, source, torrent_id, file_name, first_seen,
                                 last_seen) VALUES
            (1, 'http://x/r_1.torrent', 1, 'r_1.torrent', 1, 1),
            (1, '{"cd" * 20}', 2, NULL, 1, 1), (1, '{"ef" * 20}', 3, NULL, 1, 1);
        """)
    # Torrent 1 lists all twelve trackers, in an order of its own; torrent 3 lists one.
    old.executemany("INSERT INTO torrent_trackers VALUES (1, ?, 0, ?)",
                    [(tracker_id, (tracker_id * 5) % 12) for tracker_id in range(1, 13)])
    old.execute("INSERT INTO torrent_trackers VALUES (3, 12, 0, 0)")
    old.commit()
    return old


def test_version_2_database_gets_each_torrents_magnet_stored(tmp_path):
    path = tmp_path / "v2.sqlite3"
    version_2_database(path).close()
    db = tsmd.open_database(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == tsmd.SCHEMA_VERSION
    stored = dict(db.execute("SELECT infohash, magnet FROM torrents"))
    assert stored == magnets_from_scratch(db)
    in_order = [f"udp://t{n}.example:{n + 1}" for n in range(12)]  # v7 dropped UDP paths
    in_order = [in_order[tracker_id - 1] for tracker_id in
                sorted(range(1, 13), key=lambda tracker_id: (tracker_id * 5) % 12)]
    assert stored["ab" * 20] == (f"magnet:?xt=urn:btih:{'ab' * 20}&dn=old%201"
                                 + "".join(f"&tr={url}" for url in in_order[:10]))
    assert stored["cd" * 20] == (f"magnet:?xt=urn:btih:{'cd' * 20}&dn=%3C%2Fscript%3E%3Cb%3E"
                                 "%22x%22%20%5C%20%26%20%C3%A9%202%E2%80%A8")
    assert stored["ef" * 20] == f"magnet:?xt=urn:btih:{'ef' * 20}&tr=udp://t11.example:12"
    rows = {row.infohash: row for row in tsmd.load_report_rows(db)}
    assert {infohash: row.magnet for infohash, row in rows.items()} == stored
    assert rows["cd" * 20].link == stored["cd" * 20]  # listed by infohash: the magnet is the link
    # (split on newlines alone: a name holds U+2028, which splitlines() also splits on)
    feed = [json.loads(line) for line in tsmd.render_ndjson(list(rows.values())).split("\n")[:-1]]
    assert {item["infohash"]: item["magnet"] for item in feed} == stored
    assert_seedtools_valid(json.loads(tsmd.render_json(list(rows.values()))))
    # The hostile name reaches the page as escaped JSON, in its magnet too, and as escaped
    # text in the <noscript> table (where U+2028 is a character like any other).
    page = tsmd.render_html(list(rows.values()))
    assert "</script><b>" not in page and "&lt;/script&gt;&lt;b&gt;" in page
    assert "\u2028" not in page[page.index('<script type="application/json"'):]
    assert "\\u003c/script\\u003e\\u003cb\\u003e" in page and "%3C%2Fscript%3E%3Cb%3E" in page
    assert tsmd.fill_magnets(db) == 0  # every one stored once


def database_at_version(path: Path, version: int) -> sqlite3.Connection:
    """A database as tsmd left it at schema `version` (its user_version still to be set)."""
    db = sqlite3.connect(path)
    for number, migration in enumerate(tsmd.MIGRATIONS[:version]):
        db.executescript(migration)
        if number in tsmd.MIGRATION_FILLS:
            tsmd.MIGRATION_FILLS[number](db)
    return db


def test_trackers_that_differ_only_by_a_udp_path_are_merged_with_their_history(tmp_path):
    path = tmp_path / "v6.sqlite3"
    db = database_at_version(path, 6)
    first, second = "aa" * 20, "bb" * 20
    # As a database before v7 held them: the same UDP tracker twice; two HTTP passkeys.
    db.executescript(f"""
        INSERT INTO trackers (id, url, successes, failures, hashes_answered, last_attempt,
                              last_success, consecutive_failures, next_attempt) VALUES
            (1, 'udp://t.example:1337/announce', 5, 1, 50, 100, 100, 0, NULL),
            (2, 'udp://t.example:1337', 2, 3, 20, 200, 50, 2, 9999),
            (3, 'http://h.example/announce?passkey=a', 0, 0, 0, NULL, NULL, 0, NULL),
            (4, 'http://h.example/announce?passkey=b', 0, 0, 0, NULL, NULL, 0, NULL);
        INSERT INTO torrents (id, infohash, name, first_seen, updated) VALUES
            (1, '{first}', 'one', 1, 1), (2, '{second}', 'two', 1, 1),
            (3, '{"cc" * 20}', 'three', 1, 1);
        INSERT INTO torrent_trackers VALUES (1, 1, 0, 0), (1, 2, 1, 1), (1, 3, 2, 2),
                                            (2, 2, 0, 0), (3, 4, 0, 0), (3, 1, 3, 3),
                                            (3, 2, 1, 1);
        INSERT INTO tracker_samples (torrent_id, tracker_id, measured, seeders, leechers,
                                     completed) VALUES
            (1, 1, 100, 5, 1, 9), (1, 2, 200, 7, 2, 10), (2, 2, 150, 3, 0, 4),
            (2, 2, 120, 1, 0, 1);
        PRAGMA user_version = 6;
        """)
    db.close()
    db = tsmd.open_database(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == tsmd.SCHEMA_VERSION
    assert db.execute("SELECT id, url, successes, failures, hashes_answered, last_attempt, "
                      "last_success, consecutive_failures, next_attempt FROM trackers "
                      "ORDER BY id").fetchall() == [
        # Counts added; the state of the row asked last (its two failures and its back-off).
        (1, "udp://t.example:1337", 7, 4, 70, 200, 100, 2, 9999),
        (3, "http://h.example/announce?passkey=a", 0, 0, 0, None, None, 0, None),
        (4, "http://h.example/announce?passkey=b", 0, 0, 0, None, None, 0, None)]
    # Linked once, at the better place of the two (torrent 3 listed the path-less URL first).
    assert db.execute("SELECT torrent_id, tracker_id, tier, position FROM torrent_trackers "
                      "ORDER BY torrent_id, position").fetchall() == [
        (1, 1, 0, 0), (1, 3, 2, 2), (2, 1, 0, 0), (3, 4, 0, 0), (3, 1, 1, 1)]
    assert db.execute("SELECT count(*) FROM tracker_samples WHERE tracker_id = 1"
                      ).fetchone()[0] == 4  # every sample kept
    assert db.execute("SELECT torrent_id, measured, seeders FROM tracker_latest "
                      "ORDER BY torrent_id").fetchall() == [(1, 200, 7), (2, 150, 3)]
    magnets = dict(db.execute("SELECT infohash, magnet FROM torrents"))
    assert magnets == magnets_from_scratch(db)
    assert magnets[first].count("udp://t.example:1337") == 1


def test_version_9_reads_web_seeded_torrents_again_for_their_first_piece(tmp_path):
    """A web seed is checked against piece 0's hash, which only the .torrent gives: the
    upgrade forgets the validators of web-seeded torrents' listings, so that the next sync
    reads their .torrent files again; the others' stay (peers give their piece count)."""
    path = tmp_path / "v8.sqlite3"
    db = database_at_version(path, 8)
    db.executescript(f"""
        INSERT INTO collections (id, name, url, type) VALUES (1, 'c', 'http://x/', 'books');
        INSERT INTO torrents (id, infohash, name, has_metainfo, first_seen, updated) VALUES
            (1, '{"aa" * 20}', 'seeded', 1, 1, 1), (2, '{"bb" * 20}', 'plain', 1, 1, 1);
        INSERT INTO web_seeds VALUES (1, 'http://h.example/files/', 'url-list');
        INSERT INTO memberships (collection_id, source, torrent_id, first_seen, last_seen,
                                 etag, last_modified, validated) VALUES
            (1, 'http://x/1.torrent', 1, 1, 1, '"e1"', 'Mon', 5),
            (1, 'http://x/2.torrent', 2, 1, 1, '"e2"', 'Tue', 6);
        PRAGMA user_version = 8;
        """)
    db.close()
    db = tsmd.open_database(path)
    assert db.execute("SELECT torrent_id, etag, last_modified, validated FROM memberships "
                      "ORDER BY torrent_id").fetchall() == [
        (1, None, None, None), (2, '"e2"', "Tue", 6)]
    assert db.execute("SELECT piece_count, probe_attempted FROM torrents").fetchall() == [
        (None, None), (None, None)]


def test_a_failed_migration_leaves_the_database_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "v2.sqlite3"
    version_2_database(path).close()

    def broken(db):
        tsmd.fill_magnets(db)
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setitem(tsmd.MIGRATION_FILLS, 3, broken)
    with pytest.raises(tsmd.DatabaseError, match="disk I/O error"):
        tsmd.open_database(path)
    old = sqlite3.connect(path)
    # Version 3 (silent DHT addresses) committed on its own; version 4 left no trace.
    assert old.execute("PRAGMA user_version").fetchone()[0] == 3
    assert "magnet" not in {row[1] for row in old.execute("PRAGMA table_info(torrents)")}
    assert old.execute("SELECT count(*) FROM dht_silent_nodes").fetchone()[0] == 0
    old.close()
    monkeypatch.undo()
    db = tsmd.open_database(path)
    assert dict(db.execute("SELECT infohash, magnet FROM torrents")) == magnets_from_scratch(db)


def test_a_torrent_whose_name_or_trackers_change_gets_a_new_magnet(tmp_path):
    db, hashes = torrent_db(tmp_path, 2, ["udp://a.example:1"])
    first = hashes[0].hex()

    def published(stored: bool = True) -> dict[str, str]:
        rows = {row.infohash: row.magnet for row in tsmd.load_report_rows(db)}
        assert rows == magnets_from_scratch(db)
        if stored:  # by upsert_torrent, which sync writes with
            assert rows == dict(db.execute("SELECT infohash, magnet FROM torrents"))
        return rows

    assert published()[first] == f"magnet:?xt=urn:btih:{first}&dn=t0&tr=udp://a.example:1"
    # Its .torrent file arrives: its name and its tracker list replace the magnet's.
    meta = tsmd.Metainfo(first, None, "book 0", 10, 1, 16384, 1, None, None,
                         (tsmd.Tracker("udp://b.example:2", 0),
                          tsmd.Tracker("http://c.example/announce", 1)), True)
    with tsmd.Transaction(db):
        tsmd.upsert_torrent(db, meta, 2)
    assert published()[first] == (f"magnet:?xt=urn:btih:{first}&dn=book%200"
                                   "&tr=udp://b.example:2&tr=http://c.example/announce")
    # A magnet link for it adds a tracker, and leaves the name.
    with tsmd.Transaction(db):
        tsmd.upsert_torrent(db, tsmd.decode_magnet_untrusted(tsmd.magnet_uri(
            first, "other", ["udp://b.example:2", "udp://d.example:4"])), 3)
    assert published()[first].startswith(f"magnet:?xt=urn:btih:{first}&dn=book%200&tr=")
    assert "udp://d.example:4" in published()[first]
    # Changes by other hands than sync's clear the stored magnet; reports compute it meanwhile,
    # and fill_magnets stores it again.
    for change, torrent in [
            ("UPDATE torrent_trackers SET position = 9 WHERE position = 0 AND torrent_id = "
             "(SELECT id FROM torrents WHERE infohash = ?)", first),
            ("UPDATE trackers SET url = 'udp://e.example:5' "
             "WHERE url = 'udp://b.example:2' AND ? IS NOT NULL", first),
            ("DELETE FROM trackers WHERE url = 'udp://a.example:1' AND ? IS NOT NULL",
             hashes[1].hex()),
            ("UPDATE torrents SET name = 'renamed 1' WHERE infohash = ?", first)]:
        before = published()
        with tsmd.Transaction(db):
            db.execute(change, (torrent,))
        after = published(stored=False)
        assert [infohash for infohash in after if after[infohash] != before[infohash]] == [torrent]
        with tsmd.Transaction(db):
            assert tsmd.fill_magnets(db) == 1
    assert published()[first] == (f"magnet:?xt=urn:btih:{first}&dn=renamed%201&tr=http://c.example"
                                  "/announce&tr=udp://d.example:4&tr=udp://e.example:5")
    # Nothing else touches the magnets: unchanged upserts, sizes.
    with tsmd.Transaction(db):
        tsmd.upsert_torrent(db, tsmd.Metainfo.bare(first), 4)
        db.execute("UPDATE torrents SET size_bytes = 5")
        assert tsmd.fill_magnets(db) == 0
    assert dict(db.execute("SELECT infohash, magnet FROM torrents")) == magnets_from_scratch(db)


def test_magnet_does_not_overwrite_metainfo(tmp_path):
    db = tsmd.open_database(tmp_path / "t.sqlite3")
    full = tsmd.decode_metainfo_untrusted(v1_torrent("real.bin", 777))
    magnet = tsmd.decode_magnet_untrusted(tsmd.magnet_uri(full.infohash, "wrong name"))
    with tsmd.Transaction(db):
        first = tsmd.upsert_torrent(db, full, 1)
        second = tsmd.upsert_torrent(db, magnet, 2)
    assert first == second
    assert db.execute("SELECT name, size_bytes, has_metainfo FROM torrents").fetchone() == (
        "real.bin", 777, 1)


# ---- Configuration ----


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tsmd.toml"
    path.write_text(text)
    return path


def test_config_defaults_and_relative_paths(tmp_path):
    (tmp_path / "local").mkdir()
    path = write_config(tmp_path, """
database = "data/db.sqlite3"
[network]
timeout = "1m"
[sync]
max_torrent_bytes = "2MiB"
revalidate_after = "1d"
[[collections]]
name = "local"
url = "local"
type = "books"
trackers = ["udp://t.example:1337/announce"]
[[collections]]
name = "web"
url = "https://archive.example/torrents/"
type = "scimag"
enabled = false
required_substring = "sm_"
""")
    settings = tsmd.load_settings(path)
    assert settings.database == tmp_path / "data" / "db.sqlite3"
    assert settings.network.timeout == 60 and not settings.network.allow_private
    assert settings.sync.max_torrent_bytes == 2 * 1024 * 1024
    assert settings.sync.revalidate_after == 86400
    assert settings.collections[0].url == (tmp_path / "local").as_uri()
    assert settings.collections[1].required_substring == "sm_"
    assert [c.name for c in tsmd.select_collections(settings, [])] == ["local"]
    assert [c.name for c in tsmd.select_collections(settings, ["web"])] == ["web"]
    with pytest.raises(tsmd.ConfigError, match="no collection named 'nope'"):
        tsmd.select_collections(settings, ["nope"])
    assert tsmd.load_settings(path, Path("/x/y.db")).database == Path("/x/y.db")


@pytest.mark.parametrize("text,message", [
    ("colections = []", "unknown key 'colections'"),
    ("[network]\nallow_private = 'yes'", r"\[network\]\.allow_private: expected true or false"),
    ("[network]\ntimeout = 'soon'", r"\[network\]\.timeout: 'soon' is not a duration"),
    ("[network]\nproxy = 'socks5://x'", "proxy"),
    ("[sync]\nconcurrency = -1", "non-negative"),
    ("[network]\ntimeout = 0", "longer than 0 s"),
    ("[network]\ntimeout = nan", "not a duration"),
    ("[dht]\nrate = inf", "finite"),
    ("[dht]\nbootstrap = ['no-port']", "no port"),
    ("[dht]\nbind = 'localhost:6881'", r"\[dht\]\.bind: 'localhost' is not an IP address"),
    ("[scrape]\nbind = '[::1]:99999'", r"\[scrape\]\.bind: .* no valid port"),
    ("[scrape]\nbatch_size = 300", "at most 255"),
    ("[sync]\nconcurrency = 0", "at least 1"),
    ("[sync]\nbogus = 1", r"\[sync\]: unknown key 'bogus'"),
    ("[[collections]]\nname = 'a'\nurl = 'http://x/'", "#1: missing required key 'type'"),
    ("[[collections]]\nname = 'a'\nurl = 'http://x/'\ntype = 'books'\n"
     "[[collections]]\nname = 'a'\nurl = 'http://y/'\ntype = 'books'", "#2.name: duplicate"),
    ("[[collections]]\nname = 'a'\nurl = 'ftp://x/'\ntype = 'books'", "url: expected an http"),
    ("[[collections]]\nname = 'a'\nurl = 'http://x/'\ntype = 'books'\ntrackers = ['nope']",
     "trackers: not a udp"),
    ("[[collections]]\nname = 'a'\nurl = 'http://x/'\ntype = 'books'\nenabled = 1", "enabled"),
    ("database = 5", "database"),
    ("this is = not toml", "invalid TOML"),
])
def test_config_errors_name_file_key_and_expectation(tmp_path, text, message):
    path = write_config(tmp_path, text)
    with pytest.raises(tsmd.ConfigError, match=message) as caught:
        tsmd.load_settings(path)
    assert str(path) in str(caught.value)


def test_durations_and_sizes():
    assert tsmd.parse_duration("90") == 90 and tsmd.parse_duration("1.5h") == 5400
    assert tsmd.parse_duration("2w") == 1_209_600
    assert tsmd.parse_size("2TB") == 2 * 10**12 and tsmd.parse_size("1GiB") == 2**30
    assert tsmd.parse_size("512") == 512 and tsmd.parse_size("1.5 kB") == 1500
    for bad in ("-1", "soon", "5 parsecs"):
        with pytest.raises(ValueError):
            tsmd.parse_size(bad) if "parsec" in bad else tsmd.parse_duration(bad)
    with pytest.raises(ValueError, match="too large"):  # not an OverflowError's traceback
        tsmd.parse_size("9" * 400 + "TB")


# ---- Sync ----


def test_first_sync_then_incremental_resync_costs_one_request(server, tmp_path):
    hashes = publish_collection(server, "/books/", 30)
    settings = make_settings(tmp_path, [{"name": "books", "url": server.url("/books/"),
                                         "type": "books"}])
    counts, db = do_sync(settings)
    assert (counts.new, counts.failed, counts.downloads, counts.pages) == (30, 0, 30, 1)
    assert listed(db, "books") == hashes
    assert server.count() == 31
    trackers = db.execute("SELECT count(*) FROM trackers").fetchone()[0]
    assert trackers == 3

    before = server.count()
    counts, db = do_sync(settings)
    assert (counts.new, counts.unchanged, counts.downloads) == (0, 30, 0)
    assert server.count() - before == 1  # only the index page, answered 304
    assert server.requests[-1] == ["/books/", "304"]

    # --revalidate: one conditional request per torrent, all 304, still zero downloads.
    before = server.count()
    counts, db = do_sync(settings, revalidate=True)
    assert (counts.unchanged, counts.downloads) == (30, 0)
    assert server.count() - before == 31
    assert all(status == "304" for _, status in server.requests[-31:])


def test_sync_detects_new_changed_and_removed_and_keeps_history(server, tmp_path):
    hashes = publish_collection(server, "/c/", 5)
    settings = make_settings(tmp_path, [{"name": "c", "url": server.url("/c/"), "type": "fiction"}],
                             sync={"revalidate_after": 0})
    counts, db = do_sync(settings)
    assert counts.new == 5
    removed_hash = hashes["r_4.torrent"]
    # r_0 is rebuilt with other content, r_4 leaves the index, r_5 joins it.
    server.files["/c/r_0.torrent"] = (v1_torrent("book0-fixed.zip", 5, seed=99), "")
    server.files["/c/r_5.torrent"] = (v1_torrent("book5.zip", 5, seed=5), "")
    index_page(server, "/c/", ["r_0.torrent", "r_1.torrent", "r_2.torrent", "r_3.torrent",
                               "r_5.torrent"])
    # One of five gone is over the default max_removed (10 %): refused, nothing removed,
    # the rest of the sync done; accepted for one run, it goes through.
    counts, db = do_sync(settings)
    assert (counts.new, counts.changed, counts.unchanged, counts.removed, counts.failed
            ) == (1, 1, 3, 0, 1)
    assert "r_4.torrent" in listed(db, "c")
    counts, db = do_sync(settings, accept_removals=True)
    assert (counts.new, counts.changed, counts.unchanged, counts.removed) == (0, 0, 5, 1)
    now_listed = listed(db, "c")
    assert "r_4.torrent" not in now_listed and now_listed["r_0.torrent"] != hashes["r_0.torrent"]
    removed = db.execute("SELECT m.removed FROM memberships m JOIN torrents t ON t.id = "
                         "m.torrent_id WHERE t.infohash = ?", (removed_hash,)).fetchone()
    assert removed[0] is not None  # kept, marked removed
    report = tsmd.load_report_rows(db)
    assert removed_hash not in {row.infohash for row in report}
    # It comes back: listed again, counted as new, not removed any more.
    index_page(server, "/c/", ["r_0.torrent", "r_1.torrent", "r_2.torrent", "r_3.torrent",
                               "r_4.torrent", "r_5.torrent"])
    counts, db = do_sync(settings)
    assert counts.new == 1 and listed(db, "c")["r_4.torrent"] == removed_hash


def test_resync_of_a_torrent_with_new_trackers_publishes_its_new_magnet(server, tmp_path):
    publish_collection(server, "/c/", 2)
    settings = make_settings(tmp_path, [{"name": "c", "url": server.url("/c/"), "type": "books"}],
                             sync={"revalidate_after": 0})
    _, db = do_sync(settings)
    # Same info dictionary, so the same infohash; other trackers around it.
    moved = v1_torrent("book0.zip", 1000, seed=0, trackers=[["udp://new.example:6969/announce"],
                                                            ["http://other.example/announce"]])
    server.files["/c/r_0.torrent"] = (moved, "application/x-bittorrent")
    counts, db = do_sync(settings)
    assert counts.failed == 0
    row = next(row for row in tsmd.load_report_rows(db) if row.name == "r_0.torrent")
    assert row.infohash == lt_hashes(moved)[0]
    assert row.magnet == (f"magnet:?xt=urn:btih:{row.infohash}&dn=book0.zip"
                          "&tr=udp://new.example:6969&tr=http://other.example/announce")
    assert dict(db.execute("SELECT infohash, magnet FROM torrents")) == magnets_from_scratch(db)


def test_partial_failures_fail_only_their_item(server, tmp_path):
    publish_collection(server, "/mixed/", 3)
    server.files["/mixed/nested.torrent"] = (b"d4:info" + b"l" * 60_000 + b"e" * 60_000 + b"e", "")
    server.files["/mixed/garbage.torrent"] = (b"<html>not a torrent</html>", "")
    server.files["/mixed/huge.torrent"] = (b"d" + b"0" * 3_000_000, "")
    index_page(server, "/mixed/", ["r_0.torrent", "r_1.torrent", "r_2.torrent", "missing.torrent",
                                   "nested.torrent", "garbage.torrent", "huge.torrent",
                                   "/truncated/t.torrent", "/slow/s.torrent"])
    settings = make_settings(tmp_path, [{"name": "mixed", "url": server.url("/mixed/"),
                                         "type": "books"},
                                        {"name": "dead", "url": server.url("/nowhere/"),
                                         "type": "books"}],
                             sync={"max_torrent_bytes": "1MB"},
                             network={"allow_private": True, "timeout": 1})
    reporter = tsmd.Reporter(-1)
    messages = []
    reporter.problem = messages.append
    db = tsmd.open_database(settings.database)
    counts = run(tsmd.run_sync, db, settings, settings.collections, reporter)
    assert (counts.new, counts.failed) == (3, 7)
    text = "\n".join(messages)
    for expected in ("missing.torrent: HTTP 404", "nested.torrent: not a valid .torrent: bencode "
                     "nested deeper", "garbage.torrent: not a valid .torrent",
                     "huge.torrent: 3,000,001 bytes, over the 1,000,000-byte limit",
                     "t.torrent: broken HTTP response", "s.torrent: timed out",
                     "collection 'dead':", "HTTP 404"):
        assert expected in text
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    errors = db.execute("SELECT count(*) FROM memberships WHERE last_error IS NOT NULL").fetchone()
    assert errors[0] == 6
    # A failed index keeps the collection as it was: nothing is marked removed.
    publish_collection(server, "/nowhere/", 2)
    run(tsmd.run_sync, db, settings, settings.collections[1:], tsmd.Reporter(-1))
    del server.files["/nowhere/"]
    counts = run(tsmd.run_sync, db, settings, settings.collections[1:], tsmd.Reporter(-1))
    assert counts.removed == 0 and counts.failed == 1
    assert len(listed(db, "dead")) == 2


def test_direct_torrent_url_magnets_infohash_lists_and_local_sources(server, tmp_path):
    single = v1_torrent("direct.bin", 42, seed=7)
    server.files["/one.torrent"] = (single, "application/x-bittorrent")
    hexes = ["1" * 40, "2" * 40]
    server.files["/list.txt"] = ((f"magnet:?xt=urn:btih:{hexes[0]}&dn=Mag%201\n{hexes[1]}\n"
                                  "/one.torrent\n").encode(), "text/plain")
    server.files["/feed.json"] = (json.dumps([{"link": "/one.torrent"}, hexes[1]]).encode(),
                                  "application/json")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "r_9.torrent").write_bytes(v1_torrent("local9.bin", 9, seed=9))
    (folder / "notes.txt").write_text("ignored")
    listfile = tmp_path / "mine.txt"
    listfile.write_text(f"{(folder / 'r_9.torrent').as_uri()}\n{hexes[0]}\n")
    settings = make_settings(tmp_path, [
        {"name": "direct", "url": server.url("/one.torrent"), "type": "books"},
        {"name": "list", "url": server.url("/list.txt"), "type": "books"},
        {"name": "feed", "url": server.url("/feed.json"), "type": "books"},
        {"name": "folder", "url": "folder", "type": "scimag"},
        {"name": "listfile", "url": "mine.txt", "type": "scimag"},
    ])
    counts, db = do_sync(settings)
    assert counts.failed == 0
    assert server.count("/one.torrent") == 3  # the direct URL is fetched once, not twice
    single_hash = lt_hashes(single)[0]
    assert set(listed(db, "direct").values()) == {single_hash}
    assert set(listed(db, "list").values()) == {single_hash, *hexes}
    assert set(listed(db, "feed").values()) == {single_hash, hexes[1]}
    local_hash = lt_hashes((folder / "r_9.torrent").read_bytes())[0]
    assert listed(db, "folder") == {"r_9.torrent": local_hash}
    assert set(listed(db, "listfile").values()) == {local_hash, hexes[0]}
    name = db.execute("SELECT name FROM torrents WHERE infohash = ?", (hexes[0],)).fetchone()[0]
    assert name == "Mag 1"
    # Re-sync: the unchanged local folder and list cost nothing, and nothing changes.
    counts, db = do_sync(settings)
    assert (counts.new, counts.changed, counts.removed, counts.failed) == (0, 0, 0, 0)


def test_sync_interrupted_commits_what_it_has(server, tmp_path):
    publish_collection(server, "/big/", 40)
    index_page(server, "/big/", [f"r_{n}.torrent" for n in range(40)] + ["/slow/x.torrent"])
    settings = make_settings(tmp_path, [{"name": "big", "url": server.url("/big/"),
                                         "type": "books"}], sync={"concurrency": 2})
    db = tsmd.open_database(settings.database)

    async def interrupted():
        with trio.move_on_after(1.5):
            await tsmd.run_sync(db, settings, settings.collections, tsmd.Reporter(-1))

    run(interrupted)
    assert len(listed(db, "big")) == 40
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_sync_bounds_the_trackers_of_a_torrent_and_of_a_run(tmp_path):
    def sync(name: str, torrents: dict[str, bytes], **limits) -> tuple[sqlite3.Connection, Any]:
        folder = tmp_path / name
        folder.mkdir()
        for file_name, data in torrents.items():
            (folder / file_name).write_bytes(data)
        settings = make_settings(tmp_path / name, [{"name": "c", "url": folder.as_uri() + "/",
                                                    "type": "books"}], sync=limits)
        db = tsmd.open_database(settings.database)
        counts = run(tsmd.run_sync, db, settings, settings.collections, tsmd.Reporter(-1))
        assert (counts.new, counts.failed) == (len(torrents), 0)
        return db, counts

    many = [[f"udp://t{n}.example:1/announce"] for n in range(100_000)]  # 3.6 MB
    db, counts = sync("one", {"r_0.torrent": v1_torrent("many", trackers=many)})
    # The first 100 in tier order; 99,000 were never read, 900 read and left out.
    assert [url for (url,) in db.execute(
        "SELECT r.url FROM torrent_trackers l JOIN trackers r ON r.id = l.tracker_id "
        "ORDER BY l.position")] == [f"udp://t{n}.example:1" for n in range(100)]
    assert counts.trackers_ignored == 99_900 and "trackers left out" in counts.summary()
    # Three torrents of 60 trackers each, 140 new ones allowed in the run: 40 left out.
    db, counts = sync("run", {f"r_{n}.torrent": v1_torrent(f"t{n}", seed=n, trackers=[
        [f"udp://s{n}-{k}.example:1/announce"] for k in range(60)]) for n in range(3)},
        max_new_trackers=140)
    assert db.execute("SELECT count(*) FROM trackers").fetchone()[0] == 140
    assert db.execute("SELECT count(*) FROM torrent_trackers").fetchone()[0] == 140
    assert counts.trackers_ignored == 40
    short = db.execute("SELECT count(*) FROM memberships WHERE validated IS NULL").fetchone()[0]
    assert short == 1  # the torrent that lost trackers to the budget
    # The next sync reads that one again, with a new budget, and completes its trackers.
    settings = make_settings(tmp_path / "run", [{"name": "c", "url": (
        tmp_path / "run").as_uri() + "/", "type": "books"}], sync={"max_new_trackers": 140})
    counts = run(tsmd.run_sync, db, settings, settings.collections, tsmd.Reporter(-1))
    assert counts.trackers_ignored == 0 and counts.unchanged == 3
    assert db.execute("SELECT count(*) FROM torrent_trackers").fetchone()[0] == 180
    # A magnet's trackers add up over listings, each after those the torrent has; the bound
    # holds for the sum.
    limits = tsmd.TrackerLimits(per_torrent=5, new_left=100)
    with tsmd.Transaction(db):
        for listing in range(3):
            tsmd.upsert_torrent(db, tsmd.decode_magnet_untrusted(tsmd.magnet_uri("ab" * 20, "m", [
                f"udp://m{listing}-{k}.example:1/a" for k in range(4)])), 1, limits)
    assert db.execute(
        "SELECT r.url, l.tier, l.position FROM torrent_trackers l JOIN trackers r ON "
        "r.id = l.tracker_id JOIN torrents t ON t.id = l.torrent_id WHERE t.infohash = ? "
        "ORDER BY l.position", ("ab" * 20,)).fetchall() == [
        *[(f"udp://m0-{k}.example:1", k, k) for k in range(4)], ("udp://m1-0.example:1", 4, 4)]
    assert limits.ignored == 3 * 4 - 5


def test_names_that_are_not_utf8_and_lone_surrogates_store_one_item_each(server, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    odd = folder / os.fsdecode(b"r_\xff\xfe.torrent")  # a Latin-1 name on a UTF-8 system
    odd.write_bytes(v1_torrent("odd", seed=1))
    (folder / "r_ok.torrent").write_bytes(v1_torrent("ok", seed=2))
    infohash = "ab" * 20
    server.files["/list.json"] = (
        b'[{"name": "r_\\ud800.torrent", "link": "/t/r_\\udfff.torrent"}, '
        b'"magnet:?xt=urn:btih:' + infohash.encode() + b'&dn=name\\ud800", "' + b"cd" * 20 + b'"]',
        "application/json")
    server.files["/t/r_\ufffd.torrent"] = (v1_torrent("json", seed=3), "application/x-bittorrent")
    settings = make_settings(tmp_path, [
        {"name": "folder", "url": folder.as_uri() + "/", "type": "books"},
        {"name": "json", "url": server.url("/list.json"), "type": "books"}])
    db = tsmd.open_database(settings.database)
    counts = run(tsmd.run_sync, db, settings, settings.collections, tsmd.Reporter(-1))
    assert (counts.new, counts.failed) == (5, 0)
    stored = dict(db.execute("SELECT m.file_name, t.infohash FROM memberships m "
                             "JOIN torrents t ON t.id = m.torrent_id"))
    # The file that is not UTF-8 was read by its real name, and is listed by a readable one.
    assert stored["r_\ufffd\ufffd.torrent"] == lt_hashes(v1_torrent("odd", seed=1))[0]
    assert stored["r_\ufffd.torrent"] == lt_hashes(v1_torrent("json", seed=3))[0]
    names = dict(db.execute("SELECT infohash, name FROM torrents"))
    assert names[infohash] == "name\ufffd"
    report = cli("--config", str(write_config(tmp_path, f'database = "{settings.database}"\n')),
                 "report", "--format", "ndjson")
    assert report.returncode == 0, report.stderr
    assert f"name\ufffd 0x{infohash}" in {json.loads(line)["name"]
                                          for line in report.stdout.splitlines()}


# ---- Reports ----

SEEDTOOLS_FIELDS = {"name": str, "link": str, "infohash": str, "created_unix": int,
                    "scraped_date": int, "seeders": int, "leechers": int, "size_bytes": int,
                    "type": str, "dht_peers": int, "dht_scraped": int}


@functools.cache
def seedtools_models() -> tuple:
    """libgen-seedtools' own model of a feed item, TorrentFileData in libgen_seedtools/
    schemas.py, its fields copied as they are (seedtools is not on PyPI): as release 0.4.0 runs
    it, under pydantic 1 (pydantic 2's `pydantic.v1` is pydantic 1.10), and as a port to
    pydantic 2 runs it, where `Union[str, None]` without a default is required."""
    try:
        import pydantic
        import pydantic.v1
    except ImportError:
        cannot_test("pydantic is missing: pip install -e '.[test]' installs it")
    models = []
    for base in (pydantic.v1.BaseModel, pydantic.BaseModel):
        class TorrentFileData(base):  # type: ignore[misc, valid-type]
            name: str
            link: str
            infohash: str
            created_unix: int
            scraped_date: int
            dht_scraped: int
            dht_peers: int
            seeders: int
            leechers: int
            size_bytes: int
            type: str
            ipfs_cid: Union[str, None]
            path: Union[str, None]
        models.append(TorrentFileData)
    return tuple(models)


def assert_seedtools_valid(feed) -> None:
    """Every item passes seedtools' own model under pydantic 1 and 2, and the rules it leaves
    to its code: integers (never null, never a bool), a name with a digit, a lower-case hex
    infohash, and a link it can fetch (see shared/FORMATS.md)."""
    assert isinstance(feed, list)
    for model in seedtools_models():
        for item in feed:
            model(**item)
    for item in feed:
        assert item["link"].startswith(("http://", "https://")), item
        for key, kind in SEEDTOOLS_FIELDS.items():
            assert isinstance(item[key], kind) and not isinstance(item[key], bool), (key, item)
        assert len(item["infohash"]) == 40 and item["infohash"] == item["infohash"].lower()
        int(item["infohash"], 16)
        assert any(ch.isdigit() for ch in item["name"])


# ---- Listings as the real world publishes them (issue 13) ----


def torrents_for(server: CollectionServer, prefix: str, count: int) -> list[tuple[str, str, int]]:
    """`count` .torrent files served under `prefix`: (file name, infohash, size) of each."""
    made = []
    for n in range(count):
        data = v1_torrent(f"item{n}.bin", 5000 + n, seed=1000 + n)
        server.files[f"{prefix}t_{n}.torrent"] = (data, "application/x-bittorrent")
        made.append((f"t_{n}.torrent", lt_hashes(data)[0], 5000 + n))
    return made


def sizes_listed(db: sqlite3.Connection, collection: str) -> dict[str, int | None]:
    return dict(db.execute(
        "SELECT t.infohash, t.size_bytes FROM memberships m JOIN torrents t ON t.id = m.torrent_id "
        "JOIN collections c ON c.id = m.collection_id WHERE c.name = ? AND m.removed IS NULL",
        (collection,)))


def test_rss_atom_json_csv_and_gzip_listings_sync_exact_hashes_and_sizes(server, tmp_path):
    made = torrents_for(server, "/f/", 4)
    (n0, h0, s0), (n1, h1, s1), (n2, h2, s2), (n3, h3, s3) = made
    missing = "ab" * 20  # listed, but its .torrent is gone: kept by the listing's facts
    # RSS 2.0 shaped like academictorrents' database.xml, and BEP 36 with ezRSS's namespace.
    rss = f"""<?xml version="1.0" encoding="UTF-8"?>
<rss version="2.0" xmlns:torrent="http://xmlns.ezrss.it/0.1/">
<channel><title>Academic Torrents</title><link>https://academictorrents.example/</link>
<item><title>Dataset one</title><link>https://academictorrents.example/details/{h0}</link>
  <infohash>{h0}</infohash><size>999</size>
  <enclosure url="/f/{n0}" length="321" type="application/x-bittorrent"/></item>
<item><title>Gone dataset</title><link>https://academictorrents.example/details/{missing}</link>
  <infohash>{missing}</infohash><size>123456789</size>
  <enclosure url="/f/nothing.torrent" length="321" type="application/x-bittorrent"/></item>
<item><title>Magnet only</title><torrent:contentLength>777</torrent:contentLength>
  <torrent:infoHash>{"cd" * 20}</torrent:infoHash>
  <torrent:magnetURI><![CDATA[magnet:?xt=urn:btih:{"cd" * 20}&dn=m]]></torrent:magnetURI></item>
<item><title>Just a page</title><link>https://academictorrents.example/about</link></item>
</channel></rss>"""
    server.files["/rss.xml"] = (rss.encode(), "application/rss+xml")
    # Atom over two pages (rel="next"), served gzip-encoded.
    atom = """<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom"><title>t</title>{next}
<entry><title>{name}</title><link rel="alternate" href="/about"/>
  <link rel="enclosure" type="application/x-bittorrent" href="/f/{name}"/></entry></feed>"""
    server.files["/atom.xml"] = (gzip.compress(atom.format(
        next='<link rel="next" href="/atom2.xml"/>', name=n1).encode()), "application/atom+xml",
        {"Content-Encoding": "gzip"})
    server.files["/atom2.xml"] = (atom.format(next="", name=n2).encode(), "text/xml")
    # Anna's Archive torrents.json: served as text/json, one obsolete row, one .torrent gone.
    annas = [{"url": f"/f/{n3}", "btih": h3, "magnet_link": f"magnet:?xt=urn:btih:{h3}",
              "torrent_size": 1, "num_files": 1, "data_size": 1, "display_name": "aa three",
              "group_name": "libgen_rs_non_fic", "obsolete": False, "embargo": False},
             {"url": "/f/aa_gone.torrent", "btih": "ef" * 20, "data_size": 4242,
              "num_files": 7, "display_name": "aa gone", "group_name": "zlib",
              "obsolete": False, "embargo": False},
             {"url": "/f/old.torrent", "btih": "12" * 20, "data_size": 1,
              "group_name": "zlib", "obsolete": True, "embargo": False}]
    server.files["/torrents.json"] = (json.dumps(annas).encode(), "text/json")
    # A libgen-seedtools feed whose links all fail: names, sizes and hashes still listed.
    seedtools = [{"name": "r_1000.torrent", "link": "/f/r_1000.torrent", "infohash": "34" * 20,
                  "size_bytes": 5102653477, "type": "books", "seeders": 20}]
    server.files["/seedtools.json"] = (json.dumps(seedtools).encode(), "application/json")
    # CSV with a header row; a .gz text list served as a file; a mislabelled text list.
    csv_text = f"name,infohash,size,url\nA,{h0},10,/f/{n0}\nB,{'56' * 20},2048,\n"
    server.files["/list.csv"] = (csv_text.encode(), "text/csv")
    server.files["/list.txt.gz"] = (gzip.compress(f"/f/{n1}\n{'78' * 20}\n".encode()),
                                    "application/gzip")
    server.files["/generate"] = (f"{server.url('/f/' + n2)}\nmagnet:?xt=urn:btih:{'9a' * 20}\n"
                                 .encode(), "text/json")
    collections = [{"name": name, "url": server.url(path), "type": "books"} for name, path in (
        ("rss", "/rss.xml"), ("atom", "/atom.xml"), ("seedtools", "/seedtools.json"),
        ("csv", "/list.csv"), ("gz", "/list.txt.gz"), ("generate", "/generate"))]
    collections.append({"name": "annas", "url": server.url("/torrents.json"), "type": "books",
                        "type_field": "group_name"})
    counts, db = do_sync(make_settings(tmp_path, collections))
    assert sizes_listed(db, "rss") == {h0: s0, missing: 123456789, "cd" * 20: 777}
    assert sizes_listed(db, "atom") == {h1: s1, h2: s2}
    assert sizes_listed(db, "annas") == {h3: s3, "ef" * 20: 4242}
    assert sizes_listed(db, "seedtools") == {"34" * 20: 5102653477}
    assert sizes_listed(db, "csv") == {h0: s0, "56" * 20: 2048}
    assert sizes_listed(db, "gz") == {h1: s1, "78" * 20: None}
    assert sizes_listed(db, "generate") == {h2: s2, "9a" * 20: None}
    assert counts.skipped == 1 and counts.pages == 8
    # The .torrent files that failed are said, and retried next sync; the listing's facts stand.
    # nothing.torrent, aa_gone.torrent, r_1000.torrent, and the RSS item without a torrent.
    assert counts.failed == 4
    assert db.execute("SELECT count(*) FROM memberships WHERE last_error LIKE "
                      "'%listed by the listing%'").fetchone()[0] == 3
    rows = {row.infohash: row for row in tsmd.load_report_rows(db)}
    assert (rows[h3].type, rows["ef" * 20].type, rows["ef" * 20].size_bytes) == (
        "libgen_rs_non_fic", "zlib", 4242)
    assert rows["34" * 20].name == "r_1000.torrent"  # the seedtools name, digits and all
    # Not one line of XML, CSV or JSON was fetched as a URL.
    assert {path for path, _ in server.requests} <= {
        "/rss.xml", "/atom.xml", "/atom2.xml", "/torrents.json", "/seedtools.json",
        "/list.csv", "/list.txt.gz", "/generate", "/f/nothing.torrent", "/f/aa_gone.torrent",
        "/f/r_1000.torrent", *(f"/f/{name}" for name, _, _ in made)}


def test_a_torrent_that_contradicts_its_listing_is_refused_and_the_listing_kept(server, tmp_path):
    (name, infohash, size), = torrents_for(server, "/x/", 1)
    claimed = "0f" * 20
    server.files["/x.json"] = (json.dumps([{"url": f"/x/{name}", "btih": claimed,
                                            "data_size": 31}]).encode(), "application/json")
    counts, db = do_sync(make_settings(tmp_path, [{"name": "x", "url": server.url("/x.json"),
                                                   "type": "books"}]))
    assert counts.failed == 1 and sizes_listed(db, "x") == {claimed: 31}
    error, = db.execute("SELECT last_error FROM memberships").fetchone()
    assert f"the listing says infohash {claimed}, the .torrent is {infohash}" in error


def test_junk_is_refused_not_requested_and_a_challenge_page_removes_nothing(server, tmp_path):
    publish_collection(server, "/c/", 3)
    settings = make_settings(tmp_path, [{"name": "c", "url": server.url("/c/"), "type": "books"}])
    counts, db = do_sync(settings)
    assert counts.new == 3
    before = listed(db, "c")
    challenge = (b"<!DOCTYPE html><html><head><title>Just a moment...</title></head><body>"
                 b"<noscript>Enable JavaScript and cookies to continue</noscript></body></html>")
    junk = "\n".join(f"junk line {n} <item>" for n in range(100_000)).encode()
    for body, kind, failed in ((challenge, "HTML", 1), (junk, "text", 100_001),
                               (b"[]", "JSON", 1), (b"<rss><channel></channel></rss>", "RSS/Atom", 1)):
        server.files["/c/"] = (body, "text/html")
        requests = server.count()
        counts, db = do_sync(settings, revalidate=True)
        assert server.count() - requests == 1  # the page itself, nothing it says
        # Each junk line is an error, and the page one more.
        assert counts.removed == 0 and counts.failed == failed and listed(db, "c") == before
        error, = db.execute("SELECT last_error FROM collections").fetchone()
        assert f"not a collection page: {server.url('/c/')} ({kind}), 0 torrent links" in error


def test_mass_removal_guard_and_a_domain_move_keep_what_is_known(server, tmp_path):
    hashes = publish_collection(server, "/c/", 10)
    collection = {"name": "c", "url": server.url("/c/"), "type": "books"}
    settings = make_settings(tmp_path, [collection])
    counts, db = do_sync(settings)
    first_seen = dict(db.execute("SELECT file_name, first_seen FROM memberships"))
    # Half the listing vanishes: refused, named, nothing removed, validators not stored.
    index_page(server, "/c/", [f"r_{n}.torrent" for n in range(5)])
    counts, db = do_sync(settings)
    assert (counts.removed, counts.failed) == (0, 1) and len(listed(db, "c")) == 10
    error, = db.execute("SELECT last_error FROM collections").fetchone()
    assert "refused to mark 5 of its 10 listed torrents as removed (50%" in error
    assert "--accept-removals" in error
    # A collection's own max_removed lets it through.
    settings = make_settings(tmp_path, [{**collection, "max_removed": 0.5}])
    counts, db = do_sync(settings)
    assert counts.removed == 5 and len(listed(db, "c")) == 5
    # The site moves to a new origin with the same file names: same torrents, same history.
    with CollectionServer() as moved:
        publish_collection(moved, "/new/", 5)
        settings = make_settings(tmp_path, [{**collection, "url": moved.url("/new/")}])
        counts, db = do_sync(settings)
    assert (counts.moved, counts.removed, counts.new, counts.failed) == (5, 0, 0, 0)
    assert listed(db, "c") == {f"r_{n}.torrent": hashes[f"r_{n}.torrent"] for n in range(5)}
    assert all(first_seen[name] == seen for name, seen in db.execute(
        "SELECT file_name, first_seen FROM memberships WHERE removed IS NULL"))
    assert db.execute("SELECT count(*) FROM memberships WHERE source LIKE ?",
                      (moved.url("/new/") + "%",)).fetchone()[0] == 5


def test_pagination_link_headers_retry_after_and_per_host_pacing(server, tmp_path):
    made = torrents_for(server, "/p/", 6)
    pages = [[name for name, _, _ in made[i:i + 2]] for i in (0, 2, 4)]
    for number, names in enumerate(pages):
        links = "".join(f'<a href="/p/{name}">{name}</a>' for name in names)
        if number == 0:  # the next page named in the HTML, then in a Link header
            links += '<a rel="next" href="/page/1">next</a>'
            server.files["/page/0"] = (links.encode(), "text/html")
        else:
            extra = {"Link": '</page/2>; rel="next"'} if number == 1 else {}
            server.files[f"/page/{number}"] = (links.encode(), "text/html", extra)
    server.busy["/p/t_3.torrent"] = ["1"]  # 429, Retry-After: 1 s; then served
    server.busy["/p/t_5.torrent"] = ["3600", "3600"]  # too long to wait: next run
    settings = make_settings(tmp_path, [{"name": "p", "url": server.url("/page/0"),
                                         "type": "books"}], sync={"per_host_rate": 4})
    server.started.clear()
    counts, db = do_sync(settings)
    assert counts.pages == 3 and counts.new == 5 and counts.failed == 1
    error, = db.execute("SELECT last_error FROM memberships WHERE last_error IS NOT NULL"
                        ).fetchone()
    assert "HTTP 429 (asked to retry after 3600: next run)" in error
    # 4 requests a second to one host: 10 requests (3 pages, 6 .torrent files, one asked
    # again) start no closer than a quarter second apart, on average.
    assert len(server.started) == 10
    assert server.started[-1] - server.started[0] >= 9 * 0.25 * 0.9
    assert validators_stored(db) == (None, None)  # several pages: read in full next time


def validators_stored(db: sqlite3.Connection) -> tuple:
    return db.execute("SELECT index_etag, index_last_modified FROM collections").fetchone()


def test_gzip_bomb_and_hostile_xml_are_one_error_each(server, tmp_path):
    bomb = gzip.compress(b"\0" * (64 << 20))  # 64 MiB of zeros in some 64 kB
    server.files["/bomb/"] = (bomb, "text/html", {"Content-Encoding": "gzip"})
    server.files["/bomb.gz"] = (bomb, "application/gzip")
    laughs = ('<?xml version="1.0"?><!DOCTYPE rss [<!ENTITY a "aaaaaaaaaa">'
              + "".join(f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">'
                        for i in range(9))
              + ']><rss><channel><item><title>&j;</title></item></channel></rss>')
    server.files["/laughs.xml"] = (laughs.encode(), "application/rss+xml")
    settings = make_settings(tmp_path, [
        {"name": name, "url": server.url(path), "type": "books"}
        for name, path in (("bomb", "/bomb/"), ("gz", "/bomb.gz"), ("laughs", "/laughs.xml"))],
        sync={"max_index_bytes": "1MiB", "max_torrent_bytes": "1MiB"})
    counts, db = do_sync(settings)
    assert counts.failed == 3 and counts.new == 0
    errors = sorted(error for (error,) in db.execute("SELECT last_error FROM collections"))
    assert "inflates to more than 1,048,576 bytes" in errors[0]
    assert "inflates to more than 1,048,576 bytes" in errors[1]
    assert "XML with a DOCTYPE is not read" in errors[2]


def test_local_folders_honour_required_substring_and_web_seeds_are_stored(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    seeded = bencoder.bdecode(v1_torrent("seeded.bin", 10, seed=1))
    seeded[b"url-list"] = [b"https://mirror.example/seeded.bin"]
    (folder / "r_1.torrent").write_bytes(bencoder.bencode(seeded))
    (folder / "x_2.torrent").write_bytes(v1_torrent("other.bin", 10, seed=2))
    settings = make_settings(tmp_path, [{"name": "local", "url": str(folder), "type": "books",
                                         "required_substring": "r_"}])
    counts, db = do_sync(settings)
    assert list(listed(db, "local")) == ["r_1.torrent"]
    assert db.execute("SELECT url, kind FROM web_seeds").fetchall() == [
        ("https://mirror.example/seeded.bin", "url-list")]


def test_content_encodings_are_decoded_within_the_cap():
    text = b"r_1.torrent\n" * 1000
    deflated = zlib.compress(text)
    for encoded, encoding in ((gzip.compress(text), "gzip"), (deflated, "deflate"),
                              (deflated[2:-4], "deflate"), (text, "identity"), (text, "")):
        assert tsmd.decode_content_untrusted(encoded, encoding, len(text)) == text
    for encoded, encoding, message in (
            (gzip.compress(text), "gzip", "inflates to more than"),
            (gzip.compress(text)[:-30], "gzip", "truncated gzip"),
            (b"not gzip at all", "gzip", "broken gzip"),
            (text, "br", "unsupported Content-Encoding 'br'")):
        with pytest.raises(tsmd.ProtocolError, match=message):
            tsmd.decode_content_untrusted(encoded, encoding, len(text) - 1)


def test_cli_sync_refuses_a_challenge_page_and_a_mass_removal_until_accepted(server, tmp_path):
    publish_collection(server, "/cli/", 10)
    config = write_config(tmp_path, f"""
[network]
allow_private = true
[sync]
per_host_rate = 0
[[collections]]
name = "cli"
url = "{server.url('/cli/')}"
type = "books"
""")
    assert cli("--config", str(config), "sync").returncode == 0
    good = server.files["/cli/"]
    server.files["/cli/"] = (b"<html><title>Just a moment...</title></html>", "text/html")
    done = cli("--config", str(config), "sync")
    assert done.returncode == 1 and "0 removed" in done.stderr
    assert "not a collection page" in done.stderr and "a login or challenge page?" in done.stderr
    server.files["/cli/"] = good
    index_page(server, "/cli/", ["r_0.torrent"])
    done = cli("--config", str(config), "sync")
    assert done.returncode == 1 and "refused to mark 9 of its 10 listed torrents" in done.stderr
    done = cli("--config", str(config), "sync", "--accept-removals")
    assert done.returncode == 0 and "9 removed" in done.stderr, done.stderr


def test_hostile_listings_found_by_review_are_one_error_each():
    # A run of XML comments before the root: a regex took 2^n steps to read it.
    started = time.perf_counter()
    feed = b"<rss><channel></channel></rss>"
    assert tsmd.parse_index_untrusted(b"<!---->" * 1000 + feed, BASE).kind == "RSS/Atom"
    assert tsmd.parse_index_untrusted(b"<!---->" * 30 + b"x", BASE).kind == "text"
    # The root must start in the first 8 kB: past them, it is no feed.
    assert tsmd.parse_index_untrusted(b"<!---->" * 5000 + feed, BASE).kind == "text"
    assert time.perf_counter() - started < 5  # linear: ~1 ms
    # A CSV header cell too large for the csv module; a nested <item>.
    with pytest.raises(tsmd.ProtocolError, match="CSV header"):
        tsmd.parse_index_untrusted(b'url,"name\n' + b"x" * 200_000, BASE)
    items, _ = tsmd.feed_items_untrusted(
        "<rss><channel><item><link>https://a.example/1.torrent</link><item><link>"
        "https://a.example/2.torrent</link></item><title>one</title></item></channel></rss>")
    assert items == [{"url": "https://a.example/1.torrent", "title": "one"}]
    # Junk in a link field is not fetched, and costs the item neither its infohash nor its size;
    # it is a note (-v), not a failure. An infohash and a magnet that disagree: no item.
    page = tsmd.parse_index_untrusted(
        b"url,btih,size,magnet\nN/A," + b"a" * 40 + b",5,\njavascript:x," + b"b" * 40
        + b",6,\nhttps://a.example/c.torrent," + b"c" * 40 + b",7,magnet:?xt=urn:btih:"
        + b"d" * 40 + b"\n", BASE)
    assert [(e.source, e.facts.size_bytes) for e in page.entries] == [("a" * 40, 5),
                                                                      ("b" * 40, 6)]
    assert len(page.notes) == 2 and all("item's link" in note for note in page.notes)
    assert page.unreadable == 1 and "name different torrents" in page.problems[0]
    # A field holds the wrong kind of thing: a URL as the infohash, an infohash as the magnet.
    # It is no fact: the URL must never become a torrent's infohash.
    page = tsmd.parse_index_untrusted(json.dumps([
        {"url": "/a.torrent", "btih": "http://x.example/b.torrent", "data_size": 5},
        {"btih": "http://x.example/c.torrent"}, {"magnet": "e" * 40}]).encode(), BASE)
    assert [(e.source, e.facts.infohash) for e in page.entries] == [
        ("http://archive.example/a.torrent", None)]
    assert page.unreadable == 2 and len(page.notes) == 1 and "not an infohash" in page.notes[0]
    # A link with an unbalanced "[" (urllib raises ValueError) in every format: one error.
    bad = "http://[::1/a.torrent"
    for body in (bad, json.dumps([bad]), json.dumps([{"url": bad}]), f"url,name\n{bad},x\n",
                 f'<rss><channel><item><enclosure url="{bad}" type="application/x-bittorrent"/>'
                 f'</item><item><link>{bad}</link></item></channel></rss>',
                 f'<html><a href="{bad}">x</a>'):
        page = tsmd.parse_index_untrusted(body.encode(), BASE)
        assert not page.entries and page.unreadable >= 1, body
    # Detection: HTML in a CSV cell is still CSV; a comment line naming columns is still text.
    entries, _ = parse_index(b"url,description\nhttp://a.example/x.torrent,<a href='y'>z</a>\n")
    assert [e.source for e in entries] == ["http://a.example/x.torrent"]
    entries, problems = parse_index(b"# list: url, magnet\nhttp://a.example/x.torrent\n")
    assert [e.source for e in entries] == ["http://a.example/x.torrent"] and not problems
    # An Atom enclosure that is not a torrent (a podcast's mp3) is no entry.
    items, _ = tsmd.feed_items_untrusted(
        '<feed xmlns="http://www.w3.org/2005/Atom"><entry><link rel="enclosure" '
        'type="audio/mpeg" href="https://a.example/show.mp3"/></entry></feed>')
    assert items == [{}]


def test_broken_hybrids_and_concatenated_gzip_members():
    def hybrid(info):
        return bencoder.bencode({b"info": {b"meta version": 2, b"piece length": 16384,
                                           b"pieces": b"", **info}})
    tree = {b"a": {b"": {b"length": 5}}}
    for info in ({b"name": b"x", b"file tree": tree, b"files": [{b"length": 5}]},
                 {b"file tree": tree, b"length": 5}):
        with pytest.raises(tsmd.ProtocolError, match="path|name"):
            tsmd.decode_metainfo_untrusted(hybrid(info))
    two = gzip.compress(b"one.torrent\n") + gzip.compress(b"two.torrent\n")
    assert tsmd.decode_content_untrusted(two, "gzip", 100) == b"one.torrent\ntwo.torrent\n"
    with pytest.raises(tsmd.ProtocolError, match="followed by 4 other bytes"):
        tsmd.decode_content_untrusted(gzip.compress(b"x") + b"junk", "gzip", 100)
    with pytest.raises(tsmd.ProtocolError, match="inflates to more than"):
        tsmd.decode_content_untrusted(two, "gzip", 15)
    # Tiny members one after another: bounded in number, and linear (each cost a copy of the
    # rest before).
    empty = gzip.compress(b"")
    assert tsmd.decode_content_untrusted(empty * 1000, "gzip", 10) == b""
    started = time.perf_counter()
    with pytest.raises(tsmd.ProtocolError, match="more than 1,000 members"):
        tsmd.decode_content_untrusted(empty * 100_000, "gzip", 10)
    assert time.perf_counter() - started < 5  # linear: a few ms


def test_waiting_for_a_busy_host_does_not_eat_a_downloads_deadline(tmp_path):
    settings = make_settings(tmp_path, [], sync={"per_host_concurrency": 1})
    fetcher = tsmd.make_fetcher(settings, paced=True)  # deadline: 2 + 4 x 2 = 10 s

    async def slow_server(url, max_bytes, etag, last_modified, gzip=False, byte_range=None):
        await trio.sleep(6)  # each answer takes 6 s; one at a time to this host
        return 200, {}, b"done"

    fetcher._get = slow_server
    results = []

    async def fetch(n: int) -> None:
        try:
            results.append((await fetcher.fetch(f"http://h.example/{n}", max_bytes=10)).body)
        except tsmd.FetchError as exc:
            results.append(str(exc))

    async def scenario():
        async with trio.open_nursery() as nursery:
            for n in range(4):  # the last waits 18 s for its turn, then takes 6 s
                nursery.start_soon(fetch, n)

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    assert results == [b"done"] * 4


def test_retry_after_is_for_collection_servers_not_trackers(server, tmp_path):
    server.files["/x"] = (b"hello", "text/plain")
    settings = make_settings(tmp_path, [])

    async def fetch(paced: bool) -> str:
        fetcher = tsmd.make_fetcher(settings, paced=paced)
        try:
            return (await fetcher.fetch(server.url("/x"), max_bytes=100)).body.decode()
        except tsmd.FetchError as exc:
            return str(exc)
        finally:
            await fetcher.aclose()

    server.busy["/x"] = ["0"]
    assert run(fetch, True) == "hello" and server.count("/x") == 2
    server.busy["/x"] = ["0"]
    assert "HTTP 429" in run(fetch, False) and server.count("/x") == 3


def test_moves_magnets_later_pages_and_types_keep_the_listing_true(server, tmp_path):
    # A magnet listing whose magnets gain a tracker: the same torrents move, none is removed.
    hashes = [f"{n:040x}" for n in range(1, 11)]
    server.files["/m.txt"] = ("\n".join(f"magnet:?xt=urn:btih:{h}" for h in hashes).encode(),
                              "text/plain")
    collection = {"name": "m", "url": server.url("/m.txt"), "type": "books"}
    settings = make_settings(tmp_path, [collection])
    do_sync(settings)
    server.files["/m.txt"] = ("\n".join(f"magnet:?xt=urn:btih:{h}&tr=udp%3A%2F%2Ft.example%3A1"
                                        for h in hashes).encode(), "text/plain")
    counts, db = do_sync(settings)
    assert (counts.moved, counts.removed, counts.failed) == (10, 0, 0)
    assert db.execute("SELECT count(*) FROM memberships WHERE source LIKE '%&tr=%' "
                      "AND removed IS NULL").fetchone()[0] == 10
    # Same file names under a new URL, but other torrents: those removals are judged (and
    # refused) like any other, not done on the quiet.
    publish_collection(server, "/c/", 10)
    collection = {"name": "c", "url": server.url("/c/"), "type": "books"}
    settings = make_settings(tmp_path, [collection])
    counts, db = do_sync(settings, ["c"])
    with CollectionServer() as other:
        for n in range(10):
            other.files[f"/c/r_{n}.torrent"] = (v1_torrent(f"else{n}", seed=500 + n), "")
        index_page(other, "/c/", [f"r_{n}.torrent" for n in range(10)])
        counts, db = do_sync(make_settings(tmp_path, [{**collection, "url": other.url("/c/")}]),
                             ["c"])
        assert (counts.moved, counts.removed, counts.new, counts.failed) == (0, 0, 10, 1)
        assert "refused to mark 10 of its 10 listed torrents" in db.execute(
            "SELECT last_error FROM collections WHERE name = 'c'").fetchone()[0]
        counts, db = do_sync(make_settings(tmp_path, [{**collection, "url": other.url("/c/")}]),
                             ["c"], accept_removals=True)
    assert (counts.removed, counts.unchanged, counts.failed) == (10, 10, 0)
    assert len(listed(db, "c")) == 10
    # A second page that becomes a challenge page: the listing is not whole, nothing is
    # removed, not even an entry that never gave a torrent (a dead link).
    made = torrents_for(server, "/p/", 4)
    server.files["/page/0"] = (("".join(f'<a href="/p/{name}">x</a>' for name, _, _ in made)
                                + '<a rel="next" href="/page/1">next</a>').encode(), "text/html")
    server.files["/page/1"] = (b'<a href="/p/dead.torrent">dead</a>', "text/html")
    paged = {"name": "p", "url": server.url("/page/0"), "type": "books"}
    settings = make_settings(tmp_path, [paged])
    do_sync(settings, ["p"])
    server.files["/page/1"] = (b"<html><title>Just a moment...</title></html>", "text/html")
    server.files["/page/0"] = ('<a href="/p/t_0.torrent">x</a><a rel="next" href="/page/1">n</a>'
                               .encode(), "text/html")
    counts, db = do_sync(settings, ["p"], accept_removals=True)
    assert counts.removed == 0 and len(sizes_listed(db, "p")) == 4
    assert db.execute("SELECT count(*) FROM memberships WHERE source LIKE '%dead.torrent' "
                      "AND removed IS NULL").fetchone()[0] == 1
    assert "page 2, " in db.execute("SELECT last_error FROM collections WHERE name = 'p'"
                                    ).fetchone()[0]
    # type_field set on a synced collection: entries confirmed without a download get it too.
    (name, infohash, _), = made[:1]
    server.files["/t.json"] = (json.dumps([{"url": f"/p/{name}", "group_name": "zlib"}]).encode(),
                               "application/json")
    typed = {"name": "t", "url": server.url("/t.json"), "type": "books"}
    do_sync(make_settings(tmp_path, [typed]), ["t"])
    counts, db = do_sync(make_settings(tmp_path, [{**typed, "type_field": "group_name"}]), ["t"])
    assert counts.unchanged == 1 and counts.downloads == 0
    assert {row.infohash: row.type for row in tsmd.load_report_rows(db, ["t"])} == {
        infohash: "zlib"}


def test_feed_and_csv_parsers_read_fields_and_refuse_the_rest():
    entries, problems = parse_index(
        b"infohash\tname\tsize\n" + b"a" * 40 + b"\tone\t5\n" + b"zz\ttwo\t6\n"
        + b"b" * 40 + b"\tthree\n")
    assert [(e.source, e.facts.size_bytes, e.facts.name) for e in entries] == [
        ("a" * 40, 5, "one")]
    assert len(problems) == 2 and "not a URL, magnet link or infohash: 'zz'" in problems[0]
    assert "2 columns, the header has 3" in problems[1]
    items, next_url = tsmd.feed_items_untrusted(
        '<feed xmlns="http://www.w3.org/2005/Atom"><link rel="next" href="?p=2"/>'
        '<entry><link href="magnet:?xt=urn:btih:' + "c" * 40 + '"/></entry></feed>')
    assert items == [{"magnet": "magnet:?xt=urn:btih:" + "c" * 40}] and next_url == "?p=2"
    with pytest.raises(tsmd.ProtocolError, match="invalid XML feed"):
        tsmd.parse_index_untrusted(b"<rss><channel><item>", BASE)
    assert tsmd.next_page_link(link_header='<https://a.example/?page=3>; rel="next", '
                                           '</first>; rel="first"') == "https://a.example/?page=3"
    assert tsmd.retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", 1445412470.0) == 10.0


def test_report_json_is_seedtools_valid(server, tmp_path):
    publish_collection(server, "/r/", 3)
    server.files["/r/list.txt"] = (f"magnet:?xt=urn:btih:{'f' * 40}&dn=no-digits\n".encode(), "")
    settings = make_settings(tmp_path, [
        {"name": "r", "url": server.url("/r/"), "type": "books"},
        {"name": "again", "url": server.url("/r/"), "type": "fiction"},
        {"name": "m", "url": server.url("/r/list.txt"), "type": "scimag"}])
    _, db = do_sync(settings)
    rows = tsmd.load_report_rows(db)
    feed = json.loads(tsmd.render_json(rows))
    assert_seedtools_valid(feed)
    # A torrent listed by two collections appears once; the magnet-only one, which seedtools
    # cannot fetch, is left out, and said to be.
    assert len(feed) == 3 and "f" * 40 not in {item["infohash"] for item in feed}
    assert tsmd.seedtools_note(rows, "json").startswith("json: 1 torrent with no http(s)")
    assert tsmd.seedtools_note(rows, "ndjson") is None
    assert all(item["ipfs_cid"] is None and item["path"] is None for item in feed)
    # Without them, pydantic 2 refuses every row (pydantic 1 takes them as missing = None).
    bare = {key: value for key, value in feed[0].items() if key not in ("ipfs_cid", "path")}
    old, new = seedtools_models()
    old(**bare)
    with pytest.raises(Exception, match="ipfs_cid"):
        new(**bare)
    by_hash = {json.loads(line)["infohash"]: json.loads(line)
               for line in tsmd.render_ndjson(rows).splitlines()}
    assert len(by_hash) == 4
    magnet_item = by_hash["f" * 40]
    assert magnet_item["link"].startswith("magnet:?") and magnet_item["size_bytes"] is None
    assert magnet_item["name"] == f"no-digits 0x{'f' * 40}"
    book = next(item for item in feed if item["name"] == "r_1.torrent")
    assert book["type"] == "books" and book["link"] == server.url("/r/r_1.torrent")
    assert book["size_bytes"] == 1001 and book["created_unix"] == 1_600_000_001
    assert book["seeders"] == book["dht_peers"] == book["scraped_date"] == -1
    only = tsmd.load_report_rows(db, ["m"])
    assert [row.infohash for row in only] == ["f" * 40]


# ---- Command line ----


def silent_udp() -> socket.socket:
    """A UDP socket on 127.0.0.1 that receives and never answers: a dead router or tracker."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HERE / "tsmd.py"), *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})},
                          cwd=cwd, stdin=subprocess.DEVNULL)


def test_trio_and_h11_are_loaded_only_when_used():
    """Reports never touch the network, and start faster without them."""
    probe = ("import sys, tsmd\n"
             "print(sorted(m for m in ('trio._core', 'h11._connection', 'rich.progress',"
             " 'trio_websocket') if m in sys.modules))\n"
             "print(tsmd.trio.run(tsmd.trio.sleep, 0), tsmd.h11.CLIENT.__name__)\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=HERE, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.stdout.splitlines() == ["[]", "None CLIENT"], done.stderr


@pytest.mark.parametrize("arguments", [["--version"], ["--help"], ["status", "--help"]])
def test_help_and_version_load_neither_the_database_nor_the_network(arguments):
    probe = ("import sys, tsmd\n"
             f"sys.argv = ['tsmd', *{arguments!r}]\n"
             "try:\n    tsmd.app()\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('_sqlite3', 'trio._core', 'h11._connection')"
             " if m in sys.modules), file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=HERE, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.stderr.splitlines()[-1] == "[]", done.stderr
    assert "tsmd" in done.stdout


def test_python_dash_m_tsmd_calls_itself_tsmd():
    done = subprocess.run([sys.executable, "-m", "tsmd", "sync", "-h"], cwd=HERE,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0 and done.stdout.startswith("Usage: tsmd sync "), done.stdout


def test_cli_sync_report_and_exit_codes(server, tmp_path):
    publish_collection(server, "/cli/", 4)
    config = write_config(tmp_path, f"""
database = "from-config.sqlite3"
[network]
allow_private = true
[[collections]]
name = "cli"
url = "{server.url('/cli/')}"
type = "books"
[[collections]]
name = "broken"
url = "{server.url('/gone/')}"
type = "books"
enabled = false
""")
    done = cli("--config", str(config), "sync")
    assert done.returncode == 0, done.stderr
    assert "4 new" in done.stderr and done.stdout == ""
    assert (tmp_path / "from-config.sqlite3").exists()
    done = cli("--config", str(config), "report", "--format", "json")
    assert done.returncode == 0 and len(json.loads(done.stdout)) == 4
    # --db beats TSMD_DB beats the file.
    done = cli("sync", env={"TSMD_CONFIG": str(config), "TSMD_DB": str(tmp_path / "env.db")})
    assert done.returncode == 0 and (tmp_path / "env.db").exists()
    done = cli("--db", str(tmp_path / "cli.db"), "sync",
               env={"TSMD_CONFIG": str(config), "TSMD_DB": str(tmp_path / "env2.db")})
    assert (tmp_path / "cli.db").exists() and not (tmp_path / "env2.db").exists()
    # A failed collection: exit code 1, the cause on stderr, stdout clean.
    done = cli("--config", str(config), "-q", "sync", "--collection", "broken")
    assert done.returncode == tsmd.ExitCode.PARTIAL
    assert "collection 'broken'" in done.stderr and "HTTP 404" in done.stderr
    assert "sync partial" not in done.stderr  # -q prints only errors
    out = tmp_path / "feed.json"
    done = cli("--config", str(config), "report", "--output", str(out))
    assert done.returncode == 0 and len(json.loads(out.read_text())) == 4


def test_cli_usage_errors(tmp_path):
    bad = write_config(tmp_path, "[network]\nallow_private = 'maybe'\n")
    done = cli("--config", str(bad), "sync")
    assert done.returncode == tsmd.ExitCode.USAGE and "expected true or false" in done.stderr
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    done = cli("--config", str(empty), "sync")
    assert done.returncode == tsmd.ExitCode.USAGE and "no enabled collections" in done.stderr
    done = cli("--config", str(empty), "--db", str(tmp_path / "x.db"), "report", "--format", "xml")
    assert done.returncode == tsmd.ExitCode.USAGE and "unknown report format 'xml'" in done.stderr
    db_path = tmp_path / "future.db"
    sqlite3.connect(db_path).execute("PRAGMA user_version = 99").connection.close()
    done = cli("--config", str(empty), "--db", str(db_path), "report")
    assert done.returncode == tsmd.ExitCode.DATABASE and "newer than" in done.stderr
    assert cli("--version").stdout.strip() == f"tsmd {tsmd.__version__}"


def test_cli_in_process_help_has_examples():
    result = CliRunner().invoke(tsmd.app.typer(), ["sync", "--help"])
    assert result.exit_code == 0 and "Example: tsmd" in result.output


def test_config_example_mirrors_every_setting_and_default():
    example = tsmd.load_settings(HERE / "config.example.toml")
    assert example.network == tsmd.NetworkSettings()
    assert example.sync == tsmd.SyncSettings()
    assert example.scrape == tsmd.ScrapeSettings()
    assert example.dht == tsmd.DhtSettings()
    assert example.retention == tsmd.RetentionSettings()
    assert [(o.format, Path(o.path).relative_to(HERE).as_posix(), o.pick)
            for o in example.report.outputs] == [
        ("json", "public/torrents.json", 0), ("html", "public/index.html", 0),
        ("prometheus", "metrics/tsmd.prom", 0), ("rss", "public/seed-2TB.xml", 2 * 10**12)]
    text = (HERE / "config.example.toml").read_text()
    for cls in (tsmd.NetworkSettings, tsmd.SyncSettings, tsmd.ScrapeSettings, tsmd.DhtSettings,
                tsmd.ReportSettings, tsmd.ReportOutput, tsmd.RetentionSettings,
                tsmd.CollectionSettings):
        for f in tsmd.dataclasses.fields(cls):
            assert re.search(rf"(?m)(^(# )?|[{{,] ){f.name} =", text), f.name
    assert "database =" in text


# ---- Scrape: in-process fake trackers ----


class FakeUdpTracker:
    """A BEP 15 tracker on 127.0.0.1 with switches for the ways real trackers misbehave."""

    def __init__(self, counts: dict[bytes, tuple[int, int, int]], *, truncate_at: int | None = None,
                 drop_every: int = 0, wrong_tid_every: int = 0, wrong_source_every: int = 0,
                 connection_uses: int | None = None, scrape_error: str | None = None,
                 silent: bool = False, garbage_every: int = 0, delay: float = 0.0,
                 host: str = "127.0.0.1", port: int = 0,
                 silent_after_scrapes: int | None = None,
                 fabricate: tuple[int, int, int] | None = None,
                 fabricate_after_scrapes: int = 0) -> None:
        self.counts = counts  # infohash -> (seeders, leechers, completed)
        # A liar: these numbers for every hash it does not know, once it has answered
        # `fabricate_after_scrapes` scrapes honestly.
        self.fabricate = fabricate
        self.fabricate_after_scrapes = fabricate_after_scrapes
        self.truncate_at = truncate_at
        self.drop_every = drop_every
        self.wrong_tid_every = wrong_tid_every
        self.wrong_source_every = wrong_source_every
        self.connection_uses = connection_uses
        self.scrape_error = scrape_error
        self.silent = silent
        self.silent_after_scrapes = silent_after_scrapes  # then it never answers again
        self.host = host
        self.garbage_every = garbage_every
        self.delay = delay
        self.connections: dict[int, int] = {}  # connection id -> scrapes left
        self.packets = 0
        self.scrapes = 0
        self.hashes_asked = 0
        self.port = port

    @property
    def url(self) -> str:
        return f"udp://127.0.0.1:{self.port}"  # as tsmd keeps it: BEP 15 ignores the path

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock, \
                trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as other:
            await sock.bind((self.host, self.port))
            if self.wrong_source_every:  # an ephemeral port could be another tracker's own
                await other.bind((self.host, 0))
            self.port = sock.getsockname()[1]
            task_status.started(self.port)
            async with trio.open_nursery() as nursery:
                while True:
                    data, address = await sock.recvfrom(2048)
                    self.packets += 1
                    reply = self.answer(data)
                    if reply is None or self.silent or self.silent_after_scrapes is not None \
                            and self.scrapes > self.silent_after_scrapes:
                        continue
                    if self.drop_every and self.packets % self.drop_every == 0:
                        continue
                    if self.garbage_every and self.packets % self.garbage_every == 0:
                        reply = reply[:8] + os.urandom(5)
                    if self.wrong_tid_every and self.packets % self.wrong_tid_every == 0:
                        reply = reply[:4] + struct.pack("!I", (struct.unpack_from("!I", reply, 4)[0]
                                                               + 1) % 2**32) + reply[8:]
                    sender = sock
                    if self.wrong_source_every and self.packets % self.wrong_source_every == 0:
                        sender = other
                    nursery.start_soon(self._send_later, sender, reply, address)

    async def _send_later(self, sock, reply: bytes, address) -> None:
        if self.delay:
            await trio.sleep(self.delay)
        await sock.sendto(reply, address)

    def answer(self, data: bytes) -> bytes | None:
        if len(data) < 16:
            return None
        connection_id, action, tid = struct.unpack_from("!QII", data)
        if action == 0 and connection_id == 0x41727101980:
            new_id = int.from_bytes(os.urandom(8), "big")
            self.connections[new_id] = self.connection_uses or 10**9
            return struct.pack("!IIQ", 0, tid, new_id)
        if action != 2:
            return None
        if self.connections.get(connection_id, 0) <= 0:
            return struct.pack("!II", 3, tid) + b"Connection ID missmatch.\x00"
        self.connections[connection_id] -= 1
        if self.scrape_error:
            return struct.pack("!II", 3, tid) + self.scrape_error.encode()
        hashes = [data[i:i + 20] for i in range(16, len(data), 20)]
        self.scrapes += 1
        self.hashes_asked += len(hashes)
        if self.truncate_at is not None:
            hashes = hashes[:self.truncate_at]
        unknown = (0, 0, 0) if self.fabricate is None or \
            self.scrapes <= self.fabricate_after_scrapes else self.fabricate
        entries = b"".join(struct.pack("!III", s, c, l) for s, l, c in
                           (self.counts.get(h, unknown) for h in hashes))
        return struct.pack("!II", 2, tid) + entries


class FakeHttpTracker(LoopbackHttpServer):
    """A BEP 48 scrape endpoint that answers at most `cap` hashes per request, like opentracker."""

    def __init__(self, counts: dict[bytes, tuple[int, int, int]], cap: int = 64, *,
                 fabricate: tuple[int, int, int] | None = None, honest_scrapes: int | None = None,
                 full_scrape_only: bool = False, full_scrape_body: bytes | None = None) -> None:
        super().__init__()
        self.counts = counts
        self.cap = cap
        self.fabricate = fabricate  # a liar: these numbers for every hash it does not know
        # A sly liar: honest for this many scrapes, then it answers only the hashes it does
        # not know (the canaries), with `fabricate`.
        self.honest_scrapes = honest_scrapes
        # academictorrents: per-hash scrapes answer an empty `files`; only the full one serves.
        self.full_scrape_only = full_scrape_only
        self.full_scrape_body = full_scrape_body  # sent as it is for a full scrape, if set
        self.full_scrapes = 0
        self.url = f"http://127.0.0.1:{self.port}/announce"

    @property
    def scrapes(self) -> int:
        return len(self.requests)

    def files(self, hashes) -> dict:
        numbers = {h: self.counts.get(h, self.fabricate) for h in hashes}
        return {h: {b"complete": c[0], b"incomplete": c[1], b"downloaded": c[2]}
                for h, c in numbers.items() if c is not None}

    def respond(self, handler, path: str) -> None:
        query = urllib.parse.urlsplit(handler.path).query
        asked = [urllib.parse.unquote_to_bytes(value) for key, value in
                 (pair.split("=", 1) for pair in query.split("&") if "=" in pair)
                 if key == "info_hash"]
        encoding = None
        if path != "/scrape":
            body = bencoder.bencode({b"failure reason": b"no such path"})
        elif not asked:  # a full scrape: gzip-encoded where asked for, as opentracker does
            self.full_scrapes += 1
            body = self.full_scrape_body or bencoder.bencode({b"files": self.files(self.counts)})
            if "gzip" in handler.headers.get("Accept-Encoding", ""):
                body, encoding = gzip.compress(body), "gzip"
        elif self.honest_scrapes is not None:
            # Honest: what it knows, unknown hashes (the canary) left out; then the lies.
            lying = self.scrapes > self.honest_scrapes
            files = self.files([h for h in asked if (h in self.counts) != lying])
            body = bencoder.bencode({b"files": files})
        else:
            files = {} if self.full_scrape_only else self.files(asked[:self.cap])
            body = bencoder.bencode({b"files": files})
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        if encoding:
            handler.send_header("Content-Encoding", encoding)
        handler.end_headers()
        handler.wfile.write(body)


def torrent_db(tmp_path: Path, count: int, trackers: list[str],
               collection: str = "c") -> tuple[sqlite3.Connection, list[bytes]]:
    """A database with `count` torrents in one collection, each listing `trackers` in order."""
    db = tsmd.open_database(tmp_path / "tsmd.sqlite3")
    hashes = [hashlib.sha1(f"torrent {n}".encode()).digest() for n in range(count)]
    with tsmd.Transaction(db):
        collection_id = tsmd.upsert_collection(db, collection, "http://x/", "books", True)
        for n, infohash in enumerate(hashes):
            meta = tsmd.decode_magnet_untrusted(tsmd.magnet_uri(infohash.hex(), f"t{n}", trackers))
            torrent_id = tsmd.upsert_torrent(db, meta, 1)
            db.execute("INSERT INTO memberships (collection_id, source, torrent_id, file_name, "
                       "first_seen, last_seen) VALUES (?, ?, ?, ?, 1, 1)",
                       (collection_id, infohash.hex(), torrent_id, f"t_{n}.torrent"))
    return db, hashes


def scrape_settings(tmp_path: Path, **scrape) -> tsmd.Settings:
    return make_settings(tmp_path, [{"name": "c", "url": "http://x/", "type": "books"}],
                         scrape={"bind": "127.0.0.1:0", "timeout": 0.3, "attempts": 2, **scrape})


def numbers(db: sqlite3.Connection) -> dict[str, tuple[int, int, int]]:
    rows = tsmd.load_report_rows(db)
    return {row.infohash: (row.seeders, row.leechers, row.completed) for row in rows}


def known_counts(hashes: list[bytes], salt: int) -> dict[bytes, tuple[int, int, int]]:
    return {h: ((n * 7 + salt) % 50, (n * 3 + salt) % 20, n * 11 + salt)
            for n, h in enumerate(hashes)}


def test_a_udp_tracker_silent_on_one_address_is_asked_on_the_next(tmp_path, monkeypatch):
    hashes = [hashlib.sha1(f"torrent {n}".encode()).digest() for n in range(100)]
    live = FakeUdpTracker(known_counts(hashes, 4))
    addresses = {}  # host name -> the addresses DNS gives it, the first one dead

    async def resolve(host: str, port: int) -> list[str]:
        return addresses.get(host) or await real_resolve(host, port)

    real_resolve = tsmd.resolve_addresses
    monkeypatch.setattr(tsmd, "resolve_addresses", resolve)

    async def scenario():
        async with trio.open_nursery() as nursery:
            await nursery.start(live.serve)
            # The dead address listens on the tracker's port and never answers.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dead:
                dead.bind(("127.0.0.2", live.port))
                addresses["two.test"] = ["127.0.0.2", "127.0.0.1"]
                addresses["gone.test"] = ["127.0.0.2", "127.0.0.3"]
                db, _ = torrent_db(tmp_path, 100, [f"udp://two.test:{live.port}",
                                                    f"udp://gone.test:{live.port}"])
                settings = scrape_settings(tmp_path)
                counts = await tsmd.run_scrape(db, settings, settings.collections,
                                               tsmd.Reporter(-1))
            nursery.cancel_scope.cancel()
        return db, counts

    db, counts = run(scenario, timeout=60)
    assert (counts.trackers_ok, counts.trackers_failed) == (1, 1)
    assert numbers(db) == {h.hex(): c for h, c in known_counts(hashes, 4).items()}
    health = {row.url: row for row in tsmd.load_tracker_health(db)}
    assert "from each of its 2 addresses (127.0.0.2, 127.0.0.3)" in health[
        f"udp://gone.test:{live.port}"].last_error


def test_a_udp_tracker_address_that_goes_quiet_mid_run_gives_way_to_the_next(tmp_path,
                                                                            monkeypatch):
    hashes = [hashlib.sha1(f"torrent {n}".encode()).digest() for n in range(300)]
    first = FakeUdpTracker(known_counts(hashes, 5), host="127.0.0.2", silent_after_scrapes=2)

    async def resolve(host: str, port: int) -> list[str]:
        return ["127.0.0.2", "127.0.0.1"] if host == "two.test" else await real(host, port)

    real = tsmd.resolve_addresses
    monkeypatch.setattr(tsmd, "resolve_addresses", resolve)

    async def scenario():
        async with trio.open_nursery() as nursery:
            await nursery.start(first.serve)
            second = FakeUdpTracker(known_counts(hashes, 5), port=first.port)
            await nursery.start(second.serve)  # the same port on the name's other address
            db, _ = torrent_db(tmp_path, 300, [f"udp://two.test:{first.port}"])
            settings = scrape_settings(tmp_path, window=2)
            counts = await tsmd.run_scrape(db, settings, settings.collections,
                                           tsmd.Reporter(-1))
            nursery.cancel_scope.cancel()
        return db, counts, second

    db, counts, second = run(scenario, timeout=60)
    assert first.scrapes >= 3 and second.scrapes >= 2  # both asked, the run went on
    assert (counts.trackers_ok, counts.hashes_answered) == (1, 300)
    assert numbers(db) == {h.hex(): c for h, c in known_counts(hashes, 5).items()}


def test_scrape_udp_truncation_drops_wrong_replies_and_failover(tmp_path):
    """Four trackers per torrent: one truncates at 50 and drops packets, one answers from a wrong
    address or with a wrong transaction id every other packet, one expires its connection ids,
    one is dead. Every torrent still gets exact numbers: the maximum over trackers."""
    hashes = [hashlib.sha1(f"torrent {n}".encode()).digest() for n in range(300)]
    truncating = FakeUdpTracker(known_counts(hashes, 1), truncate_at=50, drop_every=5)
    # Bad replies at packets 3, 4, 6, 8, 9, 12...: never three in a row, so three attempts
    # always get through when requests go one at a time (window 1 keeps the pattern exact).
    tricky = FakeUdpTracker(known_counts(hashes, 2), wrong_tid_every=4, wrong_source_every=3)
    expiring = FakeUdpTracker(known_counts(hashes, 3), connection_uses=2)
    dead = FakeUdpTracker({}, silent=True)

    async def scenario():
        async with trio.open_nursery() as nursery:
            for tracker in (truncating, tricky, expiring, dead):
                await nursery.start(tracker.serve)
            db, _ = torrent_db(tmp_path, 300, [t.url for t in (truncating, tricky, expiring,
                                                                 dead)])
            settings = scrape_settings(tmp_path, window=1, attempts=3)
            counts = await tsmd.run_scrape(db, settings, settings.collections, tsmd.Reporter(-1))
            nursery.cancel_scope.cancel()
        return db, counts

    db, counts = run(scenario, timeout=60)
    assert counts.torrents == counts.torrents_answered == 300
    assert (counts.trackers_ok, counts.trackers_failed) == (3, 1)
    assert counts.hashes_answered == 900
    assert counts.truncations == 1  # the first batch of 70; then 50 at a time
    assert counts.retries > 0 and counts.dropped > 0
    # 70 asked, 50 answered, 20 asked again: the truncation costs 20 hashes, not a second pass
    # (the rest is retransmits of the packets this tracker drops).
    assert 300 + 20 <= truncating.hashes_asked < 450
    expected = {}
    for h in hashes:
        candidates = [t.counts[h] for t in (truncating, tricky, expiring)]
        expected[h.hex()] = max(candidates, key=lambda c: (c[0], c[1]))
        expected[h.hex()] = (*expected[h.hex()][:2], max(c[2] for c in candidates))
    assert numbers(db) == expected
    samples = db.execute("SELECT count(*) FROM tracker_samples").fetchone()[0]
    assert samples == 900  # one per (torrent, live tracker)
    health = {row.url: row for row in tsmd.load_tracker_health(db)}
    assert health[dead.url].consecutive_failures == 1 and "no reply" in health[dead.url].last_error
    assert health[dead.url].next_attempt > time.time() + 3000
    assert health[truncating.url].hashes_answered == 300 and health[truncating.url].rtt_ms


def test_scrape_backs_off_failing_trackers_and_http_scrape(tmp_path):
    hashes = [hashlib.sha1(f"torrent {n}".encode()).digest() for n in range(150)]
    refusing = FakeUdpTracker({}, scrape_error="tracker is closed")

    async def scenario(http_url):
        async with trio.open_nursery() as nursery:
            await nursery.start(refusing.serve)
            db, _ = torrent_db(tmp_path, 150, [refusing.url, http_url,
                                               "udp://127.0.0.1:1/announce"])
            settings = scrape_settings(tmp_path)
            first = await tsmd.run_scrape(db, settings, settings.collections, tsmd.Reporter(-1))
            second = await tsmd.run_scrape(db, settings, settings.collections, tsmd.Reporter(-1))
            explicit = await tsmd.run_scrape(db, settings, settings.collections, tsmd.Reporter(-1),
                                             only_trackers=[refusing.url])
            nursery.cancel_scope.cancel()
        return db, first, second, explicit

    with FakeHttpTracker(known_counts(hashes, 5), cap=64) as http_tracker:
        db, first, second, explicit = run(scenario, http_tracker.url, timeout=60)
        # 150 hashes, 50 per request of which one is a canary, 64 answered at most: 4
        # requests, no truncation needed.
        assert first.hashes_answered == 150 and http_tracker.scrapes == 4 * 2
    assert (first.trackers_ok, first.trackers_failed) == (1, 2)
    assert second.trackers_skipped == 2 and second.trackers == 1
    assert explicit.trackers == 1 and explicit.trackers_failed == 1  # --tracker overrides back-off
    health = {row.url: row for row in tsmd.load_tracker_health(db)}
    assert health[refusing.url].consecutive_failures == 2
    assert health[refusing.url].last_error == "tracker error: tracker is closed"
    assert numbers(db) == {h.hex(): c for h, c in known_counts(hashes, 5).items()}


def test_http_scrape_truncated_replies_are_asked_again(tmp_path):
    hashes = [hashlib.sha1(f"torrent {n}".encode()).digest() for n in range(130)]
    counts_by_hash = known_counts(hashes[:120], 9)  # the last ten are unknown to the tracker

    async def scenario(url):
        db, _ = torrent_db(tmp_path, 130, [url])
        settings = scrape_settings(tmp_path, http_batch_size=100)
        return db, await tsmd.run_scrape(db, settings, settings.collections, tsmd.Reporter(-1))

    with FakeHttpTracker(counts_by_hash, cap=30) as tracker:
        db, counts = run(scenario, tracker.url, timeout=60)
    assert counts.hashes_answered == 120 and counts.truncations >= 1
    assert counts.torrents_answered == 120
    # 100 asked, 30 answered; then batches of 30: the cap costs a handful of requests, not one
    # per hash, and the ten unknown hashes are asked at most twice.
    assert tracker.scrapes <= 8
    got = numbers(db)
    assert all(got[h.hex()] == c for h, c in counts_by_hash.items())
    assert all(got[h.hex()] == (-1, -1, -1) for h in hashes[120:])


def test_scrape_refuses_private_tracker_addresses_by_default(tmp_path):
    db, _ = torrent_db(tmp_path, 3, ["udp://127.0.0.1:6969/announce",
                                     "http://localhost:1/announce"])
    settings = tsmd.dataclasses.replace(scrape_settings(tmp_path),
                                        network=tsmd.NetworkSettings(allow_private=False))
    counts = run(tsmd.run_scrape, db, settings, settings.collections, tsmd.Reporter(-1))
    assert counts.trackers_failed == 2 and counts.packets_sent == 0
    errors = {row.last_error for row in tsmd.load_tracker_health(db)}
    assert any("private addresses need allow_private" in e for e in errors)
    assert any("not a public address" in e for e in errors)


def test_scrape_stale_after_and_infohash_selection(tmp_path):
    hashes = [hashlib.sha1(f"torrent {n}".encode()).digest() for n in range(20)]
    tracker = FakeUdpTracker(known_counts(hashes, 4))

    async def scenario():
        async with trio.open_nursery() as nursery:
            await nursery.start(tracker.serve)
            db, _ = torrent_db(tmp_path, 20, [tracker.url])
            settings = scrape_settings(tmp_path)
            one = await tsmd.run_scrape(db, settings, settings.collections, tsmd.Reporter(-1),
                                        infohashes=[hashes[3].hex()])
            rest = await tsmd.run_scrape(db, settings, settings.collections, tsmd.Reporter(-1),
                                         stale_after=3600)
            nothing = await tsmd.run_scrape(db, settings, settings.collections, tsmd.Reporter(-1),
                                            stale_after=3600)
            with pytest.raises(tsmd.ConfigError, match="not listed"):
                await tsmd.run_scrape(db, settings, settings.collections, tsmd.Reporter(-1),
                                      infohashes=["0" * 40])
            nursery.cancel_scope.cancel()
        return one, rest, nothing

    one, rest, nothing = run(scenario)
    assert (one.torrents, rest.torrents, nothing.torrents) == (1, 19, 0)


class FakeWebSocketTracker:
    """A WebTorrent tracker on 127.0.0.1 (trio-websocket's server) that answers each scrape as
    `behaviour` says: "good"; "chatty" (WebRTC offers before the reply, as a busy tracker
    relays them); "babbling" (offers only, never a reply); "huge" (a reply over tsmd's cap);
    "garbage" (no JSON); "mangled" (keys of wrong lengths beside good ones); "failure"; or
    "silent" (it reads and never answers)."""

    def __init__(self, counts: dict[bytes, tuple[int, int, int]], behaviour: str = "good"
                 ) -> None:
        self.counts = counts  # infohash -> (seeders, leechers, completed)
        self.behaviour = behaviour
        self.connections = 0
        self.closed = 0  # connections the client closed (a close frame, or the socket)
        self.scrapes = 0
        self.hashes_asked = 0
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/announce"

    async def all_closed(self, within: float = 5) -> bool:
        """Whether every connection is closed by the client, waiting at most `within` s."""
        with trio.move_on_after(within):
            while self.closed < self.connections:
                await trio.sleep(0.01)
        return self.closed == self.connections

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(trio_websocket.serve_websocket, self.handle,
                                         "127.0.0.1", 0, None)
            self.port = server.port
            task_status.started(self.port)

    async def handle(self, request) -> None:
        connection = await request.accept()
        self.connections += 1
        try:
            while True:
                asked = [h.encode("latin-1") for h in
                         json.loads(await connection.get_message())["info_hash"]]
                self.scrapes += 1
                self.hashes_asked += len(asked)
                for message in self.replies(asked):
                    await connection.send_message(message)
        except trio_websocket.ConnectionClosed:
            self.closed += 1

    def replies(self, asked: list[bytes]) -> list[str | bytes]:
        files = {h: dict(zip(("complete", "incomplete", "downloaded"),
                             (self.counts[h][0], self.counts[h][1], self.counts[h][2])))
                 for h in asked if h in self.counts}
        offer = json.dumps({"action": "announce", "offer": {"type": "offer", "sdp": "v=0"},
                            "offer_id": "o" * 20, "info_hash": "i" * 20, "peer_id": "p" * 20})
        behaviour = self.behaviour
        if behaviour == "chatty":
            return [offer, offer, ws_reply(files, flags={"min_request_interval": 600})]
        if behaviour == "babbling":
            return [offer] * (tsmd.MAX_WS_OTHER_MESSAGES + 5)
        if behaviour == "huge":
            return [ws_reply(files, pad="x" * (tsmd.MAX_WS_MESSAGE_CHARS + 10))]
        if behaviour == "garbage":
            return [b"<html>502 Bad Gateway</html>"]
        if behaviour == "mangled":
            return [json.dumps({"action": "scrape", "files": {
                **{h.decode("latin-1"): c for h, c in files.items()},
                "short": {"complete": 1}, "x" * 21: {"complete": 1}}})]
        if behaviour == "failure":
            return [json.dumps({"action": "scrape", "failure reason": "torrent not registered"})]
        if behaviour == "silent":
            return []
        return [ws_reply(files)]


def ws_samples(db: sqlite3.Connection, url: str) -> dict[str, tuple[int, int, int]]:
    """The numbers one tracker gave, by infohash."""
    tracker_id = db.execute("SELECT id FROM trackers WHERE url = ?",
                            (tsmd.normalise_tracker_url(url),)).fetchone()[0]
    return {infohash: (s, l, c) for infohash, s, l, c in db.execute(
        "SELECT t.infohash, s.seeders, s.leechers, s.completed FROM tracker_samples s "
        "JOIN torrents t ON t.id = s.torrent_id WHERE s.tracker_id = ?", (tracker_id,))}


def test_ws_scrape_one_connection_for_every_batch_and_window(tmp_path):
    hashes = [hashlib.sha1(f"torrent {n}".encode()).digest() for n in range(130)]
    known = known_counts(hashes[:120], 6)  # the last ten are unknown: left out of the replies
    tracker = FakeWebSocketTracker(known, "chatty")

    async def scenario():
        async with trio.open_nursery() as nursery:
            await nursery.start(tracker.serve)
            db, _ = torrent_db(tmp_path, 130, [tracker.url])
            settings = scrape_settings(tmp_path, window=4)
            counts = await tsmd.run_scrape(db, settings, settings.collections,
                                           tsmd.Reporter(-1))
            assert await tracker.all_closed()  # when done, not at the end of the process
            nursery.cancel_scope.cancel()
        return db, counts

    db, counts = run(scenario)
    # Three messages of at most 50 hashes (one a canary), one at a time on one connection
    # although four workers asked; the offers before each reply are skipped; unknown hashes
    # are not asked again.
    assert (tracker.connections, tracker.scrapes, tracker.hashes_asked) == (1, 3, 130 + 3)
    assert (counts.trackers_ok, counts.requests, counts.retries, counts.hashes_answered) == \
        (1, 3, 0, 120)
    assert ws_samples(db, tracker.url) == {h.hex(): c for h, c in known.items()}
    health = tsmd.load_tracker_health(db)[0]
    assert health.url == tsmd.normalise_tracker_url(tracker.url) and health.rtt_ms is not None


def test_ws_scrape_hostile_trackers_are_counted_errors(tmp_path):
    """Each way a WebSocket tracker can fail ends as its error in the tally and the tracker
    health, in bounded time; run_scrape goes on, and good entries beside bad ones count."""
    hashes = [hashlib.sha1(f"torrent {n}".encode()).digest() for n in range(60)]
    known = known_counts(hashes, 8)
    behaviours = ("chatty", "mangled", "huge", "garbage", "silent", "failure", "babbling")
    trackers = {b: FakeWebSocketTracker(known, b) for b in behaviours}

    async def scenario():
        async with trio.open_nursery() as nursery:
            for tracker in trackers.values():
                await nursery.start(tracker.serve)
            db, _ = torrent_db(tmp_path, 60, [t.url for t in trackers.values()])
            settings = scrape_settings(tmp_path, timeout=0.3, attempts=2, window=2)
            began = trio.current_time()
            counts = await tsmd.run_scrape(db, settings, settings.collections,
                                           tsmd.Reporter(-1))
            elapsed = trio.current_time() - began
            for tracker in trackers.values():
                assert await tracker.all_closed(), tracker.behaviour
            nursery.cancel_scope.cancel()
        return db, counts, elapsed

    db, counts, elapsed = run(scenario, timeout=60)
    # The silent one costs two attempts of 0.3 s and a close handshake each; the rest less.
    assert elapsed < 5
    assert (counts.trackers, counts.trackers_ok, counts.trackers_failed) == (7, 2, 5)
    assert counts.torrents_answered == 60 and counts.hashes_answered == 120
    # Two messages to the mangled tracker, two unreadable keys in each.
    assert counts.bad_entries == 4
    assert ws_samples(db, trackers["mangled"].url) == {h.hex(): c for h, c in known.items()}
    errors = {row.url: row.last_error for row in tsmd.load_tracker_health(db)}
    error = {b: errors[tsmd.normalise_tracker_url(t.url)] for b, t in trackers.items()}
    assert error["chatty"] is None and error["mangled"] is None
    assert error["huge"].startswith("WebSocket closed: 1009 Exceeded maximum message size")
    assert error["garbage"].startswith("tracker message is not JSON")
    assert error["silent"] == "no reply within 0.3 s (2 attempts)"
    assert error["failure"] == "tracker failure: 'torrent not registered'"
    assert error["babbling"] == f"{tsmd.MAX_WS_OTHER_MESSAGES + 1} messages in a row, none a " \
                                "scrape reply"
    # Given up at once where asking again cannot help; asked again, on a new connection, after
    # a silence; nothing asked after the first failure.
    assert {b: (t.connections, t.scrapes) for b, t in trackers.items()
            if b not in ("chatty", "mangled")} == {
        "huge": (1, 1), "garbage": (1, 1), "silent": (2, 2), "failure": (1, 1),
        "babbling": (1, 1)}
    assert counts.retries == 1  # the silent tracker's second attempt


def test_ws_scrape_closes_its_connection_when_cancelled(tmp_path):
    tracker = FakeWebSocketTracker({}, "silent")
    options = tsmd.ScrapeOptions(udp_batch=70, http_batch=50, timeout=30, attempts=1, window=2,
                                 allow_private=True)

    async def scenario():
        async with trio.open_nursery() as nursery:
            await nursery.start(tracker.serve)
            fetcher = tsmd.make_fetcher(scrape_settings(tmp_path))
            with trio.move_on_after(0.5) as waited:  # as Ctrl-C, or a run's deadline
                await tsmd.scrape_tracker(
                    tsmd.TrackerJob(tsmd.normalise_tracker_url(tracker.url), [b"h" * 20]),
                    options, None, fetcher, None)
            assert waited.cancelled_caught and tracker.scrapes == 1
            assert await tracker.all_closed()
            await fetcher.aclose()
            nursery.cancel_scope.cancel()

    run(scenario)
    assert tracker.connections == tracker.closed == 1


def test_ws_scrape_handshake_refused_and_private_addresses(tmp_path):
    """A URL whose server answers HTTP, not a WebSocket, is that tracker's error; and ws
    trackers follow the address policy of HTTP trackers."""
    with FakeHttpTracker({}) as http_server:
        not_websocket = f"ws://127.0.0.1:{http_server.port}/announce"
        db, _ = torrent_db(tmp_path, 3, [not_websocket])
        settings = scrape_settings(tmp_path)
        counts = run(tsmd.run_scrape, db, settings, settings.collections, tsmd.Reporter(-1))
        assert http_server.scrapes == 1  # the handshake's GET
    assert counts.trackers_failed == 1
    assert tsmd.load_tracker_health(db)[0].last_error == "WebSocket handshake refused: HTTP 200"
    db.close()
    (tmp_path / "private").mkdir()
    db, _ = torrent_db(tmp_path / "private", 3, ["ws://localhost:1/", "wss://127.0.0.1:1/"])
    settings = tsmd.dataclasses.replace(scrape_settings(tmp_path / "private"),
                                        network=tsmd.NetworkSettings(allow_private=False))
    counts = run(tsmd.run_scrape, db, settings, settings.collections, tsmd.Reporter(-1))
    assert counts.trackers_failed == 2 and counts.retries == 0
    assert all("not a public address" in row.last_error for row in tsmd.load_tracker_health(db))


async def connect_proxy(seen: list[str], task_status=trio.TASK_STATUS_IGNORED) -> None:
    """An HTTP proxy on 127.0.0.1 that knows CONNECT alone: it notes each request line,
    connects, answers 200 and copies bytes both ways."""
    async def copy(source, sink) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(sink)

    async def handle(client) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = await client.receive_some(4096)
            if not data:
                return
            head += data
        request_line = head.split(b"\r\n")[0].decode()
        seen.append(request_line)
        host, port = request_line.split()[1].rsplit(":", 1)
        upstream = await trio.open_tcp_stream(host.strip("[]"), int(port))
        await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(copy, client, upstream)
            nursery.start_soon(copy, upstream, client)

    await trio.serve_tcp(handle, 0, host="127.0.0.1", task_status=task_status)


def test_ws_scrape_through_a_proxy_tunnels_with_connect(tmp_path):
    hashes = [hashlib.sha1(f"torrent {n}".encode()).digest() for n in range(20)]
    tracker = FakeWebSocketTracker(known_counts(hashes, 3))
    seen: list[str] = []

    async def scenario():
        async with trio.open_nursery() as nursery:
            await nursery.start(tracker.serve)
            listeners = await nursery.start(connect_proxy, seen)
            proxy = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/"
            db, _ = torrent_db(tmp_path, 20, [tracker.url])
            network = {"proxy": proxy, "timeout": 2, "connect_timeout": 2}
            settings = make_settings(tmp_path, [{"name": "c", "url": "http://x/", "type": "books"}],
                                     network={"allow_private": True, **network},
                                     scrape={"bind": "127.0.0.1:0", "timeout": 0.5})
            counts = await tsmd.run_scrape(db, settings, settings.collections, tsmd.Reporter(-1))
            # A private IP literal is refused before the proxy is asked: it cannot check it.
            public_only = make_settings(tmp_path, [], network={"allow_private": False, **network})
            fetcher = tsmd.make_fetcher(public_only)
            options = tsmd.ScrapeOptions(udp_batch=70, http_batch=50, timeout=0.5, attempts=2,
                                         window=1, allow_private=False)
            refused = await tsmd.scrape_tracker(
                tsmd.TrackerJob(tsmd.normalise_tracker_url(tracker.url), hashes),
                options, None, fetcher, None)
            await fetcher.aclose()
            nursery.cancel_scope.cancel()
        return db, counts, refused

    db, counts, refused = run(scenario)
    assert seen == [f"CONNECT 127.0.0.1:{tracker.port} HTTP/1.1"]
    assert counts.trackers_ok == 1 and counts.hashes_answered == 20
    assert ws_samples(db, tracker.url) == {h.hex(): c for h, c in known_counts(hashes, 3).items()}
    assert "127.0.0.1 is not a public address" in refused.error and refused.requests == 1
    assert len(seen) == 1


# ---- Scrape: a real tracker (Debian's opentracker, installed by .ci/run) ----

OPENTRACKER = "/usr/bin/opentracker"


class OpenTracker:
    """opentracker on 127.0.0.1 with kernel-chosen ports, a whitelist, stopped with SIGTERM.

    The Debian build only accepts announces of whitelisted hashes; run as root it chroots into
    its work folder (so the whitelist path is relative) and drops to `nobody`.
    """

    def __init__(self, workdir: Path, infohashes: list[bytes]) -> None:
        if not os.access(OPENTRACKER, os.X_OK):
            cannot_test(f"{OPENTRACKER} is missing: .ci/install-test-deps installs it (the "
                        "README's test command runs it)")
        workdir.mkdir(parents=True)
        workdir.chmod(0o755)
        whitelist = workdir / "whitelist"
        whitelist.write_text("".join(h.hex() + "\n" for h in infohashes))
        whitelist.chmod(0o644)
        lines = ["listen.udp 127.0.0.1:0", "listen.tcp 127.0.0.1:0", "access.whitelist whitelist",
                 f"tracker.rootdir {workdir}"]
        if os.geteuid() == 0:
            lines.append("tracker.user nobody")
        config = workdir / "opentracker.conf"
        config.write_text("\n".join(lines) + "\n")
        config.chmod(0o644)
        self.log = workdir / "opentracker.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen([OPENTRACKER, "-f", str(config)], cwd=workdir,
                                            stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self.udp_port = self.http_port = 0
        deadline = time.monotonic() + 10
        while not (self.udp_port and self.http_port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"opentracker did not start: {self.log.read_text()!r}")
            time.sleep(0.02)
            self.udp_port, self.http_port = self._listening_ports()

    def _listening_ports(self) -> tuple[int, int]:
        """Its ports, read from /proc: the socket inodes it holds, looked up in net/udp, tcp."""
        pid = self.process.pid
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
        ports = {}
        for proto in ("udp", "tcp"):
            with open(f"/proc/{pid}/net/{proto}") as table:
                next(table)
                for line in table:
                    cols = line.split()
                    if int(cols[9]) in inodes and (proto == "udp" or cols[3] == "0A"):
                        ports[proto] = int(cols[1].rsplit(":", 1)[1], 16)
        return ports.get("udp", 0), ports.get("tcp", 0)

    def udp_drops(self) -> int:
        """The kernel's count of datagrams dropped at opentracker's socket (buffer overflow)."""
        with open(f"/proc/{self.process.pid}/net/udp") as table:
            next(table)
            return sum(int(line.split()[-1]) for line in table
                       if line.split()[1].endswith(f":{self.udp_port:04X}"))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # not SIGINT: inside its chroot that aborts
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def bep15_announce(sock: socket.socket, port: int, infohash: bytes, peer_port: int, left: int,
                   event: int) -> None:
    """One real BEP 15 announce (connect, then announce) from the socket's own address."""
    def exchange(packet: bytes, tid: bytes) -> bytes:
        for _ in range(5):
            sock.sendto(packet, ("127.0.0.1", port))
            sock.settimeout(1)
            try:
                while True:
                    data, _ = sock.recvfrom(2048)
                    if data[4:8] == tid:
                        return data
            except socket.timeout:
                continue
        raise TimeoutError("opentracker did not answer")

    tid = os.urandom(4)
    connection_id = exchange(struct.pack("!QI", 0x41727101980, 0) + tid, tid)[8:16]
    tid = os.urandom(4)
    peer_id = b"-TT0001-" + os.urandom(12)
    reply = exchange(connection_id + struct.pack("!I", 1) + tid + infohash + peer_id
                     + struct.pack("!QQQIIIiH", 0, left, 0, event, 0, 0, -1, peer_port), tid)
    assert len(reply) >= 20, "announce refused (hash not whitelisted?)"


def populate_opentracker(tracker: OpenTracker, swarms: dict[bytes, tuple[int, int, int]]) -> None:
    """Announce from distinct addresses 127.0.x.y so that each hash has exactly the given
    (seeders, leechers, completed). Completed counts a seeder's event=completed once per peer;
    completions beyond the seeders come from peers that complete and then stop."""
    sockets: dict[str, socket.socket] = {}

    def peer(k: int) -> socket.socket:
        address = f"127.0.{k // 250}.{k % 250 + 2}"
        if address not in sockets:
            sockets[address] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sockets[address].bind((address, 0))
        return sockets[address]

    started, completed, stopped = 2, 1, 3
    try:
        for infohash, (seeders, leechers, done) in swarms.items():
            k = 0
            for i in range(seeders):
                bep15_announce(peer(k), tracker.udp_port, infohash, 6881, 0,
                               completed if i < done else started)
                k += 1
            for _ in range(max(0, done - seeders)):
                bep15_announce(peer(k), tracker.udp_port, infohash, 6881, 0, completed)
                bep15_announce(peer(k), tracker.udp_port, infohash, 6881, 0, stopped)
                k += 1
            for _ in range(leechers):
                bep15_announce(peer(k), tracker.udp_port, infohash, 6881, 1 << 20, started)
                k += 1
    finally:
        for sock in sockets.values():
            sock.close()


@pytest.fixture
def opentracker(tmp_path):
    hashes = [hashlib.sha1(f"torrent {n}".encode()).digest() for n in range(120)]
    tracker = OpenTracker(tmp_path / "opentracker", hashes)
    try:
        # Known swarms; a quarter of the hashes stay empty, so zeros are checked too.
        swarms = {h: (n % 5, n % 4, n % 5 + (n % 3 if n % 7 == 0 else 0))
                  for n, h in enumerate(hashes) if n % 4}
        populate_opentracker(tracker, swarms)
        yield tracker, hashes, swarms
    finally:
        tracker.stop()


def test_scrape_real_opentracker_udp_and_http_exact(tmp_path, opentracker):
    tracker, hashes, swarms = opentracker
    udp = f"udp://127.0.0.1:{tracker.udp_port}/announce"
    http = f"http://127.0.0.1:{tracker.http_port}/announce"
    db, _ = torrent_db(tmp_path, len(hashes), [udp, http])
    settings = scrape_settings(tmp_path, timeout=1)
    expected = {h.hex(): swarms.get(h, (0, 0, 0)) for h in hashes}
    for url in (udp, http):
        counts = run(tsmd.run_scrape, db, settings, settings.collections, tsmd.Reporter(-1),
                     only_trackers=[url])
        assert counts.trackers_ok == 1 and counts.retries == 0
        tracker_id = db.execute("SELECT id FROM trackers WHERE url = ?", (tsmd.normalise_tracker_url(url),)).fetchone()[0]
        got = {infohash: (s, l, c) for infohash, s, l, c in db.execute(
            "SELECT t.infohash, s.seeders, s.leechers, s.completed FROM tracker_samples s "
            "JOIN torrents t ON t.id = s.torrent_id WHERE s.tracker_id = ?", (tracker_id,))}
        if url == http:  # opentracker leaves hashes it never saw out of an HTTP scrape
            expected = {h: c for h, c in expected.items() if bytes.fromhex(h) in swarms}
        assert got == expected, url
    assert tracker.udp_drops() == 0


class WebTorrentTracker:
    """webtorrent's bittorrent-tracker (npm) on 127.0.0.1: UDP, HTTP and WebSocket."""

    SCRIPT = HERE / ".ci" / "webtorrent-tracker.mjs"

    def __init__(self) -> None:
        node = shutil.which("node")
        # npm ci writes this last: an install cut short leaves no half a tracker to start.
        if node is None or not (HERE / ".ci" / "node_modules" / ".package-lock.json").is_file():
            cannot_test("webtorrent's bittorrent-tracker is missing: .ci/install-test-npm installs "
                        "it, after .ci/install-test-deps installs Node.js and npm (the README's "
                        "test command runs both)")
        self.process = subprocess.Popen([node, str(self.SCRIPT)], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        start_new_session=True)
        ready = select.select([self.process.stdout], [], [], 20)[0]
        line = self.process.stdout.readline() if ready else b""
        if not line:
            self.stop()
            raise RuntimeError(f"bittorrent-tracker did not start: {self.process.stderr.read()!r}")
        ports = json.loads(line)
        self.udp_port, self.http_port = ports["udp"], ports["http"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def webtorrent_tracker():
    tracker = WebTorrentTracker()
    try:
        yield tracker
    finally:
        tracker.stop()


def test_scrape_real_webtorrent_tracker_udp_and_mangled_http_keys_exact(tmp_path,
                                                                         webtorrent_tracker):
    tracker = webtorrent_tracker
    udp = f"udp://127.0.0.1:{tracker.udp_port}"
    http = f"http://127.0.0.1:{tracker.http_port}/announce"
    db, hashes = torrent_db(tmp_path, 60, [udp, http])
    # Hashes with bytes over 0x7f: bittorrent-tracker's HTTP scrape sends those UTF-8-encoded.
    assert sum(1 for h in hashes if max(h) > 0x7F) > 50
    swarms = {h: (n % 4, n % 3, 0) for n, h in enumerate(hashes) if n % 5}
    populate_opentracker(tracker, swarms)  # BEP 15 announces from distinct 127.x addresses
    settings = scrape_settings(tmp_path, timeout=1)
    for url in (udp, http):
        counts = run(tsmd.run_scrape, db, settings, settings.collections, tsmd.Reporter(-1),
                     only_trackers=[url])
        assert counts.trackers_ok == 1 and counts.bad_entries == 0, url
        tracker_id = db.execute("SELECT id FROM trackers WHERE url = ?", (tsmd.normalise_tracker_url(url),)).fetchone()[0]
        got = {infohash: (s, l) for infohash, s, l in db.execute(
            "SELECT t.infohash, s.seeders, s.leechers FROM tracker_samples s "
            "JOIN torrents t ON t.id = s.torrent_id WHERE s.tracker_id = ?", (tracker_id,))}
        # It answers every hash, known or not, over both.
        assert got == {h.hex(): swarms.get(h, (0, 0, 0))[:2] for h in hashes}, url


# ---- Trackers that lie, and full scrapes ----


def test_hash_queue_puts_one_canary_in_the_place_of_a_real_hash():
    hashes = [hashlib.sha1(b"%d" % n).digest() for n in range(150)]
    queue = tsmd._HashQueue(hashes, 70, canaries=True)
    batches = []
    while batch := queue.take():
        batches.append(batch)
    assert [len(b) for b in batches] == [70, 70, 13]  # 69 + 69 + 12 real, one canary each
    canaries = [[h for h in b if queue.is_canary(h)] for b in batches]
    assert all(len(c) == 1 for c in canaries) and len({c[0] for c in canaries}) == 3
    assert [h for b in batches for h in b if not queue.is_canary(h)] == hashes
    # Not always in the same place: a tracker cannot tell it by its position.
    places = set()
    for _ in range(20):
        queue = tsmd._HashQueue(hashes, 70, canaries=True)
        places.add(next(i for i, h in enumerate(queue.take()) if queue.is_canary(h)))
    assert len(places) > 1
    # A left-out canary is not asked again; a batch of one carries none (it would double it).
    queue = tsmd._HashQueue(hashes[:5], 3, canaries=True)
    first = queue.take()
    queue.give_back(first, 1, shrink=True)
    assert queue.batch == 1 and sorted(queue.pending) == sorted(hashes[:5])
    assert not any(queue.is_canary(h) for h in queue.take())
    assert all(not queue.is_canary(h) for h in tsmd._HashQueue(hashes, 70).take())


def tracker_samples(db: sqlite3.Connection, url: str) -> dict[str, tuple[int, int, int, int]]:
    """infohash -> (seeders, leechers, completed, trusted) of `url`'s samples."""
    return {infohash: tuple(rest) for infohash, *rest in db.execute(
        "SELECT t.infohash, s.seeders, s.leechers, s.completed, s.trusted FROM tracker_samples s "
        "JOIN torrents t ON t.id = s.torrent_id JOIN trackers r ON r.id = s.tracker_id "
        "WHERE r.url = ?", (tsmd.normalise_tracker_url(url),))}


def test_a_fabricating_tracker_is_caught_by_canaries_and_its_numbers_are_not_used(
        tmp_path, opentracker):
    honest, hashes, swarms = opentracker
    udp = f"udp://127.0.0.1:{honest.udp_port}"
    # Liars in the field answer 10-14 seeders for any hash, dead or not. One lies over UDP at
    # once; one over HTTP; one is honest for its first scrape, then lies.
    liars = [FakeUdpTracker({}, fabricate=(14, 3, 40)),
             FakeUdpTracker({h: c for h, c in swarms.items()}, fabricate=(11, 0, 0),
                            fabricate_after_scrapes=1)]
    with FakeHttpTracker({}, fabricate=(12, 5, 0)) as http_liar:
        async def scenario():
            async with trio.open_nursery() as nursery:
                for liar in liars:
                    await nursery.start(liar.serve)
                db, _ = torrent_db(tmp_path, len(hashes),
                                   [udp, liars[0].url, liars[1].url, http_liar.url])
                settings = scrape_settings(tmp_path, timeout=1)
                run_id = tsmd.start_run(db, "scrape")
                counts = await tsmd.run_scrape(db, settings, settings.collections,
                                               tsmd.Reporter(-1), run_id=run_id)
                tsmd.finish_run(db, run_id, "ok", {})
                nursery.cancel_scope.cancel()
            return db, counts

        db, counts = run(scenario, timeout=60)
    assert counts.trackers == 4 and counts.trackers_fabricating == 3
    assert counts.torrents_answered == len(hashes)  # by the honest one
    # Exactly the honest numbers: a liar raises no torrent, dead or alive.
    assert numbers(db) == {h.hex(): swarms.get(h, (0, 0, 0)) for h in hashes}
    assert {row.infohash: (row.tracker, row.trackers_answered)
            for row in tsmd.load_report_rows(db)} == {h.hex(): (udp, 1) for h in hashes}
    # Stored as evidence, untrusted, every one of the run: also those the late liar answered
    # honestly before it was caught.
    for liar in (liars[0].url, liars[1].url, http_liar.url):
        samples = tracker_samples(db, liar)
        assert len(samples) == len(hashes) and {s[3] for s in samples.values()} == {0}, liar
    assert {s[3] for s in tracker_samples(db, udp).values()} == {1}
    assert db.execute("SELECT count(*) FROM tracker_latest WHERE trusted").fetchone()[0] == \
        len(hashes)
    # The seeder history is folded from trusted samples only.
    tsmd.summarize_scrape_runs(db)
    assert {infohash: trend.rpartition(";")[2] for infohash, trend in db.execute(
        "SELECT t.infohash, s.trend FROM seeder_trends s JOIN torrents t ON t.id = s.torrent_id")
            } == {h.hex(): str(swarms.get(h, (0,))[0]) for h in hashes}
    # Canaries never leave the stage: every sample is of a listed torrent, none of a canary.
    assert db.execute("SELECT count(*) FROM tracker_samples").fetchone()[0] == 4 * len(hashes)
    # `tsmd trackers` has the evidence.
    health = {row.url: row for row in tsmd.load_tracker_health(db)}
    assert health[udp].unused_because is None
    for liar, (seeders, leechers) in ((liars[0].url, (14, 3)), (http_liar.url, (12, 5))):
        assert re.fullmatch(rf"invents numbers: answered {seeders} seeders and {leechers} "
                            r"leechers for [0-9a-f]{40}, a random infohash that nobody announced",
                            health[liar].unused_because), health[liar]
        assert health[liar].fabricating_since is not None
    # Cost: one canary per request, in a place a real hash would have had.
    assert liars[0].hashes_asked == len(hashes) + liars[0].scrapes
    assert liars[0].scrapes == math.ceil(len(hashes) / 69)


def test_a_tracker_honest_again_is_cleared_and_one_trusted_or_excluded_is_not_tested(tmp_path):
    hashes = [hashlib.sha1(f"torrent {n}".encode()).digest() for n in range(150)]
    lying = FakeUdpTracker(known_counts(hashes, 1), fabricate=(9, 9, 9))
    trusted = FakeUdpTracker(known_counts(hashes, 2), fabricate=(20, 0, 0))
    excluded = FakeUdpTracker(known_counts(hashes, 30))

    async def scenario():
        async with trio.open_nursery() as nursery:
            for tracker in (lying, trusted, excluded):
                await nursery.start(tracker.serve)
            db, _ = torrent_db(tmp_path, 150, [lying.url, trusted.url, excluded.url])
            settings = scrape_settings(tmp_path, trusted=[trusted.url],
                                       exclude=[excluded.url + "/announce"])
            first = await tsmd.run_scrape(db, settings, settings.collections, tsmd.Reporter(-1))
            lying.fabricate = None
            second = await tsmd.run_scrape(db, settings, settings.collections, tsmd.Reporter(-1))
            nursery.cancel_scope.cancel()
        return db, first, second

    db, first, second = run(scenario, timeout=60)
    assert first.trackers_excluded == 1 and excluded.scrapes == 0  # never asked
    assert first.trackers_fabricating == 1 and second.trackers_fabricating == 0
    # The trusted tracker carried no canary: 70 real hashes a packet, its numbers count.
    assert trusted.scrapes == 2 * 3 and trusted.hashes_asked == 2 * 150
    health = {row.url: row for row in tsmd.load_tracker_health(db, excluded=[excluded.url])}
    assert health[lying.url].fabricating is None  # honest this run: cleared
    assert "1 fabricating (their numbers are not used)" in first.summary()
    assert "fabricating" not in second.summary()
    expected = {h.hex(): max(a, b) for h, a, b in zip(
        hashes, (c[0] for c in known_counts(hashes, 1).values()),
        (c[0] for c in known_counts(hashes, 2).values()))}
    assert {row.infohash: row.seeders for row in tsmd.load_report_rows(
        db, excluded=[excluded.url])} == expected
    # Numbers an excluded tracker gave before it was excluded do not count either.
    tracker_id = db.execute("SELECT id FROM trackers WHERE url = ?", (excluded.url,)).fetchone()
    if tracker_id is None:
        tracker_id = db.execute("INSERT INTO trackers (url) VALUES (?)",
                                (excluded.url,)).lastrowid
    else:
        tracker_id = tracker_id[0]
    with tsmd.Transaction(db):
        db.execute(INSERT_SAMPLES + "(1, ?, NULL, ?, 99, 0, 0)", (tracker_id, int(time.time())))
    first_hash = db.execute("SELECT infohash FROM torrents WHERE id = 1").fetchone()[0]
    assert {r.infohash: r.seeders for r in tsmd.load_report_rows(db)}[first_hash] == 99
    assert {r.infohash: r.seeders for r in tsmd.load_report_rows(
        db, excluded=[excluded.url])}[first_hash] == expected[first_hash]


def test_tsmd_trackers_check_and_the_page_grey_out_unused_trackers(tmp_path):
    hashes = [hashlib.sha1(f"torrent {n}".encode()).digest() for n in range(3)]
    with FakeHttpTracker(known_counts(hashes, 3)) as honest, \
            FakeHttpTracker({}, fabricate=(12, 1, 0)) as liar:
        excluded = "udp://excluded.example:6969"
        db, _ = torrent_db(tmp_path, 3, [honest.url, liar.url, excluded])
        db.close()
        config = tmp_path / "tsmd.toml"
        config.write_text(
            'database = "tsmd.sqlite3"\n[network]\nallow_private = true\n'
            f'[scrape]\ntimeout = "1s"\nexclude = ["{excluded}"]\n'
            '[[collections]]\nname = "c"\nurl = "http://x/"\ntype = "books"\n')
        scrape = cli("--config", str(config), "scrape")
        assert scrape.returncode == 0, scrape.stderr
        assert "1 excluded, 1 fabricating (their numbers are not used)" in scrape.stderr
        assert f"tracker {liar.url!r} invents numbers, which are not used" in scrape.stderr
        listed = cli("--config", str(config), "trackers", "--format", "json")
        unused = {row["url"]: row["unused_because"] for row in json.loads(listed.stdout)}
        assert unused[honest.url] is None
        assert unused[liar.url].startswith("invents numbers: answered 12 seeders and 1 leechers")
        table = cli("--config", str(config), "trackers", env={"COLUMNS": "300"})
        assert "not used: invents numbers" in table.stdout
        page = cli("--config", str(config), "report", "--format", "html").stdout
        section = page[page.index("Trackers whose numbers are not used"):]
        assert html.escape(liar.url) in section and excluded in section
        assert "excluded by [scrape].exclude" in section
        checked = cli("--config", str(config), "check", "--no-dht", "--format", "json",
                           hashes[0].hex())
        result = json.loads(checked.stdout)
        by_url = {t["url"]: t for t in result["trackers"]}
        assert by_url[liar.url]["distrusted"].startswith("invents numbers")
        assert by_url[excluded]["distrusted"] == "excluded by [scrape].exclude, not asked"
        assert by_url[honest.url]["distrusted"] is None
        assert result["seeders"] == known_counts(hashes, 3)[hashes[0]][0]


def test_a_reply_of_nothing_but_the_canary_distrusts_what_came_before(tmp_path):
    hashes = [hashlib.sha1(f"torrent {n}".encode()).digest() for n in range(120)]
    with FakeHttpTracker(known_counts(hashes, 2), fabricate=(9, 0, 0), honest_scrapes=1) as sly:
        db, _ = torrent_db(tmp_path, 120, [sly.url])
        # One request at a time: the honest reply is stored before the lies come.
        settings = scrape_settings(tmp_path, window=1)
        counts = run(tsmd.run_scrape, db, settings, settings.collections, tsmd.Reporter(-1))
        # A liar's samples are not fresh numbers: --stale-after asks for every torrent again.
        again = run(tsmd.run_scrape, db, settings, settings.collections, tsmd.Reporter(-1),
                    stale_after=3600)
        assert again.torrents == 120
    # (Hashes left out after its answered canary are asked once more: how many depends on
    # where the canaries fell.)
    assert sly.scrapes >= 3 and counts.trackers_fabricating == 1
    samples = tracker_samples(db, sly.url)
    assert len(samples) == 49 and {s[3] for s in samples.values()} == {0}
    assert counts.torrents_answered == 0
    assert {row.seeders for row in tsmd.load_report_rows(db)} == {-1}


def test_what_trackers_handed_over_is_written_when_the_writer_is_cancelled(tmp_path):
    db, hashes = torrent_db(tmp_path, 30, [])
    tracker_id = db.execute("INSERT INTO trackers (url) VALUES ('udp://t.example:1')").lastrowid
    torrent_ids = {h: n + 1 for n, h in enumerate(hashes)}
    writer = tsmd.ScrapeWriter(db, torrent_ids, None, int(time.time()))
    counts = tsmd.ScrapeCounts(5, 1, 0)

    async def scenario():
        send, receive = trio.open_memory_channel(10)
        send.send_nowait(tsmd.ScrapeAnswers(tracker_id, [(h, counts) for h in hashes[:20]],
                                            False))
        # The verdict on the same tracker, from a reply that held only a canary.
        send.send_nowait(tsmd.ScrapeAnswers(tracker_id, [], True))
        send.send_nowait(tsmd.ScrapeAnswers(tracker_id, [(h, counts) for h in hashes[20:]],
                                            True))
        with trio.CancelScope() as scope:
            scope.cancel()  # as Ctrl-C before the writer read any of them
            await writer.consume(receive, tsmd._NoProgress(), 0)

    run(scenario)
    writer.flush()
    assert db.execute("SELECT count(*), sum(trusted) FROM tracker_samples").fetchone() == (30, 0)


def test_a_tracker_that_leaves_unknown_hashes_out_is_cleared_once_honest(tmp_path):
    """opentracker over HTTP answers no canary at all: answering the real hashes and no
    canary is what an honest one does, and its numbers are used: it is no liar any more."""
    hashes = [hashlib.sha1(f"torrent {n}".encode()).digest() for n in range(60)]
    with FakeHttpTracker(known_counts(hashes, 4), fabricate=(13, 2, 0)) as tracker:
        db, _ = torrent_db(tmp_path, 60, [tracker.url])
        settings = scrape_settings(tmp_path)
        first = run(tsmd.run_scrape, db, settings, settings.collections, tsmd.Reporter(-1))
        assert first.trackers_fabricating == 1
        assert tsmd.load_unused_trackers(db)[0][0] == tracker.url
        tracker.fabricate = None  # it leaves unknown hashes out now
        second = run(tsmd.run_scrape, db, settings, settings.collections, tsmd.Reporter(-1))
    assert second.trackers_fabricating == 0 and second.canaries == 0
    assert tsmd.load_unused_trackers(db) == []
    assert numbers(db) == {h.hex(): c for h, c in known_counts(hashes, 4).items()}


def test_a_failed_full_scrape_on_a_hunch_does_not_fail_the_tracker(tmp_path):
    # Per-hash scrapes answered empty (its swarms are gone), and no full scrape to give.
    with FakeHttpTracker({}, full_scrape_body=b"d14:failure reason8:disablede") as tracker:
        db, _ = torrent_db(tmp_path, 10, [tracker.url])
        settings = scrape_settings(tmp_path)
        first = run(tsmd.run_scrape, db, settings, settings.collections, tsmd.Reporter(-1))
        assert (first.trackers_ok, first.trackers_failed, tracker.full_scrapes) == (1, 0, 1)
        run(tsmd.run_scrape, db, settings, settings.collections, tsmd.Reporter(-1))
        assert tracker.full_scrapes == 1  # not tried again
    assert db.execute("SELECT consecutive_failures, next_attempt, last_error, full_scrape "
                      "FROM trackers").fetchone() == (0, None, None, 0)


def test_check_asks_a_full_scrape_only_of_trackers_known_to_serve_one(tmp_path):
    infohash = hashlib.sha1(b"torrent 0").hexdigest()
    with FakeHttpTracker({}, full_scrape_only=True) as stranger:
        config = write_config(tmp_path, 'database = "tsmd.sqlite3"\n[network]\n'
                                        'allow_private = true\n')
        magnet = tsmd.magnet_uri(infohash, "one", [stranger.url])
        done = cli("--config", str(config), "check", magnet, "--no-dht", "-f", "json")
        # One hash it does not know is no sign it serves only full scrapes: not downloaded.
        assert json.loads(done.stdout)["trackers"][0]["error"] == "did not know the torrent"
        assert stranger.full_scrapes == 0
        db = tsmd.open_database(tmp_path / "tsmd.sqlite3")
        with tsmd.Transaction(db):
            db.execute("INSERT INTO trackers (url, full_scrape) VALUES (?, 1)", (stranger.url,))
        db.close()
        done = cli("--config", str(config), "check", magnet, "--no-dht", "-f", "json")
        assert stranger.full_scrapes == 1  # learnt by a run: asked for just that


def test_full_scrape_only_tracker_is_exact_with_one_request_per_run(tmp_path):
    hashes = [hashlib.sha1(f"torrent {n}".encode()).digest() for n in range(300)]
    counts = known_counts(hashes, 6)
    # It also tracks 5,000 swarms of no collection: only ours are kept.
    others = {hashlib.sha1(b"other %d" % n).digest(): (1, 1, 1) for n in range(5000)}
    with FakeHttpTracker({**counts, **others}, full_scrape_only=True) as tracker:
        db, _ = torrent_db(tmp_path, 300, [tracker.url])
        settings = scrape_settings(tmp_path)
        first = run(tsmd.run_scrape, db, settings, settings.collections, tsmd.Reporter(-1))
        # Per-hash scrapes came back empty, so the full scrape was asked, once.
        assert first.full_scrapes == 1 and tracker.full_scrapes == 1
        assert first.hashes_answered == 300 and first.trackers_ok == 1
        assert numbers(db) == {h.hex(): c for h, c in counts.items()}
        asked = tracker.scrapes
        second = run(tsmd.run_scrape, db, settings, settings.collections, tsmd.Reporter(-1))
        assert second.full_scrapes == 1 and tracker.scrapes == asked + 1  # remembered
        assert second.hashes_answered == 300
    health = {row.url: row for row in tsmd.load_tracker_health(db)}
    assert health[tracker.url].full_scrape


def test_full_scrape_when_configured_and_its_defects(tmp_path, monkeypatch):
    hashes = [hashlib.sha1(f"torrent {n}".encode()).digest() for n in range(50)]
    counts = known_counts(hashes, 8)
    entries = {h: {b"complete": c[0], b"incomplete": c[1], b"downloaded": c[2]}
               for h, c in counts.items()}
    good = bencoder.bencode({b"files": entries})
    big = bencoder.bencode({b"files": {**entries, **{hashlib.sha1(b"%d" % n).digest(): {}
                                                     for n in range(5000)}}})
    # Decoded size is capped as it is decoded: a gzip bomb costs no more than the cap.
    monkeypatch.setattr(tsmd, "MAX_FULL_SCRAPE_DECODED", len(big) // 2)
    cases = {
        "exact": (good, 50, None),
        "cut short": (good[:-30], 0, "full scrape: full scrape ends in an entry cut short"),
        "no end": (good[:-2], 0, "full scrape: full scrape cut short"),
        "not bencode": (b"<html>challenge</html>", 0, "full scrape: scrape reply is not a"),
        "failure": (b"d14:failure reason9:forbiddene", 0,
                    "full scrape: tracker failure: forbidden"),
        "over the cap": (big, 0, f"full scrape: gzip data inflates to more than "
                                 f"{len(big) // 2:,} bytes, over the limit"),
    }
    for name, (body, answered, error) in cases.items():
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        with FakeHttpTracker(counts, full_scrape_body=body) as tracker:
            db, _ = torrent_db(folder, 50, [tracker.url])
            settings = scrape_settings(folder, full_scrape=[tracker.url])
            result = run(tsmd.run_scrape, db, settings, settings.collections, tsmd.Reporter(-1))
            assert tracker.scrapes == tracker.full_scrapes == 1, name  # not asked per hash
        assert result.hashes_answered == answered, name
        last_error = db.execute("SELECT last_error FROM trackers").fetchone()[0]
        assert (last_error or "").startswith(error or ""), (name, last_error)
        assert (last_error is None) == (error is None), name
        if answered:
            assert numbers(db) == {h.hex(): c for h, c in counts.items()}


def test_real_opentracker_gzip_full_scrape_exact(tmp_path, opentracker):
    tracker, hashes, swarms = opentracker
    http = f"http://127.0.0.1:{tracker.http_port}/announce"
    db, _ = torrent_db(tmp_path, len(hashes), [http])
    settings = scrape_settings(tmp_path, timeout=1, full_scrape=[http])
    counts = run(tsmd.run_scrape, db, settings, settings.collections, tsmd.Reporter(-1))
    assert counts.full_scrapes == 1 and counts.requests == 1 and counts.trackers_ok == 1
    # It lists only the swarms it has: those are exact.
    assert tracker_samples(db, http) == {h.hex(): (*c, 1) for h, c in swarms.items()}


def test_full_scrape_reader_tries_a_stuck_token_again_only_when_the_data_doubled(monkeypatch):
    """Found by the fuzzer: 100,000 `l`s a byte at a time were a scan of everything so far per
    byte (minutes); now each try waits for twice the data."""
    reads = []
    original = tsmd.FullScrapeReader._read
    monkeypatch.setattr(tsmd.FullScrapeReader, "_read",
                        lambda self, *args, **kw: reads.append(1) or original(self, *args, **kw))
    reader = tsmd.FullScrapeReader({b"a" * 20})
    body = b"d5:filesd20:" + b"a" * 20 + b"l" * 100_000
    with pytest.raises(tsmd.ProtocolError, match="nested deeper"):
        for byte in range(len(body)):
            reader.feed(body[byte:byte + 1])
        reader.finish()
    assert len(reads) < 40  # log2 of the 64 KiB an entry may take, and a few more
    # An entry cut by every chunk boundary is still read whole.
    whole = bencoder.bencode({b"files": {b"a" * 20: {b"complete": 7}}})
    reader = tsmd.FullScrapeReader({b"a" * 20})
    for byte in range(len(whole)):
        reader.feed(whole[byte:byte + 1])
    assert reader.finish().files == {b"a" * 20: tsmd.ScrapeCounts(7, 0, 0)}


def test_full_scrape_entries_at_the_size_bound_read_alike_whole_and_in_chunks():
    for extra in (-1, 0, 1):  # an entry of 64 KiB - 1, 64 KiB, 64 KiB + 1 bytes
        entry = {b"complete": 1, b"name": b"n" * 60_000}  # its length has the final digits

        def size() -> int:  # of key and value, as the reader measures an entry
            return len(bencoder.bencode({b"a" * 20: entry})) - 2
        entry[b"name"] = b"n" * (60_000 + tsmd.MAX_FULL_SCRAPE_ENTRY + extra - size())
        assert size() == tsmd.MAX_FULL_SCRAPE_ENTRY + extra
        body = bencoder.bencode({b"files": {b"a" * 20: entry, b"b" * 20: {b"complete": 2}}})
        outcomes = {repr(read_full_scrape(body, step, {b"a" * 20, b"b" * 20}))
                    for step in (1000, 65536, len(body))}
        assert len(outcomes) == 1, extra
        assert (outcomes == {repr("error")}) == (extra > 0), extra


def read_full_scrape(body: bytes, step: int, wanted: set[bytes]) -> object:
    """What the reader makes of `body` fed `step` bytes at a time: the reply, or "error"."""
    reader = tsmd.FullScrapeReader(wanted)
    try:
        for start in range(0, len(body), step):
            reader.feed(body[start:start + step])
        return reader.finish()
    except tsmd.ProtocolError:
        return "error"


@given(st.dictionaries(st.binary(min_size=20, max_size=20), st.dictionaries(
    st.sampled_from([b"complete", b"incomplete", b"downloaded", b"name"]),
    st.one_of(st.integers(-2, 10**6), st.binary(max_size=70_000)), max_size=3), max_size=6),
    st.integers(min_value=1, max_value=5000), st.booleans())
@hsettings(max_examples=100, deadline=None)
def test_full_scrape_reader_reads_alike_however_the_chunks_fall(files, step, cut):
    body = bencoder.bencode({b"files": files})
    if cut:
        body = body[:len(body) * 2 // 3]
    wanted = set(list(files)[::2])
    assert read_full_scrape(body, step, wanted) == read_full_scrape(body, len(body) or 1, wanted)


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=64))
@hsettings(max_examples=400, deadline=None)
def test_full_scrape_reader_raises_only_protocol_errors(data, chunk):
    base = bencoder.bencode({b"files": {b"a" * 20: {b"complete": 1}, b"b" * 20: {}}})
    for body in (data, base[:len(data) % len(base)] + data, base + data):
        reader = tsmd.FullScrapeReader({b"a" * 20, b"b" * 20})
        try:
            for start in range(0, len(body), chunk):
                reader.feed(body[start:start + chunk])
            reader.finish()
        except tsmd.ProtocolError:
            pass


def test_scrape_real_webtorrent_tracker_over_websocket_exact(tmp_path, webtorrent_tracker):
    tracker = webtorrent_tracker
    ws = f"ws://127.0.0.1:{tracker.http_port}"  # its WebSocket shares the HTTP port, any path
    db, hashes = torrent_db(tmp_path, 120, [ws])
    assert sum(1 for h in hashes if max(h) > 0x7F) > 100  # keys beyond ASCII, both ways
    assert sum(1 for h in hashes if min(h) < 0x20) > 50  # and keys that JSON escapes
    swarms = {h: (n % 4, n % 3, 0) for n, h in enumerate(hashes) if n % 5}
    populate_opentracker(tracker, swarms)  # BEP 15 announces: the swarms are the tracker's own
    settings = scrape_settings(tmp_path, timeout=1)
    counts = run(tsmd.run_scrape, db, settings, settings.collections, tsmd.Reporter(-1),
                 only_trackers=[ws])
    assert (counts.trackers_ok, counts.requests, counts.retries, counts.bad_entries) == \
        (1, 3, 0, 0)
    # It answers every hash: one it never saw as 0/0/0; `downloaded` is its current seeders.
    assert ws_samples(db, ws) == {h.hex(): (s, l, s) for h, (s, l, _) in
                                  ((h, swarms.get(h, (0, 0, 0))) for h in hashes)}
    # `tsmd check` asks a ws tracker too.
    config = write_config(tmp_path, 'database = "check.sqlite3"\n[network]\nallow_private = '
                                    'true\n')
    seeded = next(h for h in hashes if swarms.get(h, (0,))[0] == 3)
    done = cli("--config", str(config), "check", seeded.hex(), "--no-dht", "--tracker", ws,
               "-f", "json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["seeders"], result["leechers"]) == swarms[seeded][:2]
    assert result["trackers"][0]["url"] == tsmd.normalise_tracker_url(ws)


# ---- KRPC and BEP 33 codecs ----


def test_bep5_examples_verbatim():
    query = tsmd.encode_get_peers(b"aa", b"abcdefghij0123456789", b"mnopqrstuvwxyz123456")
    # BEP 5's get_peers example, plus BEP 43's "ro": 1 at the top level.
    assert query == (b"d1:ad2:id20:abcdefghij01234567899:info_hash20:mnopqrstuvwxyz123456e"
                     b"1:q9:get_peers2:roi1e1:t2:aa1:y1:qe")
    with_values = tsmd.decode_krpc_untrusted(
        b"d1:rd2:id20:abcdefghij01234567895:token8:aoeusnth6:valuesl6:axje.u6:idhtnmee"
        b"1:t2:aa1:y1:re")
    reply = tsmd.decode_get_peers_reply_untrusted(with_values)
    assert with_values.transaction_id == b"aa" and reply.token == b"aoeusnth"
    assert reply.peers == (("97.120.106.101", 11893), ("105.100.104.116", 28269))
    with_nodes = tsmd.decode_krpc_untrusted(
        b"d1:rd2:id20:abcdefghij01234567895:nodes9:def456...5:token8:aoeusnthe1:t2:aa1:y1:re")
    reply = tsmd.decode_get_peers_reply_untrusted(with_nodes)
    assert reply.nodes == () and reply.bad_fields == 1  # 9 bytes: that field only is dropped
    error = tsmd.decode_krpc_untrusted(b"d1:eli201e23:A Generic Error Ocurrede1:t2:aa1:y1:ee")
    assert error.kind == b"e" and error.body == {b"code": 201, b"message": b"A Generic Error Ocurred"}


def test_compact_nodes_and_peers_ipv4_ipv6_mixed():
    v4 = tsmd.DhtNode(b"\x01" * 20, "1.2.3.4", 6881)
    v6 = tsmd.DhtNode(b"\x02" * 20, "2001:db8::1", 51413)
    body = {b"id": b"\x09" * 20, b"nodes": tsmd.encode_compact_node(v4) * 2,
            b"nodes6": tsmd.encode_compact_node(v6),
            b"values": [tsmd.encode_compact_peer("5.6.7.8", 80),
                        tsmd.encode_compact_peer("2001:db8::2", 443), b"short"]}
    reply = tsmd.decode_get_peers_reply_untrusted(tsmd.KrpcMessage(b"t", b"r", body))
    assert reply.nodes == (v4, v4, v6)
    assert reply.peers == (("5.6.7.8", 80), ("2001:db8::2", 443)) and reply.bad_fields == 1
    with pytest.raises(tsmd.ProtocolError):
        tsmd.decode_compact_nodes_untrusted(b"x" * 27)
    with pytest.raises(tsmd.ProtocolError):
        tsmd.decode_get_peers_reply_untrusted(tsmd.KrpcMessage(b"t", b"r", {b"id": b"short"}))


def test_bep33_vector_and_estimates():
    bloom = bytearray(tsmd.BLOOM_BYTES)
    for n in range(256):
        tsmd.bloom_insert(bloom, f"192.0.2.{n}")
    for n in range(1000):
        tsmd.bloom_insert(bloom, str(ipaddress.ip_address("2001:db8::") + n))
    assert abs(tsmd.bloom_estimate(bytes(bloom)) - 1224.9308) < 1e-4  # BEP 33 truncates
    assert tsmd.bloom_estimate(bytes(256)) == 0  # empty: 0, not BEP 33's raw 0.5
    assert 7800 < tsmd.bloom_estimate(b"\xff" * 256) < 7810  # saturated: a lower bound
    union = bytearray(256)
    tsmd.bloom_union(union, bytes(bloom))
    assert union == bloom


def test_every_truncation_and_corruption_of_a_krpc_reply_raises_only_protocol_error():
    body = {b"id": b"\x09" * 20, b"token": b"tok",
            b"nodes": tsmd.encode_compact_node(tsmd.DhtNode(b"\x01" * 20, "1.2.3.4", 1)),
            b"values": [tsmd.encode_compact_peer("5.6.7.8", 80)], b"BFsd": b"\x01" * 256}
    packet = bencoder.bencode({b"t": b"ab", b"y": b"r", b"r": body})
    for end in range(len(packet)):
        with pytest.raises(tsmd.ProtocolError):
            tsmd.decode_get_peers_reply_untrusted(tsmd.decode_krpc_untrusted(packet[:end]))
    for position in range(0, len(packet), 3):
        for byte in (b"x", b"e", b"0", b"l"):
            try:
                tsmd.decode_get_peers_reply_untrusted(tsmd.decode_krpc_untrusted(
                    packet[:position] + byte + packet[position + 1:]))
            except tsmd.ProtocolError:
                pass


@given(st.recursive(st.none() | st.integers() | st.binary(max_size=40),
                    lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(st.sampled_from([b"t", b"y", b"r", b"e", b"id", b"nodes",
                                                       b"values", b"token", b"BFsd", b"nodes6"]),
                                      children, max_size=5), max_leaves=20))
@hsettings(max_examples=400, deadline=None)
def test_krpc_parsers_raise_only_protocol_error_on_hostile_structures(value):
    try:
        data = bencoder.bencode(value)
    except Exception:
        return
    try:
        tsmd.decode_get_peers_reply_untrusted(tsmd.decode_krpc_untrusted(data))
    except tsmd.ProtocolError:
        pass


def test_per_address_limit_paces_each_address_and_forgets_idle_ones():
    clock = trio.testing.MockClock()

    async def scenario():
        limiter = tsmd.PerAddressLimiter(rate=1.0, burst=4)

        def send(host: str) -> float:
            wait = limiter.due(host)
            if wait == 0:
                limiter.take(host)
            return wait

        # A burst of 4, then one a second; another address is not held up.
        assert [send("192.0.2.1") for _ in range(5)] == [0, 0, 0, 0, 1]
        assert send("192.0.2.2") == 0
        clock.jump(1)
        assert [send("192.0.2.1") for _ in range(2)] == [0, 1]
        limiter.penalise("192.0.2.3", 10)
        for n in range(limiter.SWEEP_AT - len(limiter)):
            limiter.due(f"198.51.{n // 250}.{n % 250}")
        assert len(limiter) == limiter.SWEEP_AT
        clock.jump(5)  # every bucket refilled but the penalised one
        send("203.0.113.1")
        assert len(limiter) == 2
        # Still silenced: 10 s of penalty, 5 of them gone, and one token to refill.
        assert limiter.due("192.0.2.3") == pytest.approx(6)
        assert tsmd.PerAddressLimiter(rate=0, burst=4).due("192.0.2.1") == 0

    trio.run(scenario, clock=clock)


class RecordingEndpoint:
    """What DhtSurvey needs of a UdpEndpoint, on trio's clock alone: every packet is recorded
    and its node answers `delay` seconds later with the 8 known nodes closest to the target,
    or with error 202 as many times as `refusals` says for its host. Hosts in `filters_only`
    answer a scrape as libtorrent does (BEP 33 filters, no values), and those in `refuse_values`
    answer every query without scrape with 202; those in `silent` never answer, and those in
    `slow` answer after the delay it gives them. The socket buffer is full for the first `full`
    sends, and the kernel refuses every packet to `unsendable` hosts. Hosts in `values` answer
    the peers it gives them. IPv6 nodes go in `nodes6` (BEP 32): for the family that `want`
    names, or else the asking one's."""

    dual_stack = False

    def __init__(self, nodes: list[tsmd.DhtNode], delay: float, refusals=None,
                 full: int = 0, unsendable=(), filters_only=(), refuse_values=(),
                 silent=(), slow=None, values=None) -> None:
        self.nodes = nodes
        self.ids = {(node.host, node.port): node.node_id for node in nodes}
        self.delay, self.refusals, self.full = delay, dict(refusals or {}), full
        self.unsendable, self.silent, self.slow = set(unsendable), set(silent), dict(slow or {})
        self.filters_only, self.refuse_values = set(filters_only), set(refuse_values)
        self.values = dict(values or {})
        self.sent: list[tuple[float, str, dict]] = []
        self.pending: dict = {}
        self.counters = tsmd.UdpCounters()
        # Made here, not in receive_forever: a lookup may send before that task first runs.
        # One queue per delay, each in the order its answers are due.
        self.answers, self._answered = trio.open_memory_channel(math.inf)
        self._later = {delay: trio.open_memory_channel(math.inf)
                       for delay in set(self.slow.values())}

    def can_reach(self, host):
        return True

    def is_own_address(self, host, port):
        return False  # its nodes are all elsewhere

    def send_nowait(self, data, host, port):
        if self.full:
            self.full -= 1
            return None
        if host in self.unsendable:
            self.counters.send_errors += 1
            return False
        query = tsmd.bdecode_untrusted(data)
        self.sent.append((trio.current_time(), host, query))
        self.counters.sent += 1
        if host in self.slow:
            self._later[self.slow[host]][0].send_nowait(
                (trio.current_time() + self.slow[host], query, host, port))
        elif host not in self.silent:
            self.answers.send_nowait((trio.current_time() + self.delay, query, host, port))
        return True

    async def wait_writable(self):
        await trio.sleep(0.01)

    def expect(self, key, host, port, handler):
        self.pending[(key, host, port)] = handler

    def forget(self, key, host, port):
        self.pending.pop((key, host, port), None)

    def reply(self, query, host, port) -> tsmd.KrpcMessage:
        key, scrape = query[b"t"], query[b"a"].get(b"scrape") == 1
        if host in self.refuse_values and not scrape or self.refusals.get(host, 0) > 0:
            self.refusals[host] = self.refusals.get(host, 0) - 1
            return tsmd.KrpcMessage(key, b"e", {b"code": 202, b"message": b""})
        target = int.from_bytes(query[b"a"][b"info_hash"], "big")
        want = query[b"a"].get(b"want") or [b"n6" if ":" in host else b"n4"]
        body = {b"id": self.ids[(host, port)]}
        for key, family, ipv6 in ((b"nodes", b"n4", False), (b"nodes6", b"n6", True)):
            if family in want:
                closest = sorted((n for n in self.nodes if (":" in n.host) == ipv6),
                                 key=lambda n: int.from_bytes(n.node_id, "big") ^ target)[:8]
                body[key] = b"".join(tsmd.encode_compact_node(node) for node in closest)
        if host in self.values:
            body[b"values"] = [tsmd.encode_compact_peer(*peer) for peer in self.values[host]]
        if host in self.filters_only:
            if scrape:
                body[b"BFsd"] = body[b"BFpe"] = b"\x01" + bytes(tsmd.BLOOM_BYTES - 1)
            else:
                body[b"values"] = [tsmd.encode_compact_peer("192.0.2.99", 6881)]
        return tsmd.KrpcMessage(key, b"r", body)

    async def receive_forever(self):
        async with trio.open_nursery() as nursery:
            for _, answered in self._later.values():
                nursery.start_soon(self._answer, answered)
            await self._answer(self._answered)

    async def _answer(self, answered):
        async for due, query, host, port in answered:
            await trio.sleep_until(due)
            handler = self.pending.pop((query[b"t"], host, port), None)
            if handler is not None:
                handler(self.reply(query, host, port))


def paced_survey(endpoint, cache, bootstrap, lookups: int, want_ipv6=False, watch=None,
                 **options):
    """Survey `lookups` targets through `endpoint` on a MockClock; the survey and results.
    `watch(survey)` is called after each reply."""
    options = dht_test_options(**{"concurrency": lookups, "bep33": False, **options})
    results = []

    async def scenario():
        survey = tsmd.DhtSurvey(endpoint, cache, bootstrap, options, want_ipv6)
        told = None if watch is None else lambda _: watch(survey)
        with trio.fail_after(24 * 3600):  # on the mock clock: a lookup left hanging fails
            async with trio.open_nursery() as nursery:
                await nursery.start(survey.serve)
                async with trio.open_nursery() as looking:
                    async def one(n):
                        results.append(await survey.lookup(
                            hashlib.sha1(b"target %d" % n).digest(), told))
                    for n in range(lookups):
                        looking.start_soon(one, n)
                nursery.cancel_scope.cancel()
        return survey

    survey = trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    return survey, results


def paced_nodes(count: int, label: bytes = b"paced") -> list[tsmd.DhtNode]:
    """Nodes of distinct /24s of 198.18.0.0/15, as the survey asks one node per /24 in a
    lookup; their ids are the SHA-1 of `label` and their number."""
    return [tsmd.DhtNode(hashlib.sha1(b"%s %d" % (label, n)).digest(),
                         f"198.{18 + n // 250}.{n % 250 + 1}.1", 6881) for n in range(count)]


def test_dht_slow_nodes_stall_early_but_never_fail_early():
    """Nodes answer within 20 ms, one in 1.5 s: a query stalls after 0.1 s, but the slow
    node's answers still count, and it is not taken for silent."""
    nodes = paced_nodes(40)
    cache = tsmd.NodeCache()
    for node in nodes:
        cache.add(node, 0)
    slow = {nodes[3].host: 1.5}
    endpoint = RecordingEndpoint(nodes, delay=0.02, slow=slow)
    survey, results = paced_survey(endpoint, cache, [], 60, rate=0, stall_timeout=1,
                                   query_timeout=4)
    assert survey.round_trips.stall_after == tsmd.DHT_STALL_FLOOR
    assert survey.counters.timeouts == 0 and cache.silent_this_run() == []
    assert {node.host for node in cache.nodes()} >= set(slow)
    assert all(r.nodes_answered >= tsmd.DHT_K for r in results)


def test_dht_a_query_sent_while_older_ones_wait_to_expire_stalls_on_time():
    """The timer sleeps until the next query is due. A query sent while only older, stalled
    ones wait to expire is due to stall sooner than they expire: it must wake the timer."""
    target = hashlib.sha1(b"target 0").digest()
    nodes = sorted(paced_nodes(12), key=lambda node: xor(node.node_id, target))
    cache = tsmd.NodeCache()
    for node in nodes[:4]:  # three silent, then one that answers in 1.5 s, naming 4 more
        cache.add(node, 0)
    endpoint = RecordingEndpoint(nodes, delay=0.02, silent={n.host for n in nodes if n != nodes[3]},
                                 slow={nodes[3].host: 1.5})
    options = dht_test_options(concurrency=1, bep33=False, rate=0, stall_timeout=1,
                               query_timeout=4)
    stalled_at = {}

    async def scenario():
        survey = tsmd.DhtSurvey(endpoint, cache, [], options, False)
        async with trio.open_nursery() as nursery:
            await nursery.start(survey.serve)
            nursery.start_soon(survey.lookup, target)
            await trio.sleep(1.5 + 0.02)  # the slow node has answered: 4 more nodes asked
            [lookup] = survey._running
            newcomers = [lookup.candidates[(n.host, n.port)] for n in nodes[4:8]]
            assert all(c.state is tsmd.CandidateState.ASKED and not c.stalled
                       for c in newcomers)
            with trio.fail_after(10):  # (on the mock clock)
                while not all(c.stalled for c in newcomers):
                    await trio.sleep(0.01)
            stalled_at["newcomers"] = trio.current_time()
            nursery.cancel_scope.cancel()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    assert 2.5 <= stalled_at["newcomers"] < 2.6  # a second after they were asked, not at 4


def test_dht_a_shorter_stall_timeout_reaches_the_queries_in_flight():
    """A silent node asked at the start stalls once the first answers have shortened the
    stall timeout to 0.1 s, not after the configured second it was asked under."""
    targets = [hashlib.sha1(b"target %d" % n).digest() for n in range(40)]
    nodes = paced_nodes(40)
    silent = min(nodes, key=lambda node: xor(node.node_id, targets[0]))
    cache = tsmd.NodeCache()
    for node in nodes:
        cache.add(node, 0)
    endpoint = RecordingEndpoint(nodes, delay=0.02, silent={silent.host})
    options = dht_test_options(concurrency=40, bep33=False, rate=0, stall_timeout=1,
                               query_timeout=4)

    async def scenario():
        survey = tsmd.DhtSurvey(endpoint, cache, [], options, False)
        async with trio.open_nursery() as nursery:
            await nursery.start(survey.serve)
            for target in targets:
                nursery.start_soon(survey.lookup, target)
            await trio.sleep(0.5)
            assert survey.round_trips.stall_after == tsmd.DHT_STALL_FLOOR
            [waiting] = [lookup for lookup in survey._running
                         if lookup.result.infohash == targets[0]]
            assert waiting.candidates[(silent.host, silent.port)].stalled
            nursery.cancel_scope.cancel()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


def test_dht_lookups_in_flight_grow_with_each_answer_on_a_cold_start():
    """From a router alone, a few lookups at a time (its per-node burst) until K nodes have
    answered; then more start at once, before any lookup has ended."""
    nodes = paced_nodes(40)
    endpoint = RecordingEndpoint(nodes, delay=0.05)
    options = dht_test_options(concurrency=30, bep33=False, rate=0, per_ip_burst=4)
    in_flight_before_an_end: list[int] = []
    ended: list[int] = []

    async def scenario():
        survey = tsmd.DhtSurvey(endpoint, tsmd.NodeCache(), [nodes[0]._replace(node_id=b"")],
                                options, False)

        def watch(result):
            if not ended:
                in_flight_before_an_end.append(survey._lookup_slots.borrowed_tokens)

        async def one(n):
            await survey.lookup(hashlib.sha1(b"cold %d" % n).digest(), watch)
            ended.append(n)

        async with trio.open_nursery() as nursery:
            await nursery.start(survey.serve)
            async with trio.open_nursery() as looking:
                for n in range(30):
                    looking.start_soon(one, n)
            nursery.cancel_scope.cancel()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(ended) == 30
    assert in_flight_before_an_end[0] <= options.per_ip_burst
    assert max(in_flight_before_an_end) > options.per_ip_burst


def test_dht_a_node_near_the_end_of_its_back_off_is_waited_for():
    """A node that said 202 is left alone for 10 s; a lookup that meets it with less than the
    configured stall timeout of that left waits for it, however short the stall timeout the
    round trips have made."""
    target = hashlib.sha1(b"target 0").digest()
    nodes = paced_nodes(40)
    refusing = min(nodes, key=lambda node: xor(node.node_id, target))
    cache = tsmd.NodeCache()
    for node in nodes:
        cache.add(node, 0)
    endpoint = RecordingEndpoint(nodes, delay=0.02, refusals={refusing.host: 1})
    options = dht_test_options(concurrency=40, bep33=False, rate=1000, per_ip_rate=100,
                               per_ip_burst=10, stall_timeout=1, query_timeout=4)
    late = {}

    async def scenario():
        survey = tsmd.DhtSurvey(endpoint, cache, [], options, False)
        async with trio.open_nursery() as nursery:
            await nursery.start(survey.serve)
            async with trio.open_nursery() as looking:
                for n in range(40):
                    looking.start_soon(survey.lookup, hashlib.sha1(b"target %d" % n).digest())
            assert survey.round_trips.stall_after == tsmd.DHT_STALL_FLOOR
            await trio.sleep_until(tsmd.DHT_ERROR_BACKOFF - 0.5)  # half a second left
            late["started"] = trio.current_time()
            late["result"] = await survey.lookup(target)
            nursery.cancel_scope.cancel()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    asked_late = [when for when, host, _ in endpoint.sent
                  if host == refusing.host and when >= late["started"]]
    # Its back-off runs from its 202, which came 0.02 s after the first query to it: that
    # query may have waited its turn behind the others in the rate (trio runs tasks in an
    # order of its choosing), so the back-off's end is measured from it.
    first_asked = min(when for when, host, _ in endpoint.sent if host == refusing.host)
    backoff_ends = first_asked + 0.02 + tsmd.DHT_ERROR_BACKOFF
    assert backoff_ends - late["started"] < 1  # the lookup met it with under 1 s left
    assert asked_late and asked_late[0] <= backoff_ends + 0.1
    assert late["result"].nodes_answered >= tsmd.DHT_K


def dual_stack_network(v4_count: int = 30, v6_count: int = 12):
    """Nodes of both families, of distinct /24s (/64s); the first 4 of each family are one
    dual-stack node each, with one id for both addresses (BEP 32)."""
    v4 = paced_nodes(v4_count, b"v4")
    v6 = [tsmd.DhtNode(v4[n].node_id if n < 4 else hashlib.sha1(b"v6 %d" % n).digest(),
                       f"2001:db8:{n + 1:x}::1", 6881) for n in range(v6_count)]
    return v4, v6


def test_dht_looks_up_on_ipv4_and_ipv6_apart_and_merges_the_peers():
    """A cold start from IPv4 routers: the IPv6 lookup starts with the IPv6 nodes the IPv4
    replies name, each family keeps its own closest nodes, and the peers of both are one
    result. Without IPv6 nothing goes to an IPv6 node."""
    v4, v6 = dual_stack_network()
    routers = [tsmd.DhtNode(b"", node.host, node.port) for node in v4[:2]]
    v4_peer, v6_peer = ("192.0.2.4", 6881), ("2001:db8:ffff::6", 6881)
    # Every node holds the peer of its own family: what a lookup found shows which ran.
    values = {node.host: [v4_peer] for node in v4} | {node.host: [v6_peer] for node in v6}

    def survey(cache, want_ipv6, bootstrap=routers):
        endpoint = RecordingEndpoint(v4 + v6, 0.05, values=values)
        endpoint.dual_stack = want_ipv6
        done, results = paced_survey(endpoint, cache, bootstrap, 10, want_ipv6=want_ipv6)
        return done, results, endpoint.sent

    cache = tsmd.NodeCache()
    done, results, sent = survey(cache, want_ipv6=True)
    assert all(result.peers == {v4_peer, v6_peer} for result in results)
    first_v6 = min(at for at, host, _ in sent if ":" in host)
    assert first_v6 >= 0.05  # after the routers' answers named the IPv6 nodes
    assert all(query[b"a"][b"want"] == [b"n4", b"n6"] for _, _, query in sent)
    assert (cache.size(False), cache.size(True)) == (30, 12)
    for node in v4[:4]:  # dual-stack: in both families
        assert node in cache.nodes() and node._replace(host=v6[v4.index(node)].host) in \
            cache.nodes()
    # Each family's closest came from its own nodes: the K closest IPv6 nodes of every
    # target were asked, though IPv4 ones are closer.
    for result in results:
        asked = {host for _, host, query in sent if query[b"a"][b"info_hash"] == result.infohash}
        closest_v6 = sorted(v6, key=lambda node: xor(node.node_id, result.infohash))[:tsmd.DHT_K]
        assert {node.host for node in closest_v6} <= asked
    assert done.counters.suspect_peers == 0 and done.counters.same_id_skipped == 0
    # Warm: the IPv6 lookup starts from the cache, with the IPv4 one.
    done, results, sent = survey(cache, want_ipv6=True)
    assert all(result.peers == {v4_peer, v6_peer} for result in results)
    assert min(at for at, host, _ in sent if ":" in host) == 0
    # Only IPv6 nodes known: the IPv4 lookup ends at once, and goes on when the IPv6 replies
    # name IPv4 nodes. (Each target waits for both.)
    v6_only = tsmd.NodeCache()
    for node in v6:
        v6_only.add(node, 0)
    done, results, sent = survey(v6_only, want_ipv6=True, bootstrap=[])
    assert len(results) == 10 and all(result.peers == {v4_peer, v6_peer} for result in results)
    assert min(at for at, host, _ in sent if ":" not in host) >= 0.05
    # Where IPv6 is not routed: IPv4 alone, and no query asks for IPv6 nodes.
    done, results, sent = survey(tsmd.NodeCache(), want_ipv6=False)
    assert all(result.peers == {v4_peer} for result in results)
    assert not [host for _, host, _ in sent if ":" in host]
    assert not [query for _, _, query in sent if b"want" in query[b"a"]]
    assert list(done.families) == [False]


def test_dht_an_ipv6_lookup_that_ended_goes_on_with_the_nodes_the_ipv4_one_meets():
    """The one IPv6 node cached answers at once, naming no node: the IPv6 lookup ends before
    the (slow) IPv4 routers name the IPv6 nodes that hold the peer. It goes on with them."""
    v4, v6 = dual_stack_network()
    routers = [tsmd.DhtNode(b"", node.host, node.port) for node in v4[:2]]
    v6_peer = ("2001:db8:ffff::6", 6881)
    lonely = tsmd.DhtNode(hashlib.sha1(b"lonely").digest(), "2001:db8:aaaa::1", 6881)

    class LonelyEndpoint(RecordingEndpoint):
        def reply(self, query, host, port):
            message = super().reply(query, host, port)
            if host == lonely.host:  # an empty routing table
                message.body.pop(b"nodes6", None)
                message.body.pop(b"nodes", None)
            return message

    # Then with IPv6 nodes that answer after their queries have stalled: the target waits for
    # the lookup that went on, not only for the one that ended first.
    for slow_v6 in (0.05, 0.6):
        cache = tsmd.NodeCache()
        cache.add(lonely, 0)
        slow = {router.host: 0.2 for router in routers} | {node.host: slow_v6 for node in v6}
        endpoint = LonelyEndpoint(v4 + v6 + [lonely], 0.05,
                                  values={node.host: [v6_peer] for node in v6}, slow=slow)
        endpoint.dual_stack = True
        _, results = paced_survey(endpoint, cache, routers, 5, want_ipv6=True)
        assert len(results) == 5 and all(v6_peer in result.peers for result in results)


def test_dht_a_lookup_cancelled_while_both_families_run_leaves_nothing_behind():
    v4, v6 = dual_stack_network()
    cache = tsmd.NodeCache()
    for node in v4 + v6:
        cache.add(node, 0)
    endpoint = RecordingEndpoint(v4 + v6, 0.05)
    endpoint.dual_stack = True

    async def scenario():
        survey = tsmd.DhtSurvey(endpoint, cache, [], dht_test_options(bep33=False), True)
        async with trio.open_nursery() as nursery:
            await nursery.start(survey.serve)
            with trio.move_on_after(0.03):  # both lookups have queries out, and more to ask
                await survey.lookup(b"\x11" * 20)
            assert survey._running == {}
            sent = len(endpoint.sent)
            await trio.sleep(10)
            assert len(endpoint.sent) == sent  # nothing more asked for it
            result = await survey.lookup(b"\x12" * 20)
            assert result.nodes_answered == 2 * tsmd.DHT_K
            nursery.cancel_scope.cancel()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


def test_dht_each_family_estimates_its_own_size():
    """The IPv6 DHT is a fraction of the IPv4 one: each family's lookups set how close an id
    may plausibly be to a target on it."""
    v4, v6 = dual_stack_network(400, 20)
    routers = [tsmd.DhtNode(b"", node.host, node.port) for node in v4[:2]]
    endpoint = RecordingEndpoint(v4 + v6, 0.05)
    endpoint.dual_stack = True
    fresh = tsmd.DhtSurvey(endpoint, tsmd.NodeCache(), routers, dht_test_options(), True)
    # Before any lookup: 16 million IPv4 nodes and a million IPv6 ones assumed.
    assert fresh.families[True].implausibly_close == 16 * fresh.families[False].implausibly_close
    done, _ = paced_survey(endpoint, tsmd.NodeCache(), routers, 40, want_ipv6=True)
    sizes = {ipv6: 2 ** (160 - tsmd.DHT_CLOSE_ID_MARGIN_BITS) / family.implausibly_close
             for ipv6, family in done.families.items()}
    assert 100 <= sizes[False] <= 1600 and 5 <= sizes[True] <= 80, sizes


def test_dht_lookups_start_while_the_rate_has_room():
    """Under a rate limit, a lookup starts only while fewer queries wait for the rate than it
    lets out in a stall timeout, not as many as the cache allows: those would only queue in
    the pacer. The rate is still kept busy, also when lookups wait out silent nodes."""
    nodes = paced_nodes(400, b"rate")
    rate = 100
    for silent in (set(), {node.host for node in nodes[::2]}):
        seen = {"lookups": 0, "queued": 0}

        def watch(survey):
            seen["lookups"] = max(seen["lookups"], len(survey._running))
            seen["queued"] = max(seen["queued"], len(survey._held) + len(survey._outbox))

        cache = tsmd.NodeCache()
        for node in nodes:
            cache.add(node, 0)
        endpoint = RecordingEndpoint(nodes, 0.1, silent=silent)
        survey, results = paced_survey(endpoint, cache, [], 300, watch=watch, rate=rate,
                                       stall_timeout=1.0, query_timeout=2.0)
        assert len(results) == 300
        for result in results:  # every lookup heard the live ones of the 2K closest it asked
            closest = sorted(nodes, key=lambda node: xor(node.node_id, result.infohash))
            live = [node for node in closest[:2 * tsmd.DHT_K] if node.host not in silent]
            assert result.nodes_answered >= min(tsmd.DHT_K, len(live))
        # With the cache's 10 lookups per node alone, all 300 ran at once and 1,191 queries
        # waited in the pacer; with a fixed rate x stall / ALPHA lookups, half-silent nodes
        # took 86.7 s (2.6 times the rate's time: lookups waiting for timeouts send little).
        assert survey._lookup_slots.total_tokens == 300 and seen["lookups"] <= 75
        assert seen["queued"] <= 1.5 * rate  # at the start: the stall timeout is 1 s until
        # 32 answers have come
        assert endpoint.sent[-1][0] <= 1.1 * len(endpoint.sent) / rate  # the rate kept busy


def test_dht_pacer_keeps_the_global_and_per_address_limits():
    nodes = paced_nodes(40)
    cache = tsmd.NodeCache()
    for node in nodes:
        cache.add(node, 0)
    rate, lookups = 20, 100
    # The socket buffer is full for a while at the start (held packets wait for it), and
    # one node always says 202.
    endpoint = RecordingEndpoint(nodes, delay=0.2, refusals={"198.18.7.1": 10**9}, full=3)
    survey, results = paced_survey(endpoint, cache, [], lookups, rate=rate, per_ip_rate=1,
                                   per_ip_burst=4, stall_timeout=1, query_timeout=2)
    times = [when for when, _, _ in endpoint.sent]
    assert len(times) == survey.counters.queries >= lookups * tsmd.DHT_K
    assert len(results) == lookups and all(r.nodes_answered >= tsmd.DHT_K for r in results)
    assert all(b"ro" in query and query[b"ro"] == 1 for _, _, query in endpoint.sent)
    # Never more than `rate` packets in any one-second window.
    assert max(bisect.bisect_left(times, t + 1) - i for i, t in enumerate(times)) <= rate
    # Each address: a burst of 4, then one a second.
    for node in nodes:
        mine = [when for when, host, _ in endpoint.sent if host == node.host]
        for i, j in itertools.combinations(range(len(mine)), 2):
            assert j - i + 1 <= 4 + (mine[j] - mine[i]) + 1e-9, node.host
    # The node that said 202 heard nothing for 10 s after each refusal reached us.
    refused = [when for when, host, _ in endpoint.sent if host == "198.18.7.1"]
    assert len(refused) >= 2
    for asked in refused:
        assert not [later for later in refused if asked + 0.2 < later < asked + 10.2 - 1e-9]
    # The refusing node held up nobody else: the run lasted about as long as the global limit
    # alone makes it (one packet every 1/(rate - 1) s).
    assert times[-1] - times[0] <= len(times) / (rate - 1) + 2 * 2
    assert survey.counters.krpc_errors == len(refused)


def test_dht_lookup_goes_past_closest_nodes_the_kernel_refuses():
    nodes = paced_nodes(40)
    cache = tsmd.NodeCache()
    for node in nodes:
        cache.add(node, 0)
    target = int.from_bytes(hashlib.sha1(b"target 0").digest(), "big")
    closest = sorted(nodes, key=lambda node: int.from_bytes(node.node_id, "big") ^ target)
    refused = {node.host for node in closest[:tsmd.DHT_K]}
    endpoint = RecordingEndpoint(nodes, delay=0.1, unsendable=refused)
    survey, [result] = paced_survey(endpoint, cache, [], 1)
    # Their packets never left: the lookup takes the next 8, and marks nobody.
    assert result.nodes_answered == tsmd.DHT_K
    assert {host for _, host, _ in endpoint.sent} == {n.host for n in closest[8:16]}
    assert endpoint.counters.send_errors == tsmd.DHT_K and survey.counters.timeouts == 0
    assert cache.silent_this_run() == [] and len(cache) == 40


def filters_only_scenario(refuse_values: bool, **options):
    """Two lookups of one target, the second 0.3 s after the first; its closest node answers a
    scrape with filters only. (duration, result) of each, the node and the packets it got."""
    nodes = paced_nodes(20)
    target = hashlib.sha1(b"follow-up").digest()
    closest = min(nodes, key=lambda node: int.from_bytes(node.node_id, "big")
                  ^ int.from_bytes(target, "big"))
    endpoint = RecordingEndpoint(nodes, delay=0.2, filters_only={closest.host},
                                 refuse_values={closest.host} if refuse_values else ())
    cache = tsmd.NodeCache()
    for node in nodes:
        cache.add(node, 0)
    options = dht_test_options(**{"concurrency": 2, "bep33": True, "stall_timeout": 1,
                                  "query_timeout": 2, **options})
    lookups = {}

    async def scenario():
        survey = tsmd.DhtSurvey(endpoint, cache, [], options, False)
        with trio.fail_after(3600):
            async with trio.open_nursery() as nursery:
                await nursery.start(survey.serve)

                async def look(name, after):
                    await trio.sleep(after)
                    started = trio.current_time()
                    result = await survey.lookup(target)
                    lookups[name] = (trio.current_time() - started, result)
                async with trio.open_nursery() as looking:
                    looking.start_soon(look, "first", 0)
                    looking.start_soon(look, "second", 0.3)
                nursery.cancel_scope.cancel()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    to_closest = [(when, b"scrape" in query[b"a"]) for when, host, query in endpoint.sent
                  if host == closest.host]
    return lookups, to_closest


def test_dht_values_follow_up_keeps_the_per_node_limit():
    lookups, to_closest = filters_only_scenario(False, rate=100, per_ip_rate=1, per_ip_burst=1)
    # Scrape, then its follow-up for values: one packet a second to the node, follow-up or not.
    first = [when for when, _ in to_closest][:2]
    assert [scrape for _, scrape in to_closest][:2] == [True, False] and first[1] - first[0] >= 1
    assert ("192.0.2.99", 6881) in lookups["first"][1].peers


def test_dht_values_follow_up_to_a_node_that_asked_to_back_off_is_not_waited_for():
    # The first lookup's follow-up gets 202 at 0.4 s; the second lookup asked the node for its
    # filters at 0.3 s, before that, and has their answer at 0.5 s. It must not then hold its
    # follow-up for the node's 10 s of back-off, and end with the node counted as answered.
    lookups, to_closest = filters_only_scenario(True, rate=100, per_ip_rate=10, per_ip_burst=4)
    assert [scrape for _, scrape in to_closest] == [True, False, True]
    for duration, result in lookups.values():
        assert duration < 1 and result.nodes_answered == tsmd.DHT_K


def test_dht_follow_up_with_another_id_takes_back_the_first_reply():
    # The closest node answers a scrape with filters, then the follow-up with another id.
    nodes = paced_nodes(20)
    target = int.from_bytes(hashlib.sha1(b"target 0").digest(), "big")
    liar = min(nodes, key=lambda node: int.from_bytes(node.node_id, "big") ^ target)

    class Liar(RecordingEndpoint):
        def reply(self, query, host, port):
            message = super().reply(query, host, port)
            if host == liar.host and query[b"a"].get(b"scrape") != 1:
                message.body[b"id"] = b"\xee" * 20
            return message

    cache = tsmd.NodeCache()
    for node in nodes:
        cache.add(node, 0)
    endpoint = Liar(nodes, delay=0.1, filters_only={liar.host})
    survey, results = paced_survey(endpoint, cache, [], 1, bep33=True)
    result = results[0]
    assert [host for _, host, query in endpoint.sent if host == liar.host] == [liar.host] * 2
    assert result.seeds_blooms == result.peers_blooms == [] and result.peers == set()
    assert result.nodes_answered == tsmd.DHT_K  # 8 others, the liar not among them
    assert survey.counters.ids_changed == 1 and (liar.host, liar.port) in cache.distrusted
    assert liar not in cache.nodes()


def test_dht_lookups_wait_for_a_router_that_asked_them_to_back_off():
    # A cold start: nothing cached, one router, and its first answer is 202. Every lookup
    # must wait out its 10 s, not end unanswered at once.
    nodes = paced_nodes(40)
    router = tsmd.DhtNode(hashlib.sha1(b"router").digest(), "192.0.2.200", 6881)
    endpoint = RecordingEndpoint(nodes, delay=0.1, refusals={router.host: 1})
    endpoint.ids[(router.host, router.port)] = router.node_id  # a router, in no routing table
    survey, results = paced_survey(endpoint, tsmd.NodeCache(), [router._replace(node_id=b"")],
                                   20, rate=20, per_ip_rate=1, per_ip_burst=4,
                                   stall_timeout=1, query_timeout=2)
    assert len(results) == 20 and all(r.nodes_answered >= tsmd.DHT_K for r in results)
    asked = [when for when, host, _ in endpoint.sent if host == router.host]
    refused_at = asked[0] + 0.1  # the reply to the first query (the burst left before it)
    assert survey.counters.krpc_errors == 1
    assert min(when for when in asked if when > refused_at) >= refused_at + 10


def test_dht_destination_check_is_memoised_per_address_not_per_policy():
    cases = {("8.8.8.8", 6881): (False, False), ("127.0.0.1", 6881): (True, False),
             ("10.1.2.3", 1): (True, False), ("0.0.0.0", 6881): (True, True),
             ("224.0.0.1", 6881): (True, True), ("255.255.255.255", 6881): (True, True),
             ("240.0.0.1", 6881): (True, True), ("8.8.8.8", 0): (True, True),
             ("::ffff:10.0.0.1", 6881): (True, True), ("2001:4860::1", 6881): (False, False),
             ("::1", 6881): (True, False),
             ("not an address", 6881): (True, True)}
    for _ in range(2):  # the second round is answered from the memo
        for (host, port), (strict, lenient) in cases.items():
            assert tsmd._bogus_destination(host, port, False) is strict, host
            assert tsmd._bogus_destination(host, port, True) is lenient, host


def test_node_cache_closest_matches_a_full_scan():
    cache = tsmd.NodeCache()
    nodes = [tsmd.DhtNode(hashlib.sha1(str(n).encode()).digest(), f"127.1.{n // 250}.{n % 250}",
                          1000 + n) for n in range(3000)]
    for node in nodes:
        cache.add(node, 1.0)
    for n in range(50):
        target = hashlib.sha1(f"target {n}".encode()).digest()
        exact = sorted(nodes, key=lambda node: int.from_bytes(node.node_id, "big")
                       ^ int.from_bytes(target, "big"))[:8]
        assert cache.closest(target, 8) == exact
    cache.failed(nodes[0].host, nodes[0].port)
    cache.failed(nodes[0].host, nodes[0].port)
    assert len(cache) == 2999 and (nodes[0].host, nodes[0].port) in cache.evicted
    cache.add(tsmd.DhtNode(b"\x00" * 20, nodes[1].host, nodes[1].port), 2.0)  # new id, same address
    assert len(cache) == 2999 and cache.closest(b"\x00" * 20, 1)[0].port == nodes[1].port


def test_node_cache_keeps_ipv4_and_ipv6_apart():
    """BEP 32's two DHTs: a target's closest nodes of one family are never the other's, and a
    dual-stack node (one id, both families) is cached once in each."""
    cache = tsmd.NodeCache()
    v4 = [tsmd.DhtNode(hashlib.sha1(b"v4 %d" % n).digest(), f"198.18.{n}.1", 6881)
          for n in range(300)]
    v6 = [tsmd.DhtNode(hashlib.sha1(b"v6 %d" % n).digest(), f"2001:db8:{n:x}::1", 6881)
          for n in range(40)]
    dual = [tsmd.DhtNode(node.node_id, f"2001:db8:d:{n:x}::1", 6881)
            for n, node in enumerate(v4[:5])]
    for node in v4 + v6 + dual:
        cache.add(node, 1.0, failures=1)
    assert (len(cache), cache.size(False), cache.size(True)) == (345, 300, 45)
    for n in range(30):
        target = hashlib.sha1(b"target %d" % n).digest()
        for family, ipv6 in ((v4, False), (v6 + dual, True)):
            exact = sorted(family, key=lambda node: xor(node.node_id, target))[:8]
            assert cache.closest(target, 8, ipv6) == exact
    assert cache.closest(v4[0].node_id, 1) == [v4[0]]
    assert cache.closest(v4[0].node_id, 1, ipv6=True) == [dual[0]]
    # Each family's entry of a dual-stack node leaves on its own.
    cache.failed(dual[0].host, dual[0].port)
    assert dual[0] not in cache.nodes() and v4[0] in cache.nodes()
    assert sorted(cache.entries()) == sorted((node, 1.0, 1) for node in v4 + v6 + dual[1:])
    # A family with nothing cached has no closest nodes, whatever the other holds.
    only_v4 = tsmd.NodeCache()
    only_v4.add(v4[0], 1.0)
    assert only_v4.closest(b"\xff" * 20, 8, ipv6=True) == [] and only_v4.size(True) == 0


def test_node_cache_distrusts_an_address_that_changes_its_id():
    cache = tsmd.NodeCache()
    honest = tsmd.DhtNode(b"\x01" * 20, "198.51.100.1", 6881)
    cache.add(honest, 1.0)
    assert cache.vouch(honest.host, honest.port, honest.node_id, honest.node_id)
    assert cache.vouch(honest.host, honest.port, honest.node_id, None)  # as a router
    # Introduced with a stale id (or a made-up one) by another node: that reply is ignored,
    # and nothing is held against the address.
    assert not cache.vouch(honest.host, honest.port, honest.node_id, b"\x09" * 20)
    assert cache.nodes() == [honest] and not cache.distrusted and not cache.evicted
    # Another host claiming a cached id does not take its place; the same host on a new port
    # (a NAT rebinding) does.
    cache.add(tsmd.DhtNode(honest.node_id, "198.51.100.66", 6881), 2.0)
    assert cache.nodes() == [honest]
    cache.add(honest._replace(port=7000), 2.0)
    assert cache.nodes() == [honest._replace(port=7000)]
    # Cached by an earlier run, answering with a new id: a restart, which the cache takes (the
    # reply itself is not used: the lookup weighed the node by its old id).
    restarted = tsmd.DhtNode(b"\x02" * 20, "198.51.100.2", 6881)
    cache.add(restarted, 1.0)
    assert not cache.vouch(restarted.host, restarted.port, b"\x03" * 20, restarted.node_id)
    assert restarted._replace(node_id=b"\x03" * 20) in cache.nodes()
    assert cache.vouch(restarted.host, restarted.port, b"\x03" * 20, b"\x03" * 20)
    # A second id within the run (a sybil, a new id next to each target): distrusted, out of
    # the cache (and of the database), not asked again in the run, never cached back.
    assert not cache.vouch(restarted.host, restarted.port, b"\x04" * 20, b"\x04" * 20)
    address = (restarted.host, restarted.port)
    assert address in cache.distrusted and address in cache.evicted
    assert cache.is_dead(*address) and len(cache) == 1
    assert not cache.vouch(restarted.host, restarted.port, b"\x03" * 20, b"\x03" * 20)
    cache.add(restarted, 3.0)
    assert len(cache) == 1 and cache.silent_this_run() == []
    # An address that answered is never remembered as silent, cached or not.
    assert cache.vouch("198.51.100.4", 6881, b"\x05" * 20, b"\x05" * 20)
    cache.failed("198.51.100.4", 6881)
    assert cache.silent_this_run() == []


def test_bep42_node_ids_and_subnets():
    # BEP 42's own examples: (IP, rand, first 3 bytes of the id).
    for host, salt, head in [("124.31.75.21", 1, "5fbfbf"), ("21.75.31.124", 86, "5a3ce9"),
                             ("65.23.51.170", 22, "a5d432"), ("84.124.73.14", 65, "1b0321"),
                             ("43.213.53.83", 90, "e56f6c")]:
        node_id = bytes.fromhex(head) + bytes(range(16)) + bytes([salt])
        assert tsmd.bep42_verified(node_id, host) is True
        # The low 3 bits of the third byte are free; the 21 bits before them are not.
        assert tsmd.bep42_verified(node_id[:2] + bytes([node_id[2] ^ 7]) + node_id[3:], host)
        assert tsmd.bep42_verified(node_id[:2] + bytes([node_id[2] ^ 8]) + node_id[3:],
                                   host) is False
        assert tsmd.bep42_verified(node_id[:19] + bytes([salt ^ 4]), host) is False
    assert tsmd.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    # Local and private addresses are exempt: neither verified nor refuted.
    assert tsmd.bep42_verified(b"\x5f" * 20, "192.168.1.1") is None
    assert tsmd.bep42_verified(b"\x5f" * 20, "127.0.0.1") is None
    assert tsmd.bep42_verified(b"\x00" * 20, "2001:4860::8888") is False
    assert tsmd.subnet_of("124.31.75.21", 1) == tsmd.subnet_of("124.31.75.200", 2) != \
        tsmd.subnet_of("124.31.76.21", 1)
    assert tsmd.subnet_of("2a00:1450:1:2::1", 1) == tsmd.subnet_of("2a00:1450:1:2:ffff::9", 2) \
        != tsmd.subnet_of("2a00:1450:1:3::1", 1)
    # A closed network may have all its nodes in one private /24, or on one host (IPv6 has
    # one loopback address): each node counts alone.
    assert tsmd.subnet_of("10.0.0.1", 1) != tsmd.subnet_of("10.0.0.2", 1)
    assert tsmd.subnet_of("::1", 6881) != tsmd.subnet_of("::1", 6882)
    assert tsmd.subnet_of("127.66.6.1", 6881) == "127.66.6.1:6881"


@dataclass
class ScriptedView:
    """What a Lookup may ask (tsmd.LookupView), as plain lists and sets: the lookup core
    under test with no survey, socket or clock."""

    cached: list = dataclasses.field(default_factory=list)
    bootstrap: list = dataclasses.field(default_factory=list)
    options: tsmd.DhtOptions = dataclasses.field(default_factory=lambda: dht_test_options(allow_private=False))
    implausibly_close: int = 1 << 64  # node_at(0) is suspect, node_at(1) is not
    implausibly_close_elsewhere: int = 1 << 64  # the other family's line
    ipv6: bool = False
    dead: set = dataclasses.field(default_factory=set)
    distrusted: set = dataclasses.field(default_factory=set)
    resting_hosts: set = dataclasses.field(default_factory=set)

    def usable(self, host, port):
        return not tsmd._bogus_destination(host, port, self.options.allow_private)

    def is_dead(self, host, port):
        return (host, port) in self.dead or (host, port) in self.distrusted

    def is_distrusted(self, host, port):
        return (host, port) in self.distrusted

    def resting(self, host):
        return host in self.resting_hosts

    def closest(self, target, count):
        return sorted(self.cached, key=lambda node: xor(node.node_id, target))[:count]

    def known(self):
        return len(self.cached)


def scripted_lookup(view: ScriptedView, target: bytes = b"\x70" * 20):
    counters = tsmd.DhtCounters()
    return tsmd.Lookup(target, view, counters), counters


def test_dht_lookup_keeps_one_node_per_subnet_and_prefers_bep42_ids():
    verified = tsmd.DhtNode(bytes.fromhex("5fbfbf") + bytes(16) + b"\x01", "124.31.75.21", 6881)
    other = tsmd.DhtNode(b"\x77" * 20, "124.31.75.99", 6881)
    third = tsmd.DhtNode(b"\x78" * 20, "124.31.75.100", 6881)
    elsewhere = tsmd.DhtNode(b"\x79" * 20, "124.31.76.1", 6881)
    NEW, ASKED, FAILED = (tsmd.CandidateState.NEW, tsmd.CandidateState.ASKED,
                          tsmd.CandidateState.FAILED)
    lookup, counters = scripted_lookup(ScriptedView())
    for node in (other, verified, third, elsewhere):
        lookup.consider(node)
    wanted = [c.node for c in lookup.by_distance if c.state is NEW]
    assert wanted == [elsewhere, verified]  # (sorted by distance to the target)
    assert counters.same_subnet_skipped == 2
    # Once asked, the holder of a subnet keeps it: a verified newcomer waits.
    lookup, counters = scripted_lookup(ScriptedView())
    lookup.consider(other)
    lookup.candidates[(other.host, other.port)].state = ASKED
    lookup.consider(verified)
    assert [c.node for c in lookup.by_distance if c.state is not FAILED] == [other]
    # A second address with an id the lookup has: passed over too.
    lookup.consider(elsewhere._replace(node_id=other.node_id))
    assert counters.same_id_skipped == 1
    # When the holder fails, the best node passed over in its subnet takes its place: the
    # BEP 42 one first, then the closest. After three takeovers, the subnet had its chances.
    lookup.consider(third)

    def holder_fails(node):
        holder = lookup.candidates[(node.host, node.port)]
        holder.state = FAILED
        lookup._give_way(holder)
        return [c.node for c in lookup.by_distance if c.state is NEW]

    assert holder_fails(other) == [verified]
    assert holder_fails(verified) == [third]
    assert len(lookup.by_distance) == len(set(map(id, lookup.by_distance)))  # listed once
    assert holder_fails(third) == []  # none left: the next node met in it holds it
    fourth = tsmd.DhtNode(b"\x7a" * 20, "124.31.75.101", 6881)
    lookup.consider(fourth)
    assert holder_fails(fourth) == []  # three takeovers: the subnet had its chances
    lookup.consider(fourth._replace(node_id=b"\x7c" * 20, host="124.31.75.102"))
    assert [c.node for c in lookup.by_distance if c.state is NEW] == []
    # A subnet whose holder failed with nobody waiting goes to the next node met in it.
    lookup.consider(elsewhere)
    assert holder_fails(elsewhere) == []
    lookup.consider(elsewhere._replace(node_id=b"\x7b" * 20, host="124.31.76.2"))
    assert [c.node.host for c in lookup.by_distance if c.state is NEW] == ["124.31.76.2"]
    # A closed network in one private /24: every node is a candidate.
    lookup, counters = scripted_lookup(ScriptedView(options=dht_test_options()))
    for n in range(20):
        lookup.consider(tsmd.DhtNode(hashlib.sha1(b"lan %d" % n).digest(), f"10.0.0.{n + 1}",
                                     6881))
    assert len(lookup.by_distance) == 20 and counters.same_subnet_skipped == 0


def test_dht_stall_timeout_follows_the_round_trips():
    trips = tsmd.RoundTrips(1.0)
    chooser = random.Random(7)
    for _ in range(tsmd.DHT_RTT_MIN_SAMPLES - 1):
        trips.add(chooser.uniform(0.05, 0.3))
    assert trips.stall_after == 1.0  # too few to go by: the configured stall timeout
    for _ in range(tsmd.DHT_RTT_SAMPLES):
        trips.add(chooser.uniform(0.05, 0.3))
    assert 2 * 0.26 <= trips.stall_after <= 2 * 0.29  # twice the 90th percentile, 0.275 s
    for _ in range(tsmd.DHT_RTT_SAMPLES):  # a slow network: no more than configured
        trips.add(chooser.uniform(0.5, 3.0))
    assert trips.stall_after == 1.0
    for _ in range(tsmd.DHT_RTT_SAMPLES):  # loopback: no less than the floor
        trips.add(0.0002)
    assert trips.stall_after == tsmd.DHT_STALL_FLOOR


LOOKUP_TARGET = b"\x70" * 20


def node_at(distance: int, host: str) -> tsmd.DhtNode:
    """A node `distance` from LOOKUP_TARGET (in units of 2^100: bits far below BEP 42's)."""
    return tsmd.DhtNode((int.from_bytes(LOOKUP_TARGET, "big") ^ distance << 100)
                        .to_bytes(20, "big"), host, 6881)


def reply_of(node, peers=(), nodes=(), seeds=None, peers_bloom=None):
    return tsmd.GetPeersReply(node.node_id, b"token", tuple(peers), tuple(nodes), seeds,
                              peers_bloom)


def test_dht_lookup_core_runs_on_scripted_events():
    """The lookup core alone: events in, queries out, no socket and no clock."""
    cached = [node_at(10 * n, f"{20 + n}.0.0.1") for n in range(1, 13)]  # distances 10..120
    lookup, counters = scripted_lookup(ScriptedView(cached=cached))
    lookup.start()
    out = lookup.take_queries()
    # Kademlia's alpha at once, to the closest, each asking for BEP 33 filters.
    assert [q.candidate.node for q in out] == cached[:tsmd.DHT_ALPHA]
    assert all(q.scrape and not q.follow_up for q in out) and lookup.take_queries() == []
    # A reply names a closer node: it is asked next. Its peers count.
    closer = node_at(5, "81.0.0.1")
    lookup.replied(out[0], reply_of(cached[0], peers=[("5.5.5.5", 1)], nodes=[closer]))
    [to_closer] = lookup.take_queries()
    assert to_closer.candidate.node == closer
    # A stalled query lets the next candidate go, and still counts if it answers.
    lookup.stalled(out[1])
    [fifth] = lookup.take_queries()
    assert fifth.candidate.node == cached[4]
    lookup.replied(out[1], reply_of(cached[1]))
    assert lookup.take_queries() == []  # its slot went to the fifth when it stalled
    # A timeout (or an error, or a refused packet) fails the node: the next one is asked.
    lookup.failed(out[2])
    assert out[2].candidate.state is tsmd.CandidateState.FAILED
    [sixth] = lookup.take_queries()
    assert sixth.candidate.node == cached[5]
    lookup.replied(out[3], reply_of(cached[3]))
    lookup.replied(fifth, reply_of(cached[4]))
    far = lookup.take_queries()
    assert [q.candidate.node for q in far] == cached[6:8]
    # Three closer nodes push the last two asked out of the K closest: not waited for.
    closest = [node_at(d, f"9{d}.0.0.1") for d in (1, 2, 3)]
    lookup.replied(sixth, reply_of(cached[5], nodes=closest))
    waiting = [to_closer, *lookup.take_queries()]
    taken = len(out) + 5 + len(waiting) - 1
    while waiting:
        query = waiting.pop(0)
        lookup.replied(query, reply_of(query.candidate.node))
        new = lookup.take_queries()
        waiting.extend(new)
        taken += len(new)
    assert lookup.finished and lookup.result.nodes_answered == 9  # every node that answered
    assert lookup.result.peers == {("5.5.5.5", 1)}
    assert lookup.closest_answered() == [d << 100 for d in (1, 2, 3, 5, 10, 20, 40, 50)]
    assert lookup.result.queries == taken == 12  # each decided query handed out once
    # What is still out is withdrawn, and a late reply to it changes nothing.
    assert list(map(id, lookup.take_withdrawn())) == list(map(id, far))
    lookup.replied(far[0], reply_of(cached[6], peers=[("6.6.6.6", 1)]))
    assert lookup.result.peers == {("5.5.5.5", 1)} and lookup.take_queries() == []
    assert counters.bogons_skipped == 0


def test_dht_lookup_core_follow_up_retry_and_abandon():
    cached = [node_at(n, f"{20 + n}.0.0.1") for n in range(1, 9)]
    bloom = bytes([0x11] * tsmd.BLOOM_BYTES)
    lookup, counters = scripted_lookup(ScriptedView(cached=cached))
    lookup.start()
    out = lookup.take_queries()
    # Filters and no values (libtorrent's answer to a scrape): asked once more, for values.
    lookup.replied(out[0], reply_of(cached[0], seeds=bloom))
    [again] = lookup.take_queries()
    assert again.candidate is out[0].candidate and again.follow_up and not again.scrape
    assert out[0].candidate.state is tsmd.CandidateState.ASKED
    # Its follow-up times out: the node answered all the same, and its filter stays.
    lookup.failed(again)
    assert out[0].candidate.state is tsmd.CandidateState.ANSWERED
    assert [q.candidate.node for q in lookup.take_queries()] == [cached[4]]  # its slot
    assert lookup.result.seeds_blooms == [bloom] and lookup.result.nodes_answered == 1
    # Another node's follow-up answers too many values: suspect, its filter taken back.
    lookup.replied(out[1], reply_of(cached[1], peers_bloom=bloom))
    [again] = lookup.take_queries()
    flood = [(f"9.0.{n // 250}.{n % 250 + 1}", 1) for n in range(tsmd.DHT_MAX_VALUES_PER_REPLY + 1)]
    lookup.replied(again, reply_of(cached[1], peers=flood))
    assert again.candidate.suspect and lookup.result.peers_blooms == []
    assert lookup.result.nodes_answered == 1 and not lookup.result.peers
    assert counters.values_over_cap == 1
    # Abandoned: everything still out is withdrawn, and nothing more is asked.
    lookup.take_queries()
    lookup.abandon()
    assert lookup.finished and lookup.take_withdrawn()
    assert all(c.query is None for c in lookup.candidates.values())

    # Nobody answers: one more round, from the routers again, then the lookup gives up.
    router = tsmd.DhtNode(b"", "82.0.0.1", 6881)
    lookup, _ = scripted_lookup(ScriptedView(bootstrap=[router]))
    lookup.start()
    [first] = lookup.take_queries()
    assert first.candidate.distance == tsmd.UNKNOWN_DISTANCE
    lookup.failed(first)
    [second] = lookup.take_queries()
    lookup.failed(second)
    assert lookup.finished and lookup.rounds == 2 and lookup.result.queries == 2
    assert lookup.result.nodes_answered == 0 and lookup.take_queries() == []


def test_dht_lookup_core_asks_no_resting_distrusted_or_bogus_node():
    cached = [node_at(n, f"{20 + n}.0.0.1") for n in range(1, 9)]
    resting, distrusted = cached[0], cached[1]
    router, other_router = (tsmd.DhtNode(b"", "82.0.0.1", 6881),
                            tsmd.DhtNode(b"", "85.0.0.1", 6881))
    view = ScriptedView(cached=cached, bootstrap=[router, other_router],
                        resting_hosts={resting.host},
                        distrusted={(distrusted.host, distrusted.port),
                                    (router.host, router.port)})
    lookup, counters = scripted_lookup(view)
    lookup.start()
    out = lookup.take_queries()
    # The resting node is passed over without a query; the distrusted one is not even a
    # candidate. Fewer than K are left, so the routers are too, but not a distrusted one.
    assert [q.candidate.node for q in out] == cached[2:2 + tsmd.DHT_ALPHA]
    assert lookup.candidates[(resting.host, resting.port)].state is tsmd.CandidateState.FAILED
    assert (distrusted.host, distrusted.port) not in lookup.candidates
    assert (router.host, router.port) not in lookup.candidates
    assert (other_router.host, other_router.port) in lookup.candidates
    assert lookup.result.queries == tsmd.DHT_ALPHA
    # Peers and nodes a reply names at unusable addresses are skipped and counted.
    lookup.replied(out[0], reply_of(cached[2], peers=[("0.0.0.0", 1), ("8.8.8.8", 0)],
                                    nodes=[tsmd.DhtNode(b"\x70" * 20, "10.0.0.1", 6881)]))
    assert counters.bogons_skipped == 3 and not lookup.result.peers
    assert [q.candidate.node for q in lookup.take_queries()] == [cached[6]]
    # A suspect (an id implausibly close): asked, but not one of the K, and its values and
    # nodes are not used.
    sybil = node_at(0, "83.0.0.1")
    lookup.replied(out[1], reply_of(cached[3], nodes=[sybil]))
    [to_sybil] = lookup.take_queries()
    assert to_sybil.candidate.node == sybil and to_sybil.candidate.suspect
    lookup.replied(to_sybil, reply_of(sybil, peers=[("7.7.7.7", 1)],
                                      nodes=[node_at(1 << 20, "84.0.0.1")]))
    assert not lookup.result.peers and ("84.0.0.1", 6881) not in lookup.candidates
    assert lookup.result.suspect_peers == {("7.7.7.7", 1)}
    assert lookup.closest_answered() == [3 << 100, 4 << 100]  # the sybil not among them


def test_dht_lookup_core_takes_closer_nodes_from_a_cache_that_has_grown():
    """Lookups learn from each other: when the cache has doubled since a lookup last looked
    (other lookups' answers fill it on a cold start), it takes the closest nodes from it."""
    far = node_at(100, "120.0.0.1")
    view = ScriptedView(cached=[far])
    lookup, _ = scripted_lookup(view)
    lookup.start()
    [first] = lookup.take_queries()
    view.cached += [node_at(d, f"{30 + d}.0.0.1") for d in range(1, 17)]  # others' answers
    lookup.replied(first, reply_of(far))  # names nobody
    assert [q.candidate.distance >> 100 for q in lookup.take_queries()] == [1, 2, 3, 4]


def test_dht_lookup_core_hands_the_other_familys_nodes_on():
    """A lookup runs on one family (BEP 32): the other's nodes its replies name come out, for
    that family's lookup of the target, which may start from them alone."""
    cached = [node_at(10 * n, f"{20 + n}.0.0.1") for n in range(1, 9)]
    v6_nodes = [node_at(n, f"2a00:1450:{n:x}::1") for n in range(1, 4)]
    lookup, _ = scripted_lookup(ScriptedView(cached=cached))
    lookup.start()
    out = lookup.take_queries()
    lookup.replied(out[0], reply_of(cached[0], nodes=v6_nodes + [node_at(5, "30.0.0.1")]))
    assert lookup.take_foreign() == v6_nodes and lookup.take_foreign() == []
    assert ("30.0.0.1", 6881) in lookup.candidates
    assert not [host for host, _ in lookup.candidates if ":" in host]
    counters = tsmd.DhtCounters()
    v6_lookup = tsmd.Lookup(LOOKUP_TARGET, ScriptedView(ipv6=True), counters, lookup.result)
    v6_lookup.start(v6_nodes[:1])
    asked = v6_lookup.take_queries()
    assert [query.candidate.node for query in asked] == v6_nodes[:1]
    v6_lookup.introduce(v6_nodes[1:] + [node_at(6, "31.0.0.1")])
    asked += v6_lookup.take_queries()
    assert [query.candidate.node for query in asked] == v6_nodes
    assert v6_lookup.take_foreign() == [node_at(6, "31.0.0.1")]
    # Nobody answered: the retry round asks the introduced nodes again.
    for query in asked:
        v6_lookup.failed(query)
    assert v6_lookup.rounds == 2 and not v6_lookup.finished
    again = v6_lookup.take_queries()
    assert sorted(query.candidate.node for query in again) == sorted(v6_nodes)
    v6_lookup.replied(again[0], reply_of(again[0].candidate.node, peers=[("2a00:1450:99::1", 1)]))
    # One result for both: the peers merge, the queries and the answers add up.
    assert lookup.result.peers == {("2a00:1450:99::1", 1)}
    assert lookup.result.queries == lookup.queries + v6_lookup.queries == tsmd.DHT_ALPHA + 1 + 6
    assert lookup.result.nodes_answered == 2
    for query in again[1:]:
        v6_lookup.failed(query)
    assert v6_lookup.finished and lookup.result.nodes_answered == 2
    # Ended with the one node that answered: nodes the IPv4 lookup meets later still come
    # in, and the lookup goes on with them (and ends again once they have answered).
    closer = node_at(7, "2a00:1450:7::1")
    v6_lookup.introduce([closer, v6_nodes[0]])
    [to_closer] = v6_lookup.take_queries()
    assert to_closer.candidate.node == closer and not v6_lookup.finished
    v6_lookup.replied(to_closer, reply_of(closer))
    assert v6_lookup.finished and lookup.result.nodes_answered == 3
    v6_lookup.introduce(v6_nodes)  # none new: it ends again at once
    assert v6_lookup.finished and v6_lookup.take_queries() == []
    # Abandoned (its caller is gone), it never goes on.
    v6_lookup.abandon()
    v6_lookup.introduce([node_at(8, "2a00:1450:8::1")])
    assert v6_lookup.take_queries() == [] and v6_lookup.finished


def test_dht_lookup_core_goes_on_after_its_end_with_nothing_left_out():
    """A lookup that ended with queries out beyond the K closest (withdrawn) and then takes
    an introduced node asks it: the withdrawn ones hold no slot and are not waited for."""
    cached = [node_at(10 * n, f"{20 + n}.0.0.1") for n in range(1, 13)]
    lookup, _ = scripted_lookup(ScriptedView(cached=cached))
    lookup.start()
    out = lookup.take_queries()
    for _ in range(2):  # every query stalls: the next ones go, up to all 12
        for query in list(out):
            lookup.stalled(query)
        out += lookup.take_queries()
    assert len(out) == 12
    for query in out[:8]:
        lookup.replied(query, reply_of(query.candidate.node))
    assert lookup.finished and len(lookup.take_withdrawn()) == 4
    assert lookup.active == lookup.in_flight == 0
    assert [c.state for c in lookup.by_distance].count(tsmd.CandidateState.ASKED) == 0
    closer = node_at(5, "40.0.0.1")
    lookup.introduce([closer])
    [query] = lookup.take_queries()
    assert query.candidate.node == closer and not lookup.finished
    lookup.replied(query, reply_of(closer))
    assert lookup.finished and lookup.result.nodes_answered == 9


def test_dht_lookup_core_judges_named_ids_by_their_own_familys_size():
    """An IPv6 node names the IPv4 nodes closest to the target too (`want`): those are judged
    by the IPv4 DHT's size, in the IPv4 lookup, not taken for sybils it hands out."""
    view = ScriptedView(ipv6=True, implausibly_close=1 << 110,  # a small DHT: a loose line
                        implausibly_close_elsewhere=1 << 104,  # the IPv4 DHT's, tighter
                        cached=[node_at(1 << 12, "2a00:1450:1::1")])
    lookup, counters = scripted_lookup(view)
    lookup.start()
    [query] = lookup.take_queries()
    close_v4 = [node_at(1 << 5, "20.0.0.1"), node_at(1 << 6, "21.0.0.1")]  # within its line
    lookup.replied(query, reply_of(query.candidate.node, nodes=close_v4 + [
        node_at(1 << 11, "2a00:1450:2::1"), node_at(1 << 10, "2a00:1450:5::1")],
        peers=[("2a00:1450:99::1", 1)]))
    assert counters.suspect_introducers == 0 and not query.candidate.suspect
    assert lookup.result.peers == {("2a00:1450:99::1", 1)}
    assert lookup.take_foreign() == close_v4
    # Two IPv6 ids within the line: a node that hands out sybils. Two IPv4 ids within the
    # IPv4 line: that too.
    queries = lookup.take_queries()
    assert len(queries) == 2
    for query, sybils in zip(queries, (
            [node_at(1 << 3, "2a00:1450:3::1"), node_at(1 << 4, "2a00:1450:4::1")],
            [node_at(1, "22.0.0.1"), node_at(2, "23.0.0.1")])):
        lookup.replied(query, reply_of(query.candidate.node, nodes=sybils))
        assert query.candidate.suspect
    assert counters.suspect_introducers == 2


def test_dht_lookup_core_edge_events():
    """Events around the end of a round, and failures that hand a subnet on."""
    def answer_all(lookup, queries, last_reply=None):
        """Answer every query, in order, with nothing; the last with `last_reply`'s nodes."""
        queries = list(queries)
        while queries:
            query = queries.pop(0)
            nodes = last_reply if last_reply is not None and not queries else ()
            lookup.replied(query, reply_of(query.candidate.node, nodes=nodes))
            queries.extend(lookup.take_queries())

    # The last reply the K closest owe names a suspect and a resting node: the suspect's query
    # is decided and the round ends in the same step. It never leaves, nor is it withdrawn.
    cached = [node_at(10 * n, f"{20 + n}.0.0.1") for n in range(1, 9)]
    sybil, resting = node_at(0, "83.0.0.1"), node_at(1, "84.0.0.1")
    lookup, _ = scripted_lookup(ScriptedView(cached=cached, resting_hosts={resting.host}))
    lookup.start()
    answer_all(lookup, lookup.take_queries(), last_reply=[sybil, resting])
    assert lookup.finished and lookup.result.nodes_answered == tsmd.DHT_K
    assert lookup.take_queries() == [] and lookup.take_withdrawn() == []
    # With K usable nodes cached, the routers are not asked.
    router = tsmd.DhtNode(b"", "82.0.0.1", 6881)
    lookup, _ = scripted_lookup(ScriptedView(cached=cached, bootstrap=[router]))
    lookup.start()
    assert (router.host, router.port) not in lookup.candidates
    # A follow-up answered in full counts its node once.
    bloom = bytes([0x11] * tsmd.BLOOM_BYTES)
    out = lookup.take_queries()
    lookup.replied(out[0], reply_of(cached[0], seeds=bloom))
    [again] = lookup.take_queries()
    lookup.replied(again, reply_of(cached[0], peers=[("5.5.5.5", 1)]))
    assert lookup.result.nodes_answered == 1 and lookup.result.peers == {("5.5.5.5", 1)}
    assert lookup.result.seeds_blooms == [bloom]
    # The follow-up of a stalled query is a fresh query: it holds a slot again, and answered,
    # gives it back without another candidate going.
    lookup.take_queries()
    lookup.stalled(out[1])
    [extra] = lookup.take_queries()
    lookup.replied(out[1], reply_of(cached[1], seeds=bloom))
    [again] = lookup.take_queries()
    assert again.follow_up and lookup.active == tsmd.DHT_ALPHA + 1
    lookup.replied(again, reply_of(cached[1]))
    assert lookup.take_queries() == [] and lookup.active == tsmd.DHT_ALPHA
    # A stall that comes after its query failed changes nothing.
    lookup.failed(extra)
    lookup.take_queries()
    lookup.stalled(extra)
    assert lookup.take_queries() == [] and lookup.active == tsmd.DHT_ALPHA

    # A node that lies in its follow-up (too many values) takes back its only answer: the
    # lookup starts over, and does not ask the liar again, though it is still cached.
    liar = cached[0]
    lookup, counters = scripted_lookup(ScriptedView(cached=[liar]))
    lookup.start()
    [first] = lookup.take_queries()
    lookup.replied(first, reply_of(liar, seeds=bloom))
    [again] = lookup.take_queries()
    flood = [(f"9.0.{n // 250}.{n % 250 + 1}", 1)
             for n in range(tsmd.DHT_MAX_VALUES_PER_REPLY + 1)]
    lookup.replied(again, reply_of(liar, peers=flood))
    assert lookup.finished and lookup.rounds == 2 and lookup.take_queries() == []
    assert lookup.result.queries == 2 and counters.values_over_cap == 1
    assert lookup.result.seeds_blooms == [] and lookup.result.nodes_answered == 0

    # A subnet's holder that times out hands the subnet to the node passed over in it.
    holder, neighbour = node_at(10, "124.31.75.1"), node_at(20, "124.31.75.2")
    others = [node_at(10 * n, f"{20 + n}.0.0.1") for n in range(3, 12)]
    lookup, counters = scripted_lookup(ScriptedView(cached=[holder, neighbour, *others]))
    lookup.start()
    out = lookup.take_queries()
    assert counters.same_subnet_skipped == 1 and out[0].candidate.node == holder
    lookup.failed(out[0])
    [next_one] = lookup.take_queries()
    assert next_one.candidate.node == neighbour


# ---- DHT: an in-process network of fake nodes ----


def xor(a: bytes, b: bytes) -> int:
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


def kademlia_buckets(me: int, keys: list[int], nodes: list[int],
                     chooser: random.Random) -> list[int]:
    """The routing table of the node with id `me`: up to 8 nodes per bucket (per length of the
    id prefix shared with `me`), like a real node's, drawn from `nodes` (sorted by their ids,
    `keys`). The nodes whose XOR distance to `me` has bit length b are those whose id shares
    the first 160 - b bits with `me` and differs in the next: one range of the sorted ids, so
    each bucket is found by bisection instead of by a scan of every other node."""
    table: list[int] = []
    for bits in range(1, 161):
        prefix = (me >> (bits - 1)) ^ 1
        low = bisect.bisect_left(keys, prefix << (bits - 1))
        high = bisect.bisect_left(keys, (prefix + 1) << (bits - 1))
        if high - low <= 8:
            table.extend(nodes[low:high])
        else:
            table.extend(nodes[i] for i in chooser.sample(range(low, high), 8))
    return table


class FakeDhtNetwork:
    """Nodes on distinct 127.x addresses with Kademlia routing tables built from global
    knowledge; each infohash's peers are stored on the 8 nodes closest to it. `style` is
    "jech" (values, no filters) or "libtorrent" (with scrape: filters and no values).

    `rtt` = (low, high) gives each node a round-trip time drawn from that range: its replies
    leave that much after the query came. `routers` > 0 makes the first `routers` nodes
    bootstrap routers like the public ones: they store nothing, sit in no routing table and
    answer every query with 8 random nodes, not the closest ones they know.

    `sybils` > 0 adds that many sybil nodes after the `count` others, on two addresses of
    127.66.6.0/24 (on loopback, each node counts as its own subnet) and in no routing table.
    Asked about a target, sybil s claims the id one bit (bit s) away from it, names the other
    sybils the same way, and answers the same 20 made-up peers and saturated BEP 33 filters. A router whose behaviour is "sybil-router" hands them all out; a
    "sybil-gateway" node answers as an honest one would, but with one sybil (a new one each
    time) in place of its eighth node."""

    SYBIL_PEERS = 20

    def __init__(self, count: int, swarms: dict[bytes, set[tuple[str, int, bool]]], *,
                 style: str = "jech", hostile: dict[int, str] | None = None,
                 second_octet: int = 20, values_delay: float = 0.0,
                 rtt: tuple[float, float] | None = None, routers: int = 0,
                 sybils: int = 0) -> None:
        self.ids = [hashlib.sha1(f"node {n}".encode()).digest() for n in range(count + sybils)]
        self.addresses = [f"127.{second_octet + n // 250}.{n % 250 + 1}.1" for n in range(count)]
        self.addresses += [f"127.66.6.{s % 2 + 1}" for s in range(sybils)]
        self.sybils = list(range(count, count + sybils))
        count += sybils
        self.ports = [0] * count
        self.style = style
        self.values_delay = values_delay  # plain (non-scrape) replies come this much later
        chooser = random.Random(f"rtt {count}")
        self.delay = [chooser.uniform(*rtt) if rtt else 0.0 for _ in range(count)]
        self.hostile = dict(hostile or {})  # node index -> behaviour
        self.hostile.update({n: "router" for n in range(routers) if n not in self.hostile})
        self.hostile.update({n: "sybil" for n in self.sybils})
        self.routers = routers
        self.random = random.Random(f"routers {count}")
        self.queries = [0] * count
        self.per_second: dict[int, int] = {}  # packets received per wall-clock second
        self.stored: list[dict[bytes, set[tuple[str, int, bool]]]] = [{} for _ in range(count)]
        # Peers live on the 8 closest nodes that answer at all (dead entries store nothing).
        storers = [n for n in range(count) if self.hostile.get(n) not in (
            "silent", "router", "sybil-router", "sybil")]
        for infohash, peers in swarms.items():
            for n in heapq.nsmallest(8, storers, key=lambda n: xor(self.ids[n], infohash)):
                self.stored[n][infohash] = peers
        self.table = self._routing_tables(routers)

    @staticmethod
    def sybil_id(s: int, infohash: bytes) -> bytes:
        return (int.from_bytes(infohash, "big") ^ 1 << s).to_bytes(20, "big")

    def _sybil_answer(self, n: int, infohash: bytes, scrape: bool) -> dict:
        """What a sybil (or the router handing them out) answers about `infohash`."""
        nodes = b"".join(tsmd.encode_compact_node(tsmd.DhtNode(
            self.sybil_id(s, infohash), self.addresses[m], self.ports[m]))
            for s, m in enumerate(self.sybils) if m != n)
        if n not in self.sybils:  # the router
            return {b"id": self.ids[n], b"nodes": nodes}
        s = self.sybils.index(n)
        body = {b"id": self.sybil_id(s, infohash), b"token": b"sybil", b"nodes": nodes,
                b"values": [tsmd.encode_compact_peer(f"127.250.0.{p + 1}", 6881)
                            for p in range(self.SYBIL_PEERS)]}
        if scrape:
            body[b"BFsd"] = body[b"BFpe"] = b"\xff" * tsmd.BLOOM_BYTES
        return body

    def _routing_tables(self, routers: int) -> list[list[int]]:
        members = sorted((int.from_bytes(self.ids[n], "big"), n)
                         for n in range(routers, len(self.ids) - len(self.sybils)))
        keys, nodes = [key for key, _ in members], [n for _, n in members]
        tables: list[list[int]] = [[] for _ in self.ids]
        for me, n in members:
            tables[n] = kademlia_buckets(me, keys, nodes, random.Random(n))
        return tables

    @property
    def bootstrap(self) -> list[str]:
        return [f"{self.addresses[n]}:{self.ports[n]}" for n in range(self.routers or 3)]

    def node(self, n: int) -> tsmd.DhtNode:
        return tsmd.DhtNode(self.ids[n], self.addresses[n], self.ports[n])

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for n in range(len(self.ids)):
                await nursery.start(self._serve_node, n)
            task_status.started()

    async def _serve_node(self, n: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
        # The second socket only for the node that answers from the wrong address: a network
        # of 10,000 nodes must fit in the file descriptor limit.
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
            await sock.bind((self.addresses[n], 0))
            self.ports[n] = sock.getsockname()[1]
            other = sock
            if self.hostile.get(n) == "wrong-address":
                other = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
                await other.bind((self.addresses[n], 0))
            task_status.started()
            try:
                async with trio.open_nursery() as later:
                    await self._answer_queries(n, sock, other, later)
            finally:
                if other is not sock:
                    other.close()

    async def _answer_queries(self, n: int, sock, other, later) -> None:
        async def send_later(delay, reply, via, address):
            await trio.sleep(delay)
            await via.sendto(reply, address)

        while True:
            data, address = await sock.recvfrom(4096)
            self.queries[n] += 1
            second = int(time.time())
            self.per_second[second] = self.per_second.get(second, 0) + 1
            behaviour = self.hostile.get(n)
            if behaviour == "silent":
                continue
            try:
                query = bencoder.bdecode(data)
                assert query[b"ro"] == 1 and query[b"q"] == b"get_peers"
            except Exception:
                continue
            for reply, via in self.answer(n, query, behaviour, sock, other, address):
                delay = self.delay[n]
                if query[b"a"].get(b"scrape") != 1:
                    delay += self.values_delay
                if delay:
                    later.start_soon(send_later, delay, reply, via, address)
                else:
                    await via.sendto(reply, address)

    def answer(self, n: int, query: dict, behaviour: str | None, sock, other, querier=None):
        arguments = query[b"a"]
        infohash = arguments[b"info_hash"]
        if behaviour in ("sybil", "sybil-router"):
            return [(bencoder.bencode({b"t": query[b"t"], b"y": b"r", b"r": self._sybil_answer(
                n, infohash, arguments.get(b"scrape") == 1)}), sock)]
        if behaviour == "router":
            far = self.random.sample(range(self.routers, len(self.ids)), 8)
            return [(bencoder.bencode({b"t": query[b"t"], b"y": b"r", b"r": {
                b"id": self.ids[n], b"nodes": b"".join(tsmd.encode_compact_node(self.node(m))
                                                       for m in far)}}), sock)]
        closest = sorted(self.table[n], key=lambda m: xor(self.ids[m], infohash))[:8]
        body: dict = {b"id": self.ids[n], b"token": b"tok" + bytes([n % 256]),
                      b"nodes": b"".join(tsmd.encode_compact_node(self.node(m)) for m in closest)}
        peers = self.stored[n].get(infohash)
        if peers is not None:
            values = [tsmd.encode_compact_peer(host, port) for host, port, _ in sorted(peers)]
            if arguments.get(b"scrape") == 1 and self.style == "libtorrent":
                seeds, downloaders = bytearray(256), bytearray(256)
                for host, _, seed in peers:
                    tsmd.bloom_insert(seeds if seed else downloaders, host)
                body[b"BFsd"], body[b"BFpe"] = bytes(seeds), bytes(downloaders)
            else:
                body[b"values"] = values[:100]
        reply = {b"t": query[b"t"], b"y": b"r", b"r": body}
        if behaviour == "garbage":
            return [(os.urandom(40), sock)]
        if behaviour == "nested":
            return [(b"d1:rd2:id20:" + self.ids[n] + b"5:nodes" + b"l" * 3000 + b"e" * 3000
                     + b"ee1:t" + bencoder.bencode(query[b"t"])[0:] + b"1:y1:re", sock)]
        if behaviour == "oversized":
            body[b"values"] = [b"x" * 7] * 6000  # ~60 KB of peers of a wrong length
            return [(bencoder.bencode(reply), sock)]
        if behaviour == "bogons":
            bogus = [("0.0.0.0", 6881), ("224.0.0.1", 6881), ("255.255.255.255", 6881),
                     (self.addresses[0], 0), ("127.20.0.1", 0)]
            body[b"nodes"] = b"".join(tsmd.encode_compact_node(tsmd.DhtNode(os.urandom(20), h, p))
                                      for h, p in bogus) + body[b"nodes"]
            body[b"values"] = [tsmd.encode_compact_peer("0.0.0.0", 0)]
            return [(bencoder.bencode(reply), sock)]
        if behaviour == "wrong-tid":
            reply[b"t"] = b"zz" + query[b"t"]
            return [(bencoder.bencode(reply), sock)]
        if behaviour == "wrong-address":
            return [(bencoder.bencode(reply), other)]
        if behaviour == "self":  # names the querier itself among the closest nodes
            body[b"nodes"] = tsmd.encode_compact_node(tsmd.DhtNode(
                hashlib.sha1(b"me").digest(), *querier)) + body[b"nodes"]
            return [(bencoder.bencode(reply), sock)]
        if behaviour == "flood":
            junk = {b"t": os.urandom(4), b"y": b"r", b"r": body}
            return [(bencoder.bencode(junk), sock)] * 20 + [(bencoder.bencode(reply), sock)] * 3
        if behaviour == "error":
            return [(bencoder.bencode({b"t": query[b"t"], b"y": b"e",
                                       b"e": [201, b"too many requests"]}), sock)]
        if behaviour == "sybil-gateway":
            s = self.queries[n] % len(self.sybils)
            body[b"nodes"] = body[b"nodes"][:7 * 26] + tsmd.encode_compact_node(tsmd.DhtNode(
                self.sybil_id(s, infohash), self.addresses[self.sybils[s]],
                self.ports[self.sybils[s]]))
            return [(bencoder.bencode(reply), sock)]
        if behaviour == "id-changer":  # a new id at every answer, and made-up peers
            body[b"id"] = os.urandom(20)
            body[b"values"] = [tsmd.encode_compact_peer(f"127.251.{n % 250}.{p + 1}", 6881)
                               for p in range(5)]
            return [(bencoder.bencode(reply), sock)]
        if behaviour == "many-values":  # as many made-up peers as a datagram holds
            body[b"values"] = [tsmd.encode_compact_peer(f"127.252.{p // 250}.{p % 250 + 1}", 6881)
                               for p in range(8000)]
            return [(bencoder.bencode(reply), sock)]
        if behaviour in ("saturated", "inflated") and arguments.get(b"scrape") == 1:
            # Filters for any torrent asked: every bit set, or 300 made-up addresses.
            body.pop(b"values", None)
            if behaviour == "saturated":
                body[b"BFsd"] = body[b"BFpe"] = b"\xff" * tsmd.BLOOM_BYTES
            else:
                made_up = bytearray(tsmd.BLOOM_BYTES)
                for m in range(300):
                    tsmd.bloom_insert(made_up, f"198.51.{m // 250}.{m % 250 + 1}")
                body[b"BFsd"] = body[b"BFpe"] = bytes(made_up)
            return [(bencoder.bencode(reply), sock)]
        return [(bencoder.bencode(reply), sock)]


def test_fake_dht_routing_tables_are_kademlia_buckets():
    network = FakeDhtNetwork(300, {}, routers=2)
    ids = [int.from_bytes(node_id, "big") for node_id in network.ids]
    for n in range(2, 300):
        sizes: dict[int, int] = {}  # bucket (bit length of the distance) -> nodes in it
        for other in range(2, 300):
            if other != n:
                bucket = (ids[n] ^ ids[other]).bit_length()
                sizes[bucket] = sizes.get(bucket, 0) + 1
        table = network.table[n]
        assert len(set(table)) == len(table) and n not in table and not {0, 1} & set(table)
        got: dict[int, int] = {}
        for other in table:
            bucket = (ids[n] ^ ids[other]).bit_length()
            got[bucket] = got.get(bucket, 0) + 1
        assert got == {bucket: min(8, size) for bucket, size in sizes.items()}
    assert network.table[0] == network.table[1] == [] and network.bootstrap[0].startswith(
        network.addresses[0]) and len(network.bootstrap) == 2


def dht_swarms(count: int, peers_each: int = 3, salt: str = "") -> dict[bytes, set]:
    swarms = {}
    for n in range(count):
        infohash = hashlib.sha1(f"swarm {salt}{n}".encode()).digest()
        swarms[infohash] = {(f"127.200.{(n * 7 + p) % 250}.{p + 1}", 6881 + p, p % 2 == 0)
                            for p in range(1 + (n + 1) % peers_each)}
    return swarms


def dht_test_options(**overrides) -> tsmd.DhtOptions:
    options = dict(concurrency=50, rate=0, per_ip_rate=1, per_ip_burst=4, stall_timeout=0.3,
                   query_timeout=1.0, max_queries=64, bep33=True, allow_private=True)
    options.update(overrides)
    return tsmd.DhtOptions(**options)


async def survey_all(network: FakeDhtNetwork, infohashes, options, cache=None, watch=None,
                     bind="127.0.0.1:0"):
    """Survey `infohashes` through a running `network`; `watch` goes to each lookup. Bound to
    "[::]:0", the survey asks IPv6 nodes too."""
    endpoint = tsmd.UdpEndpoint.open(bind, tsmd.krpc_transaction_untrusted)
    bootstrap = [tsmd.DhtNode(b"", *tsmd.split_host_port(b)) for b in network.bootstrap]
    # An empty cache is falsy (len 0): test for None, or a cache to be warmed is dropped.
    survey = tsmd.DhtSurvey(endpoint, tsmd.NodeCache() if cache is None else cache, bootstrap,
                            options, endpoint.dual_stack)
    results = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(survey.serve)
        limiter = trio.CapacityLimiter(options.concurrency)

        async def one(infohash):
            async with limiter:
                results[infohash] = await survey.lookup(infohash, watch)
        async with trio.open_nursery() as lookups:
            for infohash in infohashes:
                lookups.start_soon(one, infohash)
        nursery.cancel_scope.cancel()
    endpoint.close()
    return results, survey, endpoint.counters


def survey_fake_network(network: FakeDhtNetwork, infohashes, timeout: float = 60):
    """Serve the fake network and survey `infohashes` through it; stop everything after."""
    async def scenario():
        async with trio.open_nursery() as nursery:
            await nursery.start(network.serve)
            outcome = await survey_all(network, list(infohashes), dht_test_options())
            nursery.cancel_scope.cancel()
        return outcome

    return run(scenario, timeout=timeout)


def test_dht_lookups_find_every_peer_and_survive_hostile_nodes():
    swarms = dht_swarms(60)
    hostile = {5: "garbage", 9: "nested", 13: "oversized", 17: "bogons", 21: "wrong-tid",
               25: "wrong-address", 29: "flood", 33: "error", 37: "silent", 41: "silent"}
    network = FakeDhtNetwork(120, swarms, hostile=hostile)
    results, survey, udp = survey_fake_network(network, swarms, timeout=120)
    # A hostile node among an infohash's storers hides its copy, but 8 nodes store each swarm.
    for infohash, peers in swarms.items():
        assert results[infohash].peers == {(h, p) for h, p, _ in peers}, infohash.hex()
    counters = survey.counters
    assert counters.timeouts > 0 and counters.bogons_skipped > 0 and counters.krpc_errors > 0
    assert udp.dropped_unmatched > 0 and udp.dropped_invalid > 0 and udp.send_errors == 0
    assert all(count <= 3 * len(swarms) for count in network.queries)  # no node hammered


@pytest.mark.parametrize("style", ["jech", "libtorrent"])
def test_dht_sybils_and_liars_bend_no_count(style):
    """Issue 15's hostile network: 8 sybils on two addresses, each one bit from every target
    with the same 20 made-up peers and saturated filters, handed out all at once by a bootstrap router and
    one at a time by another router and two nodes in the routing tables; two nodes change their id at every answer
    (with made-up peers), one answers 8,000 values, one saturated filters. A cold run, then a
    warm one from its cache: counts exact, no made-up peer, no liar cached."""
    swarms = dht_swarms(40, peers_each=4, salt=f"sybils {style}")
    hostile = {0: "sybil-router", 1: "sybil-gateway", 60: "sybil-gateway", 90: "sybil-gateway",
               11: "id-changer", 23: "id-changer", 35: "many-values", 47: "saturated"}
    network = FakeDhtNetwork(150, swarms, style=style, hostile=hostile, routers=3, sybils=8)
    # (A gateway is honest but for its eighth node: nothing tells it apart.)
    liars = {network.addresses[n] for n in [*hostile, *network.sybils]
             if hostile.get(n) not in ("saturated", "sybil-gateway")}
    cache = tsmd.NodeCache()

    async def scenario():
        async with trio.open_nursery() as nursery:
            await nursery.start(network.serve)
            runs = [await survey_all(network, list(swarms), dht_test_options(), cache)
                    for _ in ("cold", "warm")]
            nursery.cancel_scope.cancel()
        return runs

    runs = run(scenario, timeout=120)
    for results, survey, _ in runs:
        for infohash, peers in swarms.items():
            result = results[infohash]
            assert result.peers == {(h, p) for h, p, _ in peers}, infohash.hex()
            if style == "libtorrent":
                seeds, everyone = result.bep33_estimates()
                real_seeds = {h for h, _, seed in peers if seed}
                assert abs(seeds - len(real_seeds)) <= 0.1 * len(real_seeds) + 2
                assert abs(everyone - len(peers)) <= 0.1 * len(peers) + 2
        assert not liars & {node.host for node in cache.nodes()}, sorted(
            liars & {node.host for node in cache.nodes()})
    # Each defence was met: sybils were asked, and their peers left out; the id-changers
    # were distrusted for the run.
    cold = runs[0][1].counters
    # (Two sybils of one address in a lookup happen only when two gateways meet in it: the
    # rule is tested on its own, in test_dht_lookup_keeps_one_node_per_subnet_and_prefers_...)
    assert cold.suspect_nodes > 0 and cold.suspect_introducers > 0
    assert cold.suspect_peers >= FakeDhtNetwork.SYBIL_PEERS
    assert cold.ids_changed >= 2 and cold.values_over_cap > 0
    assert "sybil defences: " in cold.summary() and "implausibly close" in cold.summary()
    distrusted = {host for host, _ in cache.distrusted}
    assert {network.addresses[n] for n in (11, 23)} <= distrusted
    # The network's size, as the lookups saw it (150 nodes), set what is implausibly close.
    seen_size = (2 ** (160 - tsmd.DHT_CLOSE_ID_MARGIN_BITS)
                 / runs[1][1].families[False].implausibly_close)
    assert 75 <= seen_size <= 300, seen_size


def test_dht_never_queries_its_own_address(monkeypatch):
    swarms = dht_swarms(30, salt="self")
    network = FakeDhtNetwork(80, swarms, hostile={n: "self" for n in range(0, 80, 3)})
    sent_to: set[tuple[str, int]] = set()
    own: set[tuple[str, int]] = set()
    original = tsmd.UdpEndpoint.send_nowait

    def recording(endpoint, data, host, port):
        sent_to.add((host, port))
        own.add(endpoint.sock.getsockname()[:2])
        return original(endpoint, data, host, port)

    monkeypatch.setattr(tsmd.UdpEndpoint, "send_nowait", recording)
    results, survey, udp = survey_fake_network(network, swarms)
    for infohash, peers in swarms.items():
        assert results[infohash].peers == {(h, p) for h, p, _ in peers}
    assert len(own) == 1 and not own & sent_to
    assert survey.counters.bogons_skipped > 0
    wildcard = tsmd.UdpEndpoint.open("0.0.0.0:0", tsmd.krpc_transaction_untrusted)
    try:
        assert wildcard.is_own_address("127.0.0.1", wildcard.port)
        assert wildcard.is_own_address("127.9.9.9", wildcard.port)
        assert not wildcard.is_own_address("127.0.0.1", wildcard.port + 1)
    finally:
        wildcard.close()


def test_dht_bep33_filters_and_values_follow_up_like_libtorrent():
    swarms = dht_swarms(30, peers_each=5, salt="bf")
    # The follow-up for values answers late: the lookup must wait for it, not end without it.
    network = FakeDhtNetwork(60, swarms, style="libtorrent", values_delay=0.05)
    results, survey, _ = survey_fake_network(network, swarms)
    for infohash, peers in swarms.items():
        result = results[infohash]
        assert result.peers == {(h, p) for h, p, _ in peers}
        seeds, everyone = result.bep33_estimates()
        real_seeds = {h for h, _, seed in peers if seed}
        assert seeds == pytest.approx(len(real_seeds), abs=0.6)
        assert everyone == pytest.approx(len({h for h, _, _ in peers}), abs=0.6)


def test_bep33_leaves_out_saturated_and_outlying_filters():
    honest = []
    for n in range(5):
        bloom = bytearray(tsmd.BLOOM_BYTES)
        for m in range(20 + n):
            tsmd.bloom_insert(bloom, f"192.0.2.{m + 1}")
        honest.append(bytes(bloom))
    saturated, inflated = b"\xff" * tsmd.BLOOM_BYTES, bytearray(tsmd.BLOOM_BYTES)
    for m in range(400):
        tsmd.bloom_insert(inflated, f"198.51.{m // 250}.{m % 250 + 1}")
    kept, dropped = tsmd.plausible_filters([*honest, saturated, bytes(inflated)])
    assert kept == honest and dropped == 2
    # Nodes that store the whole swarm read far above nodes that store part of it: their
    # filters hold the others', and stay. Made-up addresses filling most bits do not.
    def filter_of(addresses) -> bytes:
        bloom = bytearray(tsmd.BLOOM_BYTES)
        for address in addresses:
            tsmd.bloom_insert(bloom, address)
        return bytes(bloom)
    swarm = [f"203.0.113.{m + 1}" for m in range(120)]
    full, part = filter_of(swarm), filter_of(swarm[:8])
    uneven = [full] * 3 + [part] * 5
    assert tsmd.plausible_filters(uneven) == (uneven, 0)
    few = [filter_of([]), filter_of([]), filter_of(swarm[:5]), filter_of(swarm[:30])]
    assert tsmd.plausible_filters(few) == (few, 0)
    # Against one address the others know, holding it proves nothing (a made-up quarter-full
    # filter holds it one time in sixteen): the cost, a swarm that one node alone stores.
    alone = [filter_of([]), filter_of([]), filter_of(swarm[:1]), filter_of(swarm[:13])]
    assert tsmd.plausible_filters(alone) == (alone[:3], 1)
    crowded = filter_of(f"198.18.{m // 250}.{m % 250 + 1}" for m in range(1_900))
    assert tsmd.plausible_filters([*uneven, crowded]) == (uneven, 1)
    # Two filters cannot outvote each other: only saturation is judged.
    assert tsmd.plausible_filters([honest[0], bytes(inflated)]) == ([honest[0], bytes(inflated)], 0)
    assert tsmd.plausible_filters([saturated]) == ([], 1)
    result = tsmd.LookupResult(b"x" * 20, seeds_blooms=[*honest, saturated],
                               peers_blooms=[saturated])
    seeds, peers = result.bep33_estimates()
    # The saturated ones left out: the seeds read as the honest five; the peers, with no
    # plausible filter and no values, are unknown, not 0.
    assert seeds == pytest.approx(24, abs=1.5) and peers is None
    assert result.implausible_filters() == 2


def test_dht_bep33_estimates_survive_lying_filters():
    swarms = dht_swarms(30, peers_each=5, salt="liars")
    hostile = {n: ("saturated" if n % 2 else "inflated") for n in range(3, 60, 7)}
    network = FakeDhtNetwork(60, swarms, style="libtorrent", hostile=hostile)
    results, survey, _ = survey_fake_network(network, swarms)
    dropped = 0
    for infohash, peers in swarms.items():
        result = results[infohash]
        seeds, everyone = result.bep33_estimates()
        real_seeds, real_peers = {h for h, _, seed in peers if seed}, {h for h, _, _ in peers}
        assert abs(seeds - len(real_seeds)) <= 0.1 * len(real_seeds) + 2, infohash.hex()
        assert abs(everyone - len(real_peers)) <= 0.1 * len(real_peers) + 2, infohash.hex()
        dropped += result.implausible_filters()
    assert dropped >= 10  # the liars were asked, and left out


def test_dht_with_no_node_answering_stops_and_says_the_network_is_down(tmp_path):
    silent = silent_udp()  # a bootstrap that never answers
    try:
        db, _ = torrent_db(tmp_path, 500, [])
        db.close()
        config = write_config(tmp_path, f"""
database = "tsmd.sqlite3"
[network]
allow_private = true
outage_after = "3s"
[dht]
bootstrap = ["127.0.0.1:{silent.getsockname()[1]}"]
bind = "127.0.0.1:0"
rate = 0
[[collections]]
name = "c"
url = "http://x/"
type = "books"
""")
        started = time.monotonic()
        done = cli("--config", str(config), "dht")
        print(f"tsmd dht stopped after {time.monotonic() - started:.1f} s")
        # Before, 500 lookups of 2 s each, four at a time with nothing cached: four minutes.
        assert done.returncode == tsmd.ExitCode.UNREACHABLE == 69, done.stderr
        assert "dht: no DHT node answered in 3 s: network down?" in done.stderr
        assert "Traceback" not in done.stderr
        db = sqlite3.connect(tmp_path / "tsmd.sqlite3")
        assert db.execute("SELECT count(*) FROM dht_samples").fetchone()[0] == 0
        assert db.execute("SELECT outcome FROM runs WHERE stage = 'dht'").fetchall() == [
            ("unreachable",)]
        db.close()
        # `tsmd run` goes on with the stages that work; the page says the DHT numbers are old.
        folder = tmp_path / "torrents"
        folder.mkdir()
        for n in range(20):
            (folder / f"r_{n}.torrent").write_bytes(v1_torrent(f"t{n}", seed=n))
        config.write_text(config.read_text().replace('"http://x/"', f'"{folder.as_uri()}/"')
                          + '[report]\noutputs = [{ format = "html", path = "page.html" }]\n')
        # The collection's 500 torrents are replaced by the folder's 20: the mass-removal
        # guard would refuse that (exit 1) without the flag.
        done = cli("--config", str(config), "run", "--accept-removals")
        assert done.returncode == tsmd.ExitCode.UNREACHABLE, done.stderr
        status = json.loads(cli("--config", str(config), "status", "--format", "json").stdout)
        assert {stage: run["outcome"] for stage, run in status["runs"].items()} == {
            "run": "unreachable", "sync": "ok", "dht": "unreachable", "probe": "ok",
            "scrape": "ok", "report": "ok", "prune": "ok"}
        page = (tmp_path / "page.html").read_text()
        assert "heard nothing from the network: the DHT numbers here are from earlier" in page
    finally:
        silent.close()


def test_dht_outage_in_the_middle_of_a_run_blames_no_node(tmp_path):
    swarms = dht_swarms(300, salt="outage")
    network = FakeDhtNetwork(120, swarms)
    db, settings = dht_survey_db(tmp_path, swarms, rate=40, query_timeout=1, stall_timeout=0.5)
    settings = tsmd.dataclasses.replace(settings, network=tsmd.dataclasses.replace(
        settings.network, outage_after=2.0))

    async def scenario():
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as serving:
                await serving.start(network.serve)
                result = {}

                async def survey():
                    result["counts"] = await tsmd.run_dht(db, settings, settings.collections,
                                                          tsmd.Reporter(-1),
                                                          bootstrap=network.bootstrap)
                nursery.start_soon(survey)
                # Some lookups done and stored, most to come at 40 packets/s...
                with trio.fail_after(30):
                    while not db.execute("SELECT count(*) FROM dht_samples").fetchone()[0]:
                        await trio.sleep(0.05)
                serving.cancel_scope.cancel()  # then the network goes away
        return result["counts"]

    counts = run(scenario, timeout=120)
    assert counts.outage == f"no DHT node answered for 2 s, after {counts.replies:,} answers: " \
        "network down?" and counts.replies > 0
    assert 0 < counts.lookups < 300
    assert tsmd.dht_judge(tsmd.Reporter(-1))(counts) == ("unreachable", tsmd.ExitCode.UNREACHABLE)
    # What was measured before is kept; the nodes that fell silent are not blamed for it.
    assert db.execute("SELECT count(*) FROM dht_samples").fetchone()[0] > 0
    assert db.execute("SELECT count(*) FROM dht_silent_nodes").fetchone()[0] == 0


def test_dht_on_a_host_with_no_route_says_the_network_is_down(tmp_path):
    # In a network namespace of its own, with not even loopback up, every send fails.
    db, _ = torrent_db(tmp_path, 50, [])
    db.close()
    config = write_config(tmp_path, """
database = "tsmd.sqlite3"
[network]
allow_private = true
outage_after = "3s"
[dht]
bootstrap = ["127.0.0.1:6881", "127.0.0.2:6881"]
bind = "0.0.0.0:0"
[[collections]]
name = "c"
url = "http://x/"
type = "books"
""")
    if not shutil.which("unshare"):
        cannot_test("unshare (util-linux) is missing: apt-get install util-linux")
    run_privileged(["unshare", "-n", "true"], "a network namespace")
    for stage in ("dht", "sync"):  # the collection is http://x/: nothing to connect to
        done = subprocess.run(["unshare", "-n", sys.executable, str(HERE / "tsmd.py"),
                               "--config", str(config), stage], capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)
        assert done.returncode == tsmd.ExitCode.UNREACHABLE, done.stderr
        assert f"{stage}: no " in done.stderr and "network down?" in done.stderr
        assert "Traceback" not in done.stderr


def test_scrape_that_hears_nothing_at_all_says_the_network_is_down(tmp_path, server,
                                                                   monkeypatch):
    # Only silence from every tracker is an outage: no datagram, DNS answer, connection or
    # response. Many dead trackers beside one live one, or trackers that answer nothing
    # useful, are everyday life, and the dead ones back off; in an outage no tracker does.
    hashes = [hashlib.sha1(f"torrent {n}".encode()).digest() for n in range(20)]
    live = FakeUdpTracker(known_counts(hashes, 1))
    silent = [FakeUdpTracker({}, silent=True) for _ in range(30)]
    server.files["/empty/scrape"] = (bencoder.bencode({b"files": {}}), "text/plain")

    async def scrape(name: str, trackers: Callable[[], list[str]]):
        async with trio.open_nursery() as nursery:
            for tracker in (live, *silent):
                await nursery.start(tracker.serve)
            folder = tmp_path / name
            folder.mkdir()
            db, _ = torrent_db(folder, 20, trackers())  # (their ports are known now)
            settings = scrape_settings(folder, timeout=0.3, attempts=2)
            counts = await tsmd.run_scrape(db, settings, settings.collections, tsmd.Reporter(-1))
            nursery.cancel_scope.cancel()
        failing = db.execute("SELECT count(*) FROM trackers WHERE consecutive_failures > 0"
                             ).fetchone()[0]
        return counts, tsmd.scrape_judge(tsmd.Reporter(-1))(counts), failing

    counts, judged, failing = run(scrape, "dead", lambda: [t.url for t in silent])
    assert counts.trackers == 30 and counts.outage
    assert judged == ("unreachable", tsmd.ExitCode.UNREACHABLE) and failing == 0
    counts, judged, failing = run(scrape, "mixed", lambda: [t.url for t in (*silent, live)])
    assert counts.outage is None and judged == ("partial", tsmd.ExitCode.OK)
    assert counts.torrents_answered == 20 and failing == 30
    counts, judged, _ = run(scrape, "empty", lambda: [server.url("/empty/announce")])
    assert counts.trackers == 1 and counts.outage is None and counts.hashes_answered == 0
    resolve = tsmd.resolve_addresses

    async def resolving(host: str, port: int) -> list[str]:  # no DNS query leaves the host
        if host == "gone.example":
            raise tsmd.NoSuchHost(f"cannot resolve {host}: Name or service not known")
        return await resolve(host, port)

    monkeypatch.setattr(tsmd, "resolve_addresses", resolving)
    counts, judged, _ = run(scrape, "unknown", lambda: ["udp://gone.example:1/a"])
    assert counts.trackers == 1 and counts.outage is None  # DNS said the name does not exist


def test_a_slow_answer_alone_in_flight_is_not_an_outage():
    asked, heard = [10], [0]

    async def scenario():
        scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tsmd.watch_for_outage, lambda: asked[0], lambda: heard[0], 5.0,
                               scope)
            await trio.sleep(30)  # one request waits long; nothing else is asked
            assert not scope.cancel_called
            asked[0] += 2  # two more unanswered: still under OUTAGE_MIN_REQUESTS
            await trio.sleep(30)
            assert not scope.cancel_called
            heard[0] += 1
            await trio.sleep(2)
            asked[0] += 3  # three unanswered in the next 5 s: an outage
            await trio.sleep(5)
            assert scope.cancel_called
            nursery.cancel_scope.cancel()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


def dht_survey_db(tmp_path, swarms, **dht):
    """A database whose one collection lists each infohash of `swarms` by itself, and settings
    for run_dht on loopback without rate limits (`dht` adds [dht] settings)."""
    db, _ = torrent_db(tmp_path, 0, [])
    with tsmd.Transaction(db):
        collection_id = db.execute("SELECT id FROM collections").fetchone()[0]
        for infohash in swarms:
            torrent_id = tsmd.upsert_torrent(db, tsmd.decode_magnet_untrusted(
                tsmd.magnet_uri(infohash.hex())), 1)
            db.execute("INSERT INTO memberships (collection_id, source, torrent_id, first_seen, "
                       "last_seen) VALUES (?, ?, ?, 1, 1)", (collection_id, infohash.hex(),
                                                               torrent_id))
    settings = make_settings(tmp_path, [{"name": "c", "url": "http://x/", "type": "books"}],
                             dht={"bind": "127.0.0.1:0", "rate": 0, **dht})
    return db, settings


def test_dht_warm_cache_cuts_packets_and_persists(tmp_path):
    swarms = dht_swarms(100, salt="warm")
    network = FakeDhtNetwork(400, swarms)
    db, settings = dht_survey_db(tmp_path, swarms, stall_timeout=1, query_timeout=2)

    async def scenario():
        async with trio.open_nursery() as nursery:
            await nursery.start(network.serve)
            cold = await tsmd.run_dht(db, settings, settings.collections, tsmd.Reporter(-1),
                                      bootstrap=network.bootstrap)
            warm = await tsmd.run_dht(db, settings, settings.collections, tsmd.Reporter(-1),
                                      bootstrap=network.bootstrap)
            nursery.cancel_scope.cancel()
        return cold, warm

    cold, warm = run(scenario, timeout=120)
    assert cold.lookups == warm.lookups == 100
    assert cold.peers == warm.peers == sum(len(p) for p in swarms.values())
    # The warm cache starts each lookup at the K closest nodes: 8 queries, no hops.
    assert warm.packets_sent < cold.packets_sent and warm.packets_sent <= 100 * (tsmd.DHT_K + 1)
    assert db.execute("SELECT count(*) FROM dht_nodes").fetchone()[0] > 100
    samples = db.execute("SELECT count(*), sum(peers) FROM dht_samples").fetchone()
    assert samples == (200, 2 * cold.peers)
    rows = {row.infohash: row for row in tsmd.load_report_rows(db)}
    for infohash, peers in swarms.items():
        assert rows[infohash.hex()].dht_peers == len(peers) and rows[infohash.hex()].dht_scraped > 0


def test_dht_silent_addresses_are_left_alone_by_the_next_runs_then_retried(tmp_path):
    swarms = dht_swarms(60, salt="silent")
    silent = set(range(5, 300, 3))
    network = FakeDhtNetwork(300, swarms, hostile={n: "silent" for n in silent})
    db, settings = dht_survey_db(tmp_path, swarms, stall_timeout=0.3, query_timeout=1)
    answering = network.addresses[0]  # a bootstrap node: it answers, and is cached

    def silent_rows():
        return {(host, runs) for host, _, runs, _ in db.execute(
            "SELECT host, port, runs, last_failed FROM dht_silent_nodes")}

    async def survey():
        return await tsmd.run_dht(db, settings, settings.collections, tsmd.Reporter(-1),
                                  bootstrap=network.bootstrap)

    async def scenario():
        async with trio.open_nursery() as nursery:
            await nursery.start(network.serve)
            cold = await survey()
            remembered = silent_rows()
            warm = await survey()
            # Three days on, the back-off (2 days after one silent run) has passed: the silent
            # ones are asked once more and now count two runs. A node of the warm cache that
            # stands as silent (say, it was away a while) is forgiven.
            with tsmd.Transaction(db):
                db.execute("UPDATE dht_silent_nodes SET last_failed = last_failed - 3 * 86400")
                db.execute("INSERT INTO dht_silent_nodes VALUES (?, ?, 1, ?)",
                           (answering, network.ports[0], int(time.time())))
            later = await survey()
            nursery.cancel_scope.cancel()
        return cold, remembered, warm, later

    cold, remembered, warm, later = run(scenario, timeout=120)
    silent_hosts = {network.addresses[n] for n in silent}
    assert cold.timeouts > 0 and remembered and {host for host, _ in remembered} <= silent_hosts
    assert {runs for _, runs in remembered} == {1}
    # (A warm lookup may still meet a silent address the cold run never asked.)
    assert warm.timeouts <= cold.timeouts // 4
    assert warm.peers == cold.peers == sum(len(p) for p in swarms.values())
    assert warm.packets_sent <= cold.packets_sent - cold.timeouts
    assert later.timeouts >= len(remembered) // 2 and later.peers == cold.peers
    rows = silent_rows()
    assert answering not in {host for host, _ in rows}
    assert sum(1 for row in rows if row[1] == 2) >= len(remembered) // 2


def test_silent_addresses_back_off_doubles_and_an_answer_forgives(tmp_path):
    assert tsmd.silent_back_off(1) == 2 * 86400 and tsmd.silent_back_off(2) == 4 * 86400
    assert tsmd.silent_back_off(4) == tsmd.silent_back_off(40) == 16 * 86400
    db, now = tsmd.open_database(tmp_path / "silent.sqlite3"), time.time()
    # The SQL that loads the addresses in back-off agrees with silent_back_off everywhere.
    grid = [(f"192.0.2.{n}", runs, age) for n, (runs, age) in enumerate(
        (runs, days * 86400 + 60) for runs in (1, 2, 3, 4, 9, 40) for days in range(18))]
    with tsmd.Transaction(db):
        db.executemany("INSERT INTO dht_silent_nodes VALUES (?, 6881, ?, ?)",
                       [(host, runs, int(now - age)) for host, runs, age in grid])
    cache = tsmd.load_node_cache(db, now)
    assert {host for host, runs, age in grid if cache.is_dead(host, 6881)} == \
        {host for host, runs, age in grid if age < tsmd.silent_back_off(runs)}
    # One run: a silent address counts one more run, however often it timed out; one that
    # answered, even if it timed out after, is forgiven, and so is a cached node.
    back_off_over = next(host for host, runs, age in grid if runs == 1 and age > 3 * 86400)
    cache.add(tsmd.DhtNode(b"\x01" * 20, "192.0.2.1", 6881), now)
    for _ in range(3):
        cache.failed(back_off_over, 6881)
        cache.failed("198.51.100.9", 6881)
        cache.failed("192.0.2.1", 6881)  # evicted after two, then a stranger
    assert sorted(cache.silent_this_run()) == [(back_off_over, 6881), ("198.51.100.9", 6881)]
    before = dict(db.execute("SELECT host, runs FROM dht_silent_nodes"))
    tsmd.save_node_cache(db, cache, now, heard_anything=False)  # the network was down
    assert dict(db.execute("SELECT host, runs FROM dht_silent_nodes")) == before
    tsmd.save_node_cache(db, cache, now)
    after = dict(db.execute("SELECT host, runs FROM dht_silent_nodes"))
    assert after[back_off_over] == before[back_off_over] + 1 and after["198.51.100.9"] == 1
    assert "192.0.2.1" not in after
    assert {host for host in before if host not in after} == {"192.0.2.1"}


def test_udp_senders_take_turns_waiting_for_a_full_socket_buffer():
    # trio lets one task at a time wait for a socket to be writable; a second one used to
    # crash the scrape with BusyResourceError.
    async def scenario():
        endpoint = tsmd.UdpEndpoint.open("127.0.0.1:0", tsmd.udp_tracker_packet_untrusted)
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receiver.bind(("127.0.0.1", 0))
        full = [2]  # the kernel says "would block" to the first two sends
        real_send = endpoint.send_nowait

        def send_nowait(data, host, port):
            if full[0]:
                full[0] -= 1
                return None
            return real_send(data, host, port)
        endpoint.send_nowait = send_nowait
        sent = []

        async def send(n):
            sent.append(await endpoint.send(b"packet %d" % n, *receiver.getsockname()))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, 1)
            nursery.start_soon(send, 2)
        endpoint.close()
        received = sorted(receiver.recv(100) for _ in range(2))
        receiver.close()
        return sent, received

    sent, received = trio.run(scenario)
    assert sent == [True, True] and received == [b"packet 1", b"packet 2"]


def test_dht_send_error_is_no_mark_against_the_node():
    async def scenario():
        endpoint = tsmd.UdpEndpoint.open("127.0.0.1:0", tsmd.krpc_transaction_untrusted)
        cache = tsmd.NodeCache()
        # Loopback's broadcast address: the kernel refuses the datagram (EACCES).
        refused = tsmd.DhtNode(b"", "127.255.255.255", 6881)
        survey = tsmd.DhtSurvey(endpoint, cache, [refused], dht_test_options(), False)
        async with trio.open_nursery() as nursery:
            await nursery.start(survey.serve)
            result = await survey.lookup(b"\x03" * 20)
            nursery.cancel_scope.cancel()
        endpoint.close()
        return result, survey.counters, endpoint.counters, cache

    # On a clock that only moves when every task waits: the lookup did not wait for a timeout.
    clock = trio.testing.MockClock(autojump_threshold=0)
    result, counters, udp, cache = trio.run(scenario, clock=clock)
    assert clock.current_time() == 0
    assert result.nodes_answered == 0 and result.queries == 2  # the first round and its retry
    assert udp.send_errors == 2 and udp.sent == 0 and counters.timeouts == 0
    assert cache.silent_this_run() == [] and not cache.is_dead("127.255.255.255", 6881)


# ---- DHT: a network of real libtorrent nodes ----


class LibtorrentDht:
    """libtorrent sessions as DHT nodes, each on its own 127.x address, meshed with each
    other and with no public bootstrap. Their DoS blocker and DHT upload limit are relaxed so
    one client IP may query them in bulk, and their storage is raised for benchmarks.

    With `ipv6`, each is also a node of the IPv6 DHT (BEP 32) on [::1], on the same port, and
    the rule of one node per IP in its routing table and lookups is lifted there."""

    def __init__(self, count: int, second_octet: int = 60, ipv6: bool = False) -> None:
        alerts = lt.alert.category_t
        self.sessions = []
        self.nodes: list[tuple[str, int]] = []
        self.ipv6 = ipv6
        loopback_only = lt.ip_filter()
        loopback_only.add_rule("0.0.0.0", "255.255.255.255", 1)
        loopback_only.add_rule("127.0.0.0", "127.255.255.255", 0)
        loopback_only.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 1)
        loopback_only.add_rule("::1", "::1", 0)
        try:
            for n in range(count):
                address = f"127.{second_octet + n // 250}.{n % 250 + 1}.1"
                listen = f"{address}:0"
                if ipv6:
                    port = free_port_on_both(address)
                    listen = f"{address}:{port},[::1]:{port}"
                session = lt.session({
                    "listen_interfaces": listen, "listen_system_port_fallback": False,
                    "max_retry_port_bind": 0, "enable_dht": True, "dht_bootstrap_nodes": "",
                    "enable_upnp": False, "enable_natpmp": False, "enable_lsd": False,
                    "enable_ip_notifier": False, "alert_queue_size": 100000,
                    "alert_mask": int(alerts.dht_notification | alerts.dht_operation_notification),
                    "dht_block_ratelimit": 1_000_000, "dht_block_timeout": 1,
                    "dht_upload_rate_limit": 100_000_000, "dht_max_torrents": 200_000,
                    "dht_max_peers": 5000, "recv_socket_buffer_size": 1 << 21,
                    "send_socket_buffer_size": 1 << 21,
                    "dht_restrict_routing_ips": not ipv6, "dht_restrict_search_ips": not ipv6})
                session.set_ip_filter(loopback_only)
                self.sessions.append(session)
                self.nodes.append((address, session.listen_port()))
            for session in self.sessions:
                for node in self.nodes:
                    session.add_dht_node(node)
                    if ipv6:
                        session.add_dht_node(("::1", node[1]))
            time.sleep(1.0)  # routing tables fill in ~0.3 s; announcing earlier reaches nobody
            self.stored: dict[bytes, set[tuple[str, int]]] = {}
            self.found: dict[bytes, set[tuple[str, int]]] = {}
        except BaseException:
            self.stop()
            raise

    @property
    def bootstrap(self) -> list[str]:
        return [f"{host}:{port}" for host, port in self.nodes[:3]]

    def pump(self) -> None:
        for session in self.sessions:
            for alert in session.pop_alerts():
                if isinstance(alert, lt.dht_announce_alert):
                    self.stored.setdefault(alert.info_hash.to_bytes(), set()).add(
                        (str(alert.ip), int(alert.port)))
                elif isinstance(alert, lt.dht_get_peers_reply_alert):
                    self.found.setdefault(alert.info_hash.to_bytes(), set()).update(
                        (str(host), int(port)) for host, port in alert.peers())

    def announce(self, swarms: dict[bytes, list[tuple[int, int, bool]]], timeout: float = 30):
        """Node n announces (its own address, port) for each infohash, as a seed or not; waits
        until every announced peer is stored on at least one node."""
        expected = {}
        for infohash, announcers in swarms.items():
            for n, port, seed in announcers:
                self.sessions[n].dht_announce(lt.sha1_hash(infohash), port,
                                              int(lt.announce_flags_t.seed) if seed else 0)
            expected[infohash] = {(self.nodes[n][0], port) for n, port, _ in announcers}
            if self.ipv6:  # announced on both DHTs, from each family's address
                expected[infohash] |= {("::1", port) for _, port, _ in announcers}
        deadline = time.monotonic() + timeout
        while any(not expected[h] <= self.stored.get(h, set()) for h in expected):
            if time.monotonic() > deadline:
                missing = {h.hex()[:8]: sorted(expected[h] - self.stored.get(h, set()))
                           for h in expected if not expected[h] <= self.stored.get(h, set())}
                raise TimeoutError(f"libtorrent nodes did not store every announce: {missing}")
            time.sleep(0.05)
            self.pump()
        time.sleep(0.5)  # let the remaining copies (8 nodes per infohash) land too
        self.pump()
        return expected

    def lt_get_peers(self, infohashes, expected, via: int = 0, timeout: float = 60) -> float:
        """libtorrent's own dht_get_peers from node `via`; seconds until all expected peers came
        (or the timeout). Results accumulate in self.found."""
        started = time.monotonic()
        for infohash in infohashes:
            self.found.pop(infohash, None)
            self.sessions[via].dht_get_peers(lt.sha1_hash(infohash))
        while time.monotonic() - started < timeout:
            self.pump()
            if all(expected[h] <= self.found.get(h, set()) for h in infohashes):
                break
            time.sleep(0.005)
        return time.monotonic() - started

    def stop(self) -> None:
        for session in self.sessions:
            session.pause()
            session.apply_settings({"enable_dht": False})
        self.sessions.clear()


def free_port_on_both(address: str) -> int:
    """A port free for TCP and UDP on `address` and on [::1]: a dual-stack libtorrent node's."""
    for _ in range(50):
        with contextlib.ExitStack() as held:
            probe = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            probe.bind((address, 0))
            port = probe.getsockname()[1]
            try:
                for family, host, kind in ((socket.AF_INET, address, socket.SOCK_STREAM),
                                           (socket.AF_INET6, "::1", socket.SOCK_DGRAM),
                                           (socket.AF_INET6, "::1", socket.SOCK_STREAM)):
                    held.enter_context(socket.socket(family, kind)).bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no port free on both {address} and [::1]")


def test_dht_against_real_libtorrent_nodes(tmp_path):
    network = LibtorrentDht(16)
    try:
        swarms = {}
        for n in range(24):
            infohash = hashlib.sha1(f"libtorrent swarm {n}".encode()).digest()
            swarms[infohash] = [((n + a * 5) % 16, 7000 + a, a % 2 == 0) for a in range(1 + n % 4)]
        expected = network.announce(swarms)
        db, settings = dht_survey_db(tmp_path, swarms, query_timeout=2)
        counters = run(tsmd.run_dht, db, settings, settings.collections, tsmd.Reporter(-1),
                       bootstrap=network.bootstrap, timeout=60)
        results, _, _ = run(survey_all, network, list(swarms), dht_test_options(), timeout=60)
    finally:
        network.stop()
    assert counters.lookups == 24 and counters.timeouts == 0
    rows = {row.infohash: row for row in tsmd.load_report_rows(db)}
    for infohash, announcers in swarms.items():
        assert results[infohash].peers == expected[infohash]  # exactly, nothing else
        row = rows[infohash.hex()]
        assert row.dht_peers == len(expected[infohash])
        # libtorrent's BEP 33 filters: seeds in BFsd; every peer IP counted in the peer estimate.
        seed_ips = {network.nodes[n][0] for n, _, seed in announcers if seed}
        assert row.dht_seeds_estimate == len(seed_ips)
        assert row.dht_peers_estimate == len({network.nodes[n][0] for n, _, _ in announcers})


def test_dht_finds_the_peers_of_both_families_on_real_libtorrent_nodes(tmp_path, monkeypatch):
    """libtorrent nodes on the IPv4 and the IPv6 DHT (BEP 32), bootstrapped from IPv4
    routers: tsmd finds each swarm's peers on both, as libtorrent's own lookup does, and
    keeps the nodes of both in the database."""
    monkeypatch.setattr(tsmd, "host_has_ipv6_route", lambda: True)  # [::1] stands for it
    network = LibtorrentDht(12, second_octet=95, ipv6=True)
    try:
        swarms = {hashlib.sha1(b"dual-stack swarm %d" % n).digest():
                  [((n + a * 5) % 12, 7100 + a, a % 2 == 0) for a in range(1 + n % 3)]
                  for n in range(10)}
        expected = network.announce(swarms)
        network.lt_get_peers(list(swarms), expected, via=11)
        db, settings = dht_survey_db(tmp_path, swarms, bind="[::]:0", query_timeout=2)
        counters = run(tsmd.run_dht, db, settings, settings.collections, tsmd.Reporter(-1),
                       bootstrap=network.bootstrap, timeout=60)
        results, survey, _ = run(survey_all, network, list(swarms),
                                 dht_test_options(bep33=False), bind="[::]:0", timeout=60)
    finally:
        network.stop()
    assert list(survey.families) == [False, True] and survey.counters.timeouts == 0
    rows = {row.infohash: row for row in tsmd.load_report_rows(db)}
    for infohash in swarms:
        assert any(":" in host for host, _ in expected[infohash])
        assert results[infohash].peers == expected[infohash] == network.found[infohash]
        assert rows[infohash.hex()].dht_peers == len(expected[infohash])
    assert counters.timeouts == 0 and counters.summary().endswith(
        "24 nodes cached (12 IPv6)")
    cache = tsmd.load_node_cache(db, time.time())
    assert cache.size(False) == cache.size(True) == 12



# ---- Peer probe (BEP 3, BEP 6, BEP 10) ----


PROBE_INFOHASH = hashlib.sha1(b"probe target").digest()


def probe_test_options(**overrides) -> tsmd.ProbeOptions:
    options = dict(connect_timeout=2.0, answer_timeout=3.0, have_window=0.3, concurrency=20,
                   peers_per_torrent=50, rate=0, allow_private=True)
    options.update(overrides)
    return tsmd.ProbeOptions(**options)


peer_message = tsmd.encode_peer_message


def test_peer_wire_codecs():
    handshake = tsmd.encode_peer_handshake(PROBE_INFOHASH, b"-XX0001-123456789012")
    assert len(handshake) == tsmd.PEER_HANDSHAKE_LENGTH and handshake[25] & 0x10 \
        and handshake[27] & 0x04  # the BEP 10 and BEP 6 bits
    assert tsmd.decode_peer_handshake_untrusted(handshake, PROBE_INFOHASH) == \
        b"-XX0001-123456789012"
    with pytest.raises(tsmd.ProtocolError, match="another torrent"):
        tsmd.decode_peer_handshake_untrusted(handshake, b"\x01" * 20)
    for bad in (b"", b"\x13BitTorrent protocoX" + bytes(48), handshake[:-1]):
        with pytest.raises(tsmd.ProtocolError, match="not a BitTorrent handshake"):
            tsmd.decode_peer_handshake_untrusted(bad, PROBE_INFOHASH)
    # Messages: whole ones are taken out, a keep-alive skipped, a partial one left.
    buffer = bytearray(bytes(4) + peer_message(5, b"\xff") + peer_message(4, bytes(4))[:6])
    assert tsmd.split_peer_messages_untrusted(buffer) == [(5, b"\xff")] and len(buffer) == 6
    with pytest.raises(tsmd.ProtocolError, match="message of 4,294,967,295 bytes"):
        tsmd.split_peer_messages_untrusted(bytearray(b"\xff\xff\xff\xff\x05"))
    # A bitfield: piece 0 is the first byte's high bit; its length and spare bits checked.
    holdings = tsmd.PeerHoldings(10)
    holdings.take_untrusted(5, bytes([0b10000000, 0b01000000]))
    assert holdings.holds() == 1 | 1 << 9 and holdings.answered and not holdings.complete
    holdings.take_untrusted(4, (3).to_bytes(4, "big"))  # have
    holdings.take_untrusted(4, (3).to_bytes(4, "big"))  # the same again: counted once
    assert holdings.holds() == 1 | 1 << 3 | 1 << 9 and holdings.held == 3
    for kind, payload, error in ((5, b"\xff", "bitfield of 1 bytes for 10 pieces"),
                                 (5, b"\xff\xc1", "spare bits"),
                                 (4, (10).to_bytes(4, "big"), "have of piece 10 of 10"),
                                 (4, b"\0\0\0", "have of 3 bytes")):
        with pytest.raises(tsmd.ProtocolError, match=error):
            tsmd.PeerHoldings(10).take_untrusted(kind, payload)
    full = tsmd.PeerHoldings(10)
    full.take_untrusted(5, b"\xff\xc0")
    assert full.complete and full.holds() == (1 << 10) - 1
    seed = tsmd.PeerHoldings(None)  # no piece count: only have_all shows a seed
    seed.take_untrusted(14, b"")
    assert seed.complete
    unknown = tsmd.PeerHoldings(None)
    unknown.take_untrusted(5, b"\xff\xff")
    assert unknown.answered and not unknown.complete
    with pytest.raises(tsmd.ProtocolError, match="have of piece"):  # no 512 MB int
        unknown.take_untrusted(4, b"\xff\xff\xff\xff")
    nothing = tsmd.PeerHoldings(10)
    nothing.take_untrusted(15, b"")
    nothing.take_untrusted(1, b"")  # unchoke: nothing about pieces
    assert nothing.answered and nothing.holds() == 0 and not nothing.complete
    # Haves with no bitfield before (BEP 3 lets a peer with nothing send none), up to all.
    gathering = tsmd.PeerHoldings(3)
    for index in (2, 0, 1):
        assert not gathering.complete
        gathering.take_untrusted(4, index.to_bytes(4, "big"))
    assert gathering.answered and gathering.complete and gathering.holds() == 0b111
    # With no piece count, a flood of haves sets bits in place, in at most a 1 MiB field.
    flood = tsmd.PeerHoldings(None)
    for index in range(tsmd.PEER_MAX_MESSAGE * 8 - 1000, tsmd.PEER_MAX_MESSAGE * 8):
        flood.take_untrusted(4, index.to_bytes(4, "big"))
    assert len(flood.bits) == tsmd.PEER_MAX_MESSAGE and flood.held == 1000


@given(st.integers(1, 90), st.lists(st.one_of(st.none(), st.integers(0)), max_size=7))
@hsettings(max_examples=300, deadline=None)
def test_distributed_copies_is_the_rarest_piece_plus_the_fraction_above(count, peers):
    holdings = []
    for bits in peers:
        holding = tsmd.PeerHoldings(count)
        if bits is None:
            holding.have_all = True
        else:
            bits &= (1 << count) - 1
            holding.take_untrusted(5, int(f"{bits:0{count}b}"[::-1].ljust(
                (count + 7) // 8 * 8, "0"), 2).to_bytes((count + 7) // 8, "big"))
        holdings.append(holding)
    per_piece = [sum(holding.holds() >> piece & 1 for holding in holdings)
                 for piece in range(count)]
    rarest = min(per_piece)
    expected = rarest + sum(n > rarest for n in per_piece) / count
    assert tsmd.distributed_copies(holdings, count) == pytest.approx(expected)


def test_metainfo_piece_count(tmp_path):
    v1 = lt_torrent(tmp_path / "a", "v1", [40_000, 1_000], lt.create_torrent.v1_only)
    hybrid = lt_torrent(tmp_path / "b", "hybrid", [40_000, 1_000], 0)
    v2 = lt_torrent(tmp_path / "c", "v2", [40_000, 1_000], lt.create_torrent.v2_only)
    for data in (v1, hybrid):
        assert tsmd.decode_metainfo_untrusted(data).piece_count == \
            lt.torrent_info(data).num_pieces()
    assert tsmd.decode_metainfo_untrusted(v2).piece_count is None
    # `pieces` of a length that is not whole hashes: no count (libtorrent refuses it).
    odd = b"d4:infod6:lengthi5e4:name1:x12:piece lengthi16384e6:pieces3:abcee"
    assert tsmd.decode_metainfo_untrusted(odd).piece_count is None


class FakePeers:
    """TCP peers on 127.91.0.x, each with a behaviour of fake_peer ("partial": a bitfield of
    the even pieces). Each records every byte the prober sent, by host."""

    def __init__(self, behaviours: list[str], piece_count: int) -> None:
        self.behaviours, self.piece_count = behaviours, piece_count
        self.addresses: list[tuple[str, int]] = []
        self.received: dict[str, bytearray] = {}

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for n, behaviour in enumerate(self.behaviours):
                host = f"127.91.0.{n + 1}"
                listeners = await trio.open_tcp_listeners(0, host=host)
                self.addresses.append((host, listeners[0].socket.getsockname()[1]))
                nursery.start_soon(trio.serve_listeners,
                                   functools.partial(self._peer, behaviour, host), listeners)
            task_status.started()

    async def _peer(self, behaviour: str, host: str, stream) -> None:
        bitfield_bytes = (self.piece_count + 7) // 8
        evens = sum(1 << (7 - i % 8) << 8 * (bitfield_bytes - 1 - i // 8)
                    for i in range(0, self.piece_count, 2))
        await fake_peer(behaviour, PROBE_INFOHASH, evens.to_bytes(bitfield_bytes, "big"),
                        b"-FK0001-000000000000", stream,
                        self.received.setdefault(host, bytearray()))


async def fake_peer(behaviour: str, infohash: bytes, bitfield: bytes, peer_id: bytes, stream,
                    received: bytearray | None = None) -> None:
    """One connection to a fake peer of `infohash`: "seed" (have_all), "bitfield" (sends
    `bitfield`), "partial" (`bitfield`, a `have` of piece 1 0.1 s later, one of piece 3 1 s
    later), "garbage", "wrong torrent", "huge length" (a 4 GiB length prefix), "bad bitfield"
    (3 bytes too long), "trickle" (a byte every 0.2 s), "silent" (a handshake, then nothing),
    "hang up" (closes after the handshake). Then it reads and ignores whatever comes (a
    client's messages too) until the other side hangs up; `received` gets every byte."""
    received = bytearray() if received is None else received
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        async with stream:
            handshake = await read_handshake(stream)
            if handshake is None:
                return
            received += handshake
            if behaviour == "garbage":
                await stream.send_all(b"HTTP/1.1 400 Bad Request\r\n" + bytes(60))
                return
            ours = tsmd.encode_peer_handshake(
                b"\x09" * 20 if behaviour == "wrong torrent" else infohash, peer_id)
            if behaviour == "trickle":
                for byte in ours + peer_message(14):
                    await stream.send_all(bytes([byte]))
                    await trio.sleep(0.2)
                return
            await stream.send_all(ours)
            if behaviour == "seed":
                await stream.send_all(peer_message(20, b"d1:md11:ut_metadatai1eee")
                                      + peer_message(14))
            elif behaviour == "bitfield":
                await stream.send_all(peer_message(5, bitfield))
            elif behaviour == "partial":
                await stream.send_all(peer_message(5, bitfield) + peer_message(1))
                await trio.sleep(0.1)
                await stream.send_all(peer_message(4, (1).to_bytes(4, "big")))
                await trio.sleep(1)
                await stream.send_all(peer_message(4, (3).to_bytes(4, "big")))
            elif behaviour == "huge length":
                await stream.send_all(b"\xff\xff\xff\xff\x05" + bytes(100))
            elif behaviour == "bad bitfield":
                await stream.send_all(peer_message(5, b"\xff" * (len(bitfield) + 3)))
            elif behaviour == "hang up":
                return
            while data := await stream.receive_some(1 << 16):
                received += data


def test_probe_reads_what_peers_hold_and_survives_hostile_ones():
    """Seeds, a partial peer, and peers that lie or break the protocol: each is a counted
    outcome of its own, and the prober never sends more than its handshake."""
    behaviours = ["seed", "seed", "partial", "garbage", "wrong torrent", "huge length",
                  "bad bitfield", "trickle", "silent", "hang up"]
    peers = FakePeers(behaviours, 12)

    async def scenario():
        async with trio.open_nursery() as nursery:
            await nursery.start(peers.serve)
            closed = await trio.open_tcp_listeners(0, host="127.91.1.1")
            refusing = ("127.91.1.1", closed[0].socket.getsockname()[1])
            await closed[0].aclose()  # nothing listens there: refused
            prober = tsmd.PeerProber(probe_test_options(answer_timeout=1.5))
            addresses = peers.addresses + [refusing, ("0.0.0.0", 6881)]
            swarm = await prober.probe(PROBE_INFOHASH, addresses, 12)
            again = await prober.probe(PROBE_INFOHASH, addresses, 12)
            nursery.cancel_scope.cancel()
        return swarm, again

    swarm, again = run(scenario, timeout=30)
    outcome = {behaviours[peers.addresses.index((p.host, p.port))]: p
               for p in swarm.peers if (p.host, p.port) in peers.addresses}
    O = tsmd.ProbeOutcome
    assert {name: probe.outcome for name, probe in outcome.items()} == {
        "seed": O.TOLD, "partial": O.TOLD, "garbage": O.MALFORMED,
        "wrong torrent": O.WRONG_TORRENT, "huge length": O.MALFORMED,
        "bad bitfield": O.MALFORMED, "trickle": O.SILENT, "silent": O.SILENT,
        "hang up": O.CLOSED}
    # Its have of piece 1 came 0.1 s after the bitfield, within the window; the one of piece
    # 3, 1 s after, did not count.
    assert outcome["partial"].holdings.holds() == sum(1 << i for i in range(0, 12, 2)) | 1 << 1
    assert (swarm.tried, swarm.reachable, swarm.answering, swarm.verified_seeds) == \
        (11, 10, 3, 2)
    assert swarm.outcomes[O.REFUSED] == 1 and swarm.outcomes[O.NOT_ASKED] == 1
    # Two seeds: every piece twice; the partial peer adds the even pieces and piece 1.
    assert swarm.availability == pytest.approx(2 + 7 / 12)
    # Read only: every peer got our handshake and nothing after it.
    assert len(peers.received) == len(behaviours)
    for received in peers.received.values():
        assert bytes(received[:20]) == tsmd.PEER_PROTOCOL
        assert len(received) == tsmd.PEER_HANDSHAKE_LENGTH
    # A peer is never asked twice in one run.
    assert again.tried == 0 and again.peers == []


def test_probe_asks_one_port_of_an_address_and_counts_only_what_was_told():
    """A reply naming one host at many ports (a poisoned one, to have us connect to a
    victim) costs one connection. A peer that told its bitfield, then broke the protocol, is
    not believed: not answering, not in the availability."""
    async def scenario():
        prober = tsmd.PeerProber(probe_test_options())
        many = await prober.probe(PROBE_INFOHASH, [("127.91.2.1", port)
                                                   for port in range(20000, 20030)], 8)

        async def liar(stream):
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.receive_some(100)
                await stream.send_all(tsmd.encode_peer_handshake(PROBE_INFOHASH, bytes(20))
                                      + peer_message(5, b"\x0f"))
                await trio.sleep(0.1)
                await stream.send_all(peer_message(4, (99).to_bytes(4, "big")))
                await trio.sleep(5)

        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.91.3.1")
            nursery.start_soon(trio.serve_listeners, liar, listeners)
            lying = await prober.probe(PROBE_INFOHASH, [
                ("127.91.3.1", listeners[0].socket.getsockname()[1])], 8)
            nursery.cancel_scope.cancel()
        return many, lying

    many, lying = run(scenario)
    assert many.tried == 1 and many.outcomes[tsmd.ProbeOutcome.REFUSED] == 1
    assert lying.outcomes[tsmd.ProbeOutcome.MALFORMED] == 1 and lying.reachable == 1
    assert lying.answering == 0 and lying.availability is None and lying.verified_seeds == 0


def test_metadata_codecs():
    """BEP 10 handshakes and BEP 9 messages as peers send them, and what is refused."""
    ours = tsmd.encode_extended_handshake()
    assert ours[4] == 20 and bencoder.bdecode(ours[6:]) == {b"m": {b"ut_metadata": 1}}
    decode = tsmd.decode_extended_handshake_untrusted
    assert decode(b"d1:md11:ut_metadatai3ee13:metadata_sizei31235ee") == (3, 31235)
    assert decode(b"d1:md11:ut_metadatai0eee") == (None, None)  # 0: disabled
    assert decode(b"d1:md6:ut_pexi1eee") == (None, None)
    assert decode(b"d13:metadata_sizei-5ee") == (None, None)
    # A huge torrent's metadata is no lie: said as it is, and the probe does not ask for it.
    assert decode(b"d1:md11:ut_metadatai3ee13:metadata_sizei%dee"
                  % (tsmd.MAX_METADATA_BYTES + 1)) == (3, tsmd.MAX_METADATA_BYTES + 1)
    for broken in (b"", b"le", b"d1:m"):
        with pytest.raises(tsmd.ProtocolError):
            decode(broken)
    request = tsmd.encode_metadata_request(3, 7)
    assert request[4:6] == b"\x14\x03" and bencoder.bdecode(request[6:]) == {
        b"msg_type": 0, b"piece": 7}
    message = tsmd.decode_metadata_message_untrusted
    assert message(b"d8:msg_typei1e5:piecei2e10:total_sizei99ee" + b"raw bytes") == (
        1, 2, b"raw bytes")
    # The bytes after the dictionary may be bencode themselves: a small info dictionary is.
    small_info = bencoder.bencode({b"length": 65536, b"name": b"a.bin", b"piece length": 16384,
                                   b"pieces": bytes(80)})
    assert message(b"d8:msg_typei1e5:piecei0ee" + small_info) == (1, 0, small_info)
    for broken in (b"", b"raw", b"d8:msg_typei1ee", b"d8:msg_typei1e5:piecei-1ee",
                   b"d8:msg_typei1e5:piece" + b"l" * 10):
        with pytest.raises(tsmd.ProtocolError):
            message(broken)
    info = info_dict_of(files=2, pieces=4)
    assembly = tsmd.MetadataAssembly(hashlib.sha1(info).digest(), len(info))
    with pytest.raises(tsmd.ProtocolError):
        assembly.take_untrusted(1, b"")  # one piece only
    with pytest.raises(tsmd.ProtocolError):
        assembly.take_untrusted(0, info + b"x")
    assert assembly.take_untrusted(0, info) == info
    with pytest.raises(tsmd.ProtocolError):  # another torrent's info
        tsmd.MetadataAssembly(b"\x00" * 20, len(info)).take_untrusted(0, info)
    # A peer that told a bitfield before the piece count was known: judged once it is.
    holdings = tsmd.PeerHoldings(None)
    holdings.take_untrusted(tsmd.PeerMessage.BITFIELD, b"\xff\xe0")
    holdings.learn_piece_count(11)
    assert holdings.complete and holdings.holds() == (1 << 11) - 1
    for bits, count in ((b"\xff\xf0", 11), (b"\xff\x00\x01", 11), (b"\xff\xe0\x00", 11)):
        liar = tsmd.PeerHoldings(None)
        liar.take_untrusted(tsmd.PeerMessage.BITFIELD, bits)
        with pytest.raises(tsmd.ProtocolError):
            liar.learn_piece_count(count)
    haves = tsmd.PeerHoldings(None)
    haves.take_untrusted(tsmd.PeerMessage.HAVE, (2).to_bytes(4, "big"))
    haves.learn_piece_count(20)
    assert not haves.complete and haves.holds() == 1 << 2 and len(haves.bits) == 3


def info_dict_of(files: int, pieces: int) -> bytes:
    """A v1 info dictionary of `files` files with long names: over one 16 KiB metadata piece."""
    return tsmd.bencode({b"name": b"metadata test", b"piece length": 16384,
                         b"pieces": os.urandom(20 * pieces),
                         b"files": [{b"length": 16384 * pieces // files,
                                     b"path": [b"folder", b"file %04d " % n + b"x" * 40]}
                                    for n in range(files)]})


async def read_handshake(stream) -> bytearray | None:
    """What a fake peer reads first: the prober's handshake and anything after it; None if
    the prober hung up before it was whole."""
    buffer = bytearray()
    while len(buffer) < tsmd.PEER_HANDSHAKE_LENGTH:
        data = await stream.receive_some(4096)
        if not data:
            return None
        buffer += data
    return buffer


async def metadata_peer(info: bytes, behaviour: str, sent: list[int], stream,
                        delay: float = 0.0) -> None:
    """A peer that holds every piece of the torrent of `info` (a full bitfield) and serves its
    metadata (BEP 9), each piece `delay` seconds after it is asked for: "honest"; "forged",
    pieces that do not hash to the infohash; "huge", a metadata_size over the cap; "short", a
    piece of the wrong length; "reject"; "repeat", piece 0 again and again, a second apart,
    and never another. `sent` gets the id of every message the prober sends it."""
    pieces = len(bencoder.bdecode(info)[b"pieces"]) // 20
    size = tsmd.MAX_METADATA_BYTES + 1 if behaviour == "huge" else len(info)
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        buffer = await read_handshake(stream)
        if buffer is None:
            return
        infohash = bytes(buffer[28:48])
        del buffer[:tsmd.PEER_HANDSHAKE_LENGTH]
        full = ((1 << pieces) - 1 << (-pieces % 8)).to_bytes((pieces + 7) // 8, "big")
        await stream.send_all(
            tsmd.encode_peer_handshake(infohash, b"-MD0001-000000000000")
            + peer_message(20, b"\x00" + tsmd.bencode({b"m": {b"ut_metadata": 3},
                                                       b"metadata_size": size}))
            + peer_message(5, full))
        while True:
            for kind, payload in tsmd.split_peer_messages_untrusted(buffer):
                sent.append(kind)
                if kind != 20 or payload[:1] != b"\x03":
                    continue
                piece = bencoder.bdecode(payload[1:])[b"piece"]
                if behaviour == "repeat":
                    if piece == 0:
                        for _ in range(20):
                            await stream.send_all(peer_message(20, bytes(
                                [tsmd.UT_METADATA_OURS]) + tsmd.bencode(
                                {b"msg_type": 1, b"piece": 0, b"total_size": len(info)})
                                + info[:16384]))
                            await trio.sleep(1)
                    continue
                data = info[piece * 16384:(piece + 1) * 16384]
                if behaviour == "forged":
                    data = bytes(len(data))
                elif behaviour == "short":
                    data = data[:-1]
                kind_of_answer = 2 if behaviour == "reject" else 1
                await trio.sleep(delay)
                await stream.send_all(peer_message(20, bytes([tsmd.UT_METADATA_OURS]) + (
                    tsmd.bencode({b"msg_type": kind_of_answer, b"piece": piece,
                                  b"total_size": len(info)}) + data)))
            data = await stream.receive_some(1000)
            if not data:
                return
            buffer += data


def test_probe_fetches_metadata_and_refuses_what_does_not_hash():
    """A peer serving the info dictionary gives it whole, checked against the infohash, and
    the piece count it gives makes its full bitfield a verified seed. A forged, oversized,
    short or refused metadata is that peer's outcome, and no metadata. The prober sends
    nothing but handshakes and ut_metadata requests."""
    info = info_dict_of(files=300, pieces=24)
    assert len(info) > 16384  # two metadata pieces at least
    infohash = hashlib.sha1(info).digest()
    sent: dict[str, list[int]] = {}

    async def scenario():
        swarms = {}
        async with trio.open_nursery() as nursery:
            for n, behaviour in enumerate(["honest", "forged", "huge", "short", "reject"]):
                listeners = await trio.open_tcp_listeners(0, host=f"127.91.4.{n + 1}")
                nursery.start_soon(trio.serve_listeners, functools.partial(
                    metadata_peer, info, behaviour, sent.setdefault(behaviour, [])), listeners)
                prober = tsmd.PeerProber(probe_test_options())
                swarms[behaviour] = await prober.probe(
                    infohash, [(f"127.91.4.{n + 1}", listeners[0].socket.getsockname()[1])],
                    None, want_metadata=True)
            peers = []
            for n in range(3):
                listeners = await trio.open_tcp_listeners(0, host=f"127.91.5.{n + 1}")
                nursery.start_soon(trio.serve_listeners, functools.partial(
                    metadata_peer, info, "honest", sent_by_three[n]), listeners)
                peers.append((f"127.91.5.{n + 1}", listeners[0].socket.getsockname()[1]))
            three = await tsmd.PeerProber(probe_test_options()).probe(infohash, peers, None,
                                                                      want_metadata=True)

            async def slow_forger(stream):
                await metadata_peer(info, "forged", [], stream, delay=0.5)

            async def honest_after(stream):
                await trio.sleep(0.1)
                await metadata_peer(info, "honest", [], stream)

            async def repeater(stream):
                await metadata_peer(info, "repeat", [], stream)

            peers = []
            for n, handler in enumerate((repeater, honest_after)):
                listeners = await trio.open_tcp_listeners(0, host=f"127.91.8.{n + 1}")
                nursery.start_soon(trio.serve_listeners, handler, listeners)
                peers.append((f"127.91.8.{n + 1}", listeners[0].socket.getsockname()[1]))
            stalled = await tsmd.PeerProber(probe_test_options()).probe(
                infohash, peers, None, want_metadata=True)
            peers = []
            for n, handler in enumerate((slow_forger, honest_after)):
                listeners = await trio.open_tcp_listeners(0, host=f"127.91.6.{n + 1}")
                nursery.start_soon(trio.serve_listeners, handler, listeners)
                peers.append((f"127.91.6.{n + 1}", listeners[0].socket.getsockname()[1]))
            late = await tsmd.PeerProber(probe_test_options()).probe(infohash, peers, None,
                                                                     want_metadata=True)
            nursery.cancel_scope.cancel()
        return swarms, three, late, stalled

    sent_by_three: list[list[int]] = [[], [], []]
    swarms, three, late, stalled = run(scenario)
    honest = swarms["honest"]
    assert honest.metadata == info and honest.piece_count == 24
    assert (honest.answering, honest.verified_seeds, honest.availability) == (1, 1, 1.0)
    meta = tsmd.metainfo_from_info_untrusted(honest.metadata, infohash)
    assert (meta.name, meta.file_count, meta.piece_count, meta.piece_length) == \
        ("metadata test", 300, 24, 16384)
    O = tsmd.ProbeOutcome
    for behaviour in ("forged", "short"):
        swarm = swarms[behaviour]
        assert swarm.metadata is None and swarm.outcomes == {O.MALFORMED: 1}, behaviour
        assert swarm.answering == 0 and swarm.availability is None
    # A refusal, or metadata over the cap, is no lie: what the peer holds is known, but not
    # its piece count (no seed verified), and the oversized metadata is never asked for.
    for behaviour in ("reject", "huge"):
        swarm = swarms[behaviour]
        assert swarm.metadata is None and swarm.outcomes == {O.TOLD: 1}, behaviour
        assert swarm.verified_seeds == 0 and swarm.availability is None
    assert sent["huge"] == []
    # Our extended handshake, then requests for the metadata's pieces: nothing else.
    assert sent["honest"] == [20] * (1 + -(-len(info) // 16384))
    assert all(set(kinds) <= {20} for kinds in sent.values())
    # A forger asked first (its pieces late, then wrong) loses its turn, and the honest peer
    # that came after is asked on its open connection.
    assert late.metadata == info and late.outcomes == {O.MALFORMED: 1, O.TOLD: 1}
    # A peer that sends the same piece again and again, never the next, loses its turn after
    # METADATA_PATIENCE, and the honest peer, still connected past its answer timeout while
    # it waited, is asked.
    assert stalled.metadata == info and stalled.outcomes == {O.TOLD: 2}
    # Of three peers that offer it, one at a time is asked: the first gives it, the others
    # are never asked (nor sent our extended handshake).
    assert [len(kinds) > 0 for kinds in sent_by_three] in (
        [True, False, False], [False, True, False], [False, False, True])
    assert three.metadata == info and three.verified_seeds == 3


def test_probe_asks_a_client_of_many_torrents_about_each_one_connection_at_a_time(
        monkeypatch):
    """A client seeding five torrents of a collection is asked about each of them, never on
    two connections at once; an address that refused once is left alone for the rest of the
    run; a host that connects and says nothing is asked one torrent at a time, until it has
    had its share of the run's time (PROBE_HOST_SECONDS, 2.5 s here)."""
    monkeypatch.setattr(tsmd, "PROBE_HOST_SECONDS", 2.5)
    open_now, most_at_once, handshakes = [0], [0], []
    mute_open, mute_most = [0], [0]

    async def client(stream):
        open_now[0] += 1
        most_at_once[0] = max(most_at_once[0], open_now[0])
        try:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                received = b""
                while len(received) < tsmd.PEER_HANDSHAKE_LENGTH:
                    received += await stream.receive_some(100)
                handshakes.append(received[28:48])
                await trio.sleep(0.05)
                await stream.send_all(tsmd.encode_peer_handshake(received[28:48], bytes(20))
                                      + peer_message(14))
                await stream.receive_some(100)
        finally:
            open_now[0] -= 1

    torrents = [hashlib.sha1(b"many %d" % n).digest() for n in range(5)]

    async def scenario():
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.91.7.1")
            nursery.start_soon(trio.serve_listeners, client, listeners)
            closed = await trio.open_tcp_listeners(0, host="127.91.7.2")
            refusing = ("127.91.7.2", closed[0].socket.getsockname()[1])
            await closed[0].aclose()
            async def silent(stream):
                mute_open[0] += 1
                mute_most[0] = max(mute_most[0], mute_open[0])
                try:  # reads what comes, answers nothing, until the prober hangs up
                    with contextlib.suppress(trio.BrokenResourceError):
                        while await stream.receive_some(100):
                            pass
                finally:
                    mute_open[0] -= 1

            mute = await trio.open_tcp_listeners(0, host="127.91.7.3")
            nursery.start_soon(trio.serve_listeners, silent, mute)
            peers = [("127.91.7.1", listeners[0].socket.getsockname()[1]), refusing,
                     ("127.91.7.3", mute[0].socket.getsockname()[1])]
            prober = tsmd.PeerProber(probe_test_options(answer_timeout=1.0))
            swarms = {}

            async def one(infohash):
                swarms[infohash] = await prober.probe(infohash, peers, 8)

            async with trio.open_nursery() as probing:
                for infohash in torrents:
                    probing.start_soon(one, infohash)
            nursery.cancel_scope.cancel()
        return swarms

    swarms = run(scenario)
    assert sorted(handshakes) == sorted(torrents) and most_at_once[0] == 1
    assert all(swarm.verified_seeds == 1 for swarm in swarms.values())
    outcomes: collections.Counter = collections.Counter()
    for swarm in swarms.values():
        outcomes.update(swarm.outcomes)
    O = tsmd.ProbeOutcome
    assert (outcomes[O.TOLD], outcomes[O.REFUSED], outcomes[O.LEFT_ALONE]) == (5, 1, 4)
    # Each silent probe takes the answer timeout, 1 s: three are asked, then the host's share
    # is spent and the other two go on without it.
    assert (outcomes[O.SILENT], outcomes[O.BUSY]) == (3, 2)
    assert mute_most[0] == 1
    assert sum(swarm.tried for swarm in swarms.values()) == 6 + outcomes[O.SILENT]
    assert all(swarm.skipped == swarm.outcomes[O.BUSY] for swarm in swarms.values())


def libtorrent_swarm(tmp_path: Path, network: LibtorrentDht, seeds: list[int],
                     partial: dict[int, set[int]], pieces: int = 40):
    """A .torrent of `pieces` pieces of 16 KiB, seeded by the sessions of `network` numbered
    in `seeds` and held in part (the pieces given, in upload mode: never downloading) by
    those in `partial`. Its data, the .torrent, and each session's handle."""
    data = os.urandom(16384 * pieces - 1000)
    (tmp_path / "made").mkdir()
    (tmp_path / "made" / "book.bin").write_bytes(data)
    storage = lt.file_storage()
    lt.add_files(storage, str(tmp_path / "made" / "book.bin"))
    creator = lt.create_torrent(storage, 16384, flags=lt.create_torrent.v1_only)
    lt.set_piece_hashes(creator, str(tmp_path / "made"))
    torrent = lt.bencode(creator.generate())
    handles = {}
    for n in seeds + list(partial):
        folder = tmp_path / f"peer{n}"
        folder.mkdir()
        held = bytearray(len(data))
        for piece in (range(pieces) if n in seeds else partial[n]):
            held[piece * 16384:(piece + 1) * 16384] = data[piece * 16384:(piece + 1) * 16384]
        (folder / "book.bin").write_bytes(bytes(held[:len(data)]))
        params = lt.add_torrent_params()
        params.ti, params.save_path = lt.torrent_info(torrent), str(folder)
        if n not in seeds:
            params.flags |= lt.torrent_flags.upload_mode
        handles[n] = network.sessions[n].add_torrent(params)
    deadline = time.monotonic() + 30
    while any(handle.status().state in (lt.torrent_status.checking_files,
                                        lt.torrent_status.checking_resume_data)
              or not handle.status().has_metadata for handle in handles.values()):
        assert time.monotonic() < deadline, "libtorrent did not check its files"
        time.sleep(0.05)
    return torrent, handles


def test_probe_against_real_libtorrent_seeds_and_partial_peers(tmp_path):
    """libtorrent sessions seeding and holding part of a torrent: tsmd's verified seeds and
    availability equal what libtorrent says each session holds, found through the DHT by
    `tsmd check` of the .torrent."""
    network = LibtorrentDht(10, second_octet=97)
    try:
        rng = random.Random(7)
        partial = {n: set(rng.sample(range(40), 14)) for n in (3, 4, 5, 6)}
        torrent, handles = libtorrent_swarm(tmp_path, network, [1, 2], partial)
        infohash = bytes.fromhex(str(lt.torrent_info(torrent).info_hashes().v1))
        # Each announces its own listening port (one port for the DHT and the peer wire).
        network.announce({infohash: [(n, network.nodes[n][1], n in (1, 2)) for n in handles]})
        (tmp_path / "book.torrent").write_bytes(torrent)
        settings = make_settings(tmp_path, [], dht={"bind": "127.0.0.1:0", "rate": 0},
                                 probe={"rate": 0})
        meta = run(tsmd.load_check_target, str(tmp_path / "book.torrent"), settings)
        result = run(tsmd.check_torrent, meta, settings, tsmd.Reporter(-1), trackers=[],
                     bootstrap=network.bootstrap, cache=tsmd.NodeCache(), use_dht=True,
                     use_probe=True, timeout=60)
        held = {n: handle.status(lt.status_flags_t.query_pieces).pieces
                for n, handle in handles.items()}
    finally:
        network.stop()
    assert [sum(held[n]) for n in (1, 2)] == [40, 40]
    assert all(sum(held[n]) == 14 for n in partial)
    per_piece = [sum(held[n][piece] for n in held) for piece in range(40)]
    rarest = min(per_piece)
    assert (result.dht_peers, result.probe_tried, result.reachable_peers,
            result.probe_answering) == (6, 6, 6, 6)
    assert result.verified_seeds == 2
    assert result.availability == pytest.approx(rarest + sum(n > rarest for n in per_piece) / 40)
    assert result.as_dict()["availability"] == result.availability


def test_probe_stage_keeps_to_its_budget_and_goes_round_the_collection(tmp_path):
    """Peers nobody listens on: each run probes what its budget allows, those probed longest
    ago (or never) first, answered or not, so runs go round the collection. A torrent none of
    whose peers answered has nothing measured (no sample); a refused connection is an answer
    of the network (no outage), and the address is left alone for the rest of the run."""
    hashes = [hashlib.sha1(b"budget %d" % n).digest() for n in range(30)]
    db, settings = dht_survey_db(tmp_path, hashes)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: every connection is refused
    now = int(time.time())
    with tsmd.Transaction(db):
        db.executemany("INSERT INTO swarm_peers SELECT id, ?, ?, ? FROM torrents WHERE infohash = ?",
                       [(f"127.92.{n}.{k}", port, now, h.hex())
                        for n, h in enumerate(hashes) for k in (1, 2)])
        # Found a week ago: not asked, and no longer kept.
        db.execute("UPDATE swarm_peers SET found = ? WHERE host LIKE '127.92.29.%'",
                   (now - 7 * 86400,))

    def attempted() -> set[int]:
        return {row[0] for row in db.execute(
            "SELECT id FROM torrents WHERE probe_attempted IS NOT NULL")}

    firsts = []
    for _ in range(2):
        before = attempted()
        counts = run(tsmd.run_probe, db, settings, settings.collections, tsmd.Reporter(-1),
                     options=probe_test_options(connections=9))
        firsts.append(attempted() - before)
        assert (counts.torrents, counts.peers_tried, counts.torrents_unreached) == (5, 9, 5)
        assert counts.torrents_left == 24
        assert counts.outcomes == {"refused": 9} and counts.outage is None
    assert len(firsts[0]) == len(firsts[1]) == 5 and not firsts[0] & firsts[1]
    assert db.execute("SELECT count(*) FROM probe_samples").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM swarm_peers WHERE host LIKE '127.92.29.%'"
                      ).fetchone()[0] == 0
    assert {row.probed for row in tsmd.load_report_rows(db)} == {-1}
    assert counts.summary().startswith(
        "5 torrents probed (0 downloadable, 5 with no peer nor web seed telling), 24 left for "
        "the next runs ([probe].connections_per_run spent); peers: 9 tried, 0 reachable, 0 "
        "answered, 0 verified seeds (9 refused); ")


def test_probe_stage_keeps_what_it_knew_when_peers_say_nothing(tmp_path):
    """A run where peers connect and say nothing measured nothing: the sample of the run
    before, which saw a seed, stays the torrent's newest."""
    infohash = hashlib.sha1(b"keeps what it knew").digest()
    db, settings = dht_survey_db(tmp_path, [infohash])

    async def seed(stream):
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.receive_some(100)
            await stream.send_all(tsmd.encode_peer_handshake(infohash, bytes(20))
                                  + peer_message(14))
            await stream.receive_some(100)

    async def mute(stream):
        with contextlib.suppress(trio.BrokenResourceError):
            while await stream.receive_some(100):
                pass

    async def probe_with(handler):
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.91.9.1")
            nursery.start_soon(trio.serve_listeners, handler, listeners)
            with tsmd.Transaction(db):
                db.execute("DELETE FROM swarm_peers")
                db.execute("INSERT INTO swarm_peers VALUES (1, '127.91.9.1', ?, ?)",
                           (listeners[0].socket.getsockname()[1], int(time.time())))
            counts = await tsmd.run_probe(db, settings, settings.collections,
                                          tsmd.Reporter(-1),
                                          options=probe_test_options(answer_timeout=0.5))
            nursery.cancel_scope.cancel()
        return counts

    first = run(probe_with, seed)
    second = run(probe_with, mute)
    assert (first.verified_seeds, first.torrents_unreached) == (1, 0)
    assert (second.peers_reachable, second.peers_answering, second.torrents_unreached) == (
        1, 0, 1)
    assert db.execute("SELECT count(*) FROM probe_samples").fetchone()[0] == 1
    row = tsmd.load_report_rows(db)[0]
    assert (row.verified_seeds, row.downloadable) == (1, 1)


@pytest.mark.parametrize("silence", ["timeout", "no route"])
def test_probe_stage_stops_when_the_network_is_down(tmp_path, monkeypatch, silence):
    """Connections that time out, or find no route, torrent after torrent, with not one
    answer: the stage stops after [network].outage_after instead of spending its whole
    budget, and says why."""
    hashes = [hashlib.sha1(b"outage %d" % n).digest() for n in range(400)]
    db, settings = dht_survey_db(tmp_path, hashes)
    settings = dataclasses.replace(settings, network=dataclasses.replace(
        settings.network, outage_after=1.0))
    with tsmd.Transaction(db):
        db.executemany("INSERT INTO swarm_peers SELECT id, ?, 6881, ? FROM torrents "
                       "WHERE infohash = ?",
                       [(f"127.92.{n // 200}.{n % 200 + 1}", int(time.time()), h.hex())
                        for n, h in enumerate(hashes)])

    async def no_answer(host, port, *args, **kwargs):
        await trio.sleep(0.2)  # a connect timeout, shortened
        return tsmd.PeerProbe(host, port, tsmd.ProbeOutcome.TIMEOUT)

    async def no_route(host, port, *args, **kwargs):
        await trio.sleep(0.2)
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    if silence == "timeout":
        monkeypatch.setattr(tsmd, "probe_peer", no_answer)
    else:  # what the kernel says with no default route: no answer from anyone
        monkeypatch.setattr(tsmd.trio, "open_tcp_stream", no_route)
    started = time.monotonic()
    counts = run(tsmd.run_probe, db, settings, settings.collections, tsmd.Reporter(-1),
                 options=probe_test_options(concurrency=5))
    assert time.monotonic() - started < 10  # not 400 x 0.2 s / 5 = 16 s
    assert "network down?" in counts.outage and counts.torrents < 400
    assert db.execute("SELECT count(*) FROM probe_samples").fetchone()[0] == 0


class WebSeedServer(LoopbackHttpServer):
    """Serves files by path with byte ranges (206), as BEP 19 web seeds need, and BEP 17
    `/seed?info_hash=...&piece=N` from `pieces` (infohash -> piece 0's data)."""

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, bytes] = {}
        self.pieces: dict[bytes, bytes] = {}
        self.ranges: list[str] = []

    def respond(self, handler, path: str) -> None:
        if path == "/seed":
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(handler.path).query,
                                          encoding="latin-1")
            body = self.pieces.get(query.get("info_hash", [""])[0].encode("latin-1"))
            status = 200 if body is not None and query.get("piece") == ["0"] else 404
        else:
            body, status = self.files.get(path), 200
            wanted = re.fullmatch(r"bytes=(\d+)-(\d+)", handler.headers.get("Range", ""))
            if body is not None and wanted:
                self.ranges.append(wanted.group(0))
                whole = len(body)
                body, status = body[int(wanted[1]):int(wanted[2]) + 1], 206
                handler.send_response(status)
                handler.send_header("Content-Range", f"bytes {wanted[1]}-"
                                                     f"{int(wanted[1]) + len(body) - 1}/{whole}")
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)
                return
            elif body is None:
                status = 404
        body = body if status in (200, 206) else b"not here"
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)


def web_seeded_torrent(folder: Path, files: dict[str, bytes], url_list: list[str] = (),
                       httpseeds: list[str] = ()) -> bytes:
    """A v1 .torrent (16 KiB pieces) of `files` under `folder`, made by libtorrent."""
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    storage = lt.file_storage()
    lt.add_files(storage, str(folder))
    creator = lt.create_torrent(storage, 16384, flags=lt.create_torrent.v1_only)
    for url in url_list:
        creator.add_url_seed(url)
    lt.set_piece_hashes(creator, str(folder.parent))
    torrent = creator.generate()
    if httpseeds:  # (libtorrent 2 no longer writes BEP 17's key)
        torrent[b"httpseeds"] = list(httpseeds)
    return lt.bencode(torrent)


def test_web_seed_requests_follow_bep_19_and_bep_17():
    piece = tsmd.WebSeedPiece(b"\x01" * 20, "a set", ("sub dir", "f#1.txt"), 5000, 16384,
                              b"\x02" * 20)
    folder = tsmd.WebSeed("http://h/data/", "url-list")
    assert tsmd.web_seed_request(folder, piece) == (
        "http://h/data/a%20set/sub%20dir/f%231.txt", (0, 4999))  # the first file is short
    assert tsmd.web_seed_request(tsmd.WebSeed("http://h/data", "url-list"), piece)[0] == \
        "http://h/data/a%20set/sub%20dir/f%231.txt"
    single = dataclasses.replace(piece, first_file_path=None, first_file_length=10**6)
    assert tsmd.web_seed_request(folder, single) == ("http://h/data/a%20set", (0, 16383))
    assert tsmd.web_seed_request(tsmd.WebSeed("http://h/f.iso", "url-list"), single) == (
        "http://h/f.iso", (0, 16383))
    assert tsmd.web_seed_request(tsmd.WebSeed("http://h/seed?x=1", "httpseeds"), piece) == (
        "http://h/seed?x=1&info_hash=%01%01%01%01%01%01%01%01%01%01%01%01%01%01%01%01%01%01"
        "%01%01&piece=0", None)


def test_web_seed_check_wants_the_data_not_any_answer(tmp_path):
    """A first file shorter than a piece cannot be hashed alone: its bytes must be that file
    whole, of its length. A server that answers every path with one page (a parked domain,
    an app's fallback) fails; so does a server that ignores the range of a big file."""
    first = os.urandom(5000)
    piece = tsmd.WebSeedPiece(b"\x01" * 20, "set", ("a.txt",), len(first), 16384,
                              hashlib.sha1(first + bytes(16384 - 5000)).digest())
    settings = make_settings(tmp_path, [])

    class CatchAll(WebSeedServer):
        def respond(self, handler, path):
            self.files[path] = os.urandom(100_000)  # its own page, whatever was asked
            super().respond(handler, path)

    class NoRanges(WebSeedServer):
        def respond(self, handler, path):
            body = self.files.get(path, b"")
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)

    async def check(server):
        fetcher = tsmd.make_fetcher(settings)
        try:
            return await tsmd.check_web_seed(fetcher, tsmd.WebSeed(server.url("/d/"), "url-list"),
                                             piece)
        finally:
            await fetcher.aclose()

    with WebSeedServer() as right, CatchAll() as catch_all, NoRanges() as no_ranges:
        right.files["/d/set/a.txt"] = first
        no_ranges.files["/d/set/a.txt"] = first
        results = [run(check, server) for server in (right, catch_all, no_ranges)]
        no_ranges.files["/d/set/a.txt"] = first * 10  # a file longer than asked for, whole
        big = dataclasses.replace(piece, first_file_length=50000, piece_length=16384,
                                  piece_sha1=hashlib.sha1((first * 10)[:16384]).digest())

        async def check_big():
            fetcher = tsmd.make_fetcher(settings)
            try:
                return await tsmd.check_web_seed(
                    fetcher, tsmd.WebSeed(no_ranges.url("/d/"), "url-list"), big)
            finally:
                await fetcher.aclose()

        ignored = run(check_big)
    assert [(r.served, r.answered) for r in results] == [(True, True), (False, True),
                                                          (True, True)]
    assert "bytes 0-4999/100000" in results[1].why
    assert (ignored.served, ignored.answered) == (False, True)


def test_probe_stage_measures_libtorrent_peers_fetches_metadata_and_checks_web_seeds(tmp_path):
    """`tsmd dht` then `tsmd probe` on a collection listing a magnet whose swarm is real
    libtorrent sessions, and .torrent files with web seeds on a loopback server: the probe's
    sample holds libtorrent's verified seeds and availability, the magnet's metadata is stored
    as the .torrent says, and a web seed counts only when it serves the data."""
    network = LibtorrentDht(10, second_octet=96)
    with WebSeedServer() as server:
        try:
            rng = random.Random(11)
            partial = {n: set(rng.sample(range(40), 20)) for n in (3, 4, 5)}
            torrent, handles = libtorrent_swarm(tmp_path, network, [1], partial)
            info = lt.torrent_info(torrent)
            infohash = bytes.fromhex(str(info.info_hashes().v1))
            network.announce({infohash: [(n, network.nodes[n][1], n == 1) for n in handles]})
            db, settings = dht_survey_db(tmp_path, [infohash])
            # Web-seeded torrents: a folder served right, a single file served wrong, and a
            # BEP 17 script serving piece 0.
            good = {"a.bin": os.urandom(20000), "b.bin": os.urandom(30000)}
            for name, data in good.items():
                server.files["/files/set/" + name] = data
            bad_data = os.urandom(50000)
            server.files["/wrong.bin"] = os.urandom(50000)
            script_data = os.urandom(40000)
            (tmp_path / "w1").mkdir(), (tmp_path / "w2").mkdir(), (tmp_path / "w3").mkdir()
            made = [
                web_seeded_torrent(tmp_path / "w1" / "set", good,
                                   url_list=[server.url("/files/")]),
                web_seeded_torrent(tmp_path / "w2" / "wrong.bin", {".": bad_data},
                                   url_list=[server.url("/wrong.bin")]),
                web_seeded_torrent(tmp_path / "w3" / "script.bin", {".": script_data},
                                   httpseeds=[server.url("/seed")])]
            metas = [tsmd.decode_metainfo_untrusted(t) for t in made]
            server.pieces[bytes.fromhex(metas[2].infohash)] = script_data[:16384]
            with tsmd.Transaction(db):
                for meta in metas:
                    torrent_id = tsmd.upsert_torrent(db, meta, 1)
                    db.execute("INSERT INTO memberships (collection_id, source, torrent_id, "
                               "first_seen, last_seen) VALUES (1, ?, ?, 1, 1)",
                               (meta.infohash, torrent_id))
            dht = run(tsmd.run_dht, db, settings, settings.collections, tsmd.Reporter(-1),
                      bootstrap=network.bootstrap, timeout=60)
            run_id = tsmd.start_run(db, "probe")
            counts = run(tsmd.run_probe, db, settings, settings.collections, tsmd.Reporter(-1),
                         options=probe_test_options(), run_id=run_id, timeout=60)
            held = {n: handle.status(lt.status_flags_t.query_pieces).pieces
                    for n, handle in handles.items()}
        finally:
            network.stop()
    assert dht.peers == 4
    per_piece = [sum(held[n][piece] for n in held) for piece in range(40)]
    rarest = min(per_piece)
    samples = {infohash: tuple(row) for infohash, *row in db.execute(
        "SELECT t.infohash, p.run_id, p.tried, p.reachable, p.answering, p.verified_seeds, "
        "p.availability, p.webseeds_answered, p.webseeds_ok FROM probe_samples p "
        "JOIN torrents t ON t.id = p.torrent_id")}
    assert samples[infohash.hex()] == (run_id, 4, 4, 4, 1, pytest.approx(
        rarest + sum(n > rarest for n in per_piece) / 40), 0, 0)
    assert [samples[meta.infohash][-2:] for meta in (metas[0], metas[2])] == [(1, 1), (1, 1)]
    # The web seed serving something else told nothing, nor any peer: no sample, only the
    # attempt (the next runs probe others first).
    assert metas[1].infohash not in samples and db.execute(
        "SELECT probe_attempted FROM torrents WHERE infohash = ?",
        (metas[1].infohash,)).fetchone()[0] is not None
    # The peer addresses the DHT stage kept are those libtorrent's sessions listen on.
    assert sorted(db.execute("SELECT host, port FROM swarm_peers")) == sorted(
        network.nodes[n] for n in handles)
    # The magnet's metadata, fetched from a peer, is stored as a sync of the .torrent would.
    stored = db.execute("SELECT name, size_bytes, file_count, piece_length, piece_count, "
                        "has_metainfo, first_piece_sha1 FROM torrents WHERE infohash = ?",
                        (infohash.hex(),)).fetchone()
    assert stored == (info.name(), info.total_size(), info.num_files(), info.piece_length(),
                      info.num_pieces(), 1, info.hash_for_piece(0))
    assert (counts.torrents, counts.metadata_wanted, counts.metadata_fetched) == (4, 1, 1)
    assert (counts.webseeds_tried, counts.webseeds_ok, counts.downloadable) == (3, 2, 3)
    # The url-list seeds were asked for piece 0's bytes (both first files are longer than a
    # piece, so they were checked against its hash); the script for piece 0 by its query.
    assert server.ranges == ["bytes=0-16383"] * 2
    rows = {row.infohash: row for row in tsmd.load_report_rows(db)}
    swarm_row = rows[infohash.hex()]
    assert (swarm_row.verified_seeds, swarm_row.reachable_peers, swarm_row.downloadable) == \
        (1, 4, 1)
    # No tracker counts it: its seeders are the verified ones, and its size is now known.
    assert swarm_row.seeders == 1 and swarm_row.size_bytes == info.total_size()
    assert [rows[m.infohash].downloadable for m in metas] == [1, -1, 1]
    assert rows[metas[1].infohash].probed == -1
    metrics = tsmd.render_prometheus(list(rows.values()), per_torrent=True)
    assert 'tsmd_probed_torrents{collection="c"} 3' in metrics
    assert 'tsmd_downloadable_torrents{collection="c"} 3' in metrics
    assert f'tsmd_torrent_verified_seeds{{collection="c",infohash="{infohash.hex()}",' in metrics
    # The magnet with no tracker is weighed by its verified seed: red, and picked.
    assert swarm_row.band == "red" and swarm_row in tsmd.pick_torrents(
        tsmd.select_report_rows(list(rows.values()), "need", None, None), 10**9)


# ---- Hostile input and edge cases found in review ----


@given(st.text(max_size=300))
@hsettings(max_examples=300, deadline=None)
def test_index_and_magnet_parsers_raise_only_protocol_error(text):
    for body in (text, f"<html><a href='{text}'>x</a> <a href=\"magnet:?{text}\">m</a>",
                 f"magnet:?xt=urn:btih:{'a' * 40}&{text}\n{text}"):
        try:
            tsmd.parse_index_untrusted(body.encode("utf-8", "surrogatepass"), BASE)
        except tsmd.ProtocolError:
            pass
    try:
        tsmd.decode_magnet_untrusted(f"magnet:?xt=urn:btih:{'a' * 40}&xl={text}&dn={text}")
    except tsmd.ProtocolError:
        pass


def test_hostile_index_pages_fail_per_item_and_stay_linear():
    page = (b"<html><a href='http://[::1/x.torrent'>a</a><a href='http://h:99999/y.torrent'>b</a>"
            b"<![foo bar]><a href='ok.torrent'>c</a>"
            b"<a href='magnet:?xt=urn:btih:" + b"a" * 40 + b"&amp;xl=%C2%B2'>m</a>")
    entries, problems = parse_index(page)
    assert [e.source for e in entries] == [BASE + "ok.torrent", "magnet:?xt=urn:btih:" + "a" * 40
                                           + "&xl=%C2%B2"]
    assert len(problems) == 2
    started = time.perf_counter()
    tsmd.parse_index_untrusted(b"<a " * 300_000, BASE)  # unclosed tags: quadratic in html.parser
    assert time.perf_counter() - started < 5  # generous: linear takes ~0.02 s


def test_redirects_to_local_files_and_fifos_are_refused(server, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text(f"{'1' * 40}\n")
    fifo = tmp_path / "fifo.torrent"
    os.mkfifo(fifo)
    server.files["/list.txt"] = (f"/redirect/{urllib.parse.quote(secret.as_uri(), safe='')}\n"
                                 .encode(), "text/plain")
    settings = make_settings(tmp_path, [
        {"name": "redirected", "url": server.url("/redirect/" + urllib.parse.quote(
            secret.as_uri(), safe="")), "type": "books"},
        {"name": "fifo", "url": str(fifo), "type": "books"}])
    reporter = tsmd.Reporter(-1)
    messages = []
    reporter.problem = messages.append
    db = tsmd.open_database(settings.database)
    counts = run(tsmd.run_sync, db, settings, settings.collections, reporter, timeout=20)
    assert counts.failed == 2 and counts.new == 0
    assert any("a local file must be configured" in m for m in messages)
    assert any("not a regular file" in m for m in messages)


def test_non_ascii_links_and_hosts_are_encoded_not_fatal(server, tmp_path):
    data = v1_torrent("книга.bin", 10)
    server.files["/книга 1.torrent"] = (data, "")
    server.files["/idx"] = ("<a href='книга 1.torrent'>x</a><a href='http://a_ü.example/x.torrent'>"
                            "</a>".encode(), "text/html")
    settings = make_settings(tmp_path, [{"name": "u", "url": server.url("/idx"), "type": "books"}],
                             sync={"max_redirects": 1})
    counts = run(tsmd.run_sync, tsmd.open_database(settings.database), settings,
                 settings.collections, tsmd.Reporter(-1))
    assert counts.new == 1  # the other-origin link is skipped, the Cyrillic one fetched
    assert server.count("/книга") == 1


def test_hybrid_torrent_and_v2_magnet_of_it_coexist(tmp_path):
    db = tsmd.open_database(tmp_path / "t.sqlite3")
    v2 = "b" * 64
    hybrid = tsmd.Metainfo("a" * 40, v2, "h", 1, 1, 1, None, None, None, (), True)
    magnet = tsmd.decode_magnet_untrusted(f"magnet:?xt=urn:btmh:1220{v2}")
    with tsmd.Transaction(db):
        tsmd.upsert_torrent(db, hybrid, 1)
        tsmd.upsert_torrent(db, magnet, 1)
    assert db.execute("SELECT count(*) FROM torrents WHERE infohash_v2 = ?", (v2,)).fetchone()[0] == 2


def test_proxy_does_not_let_private_ip_literals_through(tmp_path):
    settings = make_settings(tmp_path, [], network={"allow_private": False,
                                                   "proxy": "http://127.0.0.1:9/"})

    async def scenario():
        fetcher = tsmd.make_fetcher(settings)
        for host in ("127.0.0.1", "2130706433", "127.1", "0x7f.0.0.1", "10.1", "[::1]",
                     "127.0.0.1.", "0177.0.0.1", "0x7f000001", "2130706433.", "10.1.",
                     "[::ffff:127.0.0.1]"):
            with pytest.raises(tsmd.FetchError, match="not a public address"):
                await fetcher.fetch(f"http://{host}/x", max_bytes=10)
        await fetcher.aclose()

    run(scenario)


def test_tracker_backoff_does_not_overflow(tmp_path):
    db, _ = torrent_db(tmp_path, 1, ["udp://t.example:1/announce"])
    settings = scrape_settings(tmp_path)
    tracker_id = db.execute("SELECT id FROM trackers").fetchone()[0]
    db.execute("UPDATE trackers SET consecutive_failures = 5000")
    tally = tsmd.TrackerTally("udp://t.example:1/announce", error="dead")
    with tsmd.Transaction(db):
        tsmd.record_tracker_health(db, settings, tracker_id, tally, None, 1000)
    assert db.execute("SELECT next_attempt FROM trackers").fetchone()[0] == 1000 + 7 * 86400


def test_cli_sigint_and_sigterm_exit_130_and_record_the_run(server, tmp_path):
    publish_collection(server, "/sig/", 3)
    index_page(server, "/sig/", ["r_0.torrent", "/slow/a.torrent", "/slow/b.torrent"])
    config = write_config(tmp_path, f"""
[network]
allow_private = true
[sync]
concurrency = 3
[[collections]]
name = "sig"
url = "{server.url('/sig/')}"
type = "books"
""")
    for number, sig in enumerate((signal.SIGINT, signal.SIGTERM)):
        database = tmp_path / f"sig{number}.sqlite3"
        process = subprocess.Popen([sys.executable, str(HERE / "tsmd.py"), "--config", str(config),
                                    "--db", str(database), "sync"], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        # trio starts tasks in no fixed order: wait until r_0 is in and a slow one is pending.
        while (server.count("/sig/r_0") < 1 + number or server.count("/slow/") < 1 + 2 * number) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == tsmd.ExitCode.INTERRUPTED, stderr
        assert "Traceback" not in stderr
        db = sqlite3.connect(database)
        assert db.execute("SELECT outcome FROM runs").fetchall() == [("interrupted",)]
        assert db.execute("SELECT count(*) FROM memberships WHERE torrent_id IS NOT NULL"
                          ).fetchone()[0] == 1


def test_cli_scrape_errors_are_one_line(tmp_path):
    db, _ = torrent_db(tmp_path, 1, [])
    db.close()
    config = write_config(tmp_path, ONE_COLLECTION_CONFIG)
    done = cli("--config", str(config), "scrape", "--infohash", "0" * 40)
    assert done.returncode == tsmd.ExitCode.USAGE and "Traceback" not in done.stderr
    assert "is not listed by the selected collections" in done.stderr
    done = cli("--config", str(config), "scrape")  # a torrent with no tracker: nothing to ask
    assert done.returncode == 0, done.stderr
    done = cli("--config", str(config), "trackers", "--format", "json")
    assert done.returncode == 0 and json.loads(done.stdout) == []


class HostileUdpPeer:
    """A UDP peer on 127.0.0.1:0 that answers every datagram with `answers`, from a thread."""

    def __init__(self, answers: list[bytes], address: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.address = f"{address}:{self.port}"
        self.answers = answers
        self.received = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                _, sender = self.sock.recvfrom(65536)
            except OSError:
                continue
            self.received += 1
            for answer in self.answers:
                self.sock.sendto(answer, sender)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)
        self.sock.close()


def test_hostile_bencode_fails_one_item_of_each_stage_never_the_process(server, tmp_path):
    hostile = [SEGFAULT_PACKET, ENDLESS_LOOP_PACKET]
    dht_node, udp_tracker = HostileUdpPeer(hostile), HostileUdpPeer(hostile)
    try:
        http_tracker = server.url("/tracker/announce")
        server.files["/tracker/scrape"] = (SEGFAULT_PACKET, "text/plain")
        good = v1_torrent("good.bin", 1000, trackers=[[f"udp://{udp_tracker.address}/announce"],
                                                      [http_tracker]])
        server.files["/h/r_0.torrent"] = (good, "application/x-bittorrent")
        server.files["/h/r_1.torrent"] = (SEGFAULT_PACKET, "application/x-bittorrent")
        server.files["/h/r_2.torrent"] = (ENDLESS_LOOP_PACKET, "application/x-bittorrent")
        index_page(server, "/h/", ["r_0.torrent", "r_1.torrent", "r_2.torrent"])
        config = write_config(tmp_path, f"""
database = "tsmd.sqlite3"
[network]
allow_private = true
[scrape]
bind = "127.0.0.1:0"
timeout = 0.5
attempts = 2
[dht]
bootstrap = ["{dht_node.address}"]
bind = "127.0.0.1:0"
rate = 0
query_timeout = 0.5
[[collections]]
name = "hostile"
url = "{server.url('/h/')}"
type = "books"
""")
        sync = cli("--config", str(config), "sync")
        assert sync.returncode == tsmd.ExitCode.PARTIAL, sync.stderr
        assert "1 new" in sync.stderr and "2 failed" in sync.stderr
        assert sync.stderr.count("not a valid .torrent: invalid bencode") == 2
        dht = cli("--config", str(config), "dht")
        assert dht.returncode >= 0 and "Traceback" not in dht.stderr, dht.stderr
        malformed = int(re.search(r"(\d+) malformed packets", dht.stderr).group(1))
        assert malformed >= 2 and dht_node.received >= 1
        scrape = cli("--config", str(config), "scrape")
        assert scrape.returncode >= 0 and "Traceback" not in scrape.stderr, scrape.stderr
        assert udp_tracker.received >= 1 and server.count("/tracker/scrape") >= 1
        trackers = json.loads(cli("--config", str(config), "trackers", "--format", "json").stdout)
        errors = {row["url"]: row["last_error"] for row in trackers}
        assert "invalid bencode: string length with a sign" in errors[http_tracker]
    finally:
        dht_node.stop()
        udp_tracker.stop()


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a running process (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("stage", ["sync", "dht", "scrape"])
def test_sigterm_ends_a_stage_fed_hostile_bytes_at_once(server, tmp_path, stage):
    # Each stage is caught in its slowest work: a sync decoding a .torrent of a million files
    # (seconds, in a thread), a rate-limited DHT stage among peers that answer garbage, a scrape
    # waiting on trackers that answer garbage.
    hostile = [SEGFAULT_PACKET, ENDLESS_LOOP_PACKET, os.urandom(300)]
    peers = [HostileUdpPeer(hostile) for _ in range(2)]
    try:
        folder = tmp_path / "torrents"
        folder.mkdir()
        if stage == "sync":
            write_torrent_of_many_files(folder / "many.torrent", 1_000_000)
        trackers = ", ".join(f'"udp://{peer.address}/announce"' for peer in peers)
        config = write_config(tmp_path, f"""
database = "tsmd.sqlite3"
[network]
allow_private = true
[sync]
max_torrent_bytes = "64 MiB"
[scrape]
bind = "127.0.0.1:0"
trackers = [{trackers}]
timeout = 5
[dht]
bootstrap = ["{peers[0].address}", "{peers[1].address}"]
bind = "127.0.0.1:0"
rate = 2
query_timeout = 5
[[collections]]
name = "c"
url = "{folder.as_uri()}/"
type = "books"
""")
        if stage != "sync":
            for n in range(20):
                (folder / f"r_{n}.torrent").write_bytes(v1_torrent(f"t{n}", seed=n))
            assert cli("--config", str(config), "sync").returncode == 0
        process = start_tsmd("--config", str(config), stage)
        database = tmp_path / "tsmd.sqlite3"
        wait_for_stage(database, stage)
        if stage == "sync":  # 0.3 s of CPU into 2.5 s of decoding (reading takes 0.02 s)
            started = cpu_seconds(process.pid)
            deadline = time.monotonic() + 30
            while process.poll() is None and time.monotonic() < deadline \
                    and cpu_seconds(process.pid) < started + 0.3:
                time.sleep(0.01)
        else:
            time.sleep(1)
        assert process.poll() is None, process.stderr.read()
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        elapsed = time.monotonic() - signalled
        print(f"{stage}: ended {elapsed:.2f} s after SIGTERM")
        assert process.returncode == tsmd.ExitCode.INTERRUPTED, stderr
        assert "Traceback" not in stderr
        assert elapsed < 2, f"{stage} took {elapsed:.1f} s to stop"
        db = sqlite3.connect(database)
        assert db.execute("SELECT outcome FROM runs WHERE stage = ?", (stage,)).fetchall()[-1] \
            == ("interrupted",)
    finally:
        for peer in peers:
            peer.stop()


# ---- Fuzzing every untrusted parser ----
# A seeded mutation fuzzer: each input is made from its index alone, so a crash found in a
# worker process is replayed by number. Workers are processes of their own: a segfault or a hang
# in a parser kills one worker, which the driver counts and replaces, never the run.

FUZZ_SLOW_SECONDS = 0.1  # reported, not asserted: speed belongs to bench_tsmd.py fuzz
FUZZ_HANG_SECONDS = 10.0  # a worker stuck this long on one input is killed and counted
FUZZ_SLOWEST_SHOWN = 5


def _fuzz_seeds() -> dict[str, list]:
    """Valid inputs of each parser, and the regression inputs that once crashed or hung tsmd."""
    node_ids = [hashlib.sha1(bytes([n])).digest() for n in range(8)]
    nodes = b"".join(i + bytes([10, 0, 0, n]) + struct.pack("!H", 6881) for n, i in enumerate(node_ids))
    nodes6 = node_ids[0] + socket.inet_pton(socket.AF_INET6, "2001:db8::1") + b"\x1a\xe1"
    krpc = [
        bencoder.bencode({b"t": b"aa", b"y": b"r", b"r": {b"id": node_ids[0], b"token": b"tok",
                                                          b"values": [b"\x0a\x00\x00\x01\x1a\xe1"] * 3,
                                                          b"nodes": nodes}}),
        bencoder.bencode({b"t": b"ab", b"y": b"r", b"ip": b"\x7f\x00\x00\x01\x1a\xe1",
                          b"r": {b"id": node_ids[1], b"nodes6": nodes6, b"BFsd": b"\x01" * 256,
                                 b"BFpe": b"\x80" * 256}}),
        b"d1:eli201e23:A Generic Error Ocurrede1:t2:aa1:y1:ee",
        tsmd.encode_get_peers(b"qq", node_ids[2], node_ids[3], scrape=True, want_ipv6=True),
        b"d1:rd-4:failure reason7:go awaye1:t2:aa1:y1:re",  # issue 12: segfaulted
        b"d2:1:d-6:",  # issue 12: looped for ever
    ]
    torrents = [
        v1_torrent("single.iso", 123_456, announce="http://t.example/announce"),
        v1_torrent("dir", files=[10, 20, 30], trackers=[["udp://a.example:80/announce"],
                                                        ["http://b.example/announce"]]),
        v1_torrent("noncanon.bin", 5000, canonical=False, announce="udp://x.example:6969"),
        bencoder.bencode({b"info": {b"name": b"v2", b"meta version": 2, b"piece length": 16384,
                                    b"file tree": {b"a": {b"": {b"length": 5, b"pieces root": b"r" * 32}},
                                                   b"d": {b"b": {b"": {b"length": 7}}}}},
                          b"announce": b"udp://t.example:1/a", b"creation date": 1}),
        b"d2:1:d-6:", b"d4:infod6:lengthi" + b"9" * 30 + b"ee" + b"e",
    ]
    scrape_bodies = [
        bencoder.bencode({b"files": {b"h" * 20: {b"complete": 4, b"incomplete": 1, b"downloaded": 30},
                                     b"g" * 20: {b"complete": 0}}}),
        bencoder.bencode({b"failure reason": b"go away"}),
        b"d1:rd-4:failure reason7:go awaye1:t2:aa1:y1:re",
    ]
    ws_replies = [
        ws_reply({bytes(range(236, 256)): {"complete": 3, "incomplete": 1, "downloaded": 3},
                  bytes(range(20)): {"complete": 0, "incomplete": 0, "downloaded": 0}},
                 flags={"min_request_interval": 600}).encode(),
        b'{"failure reason":"invalid info_hash"}',
        b'{"action":"announce","offer":{"type":"offer","sdp":"v=0"},"info_hash":"' + b"a" * 20
        + b'"}',
        b"[" * 2000 + b"]" * 2000]
    udp_replies = [bytes.fromhex("00000000 01020304 aabbccddeeff0011"),
                   struct.pack("!II", 2, 9) + struct.pack("!III", 5, 100, 3) * 3,
                   struct.pack("!II", 3, 9) + b"message\x00"]
    infohash = "63a04291a8b266d968aa7ab8a276543fa63a9e84"
    magnets = [f"magnet:?xt=urn:btih:{infohash}&dn=r_000&tr=udp%3A%2F%2Ft.example%3A80&xl=68741",
               f"magnet:?xt=urn:btmh:1220{'a' * 64}&dn=v2",
               f"magnet:?xt=urn:btih:{infohash}&dn=\ud800",  # issue 12: could not be stored
               f"magnet:?xt=urn:btih:{infohash}" + "&tr=udp://t.example:1/a" * 3]
    pages = [
        f"""<html><body><a href="r_0.torrent">r_0</a> <a href='/x/r_1000.torrent'>r</a>
        <a href="magnet:?xt=urn:btih:{'b' * 40}&amp;dn=m">m</a></body></html>""".encode(),
        f"# list\nr_1.torrent\nhttps://m.example/r_2.torrent\n{magnets[0]}\n{'D' * 40}\n".encode(),
        json.dumps([{"name": "r_5.torrent", "link": "r_5.torrent", "infohash": "e" * 40,
                     "size_bytes": 10}, "e" * 40, magnets[1]]).encode(),
        json.dumps({"torrents": [{"url": "/t/a.torrent", "btih": "f" * 40}]}).encode(),
        b'["magnet:?xt=urn:btih:' + b"a" * 40 + b'&dn=\\ud800"]',  # issue 12: a lone surrogate
    ]
    return {
        "bdecode": torrents + krpc, "metainfo": torrents, "krpc": krpc,
        "get_peers_reply": krpc[:2], "compact_nodes": [nodes, nodes6],
        "compact_peer": [b"\x0a\x00\x00\x01\x1a\xe1", socket.inet_pton(socket.AF_INET6, "::1") + b"\0\1"],
        "udp_tracker_reply": udp_replies, "http_scrape": scrape_bodies,
        "full_scrape": scrape_bodies, "ws_scrape": ws_replies,
        "magnet": [m.encode("utf-8", "surrogatepass") for m in magnets],
        "infohash": [infohash.encode(), b"MOQEFENIWKZG3GFKPK4KE5SUH6TDVHUE", b" " + b"A" * 40],
        "link": [b"r_0.torrent", b"../../x/y.torrent?a=1#f", b"http://h.example:99/x", b"//[::1]/a"],
        "index": pages,
        "peer_wire": [tsmd.encode_peer_handshake(PROBE_INFOHASH, bytes(20))
                      + peer_message(20, b"d1:md11:ut_metadatai1eee") + peer_message(5, b"\xff\xf0")
                      + peer_message(4, (3).to_bytes(4, "big")) + bytes(4) + peer_message(14)],
        "metadata": [_metadata_messages(info_dict_of(files=3, pieces=4)),
                     _metadata_messages(info_dict_of(files=400, pieces=8))],
    }


def _metadata_messages(info: bytes) -> bytes:
    """A peer's BEP 10 handshake offering `info`, then every ut_metadata piece of it."""
    messages = peer_message(20, b"\x00" + bencoder.bencode(
        {b"m": {b"ut_metadata": 2}, b"metadata_size": len(info)}))
    for piece in range(-(-len(info) // 16384)):
        messages += peer_message(20, b"\x01" + bencoder.bencode(
            {b"msg_type": 1, b"piece": piece, b"total_size": len(info)})
            + info[piece * 16384:(piece + 1) * 16384])
    return messages


def _fuzz_parsers() -> dict[str, Callable[[bytes], object]]:
    """Every `_untrusted` parser, fed bytes; text parsers get them as Python reads untrusted
    text: UTF-8 with surrogate escapes for bytes that are not UTF-8."""
    def text(data: bytes) -> str:
        return data.decode("utf-8", "surrogateescape")

    def index(data: bytes) -> object:
        link = ("", '<?p=2>; rel="next"', "<", "")[data[-1] % 4 if data else 0]
        return tsmd.parse_index_untrusted(
            data, BASE, link_header=link,
            options=tsmd.ListingOptions(same_origin=bool(len(data) % 2)))

    def full_scrape(data: bytes) -> tsmd.HttpScrapeReply:
        """Read in chunks of a size the input chooses, wanting two of its hashes."""
        reader = tsmd.FullScrapeReader({data[12:32], data[-70:-50]})
        step = 1 + len(data) % 97
        for start in range(0, len(data), step):
            reader.feed(data[start:start + step])
        return reader.finish()

    def peer_wire(data: bytes) -> bool:
        """A peer's bytes: its handshake (for the torrent it names), then messages, fed to
        what it holds, of 12 pieces or (odd lengths) of a count unknown."""
        tsmd.decode_peer_handshake_untrusted(data[:tsmd.PEER_HANDSHAKE_LENGTH], data[28:48])
        holdings = tsmd.PeerHoldings(None if len(data) % 2 else 12)
        for kind, payload in tsmd.split_peer_messages_untrusted(bytearray(data[68:])):
            holdings.take_untrusted(kind, payload)
        return holdings.complete

    def metadata(data: bytes) -> object:
        """A peer's extended messages: its BEP 10 handshake, then ut_metadata pieces, put
        together (checked against an infohash they cannot match) and read as an info
        dictionary whatever they make."""
        assembly, pieces = None, []
        for kind, payload in tsmd.split_peer_messages_untrusted(bytearray(data)):
            if kind != 20 or not payload:
                continue
            if payload[0] == 0:
                size = tsmd.decode_extended_handshake_untrusted(payload[1:])[1]
                assembly = tsmd.MetadataAssembly(bytes(20), size) if size else None
                continue
            msg_type, piece, rest = tsmd.decode_metadata_message_untrusted(payload[1:])
            pieces.append(rest)
            if assembly is not None and msg_type == 1:
                with contextlib.suppress(tsmd.ProtocolError):
                    assembly.take_untrusted(piece, rest)
        info = b"".join(pieces)
        return tsmd.metainfo_from_info_untrusted(info, hashlib.sha1(info).digest())

    return {
        "scan": tsmd.scan_bencode_untrusted,
        "bdecode": tsmd.bdecode_untrusted,
        "metainfo": tsmd.decode_metainfo_untrusted,
        "krpc": tsmd.krpc_transaction_untrusted,
        "get_peers_reply": lambda data: tsmd.decode_get_peers_reply_untrusted(
            tsmd.decode_krpc_untrusted(data)),
        "compact_nodes": lambda data: (tsmd.decode_compact_nodes_untrusted(data),
                                       tsmd.decode_compact_nodes_untrusted(data, ipv6=True)),
        "compact_peer": tsmd.decode_compact_peer_untrusted,
        "udp_tracker_reply": lambda data: (tsmd.udp_tracker_packet_untrusted(data),
                                           tsmd.decode_udp_tracker_reply_untrusted(data)),
        "http_scrape": tsmd.decode_http_scrape_untrusted,
        "full_scrape": full_scrape,
        "ws_scrape": lambda data: (tsmd.decode_ws_scrape_untrusted(data),
                                   tsmd.decode_ws_scrape_untrusted(text(data))),
        "magnet": lambda data: tsmd.decode_magnet_untrusted(text(data)),
        "infohash": lambda data: tsmd.parse_infohash_untrusted(text(data)),
        "link": lambda data: tsmd.resolve_link_untrusted(BASE, text(data)),
        "index": index,
        "peer_wire": peer_wire,
        "metadata": metadata,
        # Not fuzzed as a target of tsmd: shows that the harness catches what the scan prevents.
        "unguarded_bencoder": bencoder.bdecode,
    }


_FUZZ_LENGTHS = re.compile(rb"[0-9]{1,20}:")  # longer: its last 20 digits
_FUZZ_INTEGERS = re.compile(rb"i-?[0-9]+e")


def _fuzz_mutate(rng: random.Random, data: bytes, other: bytes) -> bytes:
    """One mutation of the kinds an attacker tries: truncation, bit flips, corrupted lengths and
    integers, deep nesting, lone surrogates, splices, and repetition into a large input."""
    size = len(data)
    at = rng.randrange(size + 1)
    kind = rng.randrange(12)
    if kind == 0:
        return data[:at]
    if kind == 1 and size:
        at = min(at, size - 1)
        return data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1:]
    if kind == 2:
        byte = rng.choice(b"-0:eldi9\x00\xff\"<&%\\ \n")
        return data[:at] + bytes([byte]) + data[at + 1:]
    if kind == 3:
        return data[:at] + rng.randbytes(rng.randrange(1, 9)) + data[at:]
    if kind == 4:
        return data[:at] + data[at + rng.randrange(1, 64):]
    if kind == 5 and (lengths := list(_FUZZ_LENGTHS.finditer(data))):
        match = rng.choice(lengths)
        number = int(match.group()[:-1])
        new = rng.choice([b"-%d" % number, b"-%d" % rng.randrange(1, 99), b"0%d" % number,
                          b"%d" % (number + rng.choice((-1, 1, 1000))), b" %d" % number,
                          b"+%d" % number, b"%d_0" % number, b"9" * rng.randrange(10, 40),
                          b"9223372036854775807", b"4294967295"])
        return data[:match.start()] + new + data[match.end() - 1:]
    if kind == 6 and (integers := list(_FUZZ_INTEGERS.finditer(data))):
        match = rng.choice(integers)
        new = rng.choice([b"i" + b"7" * 5000 + b"e", b"i-0e", b"i01e", b"i9223372036854775808e",
                          b"i-9223372036854775809e", b"i" + b"9" * 19 + b"e", b"i1.5e", b"ie"])
        return data[:match.start()] + new + data[match.end():]
    if kind == 7:
        depth = rng.choice([10, 499, 501, 2000, 100_000])
        return data[:at] + b"l" * depth + data[at:] + b"e" * rng.choice([0, depth])
    if kind == 8:
        text = rng.choice(["\ud800", "\udcff", "\\ud800", "\\udfff\\ud800", "%ED%A0%80", "\x00"])
        return data[:at] + text.encode("utf-8", "surrogatepass") + data[at:]
    if kind == 9:
        return data[:at] + other[rng.randrange(len(other) + 1):]
    if kind == 10 and size:
        start = rng.randrange(size)
        chunk = data[start:start + rng.randrange(1, 40)]
        return data[:at] + chunk * rng.choice([2, 100, 20_000 // len(chunk)]) + data[at:]
    return data[:at] + rng.randbytes(rng.randrange(1, 4)) + data[at + rng.randrange(4):]


def fuzz_input(seed: int, index: int, targets: tuple[str, ...]) -> tuple[str, bytes]:
    """The parser and the bytes of fuzz input number `index`: one to three mutations of a valid
    input, or (one input in fifty) a seed as it is, regression inputs included."""
    seeds = _fuzz_seeds_cached()
    rng = random.Random(seed * 1_000_003 + index)
    target = rng.choice(targets)
    pool = seeds.get(target) or seeds["bdecode"]
    data = rng.choice(pool)
    if rng.randrange(50):
        for _ in range(rng.randrange(1, 4)):
            data = _fuzz_mutate(rng, data, rng.choice(pool))
    return target, data


FUZZ_TARGETS = ("scan", "bdecode", "metainfo", "krpc", "get_peers_reply", "compact_nodes",
                 "compact_peer", "udp_tracker_reply", "http_scrape", "full_scrape", "ws_scrape",
                 "magnet", "infohash", "link", "index", "peer_wire", "metadata")
_fuzz_seeds_cached = functools.cache(_fuzz_seeds)


def _fuzz_storable(value: object) -> str | None:
    """Why a parser's result could not be stored or printed: a string that is not valid UTF-8
    (a lone surrogate) or an integer past SQLite's int64. None when it can."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return f"unstorable text {item[:60]!r}"
        elif isinstance(item, int) and not -(1 << 63) <= item < (1 << 63):
            return f"integer past int64: {item}"
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif dataclasses.is_dataclass(item):  # a BEP 15 connection id is 64 bits, never stored
            stack.extend(getattr(item, f.name) for f in dataclasses.fields(item)
                         if f.name != "connection_id")
    return None


def fuzz_worker(seed: int, targets: tuple[str, ...], start: int, stop: int, progress,
                results) -> None:
    """Runs inputs start..stop-1, writing the current index to `progress` before each, so the
    driver knows which input killed or stalled this process. Sends one summary dict."""
    parsers = _fuzz_parsers()
    tsmd._token_run(), tsmd._small_value()  # regexes compiled before any input's clock starts
    for levels in range(3):
        tsmd._small_values_run(levels)
    failures, slowest, slow, per_target = [], [], 0, {}
    for index in range(start, stop):
        progress.value = index
        target, data = fuzz_input(seed, index, targets)
        per_target[target] = per_target.get(target, 0) + 1
        began = time.perf_counter()
        try:
            result = parsers[target](data)
        except tsmd.ProtocolError:
            result = None
        except BaseException as exc:  # the finding: anything but ProtocolError
            failures.append((index, target, f"{type(exc).__name__}: {str(exc)[:200]}"))
            continue
        finally:
            elapsed = time.perf_counter() - began
            slow += elapsed > FUZZ_SLOW_SECONDS
            if len(slowest) < FUZZ_SLOWEST_SHOWN:
                heapq.heappush(slowest, (elapsed, index))
            else:
                heapq.heappushpop(slowest, (elapsed, index))
        problem = _fuzz_storable(result)
        if problem:
            failures.append((index, target, problem))
    results.put({"start": start, "failures": failures, "slowest": slowest, "slow": slow,
                 "per_target": per_target})
    results.close()
    results.join_thread()  # sent: a crash from here on is not one of these inputs
    progress.value = stop


@dataclass
class FuzzSummary:
    inputs: int
    seconds: float
    per_target: dict[str, int]
    crashes: list[tuple[int, str, str]]  # index, target, how the worker died
    hangs: list[tuple[int, str]]
    failures: list[tuple[int, str, str]]  # an exception other than ProtocolError, or bad output
    slow: int  # inputs over FUZZ_SLOW_SECONDS
    slowest: list[tuple[float, int]]  # (seconds, index) of the slowest inputs, slowest first

    def describe(self, seed: int, targets: tuple[str, ...] = FUZZ_TARGETS) -> str:
        def shown(index: int) -> str:
            target, data = fuzz_input(seed, index, targets)
            return f"#{index} {target} {data[:120]!r}{'…' if len(data) > 120 else ''}"

        lines = [f"{self.inputs:,} inputs in {self.seconds:.1f} s "
                 f"({self.inputs / max(self.seconds, 1e-9):,.0f}/s): {len(self.crashes)} crashes, "
                 f"{len(self.hangs)} hangs, {len(self.failures)} exceptions other than "
                 f"ProtocolError or unstorable results, {self.slow} over "
                 f"{FUZZ_SLOW_SECONDS * 1000:.0f} ms",
                 "per parser: " + ", ".join(f"{k} {v:,}" for k, v in sorted(self.per_target.items()))]
        lines += [f"slow: {seconds * 1000:.1f} ms {shown(index)}" for seconds, index in self.slowest]
        lines += [f"crash ({how}): {shown(index)}" for index, _, how in self.crashes[:20]]
        lines += [f"hang: {shown(index)}" for index, _ in self.hangs[:20]]
        lines += [f"{what}: {shown(index)}" for index, _, what in self.failures[:20]]
        return "\n".join(lines)


def run_fuzz(inputs: int, seed: int = 1, workers: int = 2, chunk: int = 5000,
             targets: tuple[str, ...] = FUZZ_TARGETS,
             hang_seconds: float = FUZZ_HANG_SECONDS) -> FuzzSummary:
    """Fuzz inputs 0..inputs-1 in `workers` processes. A worker that dies or stalls on an input
    is counted against that input; the rest of its chunk is run again by a new worker."""
    import multiprocessing
    import queue
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    chunks = [(start, min(start + chunk, inputs)) for start in range(0, inputs, chunk)]
    summary = FuzzSummary(inputs, 0.0, {}, [], [], [], 0, [])
    running: list[FuzzWorker] = []
    began = time.monotonic()

    def take(result: dict) -> None:
        summary.failures += result["failures"]
        summary.slow += result["slow"]
        summary.slowest = heapq.nlargest(FUZZ_SLOWEST_SHOWN, summary.slowest
                                         + [tuple(pair) for pair in result["slowest"]])
        for target, count in result["per_target"].items():
            summary.per_target[target] = summary.per_target.get(target, 0) + count

    def done() -> int:
        return sum(summary.per_target.values()) + len(summary.crashes) + len(summary.hangs)

    def lost(worker: FuzzWorker, index: int) -> None:
        """`worker` ended inside input `index`: the other inputs of its chunk run again."""
        running.remove(worker)
        chunks[:0] = [(a, b) for a, b in ((worker.start, index), (index + 1, worker.stop))
                      if a < b]

    try:
        while chunks or running:
            while chunks and len(running) < workers:
                running.append(FuzzWorker.launch(context, seed, targets, *chunks.pop(0),
                                                 results))
            try:
                take(results.get(timeout=0.05))
            except queue.Empty:
                pass
            for worker in list(running):
                index = worker.index()
                if worker.process.exitcode == 0 or index == worker.stop:  # its chunk is done
                    running.remove(worker)
                elif index < 0 and (worker.process.exitcode is not None
                                    or time.monotonic() - worker.since > 60):
                    raise RuntimeError(f"a fuzz worker could not start: exit "
                                       f"{worker.process.exitcode}")
                elif worker.process.exitcode is not None:
                    target = fuzz_input(seed, index, targets)[0]
                    summary.crashes.append((index, target, f"exit {worker.process.exitcode}"))
                    lost(worker, index)
                elif index >= 0 and time.monotonic() - worker.since > hang_seconds:
                    worker.process.kill()
                    worker.process.join()
                    summary.hangs.append((index, fuzz_input(seed, index, targets)[0]))
                    lost(worker, index)
        while done() < inputs:  # the last summaries, sent just before their workers ended
            take(results.get(timeout=30))
    finally:
        for worker in running:
            worker.process.kill()
    summary.seconds = time.monotonic() - began
    return summary


@dataclass
class FuzzWorker:
    """A worker process of run_fuzz and the input it is on: -1 until it has started, `stop`
    once its chunk's results are sent."""

    process: Any
    progress: Any  # a shared int64
    start: int
    stop: int
    last: int = -1
    since: float = 0.0  # when it started, then when `progress` last moved

    @classmethod
    def launch(cls, context, seed: int, targets: tuple[str, ...], start: int, stop: int,
               results) -> FuzzWorker:
        progress = context.Value("q", -1, lock=False)
        process = context.Process(target=fuzz_worker, daemon=True,
                                  args=(seed, targets, start, stop, progress, results))
        process.start()
        return cls(process, progress, start, stop, since=time.monotonic())

    def index(self) -> int:
        index = self.progress.value
        if index != self.last:
            self.last, self.since = index, time.monotonic()
        return index


def test_fuzz_every_untrusted_parser_in_worker_processes():
    summary = run_fuzz(20_000, seed=12)
    print(summary.describe(12))
    assert not summary.crashes and not summary.hangs and not summary.failures, summary.describe(12)
    assert sum(summary.per_target.values()) == 20_000
    assert set(summary.per_target) == set(FUZZ_TARGETS)


def test_fuzz_harness_catches_the_crashes_the_scan_prevents():
    # bencoder.pyx unguarded, on the same inputs: the harness must see it die and go on.
    targets = ("unguarded_bencoder",)
    summary = run_fuzz(100, seed=3, chunk=50, targets=targets, hang_seconds=2)
    print(summary.describe(3, targets))
    assert any(how == f"exit {-signal.SIGSEGV}" for _, _, how in summary.crashes)
    assert sum(summary.per_target.values()) + len(summary.crashes) + len(summary.hangs) == 100


# ---- Health model and report formats ----


def thinned_reference(points: list[tuple[int, int]]) -> tuple[list, list]:
    """What SeederHistory must hold after `points` (time order), computed from all of them."""
    newest = points[-1][0]
    kept = [(when, seeders) for index, (when, seeders) in enumerate(points)
            if when >= newest - tsmd.FULL_HISTORY or (
                when > newest - tsmd.KEPT_HISTORY and
                (index + 1 == len(points) or points[index + 1][0] // 86400 != when // 86400))]
    daily: dict[int, int] = {}
    for when, seeders in points:
        if when // 86400 > newest // 86400 - tsmd.TREND_DAYS:
            daily[when // 86400] = seeders
    return kept, list(daily.values())


@hsettings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60 * 86400), st.integers(0, 5000)), min_size=1,
                max_size=120), st.booleans())
def test_seeder_history_thins_with_age_and_keeps_what_changes_need(raw, shuffled):
    points = sorted(dict(raw).items())
    history = tsmd.SeederHistory()
    for point in (raw if shuffled else points):  # out-of-order points take the rebuild path
        history.add(*point)
    if shuffled:  # later duplicates of a time replace earlier ones
        points = sorted({when: seeders for when, seeders in raw}.items())
    kept, daily = thinned_reference(points)
    if not shuffled:
        assert history.points() == kept
        assert list(history.daily) == daily
        recent = [p for p in points if p[0] > points[-1][0] - tsmd.KEPT_HISTORY]
        assert history.changes() == tsmd.seeder_changes(recent)
    else:  # out of order: thinning drops only what the final history would drop anyway
        assert history.points() == kept and list(history.daily) == daily
    again = tsmd.SeederHistory.from_stored(*history.stored())
    assert again.points() == history.points() and list(again.daily) == list(history.daily)


def test_seeder_history_of_an_hourly_cron_stays_small():
    history = tsmd.SeederHistory()
    start = 1_700_000_000
    for hour in range(24 * 90):
        history.add(start + hour * 3600, hour % 50)
    # 8 days of hourly points, then one a day until the 31st day; 30 daily trend values.
    assert 8 * 24 < len(history.times) <= 8 * 24 + 1 + 23 and len(history.daily) == 30
    # Hour 2159 has 9 seeders; hour 2158 had 8, hour 2139 (20 h before) 39, hour 2003 3.
    assert history.changes() == (1, 9 - 39, 9 - 3)


def history_db(tmp_path: Path) -> tuple[sqlite3.Connection, list[bytes]]:
    """Four torrents with a hand-built history of daily scrape runs over nine days."""
    sizes = [1_000, 4_000, 2_000, 1_000]
    db, hashes = torrent_db(tmp_path, 4, ["udp://a.example:1/announce", "udp://b.example:1/announce"])
    with tsmd.Transaction(db):
        for n, size in enumerate(sizes):
            db.execute("UPDATE torrents SET size_bytes = ? WHERE infohash = ?", (size, hashes[n].hex()))
    now = int(time.time())
    # seeders per day (index 0 = 8 days ago ... 8 = now) as seen by tracker a; b sees fewer.
    series = {0: [30, 28, 25, 20, 15, 12, 11, 10, 9],  # falling: yellow now, -6 in a week
              1: [2, 2, 2, 2, 2, 2, 2, 1, 0],  # dying: red, -1 in a day
              2: [0, 0, 0, 0, 0, 0, 0, 5, 15]}  # rescued: green
    a, b = (db.execute("SELECT id FROM trackers WHERE url = ?", (tsmd.normalise_tracker_url(url),)).fetchone()[0]
            for url in ("udp://a.example:1/announce", "udp://b.example:1/announce"))
    with tsmd.Transaction(db):
        for day in range(9):
            run_id = db.execute("INSERT INTO runs (stage, started, outcome) VALUES ('scrape', ?, "
                                "'ok')", (now - (8 - day) * 86400,)).lastrowid
            measured = now - (8 - day) * 86400 + 60
            for n, values in series.items():
                torrent_id = db.execute("SELECT id FROM torrents WHERE infohash = ?",
                                        (hashes[n].hex(),)).fetchone()[0]
                db.execute(INSERT_SAMPLES + "(?, ?, ?, ?, ?, ?, ?)",
                           (torrent_id, a, run_id, measured, values[day], 3, 100 + day))
                db.execute(INSERT_SAMPLES + "(?, ?, ?, ?, ?, ?, ?)",
                           (torrent_id, b, run_id, measured, values[day] // 2, 9, 50))
    return db, hashes


def test_health_bands_need_and_changes_from_history(tmp_path):
    db, hashes = history_db(tmp_path)
    rows = {row.infohash: row for row in tsmd.load_report_rows(db)}
    falling, dying, rescued, unknown = (rows[h.hex()] for h in hashes)
    assert (falling.seeders, falling.leechers, falling.band) == (9, 3, "yellow")  # tracker a's
    assert (falling.seeders_change_previous, falling.seeders_change_1d,
            falling.seeders_change_7d) == (-1, -1, -19)
    assert (dying.seeders, dying.band, dying.seeders_change_1d) == (0, "red", -1)
    assert (rescued.band, rescued.seeders_change_1d, rescued.seeders_change_7d) == ("green", 10, 15)
    assert unknown.band == "grey" and unknown.need is None and unknown.seeders_change_1d is None
    assert falling.completed == 108  # the largest any tracker reports
    mean = (1000 + 4000 + 2000 + 1000) / 4
    assert dying.need == pytest.approx((0 + 0.9) * mean / 4000)  # b: same 0 seeders, 9 leechers
    assert falling.need == pytest.approx((9 + 0.3) * mean / 1000)
    ordered = tsmd.select_report_rows(list(rows.values()), "need", None, None)
    # The plan: falling (yellow) before rescued (green), though rescued scores 15.3 against
    # falling's 18.6; then dying, dead at 0 seeders (score 0.45); unknown last.
    assert [row.infohash for row in ordered] == [h.hex() for h in (hashes[0], hashes[2], hashes[1],
                                                                    hashes[3])]
    assert [row.seeders for row in tsmd.select_report_rows(list(rows.values()), "seeders", 2, 10)
            ] == [0, 9]
    assert tsmd.is_dead(dying) and not tsmd.is_dead(unknown)


def test_changes_are_shown_only_beside_the_seeders_they_belong_to(tmp_path):
    db, hashes = history_db(tmp_path)
    falling = hashes[0].hex()
    assert {r.infohash: r for r in tsmd.load_report_rows(db)}[falling].seeders_change_1d == -1
    # A scrape is running: its first samples are in, the run is not folded until it ends.
    run_id = tsmd.start_run(db, "scrape")
    with tsmd.Transaction(db):
        db.execute(INSERT_SAMPLES + "(1, 1, ?, ?, 20, 0, 200)",
                   (run_id, int(time.time()) + 120))
    row = {r.infohash: r for r in tsmd.load_report_rows(db)}[falling]
    assert row.seeders == 20 and (row.seeders_change_previous, row.seeders_change_1d,
                                  row.seeders_change_7d) == (None, None, None)
    tsmd.finish_run(db, run_id, "ok", {})
    row = {r.infohash: r for r in tsmd.load_report_rows(db)}[falling]
    assert (row.seeders, row.seeders_change_previous) == (20, 20 - 9)


def test_report_formats_csv_ndjson_prometheus(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    db, hashes = history_db(tmp_path)
    with tsmd.Transaction(db):
        db.execute("UPDATE memberships SET file_name = ? WHERE source = ?",
                   ('=HYPERLINK("http://evil")\n"quoted" \\ 1', hashes[0].hex()))
        db.execute("UPDATE collections SET name = ?", ('books "best"\\',))
    rows = tsmd.load_report_rows(db)
    import csv
    import io

    parsed = list(csv.DictReader(io.StringIO(tsmd.render_csv(rows))))
    assert len(parsed) == 4 and parsed[0]["name"].startswith("'=HYPERLINK")
    # An empty name stays an empty cell, not a lone quote.
    nameless = tsmd.dataclasses.replace(rows[1], torrent_name="")
    assert next(csv.DictReader(io.StringIO(tsmd.render_csv([nameless]))))["torrent_name"] == ""
    assert {row["band"] for row in parsed} == {"yellow", "red", "green", "grey"}
    lines = tsmd.render_ndjson(rows).splitlines()
    assert [json.loads(line)["infohash"] for line in lines] == [row.infohash for row in rows]
    families = {family.name: family for family in
                text_string_to_metric_families(tsmd.render_prometheus(rows, per_torrent=True))}
    torrents = families["tsmd_torrents"].samples
    assert torrents[0].labels == {"collection": 'books "best"\\'} and torrents[0].value == 4
    assert "tsmd_bytes{" in tsmd.render_prometheus(rows) and "e+" not in tsmd.render_prometheus(
        [tsmd.dataclasses.replace(rows[0], size_bytes=1_234_567_890_123)])
    big = tsmd.render_prometheus([tsmd.dataclasses.replace(rows[0], size_bytes=1_234_567_890_123)])
    assert 'tsmd_bytes{collection="books \\"best\\"\\\\"} 1234567890123' in big
    by_band = {s.labels["band"]: s.value for s in families["tsmd_bytes_by_band"].samples}
    assert by_band == {"red": 4000, "yellow": 1000, "green": 2000, "grey": 1000}
    assert families["tsmd_dead_torrents"].samples[0].value == 1
    per_torrent = {s.labels["infohash"]: s.value for s in families["tsmd_torrent_seeders"].samples}
    assert per_torrent == {hashes[0].hex(): 9, hashes[1].hex(): 0, hashes[2].hex(): 15}
    feed = json.loads(tsmd.render_json(rows))
    assert_seedtools_valid(feed)


def report_row_strategy():
    text, count = st.text(max_size=40), st.integers(-1, 2**53)
    maybe_count = st.none() | st.integers(-(2**40), 2**40)
    fields = {}
    for field in tsmd.dataclasses.fields(tsmd.ReportRow):
        kind = field.type.replace(" ", "")
        fields[field.name] = {"str": text, "str|None": st.none() | text, "int": count,
                              "int|None": maybe_count,
                              "float|None": st.none() | st.floats(0, 1e12),
                              "float": st.just(-1) | st.floats(0, 1e6)}[kind]
    return st.builds(tsmd.ReportRow, **fields)


@hsettings(max_examples=300, deadline=None)
@given(report_row_strategy())
def test_json_objects_are_exactly_what_json_dumps_writes(row):
    expected = {name: getattr(row, name) for name in tsmd.REPORT_FIELDS}
    expected.update(ipfs_cid=None, path=None)
    line = tsmd.report_json_object(row)
    assert line == json.dumps(expected, ensure_ascii=False)
    # NDJSON: the same objects, with null for every unknown (-1) count.
    unknown_as_null = {name: None if name in tsmd.MINUS_ONE_FIELDS and value == -1 else value
                       for name, value in expected.items()}
    assert json.loads(tsmd.render_ndjson([row, row]).replace("\n", ",\n").rstrip(",\n")
                      .join("[]")) == [unknown_as_null, unknown_as_null]
    assert json.loads(tsmd.render_json([row, row])) == (
        [expected, expected] if tsmd.fetchable_by_seedtools(row) else [])


def plan_place(row) -> int:
    """The plan's groups, spelt out: downloadable red, yellow, green; unverified (peers told
    the probe what they hold, and no complete copy was seen); dead (unless the probe saw a
    complete copy); not measured."""
    if row.seeders < 0:
        return 5
    if row.seeders == 0 and row.dht_seeds_estimate <= 0 and row.downloadable != 1:
        return 4
    if row.downloadable == 0:
        return 3
    return ("red", "yellow", "green").index(row.band)


# The orders as tuples of keys, the way they were first written.
SORTS_AS_TUPLES = {
    "need": lambda row: (plan_place(row), row.need is None, row.need or 0.0, row.name),
    "seeders": lambda row: (row.seeders < 0, row.seeders, row.name),
    "size": lambda row: (-row.size_bytes, row.name),
    "name": lambda row: row.name,
    "age": lambda row: (row.created_unix < 0, row.created_unix, row.name),
}


@hsettings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a 1", "b 2", "B 2", "é 3", "a 10"]),
                          st.integers(-1, 12), st.integers(-1, 3), st.integers(-1, 5),
                          st.integers(-1, 1), st.integers(-1, 2)),
                max_size=30),
       st.sampled_from(sorted(SORTS_AS_TUPLES)), st.none() | st.integers(0, 5))
def test_report_orders_are_by_key_then_name(raw, sort, max_seeders):
    rows = tsmd.add_health([tsmd.ReportRow(
        infohash=f"{n:040x}", name=name, torrent_name=None, link="", magnet="", collection="c",
        type="books", size_bytes=size, file_count=1, created_unix=created, seeders=seeders,
        leechers=1, completed=-1, scraped_date=-1, tracker=None, trackers_answered=0,
        dht_peers=-1, dht_scraped=-1, dht_seeds_estimate=-1, dht_peers_estimate=-1,
        downloadable=downloadable, reachable_peers=reachable)
        for n, (name, seeders, size, created, downloadable, reachable) in enumerate(raw)], {})
    expected = sorted((row for row in rows if max_seeders is None or
                       0 <= row.seeders <= max_seeders), key=SORTS_AS_TUPLES[sort])
    assert tsmd.select_report_rows(rows, sort, None, max_seeders) == expected
    assert tsmd.select_report_rows(rows, sort, 3, max_seeders) == expected[:3]


def test_the_plan_and_pick_follow_what_the_probe_saw():
    """A complete copy seen (a web seed, a verified seed) makes a torrent with no tracker
    seeder downloadable: red, picked. Tracker seeders whose peers told what they hold, with no
    complete copy among them, are unverified: after green, never picked. A probe that could
    not tell (nobody told, or no piece count) is no evidence either way."""
    base = dict(torrent_name=None, link="", magnet="", collection="c", type="books",
                size_bytes=1000, file_count=1, created_unix=1, leechers=0, completed=0,
                scraped_date=1, tracker=None, trackers_answered=1, dht_peers=0, dht_scraped=1,
                dht_seeds_estimate=0, dht_peers_estimate=0)
    cases = {  # name: (seeders, downloadable, reachable peers), plan group
        "web seed 1": ((0, 1, 0), tsmd.PLAN_RED),
        "claimed 2": ((5, 0, 3), tsmd.PLAN_UNVERIFIED),
        "could not tell 3": ((5, -1, 2), tsmd.PLAN_YELLOW),
        "dead 4": ((0, 0, 2), tsmd.PLAN_DEAD),
        "verified 5": ((5, 1, 4), tsmd.PLAN_YELLOW),
        "never probed 6": ((0, -1, -1), tsmd.PLAN_DEAD)}
    rows = tsmd.add_health([tsmd.ReportRow(
        infohash=f"{n:040x}", name=name, seeders=seeders, downloadable=downloadable,
        reachable_peers=reachable, **base)
        for n, (name, ((seeders, downloadable, reachable), _)) in enumerate(cases.items())], {})
    assert {row.name: tsmd.plan_group(row) for row in rows} == {
        name: group for name, (_, group) in cases.items()}
    plan = tsmd.select_report_rows(rows, "need", None, None)
    assert [row.name for row in tsmd.pick_torrents(plan, 10**6)] == [
        "web seed 1", "could not tell 3", "verified 5"]
    # The verdict: no copy among the peers that told is 0 only if none was skipped (the
    # run's budget spent, or its host's share of the run spent).
    verdict = tsmd.probe_verdict
    assert (verdict(0, 0.5, 0, 0), verdict(0, 0.5, 0, 2), verdict(0, None, 0, 0),
            verdict(1, None, 0, 3), verdict(0, 1.0, 0, 0), verdict(0, None, 1, 0)) == (
        0, -1, -1, 1, 1, 1)


def test_big_formats_come_in_pieces_that_add_up(tmp_path):
    import csv
    import io

    # 25 rows seedtools can fetch (html_rows' second has a javascript: link).
    rows = [row for row in html_rows(26) if tsmd.fetchable_by_seedtools(row)]
    pieces = list(tsmd.csv_chunks(rows, rows_per_chunk=4))
    assert len(pieces) == 7 and "".join(pieces) == tsmd.render_csv(rows)
    records = list(csv.DictReader(io.StringIO("".join(pieces))))
    assert len(records) == 25
    # One "unknown" in CSV: an empty cell, for counts (-1 in a row) and for null alike.
    unmeasured = [record for record in records if record["band"] == "grey"]
    assert unmeasured and all(r["seeders"] == r["need"] == r["dht_seeds_estimate"] == ""
                              for r in unmeasured)
    assert not any(value == "-1" for record in records for value in record.values())
    assert json.loads("".join(tsmd.json_chunks(rows))) == json.loads(tsmd.render_json(rows))
    for size in (1, 4, 25, 26):
        assert "".join(tsmd.json_chunks(rows, size)) == "".join(tsmd.json_chunks(rows))
        assert "".join(tsmd.ndjson_chunks(rows, size)) == tsmd.render_ndjson(rows)
    assert len(list(tsmd.json_chunks(rows, 4))) == 1 + 7
    json_lines = tsmd.render_json(rows).split("\n")  # one object a line (names hold U+2028)
    assert json_lines[0] == "[" and json_lines[-2:] == ["]", ""] and len(json_lines) == 28
    ndjson_lines = tsmd.render_ndjson(rows).split("\n")
    # The same objects, one a line, unknown counts null instead of -1.
    assert [{key: None if key in tsmd.MINUS_ONE_FIELDS and value == -1 else value
             for key, value in json.loads(line.rstrip(",")).items()}
            for line in json_lines[1:-2]] == [json.loads(line) for line in ndjson_lines[:-1]]
    assert len(json.loads(tsmd.render_json(rows))) == 25 and tsmd.render_json([]) == "[]\n"
    target = tmp_path / "feed.json"
    tsmd.write_atomically(target, tsmd.json_chunks(rows))
    assert target.read_text() == tsmd.render_json(rows)


def history_config(tmp_path: Path) -> tuple[Path, list[bytes]]:
    """history_db's database behind a config file naming its collection, for CLI tests."""
    db, hashes = history_db(tmp_path)
    db.close()
    return write_config(tmp_path, ONE_COLLECTION_CONFIG), hashes


ONE_COLLECTION_CONFIG = """
database = "tsmd.sqlite3"
[[collections]]
name = "c"
url = "http://x/"
type = "books"
"""


def test_cli_report_formats_sorting_and_atomic_files(tmp_path):
    config, hashes = history_config(tmp_path)
    done = cli("--config", str(config), "report", "--format", "csv", "--sort", "seeders",
               "--limit", "2")
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 3
    done = cli("--config", str(config), "report", "--max-seeders", "3")  # not a TTY: JSON
    # Its torrents are infohashes only, which libgen-seedtools cannot fetch: said, not listed.
    assert json.loads(done.stdout) == [] and "json: 1 torrent with no http(s)" in done.stderr
    done = cli("--config", str(config), "report", "--max-seeders", "3", "-f", "ndjson")
    assert [json.loads(line)["infohash"] for line in done.stdout.splitlines()] == \
        [hashes[1].hex()]
    metrics = tmp_path / "tsmd.prom"
    done = cli("--config", str(config), "report", "-f", "prometheus", "-o", str(metrics))
    assert done.returncode == 0 and "tsmd_torrents{" in metrics.read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tsmd.prom")] == []
    done = cli("--config", str(config), "report", "--format", "table", env={"COLUMNS": "160"})
    assert done.returncode == 0 and "4 torrents" in done.stdout and "t_1.torrent" in done.stdout
    done = cli("--config", str(config), "report", "--sort", "weight")
    assert done.returncode == tsmd.ExitCode.USAGE and "unknown sort" in done.stderr


def test_the_terminal_table_fits_80_columns_one_line_a_torrent():
    rows = tsmd.add_health([dataclasses.replace(
        row, name=f"{'A long name of a book that goes on and on ' * 3}{n}.torrent",
        collection="libgen-fiction") for n, row in enumerate(html_rows(6))], {})
    for width in (80, 60, 200):
        console = rich_console.Console(width=width, record=True, file=io.StringIO())
        tsmd.render_table(rows, console)
        lines = console.export_text().splitlines()
        assert all(len(line.rstrip()) <= width for line in lines), width
        body = [line for line in lines if line.startswith("│")]
        assert len(body) == len(rows)  # one line each, never wrapped
        assert lines[0].rstrip() == "6 torrents"
        headers = next(line for line in lines if "name" in line and "seeders" in line)
        if width == 200:  # room for every column, and most of each name
            assert "copies" in headers and lines[-1].startswith("└")
            assert rows[0].name[:80] in body[0]
        else:  # the name is cut with an ellipsis; the last columns give way, and say so
            assert all("…" in line for line in body) and "DHT peers" not in headers
            after = " ".join(lines[lines.index(next(l for l in lines if l.startswith("└"))) + 1:])
            assert after.startswith(f"not shown at {width} columns:")
            assert "seeders" in headers and "size" in headers
    console = rich_console.Console(width=80, record=True, file=io.StringIO())
    tsmd.render_table(rows[:1], console)
    assert console.export_text().splitlines()[0].rstrip() == "1 torrent"


# ---- HTML report ----

HOSTILE_NAMES = ['</script><script>alert(1)</script> 1', '"><img src=x onerror=alert(2)> 2',
                 "javascript:alert(3) 3", "\u2028</style><b>4</b>"]


def html_rows(count: int) -> list:
    base = dict(torrent_name=None, type="books", file_count=1, created_unix=1, leechers=1,
                completed=3, scraped_date=1, tracker=None, trackers_answered=1, dht_peers=2,
                dht_scraped=1, dht_seeds_estimate=-1, dht_peers_estimate=-1)
    rows = []
    for n in range(count):
        name = HOSTILE_NAMES[n] if n < len(HOSTILE_NAMES) else f"r_{n}.torrent"
        infohash = f"{n:040x}"
        rows.append(tsmd.ReportRow(
            infohash=infohash, name=name, link="javascript:alert(5)" if n == 1 else
            f"http://archive.example/r_{n}.torrent", magnet=tsmd.magnet_uri(infohash),
            collection="<i>books</i>" if n == 2 else "books", size_bytes=1000 * (n + 1),
            seeders=(n * 7) % 13 if n % 5 else -1, **base))
    return tsmd.add_health(rows, {})


def test_html_report_escapes_hostile_strings_and_is_self_contained():
    page = tsmd.render_html(html_rows(30), {f"{3:040x}": "20000;1,5,,2"})
    # The markup in those names exists only as escaped JSON inside the data script, and as
    # escaped text in the <noscript> table.
    for raw in ("<script>alert(1)", "<img src=x", "</style><b>"):
        assert raw not in page
    script = page[page.index('<script type="application/json"'):]
    assert "\u2028" not in script  # a line break to JavaScript before ES2019
    assert "<i>books</i>" not in page and "&lt;i&gt;books&lt;/i&gt;" in page
    assert page.count("<script") == 2 and "\\u003c/script\\u003e" in page
    noscript = page[page.index("<noscript>"):page.index("</noscript>")]
    assert "<td class=\"t\">&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt; 1</td>" in noscript
    assert noscript.count("<tr>") == 31  # the header, and the 30 torrents (fewer than 100)
    # Nothing is fetched from elsewhere; links are links, and only http(s) and magnet ones.
    assert not re.search(r"""(?i)(<link|@import|url\(|<script[^>]+src|<img|<iframe)""", page)
    assert not re.search(r"""(?i)src\s*=\s*["']?https?:""", page)
    assert 'href="javascript:' not in page and 'href="http://archive.example/r_3.torrent"' in page
    assert "Content-Security-Policy" in page and "default-src 'none'" in page


def test_collection_totals_are_the_sums_over_each_collections_rows():
    rows = [tsmd.dataclasses.replace(row, collection="other" if n % 3 == 1 else row.collection,
                                     size_bytes=-1 if n % 7 == 0 else row.size_bytes)
            for n, row in enumerate(html_rows(40))]
    totals = tsmd.collection_totals(rows)
    assert list(totals) == ["books", "other", "<i>books</i>"]  # in the order rows name them
    for collection, total in totals.items():
        members = [row for row in rows if row.collection == collection]
        assert total.torrents == len(members)
        assert total.size_bytes == sum(max(row.size_bytes, 0) for row in members)
        for band in tsmd.Band:
            assert total.torrents_by_band[band.value] == sum(row.band == band.value
                                                             for row in members)
            assert total.bytes_by_band[band.value] == sum(max(row.size_bytes, 0)
                                                          for row in members
                                                          if row.band == band.value)
        assert total.dead == sum(tsmd.is_dead(row) for row in members)
    assert sum(total.dead for total in totals.values()) > 0


def chromium_dom(page: Path, fragment: str) -> str:
    """The page's DOM after its scripts ran, from Debian's headless Chromium (installed by the
    README's test command), with no network and a throw-away profile."""
    return chromium(page, fragment, "--dump-dom")


def rendered_names(dom: str) -> list[str]:
    return [html.unescape(name) for name in re.findall(r'<tr data-name="([^"]*)"', dom)]


def test_html_report_sorts_and_filters_in_headless_chromium(tmp_path):
    rows = tsmd.select_report_rows(html_rows(1200), "need", None, None)
    page = tmp_path / "report.html"
    page.write_text(tsmd.render_html(rows))
    by_need = rendered_names(chromium_dom(page, ""))
    assert len(by_need) == 500  # drawn 500 at a time, in the order tsmd sorted them
    assert by_need == [row.name for row in rows][:500]
    # Sorting by need in the page gives that order too: equal needs keep tsmd's order.
    assert rendered_names(chromium_dom(page, "sort=need&dir=asc")) == by_need
    # Clicking "seeders" sorts ascending, a second click descending; unknown seeders stay last.
    dom = chromium_dom(page, "click=seeders,seeders&q=r_1")
    names = rendered_names(dom)
    matching = [r for r in rows if "r_1" in r.name.lower()]
    assert len(names) == min(500, len(matching))
    seeders = {r.name: r.seeders for r in rows}
    known = [seeders[name] for name in names if seeders[name] >= 0]
    assert known == sorted(known, reverse=True) and known[0] == 12
    assert f"{min(500, len(matching))} of {len(matching)} shown" in dom
    dom = chromium_dom(page, "band=red")
    assert {seeders[name] for name in rendered_names(dom)} <= {0, 1, 2, 3}
    # Hostile strings came out as text: no element was made from them, no script ran.
    dom = chromium_dom(page, "sort=name")
    assert "<img" not in dom and "alert(1)</script>" not in dom
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt; 1" in dom
    assert 'href="javascript:' not in dom


def test_cli_report_html(tmp_path):
    config, hashes = history_config(tmp_path)
    page = tmp_path / "index.html"
    generated = time.time()
    done = cli("--config", str(config), "report", "--format", "html", "--output", str(page))
    assert done.returncode == 0, done.stderr
    text = page.read_text()
    assert "t_0.torrent" in text and '"t_1.torrent"' in text
    today, tracker_lists, data = json.loads(re.search(
        r'<script type="application/json" id="data">(.*?)</script>', text, re.S).group(1))
    assert today in (int(generated) // 86400, int(time.time()) // 86400)
    first = sqlite3.connect(tmp_path / "tsmd.sqlite3").execute(
        "SELECT min(measured) / 86400 FROM tracker_samples").fetchone()[0]  # nine daily runs
    assert [row[13] for row in data if row[0] == "t_0.torrent"] == [
        f"{first};30,28,25,20,15,12,11,10,9"]  # seeders at the end of each day, for the sparkline
    assert len(tracker_lists) == 2  # none, and the one list all four torrents share
    # The page puts each magnet back together exactly, trackers included.
    db = sqlite3.connect(tmp_path / "tsmd.sqlite3")
    expected = {tsmd.magnet_uri(infohash, name, ["udp://a.example:1", "udp://b.example:1"])
                for infohash, name in db.execute("SELECT infohash, name FROM torrents")}
    dom = chromium_dom(page, "")
    hrefs = {html.unescape(href) for href in re.findall(r'href="(magnet:[^"]*)"', dom)}
    assert hrefs == expected and len(hrefs) == 4
    assert dom.count("<polyline") == 3  # a sparkline for each torrent with a history
    assert 'id="data"' not in dom  # the data's text is dropped once parsed


def test_page_chart_is_the_folded_seeder_history(tmp_path):
    config, hashes = history_config(tmp_path)
    page = tmp_path / "index.html"
    done = cli("--config", str(config), "report", "--format", "html", "--output", str(page))
    assert done.returncode == 0, done.stderr
    text = page.read_text()
    today = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>',
                                 text, re.S).group(1))[0]
    drawn: dict[int, dict[str, int]] = {}
    for day, band, size in re.findall(r'data-day="(\d+)" data-band="(\w+)" data-bytes="(\d+)"',
                                      text):
        drawn.setdefault(int(day), {})[band] = int(size)
    # history_db's nine daily runs: falling (1 kB), dying (4 kB) and rescued (2 kB) by their
    # seeders on tracker a (the larger count), and a 1 kB torrent never measured: grey.
    db = sqlite3.connect(tmp_path / "tsmd.sqlite3")
    days = [day for (day,) in db.execute(
        "SELECT DISTINCT measured / 86400 FROM tracker_samples ORDER BY 1")]
    series = {1_000: [30, 28, 25, 20, 15, 12, 11, 10, 9], 4_000: [2, 2, 2, 2, 2, 2, 2, 1, 0],
              2_000: [0, 0, 0, 0, 0, 0, 0, 5, 15]}
    expected = {}
    for index, day in enumerate(days):
        bands = {"grey": 1_000}
        for size, seeders in series.items():
            band = tsmd.seeder_band_value(seeders[index])
            bands[band] = bands.get(band, 0) + size
        if day <= today:  # (the newest sample is a minute ahead: at midnight, tomorrow's)
            expected[day] = bands
    assert len(days) == 9 and len(expected) >= 8 and drawn == expected
    # The day before the first run has no bar, nor any day after the last.
    assert min(drawn) == days[0] and max(drawn) == max(expected)


def test_band_history_reads_only_the_window_and_survives_odd_trend_text():
    today = 20_100
    rows = [dataclasses.replace(row, collection=collection, size_bytes=size)
            for row, collection, size in zip(html_rows(6), "aabbcd", (100, 10, 7, 5, 3, 1))]
    trends = {rows[0].infohash: f"{today - 31};1,2,5,20",  # its last two days are in the window
              rows[1].infohash: f"{today};12",
              rows[2].infohash: "x;1,2",  # not a day: no history
              rows[3].infohash: f"{today - 3};a,-5,,3",  # no band, no band, no run, red
              rows[4].infohash: f"{today - 40};1,1",  # all before the window: no chart
              rows[5].infohash: f"{today + 1};1"}  # after it
    history = tsmd.band_history(rows, trends, today)
    assert set(history) == {"a", "b"}  # c and d have no point in the window
    assert history["a"][0] == [0, 100, 0] and history["a"][1] == [0, 0, 100]
    assert history["a"][-1] == [0, 0, 10] and not any(map(any, history["a"][2:-1]))
    assert history["b"][-1] == [5, 0, 0] and not any(map(any, history["b"][:-1]))


def dead_quarter_rows(count: int, today: int) -> tuple[list, dict[str, str]]:
    """`count` torrents in two collections, a quarter of them dead (0 seeders, no DHT seed), a
    tenth not measured, the rest red, yellow and green; and a month of daily history for the
    measured ones, with no run at all 12 days ago."""
    base = dict(torrent_name=None, type="books", file_count=1, created_unix=1, completed=3,
                scraped_date=1, tracker=None, trackers_answered=1, dht_peers=2, dht_scraped=1,
                dht_seeds_estimate=-1, dht_peers_estimate=-1)
    rows, trends = [], {}
    for n in range(count):
        infohash = f"{n:040x}"
        seeders = 0 if n % 4 == 0 else -1 if n % 10 == 3 else (1, 2, 3, 5, 8, 11, 20)[n % 7]
        rows.append(tsmd.ReportRow(
            infohash=infohash, name=f"book {n}", magnet=tsmd.magnet_uri(infohash),
            link=f"http://archive.example/{n}.torrent" if n % 5 else tsmd.magnet_uri(infohash),
            collection="fiction" if n % 3 else "scimag", size_bytes=10_000 + 7_919 * (n % 97),
            seeders=seeders, leechers=n % 4 if seeders >= 0 else -1, **base))
        if seeders >= 0:
            trends[infohash] = f"{today - 29};" + ",".join(
                "" if day == 17 else str(max(0, seeders + (n + day) % 5 - 2)) for day in range(30))
    return tsmd.add_health(rows, {}), trends


def png_pixels(path: Path, rows: int) -> tuple[int, list[bytes]]:
    """The width and the first `rows` lines (RGB or RGBA bytes) of an 8-bit PNG, as Chromium
    writes its screenshots: the few lines a test looks at, without an imaging library."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, compressed = 8, []
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + 8 + length]
        position += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0
        elif kind == b"IDAT":
            compressed.append(body)
    channels = 3 if color == 2 else 4
    stride, raw = width * channels, zlib.decompress(b"".join(compressed))
    lines, previous = [], bytearray(stride)
    for y in range(min(rows, height)):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride) if kind else ():
            left = line[x - channels] if x >= channels else 0
            up, corner = previous[x], previous[x - channels] if x >= channels else 0
            if kind == 1:
                line[x] = (line[x] + left) & 255
            elif kind == 2:
                line[x] = (line[x] + up) & 255
            elif kind == 3:
                line[x] = (line[x] + (left + up) // 2) & 255
            else:
                guess = left + up - corner
                near = min((abs(guess - left), 0, left), (abs(guess - up), 1, up),
                           (abs(guess - corner), 2, corner))[2]
                line[x] = (line[x] + near) & 255
        lines.append(bytes(line[i] for i in range(stride) if i % channels < 3))
        previous = line
    return width, lines


PAGE_PROBE = """<script>
(() => {
  const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const drawn = () => [...document.querySelectorAll("#rows tr")];
  parent.postMessage(["listed", JSON.stringify({
    names: drawn().map(tr => tr.dataset.name),
    magnets: document.getElementById("magnets").value.split("\\n")})], "*");
  const probe = {
    inner: innerWidth, scroll: document.documentElement.scrollWidth,
    charts: [...document.querySelectorAll(".charts svg")].map(box),
    bars: [...document.querySelectorAll(".charts svg")].map(svg => [...svg.querySelectorAll("rect")].map(
      r => [Number(r.dataset.bytes), r.getBoundingClientRect().height])),
    first: drawn().slice(0, 20).map(tr => [tr.dataset.name, getComputedStyle(tr.children[3]).backgroundColor,
                                           box(tr.children[0])[2], tr.querySelectorAll("a").length]),
    labelled: [...document.querySelectorAll("#controls input, #controls select")].every(e => e.labels.length),
    buttons: [...document.querySelectorAll("th[data-key]")].every(th => th.querySelector("button")),
  };
  scrollTo(0, 3000);  // the headers stay in view (sticky) where the page itself scrolls
  probe.headerTop = box(document.querySelector('th[data-key="name"]'))[1];
  scrollTo(0, 0);
  document.querySelector('th[data-key="size"] button').click();  // what Enter on it does
  probe.sorted = [...document.querySelectorAll("th[aria-sort]")].map(th => [th.dataset.key, th.getAttribute("aria-sort")]);
  probe.bySize = drawn().slice(0, 5).map(tr => tr.dataset.name);
  parent.postMessage(["probe", JSON.stringify(probe)], "*");
  // Registered after the page's own listener: runs once the page has followed the new hash.
  addEventListener("hashchange", () => {
    parent.postMessage(["followed", JSON.stringify([location.hash, drawn().map(tr => tr.dataset.name)])], "*");
  });
  if (!location.hash.includes("list=pick")) location.hash = "list=dead&sort=size&dir=desc";
})();
</script>"""


def chromium(page: Path, fragment: str, *options: str) -> str:
    """Headless Chromium on the page: `options` say what it writes (--dump-dom, --screenshot)."""
    if not os.access("/usr/bin/chromium", os.X_OK):
        cannot_test("/usr/bin/chromium is missing: .ci/install-test-deps installs it (the "
                    "README's test command runs it)")
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            ["/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", "--hide-scrollbars", "--force-device-scale-factor=1",
             f"--user-data-dir={profile}", "--virtual-time-budget=5000", *options,
             f"{page.as_uri()}#{fragment}"],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def framed(page: Path, fragment: str, width: int, height: int, scripts: bool = True) -> Path:
    """A page showing `page` in a frame exactly `width` CSS pixels wide at its top left corner:
    headless Chromium lays a window out at least 500 pixels wide, whatever --window-size says.
    What the framed page posts to its parent lands on the frame page's <body> as data-*.
    Without `scripts`, the frame runs none (a sandbox): the page as a reader without
    JavaScript sees it."""
    frame = page.with_name(f"framed-{width}-{scripts}-{page.name}")
    frame.write_text(
        '<!DOCTYPE html><html><body style="margin:0"><iframe ' + ("" if scripts else "sandbox ")
        + 'src="'
        + html.escape(f"{page.name}#{fragment}") + f'" style="border:0;display:block;width:'
        f'{width}px;height:{height}px"></iframe><script>addEventListener("message", e => {{ '
        "document.body.dataset[e.data[0]] = e.data[1]; });</script></body></html>")
    return frame


CHART_COLOURS = {"red": (0xdd, 0x33, 0x33), "yellow": (0xdd, 0xbb, 0x00),
                 "green": (0x33, 0xaa, 0x33), "grey": (0xcc, 0xcc, 0xcc)}


@pytest.mark.parametrize("width", [1400, 400])
def test_page_in_chromium_leads_to_downloadable_red_torrents(tmp_path, width):
    generated = time.time()
    today = int(generated // 86400)
    rows, trends = dead_quarter_rows(2_000, today)
    rows = tsmd.select_report_rows(rows, "need", None, None)
    page = tmp_path / "index.html"
    text = tsmd.render_html(rows, trends, generated=generated)
    page.write_text(text)
    noscript = text[text.index("<noscript>"):text.index("</noscript>")]
    assert re.findall(r'<tr><td class="t">([^<]*)</td>', noscript) == \
        [row.name for row in rows[:100]]  # the hundred neediest, in the plan's order
    probed = tmp_path / "probed.html"
    probed.write_text(text.replace("</body>", PAGE_PROBE + "</body>"))
    window = f"--window-size={width + 100},1300"
    dom = chromium(framed(probed, "", width, 1200), "", window, "--dump-dom")
    probe = json.loads(html.unescape(re.search(r'data-probe="([^"]*)"', dom).group(1)))
    by_name = {row.name: row for row in rows}
    # The page fits the window: nothing wider than it but what scrolls within its own box.
    assert probe["inner"] == width and probe["scroll"] <= width
    # The first rows are red torrents that can be downloaded, drawn red, names in view.
    assert len(probe["first"]) == 20
    for name, colour, right, links in probe["first"]:
        row = by_name[name]
        assert tsmd.plan_group(row) == tsmd.PLAN_RED and row.seeders > 0, name
        assert colour == "rgb(251, 213, 213)" and right <= width and links >= 1
    assert probe["labelled"] and probe["buttons"]
    if width > 600:  # a phone's table scrolls sideways in its own box, its headers with it
        assert abs(probe["headerTop"]) < 1
    assert probe["sorted"] == [["size", "descending"]]
    assert [by_name[n].size_bytes for n in probe["bySize"]] == \
        sorted((r.size_bytes for r in rows), reverse=True)[:5]
    # A new fragment is followed while the page is open: the dead, largest first.
    fragment, names = json.loads(html.unescape(re.search(r'data-followed="([^"]*)"', dom).group(1)))
    dead = [r for r in rows if tsmd.plan_group(r) == tsmd.PLAN_DEAD]
    assert dict(urllib.parse.parse_qsl(fragment[1:])) == {"list": "dead", "sort": "size",
                                                           "dir": "desc"}  # kept, as the page writes it
    assert len(dead) == 500
    assert len(names) == 500 and {by_name[n].infohash for n in names} == {r.infohash for r in dead}
    assert [by_name[n].size_bytes for n in names] == sorted((r.size_bytes for r in dead),
                                                           reverse=True)
    # The pick list is `tsmd report --pick`'s, and its magnets are ready to paste; whatever
    # order the page's rows came in (here by name), the pick follows the plan's.
    by_name_page = tmp_path / "by-name.html"
    by_name_page.write_text(tsmd.render_html(tsmd.select_report_rows(rows, "name", None, None),
                                             trends, generated=generated)
                            .replace("</body>", PAGE_PROBE + "</body>"))
    dom = chromium(framed(by_name_page, "list=pick&space=20MB", width, 1200), "", window,
                   "--dump-dom")
    picked = tsmd.pick_torrents(rows, 20_000_000)
    listed = json.loads(html.unescape(re.search(r'data-listed="([^"]*)"', dom).group(1)))
    assert 10 < len(picked) < 500 and listed["names"] == [r.name for r in picked]
    assert listed["magnets"] == [r.magnet for r in picked]
    # The charts: one per collection, each bar's parts as tall as their bytes.
    assert len(probe["charts"]) == 2
    history = tsmd.band_history(rows, trends, today)
    for (collection, days), bars in zip(history.items(), probe["bars"]):
        total = sum(max(r.size_bytes, 0) for r in rows if r.collection == collection)
        scale = max(total, *(sum(day) for day in days)) / 80  # bytes a pixel: 80 px tall
        assert not any(days[17]) and all(any(day) for n, day in enumerate(days) if n != 17)
        assert len(bars) == 29 * 4  # red, yellow, green and grey each day with a run
        assert all(abs(size / scale - height) < 0.01 for size, height in bars), collection
    # What is drawn: the screenshot's chart areas hold each band's colour in the share of the
    # bytes the history gives it.
    bottom = int(max(box[3] for box in probe["charts"])) + 1
    shot = tmp_path / "shot.png"
    chromium(framed(page, "", width, bottom + 10), "", f"--window-size={width + 100},{bottom + 10}",
             f"--screenshot={shot}")
    shot_width, lines = png_pixels(shot, bottom)
    assert shot_width == width + 100
    for box, (collection, days) in zip(probe["charts"], history.items()):
        left, top, right, low = (int(v) for v in box)
        counts = dict.fromkeys(CHART_COLOURS, 0)
        for line in lines[top:low]:
            for x in range(left, right):
                pixel = tuple(line[3 * x:3 * x + 3])
                for band, colour in CHART_COLOURS.items():
                    if pixel == colour:
                        counts[band] += 1
        drawn = sum(counts[band] for band in tsmd.CHART_BANDS)
        measured = [sum(day[i] for day in days) for i in range(3)]
        for band, share in zip(tsmd.CHART_BANDS, measured):
            assert abs(counts[band] / drawn - share / sum(measured)) < 0.03, (collection, band)
    # Without JavaScript, the <noscript> table of the neediest is drawn under the charts:
    # its seeders cells are red.
    chromium(framed(page, "", width, bottom + 400, scripts=False), "",
             f"--window-size={width + 100},{bottom + 400}", f"--screenshot={shot}")
    _, lines = png_pixels(shot, bottom + 400)
    red_cells = [y for y in range(bottom, bottom + 400)
                 if bytes((251, 213, 213)) * 20 in lines[y][:3 * width]]
    assert len(red_cells) > 100


class PingAnswerer(HostileUdpPeer):
    """A DHT node on 127.0.0.1:0 that answers every query as a node would (a ping's reply)."""

    def __init__(self) -> None:
        super().__init__([])

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                data, sender = self.sock.recvfrom(65536)
                query = bencoder.bdecode(data)
            except Exception:
                continue
            self.received += 1
            self.sock.sendto(bencoder.bencode({b"t": query[b"t"], b"y": b"r",
                                               b"r": {b"id": b"n" * 20}}), sender)


def test_init_writes_the_example_and_checks_what_the_first_run_needs(tmp_path):
    assert (HERE / "config.example.toml").read_text() == tsmd.EXAMPLE_CONFIG
    router, silent = PingAnswerer(), silent_udp()
    try:
        done = cli("init", "--bootstrap", router.address, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "tsmd.toml").read_text() == tsmd.EXAMPLE_CONFIG
        assert f"database: {tmp_path / 'tsmd.sqlite3'} (folder writable)" in done.stdout
        assert "collections: 1 enabled; libgen-books" in done.stdout
        assert re.search(r"DHT: 1 of 1 routers resolve, 1 answered over UDP \(fastest \d+ ms\)",
                         done.stdout) and router.received == 1
        assert "first run (tsmd run):" in done.stdout
        done = cli("init", cwd=tmp_path)
        assert done.returncode == tsmd.ExitCode.USAGE and "--force" in done.stderr
        done = cli("init", "--force", "--bootstrap", f"127.0.0.1:{silent.getsockname()[1]}",
                   cwd=tmp_path)
        assert done.returncode == 0 and "none answered over UDP: UDP blocked?" in done.stdout
        done = cli("--config", str(tmp_path / "other.toml"), "init", "--offline", cwd=tmp_path)
        assert done.returncode == 0 and "DHT:" not in done.stdout
        assert (tmp_path / "other.toml").read_text() == tsmd.EXAMPLE_CONFIG
        assert not (tmp_path / "tsmd.sqlite3").exists()  # init checks; it creates nothing else
        # SIGTERM while the routers are asked: the file stays written, the exit says why.
        silent.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while silent.recv(2048):  # the pings of the run before
                pass
        process = start_tsmd("--config", str(tmp_path / "third.toml"), "init", "--bootstrap",
                             f"127.0.0.1:{silent.getsockname()[1]}")
        silent.settimeout(20)
        silent.recv(2048)  # this run's ping has been sent: the check is under way
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
        assert process.returncode == tsmd.ExitCode.INTERRUPTED and "Traceback" not in stderr
        assert (tmp_path / "third.toml").read_text() == tsmd.EXAMPLE_CONFIG
    finally:
        router.stop()
        silent.close()


# ---- Cron traps ----


def local_collection_config(tmp_path: Path, torrents: dict[str, bytes], extra: str = "") -> Path:
    """A config whose one collection "c" is a folder of .torrent files (synced offline)."""
    folder = tmp_path / "torrents"
    folder.mkdir(exist_ok=True)
    for name, data in torrents.items():
        (folder / name).write_bytes(data)
    return write_config(tmp_path, f'database = "tsmd.sqlite3"\n{extra}\n[[collections]]\n'
                                  f'name = "c"\nurl = "{folder.as_uri()}/"\ntype = "books"\n')


def test_a_failure_is_never_hidden_behind_an_outage_or_taken_for_one(tmp_path):
    silent = silent_udp()
    try:
        config = local_collection_config(
            tmp_path, {"r_1.torrent": v1_torrent("one", seed=1), "r_2.torrent": b"d4:junk"},
            f'[network]\nallow_private = true\noutage_after = "2s"\n[dht]\nbind = '
            f'"127.0.0.1:0"\nquery_timeout = "1s"\nstall_timeout = "0.5s"\n'
            f'bootstrap = ["127.0.0.1:{silent.getsockname()[1]}"]')
        # The DHT is unreachable (69) and a .torrent is broken (1): the run says 1.
        done = cli("--config", str(config), "run", "--skip", "scrape")
        assert done.returncode == tsmd.ExitCode.PARTIAL, done.stderr
        assert "r_2.torrent" in done.stderr and "network down?" in done.stderr
        assert "run partial" in done.stderr
        (tmp_path / "torrents" / "r_2.torrent").unlink()
        done = cli("--config", str(config), "run", "--skip", "scrape")
        assert done.returncode == tsmd.ExitCode.UNREACHABLE and "run unreachable" in done.stderr
    finally:
        silent.close()
    # A server refused by allow_private is a setting to fix, not the network being down.
    config = write_config(tmp_path, 'database = "tsmd.sqlite3"\n[[collections]]\nname = "c"\n'
                                    'url = "http://127.0.0.1:9/index.html"\ntype = "books"\n')
    done = cli("--config", str(config), "sync")
    assert done.returncode == tsmd.ExitCode.PARTIAL, done.stderr
    assert "not a public address" in done.stderr and "network down" not in done.stderr


def test_read_commands_never_create_a_database_or_publish_from_nothing(tmp_path):
    config = write_config(tmp_path, ONE_COLLECTION_CONFIG)
    for command in (["report"], ["report", "-o", "feed.json"], ["pick", "--budget", "1TB"],
                    ["status"], ["trackers"], ["prune", "--older-than", "0"]):
        done = cli("--config", str(config), *command, cwd=tmp_path)
        assert done.returncode == tsmd.ExitCode.USAGE, (command, done.stderr)
        assert "no database at" in done.stderr and "Traceback" not in done.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tsmd.toml"]
    done = cli("--db", str(tmp_path / "missing" / "dir" / "x.sqlite3"), "sync", cwd=tmp_path)
    assert done.returncode == tsmd.ExitCode.DATABASE
    assert f"database {tmp_path / 'missing' / 'dir' / 'x.sqlite3'}: the folder " \
           f"{tmp_path / 'missing' / 'dir'} does not exist" in done.stderr
    (tmp_path / "link.sqlite3").symlink_to(tmp_path / "missing" / "x.sqlite3")  # dangling
    done = cli("--db", str(tmp_path / "link.sqlite3"), "sync", cwd=tmp_path)
    assert done.returncode == tsmd.ExitCode.DATABASE
    assert f"the folder {tmp_path / 'missing'} does not exist" in done.stderr
    assert not (tmp_path / "missing").exists()
    assert not (tmp_path / "missing").exists()  # no folder made for a mistyped --db


def test_report_refuses_an_unknown_collection_and_an_empty_feed_over_a_live_one(tmp_path):
    config = local_collection_config(tmp_path, {"r_1.torrent": v1_torrent("one", seed=1)},
                                     '[report]\noutputs = [{ format = "ndjson", path = "feed.ndjson" }]')
    assert cli("--config", str(config), "run", "--skip", "dht", "--skip", "scrape").returncode == 0
    # (ndjson: its torrents are local files, which a libgen-seedtools json feed leaves out.)
    feed = tmp_path / "feed.ndjson"
    live = feed.read_text()
    assert len(live.splitlines()) == 1
    done = cli("--config", str(config), "report", "--collection", "nope")
    assert done.returncode == tsmd.ExitCode.USAGE and "no collection named 'nope'" in done.stderr
    # The listing breaks: its one torrent is replaced by a broken file, and the removal is
    # accepted. Neither run nor report publish the empty result over the live feed.
    (tmp_path / "torrents" / "r_1.torrent").unlink()
    (tmp_path / "torrents" / "r_2.torrent").write_bytes(b"d4:junk")
    done = cli("--config", str(config), "run", "--skip", "dht", "--skip", "scrape",
               "--accept-removals")
    assert done.returncode == tsmd.ExitCode.PARTIAL and "not replaced" in done.stderr
    done = cli("--config", str(config), "report", "-f", "ndjson", "--output", str(feed))
    assert done.returncode == tsmd.ExitCode.PARTIAL and "--allow-empty" in done.stderr
    assert feed.read_text() == live
    done = cli("--config", str(config), "report", "-f", "ndjson", "--output", str(feed),
               "--allow-empty")
    assert done.returncode == 0 and feed.read_text() == ""
    feed.write_text(live)  # and run's own way out, which its message names
    done = cli("--config", str(config), "run", "--skip", "dht", "--skip", "scrape")
    assert done.returncode == tsmd.ExitCode.PARTIAL and "tsmd run --allow-empty" in done.stderr
    done = cli("--config", str(config), "run", "--skip", "dht", "--skip", "scrape",
               "--allow-empty")
    assert done.returncode == 0 and feed.read_text() == ""


def test_run_stages_can_be_chosen_and_skipped(tmp_path):
    config = local_collection_config(tmp_path, {"r_1.torrent": v1_torrent("one", seed=1)},
                                     '[run]\nstages = ["sync", "report"]')
    assert cli("--config", str(config), "run").returncode == 0
    done = cli("--config", str(config), "run", "--skip", "report")
    assert done.returncode == 0, done.stderr
    db = sqlite3.connect(tmp_path / "tsmd.sqlite3")
    assert [stage for (stage,) in db.execute("SELECT stage FROM runs WHERE stage != 'run' "
                                             "ORDER BY id")] == ["sync", "report", "sync"]
    done = cli("--config", str(config), "run", "--skip", "dhtt")
    assert done.returncode == tsmd.ExitCode.USAGE and "unknown stage 'dhtt'" in done.stderr
    done = cli("--config", str(config), "run", "--skip", "sync", "--skip", "report")
    assert done.returncode == tsmd.ExitCode.USAGE and "no stage left" in done.stderr
    config.write_text(config.read_text().replace('"report"]', '"reports"]'))
    done = cli("--config", str(config), "run")
    assert done.returncode == tsmd.ExitCode.USAGE and "[run].stages" in done.stderr


def test_wait_for_the_lock_as_long_as_told(tmp_path):
    config = local_collection_config(tmp_path, {"r_1.torrent": v1_torrent("one", seed=1)})
    assert cli("--config", str(config), "sync").returncode == 0
    lock = tsmd.DatabaseLock(tmp_path / "tsmd.sqlite3")
    lock.acquire(0, "tsmd run (pid 1)")
    try:
        started = time.monotonic()
        done = cli("--config", str(config), "sync", "--wait", "2")
        assert done.returncode == tsmd.ExitCode.BUSY, done.stderr
        assert "busy after waiting 2 s" in done.stderr and time.monotonic() - started >= 2
        waiting = start_tsmd("--config", str(config), "sync", "--wait")  # as long as it takes
        time.sleep(1.5)
        assert waiting.poll() is None
    finally:
        lock.release()
    assert waiting.wait(60) == 0, waiting.stderr.read()
    done = cli("--config", str(config), "sync", "--wait", "soon")
    assert done.returncode == tsmd.ExitCode.USAGE and "--wait" in done.stderr


def test_a_torrent_that_keeps_failing_is_said_once_a_day_then_broken(tmp_path):
    config = local_collection_config(tmp_path, {"r_1.torrent": v1_torrent("one", seed=1),
                                                "r_2.torrent": b"not a torrent"})
    said, said_again = [], []
    for run_number in range(4):
        done = cli("--config", str(config), "-q", "sync")
        said.append("r_2.torrent: not a valid .torrent" in done.stderr)
        said_again.append("sync: failed again, as said in the last day: 1 (-v names them)"
                          in done.stderr)
        # The third failure in a row makes it broken: no longer in the exit code.
        expected = tsmd.ExitCode.PARTIAL if run_number < tsmd.BROKEN_AFTER - 1 else 0
        assert done.returncode == expected, (run_number, done.stderr)
    assert said == [True, False, False, False]  # once a day
    assert said_again == [False, True, False, False]  # an exit code of 1 is never unexplained
    done = cli("--config", str(config), "-v", "sync")
    assert "r_2.torrent: not a valid .torrent" in done.stderr  # -v says everything
    assert "1 broken (see tsmd status)" in done.stderr
    status = json.loads(cli("--config", str(config), "status", "--format", "json").stdout)
    assert [(b["source"].rsplit("/", 1)[-1], b["failures"]) for b in status["broken"]] == [
        ("r_2.torrent", 5)]
    table = cli("--config", str(config), "status", env={"COLUMNS": "200"})
    assert "broken: 1 entries failed 3+ syncs in a row" in table.stdout
    (tmp_path / "torrents" / "r_2.torrent").write_bytes(v1_torrent("two", seed=2))  # repaired
    assert cli("--config", str(config), "sync", "--revalidate").returncode == 0
    status = json.loads(cli("--config", str(config), "status", "--format", "json").stdout)
    assert status["broken"] == []


def test_prune_older_than_zero_keeps_everything_as_in_the_config(tmp_path):
    config = local_collection_config(tmp_path, {"r_1.torrent": v1_torrent("one", seed=1)})
    assert cli("--config", str(config), "sync").returncode == 0
    done = cli("--config", str(config), "prune", "--older-than", "0")
    assert done.returncode == 0, done.stderr
    done = cli("--config", str(config), "prune", "--older-than", "3d")
    assert done.returncode == tsmd.ExitCode.USAGE and "or 0 for all" in done.stderr


# ---- Unattended and ad hoc use: run, pick, check, prune, status ----


class LoopbackWorld:
    """A collection as a volunteer meets it, on loopback only: `count` .torrent files on an HTTP
    index whose announce URL is a real opentracker that knows their swarms, and real libtorrent
    DHT nodes on which every other torrent is announced."""

    def __init__(self, tmp_path: Path, server: CollectionServer, count: int = 12,
                 slow_entry: bool = False) -> None:
        self.tmp_path = tmp_path
        self.server = server
        names = [f"book{n}.zip" for n in range(count)]
        bare = [v1_torrent(name, 10_000 * (n + 1), seed=n) for n, name in enumerate(names)]
        self.hashes = [bytes.fromhex(lt_hashes(data)[0]) for data in bare]
        self.tracker = OpenTracker(tmp_path / "opentracker", self.hashes)
        self.dht = None
        try:
            # (seeders, leechers, completed): a dead one, dying ones, healthy ones.
            self.swarms = {h: (n % 6, n % 3, n % 6) for n, h in enumerate(self.hashes)}
            populate_opentracker(self.tracker, self.swarms)
            self.announce = f"udp://127.0.0.1:{self.tracker.udp_port}"
            self.torrents = {}
            for n, name in enumerate(names):
                data = v1_torrent(name, 10_000 * (n + 1), seed=n, trackers=[[self.announce]])
                self.torrents[f"r_{n}.torrent"] = data
                server.files[f"/world/r_{n}.torrent"] = (data, "application/x-bittorrent")
            links = list(self.torrents)
            if slow_entry:  # the server sleeps 3 s on it: a sync that takes a while
                server.files["/slow/late.torrent"] = (v1_torrent("late", seed=99),
                                                      "application/x-bittorrent")
                links.append("/slow/late.torrent")
            index_page(server, "/world/", links)
            self.dht = LibtorrentDht(12, second_octet=90)
            self.dht_swarms = {h: [((n + a) % 12, 7000 + a, a == 0) for a in range(1 + n % 3)]
                               for n, h in enumerate(self.hashes) if n % 2 == 0}
            self.dht_expected = self.dht.announce(self.dht_swarms)
        except BaseException:
            self.stop()
            raise

    def config(self, extra: str = "", dht: str = "") -> Path:
        bootstrap = ", ".join(f'"{b}"' for b in self.dht.bootstrap)
        return write_config(self.tmp_path, f"""
database = "tsmd.sqlite3"
[network]
allow_private = true
timeout = 10
connect_timeout = 3
[scrape]
bind = "127.0.0.1:0"
timeout = 1
attempts = 2
[dht]
bootstrap = [{bootstrap}]
bind = "127.0.0.1:0"
rate = 0
query_timeout = 2
{dht}
[report]
outputs = [{{ format = "json", path = "www/torrents.json" }},
           {{ format = "html", path = "www/index.html" }},
           {{ format = "prometheus", path = "metrics/tsmd.prom" }}]
{extra}
[[collections]]
name = "world"
url = "{self.server.url('/world/')}"
type = "books"
""")

    def stop(self) -> None:
        if self.dht is not None:
            self.dht.stop()
        self.tracker.stop()


@pytest.fixture
def world(tmp_path, server):
    running = LoopbackWorld(tmp_path, server)
    try:
        yield running
    finally:
        running.stop()


def cron_tsmd(*args: str) -> subprocess.CompletedProcess:
    """tsmd as cron starts it: stdin closed (not even /dev/null), no terminal, a bare env."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/")}
    command = " ".join(shlex.quote(a) for a in (sys.executable, str(HERE / "tsmd.py"), *args))
    return subprocess.run(["/bin/sh", "-c", f"exec {command} <&-"], capture_output=True,
                          text=True, timeout=180, env=env, start_new_session=True)


def test_run_end_to_end_as_cron_runs_it(world):
    config = world.config()
    done = cron_tsmd("--config", str(config), "-q", "run")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""  # -q: nothing to say when all went well
    feed = json.loads((world.tmp_path / "www" / "torrents.json").read_text())
    assert_seedtools_valid(feed)
    by_hash = {item["infohash"]: item for item in feed}
    assert len(by_hash) == len(world.hashes)
    for infohash, (seeders, leechers, completed) in world.swarms.items():
        item = by_hash[infohash.hex()]
        assert (item["seeders"], item["leechers"], item["completed"]) == (
            seeders, leechers, completed)
        expected_peers = len(world.dht_expected.get(infohash, ()))
        assert item["dht_peers"] == expected_peers
    page = (world.tmp_path / "www" / "index.html").read_text()
    assert "Content-Security-Policy" in page and "book3.zip" in page
    metrics = (world.tmp_path / "metrics" / "tsmd.prom").read_text()
    assert f'tsmd_torrents{{collection="world"}} {len(world.hashes)}' in metrics
    leftovers = [p.name for p in (world.tmp_path / "www").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # written atomically: no temporary file left behind
    status = json.loads(cli("--config", str(config), "status", "--format", "json").stdout)
    assert {stage: run["outcome"] for stage, run in status["runs"].items()} == {
        stage: "ok" for stage in tsmd.STATUS_STAGES}
    assert status["torrents"] == len(world.hashes) and status["busy"] is None
    assert status["collections"][0]["torrents"] == len(world.hashes)
    assert status["runs"]["report"]["counts"]["written"] == 3
    table = cli("--config", str(config), "status", env={"COLUMNS": "150"})
    assert table.returncode == 0 and "world" in table.stdout and "scrape" in table.stdout


def wait_for_stage(database: Path, stage: str, timeout: float = 60) -> None:
    """Until a run of `stage` is in progress in `database` (read by a second connection)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if database.exists():
            try:
                db = sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True, timeout=5)
                try:
                    if db.execute("SELECT 1 FROM runs WHERE stage = ? AND outcome = 'running'",
                                  (stage,)).fetchone():
                        return
                finally:
                    db.close()
            except sqlite3.Error:
                pass  # not created yet
        time.sleep(0.005)
    raise TimeoutError(f"no {stage} run started within {timeout} s")


def start_tsmd(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "tsmd.py"), *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_overlapping_runs_never_collide(tmp_path, server):
    server.slow_seconds = 8  # the first run holds the lock that long at least
    world = LoopbackWorld(tmp_path, server, count=4, slow_entry=True)
    try:
        config = world.config()
        database = tmp_path / "tsmd.sqlite3"
        first = start_tsmd("--config", str(config), "run")
        try:
            wait_for_stage(database, "sync")
            second = cli("--config", str(config), "run")
            assert second.returncode == tsmd.ExitCode.BUSY == 75
            assert "is busy: tsmd run (pid" in second.stderr and "--wait" in second.stderr
            scrape = cli("--config", str(config), "scrape")  # any writer waits its turn
            assert scrape.returncode == tsmd.ExitCode.BUSY
            waiting = start_tsmd("--config", str(config), "run", "--wait")
            assert first.wait(120) == tsmd.ExitCode.OK, first.stderr.read()
            assert waiting.wait(120) == tsmd.ExitCode.OK, waiting.stderr.read()
        finally:
            first.kill()
            first.wait()
        db = sqlite3.connect(database)
        runs = db.execute("SELECT started, finished, outcome FROM runs WHERE stage = 'run' "
                          "ORDER BY id").fetchall()
        assert [outcome for _, _, outcome in runs] == ["ok", "ok"]
        assert runs[1][0] >= runs[0][1]  # the waiting run started when the first had ended
        # The busy commands never opened the database: no run of theirs was recorded.
        assert db.execute("SELECT count(*) FROM runs WHERE stage = 'scrape'").fetchone()[0] == 2
    finally:
        world.stop()


@pytest.mark.parametrize("stage", ["sync", "dht", "scrape"])
def test_sigkill_in_any_stage_loses_nothing_and_the_next_run_continues(tmp_path, server, stage):
    world = LoopbackWorld(tmp_path, server, count=12, slow_entry=stage == "sync")
    try:
        # Slow enough to be caught in the middle: a sync waits 3 s for one file, the DHT
        # stage sends 10 packets a second, the scrape waits 2 s for a silent tracker.
        silent = silent_udp()
        config = world.config(dht="concurrency = 2")
        text = config.read_text()
        if stage == "dht":
            text = text.replace("rate = 0\n", "rate = 10\n")
        config.write_text(text)
        database = tmp_path / "tsmd.sqlite3"
        tables = ("torrents", "tracker_samples", "dht_samples")
        before = dict.fromkeys(tables, 0)
        if stage != "sync":  # earlier measurements that must survive
            assert cli("--config", str(config), "run").returncode == 0
            db = sqlite3.connect(database)
            before = {table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                      for table in tables}
            db.close()
        if stage == "scrape":  # new to this run, so not backing off from an earlier failure
            config.write_text(text.replace("[scrape]\n", "[scrape]\ntrackers = "
                                           f'["udp://127.0.0.1:{silent.getsockname()[1]}"]\n'))
        process = start_tsmd("--config", str(config), "run")
        wait_for_stage(database, stage)
        time.sleep(0.2)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        db = sqlite3.connect(database)
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        killed = {table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                  for table in before}
        assert all(killed[table] >= before[table] for table in before)
        db.close()
        config.write_text(text)  # without the silent tracker: an all-ok run
        silent.close()
        done = cli("--config", str(config), "run")
        assert done.returncode == 0, done.stderr
        db = sqlite3.connect(database)
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        after = {table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                 for table in before}
        assert all(after[table] > killed[table] or table == "torrents" for table in before)
        assert after["torrents"] == len(world.hashes) + (stage == "sync")
        outcomes = dict(db.execute("SELECT stage, outcome FROM runs WHERE id IN "
                                   "(SELECT max(id) FROM runs GROUP BY stage)"))
        assert outcomes == {s: "ok" for s in tsmd.STATUS_STAGES}
        # The killed run and its stage were closed as interrupted by the next run.
        killed_runs = db.execute("SELECT stage FROM runs WHERE outcome = 'interrupted' "
                                 "ORDER BY id").fetchall()
        assert killed_runs == [("run",), (stage,)]
        assert db.execute("SELECT count(*) FROM runs WHERE stage = 'scrape' AND "
                          "summarized IS NULL").fetchone()[0] == 0  # every scrape run folded
        feed = json.loads((tmp_path / "www" / "torrents.json").read_text())
        assert len(feed) == len(world.hashes) + (stage == "sync")
    finally:
        world.stop()


def pick_rows(count: int, seeders: Callable[[int], int] = lambda n: -1 if n % 13 == 0 else n % 25) -> list:
    rows = []
    for n in range(count):
        infohash = f"{n:040x}"
        rows.append(tsmd.ReportRow(
            infohash=infohash, name=f"r_{n}", torrent_name=None, link=f"http://x/r_{n}.torrent",
            magnet=tsmd.magnet_uri(infohash), collection="c", type="books",
            size_bytes=-1 if n % 17 == 0 else 1_000 * (1 + n % 7), file_count=1,
            created_unix=1, seeders=seeders(n), leechers=n % 3,
            completed=0, scraped_date=1, tracker=None, trackers_answered=1, dht_peers=-1, dht_scraped=-1,
            dht_seeds_estimate=-1, dht_peers_estimate=-1))
    return tsmd.add_health(rows, {})


def test_pick_fills_the_budget_neediest_first_with_a_bounded_spread():
    rows = pick_rows(400)
    # Downloadable red and yellow only: never a dead one (0 seeders), nor green, nor one that
    # cannot be weighed.
    weighable = [r for r in rows if plan_place(r) < 2 and r.size_bytes > 0]
    assert any(plan_place(r) == 4 for r in rows) and any(plan_place(r) == 2 for r in rows)
    for budget in (50_000, 400_000):
        exact = tsmd.pick_torrents(rows, budget, 0.0, random.Random(1))
        assert sum(r.size_bytes for r in exact) <= budget
        assert all(r in weighable for r in exact)
        # No spread: greedy in the plan's order (red, then yellow; within each, by need;
        # equal needs in random order), and nothing needier left out that would have fitted.
        keys = [(plan_place(r), r.need) for r in exact]
        assert keys == sorted(keys)
        left = budget - sum(r.size_bytes for r in exact)
        assert not [r for r in weighable if r not in exact and (plan_place(r), r.need) < keys[-1]
                    and r.size_bytes <= left]
    assert {plan_place(r) for r in exact} == {0, 1}  # the big budget reached yellow
    # Many torrents of similar need (5 to 7 seeders): the spread reorders them.
    rows = pick_rows(400, seeders=lambda n: 5 + n % 3)
    weighable = [r for r in rows if r.need is not None and r.size_bytes > 0]
    picks = [tsmd.pick_torrents(rows, 50_000, 0.2, random.Random(seed)) for seed in range(8)]
    for chosen in picks:
        assert sum(r.size_bytes for r in chosen) <= 50_000
        # ±20 %: a torrent never jumps ahead of one needing it more than 1.5 times as much.
        worst_picked = max(r.need for r in chosen)
        assert all(r in chosen or r.size_bytes > 50_000 - sum(c.size_bytes for c in chosen)
                   for r in weighable if r.need < worst_picked / 1.5 * 0.999)
    # Volunteers spread out: the lists differ, and each is nearly as needy as the exact one.
    sets = [{r.infohash for r in chosen} for chosen in picks]
    assert len({frozenset(s) for s in sets}) == len(sets)
    best = tsmd.pick_torrents(rows, 50_000, 0.0, random.Random(1))
    for chosen in picks:
        assert max(r.need for r in chosen) <= 1.5 * max(r.need for r in best)
    assert tsmd.pick_torrents(rows, 0, 0.2, random.Random(1)) == []


def test_cli_pick_formats(tmp_path):
    config, hashes = history_config(tmp_path)
    done = cli("--config", str(config), "pick", "--budget", "5kB", "--format", "json",
               "--seed", "3", "--spread", "0")
    assert done.returncode == 0, done.stderr
    picked = json.loads(done.stdout)
    # history_db: falling (yellow, 1 kB) is picked; dying is dead now (0 seeders: nobody can
    # download it), rescued is green, and the never-measured torrent cannot be weighed.
    assert [item["infohash"] for item in picked] == [hashes[0].hex()]
    assert "picked 1 torrent, 1.0 kB of 5.0 kB; 1 dead torrent (no seeder anywhere: nobody " \
           "can download them) left out; 1 torrent not measured yet" in done.stderr
    done = cli("--config", str(config), "pick", "-b", "1TB", "--include-green")
    assert done.returncode == 0 and all(line.startswith("magnet:?xt=urn:btih:")
                                        for line in done.stdout.splitlines())
    # Yellow before green, whatever their scores.
    assert [line.split("&")[0] for line in done.stdout.splitlines()] == [
        f"magnet:?xt=urn:btih:{h.hex()}" for h in (hashes[0], hashes[2])]
    for options, expected in ((["--min-seeders", "10"], [2]), (["--max-seeders", "9"], [0]),
                              (["--exclude-collection", "c"], [])):
        done = cli("--config", str(config), "pick", "-b", "1TB", "--include-green", "-f", "json",
                   *options)
        assert [item["infohash"] for item in json.loads(done.stdout)] == \
            [hashes[n].hex() for n in expected], options
    done = cli("--config", str(config), "pick", "-b", "1TB", "-f", "urls")
    assert sorted(done.stdout.splitlines())[0].startswith(("http", "magnet:"))
    done = cli("--config", str(config), "pick", "--budget", "lots")
    assert done.returncode == tsmd.ExitCode.USAGE and "--budget" in done.stderr
    done = cli("--config", str(config), "pick", "--budget", "10B")
    assert done.returncode == tsmd.ExitCode.PARTIAL and "nothing picked" in done.stderr


def test_rss_feed_is_the_pick_a_client_can_subscribe_to():
    import xml.etree.ElementTree as ElementTree

    rows = tsmd.select_report_rows(pick_rows(400), "need", None, None)
    hostile = dataclasses.replace(rows[0], name="a\x00b\x1b]]><item>\ud800 2",
                                  collection="c & <d>", link="http://x/?a=1&b=<2>")
    rows = [hostile, *rows[1:]]
    picked = tsmd.pick_torrents(rows, 50_000)
    # The published pick has no spread: the same list every run, in the plan's own order.
    assert picked == tsmd.pick_torrents(rows, 50_000) == tsmd.pick_torrents(list(rows), 50_000)
    assert [plan_place(r) for r in picked] == sorted(plan_place(r) for r in picked)
    assert picked[0] is hostile and all(plan_place(r) < 2 for r in picked)
    text = "".join(tsmd.rss_chunks(picked, 50_000, generated=86400 * 20_000, rows_per_chunk=7))
    channel = ElementTree.fromstring(text.encode()).find("channel")
    assert "up to 50.0 kB" in channel.findtext("title")
    assert channel.findtext("lastBuildDate") == "Fri, 04 Oct 2024 00:00:00 GMT"
    items = channel.findall("item")
    assert len(items) == len(picked)
    torrent = "{%s}" % tsmd.TORRENT_NAMESPACE
    for item, row in zip(items, picked):
        enclosure = item.find("enclosure")
        assert enclosure.get("type") == "application/x-bittorrent"
        assert enclosure.get("url") == item.findtext("link") == row.link
        assert item.findtext("guid") == item.findtext(torrent + "infoHash") == row.infohash
        assert item.findtext(torrent + "magnetURI") == row.magnet
        assert item.findtext(torrent + "contentLength") == str(row.size_bytes)
    # What XML cannot hold became U+FFFD; the rest is escaped, not parsed.
    assert items[0].findtext("title") == "a\ufffdb\ufffd]]><item>\ufffd 2"
    assert items[0].findtext("category") == "c & <d>"
    empty = ElementTree.fromstring("".join(tsmd.rss_chunks([], 10)).encode())
    assert empty.find("channel").findall("item") == []


def test_cli_report_pick_publishes_the_list_in_every_format(tmp_path):
    config, hashes = history_config(tmp_path)
    # history_db: falling (yellow, 1 kB) is the only downloadable torrent that is not green.
    done = cli("--config", str(config), "report", "-f", "ndjson", "--pick", "1TB")
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["infohash"] for line in done.stdout.splitlines()] == [hashes[0].hex()]
    feed = tmp_path / "seed.xml"
    done = cli("--config", str(config), "report", "-f", "rss", "--pick", "1TB", "-o", str(feed))
    assert done.returncode == 0, done.stderr
    assert feed.read_text().count("<item>") == 1 and hashes[0].hex() in feed.read_text()
    done = cli("--config", str(config), "report", "-f", "rss")
    assert done.returncode == tsmd.ExitCode.USAGE and "--pick SIZE" in done.stderr
    for bad in ("plenty", "0", "9" * 400):
        done = cli("--config", str(config), "report", "-f", "json", "--pick", bad)
        assert done.returncode == tsmd.ExitCode.USAGE and "--pick: " in done.stderr, bad
    # Without a pick, a filter that leaves nothing does not replace a report of torrents.
    listing = tmp_path / "all.csv"
    assert cli("--config", str(config), "report", "-f", "csv", "-o", str(listing)).returncode == 0
    done = cli("--config", str(config), "report", "-f", "csv", "--limit", "0", "-o", str(listing))
    assert done.returncode == tsmd.ExitCode.PARTIAL and len(listing.read_text().splitlines()) == 5
    # Nothing fits: an empty pick is news, and replaces the feed without --allow-empty.
    done = cli("--config", str(config), "report", "-f", "rss", "--pick", "10B", "-o", str(feed))
    assert done.returncode == 0, done.stderr
    assert "<item>" not in feed.read_text()
    # [report] outputs: an rss output without a pick is refused when the config is read.
    bad = write_config(tmp_path, ONE_COLLECTION_CONFIG.replace(
        "[[collections]]", '[report]\noutputs = [{format = "rss", path = "f.xml"}]\n'
        "[[collections]]"))
    done = cli("--config", str(bad), "report", "-f", "csv")
    assert done.returncode == tsmd.ExitCode.USAGE and "needs a pick" in done.stderr
    good = write_config(tmp_path, ONE_COLLECTION_CONFIG.replace(
        "[[collections]]", '[report]\noutputs = [{format = "rss", path = "f.xml", pick = "1TB"},'
        ' {format = "ndjson", path = "all.ndjson"}]\n[[collections]]'))
    done = cli("--config", str(good), "run", "--skip", "sync", "--skip", "dht",
               "--skip", "scrape", "--skip", "prune")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "f.xml").read_text().count("<item>") == 1
    assert len((tmp_path / "all.ndjson").read_text().splitlines()) == 4


def test_check_measures_one_torrent_given_in_any_form(world, tmp_path):
    config = world.config()
    n = 4  # announced in the DHT by two nodes, and on the tracker: 4 seeders, 1 leecher
    infohash = world.hashes[n]
    path = tmp_path / "one.torrent"
    path.write_bytes(world.torrents[f"r_{n}.torrent"])
    targets = [tsmd.magnet_uri(infohash.hex(), "book4", [world.announce]), str(path),
               world.server.url(f"/world/r_{n}.torrent"), path.as_uri()]
    for target in targets:
        done = cli("--config", str(config), "check", target, "--format", "json")
        assert done.returncode == 0, (target, done.stderr)
        result = json.loads(done.stdout)
        assert result["infohash"] == infohash.hex()
        assert (result["seeders"], result["leechers"]) == world.swarms[infohash][:2]
        assert result["trackers"][0]["url"] == world.announce
        assert result["trackers"][0]["completed"] == world.swarms[infohash][2]
        assert result["dht_peers"] == len(world.dht_expected[infohash])
        assert result["band"] == "yellow"
    # A bare infohash names no tracker: the DHT alone, or the trackers asked for.
    done = cli("--config", str(config), "check", infohash.hex(), "-f", "json")
    result = json.loads(done.stdout)
    assert done.returncode == 0 and result["trackers"] == [] and result["dht_peers"] == 2
    done = cli("--config", str(config), "check", infohash.hex(), "--tracker", world.announce,
               "--no-dht", env={"COLUMNS": "160"})
    assert done.returncode == 0 and world.announce in done.stdout and "yellow" in done.stdout
    # A torrent the tracker never saw: it answers zeros, which is a measurement.
    unknown = hashlib.sha1(b"nobody has this").hexdigest()
    done = cli("--config", str(config), "check", unknown, "--no-dht", "--tracker",
               world.announce, "-f", "json")
    assert done.returncode == 0 and json.loads(done.stdout)["seeders"] == 0
    # Not measurable at all: nothing answers, said so, exit 1; nonsense is a usage error.
    with silent_udp() as silent:
        quiet_tracker = f"udp://127.0.0.1:{silent.getsockname()[1]}/announce"
        done = cli("--config", str(config), "check", unknown, "--no-dht", "--tracker",
                   quiet_tracker, "-f", "json")
    assert done.returncode == tsmd.ExitCode.PARTIAL and "no tracker" in done.stderr
    assert json.loads(done.stdout)["trackers"][0]["error"]
    for bad in ("not-a-target", "magnet:?xt=urn:btih:zz", str(tmp_path / "missing.torrent"),
                "", " ", "http://", "https:///x.torrent", str(tmp_path)):
        done = cli("--config", str(config), "check", bad)
        assert done.returncode == tsmd.ExitCode.USAGE and "check:" in done.stderr, bad
    # Once synced, a bare infohash is checked with what the .torrent said: name, size and
    # trackers; the database is only read.
    assert cli("--config", str(config), "sync").returncode == 0
    def database_files() -> dict[str, bytes]:  # with its -wal: where a write would land first
        return {path.name: path.read_bytes() for path in tmp_path.glob("tsmd.sqlite3*")}

    before = database_files()
    assert "tsmd.sqlite3" in before
    done = cli("--config", str(config), "check", infohash.hex(), "--no-dht", "-f", "json")
    result = json.loads(done.stdout)
    assert done.returncode == 0, done.stderr
    assert (result["name"], result["size_bytes"]) == ("book4.zip", 50_000)
    assert [t["url"] for t in result["trackers"]] == [world.announce]
    assert (result["seeders"], result["leechers"]) == world.swarms[infohash][:2]
    after = database_files()
    # SQLite's reader leaves its shared-memory index (-shm) and an empty -wal behind; a write
    # would land in that -wal first.
    assert after.pop("tsmd.sqlite3-wal", b"") == b""
    after.pop("tsmd.sqlite3-shm", None)
    assert after == before
    (tmp_path / "junk.torrent").write_bytes(b"d4:infoi3e" * 10)
    done = cli("--config", str(config), "check", str(tmp_path / "junk.torrent"))
    assert done.returncode == tsmd.ExitCode.USAGE and "Traceback" not in done.stderr


def test_prune_keeps_what_it_should(tmp_path):
    db, hashes = history_db(tmp_path)
    now = int(time.time())
    with tsmd.Transaction(db):
        old_run = db.execute("INSERT INTO runs (stage, started, finished, outcome) VALUES "
                             "('scrape', ?, ?, 'ok')", (now - 100 * 86400, now - 100 * 86400 + 60)
                             ).lastrowid
        db.execute(INSERT_SAMPLES + "(1, 1, ?, ?, 50, 1, 1)",
                   (old_run, now - 100 * 86400 + 30))
        db.execute("INSERT INTO dht_samples VALUES (1, NULL, ?, 5, NULL, NULL, 8)",
                   (now - 100 * 86400,))
        db.execute("INSERT INTO dht_samples VALUES (2, NULL, ?, 7, NULL, NULL, 8)",
                   (now - 100 * 86400,))
        db.executemany("INSERT INTO dht_nodes VALUES (?, ?, 6881, ?, 0)",
                       [(b"a" * 20, "127.0.0.9", now - 40 * 86400), (b"b" * 20, "127.0.0.8", now)])
        db.executemany("INSERT INTO dht_silent_nodes VALUES (?, 6881, 1, ?)",
                       [("127.0.0.7", now - 40 * 86400), ("127.0.0.6", now - 86400)])
        # Peers found long ago and lately; an old probe sample and a recent one.
        db.executemany("INSERT INTO swarm_peers VALUES (1, ?, 6881, ?)",
                       [("127.0.0.5", now - 40 * 86400), ("127.0.0.4", now - 3600)])
        db.executemany("INSERT INTO probe_samples VALUES (?, NULL, ?, 3, 2, 2, 1, 1.5, 0, 0, 0)",
                       [(1, now - 40 * 86400), (2, now - 40 * 86400), (2, now - 3600)])
    before_rows = {row.infohash: row for row in tsmd.load_report_rows(db)}
    samples_before = db.execute("SELECT count(*) FROM tracker_samples").fetchone()[0]
    db.close()
    config = write_config(tmp_path, ONE_COLLECTION_CONFIG)
    done = cli("--config", str(config), "prune", "--older-than", "2d")
    assert done.returncode == tsmd.ExitCode.USAGE and "at least 8 days" in done.stderr
    done = cli("--config", str(config), "prune", "--older-than", "30d", "--vacuum")
    assert done.returncode == 0, done.stderr
    assert ("1 tracker samples, 2 DHT samples, 2 probe samples, 1 peer addresses, 1 DHT nodes "
            "and 1 runs deleted") in done.stderr
    db = tsmd.open_database(tmp_path / "tsmd.sqlite3")
    assert db.execute("SELECT count(*) FROM tracker_samples").fetchone()[0] == samples_before - 1
    assert db.execute("SELECT count(*) FROM tracker_samples WHERE measured < ?",
                      (now - 30 * 86400,)).fetchone()[0] == 0
    assert [row[0] for row in db.execute("SELECT host FROM dht_nodes")] == ["127.0.0.8"]
    assert [row[0] for row in db.execute("SELECT host FROM dht_silent_nodes")] == ["127.0.0.6"]
    assert db.execute("SELECT count(*) FROM dht_latest").fetchone()[0] == 0
    assert [row[0] for row in db.execute("SELECT host FROM swarm_peers")] == ["127.0.0.4"]
    assert db.execute("SELECT torrent_id, measured FROM probe_latest").fetchall() == [
        (2, now - 3600)]
    assert db.execute("SELECT count(*) FROM runs WHERE id = ?", (old_run,)).fetchone()[0] == 0
    # The last month is untouched: the same report, changes and trends included.
    after_rows = {row.infohash: row for row in tsmd.load_report_rows(db)}
    assert {h: tsmd.dataclasses.replace(r, dht_peers=-1, dht_scraped=-1)
            for h, r in before_rows.items()} == after_rows
    status = json.loads(cli("--config", str(config), "status", "--format", "json").stdout)
    assert status["runs"]["prune"]["outcome"] == "ok"
    assert status["runs"]["prune"]["counts"]["tracker_samples"] == 1


def test_run_refuses_a_damaged_database_with_a_message(tmp_path):
    config = write_config(tmp_path, ONE_COLLECTION_CONFIG)
    (tmp_path / "tsmd.sqlite3").write_bytes(b"this is not SQLite " * 300)
    done = cron_tsmd("--config", str(config), "-q", "run")
    assert done.returncode == tsmd.ExitCode.DATABASE, done.stderr
    assert "tsmd.sqlite3" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "tsmd.sqlite3").read_bytes() == b"this is not SQLite " * 300
    done = cli("--config", str(config), "status")
    assert done.returncode == tsmd.ExitCode.DATABASE and "Traceback" not in done.stderr


def run_privileged(command: list[str], what: str) -> None:
    """Run a command that needs root (mount, unshare), or skip the test: see cannot_test."""
    if os.geteuid() != 0:
        cannot_test(f"{what} needs root (the README's test command runs as root)")
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        cannot_test(f"{what} failed here: {' '.join(command)}: {done.stderr.strip()}")


def storage_fault_world(tmp_path: Path, database: Path, torrents: int) -> Path:
    """A config whose one collection is a local folder of `torrents` torrents of 20 trackers."""
    folder = tmp_path / "torrents"
    folder.mkdir(exist_ok=True)
    for n in range(torrents):
        (folder / f"r_{n}.torrent").write_bytes(v1_torrent(
            f"t{n}", seed=n, trackers=[[f"udp://t{n}-{k}.example:1/a"] for k in range(20)]))
    config = tmp_path / "faults.toml"
    config.write_text(f'database = "{database}"\n[[collections]]\nname = "c"\n'
                      f'url = "{folder.as_uri()}/"\ntype = "books"\n')
    config.chmod(0o644)
    return config


def integrity_and_counts(database: Path) -> tuple:
    db = sqlite3.connect(database)
    try:
        return (db.execute("PRAGMA integrity_check").fetchone()[0],
                db.execute("SELECT count(*) FROM torrents").fetchone()[0])
    finally:
        db.close()


def test_a_full_disk_ends_a_stage_with_exit_3_and_the_next_run_completes(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    run_privileged(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
                   "mounting a small tmpfs")
    try:
        database = disk / "tsmd.sqlite3"
        config = storage_fault_world(tmp_path, database, 400)
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (2300 * 1024))  # leaves about 700 KiB
        done = cli("--config", str(config), "sync")
        assert done.returncode == tsmd.ExitCode.DATABASE, done.stderr
        assert "database or disk is full" in done.stderr and "Traceback" not in done.stderr
        assert integrity_and_counts(database)[0] == "ok"
        filler.unlink()  # space is back
        done = cli("--config", str(config), "sync")
        assert done.returncode == 0, done.stderr
        assert integrity_and_counts(database) == ("ok", 400)
        db = sqlite3.connect(database)
        assert db.execute("SELECT outcome FROM runs ORDER BY id").fetchall() == [
            ("failed",), ("ok",)]
        db.close()
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_read_only_database_file_ends_a_stage_with_exit_3(tmp_path):
    database = tmp_path / "tsmd.sqlite3"
    config = storage_fault_world(tmp_path, database, 3)
    assert cli("--config", str(config), "sync").returncode == 0
    (tmp_path / "torrents" / "r_3.torrent").write_bytes(v1_torrent("new", seed=9))
    database.chmod(0o444)
    # Root may write any file: as root, tsmd runs without the capabilities that allow that.
    unprivileged = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            cannot_test("setpriv (util-linux) is missing: apt-get install util-linux")
        unprivileged = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]
    try:
        done = subprocess.run([*unprivileged, sys.executable, str(HERE / "tsmd.py"), "--config",
                               str(config), "sync"], capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
    finally:
        database.chmod(0o644)
    assert done.returncode == tsmd.ExitCode.DATABASE, done.stderr
    assert "readonly database" in done.stderr and "Traceback" not in done.stderr
    assert integrity_and_counts(database) == ("ok", 3)


@pytest.mark.parametrize("command", [["sync", "--revalidate"], ["status"], ["run"],
                                     ["report", "--format", "csv"]])
def test_a_damaged_page_ends_any_command_with_exit_3(tmp_path, command):
    database = tmp_path / "tsmd.sqlite3"
    config = storage_fault_world(tmp_path, database, 5)
    assert cli("--config", str(config), "sync").returncode == 0
    db = sqlite3.connect(database)
    pages = [page for (page,) in db.execute(
        "SELECT rootpage FROM sqlite_master WHERE name IN ('torrents', 'memberships')")]
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    with database.open("r+b") as file:
        for page in pages:
            file.seek((page - 1) * page_size)
            file.write(b"\xff" * 200)
    done = cli("--config", str(config), *command)
    assert done.returncode == tsmd.ExitCode.DATABASE, done.stderr
    assert "database disk image is malformed" in done.stderr and "Traceback" not in done.stderr


def test_status_tells_a_run_whose_tsmd_died_from_one_that_runs(tmp_path):
    config = write_config(tmp_path, ONE_COLLECTION_CONFIG)
    database = tmp_path / "tsmd.sqlite3"
    db = tsmd.open_database(database)
    tsmd.start_run(db, "sync")  # as a tsmd killed in its sync leaves it
    db.close()

    def outcome() -> str:
        done = cli("--config", str(config), "status", "--format", "json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)["runs"]["sync"]["outcome"]

    assert outcome() == "interrupted"  # the lock is free: its tsmd is gone
    lock = tsmd.DatabaseLock(database)
    lock.acquire(False, "tsmd sync (pid 1)")
    try:
        assert outcome() == "running"
    finally:
        lock.release()
    db = sqlite3.connect(database)
    assert db.execute("SELECT outcome FROM runs").fetchone() == ("running",)  # status only reads


def test_database_lock_is_one_per_database_and_patient_for_a_moment(tmp_path):
    database = tmp_path / "tsmd.sqlite3"
    (tmp_path / "link.sqlite3").symlink_to(database)
    first = tsmd.DatabaseLock(database)
    assert tsmd.DatabaseLock(tmp_path / "link.sqlite3").path == first.path  # one lock file
    first.acquire(wait=False, holder="tsmd run")
    try:
        assert "tsmd run (pid" in tsmd.DatabaseLock(database).held_by()
        with pytest.raises(tsmd.BusyError, match="is busy: tsmd run"):
            tsmd.DatabaseLock(tmp_path / "link.sqlite3").acquire(wait=False, holder="tsmd dht")
        # Held for an instant only (as `tsmd status` does): the next writer still gets it.
        threading.Timer(0.2, first.release).start()
        second = tsmd.DatabaseLock(database)
        second.acquire(wait=False, holder="tsmd scrape")
        assert "tsmd scrape" in first.path.read_text()
        second.release()
    finally:
        first.release()
    assert tsmd.DatabaseLock(database).held_by() is None


def test_an_interrupted_report_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "feed.json"
    target.write_text("the previous feed")

    def chunks():
        yield "[\n"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tsmd.write_atomically(target, chunks())
    assert [p.name for p in tmp_path.iterdir()] == ["feed.json"]
    assert target.read_text() == "the previous feed"
