"""WebDataset shards on disk: writing a dataset, its manifests, reading and checking shards.

Layout written by `dist-ssl shards write SOURCE --out DIR`:

    DIR/labeled/labeled-000000.tar ...   + DIR/labeled/manifest.json
    DIR/unlabeled/unlabeled-000000.tar   + DIR/unlabeled/manifest.json
    DIR/test/test-000000.tar             + DIR/test/manifest.json

(a source without labels writes only `unlabeled/`). A sample is `KEY.png` / `KEY.jpg` / `KEY.npy`
(a raw uint8 HWC image, or a float32 vector) plus `KEY.cls` (labeled and test splits) or
`KEY.truth.cls` (unlabeled split: the hidden true label, for monitoring only; the training loop
never hands it to a method). Keys are `<origin>-<index>` (or the source's own keys when
re-sharding), unique within a dataset. Nothing in a shard is ever unpickled: `.npy` members are
loaded with `allow_pickle=False` and other members are ignored.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from dist_ssl.data.sources import Members, Source, plan_splits
from dist_ssl.errors import UserError
from dist_ssl.files import atomic_write_json

FORMAT = "dist-ssl-shards/1"
SPLITS = ("labeled", "unlabeled", "test")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
INPUT_EXTENSIONS = IMAGE_EXTENSIONS + ("npy",)
ENCODINGS = ("png", "jpg", "raw")  # how images are stored; vectors are always npy
DEFAULT_MAXCOUNT = 10000
DEFAULT_MAXSIZE = 1 << 30


class DataError(UserError):
    """A shard that cannot be trusted: missing, truncated or corrupt, its bytes, sha256 or sample count
    differing from the manifest, a label out of range, or too many corrupt samples.

    It is found where the shard is read, which may be one rank or one DataLoader worker only, so every
    rank prints it (`rank_local`).
    """

    rank_local = True


# ----------------------------------------------------------------------------------------------
# manifests


@dataclass(frozen=True)
class ShardInfo:
    url: str
    num_samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """One split's manifest.json, with shard URLs resolved against the split folder.

    A dataset folder may come from someone else: opening it must never run anything. So a shard URL
    that webdataset would hand to a command (`pipe:`, and every scheme but http(s), which goes to curl
    as an argument list) or that lies outside the split folder (an absolute path, `..`) is refused
    unless the run allows it (`allow_pipe`: `data.allow_pipe=true`, `--allow-pipe`)."""

    root: Path
    data: dict
    allow_pipe: bool = False

    @property
    def shards(self) -> list[ShardInfo]:
        return [ShardInfo(s["url"], s["num_samples"], s["bytes"], s["sha256"]) for s in self.data["shards"]]

    @property
    def num_samples(self) -> int:
        return int(self.data["num_samples"])

    @property
    def num_classes(self) -> int:
        """0 for a pool without classes (a folder of unlabeled images)."""
        return int(self.data["num_classes"])

    @property
    def kind(self) -> str:
        return self.data["input"]["kind"]

    @property
    def shape(self) -> tuple[int, ...]:
        """HWC for images, (D,) for vectors."""
        return tuple(self.data["input"]["shape"])

    @property
    def channels(self) -> int:
        """What `decode_sample` needs: image channels, 0 for vectors."""
        return self.shape[-1] if self.kind == "image" else 0

    @property
    def input_shape(self) -> tuple[int, ...]:
        """What a model sees: CHW for images, (D,) for vectors."""
        shape = self.shape
        return (shape[2], shape[0], shape[1]) if self.kind == "image" else shape

    def url(self, shard: ShardInfo) -> str:
        """A URL webdataset can open: absolute paths and `scheme:` URLs pass through (when allowed)."""
        if not self.allow_pipe:
            why = untrusted_url(shard.url)
            if why:
                raise UserError(
                    f"{self.root / 'manifest.json'}: shard URL {shard.url!r} {why}; refused, as a dataset folder may come from anyone "
                    "(allow it for this run with data.allow_pipe=true, or --allow-pipe)"
                )
        if is_remote(shard.url) or os.path.isabs(shard.url):
            return shard.url
        return str(self.root / shard.url)


def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def untrusted_url(url: str) -> str | None:
    """Why opening a manifest's shard URL could run a command or read outside its split folder, or
    None for a plain relative name inside it or an http(s) URL."""
    scheme = _SCHEME.match(url)
    if scheme and scheme.group(1).lower() in ("http", "https") and url[scheme.end():].startswith("//"):
        return None
    if scheme:
        name = scheme.group(1).lower()
        return "runs a shell command (pipe:)" if name == "pipe" else f"has the scheme {name}:, which webdataset opens through a command"
    if os.path.isabs(url):
        return "is an absolute path, outside the split folder"
    if ".." in Path(url).parts:
        return "leads outside the split folder (..)"
    return None


def load_manifest(split_dir: str | Path, allow_pipe: bool = False) -> Manifest:
    """A split's manifest, every shard URL checked (see `Manifest`) before anything is opened."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise UserError(f"shard folder not found: {split_dir}")
    path = split_dir / "manifest.json"
    if not path.is_file():
        raise UserError(f"no manifest.json in {split_dir}: write shards with `dist-ssl shards write`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path} is not a dist-ssl manifest (format {FORMAT!r} expected)")
    manifest = Manifest(split_dir, data, allow_pipe)
    for shard in manifest.shards:
        manifest.url(shard)
    return manifest


