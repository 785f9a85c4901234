"""One sample's bytes: encoding an input for a shard, decoding a stored sample.

A sample is `KEY.png` / `KEY.jpg` / `KEY.npy` (a raw uint8 HWC image, or a float32 vector) plus
`KEY.cls` (labeled and test splits) or `KEY.truth.cls` (unlabeled split: the hidden true label, for
monitoring only; the training loop never hands it to a method), and `KEY.soft.npy` for a soft
pseudo-label. Keys are `<origin>-<index>` (or the source's own keys when re-sharding), unique within
a dataset. Nothing in a shard is ever unpickled: `.npy` members are loaded with `allow_pickle=False`
and other members are ignored.
"""

from __future__ import annotations

import functools
import io

import numpy as np

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
INPUT_EXTENSIONS = IMAGE_EXTENSIONS + ("npy",)
ENCODINGS = ("png", "jpg", "raw")  # how images are stored; vectors are always npy
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def read_image_file(path) -> np.ndarray:
    """An image file (a path or a binary file object) -> HWC uint8 with 1 (grey modes) or 3 channels
    (everything else, alpha dropped)."""
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("L" if image.mode in GREY_MODES else "RGB"))
    return array[..., None] if array.ndim == 2 else array


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
    return read_image_file(io.BytesIO(data))


@functools.cache
def _torchvision_decoder():
    """(torchvision's decode_image op, the GRAY and RGB mode values), or None once it is gone.

    Why the op and not `torchvision.io.decode_image`: that wrapper logs API usage and issues a
    deprecation warning on every call, which with the catch_warnings around it took 7 of 21 us per
    28x28 PNG (measured) and a tenth of the shard reading speed.
    """
    try:
        import torch
        from torchvision.io import ImageReadMode

        return torch.ops.image.decode_image, ImageReadMode.GRAY.value, ImageReadMode.RGB.value
    except (ImportError, AttributeError, RuntimeError):  # no torchvision, or built without its image ops
        return None


def _decode_image(data: bytes, channels: int):
    """Encoded image -> uint8 CHW tensor.

    torchvision's decoder is 8x faster than PIL on small images (15 vs 126 us for an 8x8 PNG), so
    it is used while it exists; torchvision 0.29 deprecated it in favour of torchcodec, and PIL
    takes over once it is gone.
    """
    import torch

    decoder = _torchvision_decoder()
    if decoder is not None:
        op, gray, rgb = decoder
        return op(torch.frombuffer(bytearray(data), dtype=torch.uint8), gray if channels == 1 else rgb, False)
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
