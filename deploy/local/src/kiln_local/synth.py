"""Synthetic datasets for demos and tests: coloured squares and circles on noise, deterministic per seed.

Example:
    >>> import tempfile, pathlib
    >>> data = make_detection_dataset(pathlib.Path(tempfile.mkdtemp()), n_train=2, n_val=1)
    >>> data.name, sorted(p.name for p in (data.parent / "labels" / "train").iterdir())
    ('data.yaml', ['train_0000.txt', 'train_0001.txt'])
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from pathlib import Path

import yaml
from PIL import Image, ImageDraw

Box = tuple[int, float, float, float, float]  # class, cx, cy, w, h (normalised, YOLO format)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, xy: tuple[int, int, int, int], colour: tuple[int, ...]) -> None:
    if shape == "circle":
        draw.ellipse(xy, fill=colour)
    elif shape == "triangle":
        x0, y0, x1, y1 = xy
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)
    else:  # square and any other name: a filled rectangle
        draw.rectangle(xy, fill=colour)


def _image(rng: random.Random, imgsz: int) -> tuple[Image.Image, list[int]]:
    """A random background colour with low-amplitude noise (so images are not trivially identical), and that colour."""
    base = [rng.randrange(40, 200) for _ in range(3)]
    noise = bytes(max(0, min(255, base[i % 3] + rng.randrange(-20, 21))) for i in range(imgsz * imgsz * 3))
    return Image.frombytes("RGB", (imgsz, imgsz), noise), base


def _free(box: tuple[int, int, int], placed: list[tuple[int, int, int]]) -> bool:
    """Whether the square ``(x0, y0, side)`` overlaps none of ``placed``.

    >>> _free((0, 0, 10), [(10, 0, 5)]), _free((0, 0, 10), [(9, 9, 5)])
    (True, False)
    """
    x, y, w = box
    return all(x + w <= a or a + b <= x or y + w <= c or c + b <= y for a, c, b in placed)


def _colour(rng: random.Random, background: Sequence[int], min_contrast: int) -> tuple[int, ...]:
    """A random colour whose summed |R|+|G|+|B| distance to ``background`` is at least ``min_contrast``.

    Up to 300 such colours are common: every background channel lies in 40..199, so each can differ by 128 or more.
    """
    while True:
        colour = tuple(rng.randrange(0, 256) for _ in range(3))
        if sum(abs(a - b) for a, b in zip(colour, background)) >= min_contrast:
            return colour


def _shapes(rng: random.Random, img: Image.Image, background: Sequence[int], classes: Sequence[str],
            max_objects: int, sizes: tuple[float, float] | None, overlap: bool, min_contrast: int) -> list[Box]:
    draw = ImageDraw.Draw(img)
    size = img.width
    lo, hi = (max(4, size // 6), max(5, size // 2)) if sizes is None else (round(sizes[0] * size),
                                                                          round(sizes[1] * size))
    boxes: list[Box] = []
    placed: list[tuple[int, int, int]] = []
    for _ in range(rng.randint(1, max_objects)):
        cls = rng.randrange(len(classes))
        w = h = rng.randint(lo, hi)
        for _try in range(1 if overlap else 20):  # no free place after 20 tries: the image gets one shape fewer
            x0, y0 = rng.randint(0, size - w), rng.randint(0, size - h)
            if overlap or _free((x0, y0, w), placed):
                break
        else:
            continue
        placed.append((x0, y0, w))
        colour = _colour(rng, background, min_contrast)
        _draw_shape(draw, classes[cls], (x0, y0, x0 + w - 1, y0 + h - 1), colour)
        boxes.append((cls, (x0 + w / 2) / size, (y0 + h / 2) / size, w / size, h / size))
    return boxes


def make_detection_dataset(root: Path, n_train: int = 16, n_val: int = 8, imgsz: int = 64,
                           classes: Sequence[str] = ("square", "circle"), seed: int = 0,
                           max_objects: int = 3, *, sizes: tuple[float, float] | None = None,
                           overlap: bool = True, min_contrast: int = 0) -> Path:
    """Write a YOLO detection dataset under ``root`` and return its ``data.yaml``.

    Layout: ``images/{train,val}/*.png``, ``labels/{train,val}/*.txt`` (``class cx cy w h``, normalised) and
    ``data.yaml`` with an absolute ``path``.  Same arguments, same bytes.

    Each image holds 1 to ``max_objects`` filled shapes of random colour on a noisy background. The defaults make a
    hard set (shapes from a sixth to half of the image side, overlapping, some barely visible): fine for testing
    the plumbing, but a tiny model learns almost nothing from it in minutes. ``sizes`` (the range of a shape's side
    as a fraction of the image's), ``overlap=False`` and ``min_contrast`` (the least summed RGB distance between a
    shape and its background, at most 300) make one that it does learn: ``kiln demo``'s.
    """
    if not 0 <= min_contrast <= 300:
        raise ValueError(f"min_contrast must be within 0..300, not {min_contrast}")
    if sizes is not None and not 0 < sizes[0] <= sizes[1] <= 1:
        raise ValueError(f"sizes must be fractions 0 < low <= high <= 1, not {sizes}")
    root = Path(root).resolve()
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, background = _image(rng, imgsz)
            boxes = _shapes(rng, img, background, classes, max_objects, sizes, overlap, min_contrast)
            img.save(root / "images" / split / f"{split}_{i:04d}.png")
            (root / "labels" / split / f"{split}_{i:04d}.txt").write_text(
                "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in boxes)
            )
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({
        "path": str(root), "train": "images/train", "val": "images/val",
        "names": dict(enumerate(classes)),
    }, sort_keys=False))
    return data


def make_classification_dataset(root: Path, n_train: int = 16, n_val: int = 8, imgsz: int = 32,
                                classes: Sequence[str] = ("square", "circle"), seed: int = 0) -> Path:
    """Write an Ultralytics classification dataset (``{train,val}/<class>/*.png``) and return ``root``.

    ``n_train``/``n_val`` are per class.  Each image holds one large shape of its class.
    """
    root = Path(root).resolve()
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img, _ = _image(rng, imgsz)
                w = rng.randint(imgsz // 2, imgsz - 2)
                x0, y0 = rng.randint(0, imgsz - w), rng.randint(0, imgsz - w)
                colour = tuple(rng.randrange(0, 256) for _ in range(3))
                _draw_shape(ImageDraw.Draw(img), cls, (x0, y0, x0 + w - 1, y0 + w - 1), colour)
                img.save(folder / f"{cls}_{i:04d}.png")
    return root


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m kiln_local.synth OUT_DIR [--task detect|classify] ...``: write a dataset, print its path."""
    parser = argparse.ArgumentParser(prog="python -m kiln_local.synth", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the dataset into")
    parser.add_argument("--task", choices=("detect", "classify"), default="detect")
    parser.add_argument("--train", type=int, default=16, help="training images (per class for classify)")
    parser.add_argument("--val", type=int, default=8, help="validation images (per class for classify)")
    parser.add_argument("--imgsz", type=int, default=None, help="image size (default 64 detect, 32 classify)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.task == "detect":
        path = make_detection_dataset(args.out, args.train, args.val, args.imgsz or 64, seed=args.seed)
    else:
        path = make_classification_dataset(args.out, args.train, args.val, args.imgsz or 32, seed=args.seed)
    print(path)


if __name__ == "__main__":
    main()