def check_local_shards(manifest: Manifest) -> None:
    """Fail before any process starts reading when a local shard is missing (remote ones fail when read)."""
    missing = [manifest.url(s) for s in manifest.shards if not is_remote(s.url) and not os.path.isfile(manifest.url(s))]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"shard {missing[0]} is missing{more}: it is listed in {manifest.root / 'manifest.json'}")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# encoding and decoding one sample


def prepare_image(array: np.ndarray, resize: int | None = None, channels: int | None = None) -> np.ndarray:
    """HWC uint8 -> `channels` channels (grey <-> RGB), shorter side scaled to `resize` and the centre
    `resize` x `resize` square kept, so images of any size and aspect get one shape."""
    if (channels is None or array.shape[-1] == channels) and not resize:
        return array
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if channels is not None and array.shape[-1] != channels:
        image = image.convert("L" if channels == 1 else "RGB")
    if resize:
        image = F.center_crop(F.resize(image, [resize], antialias=True), [resize, resize])
    out = np.asarray(image)
    return out[..., None] if out.ndim == 2 else out


def encode_input(array: np.ndarray, kind: str, encoding: str = "png", quality: int = 95) -> tuple[str, bytes]:
    """One input -> (member extension, bytes). Vectors are npy; images png, jpg or raw (npy of HWC uint8)."""
    if kind == "vector" or encoding == "raw":
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(array, np.float32 if kind == "vector" else np.uint8), allow_pickle=False)
        return "npy", buffer.getvalue()
    from PIL import Image

    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    buffer = io.BytesIO()
    if encoding == "jpg":
        image.save(buffer, format="JPEG", quality=quality)
        return "jpg", buffer.getvalue()
    image.save(buffer, format="PNG", compress_level=1)
    return "png", buffer.getvalue()


def decode_member(data: bytes, ext: str) -> np.ndarray:
    """One stored input member -> HWC uint8 (1 or 3 channels) or a [D] float32 vector (re-sharding)."""
    if ext == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    from dist_ssl.data.sources import read_image_file

    return read_image_file(io.BytesIO(data))


def _decode_image(data: bytes, channels: int):
    """Encoded image -> uint8 CHW tensor.

    torchvision's decoder is 8x faster than PIL on small images (15 vs 126 us for an 8x8 PNG), so
    it is used while it exists; torchvision 0.29 deprecated it in favour of torchcodec, and PIL
    takes over once it is gone.
    """
    import torch

    try:
        import warnings

        from torchvision.io import ImageReadMode, decode_image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
            return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
    except ImportError:
        from PIL import Image

        image = Image.open(io.BytesIO(data)).convert("L" if channels == 1 else "RGB")
        array = np.array(image)
        return torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy())


