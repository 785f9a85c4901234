"""The shard store: a dataset as WebDataset tar shards plus one manifest.json per split.

One room per concern, lowest first:

- `manifest.py`: the manifest of a split (format, splits, shard list, which URLs may be opened).
- `codec.py`: one sample's bytes: encoding an input for a shard, decoding a stored sample.
- `tar.py`: reading a shard (the tar format), checked against its manifest entry as it is read.
- `writer.py`: writing a source's splits as shards and manifests (`dist-ssl shards write`).
- `verify.py`: checking every shard of a dataset against its manifest (`dist-ssl shards verify`).

`data/sources.py` (where samples come from) uses the manifest, codec and tar rooms; the writer uses
the sources. Nothing here imports back up.
"""
