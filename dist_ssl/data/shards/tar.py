"""Reading a shard: the tar format, checked against the shard's manifest entry in the same pass."""

from __future__ import annotations

import errno
import hashlib
import multiprocessing
import os
import re
import sys
import time
from typing import Iterator

from dist_ssl.data.shards.manifest import DataError, ShardInfo, is_remote


class _CountingReader:
    """Hashes and counts the bytes the tar parser pulls through: a shard is checked against its
    manifest while it is read, never read twice."""

    def __init__(self, stream):
        self.stream = stream
        self.digest = hashlib.sha256()
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        """Read what the tar parser leaves after the end-of-archive blocks (record padding)."""
        while self.read(1 << 20):
            pass


_ZERO_BLOCK = bytes(512)
_META = re.compile(r"__[^/]*__($|/)")  # what webdataset's tar expander skips as metadata


class _Blocks:
    """A stream read in 1 MiB chunks and handed out in exact slices: a few Python calls per shard
    instead of three per member."""

    def __init__(self, stream):
        self.stream = stream
        self.buffer = b""
        self.at = 0

    def take(self, size: int) -> bytes:
        end = self.at + size
        if end > len(self.buffer):
            chunks = [self.buffer[self.at :]]
            have = len(chunks[0])
            while have < size:
                chunk = self.stream.read(max(size - have, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                have += len(chunk)
            self.buffer, self.at, end = b"".join(chunks), 0, size
        data = self.buffer[self.at : end]
        self.at = end
        return data

    def exactly(self, size: int) -> bytes:
        data = self.take(size)
        if len(data) < size:
            raise EOFError(f"unexpected end of data ({len(data)} of {size} bytes)")
        return data


def _octal(field: bytes) -> int:
    if field[:1] == b"\x80":  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    return int(field.rstrip(b"\0 ").lstrip(b" ") or b"0", 8)


def tar_members(stream, url: str) -> Iterator[dict]:
    """{'fname', 'data', '__url__'} for the regular files of a tar stream, as webdataset's expander yields them.

    Why not tarfile (under webdataset's expander): it parses each of a header's fields in Python, about
    40 us a member, more than decoding a 28x28 PNG; here a header is a slice and a checksum. Plain
    ustar as we write it, PAX ('x') and GNU long-name ('L') headers of other writers are understood;
    other member types (links, directories) are skipped; a bad checksum or a short read is an error.
    """
    blocks = _Blocks(stream)
    pending_name = None
    pending_size = None
    offset = 0
    while True:
        header = blocks.take(512)
        if not header or header == _ZERO_BLOCK:
            return
        if len(header) < 512:
            raise EOFError(f"unexpected end of data ({len(header)} of 512 header bytes)")
        if sum(header[:148]) + sum(header[156:]) + 256 != _octal(header[148:156]):  # checksum field counts as spaces
            raise ValueError(f"bad tar header checksum at byte {offset}")
        kind = header[156:157]
        size = pending_size if pending_size is not None and kind in (b"0", b"\0") else _octal(header[124:136])
        padded = -(-size // 512) * 512
        data = blocks.exactly(padded)[:size] if size else b""
        offset += 512 + padded
        if kind == b"x":  # PAX: overrides for the next member
            for record in data.decode("utf-8").splitlines():
                key, _, value = record.partition(" ")[2].partition("=")
                if key == "path":
                    pending_name = value
                elif key == "size":
                    pending_size = int(value)
            continue
        if kind == b"L":  # GNU long name of the next member
            pending_name = data.rstrip(b"\0").decode("utf-8")
            continue
        if kind not in (b"0", b"\0"):
            pending_name = pending_size = None
            continue
        name = pending_name
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            if prefix:
                name = prefix.decode("utf-8") + "/" + name
        pending_name = pending_size = None
        if "/" not in name and name.startswith("__") and name.endswith("__") or _META.match(name):
            continue
        yield {"fname": name, "data": data, "__url__": url}


# What a network filesystem or an object-store mount says in a hiccup: I/O error, stale NFS handle,
# a file missing for a moment (a listing that lags a rename). Retried; anything else fails at once.
TRANSIENT = frozenset({errno.EIO, errno.ESTALE, errno.ENOENT})
RETRIES = 4  # re-opens of a shard after a transient error, waiting BACKOFF_SECONDS x 1, 2, 4, 8 (3.75 s in all)
BACKOFF_SECONDS = 0.25
# Retries by this process and the DataLoader workers it forks (other processes: shared memory).
_RETRIED = multiprocessing.Value("q", 0)


def retries_so_far() -> int:
    """Transient-error retries of shard reads by this process and its workers since it started."""
    return _RETRIED.value


class ShardReader:
    """The raw samples (grouped by key, not decoded) of one tar shard: a local path, `http(s)://` or
    `pipe:` URL (webdataset's `gopen`). With the manifest entry, `problems` lists what differs from it
    once the shard has been read to its end: bytes, sha256, sample count.

    A transient storage error (`TRANSIENT`, at open or mid-shard) re-opens the shard after a backoff
    and reads it again from its start, skipping the samples already handed out (so the sha256 is
    still that of one whole read), at most RETRIES times; `retries` counts them, each with a warning.
    """

    def __init__(self, url: str, shard: ShardInfo | None = None):
        self.url, self.shard = url, shard
        self.samples = 0
        self.retries = 0
        self.reader: _CountingReader | None = None

    def __iter__(self) -> Iterator[dict]:
        while True:
            try:
                yield from self._read(skip=self.samples)
                return
            except _Transient as exc:
                if self.retries >= RETRIES:
                    raise exc.final from None
                self.retries += 1
                with _RETRIED.get_lock():
                    _RETRIED.value += 1
                wait = BACKOFF_SECONDS * 2 ** (self.retries - 1)
                print(f"dist-ssl: warning: shard {self.url}: {exc.why}; retry {self.retries} of {RETRIES} in {wait:g} s",
                      file=sys.stderr, flush=True)
                time.sleep(wait)

    def _read(self, skip: int) -> Iterator[dict]:
        from webdataset.gopen import gopen
        from webdataset.tariterators import group_by_keys

        if not is_remote(self.url) and not os.path.isfile(self.url):
            raise _Transient("it is missing", DataError(f"shard {self.url} is missing"))
        try:
            stream = gopen(self.url, "rb")
        except OSError as exc:
            if exc.errno in TRANSIENT:
                raise _Transient(_say(exc), DataError(f"shard {self.url} could not be opened: {_say(exc)}")) from exc
            raise
        self.reader = _CountingReader(stream)
        failure = closing = None
        seen = 0
        try:
            for sample in group_by_keys(tar_members(self.reader, self.url)):
                seen += 1
                if seen <= skip:  # handed out before the retry
                    continue
                self.samples += 1
                yield sample
            self.reader.drain()
        except (OSError, EOFError, ValueError) as exc:  # what the tar reader and group_by_keys raise
            failure = exc
        finally:  # also when the consumer stops early: then nothing is raised from here
            try:
                stream.close()
            except OSError as exc:
                closing = exc
        if isinstance(failure, OSError) and failure.errno in TRANSIENT:
            raise _Transient(f"{_say(failure)} after {max(seen, skip)} samples",
                             DataError(f"shard {self.url} could not be read after {RETRIES} retries: {_say(failure)}"))
        if closing is not None or isinstance(failure, OSError) and "exit" in str(failure):
            # a pipe (curl for http, aws for s3...) that failed: its exit status says more than the tar parser
            status = re.search(r"exit (\d+)", str(closing or failure))
            why = f"its reader exited with status {status.group(1)}" if status else str(closing or failure).splitlines()[0]
            raise DataError(f"shard {self.url} could not be read: {why}")
        if failure is not None:
            first = str(failure).splitlines()[0] if str(failure) else type(failure).__name__
            raise DataError(f"shard {self.url} is truncated or corrupt after {self.samples} samples ({first})")

    def problems(self) -> list[str]:
        """What differs from the manifest entry; call after reading the whole shard."""
        if self.shard is None or self.reader is None:
            return []
        found = []
        if self.reader.bytes != self.shard.bytes:
            found.append(f"{self.reader.bytes} bytes, the manifest says {self.shard.bytes}")
        elif self.reader.digest.hexdigest() != self.shard.sha256:
            found.append(f"sha256 {self.reader.digest.hexdigest()[:16]}..., the manifest says {self.shard.sha256[:16]}...")
        if self.samples != self.shard.num_samples:
            found.append(f"{self.samples} samples, the manifest says {self.shard.num_samples}")
        return found


class _Transient(Exception):
    """A transient storage error while reading a shard: `why` for the warning, `final` to raise
    when the retries are spent."""

    def __init__(self, why: str, final: DataError):
        super().__init__(why)
        self.why, self.final = why, final


def _say(exc: OSError) -> str:
    return f"{errno.errorcode.get(exc.errno, exc.errno)} ({exc.strerror or exc})"


def raw_samples(url: str, shard: ShardInfo | None = None) -> Iterator[dict]:
    """Raw samples of one shard. With its manifest entry, a shard whose bytes, sha256 or sample count
    differ is a DataError once it has been read to the end."""
    reader = ShardReader(url, shard)
    yield from reader
    problems = reader.problems()
    if problems:
        raise DataError(f"shard {url} does not match its manifest: {'; '.join(problems)}")
