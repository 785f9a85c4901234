"""A split's manifest.json: what a dataset folder holds, and which shard URLs may be opened.

Layout written by `dist-ssl shards write SOURCE --out DIR` (`writer.py`):

    DIR/labeled/labeled-000000.tar ...   + DIR/labeled/manifest.json
    DIR/unlabeled/unlabeled-000000.tar   + DIR/unlabeled/manifest.json
    DIR/test/test-000000.tar             + DIR/test/manifest.json

(a source without labels writes only `unlabeled/`). Each manifest lists its shards with their sample
count, bytes and sha256, which every reader checks (`tar.py`, `verify.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dist_ssl.errors import UserError

FORMAT = "dist-ssl-shards/1"
SPLITS = ("labeled", "unlabeled", "test")


class DataError(UserError):
    """A shard that cannot be trusted: missing, truncated or corrupt, its bytes, sha256 or sample count
    differing from the manifest, a label out of range, or too many corrupt samples.

    It is found where the shard is read, which may be one rank or one DataLoader worker only, so every
    rank prints it (`rank_local`).
    """

    rank_local = True


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
