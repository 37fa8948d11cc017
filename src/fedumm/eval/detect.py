"""Built-in classical detector of synthetic-world shapes, feeding the GenEval judge.

GenEval (Ghosh et al. 2023, "GenEval: An Object-Focused Framework for Evaluating Text-to-Image
Alignment", arXiv:2310.11513) judges a generated image from the objects a detector finds in it
and a colour classification of each object. For the synthetic world of
:mod:`fedumm.data.render` (solid shapes of six colours on a plain background) this module is
that detector, built from classical image processing only, with no learned weights:

1. The image is brought to the canvas size (64x64) and the background colour is estimated from
   the border (falling back to :data:`~fedumm.data.render.BACKGROUND`).
2. Each pixel is explained as a blend ``background + alpha * (colour - background)`` of the
   background with each palette colour. A pixel at least half-way (``alpha >= 0.5``) from the
   background towards some palette colour is foreground, whatever its exact colour.
3. Foreground pixels are grouped into 8-connected regions; tiny ones are dropped. As in GenEval,
   finding an object and naming its colour are separate steps: a region is one object, and its
   colour is a forced choice among GenEval's ten colour names (the world's six plus
   :data:`OTHER_COLOURS`) by the median RGB of its core, so a dull or dark blob is found but named
   "brown" or "black", never passed off as a palette colour. A region whose pixels mostly sit close
   to palette colours in two or more separate parts (objects drawn touching) is split into one
   object per part; each part takes in the free neighbouring pixels that are at least half its
   colour (the tips that JPEG chroma subsampling or blur pale).
4. Each component is classified from moments of its mask, which use every pixel and so hardly
   move when a tip is lost or a corner rounded (see :data:`PROTOTYPES`). Its score is the class
   posterior of an equal-variance Gaussian model around the class prototypes, times a fit
   quality and a size factor: clean renders score above 0.98, well over GenEval's counting
   threshold of 0.9, and blobs that fit no prototype score low. The detector abstains (score 0)
   on a mask whose posterior or fit quality is below :class:`DetectorConfig`'s ``min_posterior``
   or ``min_quality``: a blob between two shapes is not passed off as either.

:func:`evaluate_images` runs the detector over a directory of generated images named
``{index:05d}_{sample:02d}.png`` and judges them with :func:`fedumm.eval.geneval.evaluate`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image

from fedumm.data.geneval import GenEvalPrompt
from fedumm.data.render import BACKGROUND, CANVAS, COLOURS, SHAPES
from fedumm.errors import DataError
from fedumm.eval.geneval import DEFAULT_JUDGE_CONFIG, Detection, JudgeConfig, evaluate
from fedumm.io import atomic_write_text

__all__ = [
    "DEFAULT_DETECTOR_CONFIG",
    "IMAGE_NAME_PATTERN",
    "OTHER_COLOURS",
    "PROTOTYPES",
    "DetectorConfig",
    "ShapeFit",
    "detect",
    "detect_file",
    "evaluate_images",
    "fit_objects",
    "image_name",
    "save_detections_jsonl",
]

logger = logging.getLogger(__name__)

PROTOTYPES: Mapping[str, tuple[float, float, float, float]] = MappingProxyType(
    {
        "circle": (-0.12, 0.0, 2.05, 0.0),
        "square": (0.6, 0.0, 1.8, 0.0),
        "triangle": (0.0, 0.57, 2.4, 0.15),
        "diamond": (-0.6, 0.0, 2.4, 0.0),
    }
)
"""Per shape, the moment features of a clean render's mask.