def decode_sample(raw: dict, channels: int) -> dict:
    """Raw tar members -> {'key', 'input' (uint8 CHW, or float32 [D] when channels is 0), 'label', 'truth', 'soft'}.

    Only the formats we write are decoded; pickles and other executable formats are never touched.
    Raises ValueError (or the decoder's error) for a sample that does not decode.
    """
    import torch

    key = raw.get("__key__", "?")
    sample = {"key": key, "label": None, "truth": None, "soft": None}
    for ext in IMAGE_EXTENSIONS:
        if ext in raw:
            sample["input"] = _decode_image(raw[ext], channels)
            break
    else:
        if "npy" not in raw:
            raise ValueError(f"sample {key} has no image or npy member (members: {sorted(k for k in raw if not k.startswith('__'))})")
        array = np.load(io.BytesIO(raw["npy"]), allow_pickle=False)
        if channels:
            if array.dtype != np.uint8 or array.ndim != 3:
                raise ValueError(f"sample {key}: a raw image must be HWC uint8, found {array.dtype} {array.shape}")
            sample["input"] = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        else:
            sample["input"] = torch.from_numpy(np.asarray(array, np.float32))
    if "cls" in raw:
        sample["label"] = int(raw["cls"])
    if "truth.cls" in raw:
        sample["truth"] = int(raw["truth.cls"])
    if "soft.npy" in raw:  # a soft pseudo-label: class probabilities (dist-ssl select --soft)
        sample["soft"] = torch.from_numpy(np.asarray(np.load(io.BytesIO(raw["soft.npy"]), allow_pickle=False), np.float32))
    return sample


# ----------------------------------------------------------------------------------------------
# reading a shard, checked against its manifest in the same pass


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


class ShardReader:
    """The raw samples (grouped by key, not decoded) of one tar shard: a local path, `http(s)://` or
    `pipe:` URL (webdataset's `gopen`). With the manifest entry, `problems` lists what differs from it
    once the shard has been read to its end: bytes, sha256, sample count.
    """

    def __init__(self, url: str, shard: ShardInfo | None = None):
        self.url, self.shard = url, shard
        self.samples = 0
        self.reader: _CountingReader | None = None

    def __iter__(self) -> Iterator[dict]:
        from webdataset.gopen import gopen
        from webdataset.tariterators import group_by_keys

        if not is_remote(self.url) and not os.path.isfile(self.url):
            raise DataError(f"shard {self.url} is missing")
        stream = gopen(self.url, "rb")
        self.reader = _CountingReader(stream)
        failure = closing = None
        try:
            for sample in group_by_keys(tar_members(self.reader, self.url)):
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


def raw_samples(url: str, shard: ShardInfo | None = None) -> Iterator[dict]:
    """Raw samples of one shard. With its manifest entry, a shard whose bytes, sha256 or sample count
    differ is a DataError once it has been read to the end."""
    reader = ShardReader(url, shard)
    yield from reader
    problems = reader.problems()
    if problems:
        raise DataError(f"shard {url} does not match its manifest: {'; '.join(problems)}")


# ----------------------------------------------------------------------------------------------
# writing


