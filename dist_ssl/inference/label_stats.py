"""Statistics of pseudo-labels (per class: count, mean confidence, accuracy against the hidden
truth; a confidence histogram) and their TensorBoard view, with a grid of labeled samples.

Statistics add up shard by shard (`LabelStats.add` / `merge`), so a pool of any size is summed
without holding its predictions in memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CONFIDENCE_BINS = 20  # of width 0.05 over [0, 1]


class LabelStats:
    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.count = np.zeros(num_classes, np.int64)
        self.confidence = np.zeros(num_classes, np.float64)  # sum per class
        self.known = np.zeros(num_classes, np.int64)  # samples whose hidden truth is known
        self.correct = np.zeros(num_classes, np.int64)
        self.histogram = np.zeros(CONFIDENCE_BINS, np.int64)

    def add(self, labels: np.ndarray, confidences: np.ndarray, truth: np.ndarray) -> None:
        """`truth` is -1 where unknown; accuracy counts only samples whose truth is known."""
        labels = np.asarray(labels, np.int64)
        truth = np.asarray(truth, np.int64)
        c = self.num_classes
        self.count += np.bincount(labels, minlength=c)
        self.confidence += np.bincount(labels, weights=np.asarray(confidences, np.float64), minlength=c)
        known = truth >= 0
        self.known += np.bincount(labels[known], minlength=c)
        self.correct += np.bincount(labels[known & (labels == truth)], minlength=c)
        self.histogram += np.histogram(confidences, bins=CONFIDENCE_BINS, range=(0.0, 1.0))[0]

    def merge(self, other: "LabelStats") -> None:
        for name in ("count", "confidence", "known", "correct", "histogram"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"stats_count": self.count, "stats_confidence": self.confidence, "stats_known": self.known,
                "stats_correct": self.correct, "stats_histogram": self.histogram}

    @classmethod
    def from_arrays(cls, data, num_classes: int) -> "LabelStats":
        stats = cls(num_classes)
        for name in ("count", "confidence", "known", "correct", "histogram"):
            setattr(stats, name, np.asarray(data[f"stats_{name}"]))
        return stats

    def summary(self, class_names: list[str]) -> dict:
        def ratio(a, b):
            return float(a) / float(b) if b else None

        total, known = int(self.count.sum()), int(self.known.sum())
        return {
            "count": total,
            "mean_confidence": ratio(self.confidence.sum(), total),
            "truth_known": known,
            "accuracy": ratio(self.correct.sum(), known),  # against the hidden truth; None without one
            "class_histogram": self.count.tolist(),
            "confidence_histogram": {"edges": np.linspace(0, 1, CONFIDENCE_BINS + 1).round(4).tolist(), "counts": self.histogram.tolist()},
            "per_class": [
                {"class": name, "count": int(self.count[i]), "mean_confidence": ratio(self.confidence[i], self.count[i]),
                 "accuracy": ratio(self.correct[i], self.known[i])}
                for i, name in enumerate(class_names)
            ],
        }


# ----------------------------------------------------------------------------------------------
# TensorBoard


def _histogram(writer, tag: str, right_edges: list[float], counts: list[int], centers: list[float], step: int) -> None:
    counts_ = np.asarray(counts, np.float64)
    total = counts_.sum()
    if total == 0:
        return
    centers_ = np.asarray(centers, np.float64)
    used = np.nonzero(counts_)[0]
    writer.add_histogram_raw(
        tag, min=float(centers_[used[0]]), max=float(centers_[used[-1]]), num=int(total),
        sum=float((counts_ * centers_).sum()), sum_squares=float((counts_ * centers_**2).sum()),
        bucket_limits=[float(e) for e in right_edges], bucket_counts=counts_.tolist(), global_step=step,
    )


def log_statistics(writer, prefix: str, stats: dict, step: int) -> None:
    """Scalars and histograms of one `LabelStats.summary` under `prefix/`."""
    writer.add_scalar(f"{prefix}/count", stats["count"], step)
    if stats["mean_confidence"] is not None:
        writer.add_scalar(f"{prefix}/mean_confidence", stats["mean_confidence"], step)
    if stats["accuracy"] is not None:
        writer.add_scalar(f"{prefix}/accuracy", stats["accuracy"], step)
    edges = stats["confidence_histogram"]["edges"]
    _histogram(writer, f"{prefix}/confidence", edges[1:], stats["confidence_histogram"]["counts"],
               [(a + b) / 2 for a, b in zip(edges, edges[1:])], step)
    classes = len(stats["class_histogram"])
    _histogram(writer, f"{prefix}/classes", [i + 0.5 for i in range(classes)], stats["class_histogram"], list(range(classes)), step)
    rows = ["| class | count | mean confidence | accuracy |", "|---|---|---|---|"]
    for row in stats["per_class"]:
        conf = "" if row["mean_confidence"] is None else f"{row['mean_confidence']:.3f}"
        acc = "" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
        rows.append(f"| {row['class']} | {row['count']} | {conf} | {acc} |")
    writer.add_text(f"{prefix}/per_class", "\n".join(rows), step)


def sample_grid(split_dir: Path, class_names: list[str], count: int = 64, columns: int = 8, tile: int = 64) -> np.ndarray | None:
    """The first `count` samples of a labeled image split, each captioned with its label: green
    when the hidden truth agrees, red when it does not, white when there is none (HWC uint8)."""
    from PIL import Image, ImageDraw, ImageFont

    from dist_ssl.data.shards.codec import decode_sample
    from dist_ssl.data.shards.manifest import load_manifest
    from dist_ssl.data.shards.tar import raw_samples

    manifest = load_manifest(split_dir)
    if manifest.kind != "image" or manifest.num_samples == 0:
        return None
    channels = manifest.shape[-1]
    samples = []
    for shard in manifest.shards:
        for raw in raw_samples(manifest.url(shard)):
            samples.append(decode_sample(raw, channels))
            if len(samples) == count:
                break
        if len(samples) == count:
            break
    caption = 14
    rows = -(-len(samples) // columns)
    canvas = Image.new("RGB", (columns * tile, rows * (tile + caption)), "black")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, sample in enumerate(samples):
        array = sample["input"].permute(1, 2, 0).numpy()
        image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).convert("RGB")
        small = max(image.size) < tile
        image = image.resize((tile, tile), Image.NEAREST if small else Image.BILINEAR)
        x, y = (i % columns) * tile, (i // columns) * (tile + caption)
        canvas.paste(image, (x, y))
        label, truth = sample["label"], sample["truth"]
        colour = "white" if truth is None else ("lime" if truth == label else "red")
        draw.text((x + 2, y + tile + 1), class_names[label][:10] if label is not None else "?", fill=colour, font=font)
    return np.asarray(canvas)