The features are: the mean kurtosis of the mask's projections on the two diagonals minus that on
the two axes (a square's axis projections are uniform, kurtosis 1.8, its diagonal ones triangular,
2.4; a diamond the reverse; a disc about 2 in every direction); the larger absolute skewness of
the two axis projections (a triangle's centroid lies a third of its height from its base); the
mean axis kurtosis; and the absolute half log-ratio of the axis variances. Moments use every
pixel, so a lost tip pixel or a rounded corner moves them little.
"""

IMAGE_NAME_PATTERN = re.compile(r"^(?P<index>\d{5,})_(?P<sample>\d{2,})\.png$")
"""Generated image file names: 0-based prompt index (5+ digits), then sample number (2+ digits)."""

_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


@dataclass(frozen=True, kw_only=True)
class DetectorConfig:
    """The detector's constants; areas are in pixels of the 64x64 canvas."""

    min_alpha: float = 0.5
    """Least blend weight of a palette colour over the background for a pixel to be foreground."""
    max_residual: float = 55.0
    """Largest RGB distance of a pixel from a colour's blend line for it to count in a part of that
    colour when touching objects are split (see ``split_coverage``)."""
    grow_residual: float = 180.0
    """Largest distance from a component colour's blend line for a free neighbouring pixel to join it."""
    grow_steps: int = 1
    """Rings of neighbouring pixels a component may grow by."""
    background_tolerance: float = 60.0
    """Largest RGB distance of the border's median colour from the nominal background to be used."""
    split_coverage: float = 0.5
    """Least share of a foreground region that two or more palette-coloured parts must cover for the
    region to be split into one object per part (touching objects) instead of read as one object."""
    core_alpha: float = 0.75
    """Least blend weight of a pixel to count in the colour vote of its object (its core, not its rim)."""
    min_area: int = 12
    """Components with fewer pixels are dropped."""
    full_area: int = 40
    """Components with at least this many pixels get no size penalty (a small shape has 85)."""
    kurtosis_gap_scale: float = 0.12
    """Spread of the diagonal-minus-axis kurtosis around a prototype."""
    skewness_scale: float = 0.1
    """Spread of the absolute skewness around a prototype."""
    kurtosis_scale: float = 0.1
    """Spread of the axis kurtosis around a prototype."""
    elongation_scale: float = 0.12
    """Spread of the absolute half log-ratio of the axis variances around a prototype."""
    quality_scale: float = 4.0
    """Normalised distance to the best prototype at which the fit quality falls to exp(-1/2)."""
    min_posterior: float = 0.9
    """Abstain (score 0, so GenEval's judge drops the object) when the best class's posterior is
    below this: the mask lies between two prototypes, a blob a person would not name either way.
    0.9 and ``min_quality`` 0.8 are calibrated by ``benchmarks/detector_calibration.py`` on
    degraded renders of known shape (docs/BENCHMARKS.md); 0 and 0 give the detector without
    abstention that judged GenEval before 2026-12-03."""
    min_quality: float = 0.8
    """Abstain when the fit quality to the best prototype is below this: the mask fits no class."""

    def __post_init__(self) -> None:
        for name, top in (("min_alpha", "1)"), ("split_coverage", "1]"), ("core_alpha", "1]")):
            value = getattr(self, name)
            inside = isinstance(value, (int, float)) and 0.0 < value <= 1.0 and (top == "1]" or value < 1.0)
            if not inside:
                raise ValueError(f"{name} must be in (0, {top}, got {value!r}")
        for name in ("min_posterior", "min_quality"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if isinstance(self.grow_steps, bool) or not isinstance(self.grow_steps, int) or self.grow_steps < 0:
            raise ValueError(f"grow_steps must be a non-negative integer, got {self.grow_steps!r}")
        if not 1 <= self.min_area <= self.full_area:
            raise ValueError(
                f"need 1 <= min_area <= full_area, got min_area={self.min_area!r}, "
                f"full_area={self.full_area!r}"
            )
        for name in (
            "max_residual",
            "grow_residual",
            "background_tolerance",
            "kurtosis_gap_scale",
            "skewness_scale",
            "kurtosis_scale",
            "elongation_scale",
            "quality_scale",
        ):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")


DEFAULT_DETECTOR_CONFIG = DetectorConfig()

_COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
_PALETTE = np.array([COLOURS[name] for name in _COLOUR_NAMES], dtype=np.float64)

OTHER_COLOURS: Mapping[str, tuple[int, int, int]] = MappingProxyType(
    {"pink": (240, 130, 190), "brown": (150, 80, 40), "black": (20, 20, 20), "white": (255, 255, 255)}
)
"""Colour names outside the world's palette that an object's colour may also be read as.

GenEval names an object's colour by a forced choice among ten names (CLIP over the masked crop);
these are the four of them outside the world's six, so that an off-colour object is named wrongly
rather than dropped or forced onto the nearest palette colour: a dull brown blob reads as "brown".
"""
_NAMED = tuple(COLOURS) + tuple(OTHER_COLOURS)
_NAMED_RGB = np.array([*COLOURS.values(), *OTHER_COLOURS.values()], dtype=np.float64)
_PROTO = np.array([PROTOTYPES[shape] for shape in SHAPES], dtype=np.float64)


def image_name(index: int, sample: int) -> str:
    """File name of generated image ``sample`` of prompt ``index``: ``{index:05d}_{sample:02d}.png``."""
    return f"{index:05d}_{sample:02d}.png"


def _background(pixels: np.ndarray, config: DetectorConfig) -> np.ndarray:
    """The border's median colour when it is near the nominal background, else the nominal one."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    median = np.median(border, axis=0)
    nominal = np.array(BACKGROUND, dtype=np.float64)
    if np.linalg.norm(median - nominal) <= config.background_tolerance:
        return median
    return nominal


def _colour_fit(pixels: np.ndarray, config: DetectorConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel and palette colour, the blend weight over the background and the distance to the blend."""
    h, w, _ = pixels.shape
    bg = _background(pixels, config)
    offsets = pixels.reshape(-1, 3) - bg
    lines = _PALETTE - bg
    norms = np.maximum((lines * lines).sum(axis=1), 1.0)
    alpha = offsets @ lines.T / norms
    clipped = np.clip(alpha, 0.0, 1.5)
    residual = np.linalg.norm(offsets[:, None, :] - clipped[:, :, None] * lines[None, :, :], axis=2)
    return alpha.reshape(h, w, -1), residual.reshape(h, w, -1)


def _label_pixels(alpha: np.ndarray, residual: np.ndarray, config: DetectorConfig) -> np.ndarray:
    """Per pixel, the index of its palette colour in ``_COLOUR_NAMES``, or -1 for background."""
    residual = np.where(alpha >= config.min_alpha, residual, np.inf)
    best = residual.argmin(axis=2)
    fit = np.take_along_axis(residual, best[..., None], axis=2)[..., 0]
    return np.where(fit <= config.max_residual, best, -1)


def _grow(
    component: tuple[int, np.ndarray, np.ndarray],
    taken: np.ndarray,
    alpha: np.ndarray,
    residual: np.ndarray,
    config: DetectorConfig,
) -> tuple[int, np.ndarray, np.ndarray]:
    """Add the free neighbouring pixels that are at least half the component's colour (blurred tips)."""
    label, ys, xs = component
    h, w = taken.shape
    for _ in range(config.grow_steps):
        ring = np.zeros((h + 2, w + 2), dtype=bool)
        for dy, dx in _NEIGHBOURS:
            ring[ys + 1 + dy, xs + 1 + dx] = True
        ring = ring[1:-1, 1:-1]
        ring &= ~taken
        ring &= alpha[..., label] >= config.min_alpha
        ring &= residual[..., label] <= config.grow_residual
        if not ring.any():
            break
        taken |= ring
        new_ys, new_xs = np.nonzero(ring)
        ys, xs = np.concatenate([ys, new_ys]), np.concatenate([xs, new_xs])
    return label, ys, xs


def _name_colour(pixels: np.ndarray, alpha: np.ndarray, config: DetectorConfig) -> str:
    """Forced-choice colour name of an object: the named colour nearest its core's median RGB."""
    core = pixels[alpha >= config.core_alpha] if (alpha >= config.core_alpha).any() else pixels  # (n, 3)
    median = np.median(core, axis=0)
    return _NAMED[int(np.linalg.norm(_NAMED_RGB - median, axis=1).argmin())]


def _components(labels: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """8-connected components of equal non-negative label: ``(label, ys, xs)`` each."""
    h, w = labels.shape
    grid = labels.tolist()
    seen = [[False] * w for _ in range(h)]
    found: list[tuple[int, np.ndarray, np.ndarray]] = []
    for y0, x0 in zip(*np.nonzero(labels >= 0), strict=True):
        y0, x0 = int(y0), int(x0)
        if seen[y0][x0]:
            continue
        label = grid[y0][x0]
        seen[y0][x0] = True
        stack = [(y0, x0)]
        ys: list[int] = []
        xs: list[int] = []
        while stack:
            y, x = stack.pop()
            ys.append(y)
            xs.append(x)
            for dy, dx in _NEIGHBOURS:
                ny, nx = y + dy, x + dx
                if 0 <= ny < h and 0 <= nx < w and not seen[ny][nx] and grid[ny][nx] == label:
                    seen[ny][nx] = True
                    stack.append((ny, nx))
        found.append((label, np.array(ys), np.array(xs)))
    return found


def _features(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Moment features of a mask in the order of :data:`PROTOTYPES`."""
    x = xs - xs.mean()
    y = ys - ys.mean()

    def kurtosis(p: np.ndarray) -> float:
        var = float((p * p).mean())
        return float((p**4).mean()) / (var * var) if var > 0 else 1.0

    def skewness(p: np.ndarray) -> float:
        var = float((p * p).mean())
        return abs(float((p**3).mean())) / var**1.5 if var > 0 else 0.0

    axis = (kurtosis(x) + kurtosis(y)) / 2.0
    diagonal = (kurtosis((x + y) / math.sqrt(2.0)) + kurtosis((x - y) / math.sqrt(2.0))) / 2.0
    var_x, var_y = float((x * x).mean()), float((y * y).mean())
    elongation = abs(0.5 * math.log(max(var_x, 1e-3) / max(var_y, 1e-3)))
    return np.array([diagonal - axis, max(skewness(x), skewness(y)), axis, elongation])


@dataclass(frozen=True)
class ShapeFit:
    """How one found object's mask fits the shape classes: the best class, its posterior among the
    classes, the fit quality to that class's prototype and the size factor, all in [0, 1]."""

    shape: str
    posterior: float
    quality: float
    size: float

    def score(self, config: DetectorConfig = DEFAULT_DETECTOR_CONFIG) -> float:
        """The detection score: posterior x quality x size, or 0 where ``config`` abstains."""
        if self.posterior < config.min_posterior or self.quality < config.min_quality:
            return 0.0
        return min(1.0, max(0.0, self.posterior * self.quality * self.size))


def _shape_fit(ys: np.ndarray, xs: np.ndarray, config: DetectorConfig) -> ShapeFit:
    """Shape class and fit of one component from its mask's moments."""
    scales = np.array(
        [config.kurtosis_gap_scale, config.skewness_scale, config.kurtosis_scale, config.elongation_scale]
    )
    d2 = (((_features(ys, xs) - _PROTO) / scales) ** 2).sum(axis=1)
    best = int(d2.argmin())
    posterior = 1.0 / float(np.exp(-(d2 - d2[best]) / 2.0).sum())
    quality = math.exp(-float(d2[best]) / (2.0 * config.quality_scale**2))
    size = min(1.0, (ys.size - config.min_area + 1) / (config.full_area - config.min_area + 1))
    return ShapeFit(SHAPES[best], posterior, quality, size)


def detect(image: Image.Image, *, config: DetectorConfig = DEFAULT_DETECTOR_CONFIG) -> list[Detection]:
    """Detect the synthetic world's shapes in an image; boxes are inclusive pixels of the input image."""
    return [
        Detection(cls=fit.shape, box=box, score=fit.score(config), color=colour)
        for box, colour, fit in fit_objects(image, config=config)
    ]


def fit_objects(
    image: Image.Image, *, config: DetectorConfig = DEFAULT_DETECTOR_CONFIG
) -> list[tuple[tuple[float, float, float, float], str, ShapeFit]]:
    """The objects :func:`detect` finds, before scoring: ``(box, colour name, ShapeFit)`` each,
    ordered as :func:`detect` orders its detections (so one image can be scored under several
    abstention settings without being segmented again)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
    rgb = image.convert("RGB")
    width, height = rgb.size
    if width < 1 or height < 1:
        raise ValueError(f"image must not be empty, got size {rgb.size}")
    if rgb.size != (CANVAS, CANVAS):
        rgb = rgb.resize((CANVAS, CANVAS), Image.Resampling.BOX)
    scale_x, scale_y = width / CANVAS, height / CANVAS
    pixels = np.asarray(rgb, dtype=np.float64)
    found: list[tuple[tuple[float, float, float, float], str, ShapeFit]] = []
    alpha, residual = _colour_fit(pixels, config)
    strict = _label_pixels(alpha, residual, config)
    best_alpha = alpha.max(axis=2)
    foreground = best_alpha >= config.min_alpha
    taken = np.zeros(pixels.shape[:2], dtype=bool)
    objects: list[tuple[str, np.ndarray, np.ndarray]] = []
    for _, ys, xs in _components(np.where(foreground, 0, -1)):
        if ys.size < config.min_area:
            continue
        inside = np.full(strict.shape, -1)
        inside[ys, xs] = strict[ys, xs]
        parts = [c for c in _components(inside) if c[1].size >= config.min_area]
        if len(parts) >= 2 and sum(c[1].size for c in parts) >= config.split_coverage * ys.size:
            # touching objects whose pixels mostly sit on palette colours: one object per colour region
            for _, pys, pxs in parts:
                taken[pys, pxs] = True
            grown = [_grow(c, taken, alpha, residual, config) for c in parts]
            objects += [(_COLOUR_NAMES[label], gys, gxs) for label, gys, gxs in grown]
        else:
            objects.append((_name_colour(pixels[ys, xs], best_alpha[ys, xs], config), ys, xs))
    for colour, ys, xs in objects:
        box = (
            float(xs.min()) * scale_x,
            float(ys.min()) * scale_y,
            (float(xs.max()) + 1.0) * scale_x - 1.0,
            (float(ys.max()) + 1.0) * scale_y - 1.0,
        )
        found.append((box, colour, _shape_fit(ys, xs, config)))
    found.sort(key=lambda f: (f[0][0], f[0][1]))
    return found


def detect_file(
    path: str | os.PathLike[str], *, config: DetectorConfig = DEFAULT_DETECTOR_CONFIG
) -> list[Detection]:
    """Open an image file and :func:`detect` its shapes; unreadable files raise DataError."""
    try:
        with Image.open(path) as image:
            image.load()
            return detect(image, config=config)
    except OSError as exc:
        raise DataError(f"{path}: cannot read image: {exc}") from exc


def _detection_record(det: Detection) -> dict[str, Any]:
    return {"class": det.cls, "box": list(det.box), "score": det.score, "color": det.color}


def save_detections_jsonl(
    path: str | os.PathLike[str], detections_by_image: Mapping[int, Sequence[Sequence[Detection]]]
) -> None:
    """Write ``{prompt index: [detections of each image]}`` as the JSONL that ``load_detections`` reads.

    One line per image, ``{"index": i, "detections": [{"class", "box", "score", "color"}, ...]}``,
    ordered by prompt index and then image order; written atomically.
    """
    lines: list[str] = []
    for index in sorted(_checked_indices(detections_by_image)):
        for detections in detections_by_image[index]:
            record = {"index": index, "detections": [_detection_record(d) for d in detections]}
            lines.append(json.dumps(record) + "\n")
    atomic_write_text(Path(path), "".join(lines))


def _checked_indices(
    detections_by_image: Mapping[int, Sequence[Sequence[Detection]]],
) -> list[int]:
    """The prompt indices of a detections mapping after checking its shape (TypeError if malformed)."""
    indices: list[int] = []
    for index, images in detections_by_image.items():
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise TypeError(f"prompt indices must be non-negative integers, got {index!r}")
        if isinstance(images, Detection) or any(isinstance(item, Detection) for item in images):
            raise TypeError(
                f"detections_by_image[{index}] must be a list of images, each a list of Detection objects"
            )
        for detections in images:
            for det in detections:
                if not isinstance(det, Detection):
                    raise TypeError(f"detections must be Detection objects, got {type(det).__name__}")
        indices.append(index)
    return indices


def _list_images(image_dir: Path) -> dict[int, list[Path]]:
    """Generated images of a directory grouped by prompt index, each group in sample order."""
    try:
        entries = sorted(image_dir.iterdir())
    except OSError as exc:
        raise DataError(f"{image_dir}: cannot list image directory: {exc}") from exc
    found: dict[int, list[tuple[int, Path]]] = {}
    for entry in entries:
        match = IMAGE_NAME_PATTERN.match(entry.name)
        if match is None or not entry.is_file():
            continue
        found.setdefault(int(match["index"]), []).append((int(match["sample"]), entry))
    return {index: [p for _, p in sorted(items)] for index, items in found.items()}


def evaluate_images(
    prompts: Sequence[GenEvalPrompt],
    image_dir: str | os.PathLike[str],
    *,
    config: JudgeConfig = DEFAULT_JUDGE_CONFIG,
    detector: DetectorConfig = DEFAULT_DETECTOR_CONFIG,
    detections_path: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Detect and GenEval-judge the generated images of ``image_dir`` against ``prompts``.

    Images are named ``{index:05d}_{sample:02d}.png`` (prompt index as in the metadata, then
    any number of samples); other files are ignored. A prompt without images is skipped with a
    logged warning; an image of an index no prompt has, or no image at all, raises DataError.
    Returns :func:`fedumm.eval.geneval.evaluate`'s result plus ``"skipped"``, the indices of the
    prompts without images. With ``detections_path`` the detections are also saved as JSONL.
    """
    directory = Path(image_dir)
    images = _list_images(directory)
    if not images:
        raise DataError(f"{directory}: no generated images named like {image_name(0, 0)}")
    known = {prompt.index for prompt in prompts}
    unknown = sorted(set(images) - known)
    if unknown:
        raise DataError(
            f"{images[unknown[0]][0]}: image of prompt index {unknown[0]}, which the prompts do not have"
        )
    skipped = sorted(known - set(images))
    if skipped:
        logger.warning(
            "%d of %d prompts have no images in %s and are skipped (first: index %d)",
            len(skipped),
            len(known),
            directory,
            skipped[0],
        )
    detections = {
        index: [detect_file(path, config=detector) for path in paths] for index, paths in images.items()
    }
    if detections_path is not None:
        save_detections_jsonl(detections_path, detections)
    result = evaluate(prompts, detections, config=config)
    result["skipped"] = skipped
    return result
