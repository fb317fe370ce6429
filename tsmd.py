# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "typer>=0.12,<0.29",
#     "rich>=13",
#     "trio>=0.25",
#     "h11>=0.14",
#     "bencoder.pyx>=3.0",
#     "trio-websocket>=0.12",
#     "tomli>=2.0; python_version < '3.11'",
# ]
# ///
"""tsmd, the Torrent Swarm Monitoring Daemon.

tsmd keeps a SQLite database of torrent collections (book and paper archives, data sets shared as
thousands of torrents), measures every torrent's swarm and publishes the result ranked by need.
Each subcommand performs one stage of the pipeline so that cron can run them one by one:

    tsmd sync      fetch the collections' index pages and .torrent files into the database
    tsmd dht       count every torrent's peers in the BitTorrent DHT (BEP 5, BEP 33 estimates)
    tsmd scrape    ask every tracker of every torrent for seeders, leechers, completed
    tsmd trackers  list the trackers with their health
    tsmd report    publish which torrents need seeders (JSON for libgen-seedtools, HTML,
                   a terminal table, CSV, NDJSON, Prometheus)
    tsmd run       all of the above in order, for cron: one run per database at a time
    tsmd pick      a list of the neediest torrents that fills a volunteer's disk
    tsmd check     measure one torrent now (magnet, infohash, .torrent file or URL)
    tsmd prune     drop samples and DHT nodes older than a given age
    tsmd status    collections, torrents, the last run of each stage, database size

The file reads top to bottom: constants, errors, data model, pure codecs (bencode and metainfo,
index pages, KRPC, BEP 33 filters, BEP 15/48), then I/O (UDP endpoint, HTTP fetch, DHT survey,
tracker scrape, storage), configuration, the stages, reports and last the command line.
"""

from __future__ import annotations

import contextlib
import copy
import bisect
from array import array
import dataclasses
import enum
import errno
import functools
import gc
import heapq
import importlib.util
import ipaddress
import json
import math
import operator
import os
import re
import socket
import struct
import sys
import time
from stat import S_ISREG
import urllib.parse
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, NamedTuple, Optional, Protocol

if sys.version_info < (3, 11):  # pragma: no cover - exercised on 3.10 only
    from exceptiongroup import BaseExceptionGroup  # trio's own dependency before 3.11

import bencoder


def _import_lazily(name: str) -> Any:
    """The module `name`, executed on first use (importlib's LazyLoader). Reports, status and
    pick never touch the network: importing trio and h11 would be a tenth of a report's time."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


if TYPE_CHECKING:
    import base64
    import hashlib
    import html
    import random
    import sqlite3
    import tomllib

    import h11
    import rich.console as rich_console
    import trio
    import trio_websocket
    import typer
    from rich.console import Console
    from rich.progress import Progress
else:
    # What a command does not need is not imported: `tsmd --version` loads almost nothing.
    base64, hashlib, html, random, sqlite3 = map(
        _import_lazily, ("base64", "hashlib", "html", "random", "sqlite3"))
    tomllib = _import_lazily("tomllib" if sys.version_info >= (3, 11) else "tomli")
    h11 = _import_lazily("h11")
    trio = _import_lazily("trio")
    typer = _import_lazily("typer")  # the command line is built on first use: LazyCli
    # rich draws tables and progress bars on a terminal; cron and pipes get plain lines.
    rich_console = _import_lazily("rich.console")


def escape_markup(text: str) -> str:
    from rich.markup import escape

    return escape(text)

__version__: Final = "0.1.0"

# ---- Constants ----

# bencoder.pyx recurses in C and kills the interpreter near 50,000 nesting levels; real metainfo
# needs fewer than 10 (a v2 `file tree` adds one level per directory), so 500 is generous.
MAX_BENCODE_DEPTH: Final = 500
DEFAULT_USER_AGENT: Final = f"tsmd/{__version__} (+https://github.com/tsmd/tsmd)"
HTTP_SCHEMES: Final = frozenset({"http", "https"})
WEBSOCKET_SCHEMES: Final = frozenset({"ws", "wss"})  # WebTorrent trackers (RFC 6455 URIs)
TRACKER_SCHEMES: Final = frozenset({"http", "https", "udp"}) | WEBSOCKET_SCHEMES
# The port a URL without one means (RFC 9110 for http(s), RFC 6455 §3 for ws(s)).
DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}
SHA1_HEX_LEN: Final = 40
SYNC_WRITE_BATCH: Final = 200  # rows per transaction: one fsync per batch, not per torrent
BROKEN_AFTER: Final = 3  # syncs in a row an entry fails before it counts as broken
DECODE_IN_THREAD_BYTES: Final = 1 << 20  # larger .torrent files are decoded off the event loop
PROGRESS_REFRESH_PER_SECOND: Final = 4
MAX_URL_IN_MESSAGE: Final = 160  # characters of a URL quoted in an error message


class ExitCode(enum.IntEnum):
    """Process exit codes, documented in the README for cron users."""

    OK = 0
    PARTIAL = 1  # the run finished, but some items (pages, torrents) failed
    USAGE = 2  # bad command line or configuration
    DATABASE = 3  # the database could not be opened or written, or is newer than this program
    UNREACHABLE = 69  # the network answered nothing: down, or firewalled (EX_UNAVAILABLE)
    BUSY = 75  # another tsmd is writing to this database (sysexits' EX_TEMPFAIL: try later)
    INTERRUPTED = 130  # Ctrl-C or SIGTERM; what was measured so far is committed

    @property
    def severity(self) -> int:
        """Rank in `tsmd run`'s worst code: a failure (1, 2, 3) outranks an outage (69), which
        clears by itself, so that a host whose DHT is blocked still reports a broken sync."""
        return _EXIT_SEVERITY.index(self)


_EXIT_SEVERITY: Final = (ExitCode.OK, ExitCode.UNREACHABLE, ExitCode.PARTIAL, ExitCode.USAGE,
                         ExitCode.DATABASE, ExitCode.BUSY, ExitCode.INTERRUPTED)


# ---- Errors ----


class TsmdError(Exception):
    """Root of every error tsmd reports as one line on stderr."""

    exit_code: ExitCode = ExitCode.PARTIAL
    outcome: str = "failed"  # what the run of a stage that raised it is recorded as


class ProtocolError(TsmdError):
    """Untrusted bytes (a file, a packet, a page) did not parse. Raised only by `*_untrusted`."""


class NotAScrapeReply(ProtocolError):
    """A well-formed WebSocket tracker message that answers something else (an announce's offer,
    say): a WebSocket carries no transaction id, so the reader skips it and waits on."""


class WrongTorrentError(ProtocolError):
    """A well-formed peer handshake for another infohash than the one asked for."""


class FetchError(TsmdError):
    """A URL could not be fetched: refused by policy, network failure, HTTP error, too large."""

    # Asking again in the same run cannot help (the server said no, or tsmd's policy does):
    # retry loops read this, not the message.
    final: bool = False

    def reworded(self, text: str) -> "FetchError":
        """The same error, of the same kind, with the message `text`."""
        error = copy.copy(self)
        error.args = (text,)
        return error


class HttpStatusError(FetchError):
    """The server answered with an HTTP status other than success (or a redirect followed)."""

    def __init__(self, text: str, status: int) -> None:
        super().__init__(text)
        self.status = status
        self.final = 400 <= status < 500 and status != 429

    def __reduce__(self) -> Any:
        return type(self), (*self.args, self.status)


class ResponseTooBig(FetchError):
    """The server answered with more than was asked for, or allowed."""


class AddressRefused(FetchError):
    """tsmd's own address policy refused the host: no request left this machine."""

    final = True


class NoSuchHost(FetchError):
    """DNS answered that the name does not exist: the name is dead, not the network."""


class ConfigError(TsmdError):
    exit_code = ExitCode.USAGE


class DatabaseError(TsmdError):
    exit_code = ExitCode.DATABASE


class BusyError(TsmdError):
    exit_code = ExitCode.BUSY


def _leaf_exceptions(error: BaseException) -> list[BaseException]:
    """The exceptions inside (possibly nested) exception groups, which trio raises."""
    nested = getattr(error, "exceptions", None)
    if nested is None or not isinstance(error, BaseExceptionGroup):
        return [error]
    return [leaf for inner in nested for leaf in _leaf_exceptions(inner)]


class NetworkDownError(TsmdError):
    """Nothing on the network could even be reached (no bootstrap node resolved)."""

    exit_code = ExitCode.UNREACHABLE
    outcome = "unreachable"


# ---- Data model ----


@dataclass(frozen=True, slots=True)
class Tracker:
    url: str
    tier: int


@dataclass(frozen=True, slots=True)
class WebSeed:
    """An HTTP server holding the torrent's data: BEP 19 `url-list` (a GetRight-style file or
    folder URL) or BEP 17 `httpseeds` (a script taking the infohash and a piece range)."""

    url: str
    kind: str  # "url-list" or "httpseeds"


@dataclass(frozen=True, slots=True)
class Metainfo:
    """What tsmd keeps of a torrent. `infohash` is the 20-byte key the swarm is found under."""

    infohash: str  # 40 hex: SHA-1 of `info` (v1, hybrid) or truncated SHA-256 (v2 only)
    infohash_v2: str | None  # 64 hex SHA-256 of `info` for v2 and hybrid torrents
    name: str | None
    size_bytes: int | None
    file_count: int | None
    piece_length: int | None
    created_unix: int | None
    created_by: str | None
    comment: str | None
    trackers: tuple[Tracker, ...]
    has_metainfo: bool  # False for a magnet link or a bare infohash
    trackers_skipped: int = 0  # tracker URLs past MAX_ANNOUNCE_URLS, not even read
    web_seeds: tuple[WebSeed, ...] = ()
    piece_count: int | None = None  # of a v1 or hybrid .torrent (what a peer's bitfield covers)
    # What a web seed check asks a server for (v1 and hybrid): the first piece's SHA-1, and the
    # first file's length and path (None for a single-file torrent, whose file is `name`).
    first_piece_sha1: bytes | None = None
    first_file_length: int | None = None
    first_file_path: tuple[str, ...] | None = None

    @classmethod
    def bare(cls, infohash: str) -> Metainfo:
        """All that a bare infohash (or an unchanged, not re-read .torrent) tells."""
        return cls(infohash, None, None, None, None, None, None, None, None, (), False)


@dataclass(frozen=True, slots=True)
class ListingFacts:
    """What a listing itself says of a torrent. A .torrent that downloads overrides it; when
    none does, the torrent is still listed, by these facts."""

    infohash: str | None = None
    name: str | None = None
    size_bytes: int | None = None
    file_count: int | None = None
    type: str | None = None  # the listing's own kind for it ([[collection]] type_field)


class EntryKind(enum.Enum):
    URL = "url"  # a .torrent file to download
    MAGNET = "magnet"
    INFOHASH = "infohash"


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One torrent listed by a collection's index. `source` identifies it inside the collection."""

    kind: EntryKind
    source: str  # URL of the .torrent, the magnet URI, or the 40-hex infohash
    file_name: str | None
    facts: ListingFacts | None = None  # what the listing says of it (JSON, CSV, RSS items)


# ---- Bencode and metainfo ----
#
# bencoder.pyx decodes in C, fast, but trusts what it reads. A negative string length moves it
# backwards: an endless loop that not even SIGTERM stops, or a recursion that kills the process.
# A length near 2**63 overflows its position, and lengths are read with int(), so "+5", " -5" and
# "5_0" pass. So no untrusted byte reaches it before scan_bencode_untrusted has checked every
# token: canonical lengths and integers, strings inside the input, nesting bounded.

MAX_BENCODE_INTEGER_DIGITS: Final = 19  # and within int64, as libtorrent's bdecode
MAX_BENCODE_BYTES: Final = (1 << 31) - 1  # bencoder.pyx keeps positions in a C int
# The string lengths that the token regexes know, so that most inputs are checked inside them:
# every length under 100, and the lengths of DHT replies' fields (node lists of 26 or 38 bytes a
# node, BEP 33 filters of 256 bytes). Any other string costs one step of a Python loop.
_REGEX_STRING_LENGTHS: Final = frozenset(
    [*range(100), *range(26, 26 * 17, 26), *range(38, 38 * 17, 38), 256])
# Python's regex engine keeps a record of every repetition until a match ends, so every repeat
# is bounded: tokens per call, small values per call, and the items of a small value (a list or
# dictionary of short strings and integers, nested at most two deep, matched in one piece, as a
# .torrent's `files` entries are). Unbounded, a repeat cost up to 130 bytes per byte of input.
_TOKENS_PER_MATCH: Final = 2000
_SMALL_VALUES_PER_MATCH: Final = 64
_SMALL_VALUE_ITEMS: Final = 16
MAX_FILE_BYTES: Final = 1 << 50  # 1 PiB: a larger file in a .torrent is a forgery
MAX_TORRENT_BYTES: Final = 1 << 53  # 8 PiB: sums stay far below SQLite's int64
MAX_PIECE_LENGTH: Final = 1 << 34  # larger "piece lengths" are not kept
MAX_METAINFO_TEXT: Final = 4096  # characters kept of a name, comment or `created by`
MAX_ANNOUNCE_URLS: Final = 1000  # tracker URLs read from a .torrent or magnet; more are skipped
MAX_WEB_SEEDS: Final = 100  # web seed URLs kept of a .torrent or magnet; real ones list a few
MAX_WEB_SEEDS_CHECKED: Final = 4  # of one torrent's, in a probe run
MAX_URL_LENGTH: Final = 2048  # longer tracker or web seed URLs are not kept


def _string_lengths_pattern(lengths: Iterable[int]) -> bytes:
    """A regex for `N:` followed by N bytes, for each N in `lengths`, as a trie on the digits:
    the regex engine then tries about ten branches a digit, not one per length."""
    trie: dict[str, Any] = {}
    for length in lengths:
        node = trie
        for digit in str(length):
            node = node.setdefault(digit, {})
        node[":"] = length

    def branches(node: dict[str, Any]) -> str:
        return "|".join(":" + (f".{{{child}}}" if child else "") if key == ":"
                        else f"{key}(?:{branches(child)})" for key, child in node.items())

    return branches(trie).encode("ascii")


def _small_value_pattern(levels: int) -> bytes:
    """One integer or string, or (levels 1 or 2) a small list or dictionary nested at most
    `levels` deep."""
    integer = rb"i(?:0|-?[1-9][0-9]{0,%d})e" % (MAX_BENCODE_INTEGER_DIGITS - 2)  # 19 digits:
    short = integer + b"|" + _string_lengths_pattern(range(100))  # left to the scan's loop
    pattern = integer + b"|" + _string_lengths_pattern(sorted(_REGEX_STRING_LENGTHS))
    item = short
    for _ in range(levels):
        container = rb"[ld](?:%s){0,%d}e" % (item, _SMALL_VALUE_ITEMS)
        item = short + b"|" + container
    return pattern if not levels else pattern + b"|" + container


@functools.cache
def _token_run() -> Callable[[bytes, int], re.Match[bytes]]:
    """`match` of up to _TOKENS_PER_MATCH tokens of any kind. Compiled on first use (1-2 ms):
    reports never decode bencode."""
    return re.compile(rb"(?:[lde]|%s){0,%d}" % (_small_value_pattern(0), _TOKENS_PER_MATCH),
                      re.DOTALL).match


@functools.cache
def _small_values_run(levels: int) -> Callable[[bytes, int], re.Match[bytes]]:
    """`match` of a run of whole small values nested at most `levels` deep."""
    limit = _TOKENS_PER_MATCH if not levels else _SMALL_VALUES_PER_MATCH
    return re.compile(rb"(?:%s){0,%d}" % (_small_value_pattern(levels), limit), re.DOTALL).match


@functools.cache
def _small_value() -> Callable[[bytes, int], re.Match[bytes] | None]:
    """`match` of one whole small value: it decodes into little more than its own size."""
    return re.compile(_small_value_pattern(2), re.DOTALL).match


_BENCODE_STRING_HEAD: Final = re.compile(rb"(0|[1-9][0-9]{0,9}):")
_BENCODE_LONG_INTEGER: Final = re.compile(rb"i(-?[1-9][0-9]{%d})e"
                                          % (MAX_BENCODE_INTEGER_DIGITS - 1))


def _bencode_defect(data: bytes, pos: int) -> str:
    """What is wrong with the token at `pos`, for the error message."""
    head = data[pos:pos + 24]
    if re.match(rb"i-?0[0-9]|i-0e", head):
        return f"integer with a leading zero at byte {pos}"
    if re.match(rb"i-?[0-9]{%d}" % (MAX_BENCODE_INTEGER_DIGITS + 1), head):
        return f"integer of more than {MAX_BENCODE_INTEGER_DIGITS} digits at byte {pos}"
    if re.match(rb"[-+\s]+[0-9]", head):
        return f"string length with a sign or a space at byte {pos}"
    if re.match(rb"0[0-9]", head):
        return f"string length with a leading zero at byte {pos}"
    if re.match(rb"[0-9]{11}", head):
        return f"string length of more than 10 digits at byte {pos}"
    if head[:1].isdigit():
        return f"malformed string length at byte {pos}"
    return f"unexpected byte {head[:1]!r} at byte {pos}"


def _scalar_end(data: bytes, pos: int) -> int:
    """Where the integer or string at `pos` ends, for one that the regexes do not take: a string
    of a length they do not know, or an integer of 19 digits."""
    if data[pos] == 0x69 and (integer := _BENCODE_LONG_INTEGER.match(data, pos)):  # i
        if not -1 << 63 <= int(integer.group(1)) < 1 << 63:
            raise ProtocolError(f"invalid bencode: integer past 64 bits at byte {pos}")
        return integer.end()
    head = _BENCODE_STRING_HEAD.match(data, pos)
    if head is None:
        raise ProtocolError(f"invalid bencode: {_bencode_defect(data, pos)}")
    end = head.end() + int(head.group(1))
    if end > len(data):
        raise ProtocolError(f"invalid bencode: string at byte {pos} runs past the end "
                            f"({int(head.group(1)):,} bytes)")
    return end


def _nesting_walk(data: bytes, pos: int, limit: int, one_value: bool) -> int:
    """Check the tokens from `pos` on, counting the levels of nesting, until the end of the data
    or (`one_value`) of the value at `pos`; return where that is. Small whole values are taken
    in one regex call, so that a .torrent's `files` list costs a call per 64 entries."""
    end, depth = len(data), 0
    while pos < end:
        after = _small_values_run(min(2, limit - depth))(data, pos).end()
        if after > pos:
            pos = after
        elif data[pos] == 0x6C or data[pos] == 0x64:  # l, d
            depth += 1
            if depth > limit:
                raise ProtocolError(f"bencode nested deeper than {limit} levels")
            pos += 1
        elif data[pos] == 0x65:  # e
            depth -= 1
            pos += 1
        else:
            pos = _scalar_end(data, pos)
        if one_value and depth <= 0:
            if depth < 0:
                raise ProtocolError(f"invalid bencode: unexpected byte b'e' at byte {pos - 1}")
            return pos
    if one_value:
        raise ProtocolError("invalid bencode: truncated")
    return pos


def scan_bencode_untrusted(data: bytes, limit: int = MAX_BENCODE_DEPTH) -> None:
    """Refuse `data` unless bencoder.pyx can read it safely: every token canonical (no sign,
    space or leading zero in a length, integers within int64), every string inside the input,
    and no nesting deeper than `limit`. Linear in the input, and in memory bounded.

    Whether the tokens form one value (balanced, keys that are strings, nothing after the end)
    is left to the decoder, which fails cleanly on that once the tokens are sound.
    """
    end = len(data)
    if not end:
        raise ProtocolError("empty input, expected bencode")
    if end > MAX_BENCODE_BYTES:
        raise ProtocolError(f"bencode of {end:,} bytes, over {MAX_BENCODE_BYTES:,}")
    # Only lists and dicts nest, each level at least one byte. While the tokens so far (long
    # strings left out) hold fewer `l` and `d` bytes than the limit, nesting needs no count and
    # one regex call checks up to _TOKENS_PER_MATCH tokens: all of a DHT reply. Past that, the
    # scan starts again and counts the levels.
    run, bound, pos = _token_run(), 0, 0
    while pos < end:
        after = run(data, pos).end()
        if after == pos:
            pos = _scalar_end(data, pos)
            continue
        if end > limit:
            bound += data.count(b"l", pos, after) + data.count(b"d", pos, after)
            if bound > limit:
                _nesting_walk(data, 0, limit, one_value=False)
                return
        pos = after


_BENCODE_ERRORS: Final = (bencoder.BTFailure, ValueError, TypeError, IndexError, KeyError,
                          OverflowError)


def bdecode_untrusted(data: bytes) -> Any:
    """Decode one complete bencoded value; any defect raises ProtocolError."""
    scan_bencode_untrusted(data)
    try:
        return bencoder.bdecode(data)
    except _BENCODE_ERRORS as exc:
        raise ProtocolError(f"invalid bencode: {exc or type(exc).__name__}") from None


def bencode(value: Any) -> bytes:
    return bencoder.bencode(value)


# Metainfo is read a piece at a time from scanned bytes. Only the keys tsmd uses are decoded,
# and only when they are small; `announce-list` is read a URL at a time, `files` an entry at a
# time, `file tree` a node at a time, and everything else is stepped over without building it.
# A .torrent of a million files then costs the memory of one entry, and a hostile one cannot turn
# 32 MB of `l de de de ...` into gigabytes of empty dictionaries.


def _skip_value_at(data: bytes, pos: int) -> int:
    """Where the value at `pos` of scanned data ends; nothing is decoded."""
    if pos >= len(data):
        raise ProtocolError("invalid bencode: truncated")
    small = _small_value()(data, pos)
    if small is not None:
        return small.end()
    return _nesting_walk(data, pos, MAX_BENCODE_DEPTH, one_value=True)


def _decode_value_at(data: bytes, pos: int) -> tuple[Any, int]:
    """The value at `pos` of scanned data, and where it ends. For a value known to be small."""
    try:
        return bencoder.decode_func[data[pos]](data, pos)
    except IndexError:
        raise ProtocolError("invalid bencode: truncated") from None
    except KeyError as exc:  # bencoder.pyx's dispatch on a byte that starts no value
        byte = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        raise ProtocolError("invalid bencode: unexpected byte" + (
            f" {bytes([byte])!r}" if byte is not None and 0 <= byte < 256 else "")
            + f" in the value at byte {pos}") from None
    except _BENCODE_ERRORS as exc:
        raise ProtocolError(f"invalid bencode: {exc or type(exc).__name__}") from None


def _decode_if_small_at(data: bytes, pos: int) -> tuple[Any, int]:
    """The value at `pos` of scanned data if decoding it costs little more than its own bytes
    (an integer, a string, a small list or dictionary), else None; and where it ends."""
    if pos >= len(data):
        raise ProtocolError("invalid bencode: truncated")
    if data[pos] != 0x6C and data[pos] != 0x64 or _small_value()(data, pos) is not None:  # l, d
        return _decode_value_at(data, pos)
    return None, _skip_value_at(data, pos)


def _dict_key_at(data: bytes, pos: int) -> tuple[bytes | None, int]:
    """Inside a dictionary of scanned data: the key at `pos` and where its value starts, or None
    and the position after the dictionary's end."""
    if pos >= len(data):
        raise ProtocolError("invalid bencode: truncated")
    if data[pos] == 0x65:  # e
        return None, pos + 1
    if not 0x30 <= data[pos] <= 0x39:
        raise ProtocolError(f"dictionary key at byte {pos} is not a string")
    key, pos = _decode_value_at(data, pos)
    if pos >= len(data):
        raise ProtocolError("invalid bencode: truncated")
    return key, pos


def _list_ends_at(data: bytes, pos: int) -> bool:
    """Inside a list of scanned data: whether `pos` is its end."""
    if pos >= len(data):
        raise ProtocolError("invalid bencode: truncated")
    return data[pos] == 0x65  # e


def _dict_fields_at(data: bytes, pos: int, wanted: frozenset[bytes],
                    spans: frozenset[bytes] = frozenset()) -> tuple[dict[bytes, Any] | None, int]:
    """Of the dictionary at `pos`: the `wanted` keys whose values are small, and where it ends.
    None for a value that is not a dictionary. A small dictionary comes decoded whole; in a
    large one, each key of `spans` comes as its value's bencoded bytes (a memoryview)."""
    value, end = _decode_if_small_at(data, pos)
    if value is not None or data[pos] != 0x64:  # d
        return (value if isinstance(value, dict) else None), end
    fields: dict[bytes, Any] = {}
    pos += 1
    while True:
        key, pos = _dict_key_at(data, pos)
        if key is None:
            return fields, pos
        if key in spans:
            start, pos = pos, _skip_value_at(data, pos)
            fields[key] = memoryview(data)[start:pos]
        elif key in wanted:
            fields[key], pos = _decode_if_small_at(data, pos)
        else:
            pos = _skip_value_at(data, pos)


def _file_length(attributes: dict[bytes, Any] | None, where: str) -> int:
    length = attributes.get(b"length") if attributes is not None else None
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise ProtocolError(f"{where} has no valid 'length'")
    if length > MAX_FILE_BYTES:
        raise ProtocolError(f"{where} claims {length:,} bytes, over {MAX_FILE_BYTES:,}")
    return length


_FILE_KEYS: Final = frozenset({b"length", b"attr"})


@dataclass(slots=True)
class _FileTotals:
    """Size and count of a torrent's files. With `digest`, also a hash of every file's path and
    length in order, to compare a hybrid's two views of its files."""

    size: int = 0
    count: int = 0
    digest: Any = None  # a hashlib object, or None when no comparison is wanted
    first_length: int | None = None  # the first file's, for a web seed check
    first_path: Any = None  # its `path` as listed (a list of strings, or None if too big)

    def add(self, length: int, path: Callable[[], bytes] | None = None) -> None:
        """Count a file; `path` gives its path as a bencoded list of strings (only called when
        a digest is kept: for most torrents the path is never built)."""
        self.size += length
        self.count += 1
        if self.size > MAX_TORRENT_BYTES:
            raise ProtocolError(f"files add up to over {MAX_TORRENT_BYTES:,} bytes")
        if self.digest is not None and path is not None:
            self.digest.update(path() + b"i%de" % length)  # both parts delimit themselves


def _is_pad_file(attributes: dict[bytes, Any] | None) -> bool:
    """BEP 47: a file whose `attr` holds "p" only pads the next file to a piece boundary."""
    attr = attributes.get(b"attr") if attributes is not None else None
    return isinstance(attr, bytes) and b"p" in attr


_PATH_SPAN: Final = frozenset({b"path"})


def _path_bytes(path: Any) -> bytes:
    """A `files` entry's path as bencoded bytes, to compare with a v2 `file tree`."""
    if isinstance(path, memoryview):
        return bytes(path)
    if not isinstance(path, list) or not all(isinstance(part, bytes) for part in path):
        raise ProtocolError("a 'files' entry has no valid 'path'")
    return bencode(path)


def _v1_files_at(data: bytes, pos: int, digest: Any = None) -> tuple[_FileTotals, int]:
    """Totals of the BEP 3 `files` list at `pos`, an entry at a time, and where it ends. BEP 47
    pad files are not content: they count neither in the size nor in the files."""
    if data[pos] != 0x6C:  # l
        raise ProtocolError("'files' is not a non-empty list")
    totals = _FileTotals(digest=digest)
    pos += 1
    listed = 0
    while not _list_ends_at(data, pos):
        # Its `path` decoded if the entry is small, else as its bencoded bytes.
        entry, pos = _dict_fields_at(data, pos, _FILE_KEYS, _PATH_SPAN)
        path = entry.get(b"path") if entry is not None else None
        listed += 1
        length = _file_length(entry, "a 'files' entry")
        if not _is_pad_file(entry):
            if totals.first_length is None:
                totals.first_length, totals.first_path = length, path
            totals.add(length, None if digest is None else functools.partial(_path_bytes, path))
    if not listed:
        raise ProtocolError("'files' is not a non-empty list")
    return totals, pos + 1


def _v2_file_tree_at(data: bytes, pos: int, digest: Any = None) -> tuple[_FileTotals, int]:
    """Totals of the BEP 52 `file tree` at `pos`, a node at a time, and where it ends. A file is
    a key "" whose value holds its `length`; every other value is a directory. Keys must be in
    order (BEP 3), so a name cannot be counted twice."""
    if data[pos] != 0x64:  # d
        raise ProtocolError("'file tree' node is not a dictionary")
    totals = _FileTotals(digest=digest)
    previous: list[bytes | None] = [None]  # the last key of each directory being read
    pos += 1
    while True:
        key, pos = _dict_key_at(data, pos)
        if key is None:  # a directory ends
            previous.pop()
            if not previous:
                return totals, pos
            continue
        if previous[-1] is not None and key <= previous[-1]:
            raise ProtocolError(f"'file tree' names out of order or repeated: {_text(key)!r}")
        previous[-1] = key
        if key == b"":
            attributes, pos = _dict_fields_at(data, pos, _FILE_KEYS)
            # The names of the directories down to this file are the last key of each level.
            totals.add(_file_length(attributes, "'file tree' file"),
                       lambda: bencode(previous[:-1]))
        elif data[pos] == 0x64:  # d: a directory begins
            previous.append(None)
            pos += 1
        else:
            raise ProtocolError("'file tree' node is not a dictionary")


def _deferred(read: Callable[[bytes, int], tuple[_FileTotals, int]], data: bytes, pos: int
              ) -> tuple[_FileTotals | ProtocolError, int]:
    """`read` at `pos`; a defect in what it reads is kept, to be raised only if the torrent
    turns out to use it (a v2 torrent's `files`, a v1 torrent's `file tree`)."""
    try:
        return read(data, pos)
    except ProtocolError as exc:
        return exc, _skip_value_at(data, pos)  # a defect of the bencode itself is raised here


@dataclass(slots=True)
class _InfoDict:
    """The `info` dictionary: its small fields, which keys it has, its file lists as totals."""

    fields: dict[bytes, Any] = field(default_factory=dict)
    present: set[bytes] = field(default_factory=set)  # of _INFO_FORMAT_KEYS
    v1_files: _FileTotals | ProtocolError | None = None
    v2_files: _FileTotals | ProtocolError | None = None
    v1_files_at: int | None = None  # where `files` and `file tree` start, to read them again
    v2_files_at: int | None = None
    pieces_bytes: int | None = None  # the length of v1 `pieces`: 20 bytes a piece
    first_piece_sha1: bytes | None = None


_INFO_KEYS: Final = frozenset({b"name", b"name.utf-8", b"piece length", b"length",
                               b"meta version"})
_INFO_FORMAT_KEYS: Final = frozenset({b"pieces", b"length", b"files", b"file tree"})
_TOP_KEYS: Final = frozenset({b"announce", b"creation date", b"created by", b"comment",
                              b"comment.utf-8"})
_WEB_SEED_KEYS: Final = {b"url-list": "url-list", b"httpseeds": "httpseeds"}  # BEP 19, BEP 17


def _info_dict_at(data: bytes, pos: int) -> tuple[_InfoDict, int]:
    info = _InfoDict()
    pos += 1
    while True:
        key, pos = _dict_key_at(data, pos)
        if key is None:
            return info, pos
        if key in _INFO_FORMAT_KEYS:
            info.present.add(key)
        if key == b"files":
            info.v1_files_at = pos
            info.v1_files, pos = _deferred(_v1_files_at, data, pos)
        elif key == b"file tree":
            info.v2_files_at = pos
            info.v2_files, pos = _deferred(_v2_file_tree_at, data, pos)
        elif key in _INFO_KEYS:
            info.fields[key], pos = _decode_if_small_at(data, pos)
        elif key == b"pieces":  # its hashes are never read, only how many there are
            start, pos = pos, _skip_value_at(data, pos)
            colon = data.find(b":", start, pos)
            info.pieces_bytes = pos - colon - 1 if data[start:start + 1].isdigit() else None
            if info.pieces_bytes is not None and info.pieces_bytes >= 20:
                info.first_piece_sha1 = bytes(data[colon + 1:colon + 21])
        else:
            pos = _skip_value_at(data, pos)


@dataclass(slots=True)
class _AnnounceList:
    """BEP 12 tiers as (tier, URL) pairs, at most MAX_ANNOUNCE_URLS of them."""

    urls: list[tuple[int, bytes]] = field(default_factory=list)
    tiers: int = 0
    skipped: int = 0  # items past MAX_ANNOUNCE_URLS


def _announce_list_at(data: bytes, pos: int) -> tuple[_AnnounceList | None, int]:
    """`announce-list` a URL at a time; None for a value that is not a list. A tier that is a
    string instead of a list of them is taken as a tier of one URL."""
    if data[pos] != 0x6C:  # l
        return None, _skip_value_at(data, pos)
    found = _AnnounceList()

    def take(pos: int) -> int:
        if len(found.urls) >= MAX_ANNOUNCE_URLS:
            found.skipped += 1
            return _skip_value_at(data, pos)
        url, pos = _decode_if_small_at(data, pos)
        if isinstance(url, bytes):
            found.urls.append((found.tiers, url))
        return pos

    pos += 1
    while not _list_ends_at(data, pos):
        if data[pos] == 0x6C:  # l: a tier
            pos += 1
            while not _list_ends_at(data, pos):
                pos = take(pos)
            pos += 1
        else:
            pos = take(pos)
        found.tiers += 1
    return found, pos + 1


@dataclass(slots=True)
class _TopDict:
    """Of a .torrent: its small top-level fields, `announce-list`, web seed URLs as (kind, URL),
    the `info` dictionary and that dictionary's byte span."""

    fields: dict[bytes, Any] = field(default_factory=dict)
    announce_list: _AnnounceList | None = None
    web_seeds: list[tuple[str, bytes]] = field(default_factory=list)
    info: _InfoDict | None = None
    span: tuple[int, int] | None = None


def _web_seeds_at(data: bytes, pos: int) -> tuple[list[bytes], int]:
    """`url-list` or `httpseeds`: one URL or a list of them (read a URL at a time)."""
    if data[pos] == 0x6C:  # l
        found, pos = _announce_list_at(data, pos)
        return [url for _, url in found.urls] if found is not None else [], pos
    value, pos = _decode_if_small_at(data, pos)
    return [value] if isinstance(value, bytes) else [], pos


def _top_dict_untrusted(data: bytes) -> _TopDict:
    """The parts of a .torrent tsmd reads. The infohash is the hash of the `info` dictionary's
    exact bytes: re-encoding would silently "fix" a non-canonical file (unsorted keys) and give
    a hash nobody else uses."""
    scan_bencode_untrusted(data)
    if data[:1] != b"d":
        raise ProtocolError("not a bencoded dictionary")
    top = _TopDict()
    info = span = None
    pos = 1
    while True:
        key, pos = _dict_key_at(data, pos)
        if key is None:
            break
        if key == b"info":  # the last one counts, as a dictionary would keep it
            info, span = None, None
            if data[pos] == 0x64:  # d
                start = pos
                info, pos = _info_dict_at(data, pos)
                span = (start, pos)
            else:
                pos = _skip_value_at(data, pos)
        elif key == b"announce-list":
            top.announce_list, pos = _announce_list_at(data, pos)
        elif key in _WEB_SEED_KEYS:
            urls, pos = _web_seeds_at(data, pos)
            top.web_seeds.extend((_WEB_SEED_KEYS[key], url) for url in urls)
        elif key in _TOP_KEYS:
            top.fields[key], pos = _decode_if_small_at(data, pos)
        else:
            pos = _skip_value_at(data, pos)
    if pos != len(data):
        raise ProtocolError("invalid bencode: data after the end")
    top.info, top.span = info, span
    return top


def _text(value: Any) -> str | None:
    """A metainfo string as text; metainfo strings are bytes of unknown, usually UTF-8, encoding."""
    if isinstance(value, bytes):
        return value[:4 * MAX_METAINFO_TEXT].decode("utf-8", errors="replace")[:MAX_METAINFO_TEXT]
    return None


def _non_negative_int(value: Any, maximum: int = (1 << 63) - 1) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= maximum:
        return value
    return None


def normalise_tracker_url(url: str) -> str | None:
    """Canonical form of an announce URL, or None when it is not a usable tracker URL."""
    url = url.strip()
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in TRACKER_SCHEMES or not parts.hostname:
        return None
    if scheme == "udp" and not port or port == 0:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port in (None, DEFAULT_PORTS.get(scheme)) else f"{host}:{port}"
    if scheme == "udp":  # BEP 15 ignores the path (BEP 41 aside): udp://h:p/announce is udp://h:p
        return urllib.parse.urlunsplit((scheme, netloc, "", "", ""))
    # HTTP and WebSocket keep path and query: private trackers tell users apart by a passkey in
    # either, and a WebSocket tracker may listen on any path of its host.
    # Stripped again inside: "http://h/ #x" has the path "/ ", which would not normalise alike.
    return urllib.parse.urlunsplit((scheme, netloc, parts.path.strip() or "/",
                                    parts.query.strip(), ""))


def _collect_trackers(announce_list: _AnnounceList | None, announce: Any) -> tuple[Tracker, ...]:
    """Trackers in tier order (BEP 12); `announce` leads when there is no `announce-list`, and
    comes last when it is not in it."""
    if announce_list is None or not announce_list.tiers:
        announce_list = _AnnounceList([(0, announce)] if isinstance(announce, bytes) else [], 0)
    elif isinstance(announce, bytes):
        announce_list.urls.append((announce_list.tiers, announce))
    trackers: dict[str, Tracker] = {}
    for tier, raw in announce_list.urls:
        url = normalise_tracker_url(_text(raw) or "")
        if url and url not in trackers:
            trackers[url] = Tracker(url, tier)
    return tuple(trackers.values())


def decode_metainfo_untrusted(data: bytes) -> Metainfo:
    """Parse a .torrent file (BEP 3, BEP 12, BEP 52). Raises only ProtocolError.

    Values tsmd does not read are checked as bencode tokens (they cannot crash or exhaust
    anything) but not decoded."""
    top = _top_dict_untrusted(data)
    info, span, announce_list = top.info, top.span, top.announce_list
    if info is None or span is None:
        raise ProtocolError("metainfo has no 'info' dictionary")
    raw_info = memoryview(data)[span[0]:span[1]]  # not a copy: it can be most of the file
    fields = info.fields

    is_v2 = fields.get(b"meta version") == 2 and b"file tree" in info.present
    is_v1 = bool(info.present & {b"pieces", b"length", b"files"})
    if not (is_v1 or is_v2):
        raise ProtocolError("'info' has neither v1 'pieces'/'files' nor a v2 'file tree'")
    sha256 = hashlib.sha256(raw_info).hexdigest() if is_v2 else None
    infohash = hashlib.sha1(raw_info).hexdigest() if is_v1 else sha256[:SHA1_HEX_LEN]  # type: ignore[index]

    files = info.v2_files if is_v2 else info.v1_files
    if files is None:  # a single file (BEP 3)
        files = _FileTotals()
        files.add(_file_length(fields, "'info' of a single file"))
    if isinstance(files, ProtocolError):
        raise files
    if is_v1 and is_v2:
        _check_hybrid_views(data, info)

    name = _text(fields.get(b"name.utf-8")) or _text(fields.get(b"name"))
    piece_count = (info.pieces_bytes // 20 if is_v1 and info.pieces_bytes
                   and info.pieces_bytes % 20 == 0 else None)
    # The v1 view's first file: where a url-list web seed serves piece 0's first bytes.
    first_length, first_path = None, None
    if piece_count and isinstance(info.v1_files, _FileTotals):
        first_length, first_path = info.v1_files.first_length, _file_path(info.v1_files.first_path)
    elif piece_count and info.v1_files is None:  # one file, called `name`
        first_length = files.size
    return Metainfo(
        infohash=infohash,
        infohash_v2=sha256,
        name=name,
        size_bytes=files.size,
        file_count=files.count,
        piece_length=_non_negative_int(fields.get(b"piece length"), MAX_PIECE_LENGTH),
        created_unix=_non_negative_int(top.fields.get(b"creation date")),
        created_by=_text(top.fields.get(b"created by")),
        comment=_text(top.fields.get(b"comment.utf-8")) or _text(top.fields.get(b"comment")),
        trackers=_collect_trackers(announce_list, top.fields.get(b"announce")),
        has_metainfo=True,
        trackers_skipped=announce_list.skipped if announce_list is not None else 0,
        web_seeds=_collect_web_seeds((kind, _text(url) or "") for kind, url in top.web_seeds),
        piece_count=piece_count,
        first_piece_sha1=info.first_piece_sha1 if piece_count else None,
        first_file_length=first_length,
        first_file_path=first_path,
    )


def _file_path(path: Any) -> tuple[str, ...] | None:
    """A `files` entry's path as text components; None if it was too big to decode, or is
    not a list of strings."""
    if not isinstance(path, list) or not path or not all(isinstance(p, bytes) for p in path):
        return None
    return tuple(_text(part) or "" for part in path)


def _check_hybrid_views(data: bytes, info: _InfoDict) -> None:
    """BEP 52: a hybrid's v1 files (less BEP 47 pads) and its v2 `file tree` are the same files
    in the same order. Views that disagree would put a v1 and a v2 swarm on different data;
    libtorrent refuses such a torrent. Read only for hybrids, a second time."""
    v1, v2 = hashlib.sha1(), hashlib.sha1()
    if isinstance(info.v1_files, ProtocolError):
        raise ProtocolError(f"hybrid torrent whose v1 view is broken: {info.v1_files}")
    if info.v1_files_at is not None:
        _v1_files_at(data, info.v1_files_at, v1)
    else:  # a single file: its path is the torrent's name
        name, length = info.fields.get(b"name"), _file_length(info.fields, "'info'")
        if not isinstance(name, bytes):
            raise ProtocolError("hybrid torrent of one file without a valid 'name'")
        _FileTotals(digest=v1).add(length, lambda: bencode([name]))
    if info.v2_files_at is not None:
        _v2_file_tree_at(data, info.v2_files_at, v2)
    if v1.digest() != v2.digest():
        raise ProtocolError("hybrid torrent whose v1 files and v2 'file tree' disagree "
                            "(names, sizes or order)")


def normalise_web_seed_url(url: str) -> str | None:
    """A web seed URL as kept: http(s), with a host, not absurdly long; else None."""
    url = storable_text(url.strip())
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # raises ValueError for a port out of range
    except ValueError:
        return None
    if parts.scheme.lower() not in HTTP_SCHEMES or not parts.hostname or len(url) > MAX_URL_LENGTH:
        return None
    return url


def _collect_web_seeds(candidates: Iterable[tuple[str, str]]) -> tuple[WebSeed, ...]:
    seeds: dict[str, WebSeed] = {}
    for kind, raw in candidates:
        url = normalise_web_seed_url(raw)
        if url is not None and url not in seeds and len(seeds) < MAX_WEB_SEEDS:
            seeds[url] = WebSeed(url, kind)
    return tuple(seeds.values())


_LONE_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def storable_text(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD. They come from JSON's `\\ud800`
    escapes and from file names and arguments that are not UTF-8 (as surrogate escapes), and
    neither SQLite, JSON output nor a terminal can take them."""
    return text if text.isascii() else _LONE_SURROGATE.sub("\ufffd", text)


_HEX40 = re.compile(r"[0-9a-fA-F]{40}")
_BASE32_32 = re.compile(r"[A-Za-z2-7]{32}")


def parse_infohash_untrusted(text: str) -> str:
    """A v1 infohash as 40 hex digits or 32 base32 characters, returned as lower-case hex."""
    text = text.strip()
    if _HEX40.fullmatch(text):
        return text.lower()
    if _BASE32_32.fullmatch(text):
        return base64.b32decode(text.upper()).hex()
    raise ProtocolError(f"not an infohash: {text[:80]!r}")


def decode_magnet_untrusted(uri: str) -> Metainfo:
    """Parse a magnet link (BEP 9, BEP 52 `btmh`): infohash, display name and trackers."""
    if uri[:8].lower() != "magnet:?":
        raise ProtocolError(f"not a magnet link: {uri[:80]!r}")
    params = urllib.parse.parse_qs(storable_text(uri[len("magnet:?"):]), keep_blank_values=False)
    infohash = infohash_v2 = None
    for xt in params.get("xt", []):
        lowered = xt.lower()
        if lowered.startswith("urn:btih:"):
            infohash = parse_infohash_untrusted(xt[len("urn:btih:"):])
        elif lowered.startswith("urn:btmh:1220") and re.fullmatch(r"[0-9a-f]{64}", lowered[13:]):
            infohash_v2 = lowered[13:]
    if infohash is None and infohash_v2 is not None:
        infohash = infohash_v2[:SHA1_HEX_LEN]
    if infohash is None:
        raise ProtocolError(f"magnet link without a usable 'xt': {uri[:80]!r}")
    trackers: dict[str, Tracker] = {}
    listed = params.get("tr", [])
    for raw in listed[:MAX_ANNOUNCE_URLS]:
        url = normalise_tracker_url(raw)
        if url and url not in trackers:
            trackers[url] = Tracker(url, len(trackers))
    names = params.get("dn")
    size = int(xl) if re.fullmatch(r"[0-9]{1,16}", xl := params.get("xl", [""])[0]) else None
    return Metainfo(
        infohash=infohash, infohash_v2=infohash_v2,
        name=names[0][:MAX_METAINFO_TEXT] if names else None,
        size_bytes=size if size is not None and size <= MAX_TORRENT_BYTES else None,
        file_count=None, piece_length=None, created_unix=None, created_by=None, comment=None,
        trackers=tuple(trackers.values()), has_metainfo=False,
        trackers_skipped=len(set(listed[MAX_ANNOUNCE_URLS:]) - set(listed[:MAX_ANNOUNCE_URLS])),
        web_seeds=_collect_web_seeds(("url-list", url)  # BEP 19's `ws` parameter
                                     for url in params.get("ws", [])[:MAX_WEB_SEEDS]),
    )


@functools.lru_cache(maxsize=4096)
def _magnet_quote(value: str) -> str:
    # Reports build a magnet for every torrent, and trackers repeat across thousands of them.
    return urllib.parse.quote(value, safe=":/")


# quote(safe="") for ASCII text by str.translate, in C: a report quotes 100,000 names.
_QUOTE_ASCII: Final = {code: f"%{code:02X}" for code in range(128) if not (
    chr(code).isalnum() or chr(code) in "_.-~")}


def _quote_component(value: str) -> str:
    return value.translate(_QUOTE_ASCII) if value.isascii() else urllib.parse.quote(value, safe="")


@functools.lru_cache(maxsize=1024)
def _magnet_trackers(trackers: tuple[str, ...]) -> str:
    # Thousands of torrents of one collection share one list of trackers.
    return "".join("&tr=" + _magnet_quote(url) for url in trackers)


MAGNET_PREFIX: Final = "magnet:?xt=urn:btih:"
MAGNET_TRACKERS: Final = 10  # trackers named in the magnet links tsmd stores and publishes


def magnet_uri(infohash: str, name: str | None = None, trackers: Sequence[str] = ()) -> str:
    text = MAGNET_PREFIX + infohash
    if name:
        text += "&dn=" + _quote_component(name)
    return text + _magnet_trackers(tuple(trackers))


def stored_magnet(infohash: str, name: str | None, trackers: Sequence[str]) -> str:
    """The magnet link a torrent keeps in the database and reports publish: its first
    MAGNET_TRACKERS trackers, in the order of its tracker list."""
    return magnet_uri(infohash, name, trackers[:MAGNET_TRACKERS])


# ---- Collection index pages ----


# An <a> tag with an href, in one pass: the tag is bounded in length, so a hostile page of
# unclosed tags costs linear time (html.parser is quadratic on those, and can assert).
_HREF_ATTRIBUTE: Final = (r"""\bhref\s*=\s*(?:"([^"<>]{0,8000})"|'([^'<>]{0,8000})'"""
                          r"""|([^\s"'<>]{1,8000}))""")
_ANCHOR_HREF = re.compile(r"<a\s[^<>]{0,2000}?" + _HREF_ATTRIBUTE, re.IGNORECASE)
_LOOKS_LIKE_HTML = re.compile(r"(?is)\s*(<!doctype|<html|<head|<body|<a\s)")


def _href_value(match: re.Match[str]) -> str:
    """The link of an href matched by _HREF_ATTRIBUTE (quoted either way, or not)."""
    return html.unescape(next(group for group in match.groups() if group is not None)).strip()


def html_hrefs(text: str) -> list[str]:
    return [_href_value(match) for match in _ANCHOR_HREF.finditer(text)]


def _url_file_name(url: str) -> str | None:
    path = urllib.parse.urlsplit(url).path
    name = urllib.parse.unquote(path.rsplit("/", 1)[-1])
    return name or None


def _is_torrent_url(url: str) -> bool:
    try:
        return urllib.parse.urlsplit(url).path.lower().endswith(".torrent")
    except ValueError:  # an unbalanced "[" in the host: not a link tsmd can use
        return False


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, (parts.hostname or ""), parts.port


def resolve_link_untrusted(base_url: str, link: str) -> str:
    """`link` made absolute against `base_url`, checked to be a well-formed http(s)/file URL."""
    link = storable_text(link)
    try:
        url = urllib.parse.urljoin(base_url, link)
        parts = urllib.parse.urlsplit(url)
        parts.port  # raises ValueError for a port out of range
    except ValueError as exc:
        raise ProtocolError(f"bad link {link[:80]!r}: {exc}") from None
    if parts.scheme.lower() not in HTTP_SCHEMES | {"file"}:
        raise ProtocolError(f"unsupported link {link[:80]!r}")
    if parts.scheme.lower() != "file" and not parts.hostname:
        raise ProtocolError(f"link without a host {link[:80]!r}")
    return url


_TEXT_LIST_PROBLEMS_KEPT: Final = 1000  # messages kept of a page's unreadable items; all counted


def _entry_from_text(text: str, base_url: str) -> IndexEntry:
    """A URL, magnet link or bare infohash. A relative reference is taken only when it names a
    .torrent file; anything else is not an entry: a stray line of an XML or HTML file, or "N/A"
    in a CSV cell, must never be fetched as a URL."""
    text = storable_text(text.strip())
    if text[:8].lower() == "magnet:?":
        meta = decode_magnet_untrusted(text)  # its infohash kept: read once, used thrice
        return IndexEntry(EntryKind.MAGNET, text, meta.name, ListingFacts(meta.infohash))
    if _HEX40.fullmatch(text) or _BASE32_32.fullmatch(text):
        return IndexEntry(EntryKind.INFOHASH, parse_infohash_untrusted(text), None)
    if not (_URL_WITH_SCHEME.match(text) or _is_torrent_url(text)) \
            or any(character.isspace() for character in text):
        raise ProtocolError(f"not a URL, magnet link or infohash: {text[:80]!r}")
    url = resolve_link_untrusted(base_url, text)
    return IndexEntry(EntryKind.URL, url, _url_file_name(url))


_URL_WITH_SCHEME: Final = re.compile(r"(?i)(?:https?|file)://")


@dataclass(frozen=True, slots=True)
class ListingOptions:
    """The collection settings that decide what of a listing is taken."""

    required_substring: str | None = None
    same_origin: bool = True
    keep_obsolete: bool = False  # Anna's Archive rows marked `obsolete` or `embargo`
    type_field: str | None = None  # a field naming each item's type (`group_name`)


@dataclass(slots=True)
class IndexPage:
    """What one page of a listing gave."""

    kind: str  # "HTML", "RSS/Atom", "JSON", "CSV", "text"
    entries: list[IndexEntry]
    problems: list[str]  # one message per unreadable item (the first _TEXT_LIST_PROBLEMS_KEPT)
    unreadable: int = 0  # all unreadable items
    skipped: int = 0  # items left out on purpose: obsolete or embargoed
    listed: int = 0  # readable entries before required_substring and repeats are left out
    # Fields of listed items that did not parse (a link of "N/A" beside a good infohash): the
    # item stands, so they are said with -v, not counted as failures (the first few kept).
    notes: list[str] = field(default_factory=list)
    next_url: str | None = None  # rel="next" (HTML, Atom) or the Link header


# Item fields by meaning, as real listings name them: Anna's Archive torrents.json, seedtools
# feeds (and tsmd's own JSON), BEP 36 / academictorrents RSS, CSV exports. Keys are compared in
# lower case with "-" and " " read as "_". The first field present wins.
_LINK_FIELDS: Final = ("url", "link", "torrent", "torrent_url", "download", "enclosure")
_MAGNET_FIELDS: Final = ("magnet", "magnet_link", "magneturi", "magnet_uri")
_INFOHASH_FIELDS: Final = ("btih", "infohash", "info_hash")
_LISTED_SIZE_FIELDS: Final = ("data_size", "size_bytes", "contentlength", "content_length", "size",
                       "length", "total_size")
_NAME_FIELDS: Final = ("display_name", "title", "name")
_FILE_NAME_FIELDS: Final = ("file_name", "filename", "name")
_FILE_COUNT_FIELDS: Final = ("num_files", "file_count")
_DROPPED_FLAGS: Final = ("obsolete", "embargo")
MAX_TYPE_LENGTH: Final = 64


def _field_key(key: str) -> str:
    return key.strip().lower().replace("-", "_").replace(" ", "_")


def _first_text(fields: dict[str, Any], names: Sequence[str]) -> str | None:
    for name in names:
        value = fields.get(name)
        if isinstance(value, str) and value.strip():
            return storable_text(value.strip())
    return None


def _listed_count(value: Any, maximum: int) -> int | None:
    """A size or count as a listing gives it (a number or a string of digits); -1 and junk are
    unknown."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value.strip()[:20])
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= maximum:
        return value
    return None


def _is_set(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "t", "y")
    return bool(value) and isinstance(value, (bool, int, float))


def _entry_from_fields(raw: dict[Any, Any], base_url: str, options: ListingOptions
                       ) -> tuple[IndexEntry | None, list[str]]:
    """One item of a JSON, CSV or RSS/Atom listing, with the facts it carries, and what of it
    could not be read. The entry is its .torrent link, else its magnet, else its infohash: a
    field that does not parse falls back to the next (and is said), so a junk link never
    costs a good infohash. None when the item is left out on purpose (obsolete, embargoed);
    ProtocolError when nothing in it names a torrent."""
    fields = {_field_key(key): value for key, value in raw.items() if isinstance(key, str)}
    if not options.keep_obsolete and any(_is_set(fields.get(flag)) for flag in _DROPPED_FLAGS):
        return None, []
    problems: list[str] = []
    readable: dict[str, IndexEntry] = {}
    for role, names in (("link", _LINK_FIELDS), ("magnet", _MAGNET_FIELDS),
                        ("infohash", _INFOHASH_FIELDS)):
        text = _first_text(fields, names)
        if text is None:
            continue
        try:
            readable[role] = _entry_from_text(text, base_url)
            if role != "link" and readable[role].kind.value != role:  # a URL as "btih"
                del readable[role]
                what = "an infohash" if role == "infohash" else "a magnet link"
                raise ProtocolError(f"not {what}: {text[:80]!r}")
        except ProtocolError as exc:
            problems.append(f"item's {role}: {exc}")
    entry = next(iter(readable.values()), None)
    if entry is None:
        raise ProtocolError("; ".join(problems) or "item has no .torrent link, magnet link or "
                            "infohash")
    named = {readable[role].facts.infohash if role == "magnet"  # type: ignore[union-attr]
             else readable[role].source for role in ("infohash", "magnet") if role in readable}
    if len(named) > 1:
        raise ProtocolError(f"item's infohash and magnet name different torrents: "
                            f"{' and '.join(sorted(named))}")
    infohash = next(iter(named), None)
    kind = fields.get(_field_key(options.type_field)) if options.type_field else None
    facts = ListingFacts(
        infohash=infohash,
        name=(_first_text(fields, _NAME_FIELDS) or "")[:MAX_METAINFO_TEXT] or None,
        size_bytes=next((size for name in _LISTED_SIZE_FIELDS
                         if (size := _listed_count(fields.get(name), MAX_TORRENT_BYTES))
                         is not None), None),
        file_count=next((count for name in _FILE_COUNT_FIELDS
                         if (count := _listed_count(fields.get(name), 1 << 40)) is not None),
                        None),
        type=storable_text(kind.strip())[:MAX_TYPE_LENGTH] or None
        if isinstance(kind, str) else None)
    file_name = entry.file_name
    if entry.kind is EntryKind.URL:
        file_name = _first_text(fields, _FILE_NAME_FIELDS) or file_name
    return dataclasses.replace(entry, file_name=file_name, facts=facts), problems


def _json_items(document: Any) -> list[Any]:
    if isinstance(document, dict):
        document = next((document[key] for key in ("torrents", "items", "data", "results")
                         if isinstance(document.get(key), list)), document)
    if not isinstance(document, list):
        raise ProtocolError("JSON listing is neither a list nor an object with a 'torrents' list")
    return document


# A listing's candidates are entries, or for an unreadable item the message saying why (a
# string, not the exception: 100,000 kept tracebacks of a junk file cost 30 MB).


def _entries_from_items(items: Iterable[Any], base_url: str, options: ListingOptions,
                        page: IndexPage) -> Iterator[IndexEntry | str]:
    for item in items:
        try:
            if isinstance(item, str):
                yield _entry_from_text(item, base_url)
            elif isinstance(item, dict):
                entry, problems = _entry_from_fields(item, base_url, options)
                if entry is None:
                    page.skipped += 1
                else:
                    yield entry
                page.notes.extend(problems[:_TEXT_LIST_PROBLEMS_KEPT - len(page.notes)])
            else:
                raise ProtocolError(f"item is a {type(item).__name__}, not a string or object")
        except ProtocolError as exc:
            yield str(exc)


# --- RSS 2.0, RSS 1.0 and Atom, read with expat (C, linear; DOCTYPEs refused) ---

_FEED_ROOT: Final = re.compile(r"<(?:[\w.-]{1,40}:)?(?:rss|feed|rdf)[\s>/]", re.IGNORECASE)
_XML_PROLOG_ENDS: Final = (("<?", "?>"), ("<!--", "-->"), ("<!DOCTYPE", ">"), ("<!doctype", ">"))
FEED_SNIFF_CHARS: Final = 8192  # where a feed's root element must start


def looks_like_feed(text: str) -> bool:
    """Whether `text`'s first element, after the XML declaration, comments, processing
    instructions and a DOCTYPE, is <rss>, <feed> or <rdf:RDF>. A scan with str.find: a regex
    over a run of comments can backtrack exponentially."""
    position = 0
    while position < FEED_SNIFF_CHARS:
        while position < len(text) and text[position].isspace():
            position += 1
        for start, end in _XML_PROLOG_ENDS:
            if text.startswith(start, position):
                body = position + len(start)
                if start[2:].lower() == "doctype":
                    subset = text.find("[", body, FEED_SNIFF_CHARS)
                    if subset != -1 and subset < text.find(">", body, FEED_SNIFF_CHARS):
                        body = text.find("]", subset, FEED_SNIFF_CHARS)  # then its ">"
                        if body == -1:
                            return False
                stop = text.find(end, body, FEED_SNIFF_CHARS)
                if stop == -1:
                    return False
                position = stop + len(end)
                break
        else:
            return _FEED_ROOT.match(text, position) is not None
    return False
# Elements whose text is an item's field, by local name in lower case (namespaces vary: BEP 36,
# ezRSS's `torrent:`, academictorrents' own).
_FEED_TEXT_FIELDS: Final = {"title": "title", "link": "link", "infohash": "infohash",
                            "magneturi": "magneturi", "contentlength": "contentlength",
                            "size": "size", "filename": "filename", "guid": "guid"}
MAX_FEED_FIELD_CHARS: Final = 8192


class _FeedItems:
    """expat handlers that collect each <item> or <entry> as a dictionary of fields."""

    def __init__(self) -> None:
        self.items: list[dict[str, str]] = []
        self.next_url: str | None = None
        self._item: dict[str, str] | None = None
        self._depth = 0  # of <item>/<entry> elements open: one nested in another is not an item
        self._field: str | None = None
        self._text: list[str] = []
        self._chars = 0

    def start(self, name: str, attributes: dict[str, str]) -> None:
        local = name.rsplit(" ", 1)[-1].lower()
        if local in ("item", "entry"):
            self._depth += 1
            if self._depth == 1:
                self._item = {}
            return
        href = attributes.get("href") or attributes.get("url")
        if local == "link" and attributes.get("rel") == "next" and href and self._item is None:
            self.next_url = href
        if self._item is None:
            return
        if local in ("enclosure", "link") and href:
            kind = attributes.get("type", "").lower()
            if href[:8].lower() == "magnet:?":
                self._item.setdefault("magnet", href)
            elif "bittorrent" in kind or _is_torrent_url(href):  # not a podcast's mp3
                self._item.setdefault("url", href)
        if local in _FEED_TEXT_FIELDS:
            self._field, self._text, self._chars = _FEED_TEXT_FIELDS[local], [], 0

    def text(self, data: str) -> None:
        if self._field is not None and self._chars < MAX_FEED_FIELD_CHARS:
            self._text.append(data)
            self._chars += len(data)

    def end(self, name: str) -> None:
        local = name.rsplit(" ", 1)[-1].lower()
        if local in ("item", "entry"):
            self._depth -= 1
            if self._depth == 0 and self._item is not None:
                self.items.append(self._item)
                self._item = None
        elif self._item is not None and self._field is not None \
                and _FEED_TEXT_FIELDS.get(local) == self._field:
            value = "".join(self._text)[:MAX_FEED_FIELD_CHARS].strip()
            if self._field == "link":  # an item's page, unless it is the .torrent or a magnet
                if value[:8].lower() == "magnet:?":
                    self._item.setdefault("magnet", value)
                elif _is_torrent_url(value):
                    self._item.setdefault("url", value)
            elif value:
                self._item.setdefault(self._field, value)
            self._field = None


def _refuse_doctype(*_: Any) -> None:
    # A feed has no use for a DTD, and entity definitions are how XML bombs expand.
    raise ProtocolError("XML with a DOCTYPE is not read (entity expansion)")


def feed_items_untrusted(text: str) -> tuple[list[dict[str, str]], str | None]:
    """The items of an RSS or Atom feed as field dictionaries, and its rel="next" link."""
    from xml.parsers import expat

    reader = _FeedItems()
    parser = expat.ParserCreate(namespace_separator=" ")
    parser.StartElementHandler = reader.start
    parser.EndElementHandler = reader.end
    parser.CharacterDataHandler = reader.text
    parser.StartDoctypeDeclHandler = _refuse_doctype
    parser.EntityDeclHandler = _refuse_doctype
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    try:
        parser.Parse(text, True)
    except expat.ExpatError as exc:
        raise ProtocolError(f"invalid XML feed: {expat.ErrorString(exc.code)} at line "
                            f"{exc.lineno}") from None
    return reader.items, reader.next_url


# --- CSV and TSV with a header row ---

_KNOWN_COLUMNS: Final = frozenset(_LINK_FIELDS + _MAGNET_FIELDS + _INFOHASH_FIELDS)


def _csv_delimiter(header: str) -> str | None:
    """The delimiter of a header row that names a link, magnet or infohash column, or None."""
    for delimiter in ("\t", ",", ";", "|"):
        columns = {_field_key(column.strip('"')) for column in header.split(delimiter)}
        if len(columns) > 1 and columns & _KNOWN_COLUMNS:
            return delimiter
    return None


def _looks_like_html(text: str) -> bool:
    return bool(_LOOKS_LIKE_HTML.match(text[:4096]) or _ANCHOR_HREF.search(text[:65536]))


def _csv_header_at(text: str) -> tuple[str, int] | None:
    """The delimiter and position of a CSV or TSV header row (the first line that is not a
    `#` comment), or None when the text does not start like one. An HTML document never does:
    an HTML page is told by its start, a CSV file with HTML in a cell by its header."""
    if _LOOKS_LIKE_HTML.match(text[:4096]):
        return None
    position = 0
    for _ in range(100):
        end = text.find("\n", position, position + 65536)
        line = text[position:end if end != -1 else position + 65536]
        if line.strip() and not line.lstrip().startswith("#"):
            delimiter = _csv_delimiter(line)
            return (delimiter, position) if delimiter is not None else None
        if end == -1:
            return None
        position = end + 1
    return None


def _csv_rows(text: str, delimiter: str) -> Iterator[dict[str, str] | str]:
    import csv
    import io

    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        header = [_field_key(column) for column in next(reader)]
    except (csv.Error, StopIteration) as exc:
        raise ProtocolError(f"CSV header: {exc or 'missing'}") from None
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield f"CSV line {reader.line_num}: {exc}"
            continue
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            yield f"CSV line {reader.line_num}: {len(row)} columns, the header has {len(header)}"
            continue
        yield dict(zip(header, row))


# --- Pagination: rel="next" ---

_REL_NEXT_TAG: Final = re.compile(
    r"""<(?:a|link)\s[^<>]{0,2000}?\brel\s*=\s*["']?next\b[^<>]{0,8000}>""", re.IGNORECASE)
_HREF: Final = re.compile(_HREF_ATTRIBUTE, re.IGNORECASE)
_LINK_HEADER_NEXT: Final = re.compile(r"""<([^<>]{1,8000})>\s*;[^,<]{0,200}?\brel\s*=\s*"?next\b""",
                                      re.IGNORECASE)


def next_page_link(html_text: str = "", link_header: str = "") -> str | None:
    """The rel="next" link of an HTML page or of a `Link` header (RFC 8288), unresolved."""
    match = _LINK_HEADER_NEXT.search(link_header[:65536])
    if match:
        return match.group(1).strip()
    tag = _REL_NEXT_TAG.search(html_text)
    href = _HREF.search(tag.group(0)) if tag else None
    return _href_value(href) if href else None


def parse_index_untrusted(
    body: bytes,
    base_url: str,
    *,
    link_header: str = "",
    options: ListingOptions = ListingOptions(),
) -> IndexPage:
    """The entries of one page of a listing, one message per item that could not be read, and
    the next page's link.

    The format is told by the bytes, not the Content-Type, which servers get wrong: a JSON list
    or object, an RSS or Atom feed, an HTML page (its links to .torrent files and magnets), a
    CSV or TSV file with a header row, or a text list of URLs, magnets and infohashes, one per
    line. Links resolve against `base_url`; HTML links to another origin are skipped when
    `options.same_origin`. A `file:` entry is only honoured in a local index, so a remote page
    can never make tsmd read the host's files.
    """
    try:
        return _parse_index(body, base_url, link_header, options)
    except (ValueError, UnicodeError) as exc:  # urllib's, a last guard: one page, one error
        raise ProtocolError(f"unreadable listing: {exc}") from None


def _parse_index(body: bytes, base_url: str, link_header: str, options: ListingOptions
                 ) -> IndexPage:
    text = body.decode("utf-8", errors="replace")
    stripped = text.lstrip("\ufeff \t\r\n")
    candidates: list[IndexEntry | str] = []
    next_url = next_page_link(link_header=link_header) if link_header else None
    if stripped[:1] in ("[", "{"):
        page = IndexPage("JSON", [], [])
        try:
            document = json.loads(stripped)
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(f"invalid JSON listing: {exc}") from None
        candidates.extend(_entries_from_items(_json_items(document), base_url, options, page))
    elif looks_like_feed(stripped):
        page = IndexPage("RSS/Atom", [], [])
        items, feed_next = feed_items_untrusted(stripped)
        next_url = next_url or feed_next
        candidates.extend(_entries_from_items(items, base_url, options, page))
    elif (csv_at := _csv_header_at(stripped)) is None and _looks_like_html(stripped):
        page = IndexPage("HTML", [], [])
        next_url = next_url or next_page_link(html_text=stripped)
        page_origin = _origin(base_url)
        for href in dict.fromkeys(html_hrefs(text)):  # a repeated link is read once
            try:
                if href[:8].lower() == "magnet:?":
                    candidates.append(_entry_from_text(href, base_url))
                    continue
                url = resolve_link_untrusted(base_url, href)
            except ProtocolError as exc:
                candidates.append(str(exc))
                continue
            if not _is_torrent_url(url):
                continue
            if options.same_origin and _origin(url) != page_origin:
                continue
            candidates.append(IndexEntry(EntryKind.URL, url, _url_file_name(url)))
    elif csv_at is not None:
        page = IndexPage("CSV", [], [])
        delimiter, start = csv_at
        for row in _csv_rows(stripped[start:], delimiter):
            candidates.extend([row] if isinstance(row, str) else
                              _entries_from_items([row], base_url, options, page))
    else:
        page = IndexPage("text", [], [])
        for line in dict.fromkeys(raw.strip() for raw in stripped.splitlines()):
            if not line or line.startswith("#"):
                continue
            try:
                candidates.append(_entry_from_text(line, base_url))
            except ProtocolError as exc:
                candidates.append(str(exc))
    page.next_url = next_url
    select_entries(candidates, base_url, options, page)
    return page


def select_entries(candidates: Iterable[IndexEntry | str], base_url: str,
                   options: ListingOptions, page: IndexPage) -> None:
    """Into `page`: the candidates that are readable, allowed, wanted (`required_substring` in
    the URL, magnet or infohash; in the file name of a local file, whose folder's own path
    must not count) and not repeated; a message for each unreadable one."""
    local_index = urllib.parse.urlsplit(base_url).scheme == "file"
    seen: set[str] = set()
    wanted = options.required_substring
    for candidate in candidates:
        if isinstance(candidate, IndexEntry) and candidate.kind is EntryKind.URL \
                and not local_index and urllib.parse.urlsplit(candidate.source).scheme == "file":
            candidate = f"remote index links to a local file, ignored: {candidate.source[:80]}"
        if isinstance(candidate, str):
            page.unreadable += 1
            if len(page.problems) < _TEXT_LIST_PROBLEMS_KEPT:
                page.problems.append(candidate)
            continue
        page.listed += 1
        if wanted and wanted not in (candidate.file_name or "" if candidate.source[:5] == "file:"
                                     else candidate.source):
            continue
        if candidate.source not in seen:
            seen.add(candidate.source)
            page.entries.append(candidate)


# ---- KRPC: DHT messages (BEP 5, BEP 32, BEP 33, BEP 43) ----

COMPACT_NODE_V4: Final = struct.Struct("!20s4sH")  # BEP 5: node id, IPv4, port (26 bytes)
COMPACT_NODE_V6: Final = struct.Struct("!20s16sH")  # BEP 32: node id, IPv6, port (38 bytes)
COMPACT_PEER_V4: Final = struct.Struct("!4sH")
COMPACT_PEER_V6: Final = struct.Struct("!16sH")
BLOOM_BYTES: Final = 256  # BEP 33: m = 2048 bits
BLOOM_BITS: Final = BLOOM_BYTES * 8
BLOOM_HASHES: Final = 2  # BEP 33: k = 2


class KrpcError(enum.IntEnum):
    GENERIC = 201  # also what nodes send when they throttle ("too many requests")
    SERVER = 202
    PROTOCOL = 203
    METHOD_UNKNOWN = 204


# The DHT's messages are named tuples, not frozen dataclasses: a survey makes one reply and
# eight nodes per query, and a frozen dataclass took twice as long to make.


class DhtNode(NamedTuple):
    node_id: bytes
    host: str
    port: int


class KrpcMessage(NamedTuple):
    """A decoded KRPC packet: `kind` is b"q", b"r" or b"e"."""

    transaction_id: bytes
    kind: bytes
    body: dict  # the `a`, `r` dictionary, or {b"code": int, b"message": bytes} for errors


class GetPeersReply(NamedTuple):
    node_id: bytes
    token: bytes | None
    peers: tuple[tuple[str, int], ...]  # from `values`
    nodes: tuple[DhtNode, ...]  # from `nodes` and `nodes6`
    seeds_bloom: bytes | None  # BEP 33 BFsd
    peers_bloom: bytes | None  # BEP 33 BFpe
    bad_fields: int = 0  # fields dropped as malformed (the rest of the reply still counts)


def encode_ping(transaction_id: bytes, node_id: bytes) -> bytes:
    """A BEP 5 ping, read-only (BEP 43): `tsmd init` asks the routers whether UDP gets through."""
    return bencode({b"t": transaction_id, b"y": b"q", b"q": b"ping", b"a": {b"id": node_id},
                    b"ro": 1})


def encode_get_peers(transaction_id: bytes, node_id: bytes, infohash: bytes, *,
                     scrape: bool = False, want_ipv6: bool = False) -> bytes:
    """A BEP 5 get_peers query, read-only (BEP 43), optionally with BEP 33 `scrape`."""
    arguments: dict[bytes, Any] = {b"id": node_id, b"info_hash": infohash}
    if scrape:
        arguments[b"scrape"] = 1
    if want_ipv6:
        arguments[b"want"] = [b"n4", b"n6"]  # BEP 32
    return bencode({b"t": transaction_id, b"y": b"q", b"q": b"get_peers", b"a": arguments,
                    b"ro": 1})


def get_peers_template(node_id: bytes, infohash: bytes, *, scrape: bool = False,
                       want_ipv6: bool = False) -> tuple[bytes, bytes]:
    """`encode_get_peers` cut around a 4-byte transaction id: head + id + tail is the packet.
    A lookup sends many queries that differ only in that id."""
    placeholder = b"\0" * 4
    packet = encode_get_peers(placeholder, node_id, infohash, scrape=scrape, want_ipv6=want_ipv6)
    tail = b"1:y1:qe"  # keys sort: only `y` follows `t`
    cut = len(packet) - len(tail) - len(placeholder)
    assert packet[cut - 5:cut] == b"1:t4:" and packet.endswith(tail)
    return packet[:cut], tail


def decode_krpc_untrusted(data: bytes) -> KrpcMessage:
    """Any KRPC packet, checked only as far as routing needs. Raises only ProtocolError."""
    message = bdecode_untrusted(data)
    if not isinstance(message, dict):
        raise ProtocolError("KRPC packet is not a dictionary")
    transaction_id, kind = message.get(b"t"), message.get(b"y")
    if not isinstance(transaction_id, bytes) or not 1 <= len(transaction_id) <= 32:
        raise ProtocolError("KRPC packet without a usable transaction id 't'")
    if kind == b"r":
        body = message.get(b"r")
        if not isinstance(body, dict):
            raise ProtocolError("KRPC reply without an 'r' dictionary")
        return KrpcMessage(transaction_id, kind, body)
    if kind == b"e":
        error = message.get(b"e")
        if not isinstance(error, list) or not error or not isinstance(error[0], int):
            raise ProtocolError("KRPC error without [code, message]")
        text = error[1] if len(error) > 1 and isinstance(error[1], bytes) else b""
        return KrpcMessage(transaction_id, kind, {b"code": error[0], b"message": text[:200]})
    if kind == b"q":
        body = message.get(b"a")
        return KrpcMessage(transaction_id, kind, body if isinstance(body, dict) else {})
    raise ProtocolError(f"KRPC packet of unknown kind {kind!r:.20}")


def krpc_transaction_untrusted(data: bytes) -> tuple[bytes, KrpcMessage]:
    """Routing key and message for the UDP endpoint."""
    message = decode_krpc_untrusted(data)
    return message.transaction_id, message


def _ip_text(raw: bytes) -> str:
    # inet_ntop is C; ipaddress would cost more than the rest of a reply's decoding.
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def decode_compact_nodes_untrusted(data: bytes, ipv6: bool = False) -> tuple[DhtNode, ...]:
    layout, family = (COMPACT_NODE_V6, socket.AF_INET6) if ipv6 else (COMPACT_NODE_V4,
                                                                     socket.AF_INET)
    if len(data) % layout.size:
        raise ProtocolError(f"compact nodes of {len(data)} bytes, not a multiple of {layout.size}")
    ntop = socket.inet_ntop  # (every reply names 8 nodes: this loop is hot)
    return tuple([DhtNode(node_id, ntop(family, ip), port)
                  for node_id, ip, port in layout.iter_unpack(data)])


def decode_compact_peer_untrusted(data: bytes) -> tuple[str, int]:
    if len(data) == COMPACT_PEER_V4.size:
        ip, port = COMPACT_PEER_V4.unpack(data)
    elif len(data) == COMPACT_PEER_V6.size:
        ip, port = COMPACT_PEER_V6.unpack(data)
    else:
        raise ProtocolError(f"compact peer of {len(data)} bytes, expected 6 or 18")
    return _ip_text(ip), port


def encode_compact_peer(host: str, port: int) -> bytes:
    return ipaddress.ip_address(host).packed + port.to_bytes(2, "big")


def encode_compact_node(node: DhtNode) -> bytes:
    return node.node_id + encode_compact_peer(node.host, node.port)


def decode_get_peers_reply_untrusted(message: KrpcMessage) -> GetPeersReply:
    """The `r` of a get_peers reply. A malformed optional field (values, nodes, nodes6, token,
    filters) is dropped and counted; only a missing or bad node id rejects the whole reply."""
    body = message.body
    node_id = body.get(b"id")
    if message.kind != b"r" or not isinstance(node_id, bytes) or len(node_id) != 20:
        raise ProtocolError("get_peers reply without a 20-byte node id")
    bad = 0
    peers: list[tuple[str, int]] = []
    values = body.get(b"values")
    if values is not None:
        if isinstance(values, list):
            for value in values:
                try:
                    peers.append(decode_compact_peer_untrusted(value if isinstance(value, bytes)
                                                               else b""))
                except ProtocolError:
                    bad += 1
        else:
            bad += 1
    nodes: list[DhtNode] = []
    for key, ipv6 in ((b"nodes", False), (b"nodes6", True)):
        raw = body.get(key)
        if raw is None:
            continue
        try:
            if not isinstance(raw, bytes):
                raise ProtocolError(f"'{key.decode()}' is not a string")
            nodes.extend(decode_compact_nodes_untrusted(raw, ipv6))
        except ProtocolError:
            bad += 1
    blooms = []
    for key in (b"BFsd", b"BFpe"):
        raw = body.get(key)
        if raw is not None and (not isinstance(raw, bytes) or len(raw) != BLOOM_BYTES):
            bad += 1
            raw = None
        blooms.append(raw)
    token = body.get(b"token")
    if token is not None and not isinstance(token, bytes):
        bad += 1
        token = None
    return GetPeersReply(node_id, token, tuple(peers), tuple(nodes), blooms[0], blooms[1], bad)


# ---- BEP 33 bloom filters ----


def bloom_insert(bloom: bytearray, ip: str) -> None:
    """Set the two bits of an IP (raw 4 or 16 bytes, no port) in a 2048-bit filter (BEP 33)."""
    digest = hashlib.sha1(ipaddress.ip_address(ip).packed).digest()
    for index in ((digest[0] | digest[1] << 8) % BLOOM_BITS,
                  (digest[2] | digest[3] << 8) % BLOOM_BITS):
        bloom[index // 8] |= 1 << (index % 8)


def bloom_union(target: bytearray, other: bytes) -> None:
    target[:] = (int.from_bytes(target, "big") | int.from_bytes(other, "big")).to_bytes(
        BLOOM_BYTES, "big")


def bloom_estimate(bloom: bytes) -> float:
    """BEP 33's estimate of the distinct IPs in a filter: n = ln(c/m) / (k ln(1 - 1/m)), c the
    zero bits clamped to [1, m-1]. An empty filter counts 0; a full one saturates near 7,806,
    a lower bound."""
    set_bits = int.from_bytes(bloom, "big").bit_count()
    if set_bits == 0:
        return 0.0
    zeros = min(max(BLOOM_BITS - set_bits, 1), BLOOM_BITS - 1)
    return math.log(zeros / BLOOM_BITS) / (BLOOM_HASHES * math.log(1 - 1 / BLOOM_BITS))


# One node stores a bounded list of a torrent's peers (libtorrent: 500), so its filter of them
# reads a few hundred at the most; a saturated filter (7,806) or one near it is a liar's or a
# broken node's, and OR-ed with honest ones it would be the whole estimate.
BEP33_MAX_FILTER_ESTIMATE: Final = 2_000.0
# With three filters or more, one reading more than this many times their median, plus a few, is
# suspect. It is dropped unless it holds what the others hold (BEP33_COVERED of their bits): a
# node that stores a whole swarm reads far above nodes that store part of it, and its filter
# contains theirs; a filter of made-up addresses does not.
BEP33_OUTLIER_FACTOR: Final = 4.0
BEP33_OUTLIER_SLACK: Final = 10.0
BEP33_COVERED: Final = 0.8  # not 1: peers come and go between the nodes' lists
BEP33_EVIDENCE_BITS: Final = 8  # the bits of four addresses, at the least, to judge by


def _covers(bits: int, others: int) -> bool:
    """Whether a filter holds BEP33_COVERED of the others' bits, and well above what its own
    fill would hold by chance (a filter of made-up addresses with most bits set covers most of
    anything). The others must hold a few addresses for that to say anything: a quarter-full
    filter covers the two bits of one address one time in sixteen."""
    if others.bit_count() < BEP33_EVIDENCE_BITS:
        return False
    fill = bits.bit_count() / BLOOM_BITS
    share = max(BEP33_COVERED, fill + (1 - fill) / 2)
    return (bits & others).bit_count() >= others.bit_count() * share


def plausible_filters(filters: Sequence[bytes]) -> tuple[list[bytes], int]:
    """The BEP 33 filters of one lookup's responders fit to be OR-ed together, and how many were
    dropped: saturated ones (above BEP33_MAX_FILTER_ESTIMATE), and outliers far above the
    median that do not contain what the others hold."""
    estimated = [(bloom_estimate(bloom), int.from_bytes(bloom, "big"), bloom) for bloom in filters]
    kept = [entry for entry in estimated if entry[0] <= BEP33_MAX_FILTER_ESTIMATE]
    if len(kept) >= 3:
        ordered = sorted(estimate for estimate, _, _ in kept)
        middle = len(ordered) // 2
        median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
        ceiling = median * BEP33_OUTLIER_FACTOR + BEP33_OUTLIER_SLACK
        others = functools.reduce(operator.or_, (bits for estimate, bits, _ in kept
                                                 if estimate <= ceiling), 0)
        kept = [(estimate, bits, bloom) for estimate, bits, bloom in kept
                if estimate <= ceiling or _covers(bits, others)]
    return [bloom for _, _, bloom in kept], len(filters) - len(kept)


# ---- Tracker scrape codecs (BEP 15 UDP, BEP 48 HTTP, WebTorrent WebSocket) ----

UDP_TRACKER_PROTOCOL_ID: Final = 0x41727101980  # BEP 15 magic constant of the connect request
UDP_CONNECTION_ID_LIFETIME: Final = 60.0  # BEP 15: a connection id may be used for one minute
MAX_UDP_SCRAPE_HASHES: Final = 70  # BEP 15 says ~74; 70 keeps the packet under an IPv4 MTU


class TrackerAction(enum.IntEnum):
    CONNECT = 0
    ANNOUNCE = 1
    SCRAPE = 2
    ERROR = 3


# BEP 15 byte tables. Requests: connect = protocol id, action, transaction id;
# scrape = connection id, action, transaction id, then 20-byte infohashes.
_UDP_REQUEST_HEADER: Final = struct.Struct("!QII")
# Replies: action, transaction id, then connect: connection id (8 bytes);
# scrape: one (seeders, completed, leechers) triple per asked hash, in order; error: a message.
_UDP_REPLY_HEADER: Final = struct.Struct("!II")
_UDP_CONNECTION_ID: Final = struct.Struct("!Q")
_UDP_SCRAPE_ENTRY: Final = struct.Struct("!III")


@dataclass(frozen=True, slots=True)
class ScrapeCounts:
    seeders: int
    leechers: int
    completed: int


@dataclass(frozen=True, slots=True)
class UdpTrackerReply:
    action: TrackerAction
    transaction_id: int
    connection_id: int | None = None
    entries: tuple[ScrapeCounts, ...] = ()
    error: str | None = None


def encode_udp_connect(transaction_id: int) -> bytes:
    return _UDP_REQUEST_HEADER.pack(UDP_TRACKER_PROTOCOL_ID, TrackerAction.CONNECT, transaction_id)


def encode_udp_scrape(connection_id: int, transaction_id: int, infohashes: Sequence[bytes]) -> bytes:
    if not 1 <= len(infohashes) <= 255 or any(len(h) != 20 for h in infohashes):
        raise ValueError("a scrape asks for 1 to 255 infohashes of 20 bytes")
    return (_UDP_REQUEST_HEADER.pack(connection_id, TrackerAction.SCRAPE, transaction_id)
            + b"".join(infohashes))


def udp_transaction_id_untrusted(data: bytes) -> int:
    if len(data) < _UDP_REPLY_HEADER.size:
        raise ProtocolError(f"tracker reply of {len(data)} bytes is shorter than its header")
    return _UDP_REPLY_HEADER.unpack_from(data)[1]


def udp_tracker_packet_untrusted(data: bytes) -> tuple[int, bytes]:
    """Routing key and packet for the UDP endpoint; the packet is decoded by its requester."""
    return udp_transaction_id_untrusted(data), data


def decode_udp_tracker_reply_untrusted(data: bytes) -> UdpTrackerReply:
    """A BEP 15 reply to connect, scrape or an error. Raises only ProtocolError."""
    if len(data) < _UDP_REPLY_HEADER.size:
        raise ProtocolError(f"tracker reply of {len(data)} bytes is shorter than its header")
    action, transaction_id = _UDP_REPLY_HEADER.unpack_from(data)
    body = data[_UDP_REPLY_HEADER.size:]
    if action == TrackerAction.CONNECT:
        if len(body) != _UDP_CONNECTION_ID.size:
            raise ProtocolError(f"connect reply of {len(data)} bytes, expected 16")
        return UdpTrackerReply(TrackerAction.CONNECT, transaction_id,
                               connection_id=_UDP_CONNECTION_ID.unpack(body)[0])
    if action == TrackerAction.SCRAPE:
        if len(body) % _UDP_SCRAPE_ENTRY.size:
            raise ProtocolError(f"scrape reply body of {len(body)} bytes is not whole entries")
        entries = tuple(ScrapeCounts(seeders, leechers, completed) for seeders, completed, leechers
                        in _UDP_SCRAPE_ENTRY.iter_unpack(body))
        return UdpTrackerReply(TrackerAction.SCRAPE, transaction_id, entries=entries)
    if action == TrackerAction.ERROR:
        message = body.decode("utf-8", errors="replace").strip("\x00 \r\n")[:300]
        return UdpTrackerReply(TrackerAction.ERROR, transaction_id, error=message or "no message")
    raise ProtocolError(f"tracker reply with unknown action {action}")


def http_scrape_url(announce_url: str) -> str | None:
    """BEP 48: the scrape URL replaces `announce` at the start of the last path segment."""
    parts = urllib.parse.urlsplit(announce_url)
    head, _, last = parts.path.rpartition("/")
    if not last.startswith("announce"):
        return None
    return urllib.parse.urlunsplit(parts._replace(path=f"{head}/scrape{last[len('announce'):]}"))


def encode_http_scrape_url(scrape_url: str, infohashes: Sequence[bytes]) -> str:
    query = "&".join("info_hash=" + urllib.parse.quote_from_bytes(h, safe="") for h in infohashes)
    return f"{scrape_url}{'&' if '?' in scrape_url else '?'}{query}"


@dataclass(frozen=True, slots=True)
class HttpScrapeReply:
    files: dict[bytes, ScrapeCounts]
    bad_entries: int  # entries of `files` that could not be read; the others count


def _scrape_key(key: Any) -> bytes | None:
    """A `files` key as the 20-byte infohash, or None. webtorrent's bittorrent-tracker keeps
    hashes as latin-1 "binary strings" and sends them UTF-8-encoded (20 to 40 bytes): encoded
    back to latin-1, such a key is the hash again."""
    if not isinstance(key, bytes):
        return None
    if len(key) == 20:
        return key
    if 20 < len(key) <= 40:
        try:
            raw = key.decode("utf-8").encode("latin-1")
        except (UnicodeDecodeError, UnicodeEncodeError):
            return None
        return raw if len(raw) == 20 else None
    return None


def decode_http_scrape_untrusted(body: bytes) -> HttpScrapeReply:
    """A bencoded BEP 48 scrape reply: {files: {hash: {complete, incomplete, downloaded}}}."""
    reply = bdecode_untrusted(body)
    if not isinstance(reply, dict):
        raise ProtocolError("scrape reply is not a bencoded dictionary")
    failure = reply.get(b"failure reason")
    if failure is not None:
        raise ProtocolError(f"tracker failure: {_text(failure) or repr(failure)}"[:300])
    return _scrape_files_untrusted(reply.get(b"files"), _scrape_key, _BENCODE_COUNT_NAMES)


def _scrape_files_untrusted(files: Any, infohash_of: Callable[[Any], bytes | None],
                            names: tuple[Any, Any, Any]) -> HttpScrapeReply:
    """A scrape reply's `files`, bencoded (BEP 48) or JSON (WebTorrent), whose `names` spell
    complete, incomplete and downloaded in the format's own strings. Each entry is read on its
    own: one that is malformed is counted and left out."""
    if not isinstance(files, dict):
        raise ProtocolError("scrape reply has no 'files' dictionary")
    result, bad = {}, 0
    for key, stats in files.items():
        infohash = infohash_of(key)
        counts = scrape_entry_counts(stats, names)
        if infohash is None or counts is None or infohash in result:
            bad += 1
            continue
        result[infohash] = counts
    if bad and not result:
        raise ProtocolError(f"scrape reply: none of its {bad} 'files' entries is readable")
    return HttpScrapeReply(result, bad)


_BENCODE_COUNT_NAMES: Final = (b"complete", b"incomplete", b"downloaded")


def scrape_entry_counts(stats: Any, names: tuple[Any, Any, Any] = _BENCODE_COUNT_NAMES
                        ) -> ScrapeCounts | None:
    """One decoded `files` entry, {complete, incomplete, downloaded} as `names` spell them, as
    counts; None when it is not readable. A count a tracker leaves out is 0 (BEP 48 trackers
    differ in which they send)."""
    if not isinstance(stats, dict):
        return None
    seeders, leechers, completed = (_non_negative_int(stats.get(name, 0)) for name in names)
    if seeders is None or leechers is None or completed is None:
        return None
    return ScrapeCounts(seeders, leechers, completed)


MAX_FULL_SCRAPE_ENTRY: Final = 64 * 1024  # bytes of one `files` entry; real ones are ~70


class FullScrapeReader:
    """A full scrape (BEP 48 `/scrape` without `info_hash`: every swarm the tracker has) read a
    chunk at a time as it is decoded. Only the entries of `wanted` hashes are kept, so a
    tracker's million swarms cost the memory of a chunk and of the answers, not of the whole.

    Every step reads one whole token or entry. One that runs past the data so far waits for the
    next chunk, up to MAX_FULL_SCRAPE_ENTRY bytes; at the end of the data, it is a defect.
    Raises only ProtocolError.
    """

    _START, _TOP, _FILES, _DONE = range(4)

    def __init__(self, wanted: set[bytes] | frozenset[bytes]) -> None:
        self.wanted = wanted
        self.files: dict[bytes, ScrapeCounts] = {}
        self.entries = 0  # entries of `files`, wanted or not
        self.bad_entries = 0  # wanted entries that could not be read
        self._state = self._START
        self._pending = bytearray()  # what no whole step has read yet
        # A step that ran past the data is tried again once the data has doubled: a token
        # that never completes (100,000 `l`s, fed a byte at a time) costs linear time, not
        # a scan of everything so far per chunk.
        self._retry_at = 0
        self._seen_files = False

    def feed(self, chunk: bytes) -> None:
        self._pending += chunk
        if len(self._pending) < self._retry_at:
            return
        pos = self._read(self._pending, 0, final=False)
        del self._pending[:pos]
        self._retry_at = 2 * len(self._pending)

    def finish(self) -> HttpScrapeReply:
        try:
            pos = self._read(self._pending, 0, final=True)
        except _FullScrapeDefect:
            raise
        except ProtocolError as exc:
            raise ProtocolError(f"full scrape ends in an entry cut short or unreadable: {exc}"
                                ) from None
        if self._state != self._DONE:
            raise ProtocolError("full scrape cut short: the reply ends inside its dictionary")
        if pos != len(self._pending):
            raise ProtocolError("full scrape: data after the end of the reply")
        if not self._seen_files:
            raise ProtocolError("scrape reply has no 'files' dictionary")
        return HttpScrapeReply(self.files, self.bad_entries)

    def _read(self, data: bytearray, pos: int, final: bool) -> int:
        """Read whole steps from `pos`; return where the first incomplete one starts."""
        while pos < len(data) and self._state != self._DONE:
            try:
                pos = self._step(data, pos)
            except _FullScrapeDefect:
                raise
            except ProtocolError:
                if final or len(data) - pos > MAX_FULL_SCRAPE_ENTRY:
                    raise
                return pos  # most likely cut by the chunk: the next one completes it
        return pos

    def _step(self, data: bytearray, pos: int) -> int:
        if self._state == self._START:
            if data[pos] != 0x64:  # d
                raise _FullScrapeDefect("scrape reply is not a bencoded dictionary")
            self._state = self._TOP
            return pos + 1
        if data[pos] == 0x65:  # e: the end of `files`, or of the reply
            self._state = self._TOP if self._state == self._FILES else self._DONE
            return pos + 1
        # The bencode scanners take any buffer: their regexes and indexing work on bytearray.
        key_end = _scalar_end(data, pos)  # type: ignore[arg-type]
        if data[pos] == 0x69:  # i
            raise ProtocolError(f"dictionary key at byte {pos} is not a string")
        key = bytes(data[data.index(b":", pos) + 1:key_end])
        if key_end >= len(data):
            raise ProtocolError("invalid bencode: truncated")
        if self._state == self._TOP and key == b"files":
            if data[key_end] != 0x64:
                raise _FullScrapeDefect("scrape reply's 'files' is not a dictionary")
            self._state, self._seen_files = self._FILES, True
            return key_end + 1
        end = _skip_value_at(data, key_end)  # type: ignore[arg-type]
        if end - pos > MAX_FULL_SCRAPE_ENTRY:  # however the chunks fell
            raise _FullScrapeDefect(f"full scrape entry of {end - pos:,} bytes, over "
                                    f"{MAX_FULL_SCRAPE_ENTRY:,}")
        if self._state == self._TOP:
            if key == b"failure reason":
                failure = bdecode_untrusted(bytes(data[key_end:end]))
                raise _FullScrapeDefect(f"tracker failure: {_text(failure) or repr(failure)}"[:300])
            return end
        self.entries += 1
        infohash = _scrape_key(key)
        if infohash is not None and infohash in self.wanted:
            try:
                counts = scrape_entry_counts(bdecode_untrusted(bytes(data[key_end:end])))
            except ProtocolError:  # sound tokens, yet no value (a key that is no string)
                counts = None
            if counts is None or infohash in self.files:
                self.bad_entries += 1
            else:
                self.files[infohash] = counts
        return end


class _FullScrapeDefect(ProtocolError):
    """A defect more data cannot mend (not a dictionary; the tracker's `failure reason`), as
    opposed to a token that runs past the data so far."""


# WebTorrent trackers (webtorrent's bittorrent-tracker, wt-tracker) speak JSON in WebSocket text
# messages. A scrape is {"action": "scrape", "info_hash": [h, ...]}, each hash a "binary string"
# of 20 characters, one per byte (latin-1); the reply is {"action": "scrape", "files": {h:
# {"complete", "incomplete", "downloaded"}}, "flags": {...}} keyed the same way, or a
# {"failure reason": ...}. There is no transaction id: a reply is known by its action alone.
# Characters of one message: bittorrent-tracker answers 50 hashes in about 4,000; the cap leaves
# room for trackers that say more, and bounds what trio-websocket buffers before it refuses.
MAX_WS_MESSAGE_CHARS: Final = 1 << 20
MAX_JSON_INT_DIGITS: Final = 19  # 2**63 has 19 digits: a longer number is no count
_WS_COUNT_NAMES: Final = ("complete", "incomplete", "downloaded")


def encode_ws_scrape(infohashes: Sequence[bytes]) -> str:
    """A WebTorrent scrape message. Bytes over 0x7f go as their own code point (U+0080 to
    U+00FF, UTF-8 on the wire), which is how bittorrent-tracker's `bin2hex` reads them back."""
    if not infohashes or any(len(h) != 20 for h in infohashes):
        raise ValueError("a scrape asks for at least one infohash of 20 bytes")
    return json.dumps({"action": "scrape", "info_hash": [h.decode("latin-1") for h in infohashes]},
                      ensure_ascii=False, separators=(",", ":"))


def _ws_scrape_key(key: Any) -> bytes | None:
    """A JSON `files` key as the 20-byte infohash: 20 code points, each under 256, or None."""
    if not isinstance(key, str) or len(key) != 20:
        return None
    try:
        return key.encode("latin-1")
    except UnicodeEncodeError:
        return None


def _json_int(digits: str) -> int | None:
    """A JSON integer, or None past 19 digits: no count is that large, and converting
    thousands of digits costs time quadratic in their number."""
    return int(digits) if len(digits.lstrip("-")) <= MAX_JSON_INT_DIGITS else None


def _json_text(value: Any) -> str:
    """A JSON value quoted in a message: strings shortened, anything else by its kind (a
    nested value's repr could be a megabyte, or recurse too deep)."""
    return repr(value[:200]) if isinstance(value, str) else f"of type {type(value).__name__}"


def decode_ws_scrape_untrusted(message: str | bytes) -> HttpScrapeReply:
    """A WebTorrent tracker's answer to a scrape, from one WebSocket message (text, or bytes in
    UTF-8). NotAScrapeReply for a message with another action (the reader skips it); any other
    flaw, a `failure reason` included, is a ProtocolError."""
    if len(message) > MAX_WS_MESSAGE_CHARS:
        raise ProtocolError(f"tracker message of {len(message):,} characters, over the "
                            f"{MAX_WS_MESSAGE_CHARS:,} limit")
    try:
        text = message.decode("utf-8") if isinstance(message, bytes) else message
        # RecursionError: nesting deeper than the interpreter's stack allows (json recurses).
        reply = json.loads(text, parse_int=_json_int)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError too
        raise ProtocolError(f"tracker message is not JSON: {str(exc)[:100]}") from None
    if not isinstance(reply, dict):
        raise ProtocolError("tracker message is not a JSON object")
    action = reply.get("action")
    failure = reply.get("failure reason")
    # bittorrent-tracker leaves the action out of a failure for a request it could not parse.
    if failure is not None and action in (None, "scrape"):
        raise ProtocolError(f"tracker failure: {_json_text(failure)}")
    if action != "scrape":
        raise NotAScrapeReply(f"tracker message with action {_json_text(action)}, not 'scrape'")
    return _scrape_files_untrusted(reply.get("files"), _ws_scrape_key, _WS_COUNT_NAMES)


# ---- Peer wire: what a peer holds (BEP 3, BEP 6, BEP 10) ----

PEER_PROTOCOL: Final = b"\x13BitTorrent protocol"
PEER_HANDSHAKE_LENGTH: Final = 68  # the protocol string, 8 reserved bytes, infohash, peer id
# Reserved bits we set: BEP 10 extensions (byte 5, 0x10) and BEP 6 fast (byte 7, 0x04), so a
# seed may answer have_all in one message instead of a bitfield.
PEER_RESERVED: Final = bytes([0, 0, 0, 0, 0, 0x10, 0, 0x04])
PEER_MAX_MESSAGE: Final = 1 << 20  # a bitfield of 8 M pieces; anything longer is refused


class PeerMessage(enum.IntEnum):
    HAVE = 4
    BITFIELD = 5
    HAVE_ALL = 14  # BEP 6
    HAVE_NONE = 15
    EXTENDED = 20  # BEP 10


# BEP 9 metadata: the info dictionary in 16 KiB pieces, from a peer that has it.
METADATA_PIECE_BYTES: Final = 16384
MAX_METADATA_BYTES: Final = 4 << 20  # an info dict of 100,000 files is about 3 MiB
UT_METADATA_OURS: Final = 1  # the extended id we ask peers to send ut_metadata messages with


class MetadataMessage(enum.IntEnum):
    REQUEST = 0
    DATA = 1
    REJECT = 2


def encode_peer_message(kind: int, payload: bytes = b"") -> bytes:
    return (1 + len(payload)).to_bytes(4, "big") + bytes([kind]) + payload


def encode_extended_handshake() -> bytes:
    """Our BEP 10 handshake: only ut_metadata, to be sent the info dictionary. No listen port,
    no `reqq`: nothing that asks the peer to connect back or to send data."""
    return encode_peer_message(PeerMessage.EXTENDED, b"\x00" + bencode(
        {b"m": {b"ut_metadata": UT_METADATA_OURS}}))


def encode_metadata_request(peer_ut_metadata: int, piece: int) -> bytes:
    return encode_peer_message(PeerMessage.EXTENDED, bytes([peer_ut_metadata]) + bencode(
        {b"msg_type": MetadataMessage.REQUEST, b"piece": piece}))


def decode_extended_handshake_untrusted(payload: bytes) -> tuple[int | None, int | None]:
    """(the peer's ut_metadata id, metadata_size) of its BEP 10 handshake (the payload after
    the extended id 0); None for what it does not offer. ProtocolError for a broken one. A
    size over MAX_METADATA_BYTES is returned as it is: a huge torrent, not a broken peer."""
    message = bdecode_untrusted(payload)
    if not isinstance(message, dict):
        raise ProtocolError("extended handshake is not a dictionary")
    names = message.get(b"m")
    ut_id = names.get(b"ut_metadata") if isinstance(names, dict) else None
    size = message.get(b"metadata_size")
    if not isinstance(ut_id, int) or isinstance(ut_id, bool) or not 1 <= ut_id <= 255:
        ut_id = None  # 0 disables it; no id: not offered
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        size = None
    return ut_id, size


def decode_metadata_message_untrusted(payload: bytes) -> tuple[int, int, bytes]:
    """(msg_type, piece, the bytes after the dictionary) of a ut_metadata message (the payload
    after its extended id). ProtocolError for a broken one."""
    end = _skip_value_at(payload, 0) if payload else 0
    header = bdecode_untrusted(payload[:end]) if end else None
    if not isinstance(header, dict):
        raise ProtocolError("ut_metadata message is not a dictionary")
    kind, piece = header.get(b"msg_type"), header.get(b"piece")
    if not isinstance(kind, int) or not isinstance(piece, int) or isinstance(piece, bool) \
            or piece < 0:
        raise ProtocolError("ut_metadata message without a msg_type and a piece")
    return kind, piece, payload[end:]


@dataclass(slots=True)
class MetadataAssembly:
    """The info dictionary of one torrent, a piece at a time from one peer, checked whole
    against the infohash: SHA-1 (v1, hybrid) or truncated SHA-256 (v2)."""

    infohash: bytes
    size: int
    pieces: dict[int, bytes] = field(default_factory=dict)

    @property
    def piece_count(self) -> int:
        return -(-self.size // METADATA_PIECE_BYTES)

    def take_untrusted(self, piece: int, data: bytes) -> bytes | None:
        """One piece; the whole info dictionary once every piece is in and it hashes to the
        infohash. ProtocolError for a piece out of range or of the wrong length, and for
        metadata of another torrent."""
        if piece >= self.piece_count:
            raise ProtocolError(f"metadata piece {piece} of {self.piece_count}")
        expected = min(METADATA_PIECE_BYTES, self.size - piece * METADATA_PIECE_BYTES)
        if len(data) != expected:
            raise ProtocolError(f"metadata piece {piece} of {len(data):,} bytes, not "
                                f"{expected:,}")
        self.pieces[piece] = data
        if len(self.pieces) < self.piece_count:
            return None
        info = b"".join(self.pieces[index] for index in range(self.piece_count))
        if hashlib.sha1(info).digest() != self.infohash and \
                hashlib.sha256(info).digest()[:20] != self.infohash:
            raise ProtocolError("metadata that does not hash to the infohash")
        return info


def metainfo_from_info_untrusted(info: bytes, infohash: bytes) -> Metainfo:
    """What a fetched info dictionary tells, as sync stores a .torrent's: no trackers, no web
    seeds (those live outside `info`). ProtocolError for one that tsmd would not read, or that
    is not the torrent's."""
    meta = decode_metainfo_untrusted(b"d4:info" + info + b"e")
    if meta.infohash != infohash.hex():
        raise ProtocolError("metadata of another torrent")  # a v2 hash of a hybrid's info
    return meta


def encode_peer_handshake(infohash: bytes, peer_id: bytes) -> bytes:
    return PEER_PROTOCOL + PEER_RESERVED + infohash + peer_id


def decode_peer_handshake_untrusted(data: bytes, infohash: bytes) -> bytes:
    """The peer id of a handshake for `infohash`; WrongTorrentError for another torrent's,
    ProtocolError for anything else."""
    if len(data) != PEER_HANDSHAKE_LENGTH or not data.startswith(PEER_PROTOCOL):
        raise ProtocolError("not a BitTorrent handshake")
    if data[28:48] != infohash:
        raise WrongTorrentError(f"handshake for another torrent ({data[28:48].hex()})")
    return data[48:]


@dataclass(slots=True)
class PeerHoldings:
    """The pieces one peer says it has: its bitfield (BEP 3 order: piece 0 is the first byte's
    high bit), or have_all/have_none, and the have messages after, each set in place (a flood
    of haves costs a bit each, never a new big number)."""

    piece_count: int | None  # None: unknown (no metainfo); only have_all then tells a seed
    bits: bytearray | None = None  # its bitfield; None until a bitfield, have_none or have
    have_all: bool = False
    held: int = 0  # pieces set in `bits`
    bitfield_bytes: int | None = None  # the length of its bitfield message, if it sent one

    def take_untrusted(self, kind: int, payload: bytes) -> None:
        """One message; ProtocolError for one that breaks BEP 3 (a bitfield of the wrong
        length or with spare bits set, a have past the last piece). The last of bitfield,
        have_all and have_none counts."""
        if kind == PeerMessage.HAVE_ALL:
            self.have_all, self.bits, self.held = True, None, 0
        elif kind == PeerMessage.HAVE_NONE:
            self.have_all, self.bits, self.held = False, bytearray(), 0
        elif kind == PeerMessage.BITFIELD:
            self.held = _bitfield_untrusted(payload, self.piece_count).bit_count()
            self.have_all, self.bits = False, bytearray(payload)
            self.bitfield_bytes = len(payload)
        elif kind == PeerMessage.HAVE:
            if len(payload) != 4:
                raise ProtocolError(f"have of {len(payload)} bytes")
            index = int.from_bytes(payload, "big")
            last = self.piece_count if self.piece_count is not None else PEER_MAX_MESSAGE * 8
            if index >= last:
                raise ProtocolError(f"have of piece {index:,} of {last:,}")
            if not self.have_all:
                bits = self.bits if self.bits is not None else bytearray()
                if len(bits) <= index >> 3:
                    bits.extend(bytes((index >> 3) + 1 - len(bits)))
                bit = 0x80 >> (index & 7)
                if not bits[index >> 3] & bit:
                    bits[index >> 3] |= bit
                    self.held += 1
                self.bits = bits
        # Anything else (choke, unchoke, port, suggest, allowed fast, extended) tells nothing
        # of what the peer holds.

    @property
    def answered(self) -> bool:
        return self.have_all or self.bits is not None

    @property
    def complete(self) -> bool:
        """A verified seed: have_all, or every piece of a known count."""
        return self.have_all or self.piece_count is not None and self.held == self.piece_count

    def learn_piece_count(self, piece_count: int) -> None:
        """The piece count, learnt from metadata fetched after this peer told what it holds;
        ProtocolError if it claimed pieces past the last."""
        if self.piece_count is not None:
            return
        if self.bits is not None:
            size = (piece_count + 7) // 8
            if self.bitfield_bytes is not None and self.bitfield_bytes != size:
                raise ProtocolError(f"bitfield of {self.bitfield_bytes:,} bytes for "
                                    f"{piece_count:,} pieces")
            if any(self.bits[size:]) or _bitfield_int(self.bits[:size]) >> piece_count:
                raise ProtocolError(f"holds pieces past the last of {piece_count:,}")
            self.bits = self.bits[:size] + bytes(size - min(size, len(self.bits)))
        self.piece_count = piece_count

    def holds(self) -> int:
        """Its pieces as an int, bit i for piece i (every piece for have_all)."""
        assert self.piece_count is not None
        if self.have_all:
            return (1 << self.piece_count) - 1
        return _bitfield_int(self.bits or b"")


# Each byte with its bits in reverse order: BEP 3 puts piece 0 in the first byte's high bit.
_BITS_REVERSED: Final = bytes(int(f"{byte:08b}"[::-1], 2) for byte in range(256))


def _bitfield_int(bits: bytes | bytearray) -> int:
    """A BEP 3 bitfield as an int, bit i for piece i."""
    return int.from_bytes(bits.translate(_BITS_REVERSED), "little")


def _bitfield_untrusted(payload: bytes, piece_count: int | None) -> int:
    """A BEP 3 bitfield as an int, checked against the piece count if known."""
    if piece_count is not None and len(payload) != (piece_count + 7) // 8:
        raise ProtocolError(f"bitfield of {len(payload):,} bytes for {piece_count:,} pieces")
    value = _bitfield_int(payload)
    if piece_count is not None and value >> piece_count:
        raise ProtocolError("bitfield with spare bits set")
    return value


def split_peer_messages_untrusted(buffer: bytearray) -> list[tuple[int, bytes]]:
    """The whole messages at the start of `buffer` as (id, payload), taken out of it; a
    keep-alive is skipped. ProtocolError for a length over PEER_MAX_MESSAGE."""
    messages = []
    while len(buffer) >= 4:
        length = int.from_bytes(buffer[:4], "big")
        if length > PEER_MAX_MESSAGE:
            raise ProtocolError(f"message of {length:,} bytes")
        if len(buffer) < 4 + length:
            break
        if length:
            messages.append((buffer[4], bytes(buffer[5:4 + length])))
        del buffer[:4 + length]
    return messages


def distributed_copies(holdings: Sequence[PeerHoldings], piece_count: int) -> float:
    """Complete copies among `holdings`, as libtorrent's "distributed copies": how many peers
    hold the rarest piece, plus the fraction of pieces held by more than that."""
    if piece_count <= 0:
        return 0.0
    every = (1 << piece_count) - 1
    # held_by[k]: the pieces that at least k of the peers hold (bit i for piece i), built a
    # peer at a time: whole bitfields at once, not a count per piece.
    held_by = [every]
    for holding in holdings:
        if holding.answered:
            pieces = holding.holds()
            held_by.append(held_by[-1] & pieces)
            for k in range(len(held_by) - 2, 0, -1):
                held_by[k] |= held_by[k - 1] & pieces
    rarest = max(k for k, pieces in enumerate(held_by) if pieces == every)
    above = held_by[rarest + 1].bit_count() if rarest + 1 < len(held_by) else 0
    return rarest + above / piece_count


# ---- Address policy ----

# Ranges that ipaddress does not flag as private but that are not reachable on the internet.
_EXTRA_NON_GLOBAL: Final = (
    ipaddress.ip_network("100.64.0.0/10"),  # CGNAT, RFC 6598
    ipaddress.ip_network("192.0.0.0/24"),  # IETF protocol assignments
    ipaddress.ip_network("64:ff9b:1::/48"),  # local-use NAT64, RFC 8215
)
_NAT64: Final = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix


def is_global_address(address: str) -> bool:
    """True when `address` is a globally routable unicast IPv4 or IPv6 address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        # IPv4 carried inside IPv6 is judged as that IPv4 address: mapped, 6to4, Teredo's
        # client, and NAT64 (a NAT64 host reaches the whole IPv4 internet that way).
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_global_address(str(embedded))
        if ip.is_site_local:
            return False
    if not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_unspecified:
        return False
    return not any(ip in net for net in _EXTRA_NON_GLOBAL if net.version == ip.version)


# ---- Node ids and addresses (BEP 42) ----


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli, reflected
        table.append(crc)
    return tuple(table)


_CRC32C: Final = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), which BEP 42 uses; zlib only has the other CRC-32."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def bep42_verified(node_id: bytes, host: str) -> bool | None:
    """Whether `node_id` is one that BEP 42 allows `host` to use: its first 21 bits come from
    the CRC-32C of the masked address and the id's last byte. None where BEP 42 does not apply
    (local and private addresses, which it exempts, and anything that is not an IP)."""
    if len(node_id) != 20 or not is_global_address(host):
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    salt = node_id[19] & 7
    if ip.version == 4:
        masked = bytearray((int(ip) & 0x030F3FFF).to_bytes(4, "big"))
    else:
        masked = bytearray((int.from_bytes(ip.packed[:8], "big")
                            & 0x0103070F1F3F7FFF).to_bytes(8, "big"))
    masked[0] |= salt << 5
    crc = crc32c(bytes(masked))
    return (node_id[0] == crc >> 24 and node_id[1] == (crc >> 16) & 0xFF
            and node_id[2] & 0xF8 == (crc >> 8) & 0xF8)


# ---- Seeder history ----
# Each scrape run leaves one point per torrent: (time, seeders), the maximum over its trackers.
# The points are kept per torrent, thinned as they age, so reports never read a month of samples.

DAY: Final = 86400
# "About a day ago" is the last run at least 20 h before the latest one: daily cron runs drift.
CHANGE_AGES: Final = (20 * 3600, 6 * DAY + 12 * 3600)  # "about a day", "about a week" earlier
FULL_HISTORY: Final = 8 * DAY  # every run this recent is kept: the week's change reads them
TREND_DAYS: Final = 30  # the daily trend's length
KEPT_HISTORY: Final = (TREND_DAYS + 1) * DAY  # older points are kept, one per day, until then


def seeder_changes(history: Sequence[tuple[int, int]]) -> tuple[int | None, int | None,
                                                                 int | None]:
    """Seeders now minus seeders in the previous run, about a day and about a week earlier."""
    if not history:
        return None, None, None
    latest_time, latest = history[-1]
    previous = latest - history[-2][1] if len(history) > 1 else None
    earlier = []
    for age in CHANGE_AGES:
        before = [seeders for measured, seeders in history if measured <= latest_time - age]
        earlier.append(latest - before[-1] if before else None)
    return previous, earlier[0], earlier[1]


class SeederHistory:
    """One torrent's seeder points, oldest first, and its daily trend (seeders at the last run of
    each of the last TREND_DAYS days that had one).

    Every point of the last FULL_HISTORY is kept, then only the last point of each day, until
    KEPT_HISTORY. Adding the newest point touches only the points that just aged, so folding a
    run of 100,000 torrents costs a few microseconds per torrent, whatever the history's length.
    """

    __slots__ = ("times", "seeders", "days", "daily")

    def __init__(self) -> None:
        self.times, self.seeders = array("q"), array("q")
        self.days, self.daily = array("q"), array("q")

    @classmethod
    def from_stored(cls, *blobs: bytes) -> SeederHistory:
        """From the four blobs `stored` gives."""
        history = cls()
        for column, blob in zip((history.times, history.seeders, history.days, history.daily),
                                blobs):
            column.frombytes(blob)
        return history

    def stored(self) -> tuple[bytes, bytes, bytes, bytes]:
        return (self.times.tobytes(), self.seeders.tobytes(), self.days.tobytes(),
                self.daily.tobytes())

    def points(self) -> list[tuple[int, int]]:
        return list(zip(self.times, self.seeders))

    def add(self, when: int, seeders: int) -> None:
        times = self.times
        if times and when <= times[-1]:
            # Out of order (rare: a run that ended after a later one): rebuild in time order.
            merged = dict(zip(times, self.seeders))
            merged[when] = seeders
            self.__init__()  # type: ignore[misc]
            for point in sorted(merged.items()):
                self.add(*point)
            return
        previous_full = bisect.bisect_left(times, times[-1] - FULL_HISTORY) if times else 0
        times.append(when)
        self.seeders.append(seeders)
        full = bisect.bisect_left(times, when - FULL_HISTORY)
        oldest = bisect.bisect_right(times, when - KEPT_HISTORY)
        # Points older than previous_full were thinned by earlier additions already.
        for index in reversed(range(max(previous_full, oldest), full)):
            if times[index] // DAY == times[index + 1] // DAY:
                del times[index], self.seeders[index]
        del times[:oldest], self.seeders[:oldest]
        day = when // DAY
        if self.days and self.days[-1] == day:
            self.daily[-1] = seeders
        else:
            self.days.append(day)
            self.daily.append(seeders)
        first = bisect.bisect_right(self.days, day - TREND_DAYS)
        del self.days[:first], self.daily[:first]

    def trend_text(self) -> str:
        """The daily trend as "FIRST_DAY;v,v,,v": seeders at the last run of consecutive UTC days
        (numbered from 1970-01-01) from FIRST_DAY on, empty for a day without a run."""
        if not self.days:
            return ""
        by_day = dict(zip(self.days, self.daily))
        first = self.days[0]
        return f"{first};" + ",".join(str(by_day[day]) if day in by_day else ""
                                      for day in range(first, self.days[-1] + 1))

    def changes(self) -> tuple[int | None, int | None, int | None]:
        """As seeder_changes, by bisection."""
        times, seeders = self.times, self.seeders
        if not times:
            return None, None, None
        latest = seeders[-1]
        earlier = [bisect.bisect_right(times, times[-1] - age) - 1 for age in CHANGE_AGES]
        return (latest - seeders[-2] if len(times) > 1 else None,
                *(latest - seeders[index] if index >= 0 else None for index in earlier))


# ---- UDP endpoint ----

UDP_RECEIVE_BUFFER: Final = 4 * 1024 * 1024  # bytes; bulk replies arrive in bursts
UDP_MAX_DATAGRAM: Final = 65536
UDP_RECEIVE_BATCH: Final = 64  # datagrams read per wake-up before other tasks get a turn


def _plain_address(host: str) -> str:
    """The textual address as routed: IPv4-mapped IPv6 (from a dual-stack socket) as IPv4."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host.split("%", 1)[0]


@dataclass(slots=True)
class _PendingReply:
    event: trio.Event = field(default_factory=lambda: trio.Event())  # trio loaded when used
    data: Any = None  # what the endpoint's parser made of the reply

    def deliver(self, parsed: Any) -> None:
        self.data = parsed
        self.event.set()


@dataclass(slots=True)
class UdpCounters:
    sent: int = 0
    received: int = 0
    send_errors: int = 0
    receive_errors: int = 0
    dropped_unmatched: int = 0  # late, unknown or spoofed (wrong source address) replies
    dropped_invalid: int = 0  # replies whose transaction id could not even be read
    dns_answers: int = 0  # host names resolved, or found not to exist, for this endpoint


class TokenBucket:
    """At most `rate` events per second on average, in bursts of at most `burst`; rate 0 = off."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self.tokens = self.burst
        self.updated = trio.current_time() if rate else 0.0

    def _refill(self) -> None:
        now = trio.current_time()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def due(self) -> float:
        """Seconds until a token is there (0: now); takes nothing."""
        if not self.rate:
            return 0.0
        self._refill()
        # Within rounding of a whole token counts as one: a sleep of exactly the returned wait
        # can land a hair short of it, and a clock that does not move on (trio's MockClock)
        # would then spin on ever smaller waits.
        return 0.0 if self.tokens >= 1 - 1e-9 else (1 - self.tokens) / self.rate

    def take(self) -> None:
        """Take the token that `due` just found there."""
        if self.rate:
            self.tokens = max(0.0, self.tokens - 1)

    def penalise(self, seconds: float) -> None:
        """No token for `seconds` more than it would take to earn the next one."""
        if self.rate:
            self._refill()
            self.tokens = min(self.tokens, 0.0) - seconds * self.rate

    def in_debt(self) -> bool:
        """Below zero: only a penalty puts it there (`take` stops at 0)."""
        if not self.rate:
            return False
        self._refill()
        return self.tokens < 0

    def is_idle(self, now: float) -> bool:
        """Refilled: the same as a new bucket."""
        return self.tokens + (now - self.updated) * self.rate >= self.burst


def open_udp_socket(bind_host: str) -> socket.socket:
    """A non-blocking UDP socket; "::" gives one dual-stack socket for IPv4 and IPv6 peers."""
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
        except OSError:
            pass  # a smaller buffer still works, it only drops sooner under bursts
        return sock
    except BaseException:
        sock.close()
        raise


class NotSent(Exception):
    """The kernel refused a datagram (no route, a bogus address): says nothing of the peer."""


class UdpEndpoint:
    """One UDP socket; one receive task routes each reply to the request waiting for it.

    A reply is matched by (transaction key, source address); anything else is dropped, counted and
    never answered. Send errors (a bogus address taken from a hostile reply, an unreachable
    network) are counted and survived: the request simply gets no reply.

    The socket is a plain non-blocking one that trio only watches: the DHT survey sends from
    synchronous code (`send_nowait`) and takes replies as callbacks (`expect`), since a task,
    cancel scope and event per query cost more CPU than the query itself.
    """

    def __init__(self, sock: socket.socket, parse_untrusted: Any) -> None:
        """`parse_untrusted(data) -> (transaction key, parsed reply)` may raise ProtocolError."""
        self.sock = sock
        self.dual_stack = sock.family == socket.AF_INET6
        bound, self.port = sock.getsockname()[:2]
        self._bound = _plain_address(bound)
        self._own_hosts: set[str] | None = None  # see is_own_address
        self._parse = parse_untrusted
        # (key, host, port) of each reply expected -> what it is handed to, once.
        self._pending: dict[tuple[Any, str, int], Any] = {}
        self.counters = UdpCounters()
        # trio lets one task at a time wait for a socket to be writable; others queue here.
        self._write_turn: trio.Lock | None = None

    @classmethod
    def open(cls, bind: str, parse_untrusted: Any) -> UdpEndpoint:
        try:
            address, port = split_bind_address(bind)
        except ValueError as exc:
            raise TsmdError(f"cannot bind UDP {bind}: {exc}") from None
        try:
            return cls(cls._bound(address, port), parse_untrusted)
        except OSError as exc:
            if address != "::":
                raise TsmdError(f"cannot bind UDP {bind}: {exc.strerror or exc}") from None
        try:  # no IPv6 on this host: IPv4 only
            return cls(cls._bound("0.0.0.0", port), parse_untrusted)
        except OSError as exc:
            raise TsmdError(f"cannot bind UDP {bind}: {exc.strerror or exc}") from None

    @staticmethod
    def _bound(host: str, port: int) -> socket.socket:
        sock = open_udp_socket(host)
        try:
            sock.bind((host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        try:
            trio.lowlevel.notify_closing(self.sock)  # wakes a receive task still waiting on it
        except RuntimeError:
            pass  # outside trio: nobody can be waiting
        self.sock.close()

    def can_reach(self, host: str) -> bool:
        return self.dual_stack or ":" not in host

    def is_own_address(self, host: str, port: int) -> bool:
        """Whether host:port is this very socket: where a reply naming it would send us our own
        packets. A wildcard socket answers on every address of the host, the loopback range
        too. (Behind a NAT that keeps ports, our public address would be one as well; it is
        not known here.)"""
        if port != self.port:
            return False
        wildcard = self._bound in ("0.0.0.0", "::")
        if self._own_hosts is None:  # learnt on first need: the scrape stage never needs it
            self._own_hosts = {self._bound} | (host_addresses() if wildcard else set())
        host = _plain_address(host)
        return host in self._own_hosts or wildcard and (host.startswith("127.") or host == "::1")

    def send_nowait(self, data: bytes, host: str, port: int) -> bool | None:
        """True: sent. False: refused (counted). None: the socket's buffer is full; retry after
        `wait_writable`."""
        target = f"::ffff:{host}" if self.dual_stack and ":" not in host else host
        try:
            self.sock.sendto(data, (target, port))
        except BlockingIOError:
            return None
        except OSError:
            self.counters.send_errors += 1
            return False
        self.counters.sent += 1
        return True

    async def wait_writable(self) -> None:
        if self._write_turn is None:
            self._write_turn = trio.Lock()
        async with self._write_turn:
            await trio.lowlevel.wait_writable(self.sock)

    async def send(self, data: bytes, host: str, port: int) -> bool:
        await trio.lowlevel.checkpoint()
        while (sent := self.send_nowait(data, host, port)) is None:
            await self.wait_writable()
        return sent

    def expect(self, key: Any, host: str, port: int, handler: Any) -> None:
        """Hand the reply carrying `key` from host:port to `handler(parsed)`, once."""
        self._pending[(key, host, port)] = handler

    def forget(self, key: Any, host: str, port: int) -> None:
        """Stop expecting a reply: one that comes later is dropped as unmatched."""
        self._pending.pop((key, host, port), None)

    async def request(self, data: bytes, host: str, port: int, key: Any,
                      timeout: float) -> Any:
        """Send `data` and wait up to `timeout` s for the reply carrying `key` from host:port:
        None when none came. NotSent when the packet could not even leave (counted)."""
        slot_key = (key, host, port)
        if slot_key in self._pending:
            raise ValueError(f"transaction {key!r} to {host}:{port} already pending")
        slot = _PendingReply()
        deliver = self._pending[slot_key] = slot.deliver
        try:
            if not await self.send(data, host, port):
                raise NotSent(f"{host}:{port}")
            with trio.move_on_after(timeout):
                await slot.event.wait()
            return slot.data
        finally:
            if self._pending.get(slot_key) is deliver:  # not handed its reply yet
                del self._pending[slot_key]

    def is_pending(self, key: Any, host: str, port: int) -> bool:
        return (key, host, port) in self._pending

    async def receive_forever(self) -> None:
        sock, counters, pending, parse = self.sock, self.counters, self._pending, self._parse
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(UDP_RECEIVE_BATCH):
                try:
                    data, address = sock.recvfrom(UDP_MAX_DATAGRAM)
                except BlockingIOError:
                    break
                except OSError:
                    # ICMP errors from earlier sends surface here on Linux; they belong to no
                    # request.
                    counters.receive_errors += 1
                    continue
                counters.received += 1
                try:
                    key, parsed = parse(data)
                except ProtocolError:
                    counters.dropped_invalid += 1
                    continue
                # Taken out as it is handed over: a duplicate finds nothing, like a stranger.
                handler = pending.pop((key, _plain_address(address[0]), address[1]), None)
                if handler is None:
                    counters.dropped_unmatched += 1
                else:
                    handler(parsed)


def host_addresses() -> set[str]:
    """This host's own addresses on its default IPv4 and IPv6 routes, learnt without sending
    anything: a connect() on UDP only consults the routing table. (Resolving the host's name
    would find more, but can hang for seconds where DNS is down.)"""
    found = set()
    for family, public in ((socket.AF_INET, "8.8.8.8"), (socket.AF_INET6, "2001:4860:4860::8888")):
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((public, 53))
            found.add(_plain_address(probe.getsockname()[0]))
    return found


def split_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or `v6` (with a default port) as (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not port_text:
        if default_port is None:
            raise ValueError(f"{text!r} has no port (expected HOST:PORT)")
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r} has no valid port")
    return host, int(port_text)


def split_bind_address(text: str) -> tuple[str, int]:
    """The ADDR:PORT of a local socket (port 0 when left out); ADDR must be an IP address."""
    host, port = split_host_port(text, default_port=0)
    address = ip_literal_address(host)
    if address is None:
        raise ValueError(f"{host!r} is not an IP address")
    return address, port


# ---- HTTP and file fetch ----


@dataclass(frozen=True, slots=True)
class FetchResult:
    url: str  # after redirects
    status: int  # 200, or 304 when the conditional request found it unchanged
    body: bytes
    etag: str | None
    last_modified: str | None
    content_type: str
    link: str = ""  # the Link header (RFC 8288): a listing's rel="next" page
    content_encoding: str = ""  # set only for a `raw` fetch, whose body is still encoded
    content_range: str = ""  # of a 206, the answer to a `byte_range` fetch


def decode_content_untrusted(body: bytes, encoding: str, max_bytes: int) -> bytes:
    """`body` as sent with Content-Encoding `encoding` (gzip, deflate, identity), decoded into
    at most `max_bytes`: a small bomb that inflates to gigabytes is one error, costing no more
    than the cap."""
    if encoding.strip().lower() in ("", "identity"):
        return body
    return b"".join(decoded_pieces_untrusted(body, encoding, max_bytes))


def decoded_pieces_untrusted(body: bytes, encoding: str, max_bytes: int) -> Iterator[bytes]:
    """decode_content_untrusted a piece at a time (at most INFLATE_CHUNK bytes each), for a
    reader that keeps little of what it reads (a full scrape of a million swarms). Raises
    only ProtocolError."""
    import zlib

    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        for start in range(0, len(body), INFLATE_CHUNK):
            yield body[start:start + INFLATE_CHUNK]
        return
    if encoding in ("gzip", "x-gzip"):
        windows = [16 + zlib.MAX_WBITS]
    elif encoding == "deflate":  # zlib-wrapped as RFC 9110 says; raw deflate as some send it
        windows = [zlib.MAX_WBITS, -zlib.MAX_WBITS]
    else:
        raise ProtocolError(f"unsupported Content-Encoding {encoding[:40]!r}")
    for window in windows:
        begun = False
        try:
            for piece in _inflated_pieces(body, window, max_bytes, encoding):
                begun = True
                yield piece
            return
        except zlib.error as exc:
            # The other window only while nothing was decoded: a wrong header fails at once.
            if begun or window is windows[-1]:
                raise ProtocolError(f"broken {encoding} data: {exc}") from None


MAX_GZIP_MEMBERS: Final = 1000  # a .gz of concatenated files holds a few; more is an attack
INFLATE_CHUNK: Final = 1 << 16


def _inflated_pieces(body: bytes, window: int, max_bytes: int, encoding: str) -> Iterator[bytes]:
    """zlib's inflate of every member in `body` (a .gz file may hold several, one after the
    other), into at most `max_bytes`, INFLATE_CHUNK bytes at a time both ways: what follows a
    member is never copied whole (tiny members one after another would cost quadratic time),
    and 64 KiB of input that inflates to megabytes comes out in pieces."""
    import zlib

    view, offset, decoded = memoryview(body), 0, 0
    for _ in range(MAX_GZIP_MEMBERS):
        inflater = zlib.decompressobj(window)
        while not inflater.eof and offset < len(view):
            chunk = view[offset:offset + INFLATE_CHUNK]
            data: bytes | memoryview = chunk
            while data:
                piece = inflater.decompress(data, INFLATE_CHUNK)
                decoded += len(piece)
                if decoded > max_bytes:
                    raise ProtocolError(f"{encoding} data inflates to more than {max_bytes:,} "
                                        "bytes, over the limit")
                if piece:
                    yield piece
                data = inflater.unconsumed_tail
            offset += len(chunk) - len(inflater.unused_data)
        if not inflater.eof:
            raise ProtocolError(f"truncated {encoding} data")
        if offset == len(view):
            return
        if window == zlib.MAX_WBITS or window < 0 \
                or not is_gzip_file(bytes(view[offset:offset + 2])):
            raise ProtocolError(f"{encoding} data followed by {len(view) - offset:,} other bytes")
    raise ProtocolError(f"{encoding} data of more than {MAX_GZIP_MEMBERS:,} members")


def is_gzip_file(body: bytes) -> bool:
    return body[:2] == b"\x1f\x8b"


async def in_worker_thread(function: Callable[..., Any], *args: Any,
                           abandon_on_cancel: bool = False) -> Any:
    """trio.to_thread.run_sync, with the lazily imported modules loaded here first: LazyLoader
    is not thread-safe before Python 3.12 (CPython gh-114763), and threads loading hashlib at
    the same moment see a module without sha1."""
    for module in (base64, hashlib, html, random):
        _ = module.__name__  # the first attribute read executes the module, in this thread
    return await trio.to_thread.run_sync(function, *args, abandon_on_cancel=abandon_on_cancel)


# getaddrinfo's answers that the name does not exist (as opposed to no DNS server answering).
_NO_SUCH_NAME: Final = frozenset(getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA")
                                 if hasattr(socket, name))


async def resolve_addresses(host: str, port: int) -> list[str]:
    """The distinct addresses of `host`, as text. A name that does not resolve, or cannot even
    be encoded for DNS, is a FetchError naming it; NoSuchHost when DNS said it does not exist."""
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError) as exc:
        error = NoSuchHost if getattr(exc, "errno", None) in _NO_SUCH_NAME else FetchError
        raise error(f"cannot resolve {host[:80]}: {getattr(exc, 'strerror', None) or exc}"
                    ) from None
    return list(dict.fromkeys(_plain_address(info[4][0]) for info in infos))


@dataclass(slots=True)
class _HttpConnection:
    stream: trio.abc.Stream
    protocol: h11.Connection
    reused: bool = False
    idle_since: float = 0.0


HTTP_KEEPALIVE_SECONDS: Final = 5.0  # idle connections older than this are closed, not reused
HTTP_IDLE_PER_ORIGIN: Final = 8
# Each piece of a body, as h11 hands it over (a chunk of a chunked body, or what one read
# brought), counts this many bytes more against twice the size cap: a server sending one byte
# at a time must not keep a download busy (and its parser's objects alive) for long.
HTTP_PIECE_COST: Final = 64


_URL_KEEP: Final = "/%:@!$&'()*+,;=?~-._"  # characters a request target may carry as they are


def ascii_request_parts(url: str) -> tuple[str, str, int, str, str]:
    """(scheme, host, port, authority, target) of an http(s) URL as they go on the wire: the
    host IDNA-encoded, path and query percent-encoded (links on real pages are often neither)."""
    parts = urllib.parse.urlsplit(url)
    scheme, host = parts.scheme.lower(), parts.hostname or ""
    try:
        port = parts.port
    except ValueError as exc:
        raise FetchError(f"bad URL: {exc}") from None
    if scheme not in HTTP_SCHEMES or not host or port == 0:
        raise FetchError("bad URL: expected http(s)://host[:port]/...")
    if not _is_ip_literal(host):
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise FetchError(f"bad host name {host[:80]!r}") from None
    default = 443 if scheme == "https" else 80
    port = port or default
    bracketed = f"[{host}]" if ":" in host else host
    authority = bracketed if port == default else f"{bracketed}:{port}"
    path = urllib.parse.quote(parts.path or "/", safe=_URL_KEEP)
    query = urllib.parse.quote(parts.query, safe=_URL_KEEP)
    return scheme, host, port, authority, path + (f"?{query}" if query else "")


class HttpClient:
    """A small keep-alive HTTP/1.1 client: h11 over trio streams, one pool per origin.

    It resolves host names itself and connects only to addresses the policy allows. The check
    happens at connect time, on the very address the socket connects to, so neither a redirect
    nor a DNS answer that changes between check and use (rebinding) reaches the host's own network.
    """

    def __init__(self, *, allow_private: bool, proxy: str | None, connect_timeout: float,
                 read_timeout: float, resolve: Any = None, address_allowed: Any = None) -> None:
        self.allow_private = allow_private
        self.proxy = urllib.parse.urlsplit(proxy) if proxy else None
        self.proxy_headers: list[tuple[str, str]] = []
        if self.proxy is not None and self.proxy.username is not None:
            credentials = f"{urllib.parse.unquote(self.proxy.username)}:" \
                          f"{urllib.parse.unquote(self.proxy.password or '')}"
            self.proxy_headers.append(("Proxy-Authorization", "Basic " + base64.b64encode(
                credentials.encode()).decode()))
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._resolve = resolve or resolve_addresses
        self._address_allowed = address_allowed or is_global_address
        # Answers from the network of any kind (a DNS answer, a TCP connection made or refused,
        # an HTTP response): a stage in which nothing answered at all found the network down.
        # `connected` counts the connections alone: a host without a resolver says a name does
        # not exist at once, which proves nothing of the network. `refused` counts the hosts
        # tsmd itself refused (not public addresses): a setting's fault, not the network's.
        self.heard = 0
        self.connected = 0
        self.refused = 0
        self._idle: dict[tuple[str, str, int], list[_HttpConnection]] = {}
        self._ssl_context: Any = None

    async def aclose(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                await trio.aclose_forcefully(connection.stream)
        self._idle.clear()

    async def close_origin(self, url: str) -> None:
        """Close the idle connections to `url`'s origin (a tracker that is done)."""
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        for connection in self._idle.pop((parts.scheme, parts.hostname or "", port), []):
            await trio.aclose_forcefully(connection.stream)

    async def _idle_connection(self, key: tuple[str, str, int]) -> _HttpConnection | None:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if trio.current_time() - connection.idle_since < HTTP_KEEPALIVE_SECONDS:
                return connection
            await trio.aclose_forcefully(connection.stream)
        return None

    async def _open_tcp(self, host: str, port: int, check: bool) -> trio.SocketStream:
        try:
            addresses = await self._resolve(host, port)
        except NoSuchHost:
            self.heard += 1
            raise
        self.heard += ip_literal_address(host) is None  # a DNS answer, not a literal's echo
        if not addresses:
            raise FetchError(f"{host} has no address")
        if check and not self.allow_private:
            allowed = [a for a in addresses if self._address_allowed(a)]
            if not allowed:
                self.refused += 1
                raise AddressRefused(
                    f"refused to connect to {host} ({', '.join(addresses[:3])}): not a public "
                    "address (set allow_private = true in [network] for a LAN)")
            addresses = allowed
        # IPv4 first: on a host with broken IPv6 a v6 attempt would eat the connect timeout.
        addresses.sort(key=lambda address: ":" in address)
        last_error: OSError | None = None
        for address in addresses:
            try:
                with trio.fail_after(self.connect_timeout):
                    stream = await trio.open_tcp_stream(address, port)
            except trio.TooSlowError:
                last_error = OSError(f"connection to {address} port {port} timed out")
                continue
            except OSError as exc:
                last_error = exc
                refused = any(isinstance(leaf, ConnectionRefusedError)
                              for leaf in _leaf_exceptions(exc.__cause__ or exc))
                self.heard += refused
                self.connected += refused
                continue
            self.heard += 1
            self.connected += 1
            stream.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
            return stream
        raise FetchError(f"cannot connect to {host} port {port}: "
                         f"{getattr(last_error, 'strerror', None) or last_error}")

    async def _tls(self, stream: trio.abc.Stream, host: str) -> trio.SSLStream:
        import ssl

        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        tls = trio.SSLStream(stream, self._ssl_context, server_hostname=host,
                             https_compatible=True)
        try:
            with trio.fail_after(self.connect_timeout):
                await tls.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            raise FetchError(f"TLS with {host} failed: {exc.__cause__ or exc}") from None
        except trio.TooSlowError:
            raise FetchError(f"TLS with {host} timed out") from None
        return tls

    async def _connect(self, scheme: str, host: str, port: int) -> _HttpConnection:
        # Plain http goes to a proxy in absolute form, https through a CONNECT tunnel.
        https = scheme == "https"
        stream = await self.open_stream(host, port, tls=https, tunnel=https)
        return _HttpConnection(stream, h11.Connection(h11.CLIENT))

    async def open_stream(self, host: str, port: int, *, tls: bool, tunnel: bool = True
                          ) -> trio.abc.Stream:
        """A stream to `host` `port` under the address policy, with TLS (SNI `host`) on top
        when `tls`. With a proxy configured: a CONNECT tunnel through it, or with `tunnel`
        false the stream to the proxy itself (for plain http in absolute form). FetchError
        when it cannot be had; AddressRefused when the policy forbids the host."""
        if self.proxy is None:
            stream: trio.abc.Stream = await self._open_tcp(host, port, check=True)
        else:
            # Through the configured proxy: the proxy itself may sit on the LAN; what it
            # reaches is its policy.
            proxy_port = self.proxy.port or (443 if self.proxy.scheme == "https" else 80)
            stream = await self._open_tcp(self.proxy.hostname or "", proxy_port, check=False)
        try:
            if self.proxy is not None and self.proxy.scheme == "https":
                stream = await self._tls(stream, self.proxy.hostname or "")
            if self.proxy is not None and tunnel:
                await self._tunnel(stream, host, port)
            return await self._tls(stream, host) if tls else stream
        except BaseException:  # a half-made stream is closed, whatever stopped it
            await trio.aclose_forcefully(stream)
            raise

    async def _tunnel(self, stream: trio.abc.Stream, host: str, port: int) -> None:
        """CONNECT `host` `port` through the proxy at the other end of `stream`."""
        connection = _HttpConnection(stream, h11.Connection(h11.CLIENT))
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            await self._send(connection, "CONNECT", authority, authority, self.proxy_headers)
            status, _, _ = await self._receive(connection, 65536, head_only=True)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                h11.ProtocolError) as exc:
            raise FetchError(f"proxy failed on CONNECT to {authority}: {exc or 'closed'}"
                             ) from None
        if status != 200:
            raise FetchError(f"proxy refused CONNECT to {authority}: HTTP {status}")

    async def _send(self, connection: _HttpConnection, method: str, target: str, host: str,
                    headers: list[tuple[str, str]]) -> None:
        request = h11.Request(method=method, target=target, headers=[("Host", host), *headers])
        data = connection.protocol.send(request) + (connection.protocol.send(h11.EndOfMessage())
                                                    or b"")
        await connection.stream.send_all(data)

    async def _receive(self, connection: _HttpConnection, max_bytes: int, *,
                       head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        protocol = connection.protocol
        status, headers, body, pieces = 0, {}, bytearray(), 0
        while True:
            event = protocol.next_event()
            if event is h11.NEED_DATA:
                with trio.move_on_after(self.read_timeout) as waited:
                    data = await connection.stream.receive_some(65536)
                if waited.cancelled_caught:
                    raise FetchError(f"timed out: no data for {self.read_timeout:g} s")
                protocol.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                           for k, v in event.headers}
                if head_only:
                    return status, headers, b""
                declared = headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes and status == 200:
                    raise ResponseTooBig(f"{int(declared):,} bytes, over the {max_bytes:,}-byte "
                                         "limit")
            elif isinstance(event, h11.Data):
                body += event.data
                pieces += 1
                if len(body) > max_bytes:
                    raise ResponseTooBig(f"more than {max_bytes:,} bytes, over the limit")
                if len(body) + pieces * HTTP_PIECE_COST > 2 * max_bytes:
                    raise ResponseTooBig(f"{len(body):,} bytes in {pieces:,} pieces, over the "
                                         "limit")
            elif isinstance(event, h11.EndOfMessage):
                return status, headers, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                raise trio.BrokenResourceError("connection closed before the response")

    async def get(self, url: str, headers: list[tuple[str, str]], max_bytes: int
                  ) -> tuple[int, dict[str, str], bytes]:
        scheme, host, port, authority, target = ascii_request_parts(url)
        plain_proxy = self.proxy is not None and scheme == "http"
        if plain_proxy:
            target = f"{scheme}://{authority}{target}"
        key = (scheme, host, port)
        for attempt in range(2):
            # A retry always gets a fresh connection: the next idle one may be just as stale.
            connection = (await self._idle_connection(key) if attempt == 0 else None) \
                or await self._connect(scheme, host, port)
            try:
                await self._send(connection, "GET", target, authority,
                                 headers + self.proxy_headers if plain_proxy else headers)
                result = await self._receive(connection, max_bytes)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                await trio.aclose_forcefully(connection.stream)
                # A kept-alive connection the server closed meanwhile gets one fresh retry.
                if connection.reused and attempt == 0:
                    continue
                raise FetchError(f"connection failed: {exc.__cause__ or exc or 'closed'}") from None
            except h11.ProtocolError as exc:
                await trio.aclose_forcefully(connection.stream)
                # Servers that close idle connections without saying so (opentracker) show up
                # as a response cut short on a reused connection: retry it once, fresh.
                if connection.reused and attempt == 0:
                    continue
                raise FetchError(f"broken HTTP response: {exc}") from None
            except BaseException:
                await trio.aclose_forcefully(connection.stream)
                raise
            protocol = connection.protocol
            idle = self._idle.setdefault(key, [])
            if protocol.our_state is h11.DONE and protocol.their_state is h11.DONE \
                    and len(idle) < HTTP_IDLE_PER_ORIGIN:
                protocol.start_next_cycle()
                connection.reused = True
                connection.idle_since = trio.current_time()
                idle.append(connection)
            else:
                await trio.aclose_forcefully(connection.stream)
            return result
        raise AssertionError("unreachable")


class Fetcher:
    """Fetches http(s) and file URLs with size caps, timeouts, a redirect limit and the policy."""

    def __init__(self, *, allow_private: bool, proxy: str | None, timeout: float,
                 connect_timeout: float, user_agent: str, max_redirects: int,
                 resolve: Any = None, address_allowed: Any = None,
                 per_host_concurrency: int = 0, per_host_rate: float = 0.0,
                 collection_server: bool = False) -> None:
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        # One deadline for a whole download, redirects included: a server trickling a byte per
        # read timeout, at every hop of a redirect chain, cannot hold a download slot for long.
        self.deadline = connect_timeout + 4 * timeout
        self.user_agent = user_agent
        self.max_redirects = max_redirects
        self.allow_private = allow_private
        self.proxy = proxy
        self.requests = 0
        # Politeness towards one server (0 lifts each): requests in flight, and requests a
        # second. For collection servers (not trackers, whose scrape has its own retries and
        # bounds), a 429 or 503's Retry-After holds back every request to that host, and
        # gzip is accepted (listings are large, and often served compressed).
        self.collection_server = collection_server
        self.per_host_concurrency = per_host_concurrency
        self.per_host_interval = 1 / per_host_rate if per_host_rate > 0 else 0.0
        self._host_slots: dict[str, trio.CapacityLimiter] = {}
        self._host_next: dict[str, float] = {}
        self._client = HttpClient(allow_private=allow_private, proxy=proxy,
                                  connect_timeout=connect_timeout, read_timeout=timeout,
                                  resolve=resolve, address_allowed=address_allowed)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def close_origin(self, url: str) -> None:
        await self._client.close_origin(url)

    async def open_stream(self, host: str, port: int, *, tls: bool) -> trio.abc.Stream:
        """A connected stream to `host` `port` for another protocol over TCP (a WebSocket):
        the same address policy, proxy (a CONNECT tunnel) and timeouts as a fetch. Only
        FetchError comes out of here; AddressRefused when the policy forbids the host."""
        literal = ip_literal_address(host)
        if self.proxy and not self.allow_private and literal is not None \
                and not is_global_address(literal):
            raise AddressRefused(f"refused, {host} is not a public address")
        self.requests += 1
        return await self._client.open_stream(host, port, tls=tls)

    async def fetch(self, url: str, *, max_bytes: int, etag: str | None = None,
                    last_modified: str | None = None, allow_local: bool = False,
                    raw: bool = False, byte_range: tuple[int, int] | None = None
                    ) -> FetchResult:
        """GET `url`; with `etag`/`last_modified` a 304 comes back as status 304 and no body.
        With `raw`, gzip is asked for and the body comes as sent (its `content_encoding` says
        how), for the caller to decode a piece at a time; `max_bytes` bounds the encoded size.
        With `byte_range` (first, last), only those bytes are asked for: the answer is a 206
        with them (its status says so), or a 200 with the whole body.

        Only FetchError comes out of here. A `file:` URL is read only with `allow_local` (the
        configured collection, or entries of a local index), and never after a redirect.
        """
        try:
            with trio.fail_after(self.deadline) as deadline:
                return await self._fetch(url, max_bytes, etag, last_modified, allow_local,
                                         deadline, raw, byte_range)
        except trio.TooSlowError:
            text = f"{url}: timed out after {self.deadline:g} s"
        except (ValueError, UnicodeError, h11.LocalProtocolError) as exc:
            raise FetchError(f"{url[:MAX_URL_IN_MESSAGE]}: bad URL: {exc}") from None
        except FetchError as exc:
            raise exc.reworded(_shorten_url_in(str(exc), url)) from None
        raise FetchError(_shorten_url_in(text, url))

    async def _fetch(self, url: str, max_bytes: int, etag: str | None,
                     last_modified: str | None, allow_local: bool,
                     deadline: trio.CancelScope, raw: bool = False,
                     byte_range: tuple[int, int] | None = None) -> FetchResult:
        for hop in range(self.max_redirects + 1):
            scheme = urllib.parse.urlsplit(url).scheme.lower()
            if scheme == "file":
                if not allow_local or hop:
                    raise FetchError(f"{url}: refused, a local file must be configured, "
                                     "not linked or redirected to")
                return await in_worker_thread(_read_local, url, max_bytes, etag)
            if scheme not in HTTP_SCHEMES:
                raise FetchError(f"{url}: only http, https and file URLs are fetched")
            host = ascii_request_parts(url)[1]
            literal = ip_literal_address(host)
            if self.proxy and not self.allow_private and literal is not None \
                    and not is_global_address(literal):
                raise AddressRefused(f"{url}: refused, {host} is not a public address")
            status, headers, body = await self._paced_get(url, host, max_bytes, etag,
                                                          last_modified, deadline, raw,
                                                          byte_range)
            if status in (301, 302, 303, 307, 308):
                location = headers.get("location")
                if not location:
                    raise FetchError(f"{url}: HTTP {status} redirect without a Location")
                url = urllib.parse.urljoin(url, location)
                continue
            if status == 304 and (etag or last_modified):
                return FetchResult(url, 304, b"", etag, last_modified,
                                   headers.get("content-type", ""))
            if status == 206 and byte_range is not None:  # identity was asked for: as sent
                return FetchResult(url, 206, body, None, None, headers.get("content-type", ""),
                                   content_range=headers.get("content-range", ""))
            if status != 200:
                raise HttpStatusError(f"{url}: HTTP {status}" + _retry_after_note(status, headers),
                                      status)
            if raw:
                return FetchResult(url, 200, body, None, None, headers.get("content-type", ""),
                                   content_encoding=headers.get("content-encoding", ""))
            try:
                body = decode_content_untrusted(body, headers.get("content-encoding", ""),
                                               max_bytes)
            except ProtocolError as exc:
                raise FetchError(f"{url}: {exc}") from None
            return FetchResult(url, 200, body, headers.get("etag"),
                               headers.get("last-modified"), headers.get("content-type", ""),
                               headers.get("link", ""))
        raise FetchError(f"{url}: more than {self.max_redirects} redirects")

    async def _paced_get(self, url: str, host: str, max_bytes: int, etag: str | None,
                         last_modified: str | None, deadline: trio.CancelScope,
                         gzip: bool = False, byte_range: tuple[int, int] | None = None
                         ) -> tuple[int, dict[str, str], bytes]:
        """`_get` within the host's limits; a 429 or 503 with a short Retry-After is asked
        again (RETRY_AFTER_ATTEMPTS times at most), after that wait. Time spent waiting for
        the host moves the download's `deadline` back: it bounds the server, not the queue."""
        for attempt in range(RETRY_AFTER_ATTEMPTS + 1):
            remaining = deadline.deadline - trio.current_time()
            deadline.deadline = math.inf  # the wait for the host is not the server's time
            slots = self._host_slots.get(host)
            if slots is None and self.per_host_concurrency:
                slots = self._host_slots[host] = trio.CapacityLimiter(self.per_host_concurrency)
            async with slots if slots is not None else contextlib.nullcontext():
                now = trio.current_time()
                start = max(now, self._host_next.get(host, now))
                self._host_next[host] = start + self.per_host_interval
                await trio.sleep_until(start)
                deadline.deadline = trio.current_time() + remaining
                status, headers, body = await self._get(url, max_bytes, etag, last_modified,
                                                        gzip, byte_range)
            wait = retry_after_seconds(headers.get("retry-after", ""), time.time())
            if not self.collection_server or status not in (429, 503) or wait is None \
                    or wait > MAX_RETRY_AFTER or attempt == RETRY_AFTER_ATTEMPTS:
                return status, headers, body
            self._host_next[host] = max(self._host_next.get(host, 0.0),
                                        trio.current_time() + wait)
        raise AssertionError("unreachable")

    async def _get(self, url: str, max_bytes: int, etag: str | None,
                   last_modified: str | None, gzip: bool = False,
                   byte_range: tuple[int, int] | None = None
                   ) -> tuple[int, dict[str, str], bytes]:
        compressed = (self.collection_server or gzip) and byte_range is None
        headers = [("User-Agent", self.user_agent),
                   ("Accept-Encoding", "gzip, deflate" if compressed else "identity")]
        if byte_range is not None:
            headers.append(("Range", f"bytes={byte_range[0]}-{byte_range[1]}"))
        if etag:
            headers.append(("If-None-Match", etag))
        if last_modified:
            headers.append(("If-Modified-Since", last_modified))
        self.requests += 1
        try:
            response = await self._client.get(url, headers, max_bytes)
        except FetchError as exc:
            raise exc.reworded(f"{url}: {exc}") from None
        self._client.heard += 1
        return response

    @property
    def heard(self) -> int:
        """Answers of any kind from the network so far (HttpClient.heard)."""
        return self._client.heard

    def reached_no_server(self) -> bool:
        """Requests went out to the network and not one connected: the network is down (or
        every host name is wrong). Hosts refused by allow_private are left out: no request to
        them left this machine."""
        return self.requests > self._client.refused and not self._client.connected


def _shorten_url_in(text: str, url: str) -> str:
    """Messages name the URL; a scrape URL with 50 hashes is too long to read."""
    if text.startswith(url) and len(url) > MAX_URL_IN_MESSAGE:
        return url[:MAX_URL_IN_MESSAGE] + "…" + text[len(url):]
    return text


MAX_RETRY_AFTER: Final = 60.0  # seconds a 429/503's Retry-After is waited out; longer: next run
RETRY_AFTER_ATTEMPTS: Final = 2


def retry_after_seconds(value: str, now: float) -> float | None:
    """Seconds a Retry-After header asks to wait: delta-seconds or an HTTP date (RFC 9110)."""
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value[:12])
    if not value:
        return None
    import email.utils

    try:
        when = email.utils.parsedate_to_datetime(value[:100])
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def _retry_after_note(status: int, headers: dict[str, str]) -> str:
    value = headers.get("retry-after", "").strip()[:40]
    if status not in (429, 503) or not value:
        return ""
    return f" (asked to retry after {value}: next run)"


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def ip_literal_address(host: str) -> str | None:
    """The address a host name stands for without DNS: `10.0.0.1`, `::1`, and the forms the
    C resolver also takes for IPv4 (`2130706433`, `127.1`, `0x7f.0.0.1`, `0177.0.0.1`), with or
    without the trailing dots of a fully qualified name (`127.0.0.1.`)."""
    host = host.rstrip(".")
    if _is_ip_literal(host):
        return host
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except (OSError, UnicodeError, ValueError):
        return None


def file_url_to_path(url: str) -> Path:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise FetchError(f"{url}: file URLs on other hosts are not supported")
    # Percent-escapes are the file name's bytes, UTF-8 or not (Path.as_uri writes them so).
    return Path(os.fsdecode(urllib.parse.unquote_to_bytes(parts.path)))


def _read_local(url: str, max_bytes: int, etag: str | None) -> FetchResult:
    """A local file as a fetch result; size and modification time stand in for an ETag."""
    path = file_url_to_path(url)
    try:
        stat = path.stat()
        if not S_ISREG(stat.st_mode):
            raise FetchError(f"{path}: not a regular file")  # a FIFO or device would block
        local_etag = f'"{stat.st_size}-{stat.st_mtime_ns}"'
        if etag == local_etag:
            return FetchResult(url, 304, b"", etag, None, "")
        if stat.st_size > max_bytes:
            raise FetchError(f"{path}: {stat.st_size:,} bytes, over the {max_bytes:,}-byte limit")
        with path.open("rb") as handle:
            body = handle.read(max_bytes + 1)
    except OSError as exc:
        raise FetchError(f"{path}: {exc.strerror or exc}") from None
    if len(body) > max_bytes:
        raise FetchError(f"{path}: more than {max_bytes:,} bytes, over the limit")
    content_type = "text/html" if path.suffix.lower() in (".html", ".htm") else ""
    return FetchResult(url, 200, body, local_etag, None, content_type)


def local_index_entries(directory: Path) -> list[IndexEntry]:
    """A local directory as an index: every .torrent file directly inside it, by name."""
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() == ".torrent" and p.is_file())
    return [IndexEntry(EntryKind.URL, p.resolve().as_uri(), storable_text(p.name)) for p in files]


# ---- DHT survey ----

DHT_K: Final = 8  # BEP 5: bucket size; a lookup ends when the K closest nodes have answered
# Queries in flight per lookup (Kademlia's alpha), as in Transmission's DHT (libtorrent keeps 5):
# the 8 queries of a warm lookup go out in two waves instead of three, which with 50-300 ms round
# trips ends lookups about a quarter sooner, for 4-7 % more packets in lookups from the routers.
DHT_ALPHA: Final = 4
DHT_EVICT_AFTER_FAILURES: Final = 2  # consecutive timeouts before a node leaves the warm cache
DHT_DEAD_AFTER_FAILURES: Final = 3  # timeouts of a never-heard address before it is skipped
# An address that never answered in a run is skipped by the next runs for a while, doubling
# from 2 days up to 16: about half of the public DHT's addresses never answer (NAT, churn), and
# a warm lookup would otherwise ask the same silent ones near its target every run.
DHT_SILENT_RETRY: Final = 2 * 86400  # seconds
DHT_SILENT_RETRY_MAX: Final = 16 * 86400
DHT_SILENT_FORGET: Final = 2 * DHT_SILENT_RETRY_MAX  # a silent address not met again is dropped
DHT_NODE_MAX_AGE: Final = 3 * 86400  # seconds; older cached nodes are not loaded any more
DHT_ERROR_BACKOFF: Final = 10.0  # seconds of silence towards a node that said 201/202
DHT_WRITE_BATCH: Final = 500  # samples per transaction
UNKNOWN_DISTANCE: Final = 1 << 160  # a bootstrap router's id is unknown until it answers
DHT_LOOKUPS_PER_NODE: Final = 10  # lookups in flight per cached node, once K are cached
# Sybil defences. The closest of N random ids lies about 2^160 / N from a target; one 2^10
# times closer happens to an honest node once in ~1,000 lookups, and is what a sybil claims.
DHT_CLOSE_ID_MARGIN_BITS: Final = 10
DHT_ASSUMED_SIZE_BITS: Final = 24  # 16 M nodes (the public DHT's order) until lookups tell
# The IPv6 DHT is a small fraction of the IPv4 one (every client's IPv6 routing table is far
# emptier); with no published count at hand, a million is assumed, two at most. Were it four
# times that, an honest node would be suspect in about one IPv6 lookup in 256.
DHT_ASSUMED_IPV6_SIZE_BITS: Final = 20
DHT_SIZE_SAMPLES: Final = 101  # lookups whose closest nodes estimate the network's size
DHT_SIZE_MIN_SAMPLES: Final = 8
# libtorrent sends 100 values at most (dht_max_peers_reply); a reply that holds more than
# twice that is made up, and none of its values count.
DHT_MAX_VALUES_PER_REPLY: Final = 200
DHT_SUBNET_TAKEOVERS: Final = 3  # times a lookup lets a /24 whose node failed try another


def _id_int(node_id: bytes) -> int:
    return int.from_bytes(node_id, "big")


def _implausibly_close(size_bits: float) -> int:
    """The distance from a target under which an id is suspect, in a DHT of 2^size_bits."""
    return 1 << max(0, int(160 - size_bits - DHT_CLOSE_ID_MARGIN_BITS))


# BEP 32: IPv4 and IPv6 nodes form two DHTs, each routing to its own family only. A cache key
# is the id with this bit set for an IPv6 node, so each family's ids are a run of their own in
# the cache's order: a dual-stack node (one id, both families) is cached once in each, and a
# target's closest nodes of one family are never the other's.
_IPV6_KEY: Final = 1 << 160


def _cache_key(node_id: bytes, host: str) -> int:
    return int.from_bytes(node_id, "big") | (_IPV6_KEY if ":" in host else 0)


class NodeCache:
    """Every responsive node met in a run (and loaded from earlier runs), kept sorted by id,
    IPv4 and IPv6 apart (_cache_key).

    Ids that share the longest prefix with a target sit next to it in id order, so the nodes
    closest to a target (by XOR) are found by bisection plus a small window: O(log n + k),
    not a scan of the cache.
    """

    WINDOW: Final = 4  # look at WINDOW x count ids on each side of the target

    def __init__(self) -> None:
        self._ids: list[int] = []
        self._nodes: dict[int, DhtNode] = {}
        self._id_at: dict[tuple[str, int], int] = {}
        self.last_seen: dict[int, float] = {}
        self.failures: dict[int, int] = {}
        self.evicted: set[tuple[str, int]] = set()  # to be deleted from the database
        self.dead: set[tuple[str, int]] = set()  # never answered: not asked again this run
        self._strangers_failed: dict[tuple[str, int], int] = {}  # never answered, timed out
        # Addresses that answered, in this run or (loaded into the cache) in an earlier one:
        # never remembered as silent, and forgiven if they were.
        self.known_alive: set[tuple[str, int]] = set()
        # The id each address answered with in this run: an address that changes it (a sybil
        # claiming an id next to each target) is distrusted, never cached, not asked again.
        # (About 150 bytes an address: a few MB for the tens of thousands a big run meets.)
        self._answered_as: dict[tuple[str, int], int] = {}
        self.distrusted: set[tuple[str, int]] = set()

    def __len__(self) -> int:
        return len(self._ids)

    def _family_span(self, ipv6: bool) -> tuple[int, int]:
        """Where one family's keys lie in `_ids`: [start, end)."""
        ipv4 = bisect.bisect_left(self._ids, _IPV6_KEY)
        return (ipv4, len(self._ids)) if ipv6 else (0, ipv4)

    def size(self, ipv6: bool) -> int:
        """How many nodes of one family are cached."""
        start, end = self._family_span(ipv6)
        return end - start

    def nodes(self) -> list[DhtNode]:
        return list(self._nodes.values())

    def entries(self) -> list[tuple[DhtNode, float, int]]:
        """Each cached node with when it last answered and its failures since."""
        return [(node, self.last_seen[key], self.failures[key])
                for key, node in self._nodes.items()]

    def add(self, node: DhtNode, seen: float, failures: int = 0) -> None:
        key = _cache_key(node.node_id, node.host)
        address = (node.host, node.port)
        if address in self.distrusted:
            return
        holder = self._nodes.get(key)
        if holder is not None and holder != node:
            if holder.host != node.host:
                # Another host claims a cached id: the holder stays until it stops answering
                # (copying a good node's id is how a sybil would take its place).
                return
            self._remove_key(key)  # the same host on a new port: a NAT rebinding
        old_key = self._id_at.get(address)
        if old_key is not None and old_key != key:
            self._remove_key(old_key)  # the node at this address has a new id (a restart)
        if key not in self._nodes:
            bisect.insort(self._ids, key)
        self._nodes[key] = node
        self._id_at[address] = key
        self.last_seen[key] = seen
        self.failures[key] = failures
        self.evicted.discard(address)
        self.dead.discard(address)
        self._strangers_failed.pop(address, None)
        self.known_alive.add(address)

    def _remove_key(self, key: int) -> None:
        node = self._nodes.pop(key, None)
        if node is None:
            return
        del self._ids[bisect.bisect_left(self._ids, key)]
        self._id_at.pop((node.host, node.port), None)
        self.last_seen.pop(key, None)
        self.failures.pop(key, None)

    def failed(self, host: str, port: int) -> None:
        """A query timed out. A cached node that keeps failing leaves the cache (it may be back
        if another node hands it out and it answers). An address that never answered at all and
        keeps failing is dead for the rest of the run: the DHT is full of stale entries, and
        every lookup would otherwise wait for them again."""
        address = (host, port)
        key = self._id_at.get(address)
        if key is None:
            failures = self._strangers_failed.get(address, 0) + 1
            self._strangers_failed[address] = failures
            if failures >= DHT_DEAD_AFTER_FAILURES:
                self.dead.add(address)
            return
        self.failures[key] += 1
        if self.failures[key] >= DHT_EVICT_AFTER_FAILURES:
            self._remove_key(key)
            self.evicted.add(address)

    def is_dead(self, host: str, port: int) -> bool:
        return (host, port) in self.dead or (host, port) in self.distrusted

    def vouch(self, host: str, port: int, node_id: bytes, introduced: bytes | None) -> bool:
        """Whether to believe a reply: its id must be the one its address answered with before
        in this run, and the one it was introduced with (None: a router, introduced without
        one). Failing the first distrusts the address: not asked again in the run, out of the
        cache, never cached back (a sybil claims a new id next to each target). The second may
        be the introducer's stale entry: that reply alone is ignored. An id other than the one
        cached by an earlier run is a restart: the cache takes the new one."""
        address = (host, port)
        if address in self.distrusted:
            return False
        self.known_alive.add(address)  # it answered: never remembered as silent
        key = _cache_key(node_id, host)
        before = self._answered_as.get(address)
        if before is not None and before != key:
            self.distrusted.add(address)
            self.forget(host, port)
            return False
        self._answered_as[address] = key
        cached = self._id_at.get(address)
        if cached is not None and cached != key and before is None:
            # Another id than an earlier run saw: a restart since, and the cache takes the new
            # id. (A lookup that the cache gave the old one weighed it by that: not used.)
            self.add(DhtNode(node_id, host, port), self.last_seen[cached])
        return introduced is None or introduced == node_id

    def forget(self, host: str, port: int) -> None:
        """Out of the cache, and of the database at the end of the run."""
        key = self._id_at.get((host, port))
        if key is not None:
            self._remove_key(key)
            self.evicted.add((host, port))

    def remember_silent(self, host: str, port: int) -> None:
        """An address silent in earlier runs and still in its back-off: not asked in this run."""
        if (host, port) not in self.known_alive:
            self.dead.add((host, port))

    def silent_this_run(self) -> list[tuple[str, int]]:
        """Every address that timed out in this run and never answered: each counts one more
        silent run, however many of its queries timed out."""
        return [address for address in self._strangers_failed
                if address not in self.known_alive]

    def closest(self, target: bytes, count: int, ipv6: bool = False) -> list[DhtNode]:
        """The `count` cached nodes of one family closest to `target`."""
        start, end = self._family_span(ipv6)
        if start == end:
            return []
        wanted = _id_int(target) | (_IPV6_KEY if ipv6 else 0)
        position = bisect.bisect_left(self._ids, wanted, start, end)
        span = self.WINDOW * count
        window = self._ids[max(start, position - span):min(end, position + span)]
        window.sort(key=lambda key: key ^ wanted)
        return [self._nodes[key] for key in window[:count]]


DHT_RTT_SAMPLES: Final = 256  # round trips kept, as mldht's ResponseTimeoutFilter keeps
DHT_RTT_MIN_SAMPLES: Final = 32  # before this many, the configured stall timeout holds
DHT_STALL_FLOOR: Final = 0.1  # seconds: a query may stall no sooner


class RoundTrips:
    """The round trips of the last answered queries, and from them how long a query may stay
    silent before it stalls: twice the time within which 90 % of answers came (mldht's
    ResponseTimeoutFilter stalls at that quantile itself; twice spares the packets a late but
    live node would cost), between DHT_STALL_FLOOR and the configured stall timeout. A stalled
    query still counts if it answers, but lets the lookup ask the next candidate.

    Only the stall adapts. A query fails after the configured query timeout, as mldht's calls
    do after theirs: replies slower than the estimate are never measured once their query has
    failed, so an adaptive failure would feed on its own errors and mark live but slow nodes
    dead, and a failure is remembered (the cache evicts, later runs skip silent addresses)."""

    RECOMPUTE_EVERY: Final = 16  # samples (a sort of 256 floats is about 10 µs)

    def __init__(self, ceiling: float) -> None:
        self.ceiling = ceiling
        self.stall_after = ceiling
        self._samples: deque[float] = deque(maxlen=DHT_RTT_SAMPLES)
        self._fresh = 0

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)
        self._fresh += 1
        if self._fresh >= self.RECOMPUTE_EVERY and len(self._samples) >= DHT_RTT_MIN_SAMPLES:
            self._fresh = 0
            ordered = sorted(self._samples)
            quantile = ordered[len(ordered) * 9 // 10]
            self.stall_after = min(self.ceiling, max(DHT_STALL_FLOOR, 2 * quantile))


def silent_back_off(runs: int) -> float:
    """Seconds an address that was silent in `runs` runs in a row is left alone."""
    return min(DHT_SILENT_RETRY * 2 ** min(max(runs, 1) - 1, 8), DHT_SILENT_RETRY_MAX)


class PerAddressLimiter:
    """A token bucket per destination IP, so no node sees more than ~rate packets/s from us."""

    SWEEP_AT: Final = 10_000  # buckets; then the idle ones are dropped

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, TokenBucket] = {}
        self._sweep_at = self.SWEEP_AT

    def __len__(self) -> int:
        return len(self._buckets)

    def _bucket(self, host: str) -> TokenBucket:
        bucket = self._buckets.get(host)
        if bucket is None:
            if len(self._buckets) >= self._sweep_at:
                self._sweep()
            bucket = self._buckets[host] = TokenBucket(self.rate, self.burst)
        return bucket

    def _sweep(self) -> None:
        """Drop the buckets a new one would equal. A survey meets every address about once, so
        at 250 packets/s only the last few seconds' addresses still hold state."""
        now = trio.current_time()
        self._buckets = {host: bucket for host, bucket in self._buckets.items()
                         if not bucket.is_idle(now)}
        self._sweep_at = max(self.SWEEP_AT, 2 * len(self._buckets))

    def due(self, host: str) -> float:
        """Seconds until a packet may go to `host` (0: now); takes nothing."""
        return self._bucket(host).due() if self.rate else 0.0

    def take(self, host: str) -> None:
        """Count a packet to `host`, which `due` just allowed."""
        if self.rate:
            self._bucket(host).take()

    def penalised(self, host: str) -> bool:
        """Whether `host` is still in the silence `penalise` gave it."""
        bucket = self._buckets.get(host)
        return bucket is not None and bucket.in_debt()

    def penalise(self, host: str, seconds: float) -> None:
        """Say nothing to `host` for about `seconds` (it asked us to slow down)."""
        if self.rate:
            self._bucket(host).penalise(seconds)


@dataclass(slots=True)
class DhtCounters:
    lookups: int = 0
    lookups_with_peers: int = 0
    lookups_unanswered: int = 0  # no node answered: no sample stored
    peers: int = 0
    queries: int = 0
    replies: int = 0
    timeouts: int = 0
    krpc_errors: int = 0
    bad_replies: int = 0
    bad_fields: int = 0
    bogons_skipped: int = 0
    packets_sent: int = 0
    packets_received: int = 0
    send_errors: int = 0
    dropped_replies: int = 0  # late, unexpected or from the wrong address
    malformed_packets: int = 0  # not even KRPC: refused before anything read them
    nodes_cached: int = 0
    ipv6_nodes_cached: int = 0  # of nodes_cached: on the IPv6 DHT (BEP 32)
    implausible_filters: int = 0  # BEP 33 filters saturated, far above the others' or a suspect's
    # Sybil defences (DhtSurvey): nodes passed over, replies and peers not believed.
    # (Counted per lookup: a node met in ten lookups counts ten times.)
    same_subnet_skipped: int = 0  # a node of a /24 (/64) the lookup already had one of
    same_id_skipped: int = 0  # an id the lookup already had at another address
    ids_changed: int = 0  # a reply's id was not the one its address had
    suspect_nodes: int = 0  # an id implausibly close to the target
    suspect_introducers: int = 0  # answers naming several such nodes
    values_over_cap: int = 0  # replies with more values than any client sends
    suspect_peers: int = 0  # only suspects named them: not counted
    stall_after: float = 0.0  # seconds a query could stay silent before it stalled, at the end
    seconds: float = 0.0
    outage: str | None = None  # why the stage stopped early: no node answered

    def summary(self) -> str:
        per_lookup = self.packets_sent / self.lookups if self.lookups else 0.0
        rate = self.packets_sent / self.seconds if self.seconds else 0.0
        return (f"{self.lookups} lookups ({self.lookups_with_peers} with peers, "
                f"{self.lookups_unanswered} unanswered), {self.peers} "
                f"peers; {self.packets_sent} packets sent ({per_lookup:.1f} per lookup, "
                f"{rate:,.0f}/s), {self.packets_received} received, {self.timeouts} timeouts "
                f"(a query stalled after {self.stall_after:.2f} s at the end), "
                f"{self.send_errors} send errors, {self.dropped_replies} dropped replies, "
                f"{self.malformed_packets} malformed packets, {self.krpc_errors} KRPC errors, "
                f"{self.bad_replies} bad replies; "
                + (f"{self.implausible_filters} implausible BEP 33 filters left out; "
                   if self.implausible_filters else "")
                + self._sybil_summary() + f"{self.nodes_cached} nodes cached"
                + (f" ({self.ipv6_nodes_cached} IPv6)" if self.ipv6_nodes_cached else ""))

    def _sybil_summary(self) -> str:
        parts = [(self.same_subnet_skipped, "candidate", "passed over (one per /24)"),
                 (self.same_id_skipped, "candidate", "passed over (an id seen elsewhere)"),
                 (self.ids_changed, "answer", "with an unexpected id ignored"),
                 (self.suspect_nodes, "candidate", "implausibly close to the target"),
                 (self.suspect_introducers, "answer", "naming several such nodes"),
                 (self.values_over_cap, "answer", "with too many values ignored"),
                 (self.suspect_peers, "peer", "only suspects named, not counted")]
        said = [f"{_plural(count, noun)} {what}" for count, noun, what in parts if count]
        return f"sybil defences: {', '.join(said)}; " if said else ""


@dataclass(frozen=True, slots=True)
class DhtOptions:
    concurrency: int
    rate: float
    per_ip_rate: float
    per_ip_burst: int
    stall_timeout: float
    query_timeout: float
    max_queries: int
    bep33: bool
    allow_private: bool


@dataclass(slots=True)
class LookupResult:
    infohash: bytes
    peers: set[tuple[str, int]] = field(default_factory=set)
    seeds_blooms: list[bytes] = field(default_factory=list)  # BEP 33 BFsd, one a responder
    peers_blooms: list[bytes] = field(default_factory=list)  # BFpe
    suspect_filters: int = 0  # filters of suspect responders: never used
    # Peers that suspects named: not counted (sybils in a few subnets would vouch for each
    # other). The honest ones among them are usually named by a trusted node too.
    suspect_peers: set[tuple[str, int]] = field(default_factory=set)
    nodes_answered: int = 0
    queries: int = 0

    def bep33_estimates(self) -> tuple[float | None, float | None]:
        """(seeds, peers), as bep33 gives them."""
        seeds, peers, _ = self.bep33()
        return seeds, peers

    def implausible_filters(self) -> int:
        """The filters bep33_estimates leaves out."""
        return self.bep33()[2]

    def bep33(self) -> tuple[float | None, float | None, int]:
        """(seeds, peers, filters left out): the plausible filters of the answering nodes OR-ed
        (saturated ones and outliers dropped: plausible_filters); `values` IPs count as peers."""
        seeds = peers = None  # unknown: no node gave a filter (or only implausible ones)
        kept_seeds, dropped_seeds = plausible_filters(self.seeds_blooms)
        if kept_seeds:
            seeds_bloom = bytearray(BLOOM_BYTES)
            for bloom in kept_seeds:
                bloom_union(seeds_bloom, bloom)
            seeds = bloom_estimate(seeds_bloom)
        kept_peers, dropped_peers = plausible_filters(self.peers_blooms)
        if kept_peers or self.peers:
            peers_bloom = bytearray(BLOOM_BYTES)
            for bloom in kept_peers:
                bloom_union(peers_bloom, bloom)
            for host, _ in self.peers:
                bloom_insert(peers_bloom, host)
            peers = bloom_estimate(peers_bloom)
        return seeds, peers, dropped_seeds + dropped_peers + self.suspect_filters


class CandidateState(enum.Enum):
    """Where a node stands in one lookup."""

    NEW = "new"  # to be asked
    ASKED = "asked"  # a query out for it (or queued by the rate limits)
    ANSWERED = "answered"
    FAILED = "failed"  # no usable reply, or passed over: not asked again in this lookup


class QueryState(enum.Enum):
    QUEUED = "queued"  # decided; held by the rate limits or a full socket buffer
    IN_FLIGHT = "in flight"
    ENDED = "ended"  # answered, failed, timed out or withdrawn


@dataclass(slots=True, eq=False)
class LookupCandidate:
    node: DhtNode
    distance: int  # to the target; UNKNOWN_DISTANCE for a bootstrap router
    # An id implausibly close to the target, or a reply with too many values or naming such
    # ids (Lookup._flag): asked, but not one of the K closest, and neither its values, its
    # nodes nor its filters are used.
    suspect: bool = False
    state: CandidateState = CandidateState.NEW
    stalled: bool = False  # asked, and its query is older than the stall timeout
    query: LookupQuery | None = None  # while asked: the query in flight or queued for it
    listed: bool = False  # in by_distance
    filters: tuple[bytes | None, bytes | None] = (None, None)  # what its first reply gave


def _candidate_distance(candidate: LookupCandidate) -> int:
    return candidate.distance


def _subnet_rank(candidate: LookupCandidate) -> tuple[bool, bool, int]:
    """Which of a subnet's nodes a lookup asks first: one not suspect, then one whose BEP 42
    id matches its address, then the closest."""
    verified = bep42_verified(candidate.node.node_id, candidate.node.host)
    return candidate.suspect, not verified, candidate.distance


@dataclass(slots=True, eq=False)
class LookupQuery:
    """One get_peers query a lookup decided to send: the survey sends it and reports back."""

    lookup: Lookup
    candidate: LookupCandidate
    scrape: bool
    follow_up: bool = False  # the second query for `values`, after filters without them
    state: QueryState = QueryState.QUEUED
    transaction_id: bytes = b""
    sent_at: float = math.inf


@functools.lru_cache(maxsize=1 << 16)
def _destination_class(host: str) -> tuple[bool, bool]:
    """(never a destination, globally routable) of a textual IP. Memoised: every reply names
    8 nodes, mostly ones seen before, and ipaddress parsing was a fifth of a survey's CPU."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return True, False
    # (Python counts IPv6's loopback, in ::/8, as reserved: it is a lab's, as 127/8 is.)
    if (ip.is_unspecified or ip.is_multicast or ip.is_reserved and not ip.is_loopback
            or host == "255.255.255.255"):
        return True, False
    return False, is_global_address(host)


def _bogus_destination(host: str, port: int, allow_private: bool) -> bool:
    """Addresses a reply may carry that must never be sent to: port 0, unspecified, multicast,
    broadcast, reserved, and unless allowed, anything not globally routable."""
    if not 0 < port < 65536:
        return True
    never, routable = _destination_class(host)
    return never or (not allow_private and not routable)


def subnet_of(host: str, port: int) -> str:
    """What the one-node-per-subnet rule counts as one owner: the IPv4 /24 or IPv6 /64 of a
    global address (a host, a NAT, a rented block); at any other address, each node alone.
    A closed network (a LAN, containers, a lab) may have all its nodes in one /24, or, on
    IPv6's one loopback address, on one host, and has no sybils to keep out."""
    if not _destination_class(host)[1]:
        return f"{host}:{port}"
    return host.rpartition(".")[0] if ":" not in host else _ipv6_subnet(host)


@functools.lru_cache(maxsize=1 << 12)
def _ipv6_subnet(host: str) -> str:
    # (Memoised: parsing costs more than the rest of weighing a node; IPv4 needs no parse.)
    try:
        return ipaddress.IPv6Address(host).packed[:8].hex()
    except ValueError:
        return host


class LookupView(Protocol):
    """What a lookup may ask the survey that drives it: questions only. The lookup never sends
    or waits, and of what the survey holds it changes only the counters it is given."""

    options: DhtOptions
    ipv6: bool  # which of BEP 32's two DHTs the lookup runs on
    bootstrap: list[DhtNode]  # its routers, of unknown id
    implausibly_close: int  # ids closer than this to a target are suspect

    @property
    def implausibly_close_elsewhere(self) -> int:
        """The same line for the ids of the other family."""

    def usable(self, host: str, port: int) -> bool:
        """Whether a query may go to this address at all."""

    def is_dead(self, host: str, port: int) -> bool:
        """Silent in this run (or an earlier one, still in its back-off), or distrusted."""

    def is_distrusted(self, host: str, port: int) -> bool:
        """It answered with two ids in this run: never asked again, not even as a router."""

    def resting(self, host: str) -> bool:
        """It asked us to back off for longer than the stall timeout."""

    def closest(self, target: bytes, count: int) -> list[DhtNode]:
        """The cached nodes of the lookup's family closest to `target`."""

    def known(self) -> int:
        """How many nodes of the lookup's family are cached (other lookups add to them)."""


class Lookup:
    """One iterative get_peers lookup (BEP 5): plain data, stepped by events, as jech/dht keeps
    a search. Events go in: start, replied, failed (a timeout, an error, a packet refused or
    held past a back-off), stalled, abandon. Out come the queries to send (take_queries) and to
    withdraw (take_withdrawn); `finished` says the result is final. It asks `view` questions
    only: the survey that drives it alone touches the socket, the clock, the limiters and the
    cache, and a step never calls back into it.

    A lookup runs on one of BEP 32's two DHTs, IPv4 or IPv6 (`view.ipv6`): its candidates are
    nodes of that family only. The nodes of the other family that its replies name come out
    too (take_foreign), for the survey to hand to that family's lookup of the same target
    (introduce). Both may write to one `result`: their peers are merged.

    A query costs no task, cancel scope or event of its own: with those, a query took about
    300 µs of CPU, against about 100 µs now (most of it decoding and the syscalls)."""

    def __init__(self, infohash: bytes, view: LookupView, counters: DhtCounters,
                 result: LookupResult | None = None) -> None:
        self.view = view
        self.ipv6 = view.ipv6
        self.counters = counters  # the survey's: what the lookup passed over is counted there
        self.target = _id_int(infohash)
        self.result = LookupResult(infohash) if result is None else result
        self.queries = 0  # this lookup's own, of result.queries
        self.answered = 0  # nodes that answered and were trusted, of result.nodes_answered
        self.finished = False
        self.abandoned = False
        self.rounds = 0
        self.candidates: dict[tuple[str, int], LookupCandidate] = {}
        self.by_distance: list[LookupCandidate] = []  # kept sorted as candidates arrive
        self.by_subnet: dict[str, LookupCandidate] = {}  # the one candidate of each /24 (/64)
        # By subnet: the nodes passed over, to take a failed holder's place, and how often.
        self.passed_over: dict[str, list[LookupCandidate]] = {}
        self.takeovers: dict[str, int] = {}
        self.ids_seen: set[int] = set()  # the distance of each candidate
        # Nodes a reply made suspect: not asked again if the lookup starts over (the survey
        # forgets them from the cache only after the event that ended the round).
        self.flagged: set[tuple[str, int]] = set()
        self.active = 0  # queries asked and not stalled: at most Kademlia's alpha
        self.in_flight = 0  # candidates asked and not yet answered or failed
        self._known_at_look = 0  # nodes cached when the lookup last took the closest
        # By the other family's lookup (introduce), by address: asked again in a retry round.
        self._introduced: dict[tuple[str, int], DhtNode] = {}
        self._to_send: list[LookupQuery] = []
        self._withdrawn: list[LookupQuery] = []
        self._foreign: list[DhtNode] = []

    # -- What comes out

    def take_queries(self) -> list[LookupQuery]:
        """The queries decided since the last call, to be sent in this order."""
        queries, self._to_send = self._to_send, []
        return queries

    def take_withdrawn(self) -> list[LookupQuery]:
        """Queries handed out by take_queries that the lookup no longer waits for. (One it
        stops waiting for before handing it out is dropped: it never leaves.)"""
        queries, self._withdrawn = self._withdrawn, []
        return queries

    def take_foreign(self) -> list[DhtNode]:
        """The nodes of the other family that trusted replies named since the last call."""
        nodes, self._foreign = self._foreign, []
        return nodes

    def closest_answered(self) -> list[int]:
        """The distances of the K closest nodes that answered and are trusted, for the survey's
        estimate of the network's size."""
        distances: list[int] = []
        for candidate in self.by_distance:
            if candidate.distance == UNKNOWN_DISTANCE or len(distances) == DHT_K:
                break
            if candidate.state is CandidateState.ANSWERED and not candidate.suspect:
                distances.append(candidate.distance)
        return distances

    # -- Events

    def start(self, introduced: Sequence[DhtNode] = ()) -> None:
        """Begin (or, when nobody answered the first round, begin again) from the cached
        nodes closest to the target, the nodes the other family's lookup `introduced`, and
        the routers while fewer than K are usable."""
        self.rounds += 1
        self._introduced.update(((node.host, node.port), node) for node in introduced)
        self.candidates, self.by_distance, self.by_subnet = {}, [], {}
        self.passed_over, self.takeovers, self.ids_seen = {}, {}, set()
        self.active = self.in_flight = 0
        self._look_in_cache()
        for node in self._introduced.values():
            self.consider(node)
        if sum(not c.suspect and c.state is not CandidateState.FAILED
               for c in self.by_distance) < DHT_K:
            for node in self.view.bootstrap:
                self.consider(node, known_id=False)
        self._advance()

    def replied(self, query: LookupQuery, reply: GetPeersReply) -> None:
        """A reply to `query` whose id the survey has vouched for. Afterwards, the survey
        caches the node unless it is suspect, and forgets it if its follow-up made it so (it
        was trusted, and cached, after its first reply)."""
        candidate = query.candidate
        if not candidate.suspect:
            self._flag(candidate, reply)
            if candidate.suspect:
                self.flagged.add((candidate.node.host, candidate.node.port))
                if query.follow_up:
                    self._retract_if_current(query)
        if self.finished or candidate.query is not query:
            return
        result = self.result
        if not query.follow_up and not candidate.suspect:
            self.answered += 1
            result.nodes_answered += 1
        self._take(candidate, reply, filters=query.scrape)
        # Lookups learn from each other: on a cold start the cache fills as they go, and the
        # closest nodes it has now may spare this one a wave or two.
        if self.view.known() >= 2 * max(self._known_at_look, DHT_K):
            self._look_in_cache()
        # libtorrent answers a scrape with filters and no `values`: ask it once more, without
        # scrape, for the peers themselves. The node stays asked until then, or the lookup could
        # end before the very reply that brings its peers.
        # (Not a node that has just told another lookup to back off: it counts as answered.)
        if (query.scrape and not reply.peers and (reply.seeds_bloom or reply.peers_bloom)
                and not candidate.suspect and not self.resting(candidate)):
            self.queries += 1
            result.queries += 1
            if candidate.stalled:
                candidate.stalled = False  # a fresh query: it holds a slot again
                self.active += 1
            again = candidate.query = LookupQuery(self, candidate, False, follow_up=True)
            self._to_send.append(again)
        else:
            self._settle(candidate, CandidateState.ANSWERED)
        self._advance()

    def failed(self, query: LookupQuery, distrusted: bool = False) -> None:
        """No usable reply (timeout, error, refused packet, an unexpected id). After a first
        reply, the node still counts as answered when only its follow-up fails, unless it
        answered the follow-up with another id (`distrusted`)."""
        candidate = query.candidate
        if self.finished or candidate.query is not query:
            return
        if query.follow_up and not distrusted:
            self._settle(candidate, CandidateState.ANSWERED)
        else:
            if query.follow_up:
                self._retract(candidate)
            self._settle(candidate, CandidateState.FAILED)
            self._give_way(candidate)
        self._advance()

    def introduce(self, nodes: Sequence[DhtNode]) -> None:
        """Nodes of this lookup's family that a reply to the other family's lookup named (a
        node asked for both, BEP 32's `want`, names both). A lookup that has ended takes them
        too, unless abandoned: it may have ended with the few nodes it knew, while the other
        lookup goes on meeting closer ones. (It ends again at once if none of them is among
        the K closest.)"""
        if self.abandoned:
            return
        self.finished = False
        for node in nodes:
            address = (node.host, node.port)
            if address not in self._introduced:
                self._introduced[address] = node
                self.consider(node)
        self._advance()

    def stalled(self, query: LookupQuery) -> None:
        """`query` is older than the stall timeout: it still counts if it answers, but lets the
        next candidate go."""
        candidate = query.candidate
        if not self.finished and candidate.query is query and not candidate.stalled:
            candidate.stalled = True
            self.active -= 1
            self._advance()

    def abandon(self) -> None:
        """The lookup's caller is gone (cancelled): withdraw every query it still has out."""
        self.abandoned = True
        if not self.finished:
            self.finished = True
            self._withdraw_all()

    # -- The state machine

    def consider(self, node: DhtNode, known_id: bool = True) -> None:
        """A node a reply named (or the cache or, with `known_id` False, the routers): a
        candidate, unless the sybil defences pass it over. One of the other family goes out
        (take_foreign)."""
        if (":" in node.host) != self.ipv6:
            self._foreign.append(node)
            return
        address = (node.host, node.port)
        if address in self.candidates or address in self.flagged:
            return
        view, counters = self.view, self.counters
        if not view.usable(node.host, node.port):
            counters.bogons_skipped += 1
            return
        if not known_id:  # a bootstrap router: worth another try unless it changed its id
            if not view.is_distrusted(node.host, node.port):
                self._add(address, LookupCandidate(node, UNKNOWN_DISTANCE))
            return
        if view.is_dead(node.host, node.port):
            return
        distance = _id_int(node.node_id) ^ self.target
        # One id, two addresses of a family: one of them lies. (A dual-stack node uses one id
        # for IPv4 and IPv6, but each family has its own lookup.)
        if distance in self.ids_seen:
            counters.same_id_skipped += 1
            return
        candidate = LookupCandidate(node, distance, suspect=distance < view.implausibly_close)
        # One node per IPv4 /24 (IPv6 /64), as libtorrent's dht_restrict_search_ips: sybils
        # come by the hundred from a few rented blocks.
        subnet = subnet_of(node.host, node.port)
        held = self.by_subnet.get(subnet)
        if held is not None:
            counters.same_subnet_skipped += 1
            # Two nodes of one subnet tie for its place: one that is not suspect, or whose
            # BEP 42 id matches its address, takes it from one that is not so, while that one
            # waits unasked.
            if not (held.state is CandidateState.NEW
                    and _subnet_rank(candidate) < _subnet_rank(held)):
                self.candidates[address] = candidate  # (not to be weighed again)
                candidate.state = CandidateState.FAILED
                self.passed_over.setdefault(subnet, []).append(candidate)
                return
            held.state = CandidateState.FAILED  # asked nothing: no mark against it
            self.passed_over.setdefault(subnet, []).append(held)
        self._hold_subnet(subnet, address, candidate)

    def _look_in_cache(self) -> None:
        self._known_at_look = self.view.known()
        for node in self.view.closest(self.result.infohash, 2 * DHT_K):
            self.consider(node)

    def _hold_subnet(self, subnet: str, address: tuple[str, int],
                     candidate: LookupCandidate) -> None:
        self.by_subnet[subnet] = candidate
        if candidate.suspect:
            self.counters.suspect_nodes += 1
        self.ids_seen.add(candidate.distance)
        self._add(address, candidate)

    def _give_way(self, candidate: LookupCandidate) -> None:
        """A subnet's holder failed: the best node passed over in it takes its place (or the
        next one met, if none was), or a silent first-met node (or a decoy named first) would
        hide its subnet's live one. A few times a lookup: a subnet of sybils costs no more."""
        if candidate.distance == UNKNOWN_DISTANCE:
            return
        subnet = subnet_of(candidate.node.host, candidate.node.port)
        if self.by_subnet.get(subnet) is not candidate:
            return
        if self.takeovers.get(subnet, 0) >= DHT_SUBNET_TAKEOVERS:
            return
        self.takeovers[subnet] = self.takeovers.get(subnet, 0) + 1
        dead, ids_seen = self.view.is_dead, self.ids_seen
        waiting = [other for other in self.passed_over.get(subnet, ())
                   if other.distance not in ids_seen
                   and not dead(other.node.host, other.node.port) and other is not candidate]
        if not waiting:
            del self.by_subnet[subnet]  # the next node met in it holds it
            return
        best = min(waiting, key=_subnet_rank)
        self.passed_over[subnet].remove(best)
        best.state = CandidateState.NEW
        self._hold_subnet(subnet, (best.node.host, best.node.port), best)

    def _add(self, address: tuple[str, int], candidate: LookupCandidate) -> None:
        self.candidates[address] = candidate
        if not candidate.listed:
            candidate.listed = True
            bisect.insort(self.by_distance, candidate, key=_candidate_distance)

    def resting(self, candidate: LookupCandidate) -> bool:
        """Whether the lookup goes on without this node: it asked us to back off for longer
        than the stall timeout. A bootstrap router is waited for: at a cold start it may be
        all there is."""
        return candidate.distance != UNKNOWN_DISTANCE and self.view.resting(candidate.node.host)

    def _advance(self) -> None:
        """Ask the next candidates, or end the round: when the K closest nodes still alive have
        all answered, or nothing is left in flight (out of candidates or of query budget)."""
        options = self.view.options
        result = self.result
        while not self.finished:
            # The K closest alive, and one more for each of them whose query has stalled: a
            # stalled query still counts if it answers, but lets the next candidate go.
            # Suspects on the way are asked too, but are never one of the K.
            head: list[LookupCandidate] = []
            wanted = DHT_K
            counted = 0
            settled = True  # the K closest have all answered
            for candidate in self.by_distance:
                if candidate.state is CandidateState.FAILED:
                    continue
                head.append(candidate)
                if candidate.suspect:
                    continue
                counted += 1
                if counted <= DHT_K:
                    settled = settled and candidate.state is CandidateState.ANSWERED
                    if candidate.stalled:
                        wanted += 1
                if counted >= wanted:
                    break
            if settled:
                self._end_round()
                return
            passed = False
            for candidate in head:
                if self.active >= DHT_ALPHA or self.queries >= options.max_queries:
                    break
                if candidate.state is CandidateState.NEW:
                    node = candidate.node
                    if (self.resting(candidate)
                            or self.view.is_distrusted(node.host, node.port)):
                        # Asked nothing: no mark, no query counted.
                        candidate.state = CandidateState.FAILED
                        self._give_way(candidate)
                        passed = True
                        continue
                    self.queries += 1
                    result.queries += 1
                    candidate.state = CandidateState.ASKED
                    self.active += 1
                    self.in_flight += 1
                    candidate.query = LookupQuery(self, candidate, options.bep33)
                    self._to_send.append(candidate.query)
            if passed:
                continue  # a node passed over changes the K closest: look again
            if self.in_flight == 0:
                self._end_round()
            return

    def _settle(self, candidate: LookupCandidate, state: CandidateState) -> None:
        candidate.state, candidate.query = state, None
        self.in_flight -= 1
        if not candidate.stalled:
            self.active -= 1
        candidate.stalled = False

    def _take(self, candidate: LookupCandidate, reply: GetPeersReply, filters: bool) -> None:
        """What a reply gives: peers, nodes to consider, and (unless it answers the follow-up,
        which did not ask for them) BEP 33 filters. A suspect's peers are put apart, and its
        nodes and filters are not used."""
        result, counters = self.result, self.counters
        trusted = not candidate.suspect
        if len(reply.peers) <= DHT_MAX_VALUES_PER_REPLY:
            allow_private = self.view.options.allow_private
            for host, port in reply.peers:
                if _bogus_destination(host, port, allow_private):
                    counters.bogons_skipped += 1
                elif trusted:
                    result.peers.add((host, port))
                else:
                    result.suspect_peers.add((host, port))
        if not trusted:  # its nodes and filters would be the sybil's own
            if filters:
                result.suspect_filters += ((reply.seeds_bloom is not None)
                                           + (reply.peers_bloom is not None))
            return
        for node in reply.nodes:
            self.consider(node)
        # Kept apart, not OR-ed as they come: one node's saturated filter would be the whole
        # estimate. One a responder (max_queries bound them): a reply to the follow-up, which
        # did not ask for filters, adds none, or a node would count twice.
        if filters:
            if reply.seeds_bloom is not None:
                result.seeds_blooms.append(reply.seeds_bloom)
            if reply.peers_bloom is not None:
                result.peers_blooms.append(reply.peers_bloom)
            candidate.filters = (reply.seeds_bloom, reply.peers_bloom)  # to retract, if need be

    def _flag(self, candidate: LookupCandidate, reply: GetPeersReply) -> None:
        """Make a node suspect for what it answered: more values than any client sends, or two
        ids implausibly close to the target, which is what a node that hands out sybils does
        (an honest one, about once in a million lookups)."""
        counters = self.counters
        if len(reply.peers) > DHT_MAX_VALUES_PER_REPLY:
            counters.values_over_cap += 1
            candidate.suspect = True
        # (Each id by the line of its own family's DHT, whose size sets it.)
        view, target, ipv6 = self.view, self.target, self.ipv6
        lines = {ipv6: view.implausibly_close, not ipv6: view.implausibly_close_elsewhere}
        if len({node.node_id for node in reply.nodes
                if _id_int(node.node_id) ^ target < lines[":" in node.host]}) >= 2:
            counters.suspect_introducers += 1
            candidate.suspect = True

    def _retract_if_current(self, query: LookupQuery) -> None:
        if not self.finished and query.candidate.query is query:
            self._retract(query.candidate)

    def _retract(self, candidate: LookupCandidate) -> None:
        """A node's follow-up showed it a liar (another id, too many values): what its first
        reply gave no longer counts. (The nodes it named were weighed like any others'.)"""
        result = self.result
        seeds, peers = candidate.filters
        if seeds is not None and seeds in result.seeds_blooms:
            result.seeds_blooms.remove(seeds)
        if peers is not None and peers in result.peers_blooms:
            result.peers_blooms.remove(peers)
        candidate.filters = (None, None)
        self.answered -= 1
        result.nodes_answered -= 1

    def _withdraw_all(self) -> None:
        not_out = {id(query) for query in self._to_send}  # never handed out: dropped
        self._to_send = []
        for candidate in self.candidates.values():
            query = candidate.query
            if query is not None:
                if id(query) not in not_out:
                    self._withdrawn.append(query)
                # The node of a follow-up has answered; any other is as if never asked, for
                # a lookup that takes introduced nodes after its end (introduce).
                self._settle(candidate, CandidateState.ANSWERED if query.follow_up
                             else CandidateState.NEW)

    def _end_round(self) -> None:
        self._withdraw_all()  # beyond the K closest: not waited for
        if (self.rounds == 1 and self.answered == 0
                and self.queries < self.view.options.max_queries):
            self.start()  # one retry when nobody answered
            return
        self.finished = True


class DhtFamily:
    """One of BEP 32's two DHTs, IPv4 or IPv6, as a survey sees it: the lookups on it (the
    LookupView they ask), its routers, and its size, which sets how close to a target an id
    may plausibly be. Nodes route only to their own family, and the IPv6 DHT is a fraction of
    the IPv4 one: each has its own closest nodes, cache entries and estimate."""

    def __init__(self, survey: DhtSurvey, ipv6: bool) -> None:
        self.survey = survey
        self.options = survey.options
        self.ipv6 = ipv6
        self.bootstrap = [node for node in survey.bootstrap if (":" in node.host) == ipv6]
        self.assumed_size_bits = DHT_ASSUMED_IPV6_SIZE_BITS if ipv6 else DHT_ASSUMED_SIZE_BITS
        # Ids closer than this to a lookup's target are suspect (DHT_CLOSE_ID_MARGIN_BITS),
        # from the network size the finished lookups tell (observe_size).
        self.implausibly_close = _implausibly_close(self.assumed_size_bits)
        self._size_bits: deque[float] = deque(maxlen=DHT_SIZE_SAMPLES)

    @property
    def implausibly_close_elsewhere(self) -> int:
        other = self.survey.families.get(not self.ipv6)
        # (Not surveyed: its ids are never asked, and are judged by the tighter line.)
        return (other.implausibly_close if other is not None else
                min(self.implausibly_close, _implausibly_close(DHT_ASSUMED_SIZE_BITS)))

    def usable(self, host: str, port: int) -> bool:
        return self.survey.usable(host, port)

    def is_dead(self, host: str, port: int) -> bool:
        return self.survey.cache.is_dead(host, port)

    def is_distrusted(self, host: str, port: int) -> bool:
        return (host, port) in self.survey.cache.distrusted

    def resting(self, host: str) -> bool:
        return self.survey.resting(host)

    def closest(self, target: bytes, count: int) -> list[DhtNode]:
        return self.survey.cache.closest(target, count, self.ipv6)

    def known(self) -> int:
        return self.survey.cache.size(self.ipv6)

    def has_a_start(self) -> bool:
        """Whether a lookup here has a node to ask first: a router or a cached node."""
        return bool(self.bootstrap) or self.known() > 0

    def observe_size(self, distances: Sequence[int]) -> None:
        """Estimate the network's size from the distances of a finished lookup's closest
        trusted nodes (Lookup.closest_answered): the k-th closest of N random ids lies about
        k / N of the id space from a target. The median of the last lookups sets
        `implausibly_close`."""
        if not distances:
            return
        # Capped a little above the public DHT's size: sybils just outside the threshold can
        # only make the network look bigger, and so the threshold smaller; real networks that
        # need it to adapt are smaller.
        self._size_bits.append(min(self.assumed_size_bits + 1, math.log2(len(distances)) + 160
                                   - math.log2(distances[-1] + 1)))
        if len(self._size_bits) >= DHT_SIZE_MIN_SAMPLES:
            ordered = sorted(self._size_bits)
            self.implausibly_close = _implausibly_close(ordered[len(ordered) // 2])


@dataclass(slots=True, eq=False)
class _Running:
    """What the survey keeps of a target's lookups in progress: one on each family (BEP 32),
    writing to one result."""

    result: LookupResult
    done: trio.Event
    watch: Callable[[LookupResult], None] | None  # told after each reply
    lookups: dict[bool, Lookup] = field(default_factory=dict)  # by family (IPv6)
    ended: set[bool] = field(default_factory=set)  # the families whose lookup has ended (so far)
    packets: dict[bool, tuple[bytes, bytes]] = field(default_factory=dict)  # by scrape


class DhtSurvey:
    """Iterative get_peers lookups (BEP 5) over one UDP endpoint, sharing a warm node cache.

    Each lookup is a `Lookup`, stepped by the survey's events. A target is looked up on the
    IPv4 DHT and, where the host reaches IPv6, on the IPv6 one (BEP 32), each lookup on its
    own `DhtFamily`; the other family's lookup starts when the first one meets a node of it,
    if it had none to start from. Three tasks that `serve` runs make them: the endpoint's
    receive loop hands each reply to its query, a timer stalls and expires queries in the
    order they were sent (every query has the same timeouts), and a pacer sends what the rate
    limits or a full socket buffer held back. After each event, `_step` carries out what the
    lookup decided: a query no limit holds back leaves at once.
    """

    def __init__(self, endpoint: UdpEndpoint, cache: NodeCache, bootstrap: Sequence[DhtNode],
                 options: DhtOptions, want_ipv6: bool) -> None:
        self.endpoint = endpoint
        self.cache = cache
        self.bootstrap = list(bootstrap)
        self.options = options
        self.want_ipv6 = want_ipv6
        self.node_id = os.urandom(20)
        self.counters = DhtCounters()
        self.families = {False: DhtFamily(self, ipv6=False)}
        if want_ipv6:
            self.families[True] = DhtFamily(self, ipv6=True)
        # At most `rate` packets in any one-second window: a bucket of one token refilled at
        # rate - 1 per second can send rate - 1 + 1 in a window, never rate + burst.
        self.limited = options.rate > 0
        self.global_bucket = TokenBucket(options.rate - 1 if options.rate > 2 else options.rate,
                                         1.0)
        self.per_ip = PerAddressLimiter(options.per_ip_rate if options.rate else 0,
                                        options.per_ip_burst)
        self._next_transaction = 0
        self.round_trips = RoundTrips(options.stall_timeout)
        self._lookup_slots = trio.CapacityLimiter(self._lookups_allowed())
        self._serving = False
        self._running: dict[Lookup, _Running] = {}
        # Queries in the order they left, for the timer: every one has the same two timeouts,
        # so the oldest is always the first due.
        self._stalling: deque[LookupQuery] = deque()
        self._expiring: deque[LookupQuery] = deque()
        self._timer_wake: trio.Event | None = None
        self._timer_deadline = math.inf
        # Queries held back: by the per-address limit, until their address's next token is due
        # (a heap), then in order for the global limit or a full socket buffer (the outbox).
        self._held: list[tuple[float, int, LookupQuery]] = []
        self._held_count = 0
        self._outbox: deque[LookupQuery] = deque()
        self._pacer_wake: trio.Event | None = None
        self._pacer_deadline = math.inf
        # Lookups waiting for room in the rate (_room_in_the_rate), woken one at a time.
        self._waiting_for_room = trio.lowlevel.ParkingLot()

    @classmethod
    def open(cls, bind: str, cache: NodeCache, bootstrap: Sequence[DhtNode],
             options: DhtOptions) -> DhtSurvey:
        """A survey on a new UDP endpoint at `bind`, asking IPv6 nodes too where the host can
        reach them; close it with `close`."""
        endpoint = UdpEndpoint.open(bind, krpc_transaction_untrusted)
        return cls(endpoint, cache, bootstrap, options,
                   want_ipv6=endpoint.dual_stack and host_has_ipv6_route())

    def close(self) -> None:
        self.endpoint.close()

    def _transaction_id(self) -> bytes:
        self._next_transaction = (self._next_transaction + 1) % 2**32
        return self._next_transaction.to_bytes(4, "big")

    # -- What a lookup may ask (through its DhtFamily)

    def usable(self, host: str, port: int) -> bool:
        if _bogus_destination(host, port, self.options.allow_private):
            return False
        if self.endpoint.is_own_address(host, port):  # a reply may name us
            return False
        return self.endpoint.can_reach(host) and (self.want_ipv6 or ":" not in host)

    def resting(self, host: str) -> bool:
        """A node that answered 201/202 and has longer to wait than the stall timeout: lookups
        go on without it."""
        return (self.limited and self.per_ip.penalised(host)
                and self.per_ip.due(host) > self.options.stall_timeout)

    # -- Lookups

    async def serve(self, task_status: Any = None) -> None:
        """Receive, time out and pace for every lookup; start it with `nursery.start` before
        the first lookup, and cancel it after the last."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.endpoint.receive_forever)
            nursery.start_soon(self._expire_forever)
            nursery.start_soon(self._pace_forever)
            self._serving = True
            try:
                if task_status is not None:
                    task_status.started()
                await trio.sleep_forever()
            finally:
                self._serving = False

    async def lookup(self, infohash: bytes,
                     watch: Callable[[LookupResult], None] | None = None) -> LookupResult:
        """Find the peers of `infohash` from the K closest nodes that answer. `watch`, if
        given, is told the result so far after each reply."""
        if not self._serving:
            raise RuntimeError("DhtSurvey.lookup needs DhtSurvey.serve running")
        # Lookups in flight grow with the nodes known, up to `concurrency`: a cold start would
        # otherwise send hundreds of queries at once to the few bootstrap routers or first
        # cached nodes, and lose them in their receive buffers (or be taken for an attack).
        # Ten per node (about 40 queries in flight each, at most) still lets a small network
        # such as a closed test one serve every lookup at once; at 2 per node, 40 nodes with
        # 50-300 ms round trips took 2.3 times as long for 400 lookups. The routers see only
        # the first few (_lookups_allowed), and the slots grow as each reply fills the cache,
        # not as lookups end: waiting for the first lookups to end made a cold start on
        # 50-300 ms round trips take 2.4 times as long as a warm one.
        async with self._lookup_slots:
            await self._room_in_the_rate()
            try:
                running = _Running(LookupResult(infohash), trio.Event(), watch)
                try:
                    # The IPv4 lookup starts even with nothing to ask (and so ends at once).
                    # All are enlisted first: the target is done when the last one ends.
                    starting = [self._enlist(running, family)
                                for ipv6, family in self.families.items()
                                if not ipv6 or family.has_a_start()]
                    for lookup in starting:
                        lookup.start()
                        self._step(lookup)
                    self._pass_room_on()
                    await running.done.wait()
                finally:
                    for lookup in running.lookups.values():
                        del self._running[lookup]
                        if not lookup.finished:  # cancelled
                            lookup.abandon()
                            self._step(lookup)
                return running.result
            finally:
                self._resize_lookup_slots()

    async def _room_in_the_rate(self) -> None:
        """Under a rate limit, a lookup starts only while fewer queries wait for the rate than
        it lets out in a stall timeout: a lookup started then would only queue its queries
        behind the others'. (Lookups that wait out silent nodes send little: however many
        that takes, the queue keeps the rate busy, where a count of lookups fixed by the round
        trips would leave it idle.)"""
        try:
            while self.limited and len(self._outbox) >= self._outbox_room():
                await self._waiting_for_room.park()
        except BaseException:  # cancelled: the room it was woken for goes to the next one
            self._pass_room_on()
            raise

    def _outbox_room(self) -> float:
        return max(DHT_ALPHA, self.options.rate * self.round_trips.stall_after)

    def _pass_room_on(self) -> None:
        """Wake one lookup waiting for room, if there is room: it starts (its queries join the
        outbox) and passes it on in turn. One at a time: woken together, all but one would
        only wait again (a million wakes for 2,000 lookups with concurrency 2,000)."""
        if self._waiting_for_room and len(self._outbox) < self._outbox_room():
            self._waiting_for_room.unpark()

    def _enlist(self, running: _Running, family: DhtFamily) -> Lookup:
        """A target's lookup on `family`, to be started."""
        lookup = Lookup(running.result.infohash, family, self.counters, running.result)
        running.lookups[family.ipv6] = lookup
        self._running[lookup] = running
        return lookup

    def _lookups_allowed(self) -> int:
        # Until K nodes are cached, lookups also ask the bootstrap routers, each once: no more
        # lookups than a router may be sent packets at once (its per-address burst).
        cached, routers_allow = len(self.cache), max(1, self.options.per_ip_burst)
        return min(self.options.concurrency, routers_allow if cached < DHT_K else
                   max(routers_allow, DHT_LOOKUPS_PER_NODE * cached))

    def _resize_lookup_slots(self) -> None:
        allowed = self._lookups_allowed()
        if allowed != self._lookup_slots.total_tokens:
            self._lookup_slots.total_tokens = allowed

    def _step(self, lookup: Lookup) -> None:
        """Carry out what `lookup` decided after an event: withdraw the queries it no longer
        waits for, send the new ones, and give it back the packets the kernel refused as
        failures, after the whole batch (it decides again: a loop, never a recursion)."""
        while True:
            for query in lookup.take_withdrawn():
                self._cancel(query)
            refused = [query for query in lookup.take_queries() if not self._send(query)]
            if not refused:
                break
            for query in refused:
                lookup.failed(query)
        running = self._running.get(lookup)
        if running is None or running.done.is_set():
            return
        foreign = lookup.take_foreign()
        if foreign:
            self._introduce(running, not lookup.ipv6, foreign)
        if lookup.finished and lookup.ipv6 not in running.ended:
            running.ended.add(lookup.ipv6)
            if len(running.ended) == len(running.lookups):
                for ended in running.lookups.values():
                    self.families[ended.ipv6].observe_size(ended.closest_answered())
                result = running.result
                self.counters.suspect_peers += len(result.suspect_peers - result.peers)
                result.suspect_peers = set()
                running.done.set()

    def _introduce(self, running: _Running, ipv6: bool, nodes: list[DhtNode]) -> None:
        """Nodes of one family that a reply in the other's lookup named: to the target's
        lookup on that family, started with them if it had nothing to start from. (Only
        replies name nodes of the other family, never a start or an introduction: the step
        this takes never comes back here.)"""
        family = self.families.get(ipv6)
        if family is None:
            return  # not surveyed: the host has no route there
        lookup = running.lookups.get(ipv6)
        if lookup is None:
            lookup = self._enlist(running, family)
            lookup.start(nodes)
        else:
            lookup.introduce(nodes)  # (one that had ended may go on)
            if not lookup.finished:
                running.ended.discard(ipv6)
        self._step(lookup)

    def _fail(self, query: LookupQuery, distrusted: bool = False) -> None:
        """Tell `query`'s lookup it got no usable reply, and carry out what it decides."""
        query.lookup.failed(query, distrusted)
        self._step(query.lookup)

    def _send(self, query: LookupQuery) -> bool:
        """Send `query` now, or hold it for the pacer. False: the kernel refused it."""
        send_now = not self._outbox
        if self.limited:
            wait = self.per_ip.due(query.candidate.node.host)
            if wait > 0:
                self._hold(query, trio.current_time() + wait)
                return True
            # Straight out only when the pacer holds nothing: a query it holds for this address
            # would otherwise lose its token to this one every time.
            send_now = send_now and not self._held and self.global_bucket.due() == 0
        if send_now:
            sent = self._transmit(query)
            if sent is not None:
                return sent
        self._outbox.append(query)
        if len(self._outbox) == 1:
            self._wake_pacer(0.0)
        return True

    def _hold(self, query: LookupQuery, ready: float) -> None:
        """Until `ready`, when its address's limit lets it go (it is checked again then)."""
        self._held_count += 1
        heapq.heappush(self._held, (ready, self._held_count, query))
        self._wake_pacer(ready)

    def _packet(self, query: LookupQuery, transaction_id: bytes) -> bytes:
        """The query's packet: its lookup's template, cut around the transaction id."""
        running = self._running.get(query.lookup)
        parts = running.packets.get(query.scrape) if running is not None else None
        if parts is None:
            parts = get_peers_template(self.node_id, query.lookup.result.infohash,
                                       scrape=query.scrape, want_ipv6=self.want_ipv6)
            if running is not None:
                running.packets[query.scrape] = parts
        return parts[0] + transaction_id + parts[1]

    def _transmit(self, query: LookupQuery) -> bool | None:
        """Put `query` on the wire: None when the socket's buffer is full (nothing happened),
        False when the kernel refused the packet (our failure, no mark against the node)."""
        node = query.candidate.node
        transaction_id = self._transaction_id()
        sent = self.endpoint.send_nowait(self._packet(query, transaction_id),
                                         node.host, node.port)
        if sent is None:
            return None
        self.counters.queries += 1
        if not sent:
            query.state = QueryState.ENDED
            return False
        if self.limited:  # both tokens at the moment the packet leaves
            self.global_bucket.take()
            self.per_ip.take(node.host)
        query.state, query.transaction_id = QueryState.IN_FLIGHT, transaction_id
        query.sent_at = trio.current_time()
        self.endpoint.expect(transaction_id, node.host, node.port,
                             functools.partial(self._answered, query))
        self._stalling.append(query)
        self._expiring.append(query)
        self._wake_timer(query.sent_at + min(self.round_trips.stall_after,
                                             self.options.query_timeout))
        return True

    def _cancel(self, query: LookupQuery) -> None:
        if query.state is QueryState.IN_FLIGHT:
            node = query.candidate.node
            self.endpoint.forget(query.transaction_id, node.host, node.port)
        query.state = QueryState.ENDED  # a held one is dropped when the pacer reaches it

    def _answered(self, query: LookupQuery, message: KrpcMessage) -> None:
        query.state = QueryState.ENDED
        self.round_trips.add(trio.current_time() - query.sent_at)
        counters, node, lookup = self.counters, query.candidate.node, query.lookup
        if message.kind == b"e":
            counters.krpc_errors += 1
            if message.body.get(b"code") in (KrpcError.GENERIC, KrpcError.SERVER):
                self.per_ip.penalise(node.host, DHT_ERROR_BACKOFF)
            self._fail(query)
            return
        try:
            reply = decode_get_peers_reply_untrusted(message)
        except ProtocolError:
            counters.bad_replies += 1
            self._fail(query)
            return
        counters.replies += 1
        counters.bad_fields += reply.bad_fields
        candidate = query.candidate
        introduced = None if candidate.distance == UNKNOWN_DISTANCE else node.node_id
        if not self.cache.vouch(node.host, node.port, reply.node_id, introduced):
            # mldht ignores "responses with unexpected IDs": neither its nodes nor its values.
            counters.ids_changed += 1
            self._fail(query, distrusted=True)
            return
        lookup.replied(query, reply)
        if not candidate.suspect:
            self.cache.add(DhtNode(reply.node_id, node.host, node.port), time.time())
            self._resize_lookup_slots()  # more nodes known: more lookups may start
        elif query.follow_up:  # trusted and cached after its first reply: a liar after all
            self.cache.forget(node.host, node.port)
        self._step(lookup)
        running = self._running.get(lookup)
        if running is not None and running.watch is not None:
            running.watch(lookup.result)

    def _timed_out(self, query: LookupQuery) -> None:
        query.state = QueryState.ENDED
        node = query.candidate.node
        self.endpoint.forget(query.transaction_id, node.host, node.port)
        self.counters.timeouts += 1
        self.cache.failed(node.host, node.port)
        self._fail(query)

    async def _expire_forever(self) -> None:
        expire_after = self.options.query_timeout
        stalling, expiring = self._stalling, self._expiring
        while True:
            now = trio.current_time()
            # (The same for every query in flight at any moment: the oldest is due first.)
            stall_after = self.round_trips.stall_after
            while stalling and stalling[0].sent_at + stall_after <= now:
                query = stalling.popleft()
                if query.state is QueryState.IN_FLIGHT:
                    query.lookup.stalled(query)
                    self._step(query.lookup)
            while expiring and expiring[0].sent_at + expire_after <= now:
                query = expiring.popleft()
                if query.state is QueryState.IN_FLIGHT:
                    self._timed_out(query)
            self._timer_deadline = min(
                stalling[0].sent_at + stall_after if stalling else math.inf,
                expiring[0].sent_at + expire_after if expiring else math.inf)
            self._timer_wake = wake = trio.Event()
            with trio.move_on_at(self._timer_deadline):
                await wake.wait()
            self._timer_wake, self._timer_deadline = None, math.inf

    def _wake_timer(self, due: float) -> None:
        """A query just sent is due to stall or expire at `due`: wake the timer if it sleeps
        past that (it sleeps until the oldest query is due: one sent while only older ones
        wait to expire, or under a stall timeout the answers have shortened since, is due
        sooner). Awake, the timer applies the current stall timeout to every query in flight;
        until then they stall no later than under the old one."""
        if self._timer_wake is not None and due < self._timer_deadline:
            self._timer_wake.set()
            self._timer_wake = None

    def _wake_pacer(self, ready: float) -> None:
        if self._pacer_wake is not None and ready < self._pacer_deadline:
            self._pacer_wake.set()
            self._pacer_wake = None

    async def _pace_forever(self) -> None:
        held, outbox = self._held, self._outbox
        while True:
            now = trio.current_time()
            while held and held[0][0] <= now:
                outbox.append(heapq.heappop(held)[2])
            wait = 0.0
            given_up: list[LookupQuery] = []
            socket_full = False
            while outbox:
                query = outbox[0]
                if query.state is not QueryState.QUEUED:
                    outbox.popleft()  # its lookup has ended
                    continue
                if self.limited:
                    # Another packet may have taken its address's token since it was queued, or
                    # its node may have asked us to back off: back to the heap then, or given
                    # up, without holding up the packets behind it.
                    if query.lookup.resting(query.candidate):
                        outbox.popleft()
                        query.state = QueryState.ENDED
                        given_up.append(query)
                        continue
                    if (ip_wait := self.per_ip.due(query.candidate.node.host)) > 0:
                        self._hold(outbox.popleft(), now + ip_wait)
                        continue
                    if (wait := self.global_bucket.due()) > 0:
                        break
                sent = self._transmit(query)
                if sent is None:
                    socket_full = True
                    break
                outbox.popleft()
                if not sent:
                    given_up.append(query)
            # The lookups hear of it after the pass: what they decide joins the outbox's end.
            for query in given_up:
                self._fail(query)
            self._pass_room_on()
            if socket_full:
                await self.endpoint.wait_writable()
                continue
            if outbox and not wait:
                continue  # more to send at once
            deadline = min(now + wait if outbox else math.inf,
                           held[0][0] if held else math.inf)
            self._pacer_deadline = deadline
            self._pacer_wake = wake = trio.Event()
            with trio.move_on_at(deadline):
                await wake.wait()
            self._pacer_wake, self._pacer_deadline = None, math.inf


async def resolve_routers(entries: Sequence[str], into: dict[str, list[DhtNode] | str]) -> None:
    """Each HOST:PORT of `entries` as nodes of unknown id, or why it did not resolve, put `into`
    as the answers come (a deadline keeps those already in). All are resolved at once: where DNS
    is down, each waits out the resolver's timeout."""
    async def resolve(entry: str) -> None:
        try:
            host, port = split_host_port(entry)
            addresses = await resolve_addresses(host, port)
        except (ValueError, FetchError) as exc:
            into[entry] = str(exc)
            return
        into[entry] = [DhtNode(b"", address, port) for address in addresses]

    async with trio.open_nursery() as nursery:
        for entry in entries:
            nursery.start_soon(resolve, entry)


async def resolve_bootstrap(entries: Sequence[str], reporter: Reporter) -> list[DhtNode]:
    """Bootstrap routers as nodes of unknown id; one that does not resolve is skipped."""
    resolved: dict[str, list[DhtNode] | str] = {}
    await resolve_routers(entries, resolved)
    nodes = []
    for entry in entries:
        outcome = resolved[entry]
        if isinstance(outcome, str):
            reporter.info(f"dht: bootstrap {entry!r} skipped: {outcome}")
        else:
            nodes.extend(outcome)
    return nodes


def host_has_ipv6_route() -> bool:
    """Whether IPv6 can reach the internet here: connect() on UDP only consults the routing
    table, it sends nothing."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.connect(("2001:4860:4860::8888", 53))
            return not ipaddress.ip_address(probe.getsockname()[0]).is_link_local
    except OSError:
        return False


# ---- Peer probe ----


@dataclass(frozen=True, slots=True)
class ProbeOptions:
    connect_timeout: float  # seconds for the TCP connection
    answer_timeout: float  # seconds from then for the handshake and what the peer holds
    have_window: float  # seconds more for `have` messages after a partial bitfield
    concurrency: int  # connections open at once
    peers_per_torrent: int  # peers tried at most for one torrent
    rate: float  # new connections per second at most (0: no limit)
    allow_private: bool
    connections: int | None = None  # a prober's budget: connections in all (None: no limit)


class ProbeOutcome(enum.Enum):
    TOLD = "told what it holds"
    REFUSED = "refused"  # or reset: the peer's host answered
    TIMEOUT = "no connection in time"
    SILENT = "connected, then silent"  # or trickled: nothing whole within the answer timeout
    CLOSED = "closed before telling what it holds"
    WRONG_TORRENT = "handshake for another torrent"
    MALFORMED = "broke the protocol"
    NOT_ASKED = "not an address to connect to"
    UNREACHABLE = "no route to it"  # or a local firewall: no answer from the network
    LEFT_ALONE = "refused or unreachable earlier in the run: left alone"
    BUSY = "its host had its share of the run: not asked"


@dataclass(slots=True)
class PeerProbe:
    host: str
    port: int
    outcome: ProbeOutcome
    holdings: PeerHoldings | None = None
    detail: str = ""


METADATA_PATIENCE: Final = 3.0  # seconds a peer asked for metadata may go without a new piece
METADATA_PIECE_SECONDS: Final = 0.25  # its turn lasts at most this more a piece (64 KiB/s)
METADATA_TURN_POLL: Final = 0.1  # how often a peer waiting its turn looks whether it has come
METADATA_DEADLINE: Final = 30.0  # seconds one torrent's peers may spend on its metadata


class MetadataWanted:
    """One torrent's BEP 9 fetch, shared by the probes of its peers: asked of one peer at a
    time (a hostile peer may send megabytes), until one has sent it whole and checked. The
    peers that offer it wait their turn on their open connection; a peer asked must send a
    piece every METADATA_PATIENCE seconds or lose its turn, so a staller or a forger delays
    the fetch but cannot deny it."""

    def __init__(self) -> None:
        self.info: bytes | None = None
        self.asking = False
        # Peers waiting their turn stay connected past their answer timeout, until this.
        self.deadline = trio.current_time() + METADATA_DEADLINE

    @property
    def wanted(self) -> bool:
        return self.info is None

    def claim(self) -> bool:
        """Whether this peer is to be asked now: nobody has it yet, and nobody is asked."""
        if self.info is not None or self.asking:
            return False
        self.asking = True
        return True


async def probe_peer(host: str, port: int, infohash: bytes, piece_count: int | None,
                     options: ProbeOptions, peer_id: bytes,
                     metadata: MetadataWanted | None = None) -> PeerProbe:
    """Ask one peer what it holds, read only: our handshake (with the BEP 6 and BEP 10 bits),
    then its handshake, its bitfield or have_all/have_none, and the `have` messages within
    `have_window`; then we hang up. With `metadata`, a peer that offers BEP 9 is also asked for
    the info dictionary (our extended handshake and ut_metadata requests) when its turn comes.
    Nothing else is ever sent: no `interested`, no request for a piece, no piece, no bitfield
    of ours. Every failure is this peer's outcome, never an exception."""
    if _bogus_destination(host, port, options.allow_private):
        return PeerProbe(host, port, ProbeOutcome.NOT_ASKED)
    try:
        with trio.move_on_after(options.connect_timeout) as connecting:
            stream = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        # Only a refusal (a reset) came from the peer's host; no route, a network down or a
        # local firewall is no answer at all (the outage watch must see it as silence).
        # (trio gives the attempts' errors as the cause of its own.)
        attempts = [exc, *getattr(exc.__cause__, "exceptions", ())]
        refused = any(isinstance(attempt, OSError)
                      and attempt.errno in (errno.ECONNREFUSED, errno.ECONNRESET)
                      for attempt in attempts)
        return PeerProbe(host, port, ProbeOutcome.REFUSED if refused
                         else ProbeOutcome.UNREACHABLE, detail=exc.strerror or str(exc))
    if connecting.cancelled_caught:
        return PeerProbe(host, port, ProbeOutcome.TIMEOUT)
    probe = PeerProbe(host, port, ProbeOutcome.SILENT)
    async with stream:
        answering = trio.CancelScope(deadline=trio.current_time() + options.answer_timeout)
        reader = _PeerReader(stream, probe, infohash, piece_count, options, metadata,
                             answering)
        try:
            with answering:
                await reader.read(peer_id)
        except ProtocolError as exc:
            probe.outcome = (ProbeOutcome.WRONG_TORRENT if isinstance(exc, WrongTorrentError)
                             else ProbeOutcome.MALFORMED)
            probe.holdings, probe.detail = None, str(exc)  # what it said before is not believed
        except (OSError, trio.BrokenResourceError) as exc:
            probe.outcome, probe.detail = ProbeOutcome.CLOSED, str(exc)
        finally:
            reader.give_up_metadata()  # its turn passes to another peer
    if probe.outcome is ProbeOutcome.SILENT and probe.holdings is not None:
        probe.outcome = ProbeOutcome.TOLD  # a bitfield, then no `have` in the window
    elif probe.outcome is ProbeOutcome.CLOSED and probe.holdings is not None:
        probe.outcome = ProbeOutcome.TOLD  # reset after telling: what it told stands
    return probe


class _PeerReader:
    """The reading side of one probe: what the peer holds and, if wanted, the metadata."""

    def __init__(self, stream: trio.SocketStream, probe: PeerProbe, infohash: bytes,
                 piece_count: int | None, options: ProbeOptions,
                 metadata: MetadataWanted | None, answering: trio.CancelScope) -> None:
        self.stream, self.probe, self.infohash = stream, probe, infohash
        self.options, self.metadata = options, metadata
        # The answer timeout, moved to the metadata's deadline while this peer may still
        # give it (waiting its turn, or asked), and back once it no longer may.
        self.answering, self.answer_deadline = answering, answering.deadline
        self.holdings = PeerHoldings(piece_count)
        # The metadata from this peer: it may offer it (the BEP 10 bit, then its extended
        # handshake naming ut_metadata); it is asked when its turn comes (`asking`), and
        # given up when it cannot or will not give it.
        self.may_offer_metadata = False
        self.peer_ut_metadata: int | None = None
        self.peer_metadata_size: int | None = None
        self.asking = False
        self.given_up = False
        self.patience_ends = math.inf
        self.turn_ends = math.inf
        self.assembly: MetadataAssembly | None = None

    def _waits_for_metadata(self) -> bool:
        return (self.metadata is not None and self.metadata.wanted and self.may_offer_metadata
                and not self.given_up)

    async def read(self, peer_id: bytes) -> None:
        await self.stream.send_all(encode_peer_handshake(self.infohash, peer_id))
        buffer = bytearray()
        while len(buffer) < PEER_HANDSHAKE_LENGTH:
            data = await self.stream.receive_some(1 << 16)
            if not data:
                self.probe.outcome = ProbeOutcome.CLOSED
                return
            buffer += data
        decode_peer_handshake_untrusted(bytes(buffer[:PEER_HANDSHAKE_LENGTH]), self.infohash)
        self.may_offer_metadata = bool(buffer[25] & 0x10)
        del buffer[:PEER_HANDSHAKE_LENGTH]
        holdings, window_ends = self.holdings, math.inf
        while True:
            for kind, payload in split_peer_messages_untrusted(buffer):
                if kind == PeerMessage.EXTENDED and self.metadata is not None:
                    await self._take_extended(payload)
                else:
                    holdings.take_untrusted(kind, payload)
            now = trio.current_time()
            if self.asking and now >= min(self.patience_ends, self.turn_ends):
                self.give_up_metadata()  # a staller: another peer's turn
            if self._waits_for_metadata() and not self.asking and self.metadata is not None \
                    and self.metadata.claim():
                await self._ask_for_metadata()
            waits = self._waits_for_metadata()
            self.answering.deadline = (max(self.answer_deadline, self.metadata.deadline)
                                       if waits and self.metadata is not None
                                       else self.answer_deadline)
            if holdings.answered:
                self.probe.holdings = holdings
                window_ends = min(window_ends, now + self.options.have_window)
                if holdings.complete and not waits:
                    self.probe.outcome = ProbeOutcome.TOLD
                    return
            # The have window ends the wait, unless the metadata may still come from this
            # peer: then until a piece is overdue, or (waiting its turn) a look at the turn.
            # The answer timeout bounds it all.
            until = window_ends
            if waits:
                until = (min(self.patience_ends, self.turn_ends) if self.asking
                         else now + METADATA_TURN_POLL)
            received: bytes | None = None
            with trio.move_on_at(until):
                received = await self.stream.receive_some(1 << 16)
            if received is None and waits:
                continue  # a look at the metadata's turn, or a piece overdue
            if not received:  # the window is over, or the peer hung up
                self.probe.outcome = (ProbeOutcome.TOLD if holdings.answered
                                      else ProbeOutcome.CLOSED)
                return
            buffer += received

    async def _ask_for_metadata(self) -> None:
        self.asking = True
        self.patience_ends = trio.current_time() + METADATA_PATIENCE
        await self.stream.send_all(encode_extended_handshake())
        if self.peer_ut_metadata is not None:
            await self._request_pieces()

    async def _request_pieces(self) -> None:
        assert self.peer_ut_metadata is not None and self.peer_metadata_size is not None
        self.assembly = MetadataAssembly(self.infohash, self.peer_metadata_size)
        self.turn_ends = (trio.current_time() + METADATA_PATIENCE
                          + METADATA_PIECE_SECONDS * self.assembly.piece_count)
        for piece in range(self.assembly.piece_count):
            await self.stream.send_all(encode_metadata_request(self.peer_ut_metadata, piece))

    async def _take_extended(self, payload: bytes) -> None:
        if not payload:
            raise ProtocolError("extended message without an id")
        if payload[0] == 0:  # its extended handshake (libtorrent sends it unasked)
            ut_id, size = decode_extended_handshake_untrusted(payload[1:])
            if ut_id is None or size is None or size > MAX_METADATA_BYTES:
                self.give_up_metadata()  # it does not offer the metadata, or more than we take
            elif self.peer_ut_metadata is None:
                self.peer_ut_metadata, self.peer_metadata_size = ut_id, size
                if self.asking:
                    await self._request_pieces()
        elif payload[0] == UT_METADATA_OURS and self.assembly is not None:
            kind, piece, data = decode_metadata_message_untrusted(payload[1:])
            if kind == MetadataMessage.REJECT:
                self.give_up_metadata()
            elif kind == MetadataMessage.DATA:
                new = piece not in self.assembly.pieces  # a piece sent again buys no time
                info = self.assembly.take_untrusted(piece, data)
                if new:
                    self.patience_ends = trio.current_time() + METADATA_PATIENCE
                if info is not None:
                    assert self.metadata is not None
                    self.metadata.info = info
                    self.give_up_metadata()  # (done: nothing more to ask)
        # Other extensions' messages (ut_pex, upload_only, ...) tell nothing we read.

    def give_up_metadata(self) -> None:
        """This peer is not asked (again); if it was being asked, another peer's turn."""
        if self.asking and self.metadata is not None:
            self.metadata.asking = False
        self.asking, self.given_up, self.assembly = False, True, None


# Seconds of connections one host may take in a probe run: a client seeding a thousand torrents
# of a collection, each asked on its own connection, one at a time, is asked about a few
# hundred; a host in every swarm that answers at the last moment, about thirty.
PROBE_HOST_SECONDS: Final = 300.0
_NOT_TRIED: Final = frozenset({ProbeOutcome.NOT_ASKED, ProbeOutcome.LEFT_ALONE,
                               ProbeOutcome.BUSY})
_NOT_REACHED: Final = frozenset({ProbeOutcome.REFUSED, ProbeOutcome.TIMEOUT,
                                 ProbeOutcome.UNREACHABLE})


@dataclass(slots=True)
class SwarmProbe:
    """What the peers of one torrent said they hold."""

    tried: int = 0  # connections attempted
    reachable: int = 0  # connected
    answering: int = 0  # told what they hold
    verified_seeds: int = 0  # every piece (or have_all)
    availability: float | None = None  # complete copies; None: no piece count, or none told
    # Peers that would have been asked but were not (the run's budget spent, or their host's
    # share of the run): a complete copy may have been there, unseen.
    skipped: int = 0
    outcomes: Counter[ProbeOutcome] = field(default_factory=Counter)
    peers: list[PeerProbe] = field(default_factory=list)
    metadata: bytes | None = None  # the info dictionary, when it was wanted and a peer sent it
    metainfo: Metainfo | None = None  # what it says, when tsmd reads it
    piece_count: int | None = None  # as known before, or learnt from the metadata


class PeerProber:
    """Probes swarms under one set of limits: connections at once, a rate of new ones, a
    budget of connections in all; one connection to a host at a time (a client seeding many
    torrents of a collection is asked of each, one after the other; a host that DHT replies
    name at many ports is not flooded), never twice to a peer for one torrent, and none after
    it refused, did not answer a connection, or connected and said nothing."""

    def __init__(self, options: ProbeOptions) -> None:
        self.options = options
        self.peer_id = b"-TS0001-" + os.urandom(6).hex().encode()
        self._connections = trio.CapacityLimiter(max(1, options.concurrency))
        self._rate = TokenBucket(options.rate, 1.0)
        self._asked: set[tuple[bytes, str, int]] = set()  # (infohash, host, port)
        self._left_alone: set[tuple[str, int]] = set()
        self._one_at_a_time: dict[str, trio.Lock] = {}  # hosts connected to now
        self._host_seconds: dict[str, float] = {}  # each host's time connected in the run
        self.budget_left = math.inf if options.connections is None else options.connections

    async def _probe_one(self, host: str, port: int, infohash: bytes, piece_count: int | None,
                         metadata: MetadataWanted | None) -> PeerProbe:
        """One peer, its host ours for now: under the limits, unless left alone."""
        if (host, port) in self._left_alone or (host, 0) in self._left_alone:
            self.budget_left += 1  # not spent
            return PeerProbe(host, port, ProbeOutcome.LEFT_ALONE)
        async with self._connections:
            while (wait := self._rate.due()) > 0:
                await trio.sleep(wait)
            self._rate.take()
            probe = await probe_peer(host, port, infohash, piece_count, self.options,
                                     self.peer_id, metadata)
        # A port that refused, or a host with no connection in time or no route, would cost
        # as much for every torrent that names it: left alone for the run.
        if probe.outcome is ProbeOutcome.REFUSED:
            self._left_alone.add((host, port))
        elif probe.outcome in (ProbeOutcome.TIMEOUT, ProbeOutcome.UNREACHABLE):
            self._left_alone.add((host, 0))
        return probe

    async def probe(self, infohash: bytes, peers: Iterable[tuple[str, int]],
                    piece_count: int | None, want_metadata: bool = False) -> SwarmProbe:
        """Probe up to `peers_per_torrent` of `peers` (chosen at random, others in another
        run: which ones a lookup found first says nothing of what they hold). With
        `want_metadata`, the info dictionary is fetched too (BEP 9), and the piece count it
        gives judges what every peer told."""
        fresh = sorted(peer for peer in set(peers) if (infohash, *peer) not in self._asked)
        random.shuffle(fresh)
        # One port per IP: a lookup's reply may name one host at many ports (a poisoned
        # one, to have us connect to a victim), and peers behind one NAT are rare.
        by_host = {host: (host, port) for host, port in reversed(fresh)}
        chosen = [peer for peer in fresh if by_host[peer[0]] == peer]
        wanted = min(self.options.peers_per_torrent, len(chosen))
        chosen = chosen[:int(min(wanted, self.budget_left))]
        self.budget_left -= len(chosen)
        self._asked.update((infohash, host, port) for host, port in chosen)
        swarm = SwarmProbe(piece_count=piece_count, skipped=wanted - len(chosen))
        metadata = MetadataWanted() if want_metadata else None

        async def one(host: str, port: int) -> None:
            in_use = self._one_at_a_time.setdefault(host, trio.Lock())
            try:
                # A host that many torrents name is asked about one at a time, for
                # PROBE_HOST_SECONDS of connections in a run at most: then the torrents
                # still waiting for it go on without it (a host in every swarm, slow to
                # answer, must not set the pace of the whole run).
                async with in_use:
                    if self._host_seconds.get(host, 0.0) >= PROBE_HOST_SECONDS:
                        self.budget_left += 1  # not spent
                        swarm.peers.append(PeerProbe(host, port, ProbeOutcome.BUSY))
                        return
                    started = trio.current_time()
                    try:
                        swarm.peers.append(await self._probe_one(host, port, infohash,
                                                                 piece_count, metadata))
                    finally:
                        self._host_seconds[host] = (self._host_seconds.get(host, 0.0)
                                                    + trio.current_time() - started)
            finally:
                if not in_use.locked() and not in_use.statistics().tasks_waiting:
                    self._one_at_a_time.pop(host, None)

        async with trio.open_nursery() as nursery:
            for host, port in chosen:
                nursery.start_soon(one, host, port)
        if metadata is not None and metadata.info is not None:
            swarm.metadata = metadata.info
            with contextlib.suppress(ProtocolError):  # hashed right, but not readable
                swarm.metainfo = metainfo_from_info_untrusted(metadata.info, infohash)
                if piece_count is None:
                    swarm.piece_count = swarm.metainfo.piece_count
        told = []
        for peer in swarm.peers:
            if peer.holdings is not None and swarm.piece_count is not None:
                try:
                    peer.holdings.learn_piece_count(swarm.piece_count)
                except ProtocolError as exc:
                    peer.outcome, peer.holdings, peer.detail = (ProbeOutcome.MALFORMED, None,
                                                                str(exc))
            swarm.outcomes[peer.outcome] += 1
            swarm.skipped += peer.outcome is ProbeOutcome.BUSY
            if peer.outcome not in _NOT_TRIED:
                swarm.tried += 1
                swarm.reachable += peer.outcome not in _NOT_REACHED
            if peer.holdings is not None:  # (only a peer that told keeps them)
                told.append(peer.holdings)
                swarm.verified_seeds += peer.holdings.complete
        swarm.answering = len(told)
        if swarm.piece_count is not None and told:  # (none told: nothing seen, not 0 copies)
            swarm.availability = distributed_copies(told, swarm.piece_count)
        return swarm


@dataclass(frozen=True, slots=True)
class WebSeedPiece:
    """What a web seed is asked for: piece 0 of a v1 (or hybrid) torrent, whose hash is known.
    A url-list server is asked for the first file's first bytes, as much of piece 0 as that
    file holds; a BEP 17 httpseeds script for piece 0 itself."""

    infohash: bytes
    name: str
    first_file_path: tuple[str, ...] | None  # None: a single-file torrent (its file is `name`)
    first_file_length: int
    piece_length: int  # of piece 0: the piece length, or the whole torrent if smaller
    piece_sha1: bytes


def web_seed_request(seed: WebSeed, piece: WebSeedPiece) -> tuple[str, tuple[int, int] | None]:
    """The URL to GET and the byte range to ask for, as BEP 19 and BEP 17 say clients do."""
    quote = functools.partial(urllib.parse.quote, safe="")
    if seed.kind == "httpseeds":
        return (seed.url + ("&" if "?" in seed.url else "?")
                + f"info_hash={urllib.parse.quote_from_bytes(piece.infohash, safe='')}&piece=0",
                None)
    url = seed.url
    if piece.first_file_path is None:
        if url.endswith("/"):  # a folder holding the file
            url += quote(piece.name)
    else:
        url = (url if url.endswith("/") else url + "/") + "/".join(
            quote(part) for part in (piece.name, *piece.first_file_path))
    return url, (0, min(piece.piece_length, piece.first_file_length) - 1)


@dataclass(frozen=True, slots=True)
class WebSeedCheck:
    served: bool  # the data, checked
    answered: bool  # the server answered at all (a 404 is an answer; no connection is not)
    why: str = ""  # what was wrong


_CONTENT_RANGE: Final = re.compile(r"bytes (\d{1,20})-(\d{1,20})/(\d{1,20})")


async def check_web_seed(fetcher: Fetcher, seed: WebSeed, piece: WebSeedPiece) -> WebSeedCheck:
    """Whether `seed` serves the torrent's data. When the bytes asked for are all of piece 0,
    they must hash to it. Else (a first file shorter than a piece, whose rest of piece 0 is
    in other files) they must be that file whole: as many bytes, of a file that long (a
    server answering every path with one page must not pass)."""
    url, byte_range = web_seed_request(seed, piece)
    wanted = piece.piece_length if byte_range is None else byte_range[1] + 1
    try:
        result = await fetcher.fetch(url, max_bytes=wanted, byte_range=byte_range)
    except (HttpStatusError, ResponseTooBig) as exc:
        return WebSeedCheck(False, True, str(exc))
    except FetchError as exc:  # no answer: a dead server, or a network that is down
        return WebSeedCheck(False, False, str(exc))
    body = result.body
    if result.status == 206:
        answered = _CONTENT_RANGE.fullmatch(result.content_range.strip())
        if answered is None or int(answered[1]) != 0 or int(answered[2]) != wanted - 1 \
                or int(answered[3]) != piece.first_file_length:
            return WebSeedCheck(False, True, f"{url}: the range {result.content_range!r}, not "
                                             f"bytes 0-{wanted - 1}/{piece.first_file_length}")
    if wanted == piece.piece_length:
        if hashlib.sha1(body).digest() != piece.piece_sha1:
            return WebSeedCheck(False, True, f"{url}: {len(body):,} bytes that are not piece 0")
    elif len(body) != wanted:
        return WebSeedCheck(False, True, f"{url}: {len(body):,} bytes, not the first "
                                         f"{wanted:,} of the file")
    return WebSeedCheck(True, True)


# ---- Tracker scrape ----


@dataclass(slots=True)
class TrackerTally:
    """What one tracker did in one run; stored as its health."""

    url: str
    hashes_asked: int = 0
    hashes_answered: int = 0
    requests: int = 0
    retries: int = 0
    truncations: int = 0
    bad_entries: int = 0  # HTTP and WebSocket scrape entries that could not be read
    error: str | None = None
    rtt_total: float = 0.0
    rtt_count: int = 0
    canaries_answered: int = 0
    # What gave away a tracker that invents numbers: its answer for a canary, a random infohash
    # that nobody ever announced. None: no canary said anything but 0 seeders and 0 leechers.
    fabrication: str | None = None
    full_scrape: bool = False  # answered with one full scrape this run
    empty_replies: int = 0  # HTTP scrapes answered with an empty `files` (none known)
    # Canaries in requests whose reply was read, listed in it or not: opentracker over HTTP
    # leaves an unknown hash out, which is what an honest tracker does.
    canaries_tested: int = 0
    note: str | None = None  # said after the run; not a failure

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def rtt_ms(self) -> float | None:
        return 1000 * self.rtt_total / self.rtt_count if self.rtt_count else None


class TrackerDead(Exception):
    """Internal: stop asking this tracker in this run (its tally carries the reason)."""


class TrackerSilent(TrackerDead):
    """Internal: the tracker's address answered nothing at all; another address may."""


@dataclass(frozen=True, slots=True)
class ScrapeOptions:
    udp_batch: int
    http_batch: int
    timeout: float
    attempts: int
    window: int
    allow_private: bool


class _HashQueue:
    """The hashes a tracker still owes, handed out in batches whose size shrinks on truncation.

    With `canaries`, each batch of two or more carries one canary: a random infohash, new for
    every request, that nobody has announced, at a random place among the real ones. It takes
    a place a real hash would have had (a 70-hash packet asks 69), so it costs no request, and a
    tracker cannot tell it from the hashes around it. An honest tracker knows no peer of it."""

    def __init__(self, hashes: Sequence[bytes], batch: int, *, canaries: bool = False) -> None:
        self.pending = list(reversed(hashes))
        self.batch = batch
        self.requeued: dict[bytes, int] = {}  # hash -> size of the reply that left it out
        self.canaries: set[bytes] | None = set() if canaries else None

    def take(self) -> list[bytes]:
        with_canary = self.canaries is not None and self.batch >= 2
        size = min(self.batch - with_canary, len(self.pending))
        taken = self.pending[-size:][::-1] if size else []
        del self.pending[len(self.pending) - size:]
        if taken and with_canary:
            canary = os.urandom(20)
            self.canaries.add(canary)  # type: ignore[union-attr]
            taken.insert(int.from_bytes(os.urandom(2), "big") % (len(taken) + 1), canary)
        return taken

    def is_canary(self, infohash: bytes) -> bool:
        return self.canaries is not None and infohash in self.canaries

    def give_back(self, hashes: Sequence[bytes], answered: int, *, shrink: bool) -> None:
        """Re-queue hashes a reply left out; with `shrink`, ask at most `answered` at once.
        A canary is never asked twice: the next request brings its own."""
        if shrink:
            self.batch = max(1, min(self.batch, answered))
        hashes = [h for h in hashes if not self.is_canary(h)]
        self.pending.extend(reversed(hashes))
        self.requeued.update(dict.fromkeys(hashes, answered))

    def confirm_cut(self, answered_hashes: Iterable[bytes]) -> None:
        """Hashes left out once and answered now were cut off, not unknown: ask fewer at once."""
        for infohash in answered_hashes:
            size = self.requeued.get(infohash)
            if size:
                self.batch = max(1, min(self.batch, size))


MAX_TRACKER_ADDRESSES: Final = 4  # addresses of one tracker tried in a run: each costs a timeout


async def _resolve_tracker(host: str, port: int, endpoint: UdpEndpoint | None,
                           allow_private: bool) -> list[str]:
    """Every address of a UDP tracker that may be asked, IPv4 first (more trackers answer
    there); TrackerDead when none."""
    try:
        addresses = await resolve_addresses(host, port)
    except FetchError as exc:
        if isinstance(exc, NoSuchHost) and endpoint is not None:
            endpoint.counters.dns_answers += 1
        raise TrackerDead(str(exc)) from None
    if endpoint is not None and ip_literal_address(host) is None:  # DNS answered, not a literal
        endpoint.counters.dns_answers += 1
    usable = [a for a in addresses if (allow_private or is_global_address(a))
              and (endpoint is None or endpoint.can_reach(a))]
    if not usable:
        raise TrackerDead(f"{host} resolves to no usable address ({', '.join(addresses[:3])}"
                          f"{'' if allow_private else '; private addresses need allow_private'})")
    return sorted(usable, key=lambda a: ":" in a)[:MAX_TRACKER_ADDRESSES]


class UdpTrackerClient:
    """BEP 15 scrape of one tracker over the shared endpoint."""

    def __init__(self, endpoint: UdpEndpoint, url: str, options: ScrapeOptions,
                 tally: TrackerTally) -> None:
        parts = urllib.parse.urlsplit(url)
        self.endpoint = endpoint
        self.host = parts.hostname or ""
        self.port = parts.port or 0
        # Every address the name has: one that is silent on connect gives way to the next.
        self.addresses: list[str] = []
        self.address = ""
        self.options = options
        self.tally = tally
        self._connection_id: int | None = None
        self._connected_at = 0.0
        self._connect_lock = trio.Lock()
        self._dead: str | None = None  # once a connect fails, every worker gives up at once

    async def _exchange(self, build: Any, address: str) -> UdpTrackerReply:
        """One request to `address` with retransmits; `build(tid)` makes the packet. (The
        address is fixed for all of them: a connection id belongs to one address.)"""
        for attempt in range(self.options.attempts):
            if attempt:
                self.tally.retries += 1
            transaction_id = int.from_bytes(os.urandom(4), "big")
            if self.endpoint.is_pending(transaction_id, address, self.port):
                continue
            self.tally.requests += 1
            started = trio.current_time()
            try:
                data = await self.endpoint.request(build(transaction_id), address,
                                                   self.port, transaction_id, self.options.timeout)
            except NotSent:
                continue
            if data is None:
                continue
            try:
                reply = decode_udp_tracker_reply_untrusted(data)
            except ProtocolError as exc:
                raise TrackerDead(f"malformed reply: {exc}") from None
            self.tally.rtt_total += trio.current_time() - started
            self.tally.rtt_count += 1
            return reply
        raise TrackerSilent(f"no reply after {self.options.attempts} attempts "
                            f"({self.options.timeout:g} s each)")

    async def _connection(self) -> tuple[int, str]:
        """A live connection id, and the address it belongs to."""
        async with self._connect_lock:
            if self._dead is not None:
                raise TrackerDead(self._dead)
            # Renew a little before BEP 15's one minute so a reply never races the expiry.
            if self._connection_id is None or \
                    trio.current_time() - self._connected_at > UDP_CONNECTION_ID_LIFETIME - 5:
                try:
                    reply = await self._connect_any_address()
                    if reply.action == TrackerAction.ERROR:
                        raise TrackerDead(f"tracker error on connect: {reply.error}")
                    if reply.action != TrackerAction.CONNECT or reply.connection_id is None:
                        raise TrackerDead(f"unexpected reply to connect (action {reply.action})")
                except TrackerDead as exc:
                    self._dead = str(exc)
                    raise
                self._connection_id = reply.connection_id
                self._connected_at = trio.current_time()
            return self._connection_id, self.address

    async def _connect_any_address(self) -> UdpTrackerReply:
        """BEP 15 connect to the current address, else to each next one that the name has
        (a tracker whose IPv4 or one of whose hosts is down still answers on another)."""
        tried = []
        while True:
            try:
                return await self._exchange(encode_udp_connect, self.address)
            except TrackerSilent as exc:
                tried.append(self.address)
                if not self._next_address():
                    if len(tried) > 1:
                        raise TrackerSilent(f"{exc}, from each of its {len(tried)} addresses "
                                            f"({', '.join(tried)})") from None
                    raise

    def _next_address(self) -> bool:
        """Move on to the tracker's next address, if it has one; its connection id is void."""
        index = self.addresses.index(self.address) if self.address in self.addresses else -1
        if index + 1 >= len(self.addresses):
            return False
        self.address = self.addresses[index + 1]
        self._connection_id = None
        return True

    async def _fail_over(self, silent: str) -> bool:
        """After a scrape to `silent` went unanswered: whether another address is to be asked
        (once for all the workers that met the same silence)."""
        async with self._connect_lock:
            return self.address != silent or self._next_address()

    async def scrape(self, queue: _HashQueue, deliver: Any) -> None:
        """Work through `queue`, handing (hash, counts) pairs to `deliver` batch by batch."""
        connection_errors = 0
        while batch := queue.take():
            connection_id, address = await self._connection()
            try:
                reply = await self._exchange(
                    lambda tid: encode_udp_scrape(connection_id, tid, batch), address)
            except TrackerSilent:  # the address went quiet in the middle of the run
                queue.give_back(batch, queue.batch, shrink=False)
                if await self._fail_over(address):
                    continue
                raise
            if reply.action == TrackerAction.ERROR:
                queue.give_back(batch, queue.batch, shrink=False)
                # An expired or unknown connection id: connect again, a bounded number of times.
                if connection_errors < self.options.attempts and "connect" in (reply.error or "").lower():
                    connection_errors += 1
                    if self._connection_id == connection_id:  # not one got meanwhile
                        self._connection_id = None
                    continue
                raise TrackerDead(f"tracker error: {reply.error}")
            if reply.action != TrackerAction.SCRAPE:
                raise TrackerDead(f"unexpected reply to scrape (action {reply.action})")
            entries = reply.entries
            if len(entries) > len(batch):
                raise TrackerDead(f"answered {len(entries)} entries for {len(batch)} hashes")
            if len(entries) < len(batch):
                self.tally.truncations += 1
                if not entries:
                    raise TrackerDead(f"answered none of {len(batch)} hashes")
                queue.give_back(batch[len(entries):], len(entries), shrink=True)
            await deliver(list(zip(batch, entries)))


MAX_FULL_SCRAPE_BYTES: Final = 64 * 1024 * 1024  # a full scrape as sent (gzip: ~20 bytes a swarm)
MAX_FULL_SCRAPE_DECODED: Final = 1024 * 1024 * 1024  # and decoded (~70 bytes a swarm): 15 M swarms
FULL_SCRAPE_DELIVERY: Final = 1000  # answers handed on at a time


class HttpTrackerClient:
    """BEP 48 scrape of one tracker through the fetcher (timeouts, size cap, address policy)."""

    MAX_REPLY_BYTES: Final = 4 * 1024 * 1024

    def __init__(self, fetcher: Fetcher, url: str, options: ScrapeOptions,
                 tally: TrackerTally) -> None:
        scrape_url = http_scrape_url(url)
        if scrape_url is None:
            raise TrackerDead("announce URL has no 'announce' segment, so no scrape URL (BEP 48)")
        self.scrape_url = scrape_url
        self.fetcher = fetcher
        self.options = options
        self.tally = tally

    async def _get(self, url: str, max_bytes: int, timeout: float, *,
                   raw: bool = False) -> FetchResult:
        """GET with `attempts` tries; an answer that another try cannot change is not asked
        again. TrackerDead when no try succeeded."""
        error = "not asked"
        for attempt in range(self.options.attempts):
            if attempt:
                self.tally.retries += 1
            self.tally.requests += 1
            started = trio.current_time()
            try:
                with trio.fail_after(timeout):
                    result = await self.fetcher.fetch(url, max_bytes=max_bytes, raw=raw)
            except trio.TooSlowError:
                error = "timed out"
                continue
            except FetchError as exc:
                error = str(exc).replace(f"{self.scrape_url}", "scrape URL", 1)[:300]
                if exc.final:
                    break
                continue
            self.tally.rtt_total += trio.current_time() - started
            self.tally.rtt_count += 1
            return result
        raise TrackerDead(error)

    async def full_scrape(self, wanted: set[bytes], deliver: Any) -> None:
        """One request for every swarm the tracker has (gzip-encoded where it can). The body is
        downloaded whole (MAX_FULL_SCRAPE_BYTES as sent), then decoded and read a chunk at a
        time, keeping the `wanted` hashes: the decoded whole is never in memory."""
        # A big tracker's full scrape takes a while to send: the whole download, not each read.
        result = await self._get(self.scrape_url, MAX_FULL_SCRAPE_BYTES,
                                 self.fetcher.deadline, raw=True)
        self.tally.full_scrape = True  # it answered: what it sent decides (not a time-out)
        reader = FullScrapeReader(wanted)
        try:
            for piece in decoded_pieces_untrusted(result.body, result.content_encoding,
                                                  MAX_FULL_SCRAPE_DECODED):
                # Per piece decoded (64 KiB of gzip may hold 60 MB): other trackers' timeouts
                # and Ctrl-C are heard meanwhile.
                await trio.lowlevel.checkpoint()
                reader.feed(piece)
            reply = reader.finish()
        except ProtocolError as exc:
            raise TrackerDead(f"full scrape: {exc}") from None
        self.tally.bad_entries += reply.bad_entries
        answered = list(reply.files.items())
        for start in range(0, len(answered), FULL_SCRAPE_DELIVERY):
            await deliver(answered[start:start + FULL_SCRAPE_DELIVERY])

    async def scrape(self, queue: _HashQueue, deliver: Any) -> None:
        while batch := queue.take():
            result = await self._get(encode_http_scrape_url(self.scrape_url, batch),
                                     self.MAX_REPLY_BYTES,
                                     self.fetcher.connect_timeout + 2 * self.options.timeout)
            try:
                reply = decode_http_scrape_untrusted(result.body)
            except ProtocolError as exc:
                raise TrackerDead(str(exc)) from None
            files = reply.files
            self.tally.empty_replies += not files and not reply.bad_entries
            self.tally.canaries_tested += sum(map(queue.is_canary, batch))
            self.tally.bad_entries += reply.bad_entries
            answered = [(h, files[h]) for h in batch if h in files]
            # A tracker leaves out the hashes it does not know, and everything past its cap
            # (opentracker: 64) too. Those left out after the last answered hash may have been
            # cut off: they are asked again once. Only when such a hash is then answered was
            # the reply really cut, and requests get smaller; twice left out = unknown.
            recovered = [h for h, _ in answered if h in queue.requeued]
            if recovered:
                self.tally.truncations += 1
                queue.confirm_cut(recovered)
            # A request larger than the cap now known cut its tail for sure: ask again.
            oversized = len(batch) > queue.batch
            last = max((i for i, h in enumerate(batch) if h in files), default=-1)
            tail = [h for h in batch[last + 1:] if oversized or h not in queue.requeued]
            if answered and tail:
                queue.give_back(tail, last + 1, shrink=False)
            if answered:
                await deliver(answered)


# RFC 6455 §7: a close handshake ends a connection politely; a tracker that does not answer
# it within this many seconds gets its socket closed anyway (trio-websocket would wait 60 s).
WS_CLOSE_TIMEOUT: Final = 1.0
# Messages skipped while waiting for a scrape reply (a WebTorrent tracker also relays WebRTC
# offers and answers, which tsmd never asks for); more in a row and the tracker is given up.
MAX_WS_OTHER_MESSAGES: Final = 20


class _ConnectionLost(Exception):
    """Internal: a WebSocket attempt failed with its connection; a new connection may do."""


class WebSocketTrackerClient:
    """WebTorrent scrape (`ws://`, `wss://`) of one tracker: JSON messages over one WebSocket.
    The fetcher connects the stream (address policy, proxy tunnel, TLS with SNI, timeouts) and
    trio-websocket only speaks RFC 6455 on it: it never resolves or connects by itself."""

    def __init__(self, fetcher: Fetcher, url: str, options: ScrapeOptions,
                 tally: TrackerTally) -> None:
        parts = urllib.parse.urlsplit(url)
        self.secure = parts.scheme == "wss"
        # The opening handshake is an HTTP/1.1 request: host, port, Host header and target
        # are those of the http(s) URL at the same place (RFC 6455 §3).
        twin = urllib.parse.urlunsplit(parts._replace(scheme="https" if self.secure else "http"))
        try:
            _, self.host, self.port, self.authority, self.target = ascii_request_parts(twin)
        except FetchError as exc:
            raise TrackerDead(str(exc)) from None
        self.fetcher = fetcher
        self.options = options
        self.tally = tally
        self._turn = trio.Lock()
        self._dead: str | None = None
        self._connection: trio_websocket.WebSocketConnection | None = None
        self._stream: trio.abc.Stream | None = None

    async def scrape(self, queue: _HashQueue, deliver: Any) -> None:
        """Work through `queue` on one connection, handing (hash, counts) pairs to `deliver`."""
        import trio_websocket

        # A reply names no request, so a connection carries one request at a time; and more
        # connections would add to the tracker's load (bittorrent-tracker is one Node process)
        # for little gain, as one message asks for many hashes. So the first of scrape_tracker's
        # `window` workers works the whole queue on one connection, and the others find the
        # queue empty when their turn comes.
        async with self._turn:
            if self._dead is not None:  # the worker before gave up: so do the others, at once
                raise TrackerDead(self._dead)
            if not queue.pending:
                return
            try:
                async with trio.open_nursery() as readers:  # trio-websocket's receive tasks
                    try:
                        await self._work(queue, deliver, readers)
                    finally:
                        await self._hang_up()
                        readers.cancel_scope.cancel()
            except BaseExceptionGroup as group:  # trio wraps what leaves a nursery
                leaves = _leaf_exceptions(group)
                if not all(isinstance(leaf, (TrackerDead, trio_websocket.HandshakeError))
                           for leaf in leaves):
                    raise
                self._dead = _websocket_failure(leaves[0])
                raise TrackerDead(self._dead) from None

    async def _work(self, queue: _HashQueue, deliver: Any, readers: trio.Nursery) -> None:
        while batch := queue.take():
            reply = await self._ask(batch, readers)
            files = reply.files
            self.tally.canaries_tested += sum(map(queue.is_canary, batch))
            self.tally.bad_entries += reply.bad_entries
            # bittorrent-tracker answers every hash, 0 for one it does not know, and nothing
            # says a reply was cut short: a hash the reply leaves out stays unanswered.
            answered = [(h, files[h]) for h in batch if h in files]
            if answered:
                await deliver(answered)

    async def _ask(self, batch: list[bytes], readers: trio.Nursery) -> HttpScrapeReply:
        """One scrape, asked again on a new connection after a lost one (`attempts` in all);
        TrackerDead when no attempt got a reply, or the reply says asking again cannot help."""
        import trio_websocket

        error = "not asked"
        for attempt in range(self.options.attempts):
            if attempt:
                self.tally.retries += 1
            self.tally.requests += 1
            try:
                connection = self._connection or await self._connect(readers)
                started = trio.current_time()
                await connection.send_message(encode_ws_scrape(batch))
                reply = await self._scrape_reply(connection)
            except _ConnectionLost as exc:
                error = str(exc)
            except trio_websocket.ConnectionClosed as exc:
                error = _websocket_failure(exc)
                # 1009, "message too big" (RFC 6455 §7.4.1): the same question gets the same
                # answer, too big again.
                if exc.reason is not None and exc.reason.code == 1009:
                    raise TrackerDead(error) from None
            else:
                self.tally.rtt_total += trio.current_time() - started
                self.tally.rtt_count += 1
                return reply
            await self._hang_up()
        raise TrackerDead(f"{error} ({self.options.attempts} attempts)")

    async def _connect(self, readers: trio.Nursery) -> trio_websocket.WebSocketConnection:
        import trio_websocket

        try:
            self._stream = await self.fetcher.open_stream(self.host, self.port, tls=self.secure)
        except (AddressRefused, NoSuchHost) as exc:
            raise TrackerDead(str(exc)) from None
        except FetchError as exc:
            raise _ConnectionLost(str(exc)) from None
        timeout = self.fetcher.connect_timeout
        try:
            with trio.fail_after(timeout):
                # trio-websocket annotates SocketStream or SSLStream, and uses the Stream
                # interface alone (the socket only for `local` and `remote`, not read here).
                self._connection = await trio_websocket.wrap_client_stream(
                    readers, self._stream, self.authority, self.target,  # type: ignore[arg-type]
                    extra_headers=[(b"User-Agent", self.fetcher.user_agent.encode())],
                    max_message_size=MAX_WS_MESSAGE_CHARS)
        except trio.TooSlowError:
            raise _ConnectionLost(f"no WebSocket handshake within {timeout:g} s") from None
        return self._connection

    async def _scrape_reply(self, connection: trio_websocket.WebSocketConnection
                            ) -> HttpScrapeReply:
        with trio.move_on_after(self.options.timeout):
            for _ in range(MAX_WS_OTHER_MESSAGES + 1):
                message = await connection.get_message()
                try:
                    return decode_ws_scrape_untrusted(message)
                except NotAScrapeReply:
                    continue
                except ProtocolError as exc:
                    raise TrackerDead(str(exc)) from None
            raise TrackerDead(f"{MAX_WS_OTHER_MESSAGES + 1} messages in a row, none a scrape "
                              "reply")
        raise _ConnectionLost(f"no reply within {self.options.timeout:g} s")

    async def _hang_up(self) -> None:
        """Close the connection: politely while the tracker answers the close handshake, then
        the socket itself (trio-websocket leaves it open once the WebSocket is closed)."""
        connection, stream = self._connection, self._stream
        self._connection = self._stream = None
        with trio.CancelScope(shield=True):  # also, and above all, when cancelled
            if connection is not None:
                with trio.move_on_after(WS_CLOSE_TIMEOUT):
                    await connection.aclose()
            if stream is not None:
                await trio.aclose_forcefully(stream)


def _websocket_failure(error: BaseException) -> str:
    """A failure that trio-websocket raised, or TrackerDead, as a tracker's error."""
    import trio_websocket

    if isinstance(error, trio_websocket.ConnectionRejected):  # an HTTP answer, no WebSocket
        return f"WebSocket handshake refused: HTTP {error.status_code}"
    if isinstance(error, trio_websocket.ConnectionClosed):
        if error.reason is None:
            return "WebSocket connection lost"
        return f"WebSocket closed: {error.reason.code} " \
               f"{(error.reason.reason or error.reason.name)[:100]}"
    return str(error) or type(error).__name__


@dataclass(frozen=True, slots=True)
class TrackerJob:
    """One tracker's part of a scrape run."""

    url: str
    hashes: list[bytes]
    canaries: bool = True  # test it with canaries (not for a tracker the user trusts)
    # True: ask its full scrape instead of the hashes (HTTP only). None: fall back to the full
    # scrape when every per-hash reply comes back empty. False: never.
    full_scrape: bool | None = False


def canary_evidence(infohash: bytes, counts: ScrapeCounts) -> str | None:
    """Why an answer for a canary shows a tracker inventing numbers, or None when it does not.
    Only peers count: some trackers keep a `downloaded` of their own for any hash asked."""
    if not counts.seeders and not counts.leechers:
        return None
    return (f"answered {counts.seeders} seeders and {counts.leechers} leechers for "
            f"{infohash.hex()}, a random infohash that nobody announced")


async def scrape_tracker(job: TrackerJob, options: ScrapeOptions, endpoint: UdpEndpoint,
                         fetcher: Fetcher, deliver: Any) -> TrackerTally:
    """Scrape every hash of `job` from its tracker with a window of requests in flight, handing
    `deliver(pairs, fabricating)` each reply's answers; never raises for the tracker's own
    failures, which end up in the tally. Canaries are taken out here: only real hashes go on."""
    url = job.url
    tally = TrackerTally(url, hashes_asked=len(job.hashes))
    scheme = urllib.parse.urlsplit(url).scheme
    queue = _HashQueue(job.hashes, options.udp_batch if scheme == "udp" else options.http_batch,
                       canaries=job.canaries and job.full_scrape is not True)

    async def checked(pairs: list[tuple[bytes, ScrapeCounts]]) -> None:
        real = []
        caught_before = tally.fabrication is not None
        for infohash, counts in pairs:
            if not queue.is_canary(infohash):
                real.append((infohash, counts))
                continue
            tally.canaries_answered += 1
            tally.fabrication = tally.fabrication or canary_evidence(infohash, counts)
        tally.hashes_answered += len(real)
        caught = tally.fabrication is not None
        # The reply that gives a tracker away may hold nothing but the canary: the writer hears
        # of it all the same, for the samples stored before.
        if real or caught and not caught_before:
            await deliver(real, caught)

    try:
        if scheme == "udp":
            udp = UdpTrackerClient(endpoint, url, options, tally)
            udp.addresses = await _resolve_tracker(udp.host, udp.port, endpoint,
                                                   options.allow_private)
            udp.address = udp.addresses[0]
            client: UdpTrackerClient | HttpTrackerClient | WebSocketTrackerClient = udp
        elif scheme in WEBSOCKET_SCHEMES:
            client = WebSocketTrackerClient(fetcher, url, options, tally)
        else:
            client = HttpTrackerClient(fetcher, url, options, tally)
            if job.full_scrape:
                await client.full_scrape(set(job.hashes), checked)
                return tally
        async with trio.open_nursery() as nursery:
            async def worker() -> None:
                try:
                    await client.scrape(queue, checked)
                except TrackerDead as exc:
                    tally.error = tally.error or str(exc)
                    nursery.cancel_scope.cancel()  # a dead tracker is not asked again this run
            for _ in range(max(1, options.window)):
                nursery.start_soon(worker)
        # Some trackers (academictorrents) answer every per-hash scrape with an empty `files`
        # and serve only their full scrape.
        if isinstance(client, HttpTrackerClient) and job.full_scrape is None \
                and tally.error is None and not tally.hashes_answered and tally.empty_replies:
            try:
                await client.full_scrape(set(job.hashes), checked)
            except TrackerDead as exc:
                # A hunch that failed: the tracker answered what it was asked (an opentracker
                # whose swarms are gone answers just so), and is not failing for it. Said;
                # not tried again if it sent something (full_scrape 0), else next run.
                tally.note = f"its full scrape, tried as every per-hash reply was empty: {exc}"
    except TrackerDead as exc:
        tally.error = str(exc)
    finally:
        if scheme in HTTP_SCHEMES:
            # A finished tracker's kept-alive connections would otherwise stay open until the
            # end of the run: with hundreds of HTTP trackers, that is file descriptors.
            with trio.CancelScope(shield=True):
                await fetcher.close_origin(http_scrape_url(url) or url)
    return tally


# ---- Storage ----

# Each migration moves the schema one version up (PRAGMA user_version) inside one transaction.
# The whole model is here from the start; later stages fill the measurement tables.
MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE collections (
        id              INTEGER PRIMARY KEY,
        name            TEXT NOT NULL UNIQUE,
        url             TEXT NOT NULL,
        type            TEXT NOT NULL,
        enabled         INTEGER NOT NULL DEFAULT 1,
        index_etag      TEXT,     -- validators of the index page, for conditional re-sync
        index_last_modified TEXT,
        index_fingerprint TEXT,   -- url + filters the validators belong to
        last_synced     INTEGER,
        last_error      TEXT
    );
    CREATE TABLE torrents (
        id              INTEGER PRIMARY KEY,
        infohash        TEXT NOT NULL UNIQUE,   -- 40 hex, the swarm key (v1, or truncated v2)
        infohash_v2     TEXT,                   -- 64 hex for v2 and hybrid torrents
        name            TEXT,
        size_bytes      INTEGER,
        file_count      INTEGER,
        piece_length    INTEGER,
        created_unix    INTEGER,
        created_by      TEXT,
        comment         TEXT,
        has_metainfo    INTEGER NOT NULL DEFAULT 0,
        first_seen      INTEGER NOT NULL,
        updated         INTEGER NOT NULL
    );
    CREATE TABLE memberships (
        collection_id   INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
        source          TEXT NOT NULL,          -- .torrent URL, magnet link or infohash
        torrent_id      INTEGER REFERENCES torrents(id),
        file_name       TEXT,
        first_seen      INTEGER NOT NULL,
        last_seen       INTEGER NOT NULL,
        removed         INTEGER,                -- when it vanished from the index; NULL if listed
        etag            TEXT,
        last_modified   TEXT,
        validated       INTEGER,                -- last time the .torrent was fetched or confirmed
        last_error      TEXT,
        PRIMARY KEY (collection_id, source)
    ) WITHOUT ROWID;
    CREATE INDEX memberships_torrent ON memberships(torrent_id);
    CREATE INDEX torrents_infohash_v2 ON torrents(infohash_v2);
    CREATE TABLE trackers (
        id              INTEGER PRIMARY KEY,
        url             TEXT NOT NULL UNIQUE,   -- normalised announce URL
        successes       INTEGER NOT NULL DEFAULT 0,
        failures        INTEGER NOT NULL DEFAULT 0,
        consecutive_failures INTEGER NOT NULL DEFAULT 0,
        last_attempt    INTEGER,
        last_success    INTEGER,
        last_error      TEXT,
        rtt_ms          REAL,
        hashes_answered INTEGER NOT NULL DEFAULT 0,
        next_attempt    INTEGER                 -- back-off: not asked again before this time
    );
    CREATE TABLE torrent_trackers (
        torrent_id      INTEGER NOT NULL REFERENCES torrents(id) ON DELETE CASCADE,
        tracker_id      INTEGER NOT NULL REFERENCES trackers(id) ON DELETE CASCADE,
        tier            INTEGER NOT NULL,
        position        INTEGER NOT NULL,
        PRIMARY KEY (torrent_id, tracker_id)
    ) WITHOUT ROWID;
    CREATE INDEX torrent_trackers_tracker ON torrent_trackers(tracker_id);
    CREATE TABLE runs (
        id              INTEGER PRIMARY KEY,
        stage           TEXT NOT NULL,          -- sync, dht, scrape, report, run
        started         REAL NOT NULL,
        finished        REAL,
        outcome         TEXT NOT NULL,          -- running, ok, partial, failed, interrupted
        counts          TEXT NOT NULL DEFAULT '{}',  -- JSON object of the stage's counters
        error           TEXT
    );
    CREATE TABLE tracker_samples (
        torrent_id      INTEGER NOT NULL REFERENCES torrents(id) ON DELETE CASCADE,
        tracker_id      INTEGER NOT NULL REFERENCES trackers(id) ON DELETE CASCADE,
        run_id          INTEGER REFERENCES runs(id) ON DELETE SET NULL,
        measured        INTEGER NOT NULL,
        seeders         INTEGER NOT NULL,
        leechers        INTEGER NOT NULL,
        completed       INTEGER NOT NULL
    );
    CREATE INDEX tracker_samples_torrent ON tracker_samples(torrent_id, tracker_id, measured);
    CREATE INDEX tracker_samples_measured ON tracker_samples(measured);
    -- Covers the per-run maxima that history and trends read: no table lookups, no sorting.
    CREATE INDEX tracker_samples_run ON tracker_samples(torrent_id, run_id, measured, seeders);
    CREATE TABLE dht_samples (
        torrent_id      INTEGER NOT NULL REFERENCES torrents(id) ON DELETE CASCADE,
        run_id          INTEGER REFERENCES runs(id) ON DELETE SET NULL,
        measured        INTEGER NOT NULL,
        peers           INTEGER NOT NULL,       -- unique peers from `values`
        bep33_seeds     REAL,                   -- BEP 33 estimates, NULL if no node scraped
        bep33_peers     REAL,
        nodes_answered  INTEGER NOT NULL
    );
    CREATE INDEX dht_samples_torrent ON dht_samples(torrent_id, measured);
    CREATE TABLE dht_nodes (
        node_id         BLOB NOT NULL,
        host            TEXT NOT NULL,
        port            INTEGER NOT NULL,
        last_seen       INTEGER NOT NULL,
        failures        INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (host, port)
    ) WITHOUT ROWID;
    """,
    # v2: what reports read is kept up to date as the stages write, so a report of 100,000
    # torrents reads one row per torrent instead of a month of samples.
    """
    CREATE TABLE tracker_latest (               -- each tracker's newest sample of each torrent
        torrent_id      INTEGER NOT NULL REFERENCES torrents(id) ON DELETE CASCADE,
        tracker_id      INTEGER NOT NULL REFERENCES trackers(id) ON DELETE CASCADE,
        measured        INTEGER NOT NULL,
        seeders         INTEGER NOT NULL,
        leechers        INTEGER NOT NULL,
        completed       INTEGER NOT NULL,
        PRIMARY KEY (torrent_id, tracker_id)
    ) WITHOUT ROWID;
    INSERT INTO tracker_latest
        SELECT torrent_id, tracker_id, measured, seeders, leechers, completed FROM (
            SELECT *, row_number() OVER (PARTITION BY torrent_id, tracker_id
                                         ORDER BY measured DESC) AS rank
            FROM tracker_samples) WHERE rank = 1;
    CREATE TRIGGER tracker_samples_latest AFTER INSERT ON tracker_samples BEGIN
        INSERT INTO tracker_latest VALUES (new.torrent_id, new.tracker_id, new.measured,
                                           new.seeders, new.leechers, new.completed)
        ON CONFLICT (torrent_id, tracker_id) DO UPDATE SET
            measured = excluded.measured, seeders = excluded.seeders,
            leechers = excluded.leechers, completed = excluded.completed
        WHERE excluded.measured >= tracker_latest.measured;
    END;
    CREATE TABLE dht_latest (                   -- each torrent's newest DHT sample
        torrent_id      INTEGER PRIMARY KEY REFERENCES torrents(id) ON DELETE CASCADE,
        measured        INTEGER NOT NULL,
        peers           INTEGER NOT NULL,
        bep33_seeds     REAL,
        bep33_peers     REAL
    );
    INSERT INTO dht_latest
        SELECT torrent_id, measured, peers, bep33_seeds, bep33_peers FROM (
            SELECT *, row_number() OVER (PARTITION BY torrent_id ORDER BY measured DESC) AS rank
            FROM dht_samples) WHERE rank = 1;
    CREATE TRIGGER dht_samples_latest AFTER INSERT ON dht_samples BEGIN
        INSERT INTO dht_latest VALUES (new.torrent_id, new.measured, new.peers, new.bep33_seeds,
                                       new.bep33_peers)
        ON CONFLICT (torrent_id) DO UPDATE SET
            measured = excluded.measured, peers = excluded.peers,
            bep33_seeds = excluded.bep33_seeds, bep33_peers = excluded.bep33_peers
        WHERE excluded.measured >= dht_latest.measured;
    END;
    CREATE TABLE seeder_history (               -- SeederHistory's four arrays, as stored()
        torrent_id      INTEGER PRIMARY KEY REFERENCES torrents(id) ON DELETE CASCADE,
        times           BLOB NOT NULL,
        seeders         BLOB NOT NULL,
        days            BLOB NOT NULL,
        daily           BLOB NOT NULL
    );
    CREATE TABLE seeder_trends (                -- what reports read of it: narrow and small
        torrent_id      INTEGER PRIMARY KEY REFERENCES torrents(id) ON DELETE CASCADE,
        latest          INTEGER NOT NULL,       -- time of the newest point
        change_previous INTEGER,
        change_1d       INTEGER,
        change_7d       INTEGER,
        trend           TEXT NOT NULL           -- the daily seeders, comma-separated
    );
    ALTER TABLE runs ADD COLUMN summarized INTEGER;  -- scrape runs: folded into seeder_trends
    -- Folding a run reads its samples in one range, without touching the table.
    DROP INDEX tracker_samples_run;
    CREATE INDEX tracker_samples_run ON tracker_samples(run_id, torrent_id, measured, seeders);
    -- Retention deletes by age after every `tsmd run`, and deleting a run clears its samples'
    -- run_id (ON DELETE SET NULL): both find their rows through an index.
    CREATE INDEX dht_samples_measured ON dht_samples(measured);
    CREATE INDEX dht_samples_run ON dht_samples(run_id);
    """,
    # v3: addresses that never answered, so that the next runs do not ask them again at once.
    """
    CREATE TABLE dht_silent_nodes (
        host            TEXT NOT NULL,
        port            INTEGER NOT NULL,
        runs            INTEGER NOT NULL,       -- runs in a row it was asked and never answered
        last_failed     INTEGER NOT NULL,
        PRIMARY KEY (host, port)
    ) WITHOUT ROWID;
    CREATE INDEX dht_silent_nodes_failed ON dht_silent_nodes(last_failed);
    """,
    # v4: each torrent keeps the magnet link reports publish. It changes only when sync changes
    # the torrent's name or trackers, and building 100,000 of them took a fifth of a report.
    # NULL means "to be computed": these triggers clear it whenever something it is made of
    # changes, whoever changes it, and fill_magnets computes it again (upsert_torrent does
    # for its torrent; reports compute a missing one themselves).
    """
    ALTER TABLE torrents ADD COLUMN magnet TEXT;
    CREATE TRIGGER torrents_magnet AFTER UPDATE OF infohash, name ON torrents
    WHEN old.infohash IS NOT new.infohash OR old.name IS NOT new.name BEGIN
        UPDATE torrents SET magnet = NULL WHERE id = new.id;
    END;
    CREATE TRIGGER torrent_trackers_magnet_insert AFTER INSERT ON torrent_trackers BEGIN
        UPDATE torrents SET magnet = NULL WHERE id = new.torrent_id AND magnet IS NOT NULL;
    END;
    CREATE TRIGGER torrent_trackers_magnet_update AFTER UPDATE ON torrent_trackers
    WHEN old.torrent_id IS NOT new.torrent_id OR old.tracker_id IS NOT new.tracker_id
         OR old.position IS NOT new.position BEGIN
        UPDATE torrents SET magnet = NULL
        WHERE id IN (old.torrent_id, new.torrent_id) AND magnet IS NOT NULL;
    END;
    CREATE TRIGGER torrent_trackers_magnet_delete AFTER DELETE ON torrent_trackers BEGIN
        UPDATE torrents SET magnet = NULL WHERE id = old.torrent_id AND magnet IS NOT NULL;
    END;
    CREATE TRIGGER trackers_magnet AFTER UPDATE OF url ON trackers
    WHEN old.url IS NOT new.url BEGIN
        UPDATE torrents SET magnet = NULL WHERE magnet IS NOT NULL
            AND id IN (SELECT torrent_id FROM torrent_trackers WHERE tracker_id = new.id);
    END;
    """,
    # v5: an entry of a listing that keeps failing (a .torrent gone for good) is said once a
    # day, not on every run, and after BROKEN_AFTER syncs in a row it is "broken": listed by
    # `tsmd status`, no longer making every cron run exit 1.
    """
    ALTER TABLE memberships ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;  -- syncs in a row
    ALTER TABLE memberships ADD COLUMN reported INTEGER;  -- when its failure was last said
    """,
    # v6: web seeds (BEP 19, BEP 17), kept for a probe of who holds the data; a listing's own
    # type for an entry (a feed of several kinds, [[collections]] type_field), else NULL: the
    # collection's.
    """
    CREATE TABLE web_seeds (
        torrent_id      INTEGER NOT NULL REFERENCES torrents(id) ON DELETE CASCADE,
        url             TEXT NOT NULL,
        kind            TEXT NOT NULL,          -- url-list (BEP 19) or httpseeds (BEP 17)
        PRIMARY KEY (torrent_id, url)
    ) WITHOUT ROWID;
    ALTER TABLE memberships ADD COLUMN type TEXT;
    """,
    # v7: one tracker per (scheme, host, port) for UDP: rows that now normalise alike are
    # merged in Python (merge_duplicate_trackers), keeping their links, samples and health.
    "",
    # v8: trackers that invent numbers. A tracker that answers a canary with peers has all its
    # samples of that run stored untrusted: kept as evidence, never a torrent's numbers nor its
    # history. A tracker that serves only its full scrape is remembered, to ask just that.
    """
    ALTER TABLE tracker_samples ADD COLUMN trusted INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE tracker_latest ADD COLUMN trusted INTEGER NOT NULL DEFAULT 1;
    DROP TRIGGER tracker_samples_latest;
    CREATE TRIGGER tracker_samples_latest AFTER INSERT ON tracker_samples BEGIN
        INSERT INTO tracker_latest (torrent_id, tracker_id, measured, seeders, leechers,
                                    completed, trusted)
        VALUES (new.torrent_id, new.tracker_id, new.measured, new.seeders, new.leechers,
                new.completed, new.trusted)
        ON CONFLICT (torrent_id, tracker_id) DO UPDATE SET
            measured = excluded.measured, seeders = excluded.seeders,
            leechers = excluded.leechers, completed = excluded.completed,
            trusted = excluded.trusted
        WHERE excluded.measured >= tracker_latest.measured;
    END;
    -- Folding a run into the history reads its trusted samples alone, still from the index.
    DROP INDEX tracker_samples_run;
    CREATE INDEX tracker_samples_run ON tracker_samples(run_id, torrent_id, measured, seeders,
                                                        trusted);
    ALTER TABLE trackers ADD COLUMN fabricating TEXT;      -- the evidence of the last run that
    ALTER TABLE trackers ADD COLUMN fabricating_since INTEGER;  -- tested it; NULL: honest
    ALTER TABLE trackers ADD COLUMN full_scrape INTEGER;   -- 1: answers only its full scrape
    """,
    # v9: who really holds the data (the probe). What a torrent's pieces are, for reading a
    # peer's bitfield and checking a web seed; the peers the DHT stage found, kept for the
    # probe only (never published, pruned with the samples); one probe sample per torrent and
    # run, and each torrent's newest.
    """
    ALTER TABLE torrents ADD COLUMN piece_count INTEGER;       -- v1 and hybrid; NULL unknown
    ALTER TABLE torrents ADD COLUMN first_piece_sha1 BLOB;
    ALTER TABLE torrents ADD COLUMN first_file_length INTEGER;
    ALTER TABLE torrents ADD COLUMN first_file_path TEXT;      -- JSON list; NULL: one file
    ALTER TABLE torrents ADD COLUMN probe_attempted INTEGER;   -- last probe run, answered or not
    -- The .torrent files of web-seeded torrents are read again at the next sync (their
    -- validators forgotten): a web seed is checked against piece 0's hash, which only a
    -- .torrent gives. Other torrents get their piece count from peers (BEP 9) when probed.
    UPDATE memberships SET etag = NULL, last_modified = NULL, validated = NULL
    WHERE torrent_id IN (SELECT torrent_id FROM web_seeds);
    CREATE TABLE swarm_peers (
        torrent_id      INTEGER NOT NULL REFERENCES torrents(id) ON DELETE CASCADE,
        host            TEXT NOT NULL,
        port            INTEGER NOT NULL,
        found           INTEGER NOT NULL,
        PRIMARY KEY (torrent_id, host, port)
    ) WITHOUT ROWID;
    CREATE INDEX swarm_peers_found ON swarm_peers(found);
    CREATE TABLE probe_samples (
        torrent_id      INTEGER NOT NULL REFERENCES torrents(id) ON DELETE CASCADE,
        run_id          INTEGER REFERENCES runs(id) ON DELETE SET NULL,
        measured        INTEGER NOT NULL,
        tried           INTEGER NOT NULL,       -- peers a connection was attempted to
        reachable       INTEGER NOT NULL,       -- connected
        answering       INTEGER NOT NULL,       -- told what they hold
        verified_seeds  INTEGER NOT NULL,       -- every piece, or have_all
        availability    REAL,                   -- distributed copies; NULL: nobody told what
                                                -- it holds, or no piece count to read it by
        skipped         INTEGER NOT NULL,       -- peers not asked: budget spent, host busy
        webseeds_answered INTEGER NOT NULL,     -- checked: their servers answered
        webseeds_ok     INTEGER NOT NULL        -- served the data (piece 0's hash, or the
                                                -- first file's bytes and length)
    );
    CREATE INDEX probe_samples_torrent ON probe_samples(torrent_id, measured);
    CREATE INDEX probe_samples_measured ON probe_samples(measured);
    CREATE INDEX probe_samples_run ON probe_samples(run_id);
    CREATE TABLE probe_latest (
        torrent_id      INTEGER PRIMARY KEY REFERENCES torrents(id) ON DELETE CASCADE,
        measured        INTEGER NOT NULL,
        reachable       INTEGER NOT NULL,
        verified_seeds  INTEGER NOT NULL,
        availability    REAL,
        skipped         INTEGER NOT NULL,
        webseeds_ok     INTEGER NOT NULL
    );
    CREATE TRIGGER probe_samples_latest AFTER INSERT ON probe_samples BEGIN
        INSERT INTO probe_latest VALUES (new.torrent_id, new.measured, new.reachable,
                                         new.verified_seeds, new.availability, new.skipped,
                                         new.webseeds_ok)
        ON CONFLICT (torrent_id) DO UPDATE SET
            measured = excluded.measured, reachable = excluded.reachable,
            verified_seeds = excluded.verified_seeds, availability = excluded.availability,
            skipped = excluded.skipped, webseeds_ok = excluded.webseeds_ok
        WHERE excluded.measured >= probe_latest.measured;
    END;
    """,
)
# What SQL cannot compute, done in Python inside the same transaction as the migration's SQL:
# by the index in MIGRATIONS it completes.
MIGRATION_FILLS: Final = {3: lambda db: fill_magnets(db),
                          6: lambda db: (merge_duplicate_trackers(db), fill_magnets(db))}
SCHEMA_VERSION: Final = len(MIGRATIONS)
SQLITE_BUSY_TIMEOUT_MS: Final = 30_000
SQLITE_MAX_PARAMETERS: Final = 999  # host parameters in one statement (SQLite before 3.32)


def open_database(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) and migrate the database; refuse one newer than this program.
    Its folder must exist: a mistyped --db creates no folders."""
    _check_database_folder(path)
    try:
        db = sqlite3.connect(path, isolation_level=None, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)
        db.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")  # WAL keeps NORMAL crash-safe for commits
        db.execute("PRAGMA foreign_keys = ON")
        migrate(db, path)
    except sqlite3.DatabaseError as exc:
        raise DatabaseError(f"database {path}: {exc}") from None
    except OSError as exc:
        raise DatabaseError(f"database {path}: {exc.strerror or exc}") from None
    return db


def _check_database_folder(path: Path) -> None:
    folder = path.resolve().parent  # a symbolic link's target folder is where SQLite writes
    if not folder.is_dir():
        raise DatabaseError(f"database {path}: the folder {folder} does not exist (tsmd "
                            "makes no folders: create it, or fix --db or `database`)")


def migrate(db: sqlite3.Connection, path: Path) -> None:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise DatabaseError(f"database {path} has schema version {version}, newer than this "
                            f"tsmd {__version__} understands ({SCHEMA_VERSION}); upgrade tsmd")
    for number in range(version, SCHEMA_VERSION):
        db.execute("BEGIN IMMEDIATE")
        try:
            # Re-read inside the write lock: a concurrent tsmd may have migrated meanwhile.
            if db.execute("PRAGMA user_version").fetchone()[0] != number:
                db.execute("ROLLBACK")
                continue
            for statement in _split_sql(MIGRATIONS[number]):
                db.execute(statement)
            if number in MIGRATION_FILLS:
                MIGRATION_FILLS[number](db)
            db.execute(f"PRAGMA user_version = {number + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


def _split_sql(script: str) -> Iterator[str]:
    """Statements of a migration; executescript() would commit behind our transaction's back."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                yield buffer
            buffer = ""
    if buffer.strip():
        yield buffer


class Transaction:
    """`with Transaction(db):` runs the block in BEGIN IMMEDIATE ... COMMIT, rolling back on error."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")


FOLD_BATCH: Final = 500  # torrents whose history is read, updated and written at a time


def summarize_scrape_runs(db: sqlite3.Connection) -> int:
    """Fold every finished scrape run not folded yet into seeder_history and seeder_trends;
    returns the number of runs folded.

    The scrape stage calls this when it ends, and prune and the report before they read, so a
    run that was killed, or a database from before seeder_trends existed, is folded by whatever
    comes next. One run per transaction, a few hundred torrents at a time: a writer waiting for
    the database never waits long, and memory stays small however long the backlog.
    """
    folded = 0
    while True:
        with Transaction(db):
            pending = db.execute(
                "SELECT id FROM runs WHERE stage = 'scrape' AND summarized IS NULL "
                "AND outcome != 'running' ORDER BY id LIMIT 1").fetchone()
            if pending is None:
                return folded
            points = {torrent_id: (measured, seeders) for torrent_id, measured, seeders in
                      db.execute("SELECT torrent_id, max(measured), max(seeders) "
                                 "FROM tracker_samples WHERE run_id = ? AND trusted "
                                 "GROUP BY torrent_id", pending)}
            touched = list(points)
            for start in range(0, len(touched), FOLD_BATCH):
                batch = touched[start:start + FOLD_BATCH]
                stored = {torrent_id: blobs for torrent_id, *blobs in db.execute(
                    "SELECT torrent_id, times, seeders, days, daily FROM seeder_history "
                    f"WHERE torrent_id IN ({', '.join('?' * len(batch))})", batch)}
                histories, trends = [], []
                for torrent_id in batch:
                    blobs = stored.get(torrent_id)
                    history = SeederHistory.from_stored(*blobs) if blobs else SeederHistory()
                    history.add(*points[torrent_id])
                    histories.append((torrent_id, *history.stored()))
                    trends.append((torrent_id, history.times[-1], *history.changes(),
                                   history.trend_text()))
                db.executemany("INSERT OR REPLACE INTO seeder_history VALUES (?, ?, ?, ?, ?)",
                               histories)
                db.executemany("INSERT OR REPLACE INTO seeder_trends VALUES (?, ?, ?, ?, ?, ?)",
                               trends)
            db.execute("UPDATE runs SET summarized = ? WHERE id = ?", (int(time.time()), *pending))
        folded += 1


def start_run(db: sqlite3.Connection, stage: str) -> int:
    with Transaction(db):
        cursor = db.execute("INSERT INTO runs (stage, started, outcome) VALUES (?, ?, 'running')",
                            (stage, time.time()))
    return int(cursor.lastrowid)  # type: ignore[arg-type]


def finish_run(db: sqlite3.Connection, run_id: int, outcome: str, counts: dict[str, Any],
               error: str | None = None) -> None:
    with Transaction(db):
        db.execute("UPDATE runs SET finished = ?, outcome = ?, counts = ?, error = ? WHERE id = ?",
                   (time.time(), outcome, json.dumps(counts, sort_keys=True), error, run_id))


def close_orphaned_runs(db: sqlite3.Connection) -> int:
    """Runs still 'running' while we hold the database lock belong to a tsmd that died (SIGKILL,
    power loss): everything they committed stays; they are marked so, and their scrape samples
    get folded like any other run's."""
    with Transaction(db):
        cursor = db.execute(
            "UPDATE runs SET outcome = 'interrupted', finished = coalesce(finished, started), "
            "error = 'the process ended without finishing (killed?); what it committed is kept' "
            "WHERE outcome = 'running'")
    return cursor.rowcount


LOCK_PATIENCE: Final = 0.5  # seconds a writer retries a held lock before it says "busy"


class DatabaseLock:
    """One tsmd writing to a database at a time: an exclusive lock on `<database>.lock`.

    The kernel releases it when the process ends, however it ends (SIGKILL included), so a
    crashed run never leaves a stale lock behind. The file says who holds it, for the message
    the next tsmd prints.
    """

    def __init__(self, database: Path) -> None:
        self.database = database
        resolved = database.resolve()  # one lock file, whatever path or symlink led here
        self.path = resolved.with_name(resolved.name + ".lock")
        self._handle: Any = None

    def acquire(self, wait: float, holder: str) -> None:
        """Take the lock; while another tsmd holds it, wait up to `wait` seconds (math.inf:
        for as long as it takes), then raise BusyError."""
        _check_database_folder(self.database)
        try:
            handle = self.path.open("a+", encoding="utf-8")
        except OSError as exc:
            raise DatabaseError(f"lock {self.path}: {exc.strerror or exc}") from None
        try:
            # `tsmd status` holds the lock for an instant to see whether it is free: a writer
            # starting right then tries again for a moment before it calls the database busy.
            deadline = time.monotonic() + max(LOCK_PATIENCE, wait)
            locked = _lock_file(handle, wait=wait == math.inf)
            while not locked and time.monotonic() < deadline:
                time.sleep(0.05 if wait <= LOCK_PATIENCE else 0.5)
                locked = _lock_file(handle, wait=False)
            if not locked:
                handle.seek(0)
                other = handle.read(200).strip() or "another tsmd"
                waited = f" after waiting {wait:g} s" if wait > LOCK_PATIENCE else ""
                raise BusyError(f"database {self.database} is busy{waited}: {other} "
                                "is writing to it; try again later, or use --wait [SECONDS]")
            handle.seek(0)
            handle.truncate()
            handle.write(f"{holder} (pid {os.getpid()}, since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')})\n")
            handle.flush()
        except BaseException:
            handle.close()
            raise
        self._handle = handle

    def held_by(self) -> str | None:
        """Who holds the lock now (as its file says), or None when nobody does."""
        try:
            with self.path.open("r+", encoding="utf-8") as handle:
                if _lock_file(handle, wait=False):
                    return None  # closing the handle lets go at once
                return handle.read(200).strip() or "another tsmd"
        except FileNotFoundError:
            return None  # no lock file: nobody ever held it
        except OSError as exc:  # cannot tell: perhaps someone
            return f"unknown (lock file {self.path}: {exc.strerror or exc})"

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor drops the lock
            self._handle = None

    def __enter__(self) -> DatabaseLock:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


def _lock_file(handle: Any, wait: bool) -> bool:
    """Lock an open file exclusively; False when another process holds it and not `wait`."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

        while True:
            try:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
                return True
            except OSError:
                if not wait:
                    return False
                time.sleep(1)
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


@dataclass(slots=True)
class PruneCounts:
    tracker_samples: int = 0
    dht_samples: int = 0
    probe_samples: int = 0
    swarm_peers: int = 0  # peer addresses the DHT stage kept for the probe
    dht_nodes: int = 0
    runs: int = 0

    def summary(self) -> str:
        return (f"{self.tracker_samples:,} tracker samples, {self.dht_samples:,} DHT samples, "
                f"{self.probe_samples:,} probe samples, {self.swarm_peers:,} peer addresses, "
                f"{self.dht_nodes:,} DHT nodes and {self.runs:,} runs deleted")


PRUNE_BATCH: Final = 50_000  # rows per transaction: a reader never waits long


def prune_database(db: sqlite3.Connection, samples_before: float | None,
                   nodes_before: float | None) -> PruneCounts:
    """Delete samples (and runs) older than `samples_before` and DHT nodes last seen before
    `nodes_before` (unix times; None keeps them). What reports read is kept consistent: the
    newest sample of a tracker or of the DHT is dropped with the samples."""
    counts = PruneCounts()
    if samples_before is not None:
        # Samples not folded into the seeder history yet would take their history with them.
        summarize_scrape_runs(db)
        cutoff = int(samples_before)
        for table in ("tracker_samples", "dht_samples", "probe_samples"):
            while True:
                with Transaction(db):
                    deleted = db.execute(
                        f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} "
                        f"WHERE measured < ? LIMIT {PRUNE_BATCH})", (cutoff,)).rowcount
                setattr(counts, table, getattr(counts, table) + deleted)
                if deleted < PRUNE_BATCH:
                    break
        with Transaction(db):
            db.execute("DELETE FROM tracker_latest WHERE measured < ?", (cutoff,))
            db.execute("DELETE FROM dht_latest WHERE measured < ?", (cutoff,))
            db.execute("DELETE FROM probe_latest WHERE measured < ?", (cutoff,))
            counts.swarm_peers = db.execute("DELETE FROM swarm_peers WHERE found < ?",
                                            (cutoff,)).rowcount
            # Runs that ended before the cutoff (their samples are gone with it); a scrape run
            # not folded into seeder_history yet stays until it is.
            counts.runs = db.execute(
                "DELETE FROM runs WHERE finished < ? AND outcome != 'running' AND "
                "(stage != 'scrape' OR summarized IS NOT NULL)", (cutoff,)).rowcount
    if nodes_before is not None:
        with Transaction(db):
            counts.dht_nodes = db.execute("DELETE FROM dht_nodes WHERE last_seen < ?",
                                          (int(nodes_before),)).rowcount
            # (Not before DHT_SILENT_FORGET: a short retention must not cut back-offs short.)
            db.execute("DELETE FROM dht_silent_nodes WHERE last_failed < ?",
                       (int(min(nodes_before, time.time() - DHT_SILENT_FORGET)),))
    return counts


def upsert_collection(db: sqlite3.Connection, name: str, url: str, kind: str, enabled: bool) -> int:
    row = db.execute(
        "INSERT INTO collections (name, url, type, enabled) VALUES (?, ?, ?, ?) "
        "ON CONFLICT(name) DO UPDATE SET url = excluded.url, type = excluded.type, "
        "enabled = excluded.enabled RETURNING id", (name, url, kind, int(enabled))).fetchone()
    return int(row[0])


@dataclass(slots=True)
class TrackerLimits:
    """The bounds a sync puts on trackers ([sync] max_trackers_per_torrent, max_new_trackers),
    and what they left out."""

    per_torrent: int
    new_left: int  # trackers this sync may still add to the database
    ignored: int = 0
    # Torrents that lost trackers to `new_left`: their .torrent is read again next sync.
    short_of_budget: set[int] = field(default_factory=set)


def _within_limits(db: sqlite3.Connection, torrent_id: int, trackers: Sequence[Tracker],
                   linked: int, limits: TrackerLimits) -> list[Tracker]:
    """The first of `trackers` (none linked to the torrent yet) that fit beside the `linked`
    ones and within what the sync may still add to the database; the rest are counted."""
    room = max(0, limits.per_torrent - linked)
    kept = list(trackers[:room])
    limits.ignored += len(trackers) - len(kept)
    if len(kept) > limits.new_left:  # only then does it matter which are new
        known: set[str] = set()
        for start in range(0, len(kept), SQLITE_MAX_PARAMETERS):
            urls = [t.url for t in kept[start:start + SQLITE_MAX_PARAMETERS]]
            known.update(url for (url,) in db.execute(
                f"SELECT url FROM trackers WHERE url IN ({','.join('?' * len(urls))})", urls))
        budget, fitting = limits.new_left, []
        for tracker in kept:
            if tracker.url in known or budget > 0:
                budget -= tracker.url not in known
                fitting.append(tracker)
        if len(fitting) < len(kept):
            limits.ignored += len(kept) - len(fitting)
            limits.short_of_budget.add(torrent_id)
        kept = fitting
    return kept


def upsert_torrent(db: sqlite3.Connection, meta: Metainfo, now: int,
                   limits: TrackerLimits | None = None) -> int:
    """Insert or update a torrent; a magnet never overwrites what a .torrent file told us. With
    `limits`, its trackers are bounded by them."""
    row = db.execute(
        """
        INSERT INTO torrents (infohash, infohash_v2, name, size_bytes, file_count, piece_length,
                              created_unix, created_by, comment, has_metainfo, first_seen, updated,
                              piece_count, first_piece_sha1, first_file_length, first_file_path)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT(infohash) DO UPDATE SET
            infohash_v2  = coalesce(excluded.infohash_v2, infohash_v2),
            name         = CASE WHEN excluded.has_metainfo OR NOT has_metainfo
                                THEN coalesce(excluded.name, name) ELSE name END,
            size_bytes   = CASE WHEN excluded.has_metainfo OR NOT has_metainfo
                                THEN coalesce(excluded.size_bytes, size_bytes) ELSE size_bytes END,
            file_count   = CASE WHEN excluded.has_metainfo OR NOT has_metainfo
                                THEN coalesce(excluded.file_count, file_count) ELSE file_count END,
            piece_length = coalesce(excluded.piece_length, piece_length),
            created_unix = coalesce(excluded.created_unix, created_unix),
            created_by   = coalesce(excluded.created_by, created_by),
            comment      = coalesce(excluded.comment, comment),
            has_metainfo = max(has_metainfo, excluded.has_metainfo),
            updated      = excluded.updated,
            piece_count  = coalesce(excluded.piece_count, piece_count),
            first_piece_sha1 = coalesce(excluded.first_piece_sha1, first_piece_sha1),
            first_file_length = coalesce(excluded.first_file_length, first_file_length),
            first_file_path = CASE WHEN excluded.first_file_length IS NOT NULL
                                   THEN excluded.first_file_path ELSE first_file_path END
        RETURNING id
        """,
        (meta.infohash, meta.infohash_v2, meta.name, meta.size_bytes, meta.file_count,
         meta.piece_length, meta.created_unix, meta.created_by, meta.comment,
         int(meta.has_metainfo), now, now, meta.piece_count, meta.first_piece_sha1,
         meta.first_file_length,
         None if meta.first_file_path is None else json.dumps(meta.first_file_path))).fetchone()
    torrent_id = int(row[0])
    linked: dict[str, tuple[int, int]] = {}  # url -> (tier, position) of the torrent's trackers
    if meta.has_metainfo:  # a (changed) .torrent file's tracker list replaces the old one
        db.execute("DELETE FROM torrent_trackers WHERE torrent_id = ?", (torrent_id,))
    elif meta.trackers:  # a magnet's trackers come after those the torrent has
        linked = {url: (tier, position) for url, tier, position in db.execute(
            "SELECT r.url, l.tier, l.position FROM torrent_trackers l "
            "JOIN trackers r ON r.id = l.tracker_id WHERE l.torrent_id = ?", (torrent_id,))}
    if meta.has_metainfo:  # like trackers: a .torrent's list replaces, a magnet's adds
        db.execute("DELETE FROM web_seeds WHERE torrent_id = ?", (torrent_id,))
    db.executemany("INSERT INTO web_seeds (torrent_id, url, kind) VALUES (?, ?, ?) "
                   "ON CONFLICT DO NOTHING",
                   [(torrent_id, seed.url, seed.kind) for seed in meta.web_seeds])
    trackers = [t for t in meta.trackers if t.url not in linked]
    if limits is not None:
        limits.ignored += meta.trackers_skipped
        trackers = _within_limits(db, torrent_id, trackers, len(linked), limits)
    if trackers:
        before = db.total_changes
        db.executemany("INSERT INTO trackers (url) VALUES (?) ON CONFLICT(url) DO NOTHING",
                       [(t.url,) for t in trackers])
        if limits is not None:
            limits.new_left -= db.total_changes - before
        first_tier = max((tier for tier, _ in linked.values()), default=-1) + 1
        first_position = max((position for _, position in linked.values()), default=-1) + 1
        db.executemany(
            "INSERT INTO torrent_trackers (torrent_id, tracker_id, tier, position) "
            "SELECT ?, id, ?, ? FROM trackers WHERE url = ?",
            [(torrent_id, first_tier + t.tier, first_position + position, t.url)
             for position, t in enumerate(trackers)])
    fill_magnets(db, torrent_id)  # when the name or the trackers changed
    return torrent_id


def merge_duplicate_trackers(db: sqlite3.Connection) -> int:
    """Trackers whose URLs normalise alike (udp://h:p/announce and udp://h:p, two trackers
    before schema v7) become one, the oldest row: links, samples, newest numbers and health
    are merged into it. Returns how many rows were merged away.

    For the v7 migration only: it knows the columns of v6 (not v8's `trusted`, `fabricating`,
    `full_scrape`), which is all a database has when it runs."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for tracker_id, url in db.execute("SELECT id, url FROM trackers ORDER BY id").fetchall():
        groups.setdefault(normalise_tracker_url(url) or url, []).append((tracker_id, url))
    merges = [(duplicate, rows[0][0]) for rows in groups.values() for duplicate, _ in rows[1:]]
    if merges:
        # Samples and newest numbers, for every duplicate in one pass each.
        db.execute("CREATE TEMP TABLE tracker_merges (duplicate INTEGER PRIMARY KEY, "
                   "keep INTEGER NOT NULL)")
        db.executemany("INSERT INTO tracker_merges VALUES (?, ?)", merges)
        db.execute("UPDATE tracker_samples SET tracker_id = (SELECT keep FROM tracker_merges "
                   "WHERE duplicate = tracker_id) WHERE tracker_id IN "
                   "(SELECT duplicate FROM tracker_merges)")
        db.execute("INSERT INTO tracker_latest (torrent_id, tracker_id, measured, seeders, "
                   "leechers, completed) SELECT l.torrent_id, m.keep, l.measured, "
                   "l.seeders, l.leechers, l.completed FROM tracker_latest l JOIN "
                   "tracker_merges m ON m.duplicate = l.tracker_id WHERE true "
                   "ON CONFLICT (torrent_id, tracker_id) DO UPDATE SET "
                   "measured = excluded.measured, seeders = excluded.seeders, "
                   "leechers = excluded.leechers, completed = excluded.completed "
                   "WHERE excluded.measured > tracker_latest.measured")
        db.execute("DELETE FROM tracker_latest WHERE tracker_id IN "
                   "(SELECT duplicate FROM tracker_merges)")
        db.execute("DROP TABLE tracker_merges")
    for duplicate, keep in merges:
        _merge_tracker(db, keep, duplicate)
    for canonical, rows in groups.items():
        if rows[0][1] != canonical:
            db.execute("UPDATE trackers SET url = ? WHERE id = ?", (canonical, rows[0][0]))
    return len(merges)


def _merge_tracker(db: sqlite3.Connection, keep: int, duplicate: int) -> None:
    """Links and health of `duplicate` into `keep` (samples and newest numbers are moved for
    all duplicates at once, by merge_duplicate_trackers: those tables have no index by
    tracker)."""
    # A torrent linked to both keeps the better place of the two (tier, then position).
    db.execute("UPDATE torrent_trackers SET (tier, position) = (SELECT d.tier, d.position "
               "FROM torrent_trackers d WHERE d.torrent_id = torrent_trackers.torrent_id AND "
               "d.tracker_id IN (?, ?) ORDER BY d.tier, d.position LIMIT 1) WHERE tracker_id = ? "
               "AND torrent_id IN (SELECT torrent_id FROM torrent_trackers WHERE tracker_id = ?)",
               (keep, duplicate, keep, duplicate))
    db.execute("UPDATE OR IGNORE torrent_trackers SET tracker_id = ? WHERE tracker_id = ?",
               (keep, duplicate))
    db.execute("DELETE FROM torrent_trackers WHERE tracker_id = ?", (duplicate,))
    columns = ("successes", "failures", "consecutive_failures", "last_attempt", "last_success",
               "last_error", "rtt_ms", "hashes_answered", "next_attempt")
    kept, other = (dict(zip(columns, db.execute(
        f"SELECT {', '.join(columns)} FROM trackers WHERE id = ?", (row,)).fetchone()))
        for row in (keep, duplicate))
    # Its state now is the state of the row asked last (a row never asked tells nothing).
    tried = [health for health in (kept, other) if health["last_attempt"] is not None]
    newest = max(tried, key=lambda health: health["last_attempt"]) if tried else kept
    db.execute("DELETE FROM trackers WHERE id = ?", (duplicate,))
    db.execute(
        "UPDATE trackers SET successes = ?, failures = ?, consecutive_failures = ?, "
        "last_attempt = ?, last_success = ?, last_error = ?, rtt_ms = ?, hashes_answered = ?, "
        "next_attempt = ? WHERE id = ?",
        (kept["successes"] + other["successes"], kept["failures"] + other["failures"],
         newest["consecutive_failures"], newest["last_attempt"],
         max(kept["last_success"] or 0, other["last_success"] or 0) or None,
         newest["last_error"], newest["rtt_ms"] if newest["rtt_ms"] is not None
         else kept["rtt_ms"], kept["hashes_answered"] + other["hashes_answered"],
         newest["next_attempt"], keep))


def fill_magnets(db: sqlite3.Connection, torrent_id: int | None = None) -> int:
    """Store the magnet link of every torrent that has none, or of `torrent_id` if it has none:
    a new torrent, one whose name or trackers changed, every torrent of a database from before
    schema v4. Returns how many were stored."""
    magnets = missing_magnets(db, torrent_id)
    db.executemany("UPDATE torrents SET magnet = ? WHERE id = ?",
                   [(magnet, missing_id) for missing_id, magnet in magnets.items()])
    return len(magnets)


def missing_magnets(db: sqlite3.Connection, torrent_id: int | None = None) -> dict[int, str]:
    """The magnet link of every torrent that has none stored (or of `torrent_id` if it has
    none), by torrent id, computed from its name and tracker list."""
    only, params = ("", ()) if torrent_id is None else ("AND t.id = ?", (torrent_id,))
    missing = db.execute(f"SELECT t.id, t.infohash, t.name FROM torrents t "
                         f"WHERE t.magnet IS NULL {only}", params).fetchall()
    if not missing:
        return {}
    trackers: dict[int, list[str]] = {}
    for tracker_of, url in db.execute(
            f"SELECT tt.torrent_id, tr.url FROM torrents t "
            f"JOIN torrent_trackers tt ON tt.torrent_id = t.id "
            f"JOIN trackers tr ON tr.id = tt.tracker_id WHERE t.magnet IS NULL {only} "
            f"ORDER BY tt.torrent_id, tt.position, tt.tracker_id", params):
        trackers.setdefault(tracker_of, []).append(url)
    return {missing_id: stored_magnet(infohash, name, trackers.get(missing_id, ()))
            for missing_id, infohash, name in missing}


@dataclass(frozen=True, slots=True)
class Membership:
    source: str
    torrent_id: int | None
    infohash: str | None
    etag: str | None
    last_modified: str | None
    validated: int | None
    removed: int | None
    file_name: str | None


def load_memberships(db: sqlite3.Connection, collection_id: int) -> dict[str, Membership]:
    rows = db.execute(
        "SELECT m.source, m.torrent_id, t.infohash, m.etag, m.last_modified, m.validated, "
        "m.removed, m.file_name FROM memberships m LEFT JOIN torrents t ON t.id = m.torrent_id "
        "WHERE m.collection_id = ?", (collection_id,))
    return {row[0]: Membership(*row) for row in rows}


# ---- Configuration ----

_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(s|m|h|d|w)?\s*", re.IGNORECASE)
_DURATION_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgtp]?i?b?)\s*", re.IGNORECASE)


def parse_duration(value: str | int | float) -> float:
    """Seconds from `90`, `"45s"`, `"30m"`, `"12h"`, `"7d"` or `"2w"`."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{value!r} is not a duration (a non-negative number of seconds)")
        return float(value)
    match = _DURATION.fullmatch(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a duration like 45s, 30m, 12h, 7d or 2w")
    return float(match.group(1)) * _DURATION_SECONDS[(match.group(2) or "s").lower()]


def parse_size(value: str | int) -> int:
    """Bytes from `1048576`, `"1MiB"`, `"2TB"` (decimal) or `"2TiB"` (binary)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    match = _SIZE.fullmatch(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a size like 500MB, 2TB or 1GiB")
    number, unit = float(match.group(1)), match.group(2).lower()
    prefix = unit[:1] if unit[:1] in "kmgtp" and unit else ""
    base = 1024 if "i" in unit else 1000
    size = number * base ** ("kmgtp".index(prefix) + 1 if prefix else 0)
    if not math.isfinite(size):
        raise ValueError(f"{value!r} is too large a size")
    return int(size)


@dataclass(frozen=True, slots=True)
class NetworkSettings:
    allow_private: bool = False
    proxy: Optional[str] = None
    timeout: float = 30.0  # seconds without data before a read fails
    connect_timeout: float = 10.0
    user_agent: str = DEFAULT_USER_AGENT
    # A DHT or scrape stage that sends requests this long and hears not one answer stops.
    outage_after: float = 20.0


@dataclass(frozen=True, slots=True)
class SyncSettings:
    concurrency: int = 16  # .torrent downloads in flight
    max_index_bytes: int = 64 * 1024 * 1024
    max_torrent_bytes: int = 32 * 1024 * 1024
    max_redirects: int = 5
    revalidate_after: float = 7 * 86400.0  # seconds before a known .torrent is re-checked
    # The most trackers of one torrent (libgen's .torrent files list up to 49), and the most
    # trackers one sync adds to the database; more are counted and left out.
    max_trackers_per_torrent: int = 100
    max_new_trackers: int = 10_000
    # Politeness towards one server: downloads in flight, and requests a second (0 lifts it).
    per_host_concurrency: int = 4
    per_host_rate: float = 10.0
    max_pages: int = 100  # pages of one listing followed by rel="next"
    # A sync that would mark more than this share of a collection's torrents as removed is
    # refused (a broken or challenge page, a half-moved site); `tsmd sync --accept-removals`.
    max_removed: float = 0.1


@dataclass(frozen=True, slots=True)
class ScrapeSettings:
    trackers: tuple[str, ...] = ()  # asked for every torrent, besides its own
    use_torrent_trackers: bool = True  # ask the trackers listed in each .torrent / magnet
    bind: str = "[::]:0"  # the one UDP socket for all UDP trackers (dual-stack)
    batch_size: int = MAX_UDP_SCRAPE_HASHES  # hashes per UDP scrape
    http_batch_size: int = 50  # hashes per HTTP scrape (opentracker answers at most 64)
    timeout: float = 3.0  # seconds to wait for one UDP reply before retransmitting
    attempts: int = 3  # tries per request before the tracker counts as failed for this run
    concurrency: int = 64  # trackers asked at the same time
    window: int = 4  # requests in flight per tracker; real trackers drop bursts
    exclude: tuple[str, ...] = ()  # never asked; numbers stored before are not used either
    trusted: tuple[str, ...] = ()  # never tested with canaries: their numbers always count
    full_scrape: tuple[str, ...] = ()  # HTTP trackers asked for their full scrape, once a run
    backoff: float = 3600.0  # first pause after a failing run, doubled per further failing run
    max_backoff: float = 7 * 86400.0


PUBLIC_DHT_ROUTERS: Final = ("router.bittorrent.com:6881", "router.utorrent.com:6881",
                              "dht.transmissionbt.com:6881", "dht.libtorrent.org:25401")


@dataclass(frozen=True, slots=True)
class DhtSettings:
    bootstrap: tuple[str, ...] = PUBLIC_DHT_ROUTERS  # used while the warm node cache is small
    bind: str = "[::]:0"  # the one UDP socket (dual-stack; IPv6 is used where routed)
    concurrency: int = 200  # lookups in flight
    rate: float = 250.0  # packets per second in all; 0 lifts this and the per-IP limit
    per_ip_rate: float = 1.0  # packets per second to one node (libtorrent bans at 5/s)
    per_ip_burst: int = 4
    stall_timeout: float = 1.0  # at most this long before a silent node lets the next go
    query_timeout: float = 4.0  # seconds before a query counts as failed
    max_queries: int = 64  # per lookup, and per address family (BEP 32)
    bep33: bool = True  # ask for BEP 33 seed/peer filters


PROBE_MAX_PEERS: Final = 500


@dataclass(frozen=True, slots=True)
class ProbeSettings:
    connect_timeout: float = 5.0
    answer_timeout: float = 10.0  # after connecting: the handshake and what the peer holds
    have_window: float = 1.0  # for `have` messages after a partial bitfield
    concurrency: int = 100  # connections open at once
    peers_per_torrent: int = 30
    rate: float = 20.0  # new connections per second; 0 lifts the limit
    connections_per_run: int = 50_000  # a probe run's budget (the oldest-probed torrents first)


@dataclass(frozen=True, slots=True)
class ReportOutput:
    format: str  # any report format but table
    path: str  # written atomically; relative to the config file's folder
    pick: int = 0  # bytes: only what a volunteer with this much disk should seed; 0 is every torrent


@dataclass(frozen=True, slots=True)
class ReportSettings:
    outputs: tuple[ReportOutput, ...] = ()  # what `tsmd run` publishes after measuring


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    # Applied by `tsmd run`; 0 keeps forever. A year of daily samples of 100,000 torrents is
    # some 5 GB; the week's change and the month's trend need far less.
    samples: float = 400 * 86400.0
    nodes: float = 30 * 86400.0  # DHT nodes not seen for this long


RUN_STAGES: Final = ("sync", "dht", "probe", "scrape", "report", "prune")


@dataclass(frozen=True, slots=True)
class RunSettings:
    # The stages `tsmd run` runs, in this order (a host without DHT access leaves "dht" out).
    stages: tuple[str, ...] = RUN_STAGES


@dataclass(frozen=True, slots=True)
class CollectionSettings:
    name: str
    url: str
    type: str
    enabled: bool = True
    required_substring: Optional[str] = None
    same_origin: bool = True
    trackers: tuple[str, ...] = ()
    keep_obsolete: bool = False  # Anna's Archive items marked obsolete or embargoed
    type_field: Optional[str] = None  # a listing field that names each torrent's type
    max_removed: Optional[float] = None  # this collection's [sync] max_removed

    @property
    def listing_options(self) -> ListingOptions:
        return ListingOptions(self.required_substring, self.same_origin, self.keep_obsolete,
                              self.type_field)


@dataclass(frozen=True, slots=True)
class Settings:
    database: Path = Path("tsmd.sqlite3")
    network: NetworkSettings = NetworkSettings()
    sync: SyncSettings = SyncSettings()
    scrape: ScrapeSettings = ScrapeSettings()
    dht: DhtSettings = DhtSettings()
    probe: ProbeSettings = ProbeSettings()
    report: ReportSettings = ReportSettings()
    retention: RetentionSettings = RetentionSettings()
    run: RunSettings = RunSettings()
    collections: tuple[CollectionSettings, ...] = ()
    config_path: Optional[Path] = None


_DURATION_FIELDS: Final = {"timeout", "connect_timeout", "revalidate_after", "backoff",
                            "max_backoff", "stall_timeout", "query_timeout", "samples", "nodes",
                            "outage_after", "answer_timeout", "have_window"}
_POSITIVE_DURATION_FIELDS: Final = {"timeout", "connect_timeout", "stall_timeout",
                                     "query_timeout", "outage_after", "answer_timeout"}
_SIZE_FIELDS: Final = {"max_index_bytes", "max_torrent_bytes", "pick"}


def _expected(annotation: str) -> str:
    return {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
            "Optional[str]": "a string", "Optional[float]": "a number",
            "tuple[str, ...]": "a list of strings"}.get(
                annotation, annotation)


def _convert_field(where: str, name: str, annotation: str, value: Any) -> Any:
    """Check one TOML value against a settings field; the message names file, key and type."""
    try:
        if name in _POSITIVE_DURATION_FIELDS:
            seconds = parse_duration(value)
            if seconds <= 0:
                raise ValueError("must be longer than 0 s")
            return seconds
        if name in _DURATION_FIELDS:
            return parse_duration(value)
        if name in _SIZE_FIELDS:
            return parse_size(value)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}.{name}: {exc}") from None
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "Optional[str]": isinstance(value, str),
        "Optional[float]": isinstance(value, (int, float)) and not isinstance(value, bool),
        "tuple[str, ...]": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }.get(annotation, False)
    if not ok:
        raise ConfigError(f"{where}.{name}: expected {_expected(annotation)}, "
                          f"got {type(value).__name__} {value!r}")
    if annotation == "tuple[str, ...]":
        return tuple(value)
    if name == "max_removed" and not 0 <= value <= 1:
        raise ConfigError(f"{where}.{name}: expected a share from 0 to 1 (0.1 is 10 %), "
                          f"got {value!r}")
    if annotation in ("float", "Optional[float]"):
        if not math.isfinite(value):
            raise ConfigError(f"{where}.{name}: expected a finite number, got {value!r}")
        return float(value)
    if annotation == "int" and value < 0:
        raise ConfigError(f"{where}.{name}: expected a non-negative integer, got {value}")
    return value


def _settings_from_table(cls: type, table: dict, where: str, **fixed: Any) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls) if f.name not in fixed}
    values: dict[str, Any] = dict(fixed)
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(known))})")
        values[key] = _convert_field(where, key, str(known[key].type), value)
    missing = [name for name, f in known.items()
               if name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
    if missing:
        raise ConfigError(f"{where}: missing required key '{missing[0]}'")
    return cls(**values)


def _resolve_location(location: str, base: Path) -> str:
    """A collection URL, or a local path made absolute against the config file's folder."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", location):
        return location
    return (base / Path(location).expanduser()).resolve().as_uri()


# What `tsmd init` writes: every setting with its default and what it is for. The repository's
# config.example.toml is this text (a test holds them equal), for those who read before they
# install.
EXAMPLE_CONFIG: Final = """# tsmd configuration. Copy to tsmd.toml (read from the current folder by default) or pass
# --config FILE / set TSMD_CONFIG. Every setting is shown with its default.
# Precedence: command line > environment (TSMD_CONFIG, TSMD_DB) > this file > defaults.
# Relative paths are resolved against the folder holding this file.
# Durations: a number of seconds or "45s", "30m", "12h", "7d", "2w".
# Sizes: a number of bytes or "500kB", "32MiB", "2TB" (kB/MB/GB/TB decimal, KiB/MiB/... binary).

# The SQLite database (--db and TSMD_DB override it).
database = "tsmd.sqlite3"

[network]
# Refuse to connect to addresses that are not globally routable: loopback, private, link-local,
# CGNAT, multicast, reserved, IPv4 and IPv6, also behind redirects and host names. Checked on the
# address actually connected to. Set to true for collections served on your LAN.
allow_private = false
# An http:// proxy for every HTTP request, e.g. "http://127.0.0.1:3128". With a proxy, tsmd still
# refuses private IP literals in URLs, and the proxy decides what host names may reach.
# proxy = "http://proxy.example:3128"
# Seconds without progress before a read fails; a whole request may take at most
# connect_timeout + 4 x timeout.
timeout = "30s"
connect_timeout = "10s"
# Sent with every HTTP request; the default names the running version.
# user_agent = "tsmd/VERSION (+https://github.com/tsmd/tsmd)"
# A DHT or scrape stage that has sent requests for this long without one answer stops, says
# "network down?" and exits with code 69; `tsmd run` goes on with the other stages.
outage_after = "20s"

[sync]
# .torrent downloads in flight at once, and at once from one server; requests a second to one
# server (0 lifts the pacing). A 429 or 503 answer's Retry-After (up to 60 s) is waited out.
concurrency = 16
per_host_concurrency = 4
per_host_rate = 10.0
# Largest listing page and largest .torrent file accepted (gzip is decoded: the limit is on
# the decoded bytes).
max_index_bytes = "64MiB"
max_torrent_bytes = "32MiB"
# Redirects followed per request.
max_redirects = 5
# A .torrent already in the database is re-checked with a conditional request (ETag /
# Last-Modified) when its last check is older than this; `tsmd sync --revalidate` checks all now.
# Unchanged collections otherwise cost one request per index page.
revalidate_after = "7d"
# The most trackers kept of one torrent (in its tier order; libgen's .torrent files list up to
# 49), and the most trackers one sync adds to the database. More are counted and left out, so
# that one hostile .torrent cannot make `tsmd scrape` contact 100,000 trackers.
max_trackers_per_torrent = 100
max_new_trackers = 10000
# Pages of one listing followed by rel="next" links (HTML, Atom, the Link header).
max_pages = 100
# A sync that would mark more than this share of a collection's torrents as removed is refused
# for that collection: nothing is removed, and the exit code is 1. A challenge page or a broken
# listing must not empty a collection. When a listing really shrank, run
# `tsmd sync --accept-removals` once, or set max_removed for that collection. A listing that
# would remove every torrent is refused whatever max_removed says.
max_removed = 0.1

[scrape]
# `tsmd scrape` asks every tracker of every torrent (BEP 15 over UDP, BEP 48 over HTTP, and
# WebTorrent's JSON over WebSocket for ws:// and wss:// URLs) for seeders, leechers and completed
# downloads. A torrent's numbers are the maximum over its trackers.
# Some public trackers invent numbers. Each request carries one canary in place of a real hash: a
# random infohash that nobody announced. A tracker that answers one with peers is fabricating:
# its numbers of that run are stored, shown by `tsmd trackers`, and never used.
# Trackers asked for every torrent, besides the torrent's own and its collection's.
trackers = []
# Trackers never asked, and whose numbers stored before are not used either.
exclude = []
# Trackers never tested with canaries, whose numbers always count (for those who know better).
trusted = []
# HTTP trackers asked for their full scrape (every swarm they have, once a run, gzip-encoded)
# instead of per-hash scrapes. A tracker that the torrents name and that answers every per-hash
# scrape empty is tried with its full scrape on its own, and remembered when that works.
full_scrape = []
# Ask the trackers listed in each .torrent file or magnet link.
use_torrent_trackers = true
# The one UDP socket for all UDP trackers; "[::]:0" is dual-stack (IPv4 and IPv6).
bind = "[::]:0"
# Hashes per UDP scrape (at most 255; BEP 15 says ~74, opentracker answers 75, chihaya 50, and 70
# keeps a packet under an IPv4 MTU). A shorter reply is detected and the rest asked again.
batch_size = 70
# Hashes per HTTP scrape (opentracker answers at most 64), and per WebSocket scrape message.
http_batch_size = 50
# Seconds to wait for a UDP reply before sending again (for a WebSocket reply before asking
# again on a new connection); `attempts` tries per request, after which the tracker counts as
# failed for this run.
timeout = "3s"
attempts = 3
# Trackers asked at the same time, and requests in flight to one tracker (real trackers drop
# bursts).
concurrency = 64
window = 4
# A tracker that answered nothing in a run is left alone for `backoff`, doubled after each further
# failing run, up to `max_backoff`. `tsmd scrape --tracker URL` asks it anyway.
backoff = "1h"
max_backoff = "7d"

[dht]
# `tsmd dht` looks every torrent up in the BitTorrent DHT (BEP 5) with read-only queries (BEP 43)
# and asks for BEP 33 seed/peer estimates. Nodes met are cached in the database between runs.
# Bootstrap routers, used while the node cache is small.
bootstrap = ["router.bittorrent.com:6881", "router.utorrent.com:6881", "dht.transmissionbt.com:6881", "dht.libtorrent.org:25401"]
# The one UDP socket; "[::]:0" is dual-stack (IPv6 nodes are asked where IPv6 is routed).
bind = "[::]:0"
# Lookups in flight at once; thousands work.
concurrency = 200
# Packets per second in all (250 is the accepted norm on the public DHT), and per node: libtorrent
# bans an address that sends it 50 packets in 10 s. `tsmd dht --rate 0` lifts both limits, for
# closed test networks only.
rate = 250.0
per_ip_rate = 1.0
per_ip_burst = 4
# A node silent this long lets the next candidate be asked; after query_timeout it has failed.
# stall_timeout is a ceiling: once 32 answers have come, a query stalls at twice the time within
# which 90 % of them came, but not sooner than 0.1 s (unless this is shorter).
stall_timeout = "1s"
query_timeout = "4s"
# Queries one lookup may send at most (on each of the IPv4 and IPv6 DHTs).
max_queries = 64
# Ask for BEP 33 bloom filters (seed and peer estimates).
bep33 = true

[probe]
# `tsmd probe` (a stage of `tsmd run`) and `tsmd check` ask the peers the DHT found what they
# hold, read only: a BitTorrent handshake, then the peer's bitfield (or have_all), then we hang
# up. No piece is asked for or sent. A complete bitfield is a verified seed; availability is the
# complete copies among them. Magnets' metadata comes from a peer (BEP 9); web seeds are asked
# for the first piece.
# Seconds to connect, and then for the handshake and the bitfield.
connect_timeout = "5s"
answer_timeout = "10s"
# After a partial bitfield, how long `have` messages are read.
have_window = "1s"
# Connections open at once, peers asked per torrent at most, new connections per second.
concurrency = 100
peers_per_torrent = 30
rate = 20.0
# Connections one `tsmd probe` run opens at most (about 40 minutes at 20 a second). The
# torrents probed longest ago go first, so a big collection is probed over several runs.
connections_per_run = 50000

[report]
# What `tsmd run` publishes after measuring: each file is written atomically (a web server never
# serves half of one). Formats: json (the libgen-seedtools feed), html, ndjson, csv, prometheus,
# rss. `pick = "2TB"` publishes only what a volunteer with that much disk should seed, as
# `tsmd pick` chooses it but the same from run to run; rss, a feed a BitTorrent client
# subscribes to and downloads whole, needs it. The default is none:
# outputs = []
outputs = [
    { format = "json", path = "public/torrents.json" },
    { format = "html", path = "public/index.html" },
    { format = "prometheus", path = "metrics/tsmd.prom" },
    { format = "rss", path = "public/seed-2TB.xml", pick = "2TB" },
]

[retention]
# Applied at the end of `tsmd run` (and by `tsmd prune`); 0 keeps everything.
# Tracker and DHT samples older than this are deleted (at least 8 days: the week's change).
samples = "400d"
# DHT nodes not seen for this long leave the node cache.
nodes = "30d"

[run]
# The stages `tsmd run` runs, in this order. A host without DHT access (UDP blocked) leaves
# "dht" out (the probe then asks only web seeds); `tsmd run --skip STAGE` leaves one out for
# a single run.
stages = ["sync", "dht", "probe", "scrape", "report", "prune"]

# One [[collections]] table per collection. `url` is one of the following, told apart by its
# content (servers mislabel it), gzip or not:
#   - an HTML index page: every link to a .torrent file (resolved against the page, same origin
#     unless same_origin = false) and every magnet link;
#   - an RSS or Atom feed: enclosures, .torrent and magnet links, BEP 36 / academictorrents
#     fields (infoHash, magnetURI, contentLength);
#   - a JSON list (strings, or objects such as Anna's Archive torrents.json or a
#     libgen-seedtools feed: "url"/"link", "magnet_link", "btih"/"infohash", "data_size"/
#     "size_bytes", "display_name"/"name", "num_files");
#   - a CSV or TSV file with a header row naming such columns;
#   - a text list: one URL, magnet link or infohash per line, # comments;
#   - a direct .torrent URL;
#   - a local folder (its *.torrent files), a local file, or a file:// URL.
# A listing's own facts (infohash, size, name) keep a torrent listed when its .torrent cannot
# be downloaded; a .torrent that downloads overrides them and must have the same infohash.
# Pages are followed by rel="next". A page with no entry at all (a login or challenge page)
# fails the sync of its collection and changes nothing.
[[collections]]
# Unique name, used by --collection and in reports.
name = "libgen-books"
url = "https://libgen.rs/repository_torrent/"
# What libgen-seedtools users filter on: books, fiction, scimag, ...
type = "books"
# Set to false to skip the collection unless named with --collection.
enabled = true
# Only entries whose URL (or magnet, or infohash) contains this text.
required_substring = "r_"
# Follow links on an HTML index only to the page's own scheme, host and port. (A page links
# everywhere: mirrors, ads, other archives. A feed, CSV or text list names its torrents on
# purpose, often on another host, and is taken as it is.)
same_origin = true
# Extra trackers to ask for every torrent of this collection (used by `tsmd scrape`).
trackers = []
# Listings with per-item flags (Anna's Archive): keep items marked obsolete or embargoed.
keep_obsolete = false
# A listing field that names each torrent's type, for feeds of several kinds (e.g.
# "group_name"); unset: every torrent has the collection's type.
# type_field = "group_name"
# This collection's [sync] max_removed; unset: [sync]'s.
# max_removed = 0.5

[[collections]]
name = "libgen-fiction"
url = "https://libgen.rs/fiction/repository_torrent/"
type = "fiction"
enabled = false
required_substring = "f_"

[[collections]]
name = "annas-archive"
url = "https://annas-archive.org/dyn/torrents.json"
type = "books"
enabled = false
type_field = "group_name"
"""


def load_settings(config_path: Path | None, db_override: Path | None = None) -> Settings:
    """Settings from the TOML file (if any) over the defaults, then the command line's database."""
    if config_path is None:
        settings = Settings()
    else:
        try:
            document = tomllib.loads(config_path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"config {config_path}: {exc.strerror or exc}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config {config_path}: invalid TOML: {exc}") from None
        settings = settings_from_document(document, config_path)
    if db_override is not None:
        settings = dataclasses.replace(settings, database=db_override)
    return settings


def settings_from_document(document: dict, config_path: Path) -> Settings:
    where = str(config_path)
    base = config_path.resolve().parent
    sections = {"database", "network", "sync", "scrape", "dht", "probe", "report", "retention",
                "run", "collections"}
    for key in document:
        if key not in sections:
            raise ConfigError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(sections))})")
    database = document.get("database", "tsmd.sqlite3")
    if not isinstance(database, str) or not database:
        raise ConfigError(f"{where}: database: expected a file name string, got {database!r}")
    tables = {}
    for section in ("network", "sync", "scrape", "dht", "probe", "report", "retention", "run"):
        table = document.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [{section}] must be a table")
        tables[section] = table
    network = _settings_from_table(NetworkSettings, tables["network"], f"{where}: [network]")
    if network.proxy is not None and urllib.parse.urlsplit(network.proxy).scheme not in HTTP_SCHEMES:
        raise ConfigError(f"{where}: [network].proxy: expected an http:// or https:// proxy URL, "
                          f"got {network.proxy!r}")
    sync = _settings_from_table(SyncSettings, tables["sync"], f"{where}: [sync]")
    if sync.concurrency < 1:
        raise ConfigError(f"{where}: [sync].concurrency: expected at least 1")
    scrape = _settings_from_table(ScrapeSettings, tables["scrape"], f"{where}: [scrape]")
    for name in ("trackers", "exclude", "trusted", "full_scrape"):
        _check_trackers(getattr(scrape, name), f"{where}: [scrape].{name}")
    not_http = [url for url in scrape.full_scrape
                if urllib.parse.urlsplit(url.strip()).scheme.lower() not in HTTP_SCHEMES]
    if not_http:
        raise ConfigError(f"{where}: [scrape].full_scrape: only HTTP trackers have a full "
                          f"scrape, not {not_http[0]!r}")
    for name in ("batch_size", "http_batch_size", "attempts", "concurrency", "window"):
        if getattr(scrape, name) < 1:
            raise ConfigError(f"{where}: [scrape].{name}: expected at least 1")
    if scrape.batch_size > 255:
        raise ConfigError(f"{where}: [scrape].batch_size: expected at most 255 (one UDP packet)")
    try:
        split_bind_address(scrape.bind)
    except ValueError as exc:
        raise ConfigError(f"{where}: [scrape].bind: {exc}") from None
    dht = _settings_from_table(DhtSettings, tables["dht"], f"{where}: [dht]")
    check_dht_settings(dht, f"{where}: [dht]")
    probe = _settings_from_table(ProbeSettings, tables["probe"], f"{where}: [probe]")
    for name in ("concurrency", "peers_per_torrent", "connections_per_run"):
        if getattr(probe, name) < 1:
            raise ConfigError(f"{where}: [probe].{name}: expected at least 1")
    if probe.rate < 0:
        raise ConfigError(f"{where}: [probe].rate: expected 0 (unlimited) or more")
    if probe.peers_per_torrent > PROBE_MAX_PEERS:
        raise ConfigError(f"{where}: [probe].peers_per_torrent: expected at most "
                          f"{PROBE_MAX_PEERS} (availability costs the square of it)")
    report = _report_settings(tables["report"], base, f"{where}: [report]")
    retention = _settings_from_table(RetentionSettings, tables["retention"],
                                     f"{where}: [retention]")
    if 0 < retention.samples < FULL_HISTORY:
        raise ConfigError(f"{where}: [retention].samples: keep at least {FULL_HISTORY // DAY} "
                          "days (the week's change reads them), or 0 to keep everything")
    run = _settings_from_table(RunSettings, tables["run"], f"{where}: [run]")
    unknown = [stage for stage in run.stages if stage not in RUN_STAGES]
    if unknown:
        raise ConfigError(f"{where}: [run].stages: unknown stage '{unknown[0]}' (known: "
                          f"{', '.join(RUN_STAGES)})")
    raw_collections = document.get("collections", [])
    if not isinstance(raw_collections, list) or not all(isinstance(c, dict) for c in raw_collections):
        raise ConfigError(f"{where}: collections must be written as [[collections]] tables")
    collections = []
    names: set[str] = set()
    for number, table in enumerate(raw_collections, start=1):
        label = f"{where}: [[collections]] #{number}"
        collection = _settings_from_table(CollectionSettings, table, label)
        if not collection.name.strip():
            raise ConfigError(f"{label}.name: expected a non-empty string")
        if collection.name in names:
            raise ConfigError(f"{label}.name: duplicate collection name '{collection.name}'")
        names.add(collection.name)
        url = _resolve_location(collection.url, base)
        if urllib.parse.urlsplit(url).scheme not in HTTP_SCHEMES | {"file"}:
            raise ConfigError(f"{label}.url: expected an http, https or file URL or a path, "
                              f"got {collection.url!r}")
        _check_trackers(collection.trackers, f"{label}.trackers")
        collections.append(dataclasses.replace(collection, url=url))
    return Settings(
        database=(base / Path(database).expanduser()).resolve(), network=network, sync=sync,
        scrape=scrape, dht=dht, probe=probe, report=report, retention=retention, run=run,
        collections=tuple(collections), config_path=config_path)


def _report_settings(table: dict, base: Path, where: str) -> ReportSettings:
    unknown = [key for key in table if key != "outputs"]
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (known: outputs)")
    raw = table.get("outputs", [])
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        raise ConfigError(f"{where}.outputs: expected a list of tables like "
                          '{format = "json", path = "torrents.json"}')
    outputs = []
    for number, item in enumerate(raw, start=1):
        output = _settings_from_table(ReportOutput, item, f"{where}.outputs #{number}")
        if output.format not in REPORT_FILE_FORMATS:
            raise ConfigError(f"{where}.outputs #{number}.format: expected one of "
                              f"{', '.join(REPORT_FILE_FORMATS)}, got {output.format!r}")
        if not output.path.strip():
            raise ConfigError(f"{where}.outputs #{number}.path: expected a file name")
        if output.format == "rss" and output.pick <= 0:
            raise ConfigError(f"{where}.outputs #{number}: {RSS_NEEDS_PICK}, e.g. "
                              '{format = "rss", path = "seed.xml", pick = "2TB"}')
        path = (base / Path(output.path).expanduser()).resolve()
        outputs.append(dataclasses.replace(output, path=str(path)))
    return ReportSettings(tuple(outputs))


def check_dht_settings(dht: DhtSettings, where: str) -> None:
    for name in ("concurrency", "max_queries", "per_ip_burst"):
        if getattr(dht, name) < 1:
            raise ConfigError(f"{where}.{name}: expected at least 1")
    for name in ("rate", "per_ip_rate"):
        if getattr(dht, name) < 0:
            raise ConfigError(f"{where}.{name}: expected 0 (unlimited) or more")
    for value, name, check in [(b, "bootstrap", split_host_port) for b in dht.bootstrap] + [
            (dht.bind, "bind", split_bind_address)]:
        try:
            check(value)
        except ValueError as exc:
            raise ConfigError(f"{where}.{name}: {exc}") from None


def _check_trackers(urls: Sequence[str], where: str) -> None:
    bad = [url for url in urls if normalise_tracker_url(url) is None]
    if bad:
        raise ConfigError(f"{where}: not a udp/http/https/ws/wss tracker URL: {bad[0]!r}")


def select_collections(settings: Settings, names: Sequence[str]) -> list[CollectionSettings]:
    """The enabled collections, or exactly those named (enabled or not) on the command line."""
    if not names:
        return [c for c in settings.collections if c.enabled]
    by_name = {c.name: c for c in settings.collections}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ConfigError(f"no collection named '{unknown[0]}' in the configuration "
                          f"(known: {', '.join(by_name) or 'none'})")
    return [by_name[n] for n in dict.fromkeys(names)]


def make_fetcher(settings: Settings, resolve: Any = None,
                 address_allowed: Any = None, *, paced: bool = False) -> Fetcher:
    """The fetcher the settings describe; for collection servers `paced` per host as [sync]
    says, with Retry-After honoured and gzip accepted. `resolve` and `address_allowed` are
    test seams."""
    net = settings.network
    return Fetcher(allow_private=net.allow_private, proxy=net.proxy, timeout=net.timeout,
                   connect_timeout=net.connect_timeout, user_agent=net.user_agent,
                   max_redirects=settings.sync.max_redirects, resolve=resolve,
                   address_allowed=address_allowed,
                   per_host_concurrency=settings.sync.per_host_concurrency if paced else 0,
                   per_host_rate=settings.sync.per_host_rate if paced else 0.0,
                   collection_server=paced)


# ---- Output on stderr ----


class Reporter:
    """Everything tsmd says to a person goes through here, to stderr (stdout carries results):
    through rich on a terminal, in colour and with progress bars; as plain lines otherwise,
    without loading rich at all (cron, pipes, logs)."""

    MAX_PROBLEM_LINES: Final = 20

    def __init__(self, verbosity: int = 0, console: Console | None = None) -> None:
        self.verbosity = verbosity  # -1 quiet, 0 normal, 1+ verbose
        if console is None and sys.stderr.isatty():
            console = rich_console.Console(stderr=True, highlight=False, soft_wrap=True)
        self.console = console  # None: plain lines
        self.problems_shown = 0
        self.problems_hidden = 0

    def _say(self, text: str, style: str | None = None) -> None:
        if self.console is None:
            sys.stderr.write(text + "\n")
        else:
            self.console.print(text, markup=False, style=style)

    def info(self, message: str) -> None:
        if self.verbosity >= 0:
            self._say(message)

    def problem(self, message: str) -> None:
        """One failed item. Shown even with -q; past a screenful only counted unless -v."""
        if self.verbosity >= 1 or self.problems_shown < self.MAX_PROBLEM_LINES:
            self.problems_shown += 1
            self._say(f"error: {message}", style="red")
        else:
            self.problems_hidden += 1

    def flush_problems(self) -> None:
        if self.problems_hidden:
            self._say(f"error: ... and {self.problems_hidden} more failures (-v shows them "
                      "all)", style="red")
            self.problems_hidden = 0

    def progress(self) -> Progress | _NoProgress:
        if self.console is None or self.verbosity < 0 or not self.console.is_terminal:
            return _NoProgress()
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn)

        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=self.console, transient=True,
                        refresh_per_second=PROGRESS_REFRESH_PER_SECOND)


@dataclass(slots=True)
class _Task:
    total: float | None


class _NoProgress:
    """What the stages use of rich's Progress, drawing nothing: where no one watches."""

    def __init__(self) -> None:
        self.tasks: list[_Task] = []

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        return None

    def add_task(self, description: str, total: float | None = None) -> int:
        self.tasks.append(_Task(total))
        return len(self.tasks) - 1

    def update(self, task: int, *, total: float | None = None, **ignored: Any) -> None:
        if total is not None:
            self.tasks[task].total = total


# ---- Sync stage ----


@dataclass(slots=True)
class SyncCounts:
    collections: int = 0
    pages: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    removed: int = 0
    failed: int = 0
    downloads: int = 0
    requests: int = 0
    moved: int = 0  # entries found under a new URL (a domain move), history kept
    skipped: int = 0  # listing items left out on purpose (obsolete, embargoed)
    trackers_ignored: int = 0  # past [sync] max_trackers_per_torrent or max_new_trackers
    broken: int = 0  # entries that failed again, BROKEN_AFTER syncs in a row or more
    failed_unsaid: int = 0  # of `failed`, those already said in the last day (said once, below)
    outage: str | None = None  # set when no server could be reached at all

    def summary(self) -> str:
        ignored = (f"; {self.trackers_ignored:,} trackers left out by max_trackers_per_torrent "
                   "or max_new_trackers" if self.trackers_ignored else "")
        broken = f", {self.broken} broken (see tsmd status)" if self.broken else ""
        moved = f", {self.moved} moved" if self.moved else ""
        skipped = f", {self.skipped} obsolete or embargoed left out" if self.skipped else ""
        return (f"{self.collections} collections, {self.pages} index pages, {self.new} new, "
                f"{self.changed} changed, {self.unchanged} unchanged{moved}, {self.removed} "
                f"removed, {self.failed} failed{broken}{skipped} ({self.downloads} downloads, "
                f"{self.requests} requests){ignored}")


@dataclass(frozen=True, slots=True)
class SyncOutcome:
    """One entry's result, sent to the writer. `meta` is None when the entry failed and the
    listing said nothing of it; with `error` and a `meta`, it failed and is listed by the
    listing's facts."""

    collection_id: int
    entry: IndexEntry
    meta: Metainfo | None
    status: str  # new, changed, unchanged, failed
    etag: str | None = None
    last_modified: str | None = None
    error: str | None = None
    moved_from: str | None = None  # the entry's source before its listing moved


@dataclass(frozen=True, slots=True)
class CollectionSynced:
    """Sent to the writer after a collection's last outcome: what to record for the collection
    itself. Written in the same transaction as the last outcomes, so the index validators are
    never stored ahead of the entries they vouch for."""

    collection_id: int
    now: int
    confirmed: list[str]  # listed and still fresh: last_seen only
    vanished: list[str]  # no longer listed: marked removed
    index_etag: str | None
    index_last_modified: str | None
    fingerprint: str
    error: str | None = None  # a sync that was refused in part (removals), said in `tsmd status`
    # (type, source) of every listed entry, as the listing read this sync says it; None when
    # the listing was not read (a 304): the stored types stand.
    types: list[tuple[str | None, str]] | None = None


@dataclass(frozen=True, slots=True)
class EntryFailure:
    """A failed entry as written: how many syncs in a row it failed, whether to say so now."""

    error: str
    failures: int
    say: bool


def _write_sync_outcomes(db: sqlite3.Connection, outcomes: list[SyncOutcome | CollectionSynced],
                         now: int, limits: TrackerLimits) -> list[EntryFailure]:
    failed = []
    with Transaction(db):
        for outcome in outcomes:
            if isinstance(outcome, CollectionSynced):
                _finish_collection(db, outcome)
                continue
            entry = outcome.entry
            listed_type = entry.facts.type if entry.facts is not None else None
            if outcome.moved_from is not None:
                _move_membership(db, outcome)
            torrent_id = (upsert_torrent(db, outcome.meta, now, limits)
                          if outcome.meta is not None else None)
            if outcome.error is not None:
                before = db.execute("SELECT failures, reported FROM memberships WHERE "
                                    "collection_id = ? AND source = ?",
                                    (outcome.collection_id, entry.source)).fetchone()
                failures, reported = (before[0] + 1, before[1]) if before else (1, None)
                say = reported is None or now - reported >= DAY  # once a day at most
                db.execute(
                    "INSERT INTO memberships (collection_id, source, torrent_id, file_name, "
                    "first_seen, last_seen, last_error, failures, reported, type) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(collection_id, source) DO UPDATE SET last_seen = excluded.last_seen, "
                    "torrent_id = coalesce(excluded.torrent_id, torrent_id), "
                    "last_error = excluded.last_error, removed = NULL, "
                    "failures = excluded.failures, reported = excluded.reported, "
                    "type = coalesce(excluded.type, type)",
                    (outcome.collection_id, entry.source, torrent_id, entry.file_name, now, now,
                     outcome.error, failures, now if say else reported, listed_type))
                failed.append(EntryFailure(outcome.error, failures, say))
                continue
            validated = now if entry.kind is EntryKind.URL else None
            db.execute(
                "INSERT INTO memberships (collection_id, source, torrent_id, file_name, first_seen, "
                "last_seen, etag, last_modified, validated, type) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(collection_id, source) DO UPDATE SET torrent_id = excluded.torrent_id, "
                "file_name = coalesce(excluded.file_name, file_name), last_seen = excluded.last_seen, "
                "etag = coalesce(excluded.etag, etag), "
                "last_modified = coalesce(excluded.last_modified, last_modified), "
                "validated = excluded.validated, last_error = NULL, removed = NULL, "
                "failures = 0, reported = NULL, type = coalesce(excluded.type, type)",
                (outcome.collection_id, entry.source, torrent_id, entry.file_name, now, now,
                 outcome.etag, outcome.last_modified, validated, listed_type))
            if torrent_id in limits.short_of_budget:  # read it again next sync, in full
                db.execute("UPDATE memberships SET etag = NULL, last_modified = NULL, "
                           "validated = NULL WHERE collection_id = ? AND source = ?",
                           (outcome.collection_id, entry.source))
    return failed


def _move_membership(db: sqlite3.Connection, outcome: SyncOutcome) -> None:
    """An entry that looked like one that left the listing (same file name or infohash, new
    URL) and proved to be the same torrent: it takes over the old membership, first_seen and
    all. (Another torrent: the old entry was judged with the removals. No answer at all: the
    old entry stays listed until a sync tells.)"""
    row = db.execute("SELECT t.infohash FROM memberships m JOIN torrents t ON t.id = m.torrent_id "
                     "WHERE m.collection_id = ? AND m.source = ?",
                     (outcome.collection_id, outcome.moved_from)).fetchone()
    if row is None or outcome.meta is None or outcome.meta.infohash != row[0]:
        return
    db.execute("DELETE FROM memberships WHERE collection_id = ? AND source = ?",
               (outcome.collection_id, outcome.entry.source))  # a failed try under the new URL
    db.execute("UPDATE memberships SET source = ?, etag = NULL, last_modified = NULL "
               "WHERE collection_id = ? AND source = ?",
               (outcome.entry.source, outcome.collection_id, outcome.moved_from))


def _finish_collection(db: sqlite3.Connection, done: CollectionSynced) -> None:
    db.executemany("UPDATE memberships SET last_seen = ? WHERE collection_id = ? AND source = ?",
                   [(done.now, done.collection_id, source) for source in done.confirmed])
    db.executemany("UPDATE memberships SET removed = ? WHERE collection_id = ? AND source = ?",
                   [(done.now, done.collection_id, source) for source in done.vanished])
    if done.types is not None:  # entries confirmed without a download too (type_field set)
        db.executemany("UPDATE memberships SET type = ? WHERE collection_id = ? AND source = ? "
                       "AND type IS NOT ?",
                       [(kind, done.collection_id, source, kind) for kind, source in done.types])
    db.execute("UPDATE collections SET index_etag = ?, index_last_modified = ?, "
               "index_fingerprint = ?, last_synced = ?, last_error = ? WHERE id = ?",
               (done.index_etag, done.index_last_modified, done.fingerprint, done.now,
                done.error, done.collection_id))


async def _sync_writer(db: sqlite3.Connection, receive: trio.MemoryReceiveChannel,
                       counts: SyncCounts, reporter: Reporter, on_written: Any,
                       settings: SyncSettings) -> None:
    """The one task that writes sync results: batches, one transaction each."""
    batch: list[SyncOutcome | CollectionSynced] = []
    limits = TrackerLimits(settings.max_trackers_per_torrent, settings.max_new_trackers)

    def take(outcome: SyncOutcome | CollectionSynced) -> None:
        batch.append(outcome)
        if isinstance(outcome, CollectionSynced):
            counts.removed += len(outcome.vanished)
            return
        if outcome.status != "failed":  # failures are counted as they are written
            setattr(counts, outcome.status, getattr(counts, outcome.status) + 1)
        counts.moved += outcome.moved_from is not None and outcome.status == "unchanged"
        on_written()

    def write() -> None:
        for failure in _write_sync_outcomes(db, batch, int(time.time()), limits):
            if failure.failures >= BROKEN_AFTER:
                counts.broken += 1
            else:
                counts.failed += 1
                counts.failed_unsaid += not failure.say
            if failure.say or reporter.verbosity > 0:  # -v names every failure, every time
                again = "; said again in a day" if failure.say else ""
                reporter.problem(failure.error + (f" (failed {failure.failures} syncs in a row"
                                                  f"{again})" if failure.failures > 1 else ""))
        batch.clear()

    try:
        async for outcome in receive:
            take(outcome)
            if len(batch) >= SYNC_WRITE_BATCH or isinstance(outcome, CollectionSynced):
                write()
    finally:
        # Also on cancellation (Ctrl-C, SIGTERM): what was measured, queued or not, is kept.
        while True:
            try:
                take(receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        receive.close()
        if batch:
            write()
        counts.trackers_ignored = limits.ignored


def listed_metainfo(entry: IndexEntry) -> Metainfo | None:
    """What the listing alone tells of an entry: a magnet's or bare infohash's metainfo, with
    the listing's facts filling what it lacks; for a .torrent URL, the facts if they name an
    infohash, else None."""
    facts = entry.facts
    if entry.kind is EntryKind.MAGNET:
        meta = decode_magnet_untrusted(entry.source)
    elif entry.kind is EntryKind.INFOHASH:
        meta = Metainfo.bare(entry.source)
    elif facts is not None and facts.infohash is not None:
        meta = Metainfo.bare(facts.infohash)
    else:
        return None
    if facts is None:
        return meta
    return dataclasses.replace(meta, name=meta.name or facts.name,
                               size_bytes=meta.size_bytes if meta.size_bytes is not None
                               else facts.size_bytes,
                               file_count=meta.file_count if meta.file_count is not None
                               else facts.file_count)


def _classify(previous: Membership | None, infohash: str) -> str:
    if previous is None or previous.torrent_id is None or previous.removed is not None:
        return "new"
    return "unchanged" if previous.infohash == infohash else "changed"


def _looks_like_torrent(body: bytes) -> bool:
    return body[:1] == b"d" and (b"4:info" in body[:1 << 20])


def _same_origin(url: str, other: str) -> bool:
    return _origin(url) == _origin(other)


@dataclass(slots=True)
class _Listing:
    """A collection's listing as read this sync: every page's entries, and why it is not whole
    if it is not (removals are judged only against a whole listing)."""

    entries: list[IndexEntry]
    pages: list[IndexPage]
    incomplete: str | None = None
    etag: str | None = None  # validators of a one-page listing
    last_modified: str | None = None
    prefetched: dict[str, FetchResult] = field(default_factory=dict)
    read: bool = True  # False after a 304: the stored entries stand, facts and types unread


MAX_PROBLEMS_SAID_PER_COLLECTION: Final = 10  # unreadable items named per collection without -v


class _CollectionSync:
    """The sync of one collection: read its listing, download what changed, and send every
    result to the writer."""

    def __init__(self, db: sqlite3.Connection, run: _SyncRun, collection: CollectionSettings
                 ) -> None:
        self.db, self.run, self.collection = db, run, collection
        self.settings = run.settings.sync
        self.now = int(time.time())
        # Old entries whose look-alike under a new URL proved another torrent: they left.
        self.not_moved: list[str] = []

    def _fail(self, message: str) -> None:
        message = f"collection '{self.collection.name}': {message}"
        self.run.counts.failed += 1
        self.run.reporter.problem(message)
        with Transaction(self.db):
            self.db.execute("UPDATE collections SET last_error = ? WHERE id = ?",
                            (message, self.collection_id))

    async def sync(self) -> None:
        collection = self.collection
        with Transaction(self.db):
            self.collection_id = upsert_collection(self.db, collection.name, collection.url,
                                                   collection.type, collection.enabled)
            stored = self.db.execute("SELECT index_etag, index_last_modified, index_fingerprint "
                                     "FROM collections WHERE id = ?",
                                     (self.collection_id,)).fetchone()
        fingerprint = json.dumps([collection.url, collection.required_substring,
                                  collection.same_origin, collection.keep_obsolete,
                                  collection.type_field])
        memberships = load_memberships(self.db, self.collection_id)
        try:
            listing = await self._read_listing(stored[:2] if stored[2] == fingerprint
                                               else (None, None), memberships)
        except (FetchError, ProtocolError) as exc:
            self._fail(str(exc))
            return
        self._say_unreadable(listing)
        if not listing.entries:
            kinds = "/".join(dict.fromkeys(page.kind for page in listing.pages)) or "listing"
            unreadable = sum(page.unreadable for page in listing.pages)
            self._fail(f"not a collection page: {collection.url} ({kinds}), 0 torrent links"
                       + (f" ({unreadable:,} unreadable lines or items)" if unreadable else "")
                       + "; a login or challenge page? Nothing was changed")
            return
        self.run.on_entries(len(listing.entries))
        listed = {entry.source for entry in listing.entries}
        gone = {source: m for source, m in memberships.items()
                if m.removed is None and source not in listed}
        moves = _find_moves(listing.entries, memberships, gone)  # taken out of `gone`
        confirmed = await self._sync_entries(listing, memberships, moves)
        vanished = [*gone, *self.not_moved]
        error = self._judge_removals(vanished, memberships, listing)
        if error is not None:
            vanished = []
        one_page = len(listing.pages) <= 1 and error is None
        types = [(entry.facts.type if entry.facts is not None else None, entry.source)
                 for entry in listing.entries] if listing.read else None
        await self.run.send.send(CollectionSynced(
            self.collection_id, self.now, confirmed, vanished,
            listing.etag if one_page else None, listing.last_modified if one_page else None,
            fingerprint, error, types))

    def _judge_removals(self, vanished: list[str], memberships: dict[str, Membership],
                        listing: _Listing) -> str | None:
        """Why the removals of this sync are refused, said and counted; None to accept them.
        Torrents count: an entry that never gave one (a dead link) may leave freely, and so
        may one whose torrent is still listed under another source."""
        if not vanished:
            return None
        leaving_sources = set(vanished)
        still_listed = {_listed_infohash(entry) for entry in listing.entries} | {
            m.infohash for source, m in memberships.items() if m.removed is None
            and source not in leaving_sources}
        leaving = sum(1 for source in vanished if memberships[source].torrent_id is not None
                      and memberships[source].infohash not in still_listed)
        name = self.collection.name
        if listing.incomplete is not None:  # then no entry leaves, torrent or not
            message = (f"collection '{name}': the listing was not read to its end "
                       f"({listing.incomplete}); none of the {len(vanished):,} entries missing "
                       "from what was read is removed")
        elif not leaving:
            return None
        else:
            listed = sum(1 for m in memberships.values()
                         if m.removed is None and m.torrent_id is not None)
            limit = self.collection.max_removed
            limit = self.settings.max_removed if limit is None else limit
            if self.run.accept_removals or (leaving <= limit * listed and leaving < listed):
                return None
            if leaving >= listed:
                why = ("every one of them, which no max_removed allows: if the listing really "
                       f"is gone or replaced, run `tsmd sync --accept-removals -c {name}` once")
            else:
                why = (f"{leaving / listed:.0%}, over max_removed = {limit:g}: if the listing "
                       f"really shrank, run `tsmd sync --accept-removals -c {name}` once, or "
                       "set max_removed in its [[collections]] table")
            message = (f"collection '{name}': refused to mark {leaving:,} of its {listed:,} "
                       f"listed torrents as removed ({why}). Nothing was removed: a broken or "
                       "challenge page?")
        self.run.counts.failed += 1
        self.run.reporter.problem(message)
        return message

    def _say_unreadable(self, listing: _Listing) -> None:
        """Each unreadable item counts as a failure; the first few are named."""
        problems = [problem for page in listing.pages for problem in page.problems]
        unreadable = sum(page.unreadable for page in listing.pages)
        self.run.counts.failed += unreadable
        self.run.counts.skipped += sum(page.skipped for page in listing.pages)
        shown = problems if self.run.reporter.verbosity > 0 else \
            problems[:MAX_PROBLEMS_SAID_PER_COLLECTION]
        for problem in shown:
            self.run.reporter.problem(f"collection '{self.collection.name}': {problem}")
        if self.run.reporter.verbosity > 0:
            for page in listing.pages:
                for note in page.notes:
                    self.run.reporter.info(f"collection '{self.collection.name}': listed by "
                                           f"another field: {note}")
        if unreadable > len(shown):
            self.run.reporter.problem(
                f"collection '{self.collection.name}': ... and {unreadable - len(shown):,} more "
                "unreadable items" + (" (-v names them)" if len(shown) < len(problems) else ""))

    async def _read_listing(self, validators: tuple[str | None, str | None],
                            memberships: dict[str, Membership]) -> _Listing:
        """Every page of the collection's listing, following rel="next" on the same origin."""
        url = self.collection.url
        options = self.collection.listing_options
        local_path = file_url_to_path(url) if url.startswith("file:") else None
        if local_path is not None and local_path.is_dir():
            self.run.counts.pages += 1
            page = IndexPage("folder", [], [])
            select_entries(local_index_entries(local_path), url, options, page)
            return _Listing(page.entries, [page])
        pages: list[IndexPage] = []
        listing = _Listing([], pages)
        seen: set[str] = set()
        next_url: str | None = url
        while next_url is not None:
            if len(pages) >= self.settings.max_pages:
                listing.incomplete = f"more than [sync] max_pages = {self.settings.max_pages} pages"
                break
            seen.add(next_url)
            first = not pages
            result = await self.run.fetcher.fetch(
                next_url, max_bytes=max(self.settings.max_index_bytes,
                                        self.settings.max_torrent_bytes),
                etag=validators[0] if first else None,
                last_modified=validators[1] if first else None,
                allow_local=first)  # the configured URL itself
            self.run.counts.pages += 1
            if first:
                listing.etag, listing.last_modified = result.etag, result.last_modified
            if result.status == 304:
                listing.entries = [_entry_from_stored_source(m.source) for m in
                                   memberships.values() if m.removed is None]
                listing.read = False
                return listing
            body = result.body
            if is_gzip_file(body):  # a .gz listing, served as a file rather than encoded
                try:
                    body = decode_content_untrusted(body, "gzip", self.settings.max_index_bytes)
                except ProtocolError as exc:
                    raise ProtocolError(f"{next_url}: {exc}") from None
            if first and _looks_like_torrent(body):
                entry = IndexEntry(EntryKind.URL, url, _url_file_name(url))
                listing.prefetched[url] = dataclasses.replace(result, body=body)
                listing.entries.append(entry)
                pages.append(IndexPage(".torrent", [entry], []))
                return listing
            if len(body) > self.settings.max_index_bytes:
                raise FetchError(f"{next_url}: listing over the "
                                 f"{self.settings.max_index_bytes:,}-byte limit")
            page = parse_index_untrusted(body, result.url, link_header=result.link,
                                         options=options)
            pages.append(page)
            next_url = None
            if not first and not page.listed:  # a challenge page in the middle, say
                listing.incomplete = (f"page {len(pages)}, {result.url[:MAX_URL_IN_MESSAGE]}, "
                                      f"gave no entry ({page.kind})")
                break
            if page.next_url:
                try:
                    candidate = resolve_link_untrusted(result.url, page.next_url)
                except ProtocolError:
                    candidate = None
                if candidate is not None and candidate not in seen \
                        and _same_origin(candidate, result.url):
                    next_url = candidate
        listing.entries = list({entry.source: entry for page in pages
                                for entry in page.entries}.values())
        return listing

    async def _sync_entries(self, listing: _Listing, memberships: dict[str, Membership],
                            moves: dict[str, Membership]) -> list[str]:
        """Download or confirm every entry; the sources confirmed without a download."""
        run = self.run
        confirmed: list[str] = []
        async with trio.open_nursery() as nursery:
            for entry in listing.entries:
                previous = memberships.get(entry.source)
                moved = moves.get(entry.source)
                if entry.kind is not EntryKind.URL:
                    try:
                        meta = listed_metainfo(entry)
                    except ProtocolError as exc:
                        await run.send.send(SyncOutcome(self.collection_id, entry, None, "failed",
                                                        error=f"{entry.source[:80]}: {exc}"))
                        continue
                    assert meta is not None
                    basis = moved if self._check_move(moved, meta) else previous
                    await run.send.send(SyncOutcome(
                        self.collection_id, entry, meta, _classify(basis, meta.infohash),
                        moved_from=moved.source if moved is not None else None))
                elif (previous is not None and previous.torrent_id is not None
                      and previous.removed is None and not run.revalidate
                      and self.now - (previous.validated or 0) < self.settings.revalidate_after
                      and entry.source not in listing.prefetched):
                    confirmed.append(entry.source)
                    run.counts.unchanged += 1
                    run.on_entries(0, advance=1)
                else:
                    nursery.start_soon(self._download_entry, entry, previous, moved,
                                       listing.prefetched.get(entry.source))
        return confirmed

    async def _download_entry(self, entry: IndexEntry, previous: Membership | None,
                              moved: Membership | None, prefetched: FetchResult | None) -> None:
        run = self.run
        known = previous is not None and previous.torrent_id is not None and moved is None
        moved_from = moved.source if moved is not None else None
        try:
            if prefetched is not None:
                result = prefetched
            else:
                async with run.limiter:
                    result = await run.fetcher.fetch(
                        entry.source, max_bytes=self.settings.max_torrent_bytes,
                        allow_local=entry.source.startswith("file:"),
                        etag=previous.etag if known else None,  # type: ignore[union-attr]
                        last_modified=previous.last_modified if known else None)  # type: ignore[union-attr]
            if result.status == 304:
                assert previous is not None and previous.infohash is not None  # needs a validator
                await run.send.send(SyncOutcome(self.collection_id, entry,
                                                Metainfo.bare(previous.infohash),
                                                _classify(previous, previous.infohash),
                                                result.etag, result.last_modified))
                return
            run.counts.downloads += 1
            if len(result.body) > DECODE_IN_THREAD_BYTES:
                # A .torrent of a million files takes seconds to decode; meanwhile timeouts
                # work, and Ctrl-C or SIGTERM leave the thread to finish alone, unused.
                meta = await in_worker_thread(decode_metainfo_untrusted, result.body,
                                              abandon_on_cancel=True)
            else:
                meta = decode_metainfo_untrusted(result.body)
            listed = entry.facts.infohash if entry.facts is not None else None
            if listed is not None and listed not in (meta.infohash, (meta.infohash_v2 or "")[:40]):
                raise ProtocolError(f"the listing says infohash {listed}, the .torrent is "
                                    f"{meta.infohash}")
        except (ProtocolError, FetchError) as exc:
            error = (f"{entry.source}: not a valid .torrent: {exc}"
                     if isinstance(exc, ProtocolError) else str(exc))
            facts_meta = listed_metainfo(entry)
            if facts_meta is not None:
                error += "; listed by the listing's own facts (infohash, size)"
            basis = moved if self._check_move(moved, facts_meta) else previous
            await run.send.send(SyncOutcome(
                self.collection_id, entry, facts_meta,
                _classify(basis, facts_meta.infohash) if facts_meta else "failed",
                error=error, moved_from=moved_from))
            return
        basis = moved if self._check_move(moved, meta) else previous
        await run.send.send(SyncOutcome(self.collection_id, entry, meta,
                                        _classify(basis, meta.infohash),
                                        result.etag, result.last_modified, moved_from=moved_from))

    def _check_move(self, moved: Membership | None, meta: Metainfo | None) -> bool:
        """Whether `moved` (the entry this one may have moved from) is the same torrent. A
        look-alike that proved another torrent: the old entry left after all, and is judged
        with this sync's removals. (No answer: it stays listed until a sync tells.)"""
        if moved is None or meta is None:
            return False
        if meta.infohash != moved.infohash:
            self.not_moved.append(moved.source)
            return False
        return True


def _listed_infohash(entry: IndexEntry) -> str | None:
    """The infohash the listing itself gives an entry: its facts (a magnet's own, as read), or
    the entry itself."""
    if entry.facts is not None and entry.facts.infohash is not None:
        return entry.facts.infohash
    return entry.source if entry.kind is EntryKind.INFOHASH else None


def _find_moves(entries: list[IndexEntry], memberships: dict[str, Membership],
                gone: dict[str, Membership]) -> dict[str, Membership]:
    """Entries new to the collection that look like ones that left it: the same infohash in
    the listing (its facts, a magnet whose other parameters changed), or the same file name (a
    site that moved to a new domain). Each is confirmed by its download (or the listing's
    infohash) before the old entry's history moves to it. Matches are taken from `gone`."""
    if not gone:
        return {}
    by_hash = {m.infohash: m for m in gone.values() if m.infohash is not None}
    by_name: dict[str, Membership | None] = {}
    for membership in gone.values():
        # A name that two left entries share tells nothing.
        if membership.file_name and membership.torrent_id is not None:
            by_name[membership.file_name] = None if membership.file_name in by_name \
                else membership
    repeated = {name for name, count in Counter(
        entry.file_name for entry in entries if entry.file_name).items() if count > 1}
    moves: dict[str, Membership] = {}
    for entry in entries:
        previous = memberships.get(entry.source)
        if previous is not None and previous.torrent_id is not None:
            continue
        listed = _listed_infohash(entry)
        old = by_hash.get(listed) if listed is not None else None
        if old is None and entry.file_name and entry.file_name not in repeated:
            old = by_name.get(entry.file_name)
        if old is not None and old.source in gone:
            moves[entry.source] = old
            del gone[old.source]
    return moves


def _entry_from_stored_source(source: str) -> IndexEntry:
    if source.lower().startswith("magnet:?"):
        return IndexEntry(EntryKind.MAGNET, source, None)
    if _HEX40.fullmatch(source):
        return IndexEntry(EntryKind.INFOHASH, source, None)
    return IndexEntry(EntryKind.URL, source, _url_file_name(source))


@dataclass(slots=True)
class _SyncRun:
    """What every collection's sync of one run shares."""

    settings: Settings
    fetcher: Fetcher
    send: trio.MemorySendChannel
    limiter: trio.CapacityLimiter
    counts: SyncCounts
    reporter: Reporter
    on_entries: Any
    revalidate: bool = False
    accept_removals: bool = False


async def run_sync(db: sqlite3.Connection, settings: Settings,
                   collections: Sequence[CollectionSettings], reporter: Reporter, *,
                   revalidate: bool = False, accept_removals: bool = False, resolve: Any = None,
                   address_allowed: Any = None) -> SyncCounts:
    """Fetch every given collection into the database; failures are counted, never raised."""
    counts = SyncCounts(collections=len(collections))
    fetcher = make_fetcher(settings, resolve, address_allowed, paced=True)
    limiter = trio.CapacityLimiter(settings.sync.concurrency)
    send, receive = trio.open_memory_channel[SyncOutcome](SYNC_WRITE_BATCH)
    with reporter.progress() as progress:
        task = progress.add_task("sync", total=0)

        def on_entries(number: int, advance: int = 0) -> None:
            progress.update(task, total=(progress.tasks[0].total or 0) + number, advance=advance)

        def on_written() -> None:
            progress.update(task, advance=1)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_sync_writer, db, receive, counts, reporter, on_written,
                                   settings.sync)
                async with send:
                    for collection in collections:
                        progress.update(task, description=f"sync {collection.name}")
                        async with send.clone() as collection_send:
                            run = _SyncRun(settings, fetcher, collection_send, limiter, counts,
                                           reporter, on_entries, revalidate, accept_removals)
                            await _CollectionSync(db, run, collection).sync()
        finally:
            counts.requests = fetcher.requests
            if fetcher.reached_no_server():
                counts.outage = ("no collection server could be reached (unless every "
                                 "server's name is wrong): network down?")
            with trio.CancelScope(shield=True):
                await fetcher.aclose()
    if counts.failed_unsaid and reporter.verbosity <= 0:  # an exit code of 1 has a reason
        reporter.problem(f"sync: failed again, as said in the last day: {counts.failed_unsaid} "
                         "(-v names them)")
    reporter.flush_problems()
    return counts


# ---- Outage watch ----
# A host with its network down (or UDP firewalled) would otherwise grind through every torrent:
# two seconds a lookup, 55 hours for 100,000 torrents, holding the database lock all along.

OUTAGE_MIN_REQUESTS: Final = 3  # requests that must go unanswered before silence means outage


async def watch_for_outage(asked: Callable[[], int], heard: Callable[[], int], after: float,
                           scope: trio.CancelScope) -> None:
    """Cancel `scope` once `asked()` grew by OUTAGE_MIN_REQUESTS or more during `after`
    seconds in which `heard()` did not grow at all. A slow answer to a request in flight
    while nothing else is asked is not an outage."""
    since, asked_then, heard_then = trio.current_time(), asked(), heard()
    while True:
        await trio.sleep(min(1.0, after / 4))
        now = trio.current_time()
        if heard() != heard_then:
            since, asked_then, heard_then = now, asked(), heard()
        elif now - since >= after and asked() - asked_then >= OUTAGE_MIN_REQUESTS:
            scope.cancel()
            return


def outage_message(what: str, heard: int, after: float) -> str:
    if heard:
        return f"no {what} answered for {after:g} s, after {heard:,} answers: network down?"
    return f"no {what} answered in {after:g} s: network down?"


# ---- DHT stage ----


def load_node_cache(db: sqlite3.Connection, now: float) -> NodeCache:
    cache = NodeCache()
    for node_id, host, port, last_seen, failures in db.execute(
            "SELECT node_id, host, port, last_seen, failures FROM dht_nodes "
            "WHERE last_seen >= ? AND failures < ?",
            (now - DHT_NODE_MAX_AGE, DHT_EVICT_AFTER_FAILURES)):
        if isinstance(node_id, bytes) and len(node_id) == 20:
            cache.add(DhtNode(node_id, host, port), last_seen, failures)
    # Only the addresses still in their back-off are loaded (silent_back_off, in SQL): the
    # table holds every silent address of the last month.
    try:
        silent = db.execute(
            "SELECT host, port FROM dht_silent_nodes WHERE last_failed > ? "
            "AND last_failed + min(? << (min(max(runs, 1), 9) - 1), ?) > ?",
            (now - DHT_SILENT_RETRY_MAX, DHT_SILENT_RETRY, DHT_SILENT_RETRY_MAX, now)).fetchall()
    except sqlite3.OperationalError:
        silent = []  # `check` reading a database from before version 3, read-only
    for host, port in silent:
        cache.remember_silent(host, port)
    return cache


def save_node_cache(db: sqlite3.Connection, cache: NodeCache, now: float,
                    heard_anything: bool = True) -> None:
    """Persist the warm cache: responsive nodes upserted, evicted and stale ones deleted; the
    addresses silent in this run remembered, those that answered forgiven. A run that heard no
    reply at all says nothing of the nodes, only of its own network: nothing is saved."""
    if not heard_anything:
        return
    rows = [(node.node_id, node.host, node.port, int(seen), failures)
            for node, seen, failures in cache.entries()]
    with Transaction(db):
        db.executemany("DELETE FROM dht_nodes WHERE host = ? AND port = ?", sorted(cache.evicted))
        db.executemany(
            "INSERT INTO dht_nodes (node_id, host, port, last_seen, failures) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(host, port) DO UPDATE SET "
            "node_id = excluded.node_id, last_seen = excluded.last_seen, "
            "failures = excluded.failures", rows)
        db.execute("DELETE FROM dht_nodes WHERE last_seen < ?", (now - DHT_NODE_MAX_AGE,))
        db.executemany("DELETE FROM dht_silent_nodes WHERE host = ? AND port = ?",
                       sorted(cache.known_alive))
        db.executemany(
            "INSERT INTO dht_silent_nodes (host, port, runs, last_failed) VALUES (?, ?, 1, ?) "
            "ON CONFLICT(host, port) DO UPDATE SET runs = dht_silent_nodes.runs + 1, "
            "last_failed = excluded.last_failed",
            [(host, port, int(now)) for host, port in cache.silent_this_run()])
        db.execute("DELETE FROM dht_silent_nodes WHERE last_failed < ?", (now - DHT_SILENT_FORGET,))


def load_dht_plan(db: sqlite3.Connection, collections: Sequence[CollectionSettings],
                  infohashes: Sequence[str], stale_after: float | None,
                  now: int) -> list[tuple[int, bytes]]:
    """Torrents to look up: never measured first, then the longest ago."""
    names = [c.name for c in collections]
    query = (f"SELECT t.id, t.infohash, (SELECT max(measured) FROM dht_samples d "
             f"WHERE d.torrent_id = t.id) AS last FROM torrents t WHERE EXISTS ("
             f"SELECT 1 FROM memberships m JOIN collections c ON c.id = m.collection_id "
             f"WHERE m.torrent_id = t.id AND m.removed IS NULL "
             f"AND c.name IN ({', '.join('?' * len(names))}))")
    params: list[Any] = list(names)
    if infohashes:
        query += f" AND t.infohash IN ({', '.join('?' * len(infohashes))})"
        params.extend(infohashes)
    rows = db.execute(query, params).fetchall()
    if infohashes:
        missing = set(infohashes) - {row[1] for row in rows}
        if missing:
            raise ConfigError(f"infohash {sorted(missing)[0]} is not listed by the selected "
                              "collections (sync it first)")
    if stale_after is not None:
        rows = [row for row in rows if row[2] is None or row[2] <= now - stale_after]
    rows.sort(key=lambda row: (row[2] is not None, row[2] or 0, row[0]))
    return [(torrent_id, bytes.fromhex(infohash)) for torrent_id, infohash, _ in rows]


def waiting_in(channel: trio.MemoryReceiveChannel) -> Iterator[Any]:
    """What `channel` holds now, without waiting: a writer's last reads when it is cancelled
    (what the measuring tasks already handed over is not lost)."""
    while True:
        try:
            yield channel.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return


def _write_dht_samples(db: sqlite3.Connection, rows: list[tuple]) -> None:
    """Each row is a sample's columns, then the peers found: these replace the torrent's
    swarm_peers, which the probe reads."""
    with Transaction(db):
        db.executemany("INSERT INTO dht_samples (torrent_id, run_id, measured, peers, "
                       "bep33_seeds, bep33_peers, nodes_answered) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       [row[:-1] for row in rows])
        db.executemany("DELETE FROM swarm_peers WHERE torrent_id = ?", [row[:1] for row in rows])
        db.executemany("INSERT INTO swarm_peers (torrent_id, host, port, found) "
                       "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                       [(row[0], host, port, row[2]) for row in rows for host, port in row[-1]])


async def _sample_writer(db: sqlite3.Connection, receive: trio.MemoryReceiveChannel,
                         write: Callable[[sqlite3.Connection, list[Any]], None],
                         batch: int) -> None:
    """The one task that writes a stage's samples: a transaction per batch or per second."""
    rows: list[Any] = []
    last_commit = trio.current_time()
    try:
        async for row in receive:
            rows.append(row)
            if len(rows) >= batch or trio.current_time() - last_commit > 1:
                write(db, rows)
                rows.clear()
                last_commit = trio.current_time()
    finally:
        # On Ctrl-C or SIGTERM too: every measurement that finished is kept, queued or not.
        rows.extend(waiting_in(receive))
        receive.close()
        if rows:
            write(db, rows)


def peers_to_keep(peers: Iterable[tuple[str, int]], infohash: bytes) -> list[tuple[str, int]]:
    """What the DHT stage keeps of a lookup's peers for the probe: at most PROBE_MAX_PEERS,
    chosen at random (a big swarm's thousands would only fill the database)."""
    chosen = sorted(peers)
    if len(chosen) > PROBE_MAX_PEERS:
        chosen = random.Random(infohash).sample(chosen, PROBE_MAX_PEERS)
    return chosen


def probe_options(settings: Settings, concurrency: int | None = None,
                  rate: float | None = None) -> ProbeOptions:
    probe = settings.probe
    return ProbeOptions(connect_timeout=probe.connect_timeout,
                        answer_timeout=probe.answer_timeout, have_window=probe.have_window,
                        concurrency=concurrency or probe.concurrency,
                        peers_per_torrent=probe.peers_per_torrent,
                        rate=probe.rate if rate is None else rate,
                        allow_private=settings.network.allow_private,
                        connections=probe.connections_per_run)


def dht_options(settings: Settings, concurrency: int | None = None,
                rate: float | None = None) -> DhtOptions:
    dht = settings.dht
    return DhtOptions(concurrency=concurrency or dht.concurrency,
                      rate=dht.rate if rate is None else rate, per_ip_rate=dht.per_ip_rate,
                      per_ip_burst=dht.per_ip_burst, stall_timeout=dht.stall_timeout,
                      query_timeout=dht.query_timeout, max_queries=dht.max_queries,
                      bep33=dht.bep33, allow_private=settings.network.allow_private)


async def run_dht(db: sqlite3.Connection, settings: Settings,
                  collections: Sequence[CollectionSettings], reporter: Reporter, *,
                  infohashes: Sequence[str] = (), stale_after: float | None = None,
                  options: DhtOptions | None = None, bootstrap: Sequence[str] | None = None,
                  bind: str | None = None, run_id: int | None = None) -> DhtCounters:
    """Look every selected torrent up in the DHT and store one sample per torrent."""
    options = options or dht_options(settings)
    now = time.time()
    plan = load_dht_plan(db, collections, infohashes, stale_after, int(now))
    cache = load_node_cache(db, now)
    routers = await resolve_bootstrap(settings.dht.bootstrap if bootstrap is None else bootstrap,
                                      reporter)
    if not routers and len(cache) < DHT_K and plan:
        raise NetworkDownError("dht: no bootstrap node resolved and the node cache is empty; "
                               "check [dht].bootstrap or the network")
    survey = DhtSurvey.open(bind or settings.dht.bind, cache, routers, options)
    endpoint, counters = survey.endpoint, survey.counters
    send, receive = trio.open_memory_channel[tuple](2 * options.concurrency)
    started = trio.current_time()
    with reporter.progress() as progress:
        task = progress.add_task("dht", total=len(plan))

        work = iter(plan)

        async def lookup_worker(send: trio.MemorySendChannel) -> None:
            # `concurrency` workers share one iterator: a task per lookup would cost memory
            # for every torrent of a big collection up front.
            async with send:
                for torrent_id, infohash in work:
                    result = await survey.lookup(infohash)
                    seeds, peers, implausible = result.bep33()
                    counters.implausible_filters += implausible
                    counters.lookups += 1
                    counters.peers += len(result.peers)
                    counters.lookups_with_peers += bool(result.peers)
                    if result.nodes_answered:  # nobody answered: nothing was measured
                        await send.send((torrent_id, run_id, int(time.time()), len(result.peers),
                                         seeds, peers, result.nodes_answered,
                                         peers_to_keep(result.peers, infohash)))
                    else:
                        counters.lookups_unanswered += 1
                    elapsed = max(trio.current_time() - started, 1e-9)
                    progress.update(task, advance=1, description=(
                        f"dht {counters.peers:,} peers, "
                        f"{endpoint.counters.sent / elapsed:,.0f} pkt/s"))

        lookups_scope = trio.CancelScope()
        udp = endpoint.counters

        def heard() -> int:
            return counters.replies + counters.krpc_errors

        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(survey.serve)
                nursery.start_soon(watch_for_outage, lambda: udp.sent + udp.send_errors, heard,
                                   settings.network.outage_after, lookups_scope)
                async with trio.open_nursery() as writing:
                    writing.start_soon(_sample_writer, db, receive, _write_dht_samples,
                                       DHT_WRITE_BATCH)
                    # The writer ends when the last clone of `send` closes with its lookup.
                    with lookups_scope:
                        async with send, trio.open_nursery() as lookups:
                            for _ in range(min(options.concurrency, len(plan))):
                                lookups.start_soon(lookup_worker, send.clone())
                nursery.cancel_scope.cancel()  # stop receiving
            if lookups_scope.cancelled_caught:
                counters.outage = outage_message("DHT node", heard(),
                                                 settings.network.outage_after)
            elif counters.lookups and not heard():  # (a network with no route fails sends)
                counters.outage = "no DHT node answered: network down?"
        finally:
            counters.seconds = trio.current_time() - started
            endpoint.close()
            # Nodes that fell silent while the network was down are not to blame.
            save_node_cache(db, cache, time.time(),
                            heard_anything=counters.replies > 0 and counters.outage is None)
            counters.nodes_cached = len(cache)
            counters.ipv6_nodes_cached = cache.size(ipv6=True)
            counters.stall_after = survey.round_trips.stall_after
            counters.packets_sent, counters.packets_received = udp.sent, udp.received
            counters.send_errors = udp.send_errors
            counters.dropped_replies = udp.dropped_unmatched
            counters.malformed_packets = udp.dropped_invalid
    return counters


# ---- Probe stage ----

PROBE_PEER_FRESHNESS: Final = 3 * 86400  # DHT peers found longer ago are not asked
PROBE_WRITE_BATCH: Final = 200  # samples per transaction
# Peers and web seeds tried with not one reached: the network is down, not every swarm dead.
PROBE_OUTAGE_AFTER: Final = 20


@dataclass(slots=True)
class ProbeRunCounts:
    torrents: int = 0  # probed
    torrents_left: int = 0  # for a later run: [probe].connections_per_run was spent
    torrents_unreached: int = 0  # no peer told what it holds, no web seed served: no sample
    downloadable: int = 0  # a verified seed, a working web seed or availability >= 1
    peers_tried: int = 0
    peers_reachable: int = 0
    peers_answering: int = 0
    verified_seeds: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)  # ProbeOutcome value -> peers
    metadata_wanted: int = 0  # torrents with no piece count (magnets, infohashes)
    metadata_fetched: int = 0  # BEP 9 info dictionaries received, checked and stored
    metadata_unreadable: int = 0  # hashed right, but not an info dictionary tsmd reads
    webseeds_tried: int = 0
    webseeds_ok: int = 0
    seconds: float = 0.0
    outage: str | None = None  # why the stage stopped early: no peer nor web seed answered

    def summary(self) -> str:
        outcomes = ", ".join(f"{count:,} {outcome}" for outcome, count in
                             sorted(self.outcomes.items(), key=lambda item: -item[1]))
        unreached = (f", {self.torrents_unreached:,} with no peer nor web seed telling"
                     if self.torrents_unreached else "")
        parts = [f"{_plural(self.torrents, 'torrent')} probed ({self.downloadable:,} "
                 f"downloadable{unreached})"
                 + (f", {self.torrents_left:,} left for the next runs ([probe]."
                    "connections_per_run spent)" if self.torrents_left else ""),
                 f"peers: {self.peers_tried:,} tried, {self.peers_reachable:,} reachable, "
                 f"{self.peers_answering:,} answered, {self.verified_seeds:,} verified seeds"
                 + (f" ({outcomes})" if outcomes else "")]
        if self.metadata_wanted:
            parts.append(f"metadata fetched for {self.metadata_fetched:,} of "
                         f"{self.metadata_wanted:,} torrents without it"
                         + (f" ({self.metadata_unreadable:,} unreadable)"
                            if self.metadata_unreadable else ""))
        if self.webseeds_tried:
            parts.append(f"web seeds: {self.webseeds_ok:,} of {self.webseeds_tried:,} served "
                         "the data")
        return "; ".join(parts) + f"; {self.seconds:.1f} s"


@dataclass(slots=True)
class ProbeTarget:
    torrent_id: int
    infohash: bytes
    piece_count: int | None
    wants_metadata: bool  # no piece count and not a v2-only torrent: BEP 9 would give it
    web_seed_piece: WebSeedPiece | None  # None: nothing to ask web seeds for


def load_probe_plan(db: sqlite3.Connection, collections: Sequence[CollectionSettings],
                    infohashes: Sequence[str], stale_after: float | None,
                    now: int) -> list[ProbeTarget]:
    """Torrents to probe: those with peers the DHT stage found lately, or with web seeds;
    never probed first, then the longest ago (answered or not: a torrent whose peers never
    answer must not come first in every run). Their peers are read as each is probed."""
    names = [c.name for c in collections]
    query = (
        "SELECT t.id, t.infohash, t.infohash_v2, t.has_metainfo, t.name, t.piece_count, "
        "t.piece_length, t.size_bytes, t.first_piece_sha1, t.first_file_length, "
        "t.first_file_path, t.probe_attempted FROM torrents t WHERE EXISTS ("
        "SELECT 1 FROM memberships m JOIN collections c ON c.id = m.collection_id "
        "WHERE m.torrent_id = t.id AND m.removed IS NULL "
        f"AND c.name IN ({', '.join('?' * len(names))})) AND (EXISTS ("
        "SELECT 1 FROM swarm_peers s WHERE s.torrent_id = t.id AND s.found >= ?) "
        "OR EXISTS (SELECT 1 FROM web_seeds w WHERE w.torrent_id = t.id))")
    params: list[Any] = [*names, now - PROBE_PEER_FRESHNESS]
    if infohashes:
        query += f" AND t.infohash IN ({', '.join('?' * len(infohashes))})"
        params.extend(infohashes)
    rows = db.execute(query, params).fetchall()
    if stale_after is not None:
        rows = [row for row in rows if row[-1] is None or row[-1] <= now - stale_after]
    rows.sort(key=lambda row: (row[-1] is not None, row[-1] or 0, row[0]))
    plan = []
    for (torrent_id, infohash, infohash_v2, has_metainfo, name, piece_count, piece_length,
         size, first_sha1, first_length, first_path, _) in rows:
        # A v2-only torrent's pieces follow each file: its metadata gives no count to read
        # a bitfield by (its infohash is its v2 hash, truncated).
        v2_only = bool(has_metainfo) and infohash_v2 is not None \
            and infohash_v2[:SHA1_HEX_LEN] == infohash
        piece = None
        if first_sha1 and first_length and piece_length and size and size > 0:
            with contextlib.suppress(ValueError, TypeError):
                path = None if first_path is None else tuple(
                    str(part) for part in json.loads(first_path))
                piece = WebSeedPiece(bytes.fromhex(infohash), name or "", path, first_length,
                                     min(piece_length, size), bytes(first_sha1))
        plan.append(ProbeTarget(torrent_id, bytes.fromhex(infohash), piece_count,
                                piece_count is None and not v2_only, piece))
    return plan


def load_probe_peers(db: sqlite3.Connection, torrent_id: int, since: int
                     ) -> list[tuple[str, int]]:
    return db.execute("SELECT host, port FROM swarm_peers WHERE torrent_id = ? AND found >= ?",
                      (torrent_id, since)).fetchall()


def store_fetched_metadata(db: sqlite3.Connection, torrent_id: int, meta: Metainfo,
                           now: int) -> None:
    """What a fetched info dictionary tells, stored as sync stores a .torrent's; the trackers
    and web seeds stay as the listing gave them (they are not in `info`)."""
    db.execute(
        "UPDATE torrents SET infohash_v2 = coalesce(?, infohash_v2), name = coalesce(?, name), "
        "size_bytes = ?, file_count = ?, piece_length = ?, piece_count = ?, "
        "first_piece_sha1 = ?, first_file_length = ?, first_file_path = ?, has_metainfo = 1, "
        "updated = ? WHERE id = ?",
        (meta.infohash_v2, meta.name, meta.size_bytes, meta.file_count, meta.piece_length,
         meta.piece_count, meta.first_piece_sha1, meta.first_file_length,
         None if meta.first_file_path is None else json.dumps(meta.first_file_path), now,
         torrent_id))


@dataclass(slots=True)
class ProbeSample:
    """One torrent probed: its sample's numbers, unless nothing answered (`measured` False:
    only the attempt is recorded), and the metadata fetched, to be stored."""

    torrent_id: int
    run_id: int | None
    attempted: int
    measured: bool
    tried: int = 0
    reachable: int = 0
    answering: int = 0
    verified_seeds: int = 0
    availability: float | None = None
    skipped: int = 0
    webseeds_answered: int = 0
    webseeds_ok: int = 0
    metadata: Metainfo | None = None


def probe_verdict(verified_seeds: int, availability: float | None, webseeds_ok: int,
                  skipped: int) -> int:
    """Whether a complete copy can be downloaded, by what the probe saw: 1 when it saw one (a
    verified seed, a web seed serving the data, or peers holding every piece between them);
    0 when peers told what they hold, with a piece count to read it by, and had none, and no
    peer was skipped; -1 when it cannot say (nobody told, no piece count, or peers that might
    have held a copy were not asked)."""
    if verified_seeds > 0 or webseeds_ok > 0 or (availability or 0.0) >= 1.0:
        return 1
    return 0 if availability is not None and not skipped else -1


def _write_probe_samples(db: sqlite3.Connection, samples: list[ProbeSample]) -> None:
    with Transaction(db):
        for sample in samples:
            if sample.metadata is not None:
                store_fetched_metadata(db, sample.torrent_id, sample.metadata, sample.attempted)
        db.executemany("UPDATE torrents SET probe_attempted = ? WHERE id = ?",
                       [(x.attempted, x.torrent_id) for x in samples])
        db.executemany(
            "INSERT INTO probe_samples (torrent_id, run_id, measured, tried, reachable, "
            "answering, verified_seeds, availability, skipped, webseeds_answered, webseeds_ok) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(x.torrent_id, x.run_id, x.attempted, x.tried, x.reachable, x.answering,
              x.verified_seeds, x.availability, x.skipped, x.webseeds_answered, x.webseeds_ok)
             for x in samples if x.measured])


async def run_probe(db: sqlite3.Connection, settings: Settings,
                    collections: Sequence[CollectionSettings], reporter: Reporter, *,
                    infohashes: Sequence[str] = (), stale_after: float | None = None,
                    options: ProbeOptions | None = None,
                    run_id: int | None = None) -> ProbeRunCounts:
    """Ask the peers the DHT stage found what they hold, fetch the metadata of torrents that
    have none, check their web seeds, and store one sample per torrent."""
    options = options or probe_options(settings)
    now = int(time.time())
    with Transaction(db):  # peers found longer ago are never asked: not kept either
        db.execute("DELETE FROM swarm_peers WHERE found < ?", (now - PROBE_PEER_FRESHNESS,))
    plan = load_probe_plan(db, collections, infohashes, stale_after, now)
    if infohashes:
        missing = set(infohashes) - {target.infohash.hex() for target in plan}
        if missing:
            raise ConfigError(f"infohash {sorted(missing)[0]} has no peers found lately nor "
                              "web seeds in the selected collections (run tsmd dht first)")
    counts = ProbeRunCounts()
    prober = PeerProber(options)
    fetcher = make_fetcher(settings)
    outcomes: Counter[ProbeOutcome] = Counter()
    send, receive = trio.open_memory_channel[ProbeSample](PROBE_WRITE_BATCH)
    started = trio.current_time()
    work = iter(plan)
    webseeds_answered = 0  # for the outage watch: any web server's answer
    with reporter.progress() as progress:
        task = progress.add_task("probe", total=len(plan))

        async def probe_worker(send: trio.MemorySendChannel) -> None:
            async with send:
                for target in work:
                    if prober.budget_left <= 0:  # the rest waits for the next runs
                        counts.torrents_left += 1
                    else:
                        await send.send(await probe_target(target))
                    progress.update(task, advance=1, description=(
                        f"probe {counts.peers_answering:,} peers answered, "
                        f"{counts.verified_seeds:,} seeds"))

        async def probe_target(target: ProbeTarget) -> ProbeSample:
            nonlocal webseeds_answered
            peers = load_probe_peers(db, target.torrent_id, now - PROBE_PEER_FRESHNESS)
            swarm = await prober.probe(target.infohash, peers, target.piece_count,
                                       want_metadata=target.wants_metadata)
            if target.wants_metadata:
                counts.metadata_wanted += 1
                counts.metadata_fetched += swarm.metainfo is not None
                if swarm.metadata is not None and swarm.metainfo is None:
                    counts.metadata_unreadable += 1
                    reporter.problem(f"probe: {target.infohash.hex()}: its metadata hashes "
                                     "right but is not an info dictionary tsmd reads")
            answered = served = 0
            piece = target.web_seed_piece
            if piece is not None:
                for url, kind in db.execute("SELECT url, kind FROM web_seeds WHERE "
                                            "torrent_id = ? ORDER BY url LIMIT ?",
                                            (target.torrent_id, MAX_WEB_SEEDS_CHECKED)
                                            ).fetchall():
                    check = await check_web_seed(fetcher, WebSeed(url, kind), piece)
                    counts.webseeds_tried += 1
                    answered += check.answered
                    served += check.served
            webseeds_answered += answered
            counts.torrents += 1
            counts.peers_tried += swarm.tried
            counts.peers_reachable += swarm.reachable
            counts.peers_answering += swarm.answering
            counts.verified_seeds += swarm.verified_seeds
            counts.webseeds_ok += served
            counts.downloadable += probe_verdict(swarm.verified_seeds, swarm.availability,
                                                 served, swarm.skipped) == 1
            outcomes.update(swarm.outcomes)
            # Only what told something is a measurement: a run where peers connected and
            # said nothing must not replace what an earlier run learnt.
            sample = ProbeSample(target.torrent_id, run_id, int(time.time()),
                                 measured=bool(swarm.answering or served),
                                 metadata=swarm.metainfo)
            if not sample.measured:
                counts.torrents_unreached += 1
                return sample
            sample.tried, sample.reachable, sample.answering = (swarm.tried, swarm.reachable,
                                                                swarm.answering)
            sample.verified_seeds, sample.availability = swarm.verified_seeds, swarm.availability
            sample.skipped = swarm.skipped
            sample.webseeds_answered, sample.webseeds_ok = answered, served
            return sample

        def tried() -> int:
            return counts.peers_tried + counts.webseeds_tried

        def heard() -> int:  # a refused connection is an answer too: the network works
            return (counts.peers_reachable + outcomes[ProbeOutcome.REFUSED]
                    + webseeds_answered)

        probing_scope = trio.CancelScope()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_for_outage, tried, heard,
                                   settings.network.outage_after, probing_scope)
                async with trio.open_nursery() as writing:
                    writing.start_soon(_sample_writer, db, receive, _write_probe_samples,
                                       PROBE_WRITE_BATCH)
                    with probing_scope:
                        async with send, trio.open_nursery() as probing:
                            # Enough torrents at once to keep `concurrency` connections busy.
                            for _ in range(min(len(plan), max(1, options.concurrency))):
                                probing.start_soon(probe_worker, send.clone())
                nursery.cancel_scope.cancel()  # stop watching
        finally:
            counts.seconds = trio.current_time() - started
            counts.outcomes = {outcome.value: count for outcome, count in outcomes.items()}
            with trio.CancelScope(shield=True):
                await fetcher.aclose()
    if probing_scope.cancelled_caught:
        counts.outage = outage_message("peer nor web seed", heard(),
                                       settings.network.outage_after)
    elif tried() >= PROBE_OUTAGE_AFTER and not heard():
        counts.outage = (f"none of {counts.peers_tried:,} peers nor {counts.webseeds_tried:,} "
                         "web seeds answered: network down?")
    return counts


# ---- Scrape stage ----

SCRAPE_WRITE_BATCH: Final = 5000  # samples per transaction
SCRAPE_CHANNEL_SIZE: Final = 64  # replies waiting for the writer before trackers wait too


@dataclass(slots=True)
class ScrapeRunCounts:
    torrents: int = 0
    torrents_answered: int = 0  # by a tracker whose numbers are trusted
    trackers: int = 0
    trackers_ok: int = 0
    trackers_failed: int = 0
    trackers_skipped: int = 0  # backing off after failing runs
    trackers_excluded: int = 0  # [scrape].exclude: never asked
    trackers_fabricating: int = 0  # answered a canary with peers: numbers stored, not used
    full_scrapes: int = 0
    hashes_answered: int = 0
    canaries: int = 0  # canaries answered, by all trackers
    requests: int = 0
    retries: int = 0
    truncations: int = 0
    packets_sent: int = 0
    packets_received: int = 0
    dropped: int = 0  # late, unexpected or from the wrong address
    malformed: int = 0  # too short to be BEP 15: refused before anything read them
    bad_entries: int = 0  # HTTP and WebSocket scrape entries not read (the rest counted)
    seconds: float = 0.0  # the network phase: first request to last answer
    outage: str | None = None  # why the stage stopped early: no tracker answered

    def summary(self) -> str:
        rate = f", {self.hashes_answered / self.seconds:,.0f} hashes/s" if self.seconds else ""
        return (f"{self.torrents} torrents ({self.torrents_answered} answered), {self.trackers} "
                f"trackers: {self.trackers_ok} ok, {self.trackers_failed} failed, "
                f"{self.trackers_skipped} backing off"
                + (f", {self.trackers_excluded} excluded" if self.trackers_excluded else "")
                + (f", {self.trackers_fabricating} fabricating (their numbers are not used)"
                   if self.trackers_fabricating else "")
                + f"; {self.hashes_answered} hashes answered, "
                f"{self.requests} requests, {self.retries} retries, {self.truncations} truncated "
                f"replies" + (f", {self.full_scrapes} full scrapes" if self.full_scrapes else "")
                + f"; UDP {self.packets_sent} sent, {self.packets_received} received, "
                f"{self.dropped} dropped, {self.malformed} malformed"
                + (f"; {self.bad_entries} unreadable scrape entries" if self.bad_entries
                   else "") + f"; network phase {self.seconds:.2f} s{rate}")


@dataclass(slots=True)
class ScrapePlan:
    torrent_ids: dict[bytes, int]  # infohash -> torrents.id
    jobs: list[TrackerJob]
    tracker_ids: dict[str, int]
    skipped_trackers: list[str]
    excluded_trackers: list[str]


def _normalised(urls: Iterable[str]) -> set[str]:
    return {url for url in map(normalise_tracker_url, urls) if url}


def load_scrape_plan(db: sqlite3.Connection, settings: Settings,
                     collections: Sequence[CollectionSettings], infohashes: Sequence[str],
                     only_trackers: Sequence[str], stale_after: float | None,
                     now: int) -> ScrapePlan:
    """Which hashes to ask which tracker: every tracker of every selected torrent, grouped,
    less the excluded ones and those backing off (unless named with --tracker)."""
    names = [c.name for c in collections]
    query = (f"SELECT DISTINCT t.id, t.infohash, c.name FROM torrents t "
             f"JOIN memberships m ON m.torrent_id = t.id AND m.removed IS NULL "
             f"JOIN collections c ON c.id = m.collection_id "
             f"WHERE c.name IN ({', '.join('?' * len(names))})")
    params: list[Any] = list(names)
    if infohashes:
        query += f" AND t.infohash IN ({', '.join('?' * len(infohashes))})"
        params.extend(infohashes)
    excluded = _normalised(settings.scrape.exclude)
    if stale_after is not None:
        # Fresh means fresh numbers that count: not a liar's, nor an excluded tracker's.
        query += (" AND NOT EXISTS (SELECT 1 FROM tracker_samples s WHERE s.torrent_id = t.id "
                  "AND s.measured > ? AND s.trusted AND s.tracker_id NOT IN (SELECT id FROM "
                  f"trackers WHERE url IN ({', '.join('?' * len(excluded))})))")
        params.extend([now - stale_after, *sorted(excluded)])
    collection_trackers = {c.name: [normalise_tracker_url(u) for u in c.trackers]
                           for c in collections}
    global_trackers = [normalise_tracker_url(u) for u in settings.scrape.trackers]
    explicit = [url for url in (normalise_tracker_url(u) for u in only_trackers) if url]
    trackers_of: dict[int, list[str]] = {}
    torrent_ids: dict[bytes, int] = {}
    for torrent_id, infohash, collection in db.execute(query, params):
        torrent_ids[bytes.fromhex(infohash)] = torrent_id
        urls = trackers_of.setdefault(torrent_id, [])
        urls.extend(explicit or [u for u in (*collection_trackers[collection], *global_trackers)
                                 if u])
    if infohashes:
        missing = set(infohashes) - {h.hex() for h in torrent_ids}
        if missing and stale_after is None:
            raise ConfigError(f"infohash {sorted(missing)[0]} is not listed by the selected "
                              "collections (sync it first)")
    named_by_torrents: set[str] = set()  # trackers that a torrent's own metainfo names
    if settings.scrape.use_torrent_trackers and not explicit:
        for torrent_id, url in db.execute(
                "SELECT tt.torrent_id, tr.url FROM torrent_trackers tt "
                "JOIN trackers tr ON tr.id = tt.tracker_id ORDER BY tt.torrent_id, tt.position"):
            urls = trackers_of.get(torrent_id)
            if urls is not None:
                urls.append(url)
                named_by_torrents.add(url)
    excluded -= set(explicit)
    hashes_by_tracker: dict[str, list[bytes]] = {}
    hash_of = {torrent_id: infohash for infohash, torrent_id in torrent_ids.items()}
    for torrent_id, urls in trackers_of.items():
        for url in dict.fromkeys(urls):
            hashes_by_tracker.setdefault(url, []).append(hash_of[torrent_id])
    excluded_trackers = sorted(url for url in hashes_by_tracker if url in excluded)
    for url in excluded_trackers:
        del hashes_by_tracker[url]
    with Transaction(db):
        db.executemany("INSERT INTO trackers (url) VALUES (?) ON CONFLICT(url) DO NOTHING",
                       [(url,) for url in hashes_by_tracker])
    trusted = _normalised(settings.scrape.trusted)
    configured_full = _normalised(settings.scrape.full_scrape)
    tracker_ids: dict[str, int] = {}
    skipped: list[str] = []
    jobs: list[TrackerJob] = []
    for url, tracker_id, next_attempt, full_scrape in db.execute(
            "SELECT url, id, next_attempt, full_scrape FROM trackers"):
        hashes = hashes_by_tracker.get(url)
        if hashes is None:
            continue
        tracker_ids[url] = tracker_id
        if next_attempt is not None and next_attempt > now and url not in explicit:
            skipped.append(url)
            continue
        full: bool | None = False
        if urllib.parse.urlsplit(url).scheme in HTTP_SCHEMES:
            if url in configured_full or full_scrape == 1:
                full = True
            elif url in named_by_torrents and full_scrape is None:
                full = None  # a tracker the torrents name, yet answering none: try it once
        jobs.append(TrackerJob(url, hashes, canaries=url not in trusted, full_scrape=full))
    return ScrapePlan(torrent_ids, jobs, tracker_ids, skipped, excluded_trackers)


@dataclass(frozen=True, slots=True)
class ScrapeAnswers:
    """One reply's answers from one tracker, on their way to the writer."""

    tracker_id: int
    pairs: list[tuple[bytes, ScrapeCounts]]
    fabricating: bool  # the tracker has answered a canary with peers in this run


class ScrapeWriter:
    """The one task that writes a scrape run's samples, SCRAPE_WRITE_BATCH per transaction.

    A tracker found fabricating has its samples of the run, those written already included,
    stored as untrusted: they stay as evidence and are never a torrent's numbers."""

    def __init__(self, db: sqlite3.Connection, torrent_ids: dict[bytes, int],
                 run_id: int | None, started: int) -> None:
        self.db = db
        self.torrent_ids = torrent_ids
        self.run_id = run_id
        self.started = started  # every sample of the run is measured at or after this
        self.rows: list[tuple] = []
        self.answered: set[int] = set()  # torrents answered by a tracker not distrusted
        self.distrusted: set[int] = set()
        self.broken = False  # a write failed: the rest is kept, not tried again at once

    async def consume(self, answers: trio.MemoryReceiveChannel, progress: Any, task: Any) -> None:
        try:
            async for item in answers:
                self.add(item)
                progress.update(task, advance=len(item.pairs))
        finally:
            # Also on Ctrl-C: what trackers handed over is measured, and a verdict waiting
            # here must still reach the samples it judges.
            for item in waiting_in(answers):
                self.add(item)

    def add(self, answers: ScrapeAnswers) -> None:
        if answers.fabricating and answers.tracker_id not in self.distrusted and not self.broken:
            self.flush()
            self._distrust(answers.tracker_id)
        trusted = answers.tracker_id not in self.distrusted
        measured = int(time.time())
        for infohash, numbers in answers.pairs:
            torrent_id = self.torrent_ids[infohash]
            if trusted:
                self.answered.add(torrent_id)
            self.rows.append((torrent_id, answers.tracker_id, self.run_id, measured,
                              numbers.seeders, numbers.leechers, numbers.completed, trusted))
        if len(self.rows) >= SCRAPE_WRITE_BATCH and not self.broken:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        self.broken = True  # until the transaction commits
        with Transaction(self.db):
            self.db.executemany(
                "INSERT INTO tracker_samples (torrent_id, tracker_id, run_id, measured, "
                "seeders, leechers, completed, trusted) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                self.rows)
        self.rows.clear()
        self.broken = False

    def _this_run(self) -> tuple[str, tuple]:
        """SQL that picks this run's samples: by run id, through its index (a clock stepped
        back meanwhile cannot hide one); by time for a scrape recorded as no run."""
        if self.run_id is not None:
            return "run_id = ?", (self.run_id,)
        return "measured >= ?", (self.started,)

    def _distrust(self, tracker_id: int) -> None:
        run, params = self._this_run()
        with Transaction(self.db):
            # The newest numbers are this run's where they came from one of its samples.
            self.db.execute(
                "UPDATE tracker_latest SET trusted = 0 WHERE tracker_id = ? AND "
                "(torrent_id, measured) IN (SELECT torrent_id, measured FROM tracker_samples "
                f"WHERE {run} AND tracker_id = ?)", (tracker_id, *params, tracker_id))
            self.db.execute(f"UPDATE tracker_samples SET trusted = 0 WHERE {run} AND "
                            "tracker_id = ?", (*params, tracker_id))
        self.distrusted.add(tracker_id)

    def torrents_answered(self) -> int:
        if not self.distrusted:
            return len(self.answered)
        # A torrent one of them answered early may have had no other answer: ask the samples.
        run, params = self._this_run()
        return self.db.execute("SELECT count(DISTINCT torrent_id) FROM tracker_samples "
                               f"WHERE {run} AND trusted", params).fetchone()[0]


def record_tracker_health(db: sqlite3.Connection, settings: Settings, tracker_id: int,
                          tally: TrackerTally, job: TrackerJob | None, now: int) -> None:
    """A tracker that answered nothing this run backs off exponentially; one that answered is
    asked again next run. What its canaries and full scrape showed is kept for the next run."""
    failed = tally.failed and tally.hashes_answered == 0
    consecutive = db.execute("SELECT consecutive_failures FROM trackers WHERE id = ?",
                             (tracker_id,)).fetchone()[0] + 1 if failed else 0
    pause = min(settings.scrape.backoff * 2 ** min(max(0, consecutive - 1), 40),
                settings.scrape.max_backoff)
    db.execute(
        "UPDATE trackers SET successes = successes + ?, failures = failures + ?, "
        "consecutive_failures = ?, last_attempt = ?, "
        "last_success = CASE WHEN ? THEN last_success ELSE ? END, last_error = ?, "
        "rtt_ms = coalesce(?, rtt_ms), hashes_answered = hashes_answered + ?, next_attempt = ? "
        "WHERE id = ?",
        (int(not failed), int(failed), consecutive, now, failed, now, tally.error, tally.rtt_ms,
         tally.hashes_answered, now + int(pause) if failed else None, tracker_id))
    if tally.fabrication is not None:
        db.execute("UPDATE trackers SET fabricating = ?, fabricating_since = "
                   "coalesce(fabricating_since, ?) WHERE id = ?",
                   (tally.fabrication, now, tracker_id))
    elif tally.canaries_answered or tally.canaries_tested or job is not None and not job.canaries:
        # Tested this run and honest (a canary in a reply that was read, answered 0 or left
        # out as opentracker over HTTP does), or trusted by the user: no longer shown as
        # fabricating. One not tested (a batch of one carries no canary) keeps its verdict.
        db.execute("UPDATE trackers SET fabricating = NULL, fabricating_since = NULL "
                   "WHERE id = ?", (tracker_id,))
    if tally.full_scrape:
        # A full scrape that served these torrents is asked for alone from now on. One that
        # served none is not tried again on a hunch; one learnt before that now fails is
        # forgotten, and per-hash scrapes decide again.
        learnt = 1 if tally.hashes_answered else (None if job and job.full_scrape else 0)
        db.execute("UPDATE trackers SET full_scrape = ? WHERE id = ?", (learnt, tracker_id))


async def run_scrape(db: sqlite3.Connection, settings: Settings,
                     collections: Sequence[CollectionSettings], reporter: Reporter, *,
                     infohashes: Sequence[str] = (), only_trackers: Sequence[str] = (),
                     stale_after: float | None = None, run_id: int | None = None,
                     resolve: Any = None) -> ScrapeRunCounts:
    """Scrape every tracker of every selected torrent; failures are counted, never raised.

    Plan, then measure: one task per tracker sends each reply's answers through a bounded
    channel to the one writer task, which commits them in batches."""
    now = int(time.time())
    plan = load_scrape_plan(db, settings, collections, infohashes, only_trackers, stale_after, now)
    counts = ScrapeRunCounts(torrents=len(plan.torrent_ids), trackers=len(plan.jobs),
                             trackers_skipped=len(plan.skipped_trackers),
                             trackers_excluded=len(plan.excluded_trackers))
    options = ScrapeOptions(
        udp_batch=settings.scrape.batch_size, http_batch=settings.scrape.http_batch_size,
        timeout=settings.scrape.timeout, attempts=settings.scrape.attempts,
        window=settings.scrape.window, allow_private=settings.network.allow_private)
    tallies: list[TrackerTally] = []
    jobs = {job.url: job for job in plan.jobs}
    endpoint = UdpEndpoint.open(settings.scrape.bind, udp_tracker_packet_untrusted)
    fetcher = make_fetcher(settings, resolve)
    limiter = trio.CapacityLimiter(settings.scrape.concurrency)
    writer = ScrapeWriter(db, plan.torrent_ids, run_id, now)
    send, receive = trio.open_memory_channel[ScrapeAnswers](SCRAPE_CHANNEL_SIZE)
    total = sum(len(job.hashes) for job in plan.jobs)
    with reporter.progress() as progress:
        task = progress.add_task("scrape", total=total)

        async def one_tracker(job: TrackerJob) -> None:
            tracker_id = plan.tracker_ids[job.url]

            async def deliver(pairs: list[tuple[bytes, ScrapeCounts]], fabricating: bool) -> None:
                await send.send(ScrapeAnswers(tracker_id, pairs, fabricating))

            async with limiter:
                tally = await scrape_tracker(job, options, endpoint, fetcher, deliver)
            tallies.append(tally)
            progress.update(task, advance=tally.hashes_asked - tally.hashes_answered)

        phase_started = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(endpoint.receive_forever)
                async with trio.open_nursery() as stage:
                    stage.start_soon(writer.consume, receive, progress, task)
                    async with send:
                        async with trio.open_nursery() as trackers:
                            for job in plan.jobs:
                                trackers.start_soon(one_tracker, job)
                nursery.cancel_scope.cancel()
        finally:
            # Also on Ctrl-C or SIGTERM: every sample measured so far, and the health of every
            # tracker that finished, is committed.
            counts.seconds = trio.current_time() - phase_started
            endpoint.close()
            with trio.CancelScope(shield=True):
                await fetcher.aclose()
            writer.flush()
            # Dead trackers are everyday life, and the stage is bounded by attempts x timeout
            # anyway. But when not one datagram, DNS answer, connection or response came back
            # from any of them, the network was down: no tracker is blamed for that.
            udp = endpoint.counters
            if tallies and not udp.received + udp.dns_answers + fetcher.heard:
                counts.outage = "no tracker answered, nor anything else on the network: " \
                                "network down?"
            finished = int(time.time())
            with Transaction(db):
                for tally in tallies if counts.outage is None else ():
                    record_tracker_health(db, settings, plan.tracker_ids[tally.url], tally,
                                          jobs.get(tally.url), finished)
            for tally in tallies:
                failed = tally.failed and tally.hashes_answered == 0
                counts.trackers_failed += failed
                counts.trackers_ok += not failed
                counts.trackers_fabricating += tally.fabrication is not None
                counts.full_scrapes += tally.full_scrape
                counts.hashes_answered += tally.hashes_answered
                counts.canaries += tally.canaries_answered
                counts.requests += tally.requests
                counts.retries += tally.retries
                counts.truncations += tally.truncations
                counts.bad_entries += tally.bad_entries
            counts.torrents_answered = writer.torrents_answered()
            counts.packets_sent = endpoint.counters.sent
            counts.packets_received = endpoint.counters.received
            counts.dropped = endpoint.counters.dropped_unmatched
            counts.malformed = endpoint.counters.dropped_invalid
    # Dead trackers are everyday life on the public internet: said, but not as errors.
    for tally in sorted((t for t in tallies if t.failed), key=lambda t: t.url):
        reporter.info(f"tracker {tally.url!r}: {tally.error}")
    for tally in sorted((t for t in tallies if t.note), key=lambda t: t.url):
        reporter.info(f"tracker {tally.url!r}: {tally.note}")
    for tally in sorted((t for t in tallies if t.fabrication), key=lambda t: t.url):
        reporter.info(f"tracker {tally.url!r} invents numbers, which are not used: "
                      f"{tally.fabrication}")
    return counts


# ---- One torrent now: check ----


async def load_check_target(target: str, settings: Settings) -> Metainfo:
    """A magnet link, an infohash (40 hex or 32 base32), an http(s) URL of a .torrent file or
    a local .torrent path, as metainfo. Untrusted in every case."""
    text = target.strip()
    if not text:
        raise ProtocolError("no TARGET: give a magnet link, an infohash, a .torrent file or "
                            "its URL")
    if text.lower().startswith("magnet:"):
        return decode_magnet_untrusted(text)
    if _HEX40.fullmatch(text) or _BASE32_32.fullmatch(text):
        return Metainfo.bare(parse_infohash_untrusted(text))
    try:
        parts = urllib.parse.urlsplit(text)
        scheme = parts.scheme.lower()
        host = parts.hostname
    except ValueError as exc:
        raise ProtocolError(f"{text[:MAX_URL_IN_MESSAGE]}: not a URL: {exc}") from None
    if scheme in HTTP_SCHEMES:
        if not host:
            raise ProtocolError(f"{text[:MAX_URL_IN_MESSAGE]}: a URL without a host")
        url, allow_local = text, False
    elif scheme and scheme != "file" and len(scheme) > 1:  # "C:" is a Windows drive
        raise ProtocolError(f"{text[:MAX_URL_IN_MESSAGE]}: not a magnet link, infohash, "
                            ".torrent URL or file")
    else:
        path = file_url_to_path(text) if scheme == "file" else Path(text).expanduser()
        if not path.exists():
            raise ProtocolError(f"{text[:MAX_URL_IN_MESSAGE]}: no such file, and not a magnet "
                                "link, infohash or .torrent URL")
        if path.is_dir():
            raise ProtocolError(f"{text[:MAX_URL_IN_MESSAGE]}: a folder, not a .torrent file")
        url, allow_local = path.resolve().as_uri(), True
    fetcher = make_fetcher(settings)
    try:
        result = await fetcher.fetch(url, max_bytes=settings.sync.max_torrent_bytes,
                                     allow_local=allow_local)
    finally:
        await fetcher.aclose()
    return decode_metainfo_untrusted(result.body)


@dataclass(slots=True)
class TrackerCheck:
    url: str
    seeders: int = -1
    leechers: int = -1
    completed: int = -1
    error: str | None = None  # or "did not know the torrent"
    rtt_ms: float | None = None
    # Why its numbers do not count: "excluded" ([scrape].exclude, not asked), or the canary
    # answer that showed it inventing numbers. None: they count.
    distrusted: str | None = None


@dataclass(slots=True)
class CheckResult:
    infohash: str
    name: str | None
    size_bytes: int
    trackers: list[TrackerCheck]
    dht_peers: int = -1  # -1: not asked, or no node answered
    dht_nodes_answered: int = 0
    dht_seeds_estimate: float | None = None
    dht_peers_estimate: float | None = None
    dht_error: str | None = None
    # The DHT's peers asked what they hold (PeerProber); -1: not probed.
    probe_tried: int = -1
    reachable_peers: int = -1
    probe_answering: int = -1
    verified_seeds: int = -1
    availability: float | None = None  # complete copies; None: not probed, or no piece count
    probe_outcomes: dict[str, int] = field(default_factory=dict)
    metadata_fetched: bool = False  # a magnet's info dictionary came from a peer (BEP 9)

    @property
    def trusted_trackers(self) -> list[TrackerCheck]:
        return [t for t in self.trackers if t.distrusted is None]

    @property
    def seeders(self) -> int:
        """The maximum over trusted trackers (never the sum: trackers see overlapping swarms)."""
        return max((t.seeders for t in self.trusted_trackers), default=-1)

    @property
    def leechers(self) -> int:
        best = max(self.trusted_trackers, key=lambda t: (t.seeders, t.leechers), default=None)
        return best.leechers if best else -1

    def as_dict(self) -> dict[str, Any]:
        band = seeder_band(self.seeders).value
        return {"infohash": self.infohash, "name": self.name, "size_bytes": self.size_bytes,
                "seeders": self.seeders, "leechers": self.leechers, "band": band,
                "dht_peers": self.dht_peers, "dht_nodes_answered": self.dht_nodes_answered,
                "dht_seeds_estimate": self.dht_seeds_estimate,
                "dht_peers_estimate": self.dht_peers_estimate, "dht_error": self.dht_error,
                "probe_tried": self.probe_tried, "reachable_peers": self.reachable_peers,
                "probe_answering": self.probe_answering, "verified_seeds": self.verified_seeds,
                "availability": self.availability, "probe_outcomes": self.probe_outcomes,
                "metadata_fetched": self.metadata_fetched,
                "trackers": [dataclasses.asdict(t) for t in self.trackers]}


async def check_torrent(meta: Metainfo, settings: Settings, reporter: Reporter, *,
                        trackers: Sequence[str], bootstrap: Sequence[str] | None,
                        cache: NodeCache, use_dht: bool, use_probe: bool = False,
                        excluded: Iterable[str] = (),
                        full_scrape: Iterable[str] = ()) -> CheckResult:
    """Measure one torrent now: every tracker in `trackers` but the `excluded` ones, and a DHT
    lookup, side by side; asked as a scrape run asks them (canaries, full scrapes). With
    `use_probe`, the peers the lookup found are asked what they hold."""
    excluded, trusted = frozenset(excluded), _normalised(settings.scrape.trusted)
    # Asked for their full scrape: those configured so, and those runs learnt serve only that.
    # Never on a hunch: one hash unknown to a tracker is no sign (a dead torrent is just that).
    full = _normalised(settings.scrape.full_scrape) | set(full_scrape)
    result = CheckResult(meta.infohash, meta.name, -1 if meta.size_bytes is None else
                         meta.size_bytes, [TrackerCheck(url, distrusted="excluded by "
                                                        "[scrape].exclude, not asked"
                                                        if url in excluded else None)
                                           for url in trackers])
    infohash = bytes.fromhex(meta.infohash)
    # Two hashes a request: the torrent's and a canary, as a scrape run asks them.
    options = ScrapeOptions(
        udp_batch=2, http_batch=2, timeout=settings.scrape.timeout,
        attempts=settings.scrape.attempts, window=1, allow_private=settings.network.allow_private)

    async def ask_tracker(check: TrackerCheck, endpoint: UdpEndpoint, fetcher: Fetcher) -> None:
        async def deliver(pairs: list[tuple[bytes, ScrapeCounts]], fabricating: bool) -> None:
            for _, numbers in pairs:
                check.seeders, check.leechers = numbers.seeders, numbers.leechers
                check.completed = numbers.completed

        job = TrackerJob(check.url, [infohash], canaries=check.url not in trusted,
                         full_scrape=check.url in full)
        tally = await scrape_tracker(job, options, endpoint, fetcher, deliver)
        check.error = tally.error or (None if tally.hashes_answered else
                                      "did not know the torrent")
        check.rtt_ms = tally.rtt_ms
        if tally.fabrication:
            check.distrusted = f"invents numbers: {tally.fabrication}"

    async def ask_dht() -> None:
        routers = await resolve_bootstrap(
            settings.dht.bootstrap if bootstrap is None else bootstrap, reporter)
        if not routers and len(cache) < DHT_K:
            result.dht_error = "no bootstrap node resolved and no cached nodes"
            return
        survey = DhtSurvey.open(settings.dht.bind, cache, routers, dht_options(settings))
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(survey.serve)
                found = await survey.lookup(infohash)
                nursery.cancel_scope.cancel()
        finally:
            survey.close()
        if found.nodes_answered:
            result.dht_peers, result.dht_nodes_answered = len(found.peers), found.nodes_answered
            result.dht_seeds_estimate, result.dht_peers_estimate = found.bep33_estimates()
        else:
            result.dht_error = "no DHT node answered"
        if use_probe:
            # A magnet or an infohash: its metadata, from a peer, gives the piece count.
            swarm = await PeerProber(probe_options(settings)).probe(
                infohash, found.peers, meta.piece_count,
                want_metadata=meta.piece_count is None and not meta.has_metainfo)
            if swarm.metainfo is not None:
                result.name = result.name or swarm.metainfo.name
                if result.size_bytes < 0 and swarm.metainfo.size_bytes is not None:
                    result.size_bytes = swarm.metainfo.size_bytes
                result.metadata_fetched = True
            result.probe_tried, result.reachable_peers = swarm.tried, swarm.reachable
            result.probe_answering, result.verified_seeds = swarm.answering, swarm.verified_seeds
            result.availability = swarm.availability
            result.probe_outcomes = {outcome.value: count
                                     for outcome, count in swarm.outcomes.items()}

    tracker_endpoint = UdpEndpoint.open(settings.scrape.bind, udp_tracker_packet_untrusted)
    fetcher = make_fetcher(settings)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tracker_endpoint.receive_forever)
            async with trio.open_nursery() as asking:
                if use_dht:
                    asking.start_soon(ask_dht)
                for check in result.trackers:
                    if check.distrusted is None:
                        asking.start_soon(ask_tracker, check, tracker_endpoint, fetcher)
            nursery.cancel_scope.cancel()
    finally:
        tracker_endpoint.close()
        with trio.CancelScope(shield=True):
            await fetcher.aclose()
    return result


# ---- Reports ----


@dataclass(slots=True)  # not frozen: a frozen __init__ costs a third of building 100,000 rows
class ReportRow:
    """One torrent as every report format sees it; -1 stands for "not measured yet"."""

    infohash: str
    name: str  # contains a digit, as libgen-seedtools requires
    torrent_name: str | None
    link: str
    magnet: str
    collection: str
    type: str
    size_bytes: int
    file_count: int
    created_unix: int
    seeders: int
    leechers: int
    completed: int
    scraped_date: int
    tracker: str | None  # the tracker that gave seeders, leechers and scraped_date
    trackers_answered: int  # trusted trackers with fresh numbers of it: 1 is a lone witness
    dht_peers: int
    dht_scraped: int
    dht_seeds_estimate: int
    dht_peers_estimate: int
    # The probe's newest fresh sample (PROBE_SAMPLE_FRESHNESS); -1 when not probed lately.
    verified_seeds: int = -1  # peers that hold every piece (a complete bitfield, or have_all)
    availability: float = -1  # complete copies among the peers that told ("distributed copies")
    webseeds_ok: int = -1  # web seeds that served piece 0
    reachable_peers: int = -1
    probed: int = -1  # when
    downloadable: int = -1  # probe_verdict: 1 a complete copy seen, 0 peers told and none held one
    band: str = "grey"  # red < 4 seeders, yellow 4-10, green > 10, grey unknown
    need: float | None = None  # lower needs seeders more; None when not measured
    seeders_change_previous: int | None = None  # against the previous scrape run
    seeders_change_1d: int | None = None  # against the last run at least ~a day earlier
    seeders_change_7d: int | None = None


class Band(enum.Enum):
    """Public health pages' bands (shared/FORMATS.md): fewer than 4 seeders red."""

    RED = "red"
    YELLOW = "yellow"
    GREEN = "green"
    GREY = "grey"  # not measured


def seeder_band(seeders: int) -> Band:
    return Band(seeder_band_value(seeders))


def seeder_band_value(seeders: int) -> str:
    """seeder_band(seeders).value, without the enum's lookups: a report needs 100,000."""
    if seeders < 0:
        return "grey"
    return "red" if seeders < 4 else "yellow" if seeders <= 10 else "green"


def need_score(seeders: int, leechers: int, size: int, mean_size: float) -> float | None:
    """(seeders + 0.1 x leechers) x (mean size / size): few seeders and a big torrent need help
    most. None for a torrent no tracker has answered for."""
    if seeders < 0:
        return None
    # Four decimals: a score, not a measurement (0.1 x 3 leechers is 0.30000000000000004).
    return round((seeders + 0.1 * max(leechers, 0)) * (mean_size / size if size > 0 else 1.0), 4)


HEALTH_FIELDS: Final = ("band", "need", "seeders_change_previous", "seeders_change_1d",
                        "seeders_change_7d")


def mean_size(sizes: Iterable[int | None]) -> float:
    known = [size for size in sizes if size is not None and size > 0]
    return sum(known) / len(known) if known else 1.0


def health_fields(seeders: int, leechers: int, size: int, mean: float,
                  changes: Sequence[int | None]) -> tuple[Any, ...]:
    """The values of HEALTH_FIELDS for one torrent; `changes` as seeder_changes gives them."""
    return seeder_band_value(seeders), need_score(seeders, leechers, size, mean), *changes


UNMEASURED_HEALTH: Final = ("grey", None, None, None, None)  # health_fields for seeders -1


def add_health(rows: list[ReportRow], history: dict[str, list[tuple[int, int]]]) -> list[ReportRow]:
    """Health for rows built by hand (`history` by infohash); load_report_rows does it inline."""
    mean = mean_size(row.size_bytes for row in rows)
    return [dataclasses.replace(row, **dict(zip(HEALTH_FIELDS, health_fields(
        row.seeders, row.leechers, row.size_bytes, mean,
        seeder_changes(history.get(row.infohash, ()))))))
        for row in rows]


# Where a torrent stands in the plan, the first key of the `need` order: downloadable red, then
# yellow, then green; then the unverified (trackers count seeders, but the peers that told the
# probe what they hold had no complete copy between them, nor did a web seed serve it: a
# volunteer sent there may wait for ever); then the dead (measured, and no seeder anywhere:
# nothing can be downloaded, so they are lost unless someone who has them comes back, and no
# volunteer can help by being sent there); then those not measured yet.
PLAN_RED, PLAN_YELLOW, PLAN_GREEN, PLAN_UNVERIFIED, PLAN_DEAD, PLAN_UNMEASURED = range(6)
_PLAN_OF_BAND: Final = {"red": PLAN_RED, "yellow": PLAN_YELLOW, "green": PLAN_GREEN}


def plan_group(row: ReportRow) -> int:
    if row.seeders < 0:
        return PLAN_UNMEASURED
    if is_dead(row):
        return PLAN_DEAD
    if row.downloadable == 0:
        return PLAN_UNVERIFIED
    return _PLAN_OF_BAND.get(row.band, PLAN_UNMEASURED)


# Each order is by its key, then by name; unknown values (-1, None) come last: needs and
# counts are finite, so infinity stands for "not measured". `need` is by plan_group first:
# within a band, the lowest score (Anna's Archive's: few seeders on many bytes) first.
REPORT_SORTS: Final = {
    "need": lambda row: math.inf if row.need is None else row.need,
    "seeders": lambda row: math.inf if row.seeders < 0 else row.seeders,
    "size": lambda row: -row.size_bytes,
    "name": None,
    "age": lambda row: math.inf if row.created_unix < 0 else row.created_unix,
}


_row_name = operator.attrgetter("name")


def select_report_rows(rows: Sequence[ReportRow], sort: str, limit: int | None,
                       max_seeders: int | None) -> list[ReportRow]:
    chosen = [row for row in rows if max_seeders is None or 0 <= row.seeders <= max_seeders]
    # Two stable sorts, the tie-break first: keys of one type sort several times faster than
    # tuples of them (100,000 rows: 0.04 s instead of 0.14 s).
    chosen.sort(key=_row_name)
    if REPORT_SORTS[sort] is not None:
        chosen.sort(key=REPORT_SORTS[sort])
    if sort == "need":
        chosen.sort(key=plan_group)
    return chosen[:limit] if limit is not None else chosen


_DIGIT = re.compile(r"[0-9]")


PICK_GROUPS: Final = frozenset({PLAN_RED, PLAN_YELLOW})  # by default; --include-green adds green


def pick_torrents(rows: Sequence[ReportRow], budget: int, spread: float = 0.0,
                  chooser: random.Random | None = None,
                  groups: frozenset[int] = PICK_GROUPS) -> list[ReportRow]:
    """What a volunteer with `budget` bytes should seed: downloadable torrents of the plan's
    `groups` (red, then yellow, then green), neediest first within each, greedily, every
    torrent that still fits. Dead torrents are never picked: nobody can download them.
    Torrents not measured yet, or of unknown size, cannot be weighed and are left out.

    With a `chooser`, each need is scaled by a random factor within ±`spread` first, and equal
    weights come in random order, so that volunteers running this at once do not all pick the
    same torrents. Without one the list is the plan's order itself (`rows` as sorted by need),
    the same from one run to the next: a published feed must not churn, or every subscriber's
    client would fetch new torrents each time it is written, and the page computes the same."""
    weighed = [(group, row.need * chooser.uniform(1 - spread, 1 + spread) if chooser else 0.0,
                chooser.random() if chooser else 0.0, index) for index, row in enumerate(rows)
               if (group := plan_group(row)) in groups and row.need is not None
               and row.size_bytes > 0]
    chosen, left = [], budget
    for *_, index in sorted(weighed):
        if rows[index].size_bytes <= left:
            chosen.append(rows[index])
            left -= rows[index].size_bytes
    return chosen


def _report_name(file_name: str | None, torrent_name: str | None, infohash: str) -> str:
    for candidate in (file_name, torrent_name):
        if candidate and _DIGIT.search(candidate):
            return candidate
    # seedtools sorts by the first number in the name; the infohash nearly always holds a digit.
    base = file_name or torrent_name or "torrent"
    return f"{base} {infohash}" if _DIGIT.search(infohash) else f"{base} 0x{infohash}"


def load_report_rows(db: sqlite3.Connection, collections: Sequence[str] = (),
                     excluded: Iterable[str] = ()) -> list[ReportRow]:
    """Every torrent listed by a collection now, once, under the first collection listing it.

    Reads one row per torrent from the tables the stages keep up to date (tracker_latest,
    dht_latest, seeder_trends), never the samples themselves: 100,000 torrents take a second.
    The numbers of `excluded` trackers, and untrusted ones, play no part.
    """
    try:
        summarize_scrape_runs(db)
    except sqlite3.OperationalError:
        pass  # a read-only database, or a writer holding it too long: the next writer folds
    with collector_paused():
        return _load_report_rows(db, collections, frozenset(excluded))


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Building 100,000 rows makes no reference cycles, but the cyclic garbage collector would
    scan the growing heap again and again meanwhile: a fifth of the time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _load_report_rows(db: sqlite3.Connection, collections: Sequence[str],
                      excluded: frozenset[str]) -> list[ReportRow]:
    where, params = "", []
    if collections:
        where = (f"AND m.collection_id IN (SELECT id FROM collections "
                 f"WHERE name IN ({', '.join('?' * len(collections))}))")
        params = list(collections)
    name_and_type = {collection_id: (name, kind) for collection_id, name, kind in
                     db.execute("SELECT id, name, type FROM collections")}
    # Per torrent: file name, source, collection name and type of its first listing.
    listed: dict[int, tuple[str | None, str, str, str]] = {}
    for torrent_id, file_name, source, collection_id, listed_type in db.execute(
            f"SELECT m.torrent_id, m.file_name, m.source, m.collection_id, m.type "
            f"FROM memberships m WHERE m.removed IS NULL AND m.torrent_id IS NOT NULL {where} "
            f"ORDER BY m.collection_id, m.first_seen, m.source", params):
        if torrent_id not in listed:
            collection, kind = name_and_type[collection_id]
            listed[torrent_id] = (file_name, source, collection, listed_type or kind)
    tracker_numbers = load_tracker_numbers(db, int(time.time()) - TRACKER_SAMPLE_FRESHNESS,
                                           excluded)
    torrents = [row for row in db.execute(
        "SELECT t.id, t.infohash, t.name, t.size_bytes, t.file_count, t.created_unix, t.magnet, "
        "       d.peers, d.measured, d.bep33_seeds, d.bep33_peers, "
        "       p.verified_seeds, p.availability, p.webseeds_ok, p.reachable, p.measured, "
        "       p.skipped, "
        "       s.latest, s.change_previous, s.change_1d, s.change_7d "
        "FROM torrents t LEFT JOIN dht_latest d ON d.torrent_id = t.id "
        "LEFT JOIN probe_latest p ON p.torrent_id = t.id AND p.measured >= ? "
        "LEFT JOIN seeder_trends s ON s.torrent_id = t.id",
        (int(time.time()) - PROBE_SAMPLE_FRESHNESS,)) if row[0] in listed]
    mean = mean_size(row[3] for row in torrents)
    # Sync stores every magnet; rows written by other hands may lack one (fill_magnets).
    missing = missing_magnets(db) if any(row[6] is None for row in torrents) else {}
    no_changes = (None, None, None)
    has_digit = _DIGIT.search
    result: list[ReportRow] = []
    for (torrent_id, infohash, name, size, file_count, created, magnet, dht_peers, dht_measured,
         bep33_seeds, bep33_peers, verified, availability, webseeds_ok, reachable, probed,
         skipped, folded, *changes) in torrents:
        file_name, source, collection, kind = listed[torrent_id]
        if magnet is None:
            magnet = missing[torrent_id]
        seeders, leechers, completed, scraped, tracker, witnesses = tracker_numbers.get(
            torrent_id, NO_TRACKER_NUMBERS)
        if size is None:
            size = -1
        if probed is None:
            verified = webseeds_ok = reachable = probed = downloadable = availability = -1
        else:
            downloadable = probe_verdict(verified, availability, webseeds_ok, skipped)
            availability = -1 if availability is None else round(availability, 3)
            if seeders < 0 and downloadable >= 0:  # no tracker counts it (a DHT-only
                seeders, scraped = verified, probed  # magnet): the seeds the probe saw do
        result.append(ReportRow(
            infohash,
            # _report_name, which nearly always returns the file name: asked only otherwise.
            file_name if file_name and has_digit(file_name) else
            _report_name(file_name, name, infohash),
            name, source if "://" in source else magnet, magnet, collection, kind, size,
            -1 if file_count is None else file_count, -1 if created is None else created,
            seeders, leechers, completed, scraped, tracker, witnesses,
            -1 if dht_peers is None else dht_peers, -1 if dht_measured is None else dht_measured,
            -1 if bep33_seeds is None else round(bep33_seeds),
            -1 if bep33_peers is None else round(bep33_peers),
            verified, availability, webseeds_ok, reachable, probed, downloadable,
            # Changes only beside the seeders they were computed from: not beside stale ones,
            # nor beside samples of a scrape still running (folded when it ends).
            *(UNMEASURED_HEALTH if seeders < 0 else health_fields(
                seeders, leechers, size, mean,
                changes if folded is not None and scraped <= folded else no_changes))))
    return result


# seeders, leechers, completed, scraped_date, tracker URL, trusted trackers that answered
TrackerNumbers = tuple[int, int, int, int, Optional[str], int]
NO_TRACKER_NUMBERS: Final[TrackerNumbers] = (-1, -1, -1, -1, None, 0)
TRACKER_SAMPLE_FRESHNESS: Final = 3 * 86400  # seconds; older tracker samples no longer count
PROBE_SAMPLE_FRESHNESS: Final = 3 * 86400  # and probe samples


def load_tracker_numbers(db: sqlite3.Connection, since: int,
                         excluded: frozenset[str] = frozenset()) -> dict[int, TrackerNumbers]:
    """Per torrent: the best tracker's latest trusted sample since `since`, the tracker named,
    and how many trusted trackers answered. Samples of a run in which their tracker answered a
    canary with peers are not trusted; `excluded` trackers' samples do not count either.

    Trackers see different subsets of one swarm, so they combine by maximum, never by sum (a peer
    announcing to three trackers would count three times). Seeders decide which tracker is
    best (then leechers, then the newer sample); completed is the largest any tracker reports.
    """
    urls = {tracker_id: url for tracker_id, url in db.execute("SELECT id, url FROM trackers")
            if url not in excluded}
    best: dict[int, TrackerNumbers] = {}
    for torrent_id, tracker_id, measured, seeders, leechers, completed in db.execute(
            "SELECT torrent_id, tracker_id, measured, seeders, leechers, completed "
            "FROM tracker_latest WHERE measured >= ? AND trusted", (since,)):
        url = urls.get(tracker_id)
        if url is None:
            continue
        known = best.get(torrent_id)
        if known is None:
            best[torrent_id] = (seeders, leechers, completed, measured, url, 1)
        elif (seeders, leechers, measured) > (known[0], known[1], known[3]):
            best[torrent_id] = (seeders, leechers, max(completed, known[2]), measured, url,
                                known[5] + 1)
        else:
            best[torrent_id] = (*known[:2], max(completed, known[2]), *known[3:5], known[5] + 1)
    return best


@dataclass(frozen=True, slots=True)
class TrackerHealth:
    url: str
    torrents: int
    successes: int
    failures: int
    consecutive_failures: int
    last_success: int | None
    last_attempt: int | None
    last_error: str | None
    rtt_ms: float | None
    hashes_answered: int
    next_attempt: int | None
    fabricating: str | None  # the canary answer of its last tested run that gave it away
    fabricating_since: int | None
    full_scrape: bool
    excluded: bool = False  # [scrape].exclude

    @property
    def unused_because(self) -> str | None:
        """Why its numbers are not used, or None when they are."""
        if self.excluded:
            return "excluded by [scrape].exclude"
        if self.fabricating:
            return f"invents numbers: {self.fabricating}"
        return None


def load_tracker_health(db: sqlite3.Connection, failing_only: bool = False,
                        excluded: Iterable[str] = ()) -> list[TrackerHealth]:
    excluded = frozenset(excluded)
    rows = db.execute(
        f"""
        SELECT tr.url, (SELECT count(*) FROM torrent_trackers tt WHERE tt.tracker_id = tr.id),
               tr.successes, tr.failures, tr.consecutive_failures, tr.last_success,
               tr.last_attempt, tr.last_error, tr.rtt_ms, tr.hashes_answered, tr.next_attempt,
               tr.fabricating, tr.fabricating_since, coalesce(tr.full_scrape, 0)
        FROM trackers tr {'WHERE tr.consecutive_failures > 0' if failing_only else ''}
        ORDER BY tr.consecutive_failures, tr.hashes_answered DESC, tr.url
        """)
    return [TrackerHealth(*row[:-1], bool(row[-1]), row[0] in excluded)  # type: ignore[call-arg]
            for row in rows]


def load_unused_trackers(db: sqlite3.Connection,
                         excluded: Iterable[str] = ()) -> list[tuple[str, str]]:
    """(URL, why) of each known tracker whose numbers are not used: excluded or fabricating."""
    return [(row.url, reason) for row in load_tracker_health(db, excluded=excluded)
            if (reason := row.unused_because) is not None]


def _ago(timestamp: int | None, now: float) -> str:
    if timestamp is None:
        return "never"
    seconds = max(0, int(now - timestamp))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def render_tracker_table(rows: Sequence[TrackerHealth], console: Console) -> None:
    from rich.table import Table

    now = time.time()
    table = Table(title=f"{len(rows)} trackers", title_justify="left")
    for column in ("tracker", "torrents", "ok", "failed", "last success", "rtt", "answered",
                   "state"):
        table.add_column(column, justify="left" if column in ("tracker", "state") else "right",
                         overflow="fold")
    for row in rows:
        if row.consecutive_failures:
            state = f"[red]failing ×{row.consecutive_failures}[/red]: {escape_markup(row.last_error or '')}"
            if row.next_attempt and row.next_attempt > now:
                state += f" (next try in {_ago(int(2 * now - row.next_attempt), now)[:-4]})"
        else:
            state = "[green]ok[/green]" if row.successes else "not asked yet"
        if row.full_scrape:
            state += " (full scrape)"
        unused = row.unused_because
        if unused is not None:  # greyed: its numbers are left out of every report
            since = f", since {_ago(row.fabricating_since, now)}" if row.fabricating_since and \
                not row.excluded else ""
            state = f"[bold]not used[/bold]: {escape_markup(unused)}{since}; {state}"
        table.add_row(escape_markup(row.url), f"{row.torrents:,}", str(row.successes),
                      str(row.failures), _ago(row.last_success, now),
                      f"{row.rtt_ms:.0f} ms" if row.rtt_ms is not None else "-",
                      f"{row.hashes_answered:,}", state, style="dim" if unused else None)
    console.print(table)


REPORT_FIELDS: Final = tuple(f.name for f in dataclasses.fields(ReportRow))


_report_values = operator.attrgetter(*REPORT_FIELDS)


# libgen-seedtools' model has `ipfs_cid` and `path`, Optional without a default: under pydantic 2
# they are required, so every object carries them as null (see shared/FORMATS.md).
SEEDTOOLS_NULL_FIELDS: Final = ("ipfs_cid", "path")
_JSON_OBJECT: Final = "{" + ", ".join(
    [f"{json.dumps(name)}: %s" for name in REPORT_FIELDS]
    + [f"{json.dumps(name)}: null" for name in SEEDTOOLS_NULL_FIELDS]) + "}"


# The counts and times whose unknown is -1 in a ReportRow (and in the seedtools feed, which
# requires integers there). NDJSON writes null for them and CSV an empty cell: each of those
# formats has one way to say "unknown".
MINUS_ONE_FIELDS: Final = ("size_bytes", "file_count", "created_unix", "seeders", "leechers",
                           "completed", "scraped_date", "dht_peers", "dht_scraped",
                           "dht_seeds_estimate", "dht_peers_estimate", "verified_seeds",
                           "availability", "webseeds_ok", "reachable_peers", "probed",
                           "downloadable")


def _known(value: int) -> int | str:
    return "null" if value == -1 else value


def report_json_object(row: ReportRow, quote: Any = json.encoder.encode_basestring,
                       count: Callable[[int], Any] = int) -> str:
    """The row as json.dumps(dict, ensure_ascii=False) writes it, five times faster: a report
    writes 100,000 of them. Values follow REPORT_FIELDS (a test holds the two together).
    `count` writes the MINUS_ONE_FIELDS: as they are (json), or -1 as null (_known, ndjson)."""
    return _JSON_OBJECT % (
        quote(row.infohash), quote(row.name),
        "null" if row.torrent_name is None else quote(row.torrent_name),
        quote(row.link), quote(row.magnet), quote(row.collection), quote(row.type),
        count(row.size_bytes), count(row.file_count), count(row.created_unix),
        count(row.seeders), count(row.leechers), count(row.completed), count(row.scraped_date),
        "null" if row.tracker is None else quote(row.tracker), row.trackers_answered,
        count(row.dht_peers), count(row.dht_scraped), count(row.dht_seeds_estimate),
        count(row.dht_peers_estimate), count(row.verified_seeds),
        count(-1) if row.availability < 0 else repr(row.availability), count(row.webseeds_ok),
        count(row.reachable_peers), count(row.probed), count(row.downloadable),
        quote(row.band), "null" if row.need is None else repr(row.need),
        "null" if row.seeders_change_previous is None else row.seeders_change_previous,
        "null" if row.seeders_change_1d is None else row.seeders_change_1d,
        "null" if row.seeders_change_7d is None else row.seeders_change_7d)


JSON_ROWS_PER_CHUNK: Final = 1000  # a write per thousand objects, not per object


def fetchable_by_seedtools(row: ReportRow) -> bool:
    """Whether libgen-seedtools can act on the row: it downloads `link` with urllib and reads
    the .torrent it gets, so only an http(s) link will do. A magnet or a bare infohash passes
    its validation, then crashes its run (`unknown url type: magnet`)."""
    return row.link[:8].lower().startswith(("http://", "https://"))


def json_chunks(rows: Sequence[ReportRow],
                rows_per_chunk: int = JSON_ROWS_PER_CHUNK) -> Iterator[str]:
    """The libgen-seedtools feed: a list of objects, integers everywhere, -1 when unknown; one
    object per line, produced a chunk of lines at a time so that a big report is never all in
    memory. Only the rows seedtools can fetch (fetchable_by_seedtools): the other formats,
    which claim no such compatibility, have them all."""
    if not all(map(fetchable_by_seedtools, rows)):
        rows = [row for row in rows if fetchable_by_seedtools(row)]
    if not rows:
        yield "[]\n"
        return
    yield "[\n"
    for start in range(0, len(rows), rows_per_chunk):
        end = start + rows_per_chunk
        yield (",\n".join([report_json_object(row) for row in rows[start:end]])
               + (",\n" if end < len(rows) else "\n]\n"))


def ndjson_chunks(rows: Sequence[ReportRow],
                  rows_per_chunk: int = JSON_ROWS_PER_CHUNK) -> Iterator[str]:
    """One object a line, every torrent; unknown is null throughout."""
    for start in range(0, len(rows), rows_per_chunk):
        yield "".join([report_json_object(row, count=_known) + "\n"
                       for row in rows[start:start + rows_per_chunk]])


FORMULA_STARTS: Final = frozenset("=+-@\t\r")  # a set: "" is in every string, not in it


def csv_chunks(rows: Sequence[ReportRow], rows_per_chunk: int = 1000) -> Iterator[str]:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(REPORT_FIELDS)
    minus_one = frozenset(REPORT_FIELDS.index(name) for name in MINUS_ONE_FIELDS)
    for index, row in enumerate(rows, start=1):
        # Spreadsheets run cells that start with = + - @ as formulas; names are hostile input.
        # Unknown is an empty cell, whatever the column.
        writer.writerow(["'" + value if isinstance(value, str) and value[:1] in FORMULA_STARTS
                         else "" if value is None or value == -1 and column in minus_one
                         else value for column, value in enumerate(_report_values(row))])
        if index % rows_per_chunk == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def render_json(rows: Sequence[ReportRow]) -> str:
    return "".join(json_chunks(rows))


def seedtools_note(rows: Sequence[ReportRow], report_format: str) -> str | None:
    """What a json report leaves out and why, for stderr; None when nothing is left out."""
    left_out = 0 if report_format != "json" else \
        sum(1 for row in rows if not fetchable_by_seedtools(row))
    if not left_out:
        return None
    return (f"json: {_plural(left_out, 'torrent')} with no http(s) .torrent "
            "link (a magnet or an infohash only) left out of the libgen-seedtools feed, which "
            "cannot fetch them; ndjson, csv and html list every torrent")


def render_ndjson(rows: Sequence[ReportRow]) -> str:
    return "".join(ndjson_chunks(rows))


def render_csv(rows: Sequence[ReportRow]) -> str:
    return "".join(csv_chunks(rows))


# Characters XML 1.0 cannot hold at all, even escaped: a torrent name holding one would make
# the whole feed unreadable to every client.
_NOT_XML: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_text(value: str) -> str:
    return html.escape(_NOT_XML.sub("\ufffd", value), quote=True)


RSS_TTL_MINUTES: Final = 360  # how long a client may keep the feed: tsmd runs daily at most
# ezRSS's namespace, which BitTorrent clients read for the infohash and the magnet link.
TORRENT_NAMESPACE: Final = "http://xmlns.ezrss.it/0.1/"


def rss_chunks(rows: Sequence[ReportRow], picked_for: int = 0, generated: float | None = None,
               rows_per_chunk: int = JSON_ROWS_PER_CHUNK) -> Iterator[str]:
    """An RSS 2.0 feed of `rows` as BEP 36 describes torrent feeds, for a BitTorrent client to
    subscribe to and seed whatever appears: each item's enclosure is the .torrent link (a
    magnet when there is none), typed application/x-bittorrent; the guid is the infohash, so a
    client that has fetched an item once does not fetch it again."""
    import email.utils

    stamp = email.utils.formatdate(generated or time.time(), usegmt=True)
    scope = f"up to {_human_size(picked_for)}" if picked_for > 0 else "every torrent"
    yield ('<?xml version="1.0" encoding="utf-8"?>\n'
           f'<rss version="2.0" xmlns:torrent="{TORRENT_NAMESPACE}">\n<channel>\n'
           f"<title>tsmd: torrents to seed ({_xml_text(scope)})</title>\n"
           "<link>https://www.bittorrent.org/beps/bep_0036.html</link>\n"
           "<description>Downloadable torrents that need seeders most, red (fewer than 4 "
           "seeders) before yellow (4 to 10), the most bytes at risk first, "
           f"{_xml_text(scope)}. Written by tsmd {__version__}.</description>\n"
           f"<lastBuildDate>{stamp}</lastBuildDate>\n<ttl>{RSS_TTL_MINUTES}</ttl>\n"
           f"<generator>tsmd {__version__}</generator>\n")
    for start in range(0, len(rows), rows_per_chunk):
        items = []
        for row in rows[start:start + rows_per_chunk]:
            link = _xml_text(row.link)
            seeders = _plural(row.seeders, "seeder") if row.seeders >= 0 else \
                "seeders not measured"
            # BEP 36's enclosure length is that of the .torrent file, which tsmd does not keep;
            # RSS writes 0 for a length it does not know. The content's size is contentLength.
            items.append(
                f"<item><title>{_xml_text(row.name)}</title>"
                f'<guid isPermaLink="false">{row.infohash}</guid><link>{link}</link>'
                f"<description>{_xml_text(row.collection)}: {_human_size(row.size_bytes)}, "
                f"{seeders} ({row.band})" + (
                    f", {_plural(row.verified_seeds, 'verified seed')}"
                    if row.verified_seeds >= 0 else "") + "</description>"
                f"<category>{_xml_text(row.collection)}</category>"
                f'<enclosure url="{link}" length="0" type="application/x-bittorrent"/>'
                f"<torrent:infoHash>{row.infohash}</torrent:infoHash>"
                f"<torrent:magnetURI>{_xml_text(row.magnet)}</torrent:magnetURI>"
                + (f"<torrent:contentLength>{row.size_bytes}</torrent:contentLength>"
                   if row.size_bytes >= 0 else "") + "</item>\n")
        yield "".join(items)
    yield "</channel>\n</rss>\n"


def _prometheus_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def is_dead(row: ReportRow) -> bool:
    """Measured, and no seeder anywhere: no tracker counts one, nor a DHT filter, and the
    probe saw no complete copy (a verified seed, a web seed, pieces enough among peers)."""
    return row.seeders == 0 and row.dht_seeds_estimate <= 0 and row.downloadable != 1


@dataclass(slots=True)
class CollectionTotals:
    """One collection as the page's summary and the Prometheus metrics count it; unknown sizes
    count as 0 bytes."""

    torrents: int = 0
    size_bytes: int = 0
    torrents_by_band: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BANDS, 0))
    bytes_by_band: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BANDS, 0))
    dead: int = 0
    probed: int = 0  # with a fresh probe sample
    downloadable: int = 0  # of those, a complete copy seen


BANDS: Final = tuple(band.value for band in Band)


def collection_totals(rows: Iterable[ReportRow]) -> dict[str, CollectionTotals]:
    """Per collection, in the order the rows first name them: one pass over the rows."""
    totals: dict[str, CollectionTotals] = {}
    for row in rows:
        total = totals.get(row.collection)
        if total is None:
            total = totals[row.collection] = CollectionTotals()
        size = row.size_bytes if row.size_bytes > 0 else 0
        total.torrents += 1
        total.size_bytes += size
        total.torrents_by_band[row.band] = total.torrents_by_band.get(row.band, 0) + 1
        total.bytes_by_band[row.band] = total.bytes_by_band.get(row.band, 0) + size
        if is_dead(row):
            total.dead += 1
        if row.probed >= 0:
            total.probed += 1
            total.downloadable += row.downloadable == 1
    return totals


def render_prometheus(rows: Sequence[ReportRow], per_torrent: bool = False) -> str:
    """The text exposition format, for node_exporter's textfile collector."""
    totals = collection_totals(rows)
    lines: list[str] = []

    def metric(name: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} gauge")
        for labels, value in samples:
            text = ",".join(f'{key}="{_prometheus_label(v)}"' for key, v in labels.items())
            number = str(value) if isinstance(value, int) else repr(float(value))
            lines.append(f"{name}{{{text}}} {number}" if text else f"{name} {number}")

    metric("tsmd_torrents", "Torrents listed by the collection.",
           (({"collection": c}, t.torrents) for c, t in totals.items()))
    metric("tsmd_bytes", "Total size of the collection's torrents in bytes.",
           (({"collection": c}, t.size_bytes) for c, t in totals.items()))
    metric("tsmd_torrents_by_band", "Torrents per seeder band (red < 4, yellow 4-10, green > 10).",
           (({"collection": c, "band": b}, t.torrents_by_band[b])
            for c, t in totals.items() for b in BANDS))
    metric("tsmd_bytes_by_band", "Bytes per seeder band.",
           (({"collection": c, "band": b}, t.bytes_by_band[b])
            for c, t in totals.items() for b in BANDS))
    metric("tsmd_dead_torrents", "Torrents with no seeder on any tracker nor in the DHT.",
           (({"collection": c}, t.dead) for c, t in totals.items()))
    metric("tsmd_probed_torrents", "Torrents whose peers and web seeds were probed lately.",
           (({"collection": c}, t.probed) for c, t in totals.items()))
    metric("tsmd_downloadable_torrents", "Probed torrents of which a complete copy was seen "
           "(a verified seed, a working web seed, or the pieces among the peers).",
           (({"collection": c}, t.downloadable) for c, t in totals.items()))
    if per_torrent:
        metric("tsmd_torrent_seeders", "Seeders of one torrent (maximum over its trackers).",
               (({"collection": x.collection, "infohash": x.infohash, "name": x.name}, x.seeders)
                for x in rows if x.seeders >= 0))
        metric("tsmd_torrent_verified_seeds", "Peers of one torrent that hold every piece.",
               (({"collection": x.collection, "infohash": x.infohash, "name": x.name},
                 x.verified_seeds) for x in rows if x.verified_seeds >= 0))
        metric("tsmd_torrent_availability", "Complete copies among one torrent's peers.",
               (({"collection": x.collection, "infohash": x.infohash, "name": x.name},
                 x.availability) for x in rows if x.availability >= 0))
    return "\n".join(lines) + "\n"


def _plural(count: int, noun: str) -> str:
    """"1 torrent", "2 torrents", "1,000 torrents" (the nouns tsmd counts take an s)."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _human_size(size: int) -> str:
    if size < 0:
        return "?"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000  # type: ignore[assignment]
    return ""


# The terminal table's columns, most wanted first: at 80 columns (the usual terminal, and the
# width rich assumes when output is piped) those at the end give way, never the name's line.
TABLE_COLUMNS: Final = ("name", "seeders", "size", "need", "collection", "leechers", "Δ day",
                        "done", "DHT peers", "verified", "copies")
TABLE_NAME_MIN: Final = 24  # characters of a name kept at the least, then an ellipsis
_TABLE_CELL_COST: Final = 3  # a column's padding and separator, as rich draws them


def render_table(rows: Sequence[ReportRow], console: Console) -> None:
    from rich.table import Table

    unknown = "-"
    styles = {"red": "bold red", "yellow": "yellow", "green": "green", "grey": "dim"}
    cells = [{
        "name": row.name, "collection": row.collection, "size": _human_size(row.size_bytes),
        "seeders": str(row.seeders) if row.seeders >= 0 else unknown,
        "leechers": str(row.leechers) if row.leechers >= 0 else unknown,
        "done": str(row.completed) if row.completed >= 0 else unknown,
        "DHT peers": str(row.dht_peers) if row.dht_peers >= 0 else unknown,
        "verified": (str(row.verified_seeds) + (" +web" if row.webseeds_ok > 0 else "")
                     if row.verified_seeds >= 0 else unknown),
        "copies": f"{row.availability:.2f}" if row.availability >= 0 else unknown,
        "Δ day": f"{row.seeders_change_1d:+d}" if row.seeders_change_1d is not None else unknown,
        "need": f"{row.need:.2f}" if row.need is not None else unknown} for row in rows]
    widths = {column: max([len(column), *(len(cell[column]) for cell in cells)])
              for column in TABLE_COLUMNS}
    shown = list(TABLE_COLUMNS)

    def others() -> int:  # what the columns after the name take, borders included
        return sum(widths[column] + _TABLE_CELL_COST for column in shown[1:]) + 4

    while len(shown) > 2 and TABLE_NAME_MIN + others() > console.width:
        shown.pop()
    name_width = min(widths["name"], max(TABLE_NAME_MIN, console.width - others()))
    table = Table(title=_plural(len(rows), "torrent"), title_justify="left", expand=False)
    for column in TABLE_COLUMNS:
        if column in shown:
            table.add_column(column, justify="left" if column in ("name", "collection")
                             else "right", no_wrap=True, overflow="ellipsis",
                             # the others whole: the name alone gives way, to an ellipsis
                             width=name_width if column == "name" else widths[column])
    for row, cell in zip(rows, cells):
        values = [escape_markup(cell[column]) for column in TABLE_COLUMNS if column in shown]
        values[1] = f"[{styles[row.band]}]{values[1]}[/]"  # seeders, coloured by band
        table.add_row(*values)
    console.print(table)
    if len(shown) < len(TABLE_COLUMNS):
        console.print(f"[dim]not shown at {console.width} columns: "
                      f"{', '.join(c for c in TABLE_COLUMNS if c not in shown)} (csv has all)"
                      "[/dim]")


# The page is one file: styles, script and data inline, nothing fetched. Torrent and tracker
# strings only ever reach the page as JSON inside a <script type="application/json"> (with <, >
# and & escaped) and are put into the document with textContent, never parsed as HTML.
HTML_PAGE: Final = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:">
<title>tsmd: which torrents need seeders</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}table{border-collapse:collapse}
.note{background:#fdf1c7;padding:.4em .6em;border-left:4px solid #c90}
td,th{padding:.2em .5em;border-bottom:1px solid #ddd;text-align:right;white-space:nowrap}
td.t,th.t{text-align:left;white-space:normal;max-width:40em;overflow-wrap:anywhere}
th{background:#f4f4f4;position:sticky;top:0}
th button{font:inherit;font-weight:bold;border:0;background:none;padding:0;cursor:pointer;color:inherit}
th[aria-sort=ascending] button::after{content:" \\25b2"}th[aria-sort=descending] button::after{content:" \\25bc"}
.red{background:#fbd5d5}.yellow{background:#fdf1c7}.green{background:#d7f3d7}.grey{background:#eee}
.bar{display:inline-block;height:.8em}.swatch{display:inline-block;height:.8em;width:.8em}
.bar.red,.swatch.red{background:#d33}.bar.yellow,.swatch.yellow{background:#db0}
.bar.green,.swatch.green{background:#3a3}.bar.grey{background:#aaa}.swatch.grey{background:#ccc}
rect.red{fill:#d33}rect.yellow{fill:#db0}rect.green{fill:#3a3}rect.grey{fill:#ccc}
.charts{display:flex;flex-wrap:wrap;gap:1em}.charts figure{margin:0}.charts svg{display:block}
figcaption{font-size:.9em;color:#555;max-width:300px}
#controls{margin:1em 0;display:flex;flex-wrap:wrap;gap:.3em 1em;align-items:center}
#controls input[type=search]{width:20em;max-width:100%}
#magnets{width:100%;max-width:60em;height:6em;box-sizing:border-box}
table.unused td{color:#888}
/* A table wider than a phone scrolls in its own box there; a wide window keeps the page as
   the scroller, so that the sticky headers stay in view. */
@media (max-width:600px){body{margin:.5em}.wide{display:none}td,th{padding:.2em .3em}
.scroll{overflow-x:auto;max-width:100%}
td.t,th.t{min-width:7em;max-width:14em}
.bar{display:none}td.get{white-space:normal}}
</style></head><body>
<h1>Which torrents need seeders</h1>
<p>Generated __GENERATED__ by tsmd __VERSION__. Seeders are the maximum over each torrent's trusted trackers;
bands: red &lt; 4 seeders, yellow 4&ndash;10, green &gt; 10, grey not measured. In the plan's order:
torrents that can be downloaded, red first, then yellow, then green, each by <b>need</b> (Anna's
Archive's score, (seeders + 0.1 &times; leechers) &times; mean size / size: <b>lower is needier</b>,
the most bytes at risk first); then the unverified (trackers count seeders, but the peers tsmd
reached hold no complete copy); then the dead (no seeder anywhere: lost unless someone who has
them comes back); then those not measured yet. <b>Verified seeds</b> are peers that told tsmd
they hold every piece; "+web" marks a web seed that served the data.</p>
__NOTES__<h2>Collections</h2>
<div class="scroll">__SUMMARY__</div>
__CHARTS__<h2>Torrents</h2>
<noscript>__NOSCRIPT__</noscript>
<div id="app" hidden>
<div id="controls">
<label>show <select id="list"><option value="">every torrent</option>
<option value="pick">what fits my disk</option><option value="dead">the dead</option></select></label>
<label id="spacebox" hidden>my disk <input id="space" size="8" value="1TB"></label>
<label>filter <input id="q" type="search" placeholder="name or collection"></label>
<label>band <select id="band"><option value="">every band</option><option>red</option>
<option>yellow</option><option>green</option><option>grey</option></select></label>
<span id="count" role="status"></span></div>
<p id="listnote" hidden></p>
<textarea id="magnets" readonly hidden aria-label="magnet links of the list, one a line"></textarea>
<div class="scroll"><table><thead><tr>
<th class="t" data-key="name"><button type="button">name</button></th>
<th class="t wide" data-key="collection"><button type="button">collection</button></th>
<th data-key="size"><button type="button">size</button></th>
<th data-key="seeders"><button type="button">seeders</button></th>
<th class="wide" data-key="leechers"><button type="button">leechers</button></th>
<th class="wide" data-key="completed"><button type="button">done</button></th>
<th class="wide" data-key="dht"><button type="button">DHT peers</button></th>
<th class="wide" data-key="verified"><button type="button">verified seeds</button></th>
<th class="wide" data-key="change"><button type="button">&Delta; day</button></th>
<th data-key="need"><button type="button">need</button></th><th class="wide">trend</th>
<th>get</th></tr></thead><tbody id="rows"></tbody></table></div>
<p><button id="more" type="button">show more</button></p>
</div>
__UNUSED__<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const KEYS = ["name","collection","size","seeders","leechers","completed","dht","verified","need","change"];
// Rows arrive in the order tsmd sorted them; `rank` is their place in the plan's order.
// Magnets come as "infohash&dn=name" plus the index of their list of trackers, sent once.
const dataElement = document.getElementById("data");
const [TODAY, trackerLists, data] = JSON.parse(dataElement.textContent);
dataElement.remove();  // the parsed rows are all the page needs: free the text
const rows = data.map((r, i) => {
  const magnet = "magnet:?xt=urn:btih:" + r[11] + (r[12] ? "&tr=" + trackerLists[r[12]] : "");
  return {name: r[0], collection: r[1], size: r[2], seeders: r[3], leechers: r[4],
          completed: r[5], dht: r[6], band: r[7], need: r[8], change: r[9],
          link: r[10] === null ? magnet : r[10], magnet, trend: r[13], plan: r[14], rank: r[15],
          verified: r[16], web: r[17],
          text: (r[0] + "\\n" + r[1]).toLowerCase(), i};
});
const byRank = rows.slice().sort((a, b) => a.rank - b.rank);
const PAGE = 500, collator = new Intl.Collator(), $ = id => document.getElementById(id);
let shown = PAGE, order = null, view = rows;
// Unknown is null, or -1 for counts; a change of -1 is a value (one seeder fewer).
function unknown(k, v) { return v === null || (v === -1 && k !== "change"); }
const [RED, YELLOW, GREEN, UNVERIFIED, DEAD, UNMEASURED] = [0, 1, 2, 3, 4, 5];  // plan_group
function compare(a, b) {
  const k = order.key, x = a[k], y = b[k];
  // "need" is the plan's order: downloadable red, yellow, green, unverified, dead, unmeasured.
  if (k === "need" && a.plan !== b.plan) {
    if (a.plan === UNMEASURED || b.plan === UNMEASURED) return a.plan - b.plan;
    return order.dir * (a.plan - b.plan);
  }
  if (typeof x === "string") return order.dir * collator.compare(x, y) || a.i - b.i;
  const ux = unknown(k, x), uy = unknown(k, y);
  if (ux || uy) return (ux - uy) || a.i - b.i;  // unknown last, whichever the direction
  return order.dir * (x - y) || a.i - b.i;
}
// Bytes from "2TB", "1.5 TiB" or "500000": tsmd's parse_size.
function parseSize(text) {
  const m = /^\\s*([0-9]+(?:\\.[0-9]+)?)\\s*([kmgtp]?i?b?)\\s*$/i.exec(text);
  if (!m) return null;
  const unit = m[2].toLowerCase(), prefix = unit ? "kmgtp".indexOf(unit[0]) : -1;
  return Math.trunc(Number(m[1]) * (unit.includes("i") ? 1024 : 1000) ** (prefix + 1));
}
// tsmd pick without spread (pick_torrents with no chooser): downloadable red, then yellow, in the plan's
// order, every torrent that still fits.
function picked(space) {
  const out = []; let left = space;
  for (const r of byRank) {
    if ((r.plan === RED || r.plan === YELLOW) && r.need !== null && r.size > 0 && r.size <= left) {
      out.push(r); left -= r.size;
    }
  }
  return out;
}
function size(n) {
  if (n < 0) return "?";
  const units = ["B","kB","MB","GB","TB"]; let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}
function cell(tr, text, cls) {
  const td = document.createElement("td"); td.textContent = text;
  if (cls) td.className = cls; tr.appendChild(td); return td;
}
function trend(text) {
  // "FIRST_DAY;v,v,,v": seeders on consecutive UTC days; drawn on the 30 days up to TODAY.
  const td = document.createElement("td"), w = 4, h = 16, start = TODAY - 29, points = [];
  td.className = "wide";
  const [first, values] = (text || ";").split(";");
  values.split(",").forEach((v, i) => {
    const x = Number(first) + i - start;
    if (v !== "" && x >= 0 && x < 30) points.push([x, Number(v)]);
  });
  if (points.length < 2) return td;
  const top = Math.max(1, ...points.map(p => p[1]));
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", w * 30); svg.setAttribute("height", h);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points.map(([x, v]) => (x * w + 2) + "," + (h - 1 - v / top * (h - 2))).join(" "));
  line.setAttribute("fill", "none"); line.setAttribute("stroke", "#555");
  svg.appendChild(line); td.appendChild(svg); return td;
}
function link(td, href, text) {
  if (!/^(https?:|magnet:)/i.test(href)) return;
  const a = document.createElement("a"); a.href = href; a.textContent = text;
  a.rel = "nofollow noreferrer"; td.appendChild(a); td.appendChild(document.createTextNode(" "));
}
function state() {
  return {q: $("q").value, band: $("band").value, list: $("list").value, space: $("space").value};
}
function render() {
  const {q, band, list, space} = state(), query = q.toLowerCase();
  const bytes = list === "pick" ? parseSize(space) : null;
  const base = list === "pick" ? picked(bytes || 0) : list === "dead"
    ? rows.filter(r => r.plan === DEAD) : rows;
  view = query || band ? base.filter(r => (!band || r.band === band) && (!query || r.text.includes(query)))
                       : base.slice();
  if (order) view.sort(compare);
  const body = $("rows"), frag = document.createDocumentFragment();
  for (const r of view.slice(0, shown)) {
    const tr = document.createElement("tr"); tr.dataset.name = r.name;
    cell(tr, r.name, "t"); cell(tr, r.collection, "t wide"); cell(tr, size(r.size));
    cell(tr, r.seeders < 0 ? "-" : r.seeders, r.band);
    cell(tr, r.leechers < 0 ? "-" : r.leechers, "wide");
    cell(tr, r.completed < 0 ? "-" : r.completed, "wide"); cell(tr, r.dht < 0 ? "-" : r.dht, "wide");
    cell(tr, r.verified < 0 ? "-" : r.verified + (r.web > 0 ? " +web" : ""), "wide");
    cell(tr, r.change === null ? "-" : (r.change > 0 ? "+" : "") + r.change, "wide");
    cell(tr, r.need === null ? "-" : r.need.toFixed(2)); tr.appendChild(trend(r.trend));
    const get = cell(tr, "", "get"); link(get, r.link, "torrent"); link(get, r.magnet, "magnet");
    frag.appendChild(tr);
  }
  body.replaceChildren(frag);
  $("spacebox").hidden = list !== "pick";
  $("magnets").hidden = list !== "pick" || !view.length;
  $("magnets").value = list === "pick" ? view.map(r => r.magnet).join("\\n") : "";
  const note = $("listnote");
  note.hidden = !list;
  note.textContent = list === "dead"
    ? "Dead: no tracker counts a seeder, the DHT knows none, and no peer nor web seed showed a complete copy. Nobody can download these: they are lost unless someone who has them comes back."
    : list !== "pick" ? "" : bytes === null ? "Not a size: write it like 500GB, 2TB or 1.5TiB."
    : "Downloadable red torrents, then yellow, the neediest first, that fit " + size(bytes) +
      " (" + size(view.reduce((sum, r) => sum + r.size, 0)) + " picked). tsmd pick gives the list with a random spread, so that volunteers do not all pick the same torrents.";
  $("count").textContent = Math.min(shown, view.length) + " of " + view.length + " shown";
  $("more").hidden = shown >= view.length;
  document.querySelectorAll("th[data-key]").forEach(th => {
    if (order && th.dataset.key === order.key) {
      th.setAttribute("aria-sort", order.dir > 0 ? "ascending" : "descending");
    } else th.removeAttribute("aria-sort");
  });
  const saved = order ? {sort: order.key, dir: order.dir > 0 ? "asc" : "desc"} : {};
  for (const [key, value] of Object.entries({q, band, list})) if (value) saved[key] = value;
  if (list === "pick") saved.space = space;
  history.replaceState(null, "", "#" + new URLSearchParams(saved).toString());
}
// The address's fragment holds the view (a bookmark, a link, the back button): read at load
// and whenever it changes.
function fromHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  order = KEYS.includes(p.get("sort")) ? {key: p.get("sort"), dir: p.get("dir") === "desc" ? -1 : 1}
                                       : null;
  $("q").value = p.get("q") || "";
  $("band").value = p.get("band") || "";
  $("list").value = ["pick", "dead"].includes(p.get("list")) ? p.get("list") : "";
  if (p.has("space")) $("space").value = p.get("space");
  return (p.get("click") || "").split(",").filter(Boolean);
}
// The headers' buttons sort: by mouse, and by keyboard (Tab, then Enter or Space).
document.querySelectorAll("th[data-key]").forEach(th => th.addEventListener("click", () => {
  const key = th.dataset.key;
  order = {key, dir: order && order.key === key ? -order.dir
                                                : (key === "size" || key === "completed" ? -1 : 1)};
  shown = PAGE; render();
}));
for (const [id, event] of [["q", "input"], ["band", "change"], ["list", "change"], ["space", "input"]]) {
  $(id).addEventListener(event, () => { shown = PAGE; render(); });
}
$("more").addEventListener("click", () => { shown += PAGE; render(); });
addEventListener("hashchange", () => { fromHash(); shown = PAGE; render(); });
$("app").hidden = false;
// #click=seeders,seeders clicks those headers once the page is up (for tests and bookmarks).
const clicks = fromHash(); render();
for (const key of clicks) document.querySelector(`th[data-key="${CSS.escape(key)}"]`)?.click();
</script></body></html>
"""


def _json_for_script(value: Any) -> str:
    """JSON that cannot end its <script> element early, whatever the strings hold."""
    return (json.dumps(value, ensure_ascii=False, separators=(",", ":"))
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


CHART_DAYS: Final = TREND_DAYS  # the folded history keeps a month of daily points
CHART_BANDS: Final = ("red", "yellow", "green")  # bottom to top; grey, not measured, above them
NOSCRIPT_ROWS: Final = 100  # the neediest torrents a page read without JavaScript lists


def band_history(rows: Iterable[ReportRow], trends: dict[str, str], today: int
                 ) -> dict[str, list[list[int]]]:
    """Per collection, for each of the CHART_DAYS days up to `today` (days since 1970-01-01),
    the bytes of its torrents in each of CHART_BANDS by their seeders that day (the last run's
    of the day, as SeederHistory folds them). A torrent with no point on a day, or of unknown
    size, counts on no band that day; a collection none of whose torrents has a history is
    left out."""
    start = today - CHART_DAYS + 1
    # "12" -> 2, the slot of its band in a day's list; slot 3 gathers what has no band (a day
    # without a run, "", or text that is not a count): a dictionary lookup a point, for the
    # three million points of 100,000 torrents.
    band_of: dict[str, int] = {"": 3}
    history: dict[str, list[list[int]]] = {}
    for row in rows:
        text = trends.get(row.infohash)
        if not text or row.size_bytes <= 0:
            continue
        first, _, values = text.partition(";")
        try:
            offset = int(first) - start
        except ValueError:  # not one tsmd wrote (a hand-edited database): no history
            continue
        if offset >= CHART_DAYS or offset <= -len(values):
            continue  # not a point in the window (len(values) bounds the number of points)
        days = history.get(row.collection)
        if days is None:
            days = history[row.collection] = [[0, 0, 0, 0] for _ in range(CHART_DAYS)]
        size = row.size_bytes
        points = values.split(",")[max(0, -offset):CHART_DAYS - offset]
        for day, value in zip(days[max(0, offset):], points):
            band = band_of.get(value)
            if band is None:
                try:
                    band = CHART_BANDS.index(seeder_band_value(int(value)))
                except ValueError:  # not a count, or negative: no band
                    band = 3
                band_of[value] = band
            day[band] += size
    # Three bands a day; a collection with no point in the window has no chart.
    return {collection: [day[:3] for day in days] for collection, days in history.items()
            if any(any(day[:3]) for day in days)}


def band_chart(collection: str, days: Sequence[Sequence[int]], total: int, today: int) -> str:
    """An inline SVG of band_history's days for one collection: a bar a day, red at the
    bottom, then yellow and green, and grey for the bytes of today's torrents that were not
    measured that day; no bar on a day without a run. Each part says its bytes in a <title>."""
    width, height, bar = 300, 80, 10
    scale = max([total, *(sum(day) for day in days)]) or 1
    start = today - CHART_DAYS + 1
    parts = []
    for index, day in enumerate(days):
        if not any(day):
            continue
        date = time.strftime("%Y-%m-%d", time.gmtime((start + index) * DAY))
        top = float(height)
        for band, value in (*zip(CHART_BANDS, day), ("grey", max(total - sum(day), 0))):
            if value <= 0:
                continue
            tall = value / scale * height
            top -= tall
            parts.append(f'<rect class="{band}" x="{index * bar}" y="{top:.2f}" '
                         f'width="{bar - 1}" height="{tall:.2f}" data-day="{start + index}" '
                         f'data-band="{band}" data-bytes="{value}"><title>{date}: '
                         f'{_human_size(value)} {"not measured" if band == "grey" else band}'
                         "</title></rect>")
    first, last = (time.strftime("%Y-%m-%d", time.gmtime(day * DAY)) for day in (start, today))
    name = html.escape(collection)
    return (f'<figure><svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'role="img" aria-label="{name}: bytes per seeder band each day, {first} to {last}">'
            + "".join(parts) + f"</svg><figcaption>{name}: bytes per band, {first} to {last}"
            "</figcaption></figure>")


def noscript_rows(neediest: Sequence[ReportRow], total: int) -> str:
    """The neediest torrents (the first of the plan's order) as a plain table, for a page read
    without JavaScript (a text browser, a locked-down one, a search engine)."""
    lines = [f"<p>The {len(neediest)} neediest of {_plural(total, 'torrent')} (the page "
             "sorts, filters and picks with JavaScript):</p>\n<div class=\"scroll\"><table><tr>"
             '<th class="t">name</th><th class="t wide">collection</th><th>size</th><th>seeders</th>'
             "<th>need</th><th>get</th></tr>"]
    for row in neediest:
        links = " ".join(f'<a href="{html.escape(href)}" rel="nofollow noreferrer">{text}</a>'
                         for href, text in ((row.link, "torrent"), (row.magnet, "magnet"))
                         if href[:8].lower().startswith(("http://", "https://", "magnet:")))
        lines.append(
            f'<tr><td class="t">{html.escape(row.name)}</td>'
            f'<td class="t wide">{html.escape(row.collection)}</td><td>{_human_size(row.size_bytes)}'
            f'</td><td class="{row.band}">{row.seeders if row.seeders >= 0 else "-"}</td>'
            f'<td>{"-" if row.need is None else f"{row.need:.2f}"}</td><td>{links}</td></tr>')
    lines.append("</table></div>")
    return "\n".join(lines)


def render_html(rows: Sequence[ReportRow], trends: dict[str, str] | None = None,
                generated: float | None = None, notes: Sequence[str] = (),
                unused_trackers: Sequence[tuple[str, str]] = ()) -> str:
    """One self-contained page for volunteers: per-collection summary and chart of the last
    month, and a table of every torrent that sorts, filters, lists the dead and picks what fits
    a disk in the page (500 rows drawn at a time); without JavaScript, the neediest hundred.
    `notes` are warnings shown above it all; `unused_trackers` (URL, why) are listed greyed
    below."""
    trends = trends or {}
    now = generated or time.time()
    today = int(now // DAY)
    totals_by_collection = collection_totals(rows)
    summary = ["<table><tr><th class=\"t\">collection</th><th>torrents</th><th>size</th>"
               + "".join(f"<th class=\"{band.value}\">{band.value}</th>" for band in Band)
               + "<th>dead</th></tr>"]
    for collection, totals in totals_by_collection.items():
        cells = []
        for band in Band:
            part = totals.bytes_by_band[band.value]
            width = 100 * part / (totals.size_bytes or 1)
            cells.append(f"<td>{_human_size(part)} <span class=\"bar {band.value}\" "
                         f"style=\"width:{width:.0f}px\"></span></td>")
        summary.append(f"<tr><td class=\"t\">{html.escape(collection)}</td><td>{totals.torrents:,}</td>"
                       f"<td>{_human_size(totals.size_bytes)}</td>"
                       + "".join(cells) + f"<td>{totals.dead:,}</td></tr>")
    summary.append("</table>")
    history = band_history(rows, trends, today)
    charts = "" if not history else (
        f"<h2>The last {CHART_DAYS} days</h2>\n<p>Bytes of each collection by its torrents' "
        "seeders that day: <span class=\"swatch red\"></span> red, "
        "<span class=\"swatch yellow\"></span> yellow, <span class=\"swatch green\"></span> "
        "green, <span class=\"swatch grey\"></span> not measured that day.</p>\n"
        "<div class=\"charts\">"
        + "".join(band_chart(collection, days, totals_by_collection[collection].size_bytes,
                             today) for collection, days in history.items()) + "</div>\n")
    # The plan's order, whatever order the rows came in: the page's pick list follows it, and
    # the <noscript> table shows its head.
    in_plan_order = select_report_rows(rows, "need", None, None)
    rank = {id(row): place for place, row in enumerate(in_plan_order)}
    # A magnet's trackers repeat across thousands of torrents: the page gets each list once.
    tracker_lists: dict[str, int] = {"": 0}
    data = []
    for row in rows:
        head, _, tracker_list = row.magnet.removeprefix(MAGNET_PREFIX).partition("&tr=")
        data.append([
            row.name, row.collection, row.size_bytes, row.seeders, row.leechers, row.completed,
            row.dht_peers, row.band, None if row.need is None else round(row.need, 4),
            row.seeders_change_1d, None if row.link == row.magnet else row.link, head,
            tracker_lists.setdefault(tracker_list, len(tracker_lists)),
            trends.get(row.infohash, ""), plan_group(row), rank[id(row)], row.verified_seeds,
            row.webseeds_ok])
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(now))
    unused = "" if not unused_trackers else (
        "<h2>Trackers whose numbers are not used</h2>\n<div class=\"scroll\"><table class=\"unused\">"
        "<tr><th class=\"t\">tracker</th><th class=\"t\">why</th></tr>"
        + "".join(f"<tr><td class=\"t\">{html.escape(url)}</td><td class=\"t\">"
                  f"{html.escape(why)}</td></tr>" for url, why in unused_trackers)
        + "</table></div>\n")
    parts = {"SUMMARY": "\n".join(summary), "CHARTS": charts, "UNUSED": unused,
             "NOSCRIPT": noscript_rows(in_plan_order[:NOSCRIPT_ROWS], len(rows)),
             "NOTES": "".join(f'<p class="note">{html.escape(note)}</p>\n' for note in notes),
             "GENERATED": stamp, "VERSION": __version__,
             "DATA": _json_for_script([today, list(tracker_lists), data])}
    # One pass over the template: a collection or tracker named "__DATA__" stays a name.
    return _PAGE_SLOT.sub(lambda slot: parts[slot.group(1)], HTML_PAGE)


_PAGE_SLOT: Final = re.compile(
    r"__(SUMMARY|CHARTS|NOSCRIPT|UNUSED|NOTES|GENERATED|VERSION|DATA)__")


def stale_measurements(db: sqlite3.Connection) -> list[str]:
    """A sentence for each measuring stage whose last run found the network unreachable: its
    numbers in the reports are those of earlier runs."""
    notes = []
    for stage, what in (("dht", "DHT"), ("probe", "probe"), ("scrape", "tracker")):
        last = db.execute("SELECT started, outcome FROM runs WHERE stage = ? AND outcome NOT IN "
                          "('running', 'interrupted') ORDER BY id DESC LIMIT 1",
                          (stage,)).fetchone()
        if last is not None and last[1] == "unreachable":
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(last[0]))
            notes.append(f"The last {stage} run ({when}) heard nothing from the network: the "
                         f"{what} numbers here are from earlier runs.")
    return notes


def load_trends(db: sqlite3.Connection) -> dict[str, str]:
    """Per infohash, SeederHistory.trend_text of the torrents scraped in the last TREND_DAYS."""
    return dict(db.execute(
        "SELECT t.infohash, s.trend FROM seeder_trends s JOIN torrents t ON t.id = s.torrent_id "
        "WHERE s.latest >= ?", (int(time.time()) - TREND_DAYS * DAY,)))


REPORT_CHUNKS: Final = {"json": json_chunks, "ndjson": ndjson_chunks, "csv": csv_chunks}
REPORT_FORMATS: Final = ("table", "html", "prometheus", *REPORT_CHUNKS, "rss")
REPORT_FILE_FORMATS: Final = REPORT_FORMATS[1:]
RSS_NEEDS_PICK: Final = ("rss is a feed that a BitTorrent client downloads whole: it needs a pick, "
                         "the disk space it may fill")


def render_report(db: sqlite3.Connection, rows: Sequence[ReportRow], report_format: str,
                  per_torrent: bool = False, excluded: Iterable[str] = (),
                  picked_for: int = 0) -> Iterable[str]:
    """`rows` in any format but the terminal table, as pieces of text to write in order: the
    big formats are never all in memory at once. `picked_for` is the budget the rows were
    picked for, if they were (pick_torrents)."""
    if report_format == "html":
        return (render_html(rows, load_trends(db), notes=stale_measurements(db),
                            unused_trackers=load_unused_trackers(db, excluded)),)
    if report_format == "prometheus":
        return (render_prometheus(rows, per_torrent),)
    if report_format == "rss":
        return rss_chunks(rows, picked_for)
    return REPORT_CHUNKS[report_format](rows)


def _lists_torrents(path: Path, db: sqlite3.Connection, report_format: str,
                    picked_for: int = 0) -> bool:
    """Whether the report at `path` lists torrents: it is larger than a report of none in its
    format (give or take a time stamp or a note)."""
    try:
        size = path.stat().st_size
    except OSError:
        return False
    return size > sum(len(chunk.encode()) for chunk in
                      render_report(db, [], report_format, picked_for=picked_for)) + 256


def write_atomically(path: Path, text: str | Iterable[str]) -> None:
    """Write via a temporary file and rename, so a reader never sees half a report."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("w", encoding="utf-8") as handle:
            handle.writelines([text] if isinstance(text, str) else text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise TsmdError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:  # Ctrl-C half way: no temporary file left in a web root
        temporary.unlink(missing_ok=True)
        raise


# ---- Whole runs: publishing, retention, status ----


@dataclass(slots=True)
class PublishCounts:
    outputs: int = 0
    written: int = 0
    failed: int = 0
    torrents: int = 0

    def summary(self) -> str:
        if not self.outputs:
            return "no [report] outputs configured"
        failed = f", {self.failed} failed" if self.failed else ""
        return f"{self.written} of {self.outputs} reports written{failed}, {self.torrents:,} torrents"


async def publish_reports(db: sqlite3.Connection, settings: Settings, *, reporter: Reporter,
                          allow_empty: bool = False) -> PublishCounts:
    """Write every report of [report].outputs, each atomically; one that fails is counted.
    A report of no torrent does not replace one that lists torrents unless `allow_empty`: a
    collection whose listing broke would otherwise wipe the published feed."""
    counts = PublishCounts(outputs=len(settings.report.outputs))
    if not settings.report.outputs:
        return counts
    excluded = _normalised(settings.scrape.exclude)
    rows = select_report_rows(load_report_rows(db, excluded=excluded), "need", None, None)
    counts.torrents = len(rows)
    for output in settings.report.outputs:
        await trio.lowlevel.checkpoint()  # Ctrl-C and SIGTERM are heard between files
        path = Path(output.path)
        chosen = pick_torrents(rows, output.pick) if output.pick > 0 else rows
        if not rows and not allow_empty and _lists_torrents(path, db, output.format, output.pick):
            counts.failed += 1
            reporter.problem(f"report {path} not replaced by one of no torrent (a broken "
                             "listing?); `tsmd run --allow-empty` replaces it")
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, render_report(db, chosen, output.format, excluded=excluded,
                                                 picked_for=output.pick))
            if note := seedtools_note(chosen, output.format):
                reporter.info(f"report {path}: {note}")
            counts.written += 1
        except OSError as exc:
            counts.failed += 1
            reporter.problem(f"report {path}: {exc.strerror or exc}")
        except TsmdError as exc:
            counts.failed += 1
            reporter.problem(str(exc))
    return counts


def judge_publish(counts: PublishCounts) -> tuple[str, ExitCode]:
    return ("partial", ExitCode.PARTIAL) if counts.failed else ("ok", ExitCode.OK)


async def apply_retention(db: sqlite3.Connection, settings: Settings, *, reporter: Reporter,
                          samples: float | None = None, nodes: float | None = None) -> PruneCounts:
    """prune_database with ages in seconds (default: [retention]; 0 keeps everything). A stage
    like the others, so that its run is recorded."""
    now = time.time()
    samples = settings.retention.samples if samples is None else samples
    nodes = settings.retention.nodes if nodes is None else nodes
    return prune_database(db, now - samples if samples else None, now - nodes if nodes else None)


STATUS_STAGES: Final = ("run", "sync", "dht", "probe", "scrape", "report", "prune")


def load_status(db: sqlite3.Connection, database: Path) -> dict[str, Any]:
    """What `tsmd status` shows: collections, torrents, the last run of each stage, sizes."""
    now = int(time.time())
    collections = [
        {"name": name, "enabled": bool(enabled), "torrents": torrents, "bytes": size or 0,
         "last_synced": last_synced, "last_error": last_error}
        for name, enabled, torrents, size, last_synced, last_error in db.execute(
            "SELECT c.name, c.enabled, count(t.id), sum(t.size_bytes), c.last_synced, "
            "       c.last_error FROM collections c "
            "LEFT JOIN memberships m ON m.collection_id = c.id AND m.removed IS NULL "
            "LEFT JOIN torrents t ON t.id = m.torrent_id GROUP BY c.id ORDER BY c.name")]
    listed = db.execute("SELECT count(DISTINCT torrent_id) FROM memberships "
                        "WHERE removed IS NULL").fetchone()[0]
    scraped = db.execute("SELECT count(DISTINCT torrent_id) FROM tracker_latest "
                         "WHERE measured >= ?", (now - TRACKER_SAMPLE_FRESHNESS,)).fetchone()[0]
    in_dht = db.execute("SELECT count(*) FROM dht_latest").fetchone()[0]
    probed = db.execute("SELECT count(*) FROM probe_latest WHERE measured >= ?",
                        (now - PROBE_SAMPLE_FRESHNESS,)).fetchone()[0]
    busy = DatabaseLock(database).held_by()
    runs = {}
    for stage in STATUS_STAGES:
        row = db.execute("SELECT started, finished, outcome, counts, error FROM runs "
                         "WHERE stage = ? ORDER BY id DESC LIMIT 1", (stage,)).fetchone()
        if row:
            started, finished, outcome, counts, error = row
            if outcome == "running" and busy is None:
                # Nobody holds the lock, so the tsmd of this run has died (as the next writer
                # will record: close_orphaned_runs). `status` only reads.
                outcome, error = "interrupted", "the process ended without finishing (killed?)"
            runs[stage] = {"started": int(started), "seconds": None if finished is None else
                           round(finished - started, 1), "outcome": outcome,
                           "counts": json.loads(counts), "error": error}
    broken = [{"collection": name, "source": source, "failures": failures, "error": error}
              for name, source, failures, error in db.execute(
                  "SELECT c.name, m.source, m.failures, m.last_error FROM memberships m "
                  "JOIN collections c ON c.id = m.collection_id WHERE m.failures >= ? "
                  "AND m.removed IS NULL ORDER BY c.name, m.source", (BROKEN_AFTER,))]
    files = [database, database.with_name(database.name + "-wal")]
    return {"database": str(database), "broken": broken,
            "bytes": sum(f.stat().st_size for f in files if f.exists()),
            "busy": busy,
            "torrents": listed, "torrents_scraped": scraped, "torrents_in_dht": in_dht,
            "torrents_probed": probed,
            "dht_nodes": db.execute("SELECT count(*) FROM dht_nodes").fetchone()[0],
            "collections": collections, "runs": runs}


def render_status(status: dict[str, Any], console: Console) -> None:
    from rich.table import Table

    now = time.time()
    console.print(f"database {status['database']}: {_human_size(status['bytes'])}, "
                  f"{status['torrents']:,} torrents listed ({status['torrents_scraped']:,} with "
                  f"fresh tracker numbers, {status['torrents_in_dht']:,} looked up in the DHT, "
                  f"{status['torrents_probed']:,} probed), "
                  f"{status['dht_nodes']:,} DHT nodes cached", markup=False)
    if status["busy"]:
        console.print(f"busy: {status['busy']}", markup=False)
    table = Table(title="collections", title_justify="left")
    for column in ("name", "torrents", "size", "last synced", "last error"):
        table.add_column(column, justify="right" if column in ("torrents", "size") else "left")
    for c in status["collections"]:
        table.add_row(escape_markup(c["name"]) + ("" if c["enabled"] else " (disabled)"),
                      f"{c['torrents']:,}", _human_size(c["bytes"]), _ago(c["last_synced"], now),
                      escape_markup(c["last_error"] or ""))
    console.print(table)
    table = Table(title="last runs", title_justify="left")
    for column in ("stage", "started", "took", "outcome", "error"):
        table.add_column(column)
    for stage in STATUS_STAGES:
        run = status["runs"].get(stage)
        if run is None:
            table.add_row(stage, "never", "", "", "")
            continue
        took = "" if run["seconds"] is None else f"{run['seconds']:.1f} s"
        style = {"ok": "green", "partial": "yellow"}.get(run["outcome"], "red")
        table.add_row(stage, _ago(run["started"], now), took,
                      f"[{style}]{run['outcome']}[/{style}]", escape_markup(run["error"] or ""))
    console.print(table)
    if status["broken"]:
        table = Table(title=f"broken: {len(status['broken']):,} entries failed "
                      f"{BROKEN_AFTER}+ syncs in a row (no longer in the exit code)",
                      title_justify="left")
        for column in ("collection", "entry", "syncs", "error"):
            table.add_column(column)
        for entry in status["broken"][:20]:
            table.add_row(escape_markup(entry["collection"]), escape_markup(entry["source"]),
                          str(entry["failures"]), escape_markup(entry["error"] or ""))
        console.print(table)
        if len(status["broken"]) > 20:
            console.print(f"... and {len(status['broken']) - 20:,} more (tsmd status --format "
                          "json lists them all)", markup=False)


# ---- Command line ----

class LazyCli:
    """The command line. Commands register here as they are defined, and typer builds the
    application on first use, so that `tsmd --version` answers without importing typer (half
    its time). Calling it adds one guard: a database that fails in the middle of any command (a
    full disk, a read-only or damaged file) is said in one line with exit code 3, not shown as
    a traceback. What was committed stays committed."""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self._registered: list[tuple[str, tuple, dict, Callable[..., Any]]] = []
        self._typer: typer.Typer | None = None

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Any]:
        return self._register("command", args, kwargs)

    def callback(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Any]:
        return self._register("callback", args, kwargs)

    def _register(self, kind: str, args: tuple, kwargs: dict) -> Callable[..., Any]:
        def register(function: Callable[..., Any]) -> Callable[..., Any]:
            self._registered.append((kind, args, kwargs, function))
            return function
        return register

    def typer(self) -> typer.Typer:
        if self._typer is None:
            application = typer.Typer(**self.options)
            for kind, args, kwargs, function in self._registered:
                getattr(application, kind)(*args, **kwargs)(function)
            self._typer = application
        return self._typer

    def __call__(self) -> Any:
        argv = sys.argv[1:]
        if argv == ["--version"]:
            print(f"tsmd {__version__}")
            return None
        try:
            return self.typer()(args=_bare_wait_means_forever(argv), prog_name="tsmd")
        # Not `except sqlite3.Error`: matching every command's SystemExit would load sqlite3.
        except Exception as exc:
            if not isinstance(exc, sqlite3.Error):
                raise
            where = f" {_database_in_use}" if _database_in_use else ""
            _say_error(f"database{where}: {exc}")
            sys.exit(int(ExitCode.DATABASE))


_database_in_use: Path | None = None  # for the guard's message: the one _open_db opened

app = LazyCli(
    name="tsmd", no_args_is_help=True, rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Torrent Swarm Monitoring Daemon: which torrents of a collection need seeders?")


@dataclass(slots=True)
class CliState:
    config: Path | None
    db: Path | None
    verbosity: int


def _version_callback(value: bool) -> None:
    if value:
        print(f"tsmd {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option(
        "--config", envvar="TSMD_CONFIG", help="Configuration file (default: ./tsmd.toml if present).",
        dir_okay=False)] = None,
    db: Annotated[Optional[Path], typer.Option(
        "--db", envvar="TSMD_DB", help="SQLite database (overrides 'database' of the config).",
        dir_okay=False)] = None,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True,
                                         help="Say more; -v also lists every failure.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")] = False,
    version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version_callback, is_eager=True, help="Print the version.")] = None,
) -> None:
    """Torrent Swarm Monitoring Daemon: which torrents of a collection need seeders?"""
    if config is None and Path("tsmd.toml").is_file():
        config = Path("tsmd.toml")
    ctx.obj = CliState(config=config, db=db, verbosity=-1 if quiet else verbose)


def _say_error(message: str) -> None:
    if sys.stderr.isatty():
        rich_console.Console(stderr=True, highlight=False, soft_wrap=True).print(
            f"tsmd: {message}", markup=False, style="bold red")
    else:
        sys.stderr.write(f"tsmd: {message}\n")


def _fail(message: str, code: ExitCode) -> typer.Exit:
    """Say `message`; the Exit to raise with `code`."""
    _say_error(message)
    return typer.Exit(int(code))


def _load(ctx: typer.Context) -> tuple[Settings, Reporter]:
    state: CliState = ctx.obj
    try:
        settings = load_settings(state.config, state.db)
    except TsmdError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    return settings, Reporter(state.verbosity)


def _open_db(settings: Settings) -> sqlite3.Connection:
    global _database_in_use
    _database_in_use = settings.database
    try:
        return open_database(settings.database)
    except TsmdError as exc:
        raise _fail(str(exc), exc.exit_code) from None


def _require_database(settings: Settings) -> None:
    """For a command with nothing to do without data: a typo in --db or --config must not
    quietly create an empty database (and publish an empty feed from it)."""
    if not settings.database.is_file():
        raise _fail(f"no database at {settings.database}: run `tsmd sync` (or `tsmd run`) "
                    "first, or check --db and --config", ExitCode.USAGE)


def _open_existing_db(settings: Settings) -> sqlite3.Connection:
    """The database of a command that only reads."""
    _require_database(settings)
    return _open_db(settings)


def _report_rows(db: sqlite3.Connection, settings: Settings,
                 collections: Sequence[str]) -> list[ReportRow]:
    """The report rows of the named collections (all when none is named); a name that is
    neither in the database nor in the configuration is a usage error."""
    try:
        if collections:
            known = {name for (name,) in db.execute("SELECT name FROM collections")}
            known.update(c.name for c in settings.collections)
            unknown = [name for name in collections if name not in known]
            if unknown:
                raise _fail(f"no collection named '{unknown[0]}' (known: "
                            f"{', '.join(sorted(known)) or 'none'})", ExitCode.USAGE)
        return load_report_rows(db, collections, _normalised(settings.scrape.exclude))
    except sqlite3.Error as exc:  # a damaged file: said, not a traceback
        raise _fail(f"database {settings.database}: {exc}", ExitCode.DATABASE) from None


def run_interruptible(async_fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, bool]:
    """trio.run a stage; SIGTERM or Ctrl-C cancel it cleanly. Returns (result, interrupted).

    A TsmdError or a database error (a full disk in the writer task) from the stage is raised
    as itself, out of trio's exception groups.
    """
    import signal

    outcome: dict[str, Any] = {"interrupted": False}

    async def supervised() -> None:
        async with trio.open_nursery() as nursery:
            async def watch_sigterm(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                with trio.open_signal_receiver(signal.SIGTERM) as signals:
                    task_status.started()
                    async for _ in signals:
                        outcome["interrupted"] = True
                        nursery.cancel_scope.cancel()

            if hasattr(signal, "SIGTERM"):  # watched before the stage starts, not soon after
                await nursery.start(watch_sigterm)
            outcome["result"] = await async_fn(*args, **kwargs)
            nursery.cancel_scope.cancel()

    try:
        trio.run(supervised)
    except BaseException as error:  # noqa: B902 - sorted out right here
        leaves = _leaf_exceptions(error)
        if all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            outcome["interrupted"] = True
        else:
            said = [leaf for leaf in leaves if isinstance(leaf, (TsmdError, sqlite3.Error))]
            if said and len(said) == len(leaves):
                raise said[0] from None
            raise
    return outcome.get("result"), outcome["interrupted"]


async def probe_dht_routers(entries: Sequence[str], timeout: float) -> tuple[int, list[float]]:
    """How many of the bootstrap routers resolve, and the round trips (s) of those that answer a
    ping over UDP within `timeout`: one packet to the first address of each (IPv4 first)."""
    resolved: dict[str, list[DhtNode] | str] = {}
    with trio.move_on_after(timeout):
        await resolve_routers(entries, resolved)
    first = {entry: min(nodes, key=lambda node: ":" in node.host)  # IPv4 first
             for entry, nodes in resolved.items() if isinstance(nodes, list) and nodes}
    answered: list[float] = []
    if not first:
        return 0, answered
    endpoint = UdpEndpoint.open("[::]:0", krpc_transaction_untrusted)
    node_id = os.urandom(20)

    async def ping(number: int, node: DhtNode) -> None:
        transaction = number.to_bytes(2, "big")
        sent = trio.current_time()
        with contextlib.suppress(NotSent):
            if await endpoint.request(encode_ping(transaction, node_id), node.host, node.port,
                                      transaction, timeout) is not None:
                answered.append(trio.current_time() - sent)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(endpoint.receive_forever)
            async with trio.open_nursery() as pings:
                for number, node in enumerate(first.values()):
                    pings.start_soon(ping, number, node)
            nursery.cancel_scope.cancel()
    finally:
        endpoint.close()
    return len(first), answered


def first_run_lines(settings: Settings, routers: int, resolved: int,
                    answered: list[float]) -> list[str]:
    """What `tsmd init` says: each check in one line, then what the first run will do."""
    lines = []
    folder = settings.database.parent
    if not folder.is_dir():
        lines.append(f"database: {settings.database}: the folder does not exist; create it")
    elif not os.access(folder, os.W_OK):
        lines.append(f"database: {settings.database}: the folder is not writable")
    else:
        lines.append(f"database: {settings.database} (folder writable)")
    enabled = [c for c in settings.collections if c.enabled]
    lines.append(f"collections: {len(enabled)} enabled" + "".join(
        f"; {c.name} ({c.url})" for c in enabled[:3]) + ("; ..." if len(enabled) > 3 else ""))
    if not resolved:
        lines.append(f"DHT: none of the {routers} bootstrap routers resolves: offline, or DNS "
                     "down? `tsmd run` would stop its DHT stage with exit 69")
    elif not answered:
        lines.append(f"DHT: {resolved} of {routers} routers resolve, none answered over UDP: "
                     "UDP blocked? leave \"dht\" out of [run] stages")
    else:
        lines.append(f"DHT: {resolved} of {routers} routers resolve, {len(answered)} answered "
                     f"over UDP (fastest {min(answered) * 1000:.0f} ms)")
    rate = settings.dht.rate or math.inf
    lines.append(
        f"first run (tsmd run): fetches the index of each enabled collection and its .torrent "
        f"files, looks each torrent up in the DHT at {rate:g} packets/s (about "
        f"{rate / 12:.0f} lookups a second: 5,000 torrents take about "
        f"{5000 / (rate / 12) / 60:.0f} minutes), asks every torrent's trackers, and writes "
        f"{len(settings.report.outputs)} reports. Later runs fetch only what changed.")
    return lines


@app.command()
def init(
    ctx: typer.Context,
    force: Annotated[bool, typer.Option(help="Replace the configuration file if it exists.")
                     ] = False,
    offline: Annotated[bool, typer.Option(help="Write the file and ask nothing on the network."
                                          )] = False,
    bootstrap: Annotated[Optional[list[str]], typer.Option(
        "--bootstrap", metavar="HOST:PORT", help="Check these DHT routers instead of those of "
        "the new file (repeatable).")] = None,
) -> None:
    """Write a commented tsmd.toml (or --config FILE) with every setting at its default, then
    check in one line each what the first run needs: a writable database folder, DHT routers
    that resolve and answer over UDP (one ping each), and say what `tsmd run` will contact.

    Example: tsmd init && tsmd run
    """
    state: CliState = ctx.obj
    path = state.config or Path("tsmd.toml")
    if path.exists() and not force:
        raise _fail(f"{path} exists: edit it, or `tsmd init --force` to replace it",
                    ExitCode.USAGE)
    _host_port_options(bootstrap or [], "--bootstrap")
    try:
        path.write_text(EXAMPLE_CONFIG, encoding="utf-8")
    except OSError as exc:
        raise _fail(f"cannot write {path}: {exc.strerror or exc}", ExitCode.USAGE) from None
    settings = load_settings(path, state.db)
    console = rich_console.Console(highlight=False, soft_wrap=True)
    console.print(f"config: {path} written; edit its [[collections]] to choose what to watch",
                  markup=False)
    routers = bootstrap or settings.dht.bootstrap
    resolved, answered = 0, []
    if not offline:
        probed, interrupted = run_interruptible(probe_dht_routers, routers, 3.0)
        if interrupted:  # the file is written; only the check was cut short
            raise typer.Exit(int(ExitCode.INTERRUPTED))
        resolved, answered = probed
    lines = first_run_lines(settings, len(routers), resolved, answered)
    if offline:
        lines = [line for line in lines if not line.startswith("DHT:")]
    for line in lines:
        console.print(line, markup=False)


@app.command()
def sync(
    ctx: typer.Context,
    collection: Annotated[Optional[list[str]], typer.Option(
        "--collection", "-c", metavar="NAME", help="Only this collection (repeatable).")] = None,
    revalidate: Annotated[bool, typer.Option(
        help="Re-check every known .torrent with a conditional request, however recent.")] = False,
    accept_removals: Annotated[bool, typer.Option(
        help=ACCEPT_REMOVALS_HELP)] = False,
    wait: Annotated[Optional[str], typer.Option(
        "--wait", metavar="[SECONDS]", help=WAIT_OPTION_HELP)] = None,
) -> None:
    """Fetch every enabled collection's torrents into the database.

    Example: tsmd --config tsmd.toml sync --collection libgen-books
    """
    settings, reporter = _load(ctx)
    chosen = _collections_to(settings, collection or [], "sync")
    run_stage_command(settings, reporter, "sync", run_sync, SyncCounts(len(chosen)),
                      sync_judge(reporter), wait=_wait_option(wait), collections=chosen,
                      revalidate=revalidate, accept_removals=accept_removals)



def _collections_to(settings: Settings, names: Sequence[str],
                    verb: str) -> list[CollectionSettings]:
    """The collections a command works on; at least one, or a usage error."""
    try:
        chosen = select_collections(settings, names)
    except TsmdError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    if not chosen:
        raise _fail(f"no enabled collections to {verb}: add [[collections]] to the "
                    "configuration "
                    f"({settings.config_path or 'no config file given; see --config'})",
                    ExitCode.USAGE)
    return chosen


def _duration_option(value: str | None, option: str) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise _fail(f"{option}: {exc}", ExitCode.USAGE) from None


def _infohash_options(values: Sequence[str]) -> list[str]:
    try:
        return [parse_infohash_untrusted(v) for v in values]
    except ProtocolError as exc:
        raise _fail(f"--infohash: {exc}", ExitCode.USAGE) from None


def _stage_selection(settings: Settings, collection: Sequence[str] | None,
                     infohash: Sequence[str] | None, stale_after: str | None
                     ) -> tuple[list[CollectionSettings], list[str], float | None]:
    """What a measuring stage's command was asked to measure: its collections, infohashes
    and --stale-after; a bad one is said, with exit code 2."""
    stale = _duration_option(stale_after, "--stale-after")
    hashes = _infohash_options(infohash or [])
    try:
        return select_collections(settings, collection or []), hashes, stale
    except TsmdError as exc:
        raise _fail(str(exc), exc.exit_code) from None


def _tracker_options(values: Sequence[str]) -> list[str]:
    """--tracker URLs, normalised; one that is no tracker URL is a usage error."""
    urls = [normalise_tracker_url(value) for value in values]
    if None in urls:
        bad = values[urls.index(None)]
        raise _fail(f"--tracker: not a udp/http/https/ws/wss tracker URL: {bad!r}",
                    ExitCode.USAGE)
    return urls  # type: ignore[return-value]


def _host_port_options(values: Sequence[str], label: str) -> None:
    try:
        for value in values:
            split_host_port(value)
    except ValueError as exc:
        raise _fail(f"{label}: {exc}", ExitCode.USAGE) from None


def _format_option(value: str, known: Sequence[str]) -> None:
    if value not in known:
        raise _fail(f"unknown format '{value}' (known: {', '.join(known)})", ExitCode.USAGE)


def execute_stage(db: sqlite3.Connection, settings: Settings, reporter: Reporter, stage: str,
                  run: Any, no_counts: Any, judge: Any, *, with_run_id: bool = False,
                  **arguments: Any) -> ExitCode:
    """What every stage shares: record the run, run the stage (Ctrl-C and SIGTERM commit what
    was done), record the outcome whatever happens, summarise. A TsmdError is re-raised once
    its run is recorded as failed."""
    run_id = start_run(db, stage)
    started = time.monotonic()
    counts, outcome, error, code = no_counts, "failed", None, ExitCode.PARTIAL
    try:
        if with_run_id:
            arguments["run_id"] = run_id
        result, interrupted = run_interruptible(run, db, settings, reporter=reporter, **arguments)
        counts = result if result is not None else no_counts
        outcome, code = ("interrupted", ExitCode.INTERRUPTED) if interrupted else judge(counts)
    except TsmdError as exc:
        error, outcome = str(exc), exc.outcome
        raise
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        finish_run(db, run_id, outcome, dataclasses.asdict(counts), error)
        if stage == "scrape":
            summarize_scrape_runs(db)  # now, so that the next report need not
        reporter.flush_problems()
    reporter.info(f"{stage} {outcome}: {counts.summary()} in {time.monotonic() - started:.1f} s")
    return code


@contextlib.contextmanager
def writing_database(settings: Settings, wait: float, holder: str) -> Iterator[sqlite3.Connection]:
    """The database lock, then the database, with the runs of a tsmd that died closed."""
    lock = DatabaseLock(settings.database)
    try:
        lock.acquire(wait, holder)
    except TsmdError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    with lock:
        db = _open_db(settings)
        try:
            close_orphaned_runs(db)
            yield db
        finally:
            db.close()


def run_stage_command(settings: Settings, reporter: Reporter, stage: str, run: Any,
                      no_counts: Any, judge: Any, *, wait: float, with_run_id: bool = False,
                      **arguments: Any) -> None:
    """One stage as its own command: under the database lock, exiting with the stage's code."""
    with writing_database(settings, wait, f"tsmd {stage}") as db:
        try:
            code = execute_stage(db, settings, reporter, stage, run, no_counts, judge,
                                 with_run_id=with_run_id, **arguments)
        except TsmdError as exc:
            raise _fail(str(exc), exc.exit_code) from None
        except sqlite3.Error as exc:  # a full disk, a damaged file: said, not a traceback
            raise _fail(f"database {settings.database}: {exc}", ExitCode.DATABASE) from None
    if code:
        raise typer.Exit(int(code))


def judge_with_outage(reporter: Reporter, stage: str,
                      judge_heard: Callable[[Any], tuple[str, ExitCode]]) -> Any:
    """A stage's verdict: unreachable (exit 69) when it heard nothing, else judge_heard's."""
    def judge(counts: Any) -> tuple[str, ExitCode]:
        if counts.outage:
            reporter.problem(f"{stage}: {counts.outage}")
            return "unreachable", ExitCode.UNREACHABLE
        return judge_heard(counts)
    return judge


def sync_judge(reporter: Reporter) -> Any:
    return judge_with_outage(reporter, "sync", lambda counts: (
        ("partial", ExitCode.PARTIAL) if counts.failed else ("ok", ExitCode.OK)))


def dht_judge(reporter: Reporter) -> Any:
    return judge_with_outage(reporter, "dht", lambda counts: ("ok", ExitCode.OK))


def probe_judge(reporter: Reporter) -> Any:
    return judge_with_outage(reporter, "probe", lambda counts: ("ok", ExitCode.OK))


def scrape_judge(reporter: Reporter) -> Any:
    # A tracker that fails is common and reported; it does not fail the stage.
    return judge_with_outage(reporter, "scrape", lambda counts: (
        "partial" if counts.trackers_failed else "ok", ExitCode.OK))


ACCEPT_REMOVALS_HELP: Final = (
    "Accept this sync's removals however many: a listing that really shrank. Without it, a "
    "sync that would remove more than [sync] max_removed of a collection is refused.")
WAIT_OPTION_HELP: Final = ("If another tsmd is writing to the database, wait for it (at most "
                           "SECONDS, e.g. 600 or 10m; for as long as it takes without) instead "
                           f"of exiting with code {int(ExitCode.BUSY)}.")


def _wait_option(value: str | None) -> float:
    """Seconds to wait for the database lock: --wait alone (made --wait=forever before typer
    parses it) waits as long as it takes."""
    if value is None:
        return 0.0
    if value == "forever":
        return math.inf
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise _fail(f"--wait: {exc}", ExitCode.USAGE) from None


def _bare_wait_means_forever(argv: list[str]) -> list[str]:
    """typer has no option with an optional value: `--wait` followed by an option or by
    nothing becomes `--wait=forever`. (No command with --wait takes an argument.)"""
    return [("--wait=forever" if token == "--wait" and not (
        position + 1 < len(argv) and not argv[position + 1].startswith("-")) else token)
        for position, token in enumerate(argv)]


@app.command()
def dht(
    ctx: typer.Context,
    collection: Annotated[Optional[list[str]], typer.Option(
        "--collection", "-c", metavar="NAME", help="Only torrents of this collection (repeatable).")] = None,
    infohash: Annotated[Optional[list[str]], typer.Option(
        "--infohash", metavar="HEX", help="Only this torrent (40 hex or 32 base32; repeatable).")] = None,
    concurrency: Annotated[Optional[int], typer.Option(
        min=1, metavar="N", help="Lookups in flight (default: [dht].concurrency).")] = None,
    rate: Annotated[Optional[float], typer.Option(
        min=0, metavar="PPS", help="Packets per second; 0 lifts the global and per-IP limits "
                    "(closed test networks only).")] = None,
    bootstrap: Annotated[Optional[list[str]], typer.Option(
        "--bootstrap", metavar="HOST:PORT", help="HOST:PORT of a bootstrap node (repeatable; replaces [dht].bootstrap)."
    )] = None,
    bind: Annotated[Optional[str], typer.Option(
        metavar="ADDR:PORT", help="Local ADDR:PORT of the UDP socket (default: [dht].bind).")] = None,
    stale_after: Annotated[Optional[str], typer.Option(
        "--stale-after", metavar="DURATION", help="Skip torrents with a DHT sample newer than this, e.g. 12h.")] = None,
    wait: Annotated[Optional[str], typer.Option(
        "--wait", metavar="[SECONDS]", help=WAIT_OPTION_HELP)] = None,
) -> None:
    """Count each torrent's peers in the BitTorrent DHT (BEP 5), with BEP 33 estimates.

    Example: tsmd dht --collection libgen-books --stale-after 20h
    """
    settings, reporter = _load(ctx)
    _host_port_options(bootstrap or [], "dht")
    if bind:
        try:
            split_bind_address(bind)
        except ValueError as exc:
            raise _fail(f"dht: --bind: {exc}", ExitCode.USAGE) from None
    chosen, hashes, stale = _stage_selection(settings, collection, infohash, stale_after)
    run_stage_command(settings, reporter, "dht", run_dht, DhtCounters(), dht_judge(reporter),
                      wait=_wait_option(wait),
                      with_run_id=True, collections=chosen,
                      infohashes=hashes, stale_after=stale,
                      options=dht_options(settings, concurrency, rate), bootstrap=bootstrap,
                      bind=bind)


@app.command()
def probe(
    ctx: typer.Context,
    collection: Annotated[Optional[list[str]], typer.Option(
        "--collection", "-c", metavar="NAME", help="Only torrents of this collection (repeatable).")] = None,
    infohash: Annotated[Optional[list[str]], typer.Option(
        "--infohash", metavar="HEX", help="Only this torrent (40 hex or 32 base32; repeatable).")] = None,
    concurrency: Annotated[Optional[int], typer.Option(
        min=1, metavar="N", help="Connections open at once (default: [probe].concurrency).")] = None,
    rate: Annotated[Optional[float], typer.Option(
        min=0, metavar="PER_SECOND", help="New connections per second; 0 lifts the limit "
        "(default: [probe].rate).")] = None,
    stale_after: Annotated[Optional[str], typer.Option(
        "--stale-after", metavar="DURATION", help="Skip torrents probed more recently than this, e.g. 20h.")] = None,
    wait: Annotated[Optional[str], typer.Option(
        "--wait", metavar="[SECONDS]", help=WAIT_OPTION_HELP)] = None,
) -> None:
    """Ask the peers the last `tsmd dht` found what they hold (read only: no data is asked
    for or sent), fetch the metadata of magnet-only torrents from them (BEP 9), and check
    that web seeds serve the data. Gives verified seeds, availability and downloadable.

    Example: tsmd probe --collection libgen-books --stale-after 20h
    """
    settings, reporter = _load(ctx)
    chosen, hashes, stale = _stage_selection(settings, collection, infohash, stale_after)
    run_stage_command(settings, reporter, "probe", run_probe, ProbeRunCounts(),
                      probe_judge(reporter), wait=_wait_option(wait), with_run_id=True,
                      collections=chosen, infohashes=hashes, stale_after=stale,
                      options=probe_options(settings, concurrency, rate))


@app.command()
def scrape(
    ctx: typer.Context,
    collection: Annotated[Optional[list[str]], typer.Option(
        "--collection", "-c", metavar="NAME", help="Only torrents of this collection (repeatable).")] = None,
    infohash: Annotated[Optional[list[str]], typer.Option(
        "--infohash", metavar="HEX", help="Only this torrent (40 hex or 32 base32; repeatable).")] = None,
    tracker: Annotated[Optional[list[str]], typer.Option(
        "--tracker", metavar="URL", help="Ask only this tracker, for every selected torrent (repeatable); "
                          "also asks a tracker that is backing off.")] = None,
    stale_after: Annotated[Optional[str], typer.Option(
        "--stale-after", metavar="DURATION", help="Skip torrents with a tracker sample newer than this, e.g. 6h.")
    ] = None,
    wait: Annotated[Optional[str], typer.Option(
        "--wait", metavar="[SECONDS]", help=WAIT_OPTION_HELP)] = None,
) -> None:
    """Ask every tracker of every torrent for seeders, leechers and completed downloads.

    Example: tsmd scrape --collection libgen-books --stale-after 12h
    """
    settings, reporter = _load(ctx)
    only_trackers = _tracker_options(tracker or [])
    chosen, hashes, stale = _stage_selection(settings, collection, infohash, stale_after)
    run_stage_command(settings, reporter, "scrape", run_scrape, ScrapeRunCounts(),
                      scrape_judge(reporter), wait=_wait_option(wait), with_run_id=True,
                      collections=chosen,
                      infohashes=hashes, only_trackers=only_trackers, stale_after=stale)


@app.command()
def trackers(
    ctx: typer.Context,
    format: Annotated[str, typer.Option("--format", "-f", metavar="FORMAT",
                                        help="table or json.")] = "table",
    failing: Annotated[bool, typer.Option(help="Only trackers whose last run failed.")] = False,
) -> None:
    """List the trackers tsmd knows, with their health from past scrapes. Those whose numbers
    are not used (fabricating, excluded) are greyed, with the evidence.

    Example: tsmd trackers --failing
    """
    settings, _ = _load(ctx)
    _format_option(format, ("table", "json"))
    db = _open_existing_db(settings)
    rows = load_tracker_health(db, failing, _normalised(settings.scrape.exclude))
    db.close()
    if format == "json":
        sys.stdout.write(json.dumps([{**dataclasses.asdict(row), "unused_because":
                                      row.unused_because} for row in rows], indent=1) + "\n")
        return
    render_tracker_table(rows, rich_console.Console(highlight=False))


@app.command()
def report(
    ctx: typer.Context,
    format: Annotated[Optional[str], typer.Option(
        "--format", "-f", metavar="FORMAT", help="table (the default on a terminal), json (the default otherwise, "
                               "the libgen-seedtools feed), html, ndjson, csv, prometheus or rss "
                               "(a BEP 36 feed for a BitTorrent client; needs --pick).")
    ] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Write to this file atomically instead of stdout.",
        dir_okay=False)] = None,
    collection: Annotated[Optional[list[str]], typer.Option(
        "--collection", "-c", metavar="NAME", help="Only torrents of this collection (repeatable).")] = None,
    sort: Annotated[str, typer.Option(
        metavar="KEY", help="need (neediest first), seeders, size (largest first), name or age (oldest first)."
    )] = "need",
    limit: Annotated[Optional[int], typer.Option(min=0, metavar="N", help="At most this many torrents.")] = None,
    max_seeders: Annotated[Optional[int], typer.Option(
        min=0, metavar="N", help="Only torrents measured with at most this many seeders.")] = None,
    pick_budget: Annotated[Optional[str], typer.Option(
        "--pick", metavar="SIZE", help="Only what a volunteer with this much disk should seed "
        "(e.g. 2TB), as `tsmd pick` chooses it but without spread: the same list each run.")
    ] = None,
    per_torrent: Annotated[bool, typer.Option(
        help="prometheus: also one series per torrent (many series for a big collection).")
    ] = False,
    allow_empty: Annotated[bool, typer.Option(
        help="Let a report of no torrent replace a --output file that is not empty.")] = False,
) -> None:
    """Publish what the database knows: which torrents need seeders, neediest first.

    Example: tsmd report --format json --output /var/www/torrents.json
    """
    settings, reporter = _load(ctx)
    chosen_format = format or ("table" if sys.stdout.isatty() and output is None else "json")
    if chosen_format not in REPORT_FORMATS:
        raise _fail(f"unknown report format '{chosen_format}' (known: {', '.join(REPORT_FORMATS)})",
                    ExitCode.USAGE)
    if sort not in REPORT_SORTS:
        raise _fail(f"unknown sort '{sort}' (known: {', '.join(REPORT_SORTS)})", ExitCode.USAGE)
    if chosen_format == "table" and output is not None:
        raise _fail("--format table is for the terminal; use csv or json for a file",
                    ExitCode.USAGE)
    budget = 0
    if pick_budget is not None:
        try:
            budget = parse_size(pick_budget)
        except ValueError as exc:
            raise _fail(f"--pick: {exc}", ExitCode.USAGE) from None
        if budget <= 0:
            raise _fail("--pick: expected a size above 0, like 2TB", ExitCode.USAGE)
    if chosen_format == "rss" and budget <= 0:
        raise _fail(f"{RSS_NEEDS_PICK}: add --pick SIZE, e.g. --pick 2TB", ExitCode.USAGE)
    db = _open_existing_db(settings)
    try:
        rows = listed = _report_rows(db, settings, collection or [])
        # An empty pick is news (nothing needs help), not a broken listing: the guard below
        # looks at what was listed. Other filters that leave nothing keep it.
        if pick_budget is not None:
            rows = pick_torrents(select_report_rows(rows, "need", None, max_seeders), budget)
        rows = select_report_rows(rows, sort, limit, max_seeders)
        if chosen_format == "table":
            render_table(rows, rich_console.Console(highlight=False))
            return
        chunks = render_report(db, rows, chosen_format, per_torrent,
                               _normalised(settings.scrape.exclude), budget)
        if note := seedtools_note(rows, chosen_format):
            reporter.info(note)
        if output is None:
            sys.stdout.writelines(chunks)
            sys.stdout.flush()
            return
        if not (listed if pick_budget is not None else rows) and not allow_empty and \
                _lists_torrents(output, db, chosen_format, budget):
            raise _fail(f"{output} not replaced by a report of no torrent (a broken listing?); "
                        "--allow-empty replaces it anyway", ExitCode.PARTIAL)
        try:
            write_atomically(output, chunks)
        except TsmdError as exc:
            raise _fail(str(exc), exc.exit_code) from None
    finally:
        db.close()
    reporter.info(f"report: {len(rows)} torrents written to {output}")


@app.command("run")
def run_command(
    ctx: typer.Context,
    collection: Annotated[Optional[list[str]], typer.Option(
        "--collection", "-c", metavar="NAME", help="Only this collection (repeatable).")] = None,
    skip: Annotated[Optional[list[str]], typer.Option(
        "--skip", metavar="STAGE", help="Leave this stage out (repeatable): sync, dht, probe, "
        "scrape, report or prune; [run].stages chooses them for every run.")] = None,
    wait: Annotated[Optional[str], typer.Option(
        "--wait", metavar="[SECONDS]", help=WAIT_OPTION_HELP)] = None,
    allow_empty: Annotated[bool, typer.Option(
        help="Let reports of no torrent replace [report].outputs that list torrents (after "
        "emptying the collections on purpose).")] = False,
    accept_removals: Annotated[bool, typer.Option(help=ACCEPT_REMOVALS_HELP)] = False,
) -> None:
    """The whole pipeline, for cron: sync, dht, probe, scrape, then the reports of
    [report].outputs and the [retention] clean-up. A stage that fails does not stop the next
    ones.

    Exit codes, the worst of the stages': 0 all went well; 1 some items or a stage failed
    (the rest was done); 2 usage or configuration; 3 database; 69 the network answered
    nothing (the other stages were done; 1, 2 and 3 outrank it); 75 another tsmd is writing
    to the database (try later, or --wait); 130 interrupted (what was measured is kept).

    Example (crontab): 17 3 * * * tsmd --config /etc/tsmd.toml -q run
    """
    settings, reporter = _load(ctx)
    chosen = _collections_to(settings, collection or [], "run")
    unknown = [stage for stage in skip or [] if stage not in RUN_STAGES]
    if unknown:
        raise _fail(f"--skip: unknown stage '{unknown[0]}' (known: {', '.join(RUN_STAGES)})",
                    ExitCode.USAGE)
    wanted = [stage for stage in settings.run.stages if stage not in (skip or [])]
    if not wanted:  # "run ok" having done nothing would hide a mistake from cron for ever
        raise _fail("run: no stage left to run ([run].stages less --skip)", ExitCode.USAGE)
    stages = [
        ("sync", run_sync, SyncCounts(len(chosen)), sync_judge(reporter), {
            "collections": chosen, "accept_removals": accept_removals}),
        ("dht", run_dht, DhtCounters(), dht_judge(reporter), {
            "collections": chosen, "with_run_id": True}),
        ("probe", run_probe, ProbeRunCounts(), probe_judge(reporter), {
            "collections": chosen, "with_run_id": True}),
        ("scrape", run_scrape, ScrapeRunCounts(), scrape_judge(reporter), {
            "collections": chosen, "with_run_id": True}),
        ("report", publish_reports, PublishCounts(), judge_publish, {
            "allow_empty": allow_empty}),
        ("prune", apply_retention, PruneCounts(), lambda counts: ("ok", ExitCode.OK), {}),
    ]
    stages = sorted((stage for stage in stages if stage[0] in wanted),
                    key=lambda stage: wanted.index(stage[0]))
    started = time.monotonic()
    worst = ExitCode.OK
    with writing_database(settings, _wait_option(wait), "tsmd run") as db:
        run_id = start_run(db, "run")
        outcome, error = "failed", None
        try:
            for stage, function, no_counts, judge, arguments in stages:
                try:
                    code = execute_stage(db, settings, reporter, stage, function, no_counts,
                                         judge, **arguments)
                except DatabaseError:
                    raise
                except TsmdError as exc:  # recorded as that stage's failure; go on
                    message = str(exc)
                    reporter.problem(message if message.startswith(f"{stage}:")
                                     else f"{stage}: {message}")
                    code = exc.exit_code
                worst = max(worst, ExitCode(code), key=operator.attrgetter("severity"))
                if code == ExitCode.INTERRUPTED:
                    break
            outcome = {ExitCode.OK: "ok", ExitCode.INTERRUPTED: "interrupted",
                       ExitCode.UNREACHABLE: "unreachable"}.get(worst, "partial")
        except TsmdError as exc:
            error = str(exc)
            raise _fail(error, exc.exit_code) from None
        except sqlite3.Error as exc:  # a full disk, a damaged file: said, not a traceback
            error = f"database {settings.database}: {exc}"
            raise _fail(error, ExitCode.DATABASE) from None
        finally:
            with contextlib.suppress(sqlite3.Error):  # the same disk may refuse this too
                finish_run(db, run_id, outcome, {"exit_code": int(worst)}, error)
    reporter.info(f"run {outcome} in {time.monotonic() - started:.1f} s")
    if worst:
        raise typer.Exit(int(worst))


PICK_FORMATS: Final = ("magnets", "urls", "json")


@app.command()
def pick(
    ctx: typer.Context,
    budget: Annotated[str, typer.Option(
        "--budget", "-b", metavar="SIZE", help="Disk space to fill, e.g. 500GB, 2TB or 1.5TiB.")],
    collection: Annotated[Optional[list[str]], typer.Option(
        "--collection", "-c", metavar="NAME", help="Only torrents of this collection (repeatable).")] = None,
    format: Annotated[str, typer.Option(
        "--format", "-f", metavar="FORMAT", help="magnets (one per line), urls (the .torrent "
        "URL, or the magnet when there is none) or json.")] = "magnets",
    spread: Annotated[float, typer.Option(
        min=0.0, max=0.9, help="Random spread of the need score (0.2: ±20 %), so that "
                               "volunteers do not all pick the same torrents.")] = 0.2,
    seed: Annotated[Optional[int], typer.Option(
        help="Seed of the spread, for a list that can be made again.")] = None,
    max_seeders: Annotated[Optional[int], typer.Option(
        min=0, metavar="N", help="Only torrents measured with at most this many seeders.")] = None,
    min_seeders: Annotated[Optional[int], typer.Option(
        min=0, metavar="N", help="Only torrents measured with at least this many seeders.")] = None,
    include_green: Annotated[bool, typer.Option(
        "--include-green", help="Also green torrents (more than 10 seeders), after red and "
        "yellow.")] = False,
    exclude_collection: Annotated[Optional[list[str]], typer.Option(
        "--exclude-collection", metavar="NAME", help="Leave this collection's torrents out "
        "(repeatable).")] = None,
) -> None:
    """What to seed with the disk space you have: downloadable red torrents first, then yellow,
    the neediest first within each, up to --budget. Dead torrents (no seeder anywhere) are
    never picked: nobody could download them.

    Example: tsmd pick --budget 2TB --format urls > to-seed.txt
    """
    settings, reporter = _load(ctx)
    _format_option(format, PICK_FORMATS)
    try:
        space = parse_size(budget)
    except ValueError as exc:
        raise _fail(f"--budget: {exc}", ExitCode.USAGE) from None
    db = _open_existing_db(settings)
    try:
        rows = select_report_rows(_report_rows(db, settings, collection or []), "need", None,
                                  max_seeders)
    finally:
        db.close()
    left_out = set(exclude_collection or [])
    rows = [row for row in rows if row.collection not in left_out
            and (min_seeders is None or row.seeders >= min_seeders)]
    groups = PICK_GROUPS | {PLAN_GREEN} if include_green else PICK_GROUPS
    chosen = pick_torrents(rows, space, spread, random.Random(seed), groups)
    if format == "json":
        fields = ("infohash", "name", "collection", "size_bytes", "seeders", "leechers", "need",
                  "band", "link", "magnet")
        sys.stdout.write(json.dumps([{name: getattr(row, name) for name in fields}
                                     for row in chosen], indent=1, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write("".join((row.magnet if format == "magnets" else row.link) + "\n"
                                 for row in chosen))
    sys.stdout.flush()
    unweighed = sum(1 for row in rows if row.need is None or row.size_bytes <= 0)
    dead = sum(1 for row in rows if plan_group(row) == PLAN_DEAD)
    unverified = sum(1 for row in rows if plan_group(row) == PLAN_UNVERIFIED)
    total = sum(row.size_bytes for row in chosen)
    reporter.info(f"picked {_plural(len(chosen), 'torrent')}, {_human_size(total)} of "
                  f"{_human_size(space)}"
                  + (f"; {_plural(dead, 'dead torrent')} (no seeder anywhere: nobody can "
                     "download them) left out" if dead else "")
                  + (f"; {_plural(unverified, 'torrent')} whose reachable peers hold no "
                     "complete copy (tsmd probe) left out" if unverified else "")
                  + (f"; {_plural(unweighed, 'torrent')} not measured yet (or of unknown size) "
                     "left out" if unweighed else ""))
    if not chosen:
        raise _fail("nothing picked: no downloadable red or yellow torrent that was measured "
                    "fits the budget (run tsmd scrape? --include-green?)", ExitCode.PARTIAL)


def _read_only(database: Path, read: Callable[[sqlite3.Connection], Any], default: Any) -> Any:
    """`read` of an existing database opened read only (`check` writes nothing); `default`
    when there is none, or it is old or damaged."""
    if not database.is_file():
        return default
    try:
        db = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True,
                             timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)
        try:
            return read(db)
        finally:
            db.close()
    except sqlite3.Error:
        return default


def known_torrent(db: sqlite3.Connection, meta: Metainfo) -> Metainfo:
    """`meta` completed with what the database knows of the torrent, as a .torrent synced
    before told it: name, size, file count and trackers, for a check given only a magnet link
    or an infohash. What `meta` says itself comes first."""
    row = db.execute("SELECT id, name, size_bytes, file_count, piece_length, piece_count "
                     "FROM torrents WHERE infohash = ?", (meta.infohash,)).fetchone()
    if row is None:
        return meta
    torrent_id, name, size, files, piece_length, piece_count = row
    stored = [Tracker(url, tier) for url, tier in db.execute(
        "SELECT r.url, l.tier FROM torrent_trackers l JOIN trackers r ON r.id = l.tracker_id "
        "WHERE l.torrent_id = ? ORDER BY l.position", (torrent_id,))]
    own = {t.url for t in meta.trackers}
    return dataclasses.replace(
        meta, name=meta.name or name,
        size_bytes=meta.size_bytes if meta.size_bytes is not None else size,
        file_count=meta.file_count if meta.file_count is not None else files,
        piece_length=meta.piece_length if meta.piece_length is not None else piece_length,
        piece_count=meta.piece_count if meta.piece_count is not None else piece_count,
        trackers=(*meta.trackers, *(t for t in stored if t.url not in own)))


def render_check(result: CheckResult, console: Console) -> None:
    from rich.table import Table

    unknown = "[dim]-[/dim]"
    band = seeder_band(result.seeders).value
    style = {"red": "red", "yellow": "yellow", "green": "green"}.get(band, "dim")
    size = _human_size(result.size_bytes) if result.size_bytes >= 0 else "size unknown"
    console.print(f"{escape_markup(result.name or '(no name)')}  {result.infohash}  "
                  f"{size}: [{style}]{band}[/{style}], "
                  f"{result.seeders if result.seeders >= 0 else 'unknown'} seeders")
    table = Table(title_justify="left")
    for column in ("source", "seeders", "leechers", "completed", "note"):
        table.add_column(column, justify="left" if column in ("source", "note") else "right")

    def number(value: float | int | None) -> str:
        return unknown if value is None or value < 0 else f"{value:,.0f}"

    for check in result.trackers:
        note = escape_markup(check.error) if check.error else (
            f"{check.rtt_ms:.0f} ms" if check.rtt_ms is not None else "")
        if check.distrusted:  # shown, greyed, and left out of the numbers above
            note = escape_markup(f"not used: {check.distrusted}") + (f"; {note}" if note else "")
        table.add_row(escape_markup(check.url), number(check.seeders), number(check.leechers),
                      number(check.completed), note,
                      style="dim" if check.distrusted else None)
    if result.dht_peers >= 0 or result.dht_error:
        note = escape_markup(result.dht_error) if result.dht_error else (
            f"{result.dht_peers} peers from {result.dht_nodes_answered} nodes; BEP 33 estimates")
        table.add_row("DHT", number(result.dht_seeds_estimate),
                      number(result.dht_peers_estimate), unknown, note)
    if result.probe_tried >= 0:
        if result.availability is not None:
            copies = f"; availability {result.availability:.2f} copies"
        elif result.probe_answering > 0:
            copies = ("; no piece count (no peer sent the metadata, or a v2-only torrent): "
                      "only have_all shows a seed")
        else:
            copies = ""
        if result.metadata_fetched:
            copies += "; metadata from a peer"
        note = (f"{result.probe_answering} of {result.probe_tried} peers told what they hold"
                f"{copies}" if result.probe_tried else "no peer to ask")
        told = result.probe_answering > 0  # else nothing was seen: unknown, not 0
        table.add_row("peers, asked", number(result.verified_seeds if told else -1),
                      number(result.probe_answering - result.verified_seeds if told else -1),
                      unknown, note)
    console.print(table)


@app.command()
def check(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(
        metavar="TARGET", help="A magnet link, an infohash, a .torrent file or its URL.")],
    format: Annotated[str, typer.Option("--format", "-f", metavar="FORMAT",
                                        help="table or json.")] = "table",
    tracker: Annotated[Optional[list[str]], typer.Option(
        "--tracker", metavar="URL", help="Ask only this tracker (repeatable); by default the "
        "torrent's own trackers and [scrape].trackers.")] = None,
    bootstrap: Annotated[Optional[list[str]], typer.Option(
        "--bootstrap", metavar="HOST:PORT", help="HOST:PORT of a bootstrap node (repeatable; replaces [dht].bootstrap)."
    )] = None,
    dht: Annotated[bool, typer.Option(help="Look the torrent up in the DHT.")] = True,
    probe: Annotated[bool, typer.Option(
        help="Ask the peers the DHT found what they hold (TCP, read only).")] = True,
) -> None:
    """Measure one torrent now, from its trackers and the DHT; no collection needed.

    Example: tsmd check 'magnet:?xt=urn:btih:...'
    """
    settings, reporter = _load(ctx)
    _format_option(format, ("table", "json"))
    asked = _tracker_options(tracker or [])
    _host_port_options(bootstrap or [], "--bootstrap")
    try:
        meta, interrupted = run_interruptible(load_check_target, target, settings)
    except TsmdError as exc:
        raise _fail(f"check: {exc}", ExitCode.USAGE if isinstance(exc, ProtocolError)
                    else exc.exit_code) from None
    if interrupted:
        raise typer.Exit(int(ExitCode.INTERRUPTED))
    if not meta.has_metainfo:  # a magnet or an infohash: what a synced .torrent said helps
        meta = _read_only(settings.database, lambda db: known_torrent(db, meta), meta)
    if asked:
        urls = asked
    else:
        urls = [t.url for t in meta.trackers] + [
            normalise_tracker_url(t) for t in settings.scrape.trackers]
    urls = list(dict.fromkeys(url for url in urls if url))
    if not urls and not dht:
        raise _fail("nothing to ask: the torrent names no tracker and --no-dht was given",
                    ExitCode.USAGE)
    cache = _read_only(settings.database, lambda db: load_node_cache(db, time.time()),
                       NodeCache()) if dht else NodeCache()
    result, interrupted = run_interruptible(
        check_torrent, meta, settings, reporter, trackers=urls, bootstrap=bootstrap,
        cache=cache, use_dht=dht, use_probe=dht and probe,
        # A tracker named with --tracker is asked, excluded or not, as `tsmd scrape` does.
        excluded=() if asked else _normalised(settings.scrape.exclude),
        full_scrape=_read_only(settings.database, lambda db: {url for (url,) in db.execute(
            "SELECT url FROM trackers WHERE full_scrape = 1")}, set()))
    if interrupted:
        raise typer.Exit(int(ExitCode.INTERRUPTED))
    if format == "json":
        sys.stdout.write(json.dumps(result.as_dict(), indent=1, ensure_ascii=False) + "\n")
    else:
        render_check(result, rich_console.Console(highlight=False))
    answered = result.dht_nodes_answered or any(t.error is None and t.distrusted is None
                                                for t in result.trackers)
    if not answered:
        raise _fail("no tracker and no DHT node answered", ExitCode.PARTIAL)


@app.command()
def prune(
    ctx: typer.Context,
    older_than: Annotated[Optional[str], typer.Option(
        "--older-than", metavar="DURATION", help="Delete tracker and DHT samples older than "
        "this, e.g. 180d; 0 keeps them all (default: [retention].samples).")] = None,
    nodes_older_than: Annotated[Optional[str], typer.Option(
        "--nodes-older-than", metavar="DURATION", help="Delete DHT nodes not seen for this long "
        "(default: [retention].nodes).")] = None,
    vacuum: Annotated[bool, typer.Option(
        help="Then give the freed space back to the file system (rewrites the database).")
    ] = False,
    wait: Annotated[Optional[str], typer.Option(
        "--wait", metavar="[SECONDS]", help=WAIT_OPTION_HELP)] = None,
) -> None:
    """Delete old samples and DHT nodes; `tsmd run` does the same with [retention].

    Example: tsmd prune --older-than 180d --vacuum
    """
    settings, reporter = _load(ctx)
    samples = _duration_option(older_than, "--older-than")
    nodes = _duration_option(nodes_older_than, "--nodes-older-than")
    if samples and samples < FULL_HISTORY:  # (0 keeps everything, as in [retention])
        raise _fail(f"--older-than: keep at least {FULL_HISTORY // DAY} days of samples (the "
                    "week's change reads them), or 0 for all", ExitCode.USAGE)
    if samples is None and nodes is None and not (settings.retention.samples or
                                                  settings.retention.nodes):
        raise _fail("nothing to prune: [retention] keeps everything and no --older-than given",
                    ExitCode.USAGE)
    _require_database(settings)
    with writing_database(settings, _wait_option(wait), "tsmd prune") as db:
        try:
            code = execute_stage(db, settings, reporter, "prune", apply_retention, PruneCounts(),
                                 lambda counts: ("ok", ExitCode.OK), samples=samples, nodes=nodes)
            if vacuum and not code:
                before = settings.database.stat().st_size
                db.execute("VACUUM")
                reporter.info(f"vacuum: {_human_size(before)} -> "
                              f"{_human_size(settings.database.stat().st_size)}")
        except TsmdError as exc:
            raise _fail(str(exc), exc.exit_code) from None
        except sqlite3.Error as exc:
            raise _fail(f"prune: {exc}", ExitCode.DATABASE) from None
    if code:
        raise typer.Exit(int(code))


@app.command()
def status(
    ctx: typer.Context,
    format: Annotated[str, typer.Option("--format", "-f", metavar="FORMAT",
                                        help="table or json.")] = "table",
) -> None:
    """Collections, torrents, the last run of each stage with its outcome, database size.

    Example: tsmd status --format json
    """
    settings, _ = _load(ctx)
    _format_option(format, ("table", "json"))
    db = _open_existing_db(settings)
    try:
        result = load_status(db, settings.database)
    finally:
        db.close()
    if format == "json":
        sys.stdout.write(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    else:
        render_status(result, rich_console.Console(highlight=False))


if __name__ == "__main__":
    app()