class _HashingFile:
    """A shard file being written: hashed as it is written, fsynced when closed."""

    def __init__(self, path: str):
        self.handle = open(path, "wb")
        self.digest = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.bytes += len(data)
        return self.handle.write(data)

    def close(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()


def _tar_bytes(sample: dict) -> int:
    """What a sample adds to a tar: a 512-byte header per member plus its data padded to 512 bytes."""
    return sum(512 + -(-len(v) // 512) * 512 for k, v in sample.items() if not k.startswith("__"))


class SplitWriter:
    """Encoded samples -> the shards of one split (webdataset's ShardWriter) and their manifest entries.

    A shard is closed before a sample would take it past `maxsize` file bytes. ShardWriter's own
    maxsize counts payload bytes only, which for small images is a tenth of the file (tar headers and
    padding dominate), so the size is tracked here.
    """

    def __init__(self, split_dir: Path, split: str, num_classes: int, maxcount: int = DEFAULT_MAXCOUNT, maxsize: int = DEFAULT_MAXSIZE):
        split_dir.mkdir(parents=True, exist_ok=True)
        self.split_dir, self.split, self.num_classes = split_dir, split, num_classes
        self.maxcount, self.maxsize = maxcount, maxsize
        self.shards: list[dict] = []
        self.histogram = np.zeros(num_classes, np.int64)
        self.truth_histogram = np.zeros(num_classes, np.int64)
        self.shard_labels: list[int] = []
        self.count = 0
        self.shard_bytes = 0
        self.writer = None
        self.file: _HashingFile | None = None

    def _open(self, path: str) -> _HashingFile:
        self.file = _HashingFile(path)
        return self.file

    def _closed(self, path: str) -> None:
        self.file.close()
        self.shards.append({
            "url": Path(path).name,
            "num_samples": self.writer.count,
            "bytes": self.file.bytes,
            "sha256": self.file.digest.hexdigest(),
            "class_histogram": np.bincount(self.shard_labels, minlength=self.num_classes).tolist(),
        })
        self.shard_labels.clear()

    def write(self, key: str, ext: str, payload: bytes, label: int | None, truth: int | None) -> None:
        import webdataset as wds

        if self.writer is None:  # ShardWriter opens its first file at once: only create it for a non-empty split
            # An integer mtime keeps tar headers plain ustar: float mtimes make tarfile add a PAX header to
            # every member, which doubles parsing time when reading. It also makes shards byte-reproducible.
            self.writer = wds.ShardWriter(str(self.split_dir / f"{self.split}-%06d.tar"), maxcount=self.maxcount,
                                          maxsize=float("inf"), verbose=0, post=self._closed, opener=self._open, mtime=0)
        sample = {"__key__": key, ext: payload}
        known = None
        for name, value, histogram in (("cls", label, self.histogram), ("truth.cls", truth, self.truth_histogram)):
            if value is not None and value >= 0:
                if value >= self.num_classes:
                    raise UserError(f"sample {key} has label {value}, outside 0..{self.num_classes - 1}")
                sample[name] = str(value).encode()
                histogram[value] += 1
                known = value
        size = _tar_bytes(sample)
        if self.writer.count >= self.maxcount or (self.writer.count and self.shard_bytes + size + 1024 > self.maxsize):
            self.writer.next_stream()  # 1024: the two zero blocks that end a tar
            self.shard_bytes = 0
        self.shard_bytes += size
        self.writer.write(sample)  # may close the previous shard first: count this label only after
        if known is not None:
            self.shard_labels.append(known)
        self.count += 1

    def abort(self) -> None:
        """Close the open shard after a failure (its folder is about to be removed)."""
        if self.writer is not None and self.writer.tarstream is not None:
            self.writer.tarstream.close()
            self.file.handle.close()

    def close(self) -> dict:
        """The split's manifest fields (counts, histograms, shards)."""
        if self.writer is not None:
            self.writer.close()
        labeled = self.split != "unlabeled"
        return {
            "split": self.split,
            "num_samples": self.count,
            "class_histogram": self.histogram.tolist() if labeled else None,
            "truth_histogram": self.truth_histogram.tolist() if not labeled else None,
            "shards": self.shards,
        }


def write_split(
    items: Iterable[tuple[str, np.ndarray, int | None, int | None]],
    split_dir: Path,
    split: str,
    maxcount: int,
    header: dict,
    *,
    maxsize: int = DEFAULT_MAXSIZE,
) -> dict:
    """Write (key, array, label, truth) items as shards + manifest; arrays are encoded as `header['input']` says."""
    encoding = header["input"].get("encoding", "png")
    quality = header["input"].get("quality", 95)
    writer = SplitWriter(Path(split_dir), split, header["num_classes"], maxcount, maxsize)
    for key, array, label, truth in items:
        writer.write(key, *encode_input(array, header["input"]["kind"], encoding, quality), label, truth)
    manifest = dict(header, **writer.close())
    atomic_write_json(Path(split_dir) / "manifest.json", manifest)
    return manifest


@dataclass
class _EncodeJob:
    """Reads, prepares and encodes the samples of every split, in a worker process or in this one."""

    members: dict[str, Members]
    order: dict[str, np.ndarray]  # split -> permutation of its members: shards are i.i.d. slices
    kind: str
    encoding: str
    quality: int
    resize: int | None
    channels: int | None
    shape: tuple[int, ...]
    source: str

    def read(self, split: str, position: int) -> tuple[str, np.ndarray | str]:
        """(key, prepared array), or (key, why it cannot be read)."""
        pool, index = self.members[split][int(self.order[split][position])]
        try:
            array = pool.read(index)
            return pool.key(index), prepare_image(array, self.resize, self.channels) if self.kind == "image" else array
        except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for unreadable or truncated files
            return pool.key(index), f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

    def encode(self, split: str, position: int) -> tuple:
        pool, index = self.members[split][int(self.order[split][position])]
        label = int(pool.labels[index]) if pool.labels is not None else None
        key, array = self.read(split, position)
        if isinstance(array, str):
            return ("skip", key, array)
        if array.shape != self.shape:
            hint = "pass --resize N to give every image one size" if self.kind == "image" else "vectors must have one length"
            raise UserError(f"sample {key} of '{self.source}' has shape {list(array.shape)}, the first has {list(self.shape)}: {hint}")
        ext, payload = encode_input(array, self.kind, self.encoding, self.quality)
        values = np.asarray(array, np.float64).reshape(-1, array.shape[-1] if self.kind == "image" else array.size)
        if self.kind == "image":
            values = values / 255.0
        return ("ok", key, ext, payload, label, values.sum(axis=0), (values * values).sum(axis=0), len(values))


def _first_readable(job: _EncodeJob, splits: list[str]) -> np.ndarray:
    """The first sample that reads sets the shape every other sample must have."""
    for split in splits:
        for position in range(len(job.members[split])):
            key, array = job.read(split, position)
            if not isinstance(array, str):
                return array
            if split != "unlabeled":
                raise UserError(f"cannot read sample {key} of '{job.source}' for the {split} split: {array}")
    raise UserError(f"source '{job.source}' has no readable samples")


_JOB: _EncodeJob | None = None  # what forked workers encode (set before the pool forks; pools do not pickle)


def _encode_in_worker(task: tuple[str, int]) -> tuple:
    return _JOB.encode(*task)


def _encoded(job: _EncodeJob, split: str, pool, window: int = 4096) -> Iterator[tuple]:
    """The split's encoded samples in order; with a process pool, two windows in flight bound the memory."""
    n = len(job.members[split])
    if pool is None:
        yield from (job.encode(split, i) for i in range(n))
        return
    pending: deque = deque()
    for start in range(0, n, window):
        tasks = [(split, i) for i in range(start, min(start + window, n))]
        pending.append(pool.imap(_encode_in_worker, tasks, chunksize=64))
        if len(pending) > 1:
            yield from pending.popleft()
    while pending:
        yield from pending.popleft()


def _check_write_options(out: Path, source: Source, maxcount: int, maxsize: int, workers: int, encoding: str, quality: int,
                         resize: int | None, channels: int | None) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output folder already exists and is not empty: {out} (choose another --out or remove it)")
    for name, value in (("--maxcount", maxcount), ("--maxsize", maxsize), ("--workers", workers)):
        if value < 1:
            raise UserError(f"{name} must be at least 1; got {value}")
    if encoding not in ENCODINGS:
        raise UserError(f"--encoding must be one of {', '.join(ENCODINGS)}; got {encoding!r}")
    if not 1 <= quality <= 100:
        raise UserError(f"--quality must be in 1..100; got {quality}")
    if resize is not None and resize < 1:
        raise UserError(f"--resize must be at least 1; got {resize}")
    if channels not in (None, 1, 3):
        raise UserError(f"--channels must be 1 or 3; got {channels}")
    if source.kind == "vector" and (encoding != "png" or resize or channels):
        raise UserError(f"source '{source.name}' holds vectors: --encoding, --resize and --channels apply to images only")


def _write_splits(job: _EncodeJob, splits: list[str], tmp: Path, num_classes: int, maxcount: int, maxsize: int,
                  workers: int) -> tuple[dict, dict, tuple]:
    """Encode (in `workers` processes) and write every split; returns each split's manifest fields, its
    skipped samples, and (sum, sum of squares, count) per channel over the training splits."""
    global _JOB
    process_pool = writer = None
    sums = squares = 0.0
    count = 0
    fields: dict[str, dict] = {}
    skipped: dict[str, list] = {}
    try:
        if workers > 1:
            import multiprocessing

            _JOB = job  # fork: workers inherit the pools (their readers are closures, which do not pickle)
            process_pool = multiprocessing.get_context("fork").Pool(workers)
        for split in splits:
            writer = SplitWriter(tmp / split, split, num_classes, maxcount, maxsize)
            skipped[split] = []
            for result in _encoded(job, split, process_pool):
                if result[0] == "skip":
                    _, key, reason = result
                    if split != "unlabeled":  # the labeled and test splits are the protocol: no silent holes
                        raise UserError(f"cannot read sample {key} of '{job.source}' for the {split} split: {reason}")
                    skipped[split].append({"key": key, "reason": reason})
                    continue
                _, key, ext, payload, label, s1, s2, n = result
                writer.write(key, ext, payload, None if split == "unlabeled" else label, label if split == "unlabeled" else None)
                if split != "test":
                    sums, squares, count = sums + s1, squares + s2, count + n
            fields[split] = writer.close()
            writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        _JOB = None
        if process_pool is not None:
            process_pool.terminate()
            process_pool.join()
    return fields, skipped, (sums, squares, count)


def write_dataset(
    source: Source,
    out: str | Path,
    labels_per_class: int | None,
    seed: int = 0,
    test_fraction: float = 0.3,
    maxcount: int = DEFAULT_MAXCOUNT,
    *,
    maxsize: int = DEFAULT_MAXSIZE,
    encoding: str = "png",
    quality: int = 95,
    resize: int | None = None,
    channels: int | None = None,
    workers: int = 1,
    source_path: str | None = None,
) -> dict[str, dict]:
    """Split `source` class-balanced and write its splits under `out`.

    Samples are read, prepared and encoded by `workers` processes and written in order by this one,
    so the bytes do not depend on `workers`. Mean and std are exact over the training splits, taken
    in the same pass. Everything is written into a hidden sibling folder that is renamed to `out`
    at the end, so an interrupted write never leaves a folder that looks like a finished dataset.
    """
    out = Path(out)
    _check_write_options(out, source, maxcount, maxsize, workers, encoding, quality, resize, channels)
    plan = plan_splits(source, labels_per_class, seed, test_fraction)
    if source.given_splits is not None:
        splits = [s for s in SPLITS if s in source.given_splits]
    else:
        splits = list(SPLITS) if source.train.labels is not None else ["unlabeled"]
    rng = np.random.default_rng(seed)
    members = {s: getattr(plan, s) for s in splits}
    # Shards are i.i.d. slices of a split; a re-sharded dataset keeps its order (it was shuffled when written).
    order = {s: np.arange(len(members[s])) if source.given_splits is not None else rng.permutation(len(members[s])) for s in splits}
    job = _EncodeJob(members, order, source.kind, encoding, quality, resize, channels if source.kind == "image" else None, (), source.name)
    first = _first_readable(job, splits)
    job.shape = tuple(first.shape)
    encoded_as = "npy" if source.kind == "vector" else encoding
    header = {
        "format": FORMAT,
        "source": source.name,
        "source_path": source_path,
        "num_classes": source.num_classes,
        "class_names": source.class_names,
        "input": {"kind": source.kind, "encoding": encoded_as, "shape": list(first.shape), "resize": resize},
        "protocol": plan.protocol,
    }
    if encoded_as == "jpg":
        header["input"]["quality"] = quality

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        fields, skipped, (sums, squares, count) = _write_splits(job, splits, tmp, source.num_classes, maxcount, maxsize, workers)
        header["mean"] = header["std"] = None  # only a test split (re-sharding one): nothing to normalize with
        if count:
            mean = np.asarray(sums) / count
            std = np.sqrt(np.maximum(np.asarray(squares) / count - mean * mean, 0.0))
            header["mean"], header["std"] = mean.tolist(), np.where(std > 0, std, 1.0).tolist()
        manifests = {}
        for split in splits:
            manifests[split] = dict(header, **fields[split])
            if skipped[split]:
                manifests[split]["skipped"] = skipped[split]
            atomic_write_json(tmp / split / "manifest.json", manifests[split])
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifests


# ----------------------------------------------------------------------------------------------
# verify


@dataclass
class ShardReport:
    name: str  # split/file
    samples: int
    problems: list[str]


def _verify_shard(manifest: Manifest, index: int) -> ShardReport:
    """Everything about one shard: bytes, sha256, count, that every sample decodes to the manifest's
    shape, labels in range, unique keys, and its class histogram."""
    entry = manifest.data["shards"][index]
    shard = manifest.shards[index]
    url = manifest.url(shard)
    name = f"{manifest.root.name}/{shard.url}"
    reader = ShardReader(url, shard)
    problems: list[str] = []
    bad_samples: list[str] = []
    keys: set[str] = set()
    num_classes, labeled = manifest.num_classes, manifest.data.get("split") != "unlabeled"
    histogram = np.zeros(num_classes, np.int64)
    labels_in_range = True
    expected = manifest.input_shape
    try:
        for raw in reader:
            key = raw.get("__key__", "?")
            if key in keys:
                problems.append(f"sample key {key} occurs twice")
            keys.add(key)
            try:
                sample = decode_sample(raw, manifest.channels)
            except Exception as exc:
                bad_samples.append(f"{key} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
                continue
            if tuple(sample["input"].shape) != tuple(expected):
                bad_samples.append(f"{key} (shape {list(sample['input'].shape)}, the manifest says {list(expected)})")
            value = sample["label"] if labeled else sample["truth"]
            if labeled and value is None:
                problems.append(f"sample {key} has no label")
            elif value is not None:
                if not 0 <= value < num_classes:
                    problems.append(f"sample {key} has label {value}, outside 0..{num_classes - 1}")
                    labels_in_range = False
                else:
                    histogram[value] += 1
    except DataError as exc:
        problems.append(str(exc).removeprefix(f"shard {url} "))
    problems = reader.problems() + problems
    if bad_samples:
        problems.append(f"{len(bad_samples)} sample(s) do not decode: {', '.join(bad_samples[:3])}{' ...' if len(bad_samples) > 3 else ''}")
    if "class_histogram" in entry and num_classes and labels_in_range and reader.samples == shard.num_samples:
        if histogram.tolist() != entry["class_histogram"]:
            problems.append(f"class histogram {histogram.tolist()}, the manifest says {entry['class_histogram']}")
    return ShardReport(name, reader.samples, problems)


def _verify_task(task: tuple[str, int, bool]) -> ShardReport:
    return _verify_shard(load_manifest(task[0], task[2]), task[1])


def one_torch_thread() -> None:
    """For processes that decode one small image at a time: intra-op threads only add barrier waits
    (17x slower verification of 8x8 digits on a busy 2-core machine, measured); parallelism comes
    from processes."""
    import torch

    torch.set_num_threads(1)


def split_folders(folder: str | Path) -> list[Path]:
    """A dataset folder's split folders, or the folder itself when it is one split."""
    folder = Path(folder)
    if (folder / "manifest.json").is_file():
        return [folder]
    found = [folder / s for s in SPLITS if (folder / s / "manifest.json").is_file()]
    if not found:
        if not folder.is_dir():
            raise UserError(f"shard folder not found: {folder}")
        raise UserError(f"{folder} holds no manifest.json, nor splits with one ({', '.join(SPLITS)})")
    return found


def verify(folder: str | Path, workers: int = 1, allow_pipe: bool = False) -> list[ShardReport]:
    """Check every shard of a dataset (or of one split) against its manifest; one report per shard,
    plus one per split for problems of the manifest itself or tar files it does not list."""
    reports: list[ShardReport] = []
    tasks = []
    for split_dir in split_folders(folder):
        manifest = load_manifest(split_dir, allow_pipe)
        problems = []
        listed = {s.url for s in manifest.shards}
        counted = sum(s.num_samples for s in manifest.shards)
        if counted != manifest.num_samples:
            problems.append(f"the shards hold {counted} samples in all, the manifest says {manifest.num_samples}")
        problems += [f"{p.name} is not listed in the manifest" for p in sorted(split_dir.glob("*.tar")) if p.name not in listed]
        if problems:
            reports.append(ShardReport(f"{split_dir.name}/manifest.json", counted, problems))
        tasks += [(str(split_dir), i, allow_pipe) for i in range(len(manifest.shards))]
    if workers > 1 and len(tasks) > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(min(workers, len(tasks)), initializer=one_torch_thread) as pool:
            reports += pool.map(_verify_task, tasks, chunksize=1)
    else:
        reports += [_verify_task(task) for task in tasks]
    return reports
