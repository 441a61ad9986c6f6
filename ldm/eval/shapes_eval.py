"""Shapes-world alignment benchmark (specs/shapes-world.md): a fixed prompt set per task and split, and an
exact evaluator that reads the image back by palette segmentation, with no learned model.

Prompt set. `benchmark_prompts(split, per_task=36, seed=0)` gives per_task prompts for each of TASKS, built
from np.random.default_rng([seed, split index, task index]), so it is a pure function of its arguments. Each
task cycles through its main factor so that it is balanced: single_object through shapes (seen) or held-out
pairs, colors through colors (seen) or held-out pairs, counting through 1, 2, 3, position through the nine
cells, relation through the four relations, attribute_binding through held-out pairs (held-out split). Every
prompt carries its own generation seed, seed * 1_000_000 + split index * 100_000 + task index * 1_000 + i.
- seen: only color-shape pairs outside HELD_OUT; single_object names the shape alone ("a star").
- heldout: every prompt names at least one held-out pair. single_object, which has no color in the seen
  split, names a size and the held-out pair instead ("a small green star"), so it is not the colors task again.
Relation and attribute_binding prompts name two objects that differ in both color and shape.

Scoring (GenEval-style). A prompt scores 1 when every stated attribute holds: the named objects exist as
distinct components with the stated color, shape and size; a position means the object's bounding-box
center lies in that 3 x 3 cell; a relation is read from bounding-box centers (`relation_holds`, lenient);
a count is the exact number of components of that color and shape. Extra unrelated objects are allowed.

Reading an image. The background is the median border color. Each pixel p is projected on the line from the
background to every palette color c, p ~ bg + alpha (c - bg), and takes the color whose line passes nearest
(within MAX_DISTANCE RGB units). Blur, anti-aliasing and shifts toward the background thus read as a
fraction alpha of the object color, not as a rim of some other color (red fading into white passes near
pink). Pixels with alpha >= 0.5 form 4-connected components per color; those under 0.4 % of the canvas are
noise. Each component's coverage map (alpha along its own color's line, within 5 px, minus pixels nearer to
another object) is then explained by each of the five shapes as the renderer draws them, placed from the map's
moments, which blur keeps: the side from the mass (mass = FILL * side^2, the spec's fill ratios) and the box
from the center of mass; each template is blurred by 0 to 2.5 px and compared in relative L1; the best shape
wins when its error is <= MAX_FIT_ERROR, else the component has no shape (bars, rings, merged blobs).
Analysis by synthesis instead of thresholds on bounding-box fill ratios, which blur drags toward the circle's:
a 12 px star blurred by 1.2 px fills 0.63-0.75 of its box, like a circle, but is still fitted as a star.
Size: small when the fitted side is under 0.3 of the canvas (small = 0.2, large = 0.4); position and relations
use the fitted bounding-box center. Big objects are block-averaged to about FIT_SIDE px before fitting.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from ..config import is_int
from ..data.shapes import (BACKGROUNDS, CENTROID_DROP, COLORS, FILL, HELD_OUT, POSITIONS, RELATIONS, SHAPES, SIZES,
                           SUBPIXEL, Scene, ShapeObject, check_choice, noun_phrase, place, position_of,
                           position_phrase, relation_holds, render, shape_coverage)

TASKS = ("single_object", "colors", "counting", "position", "relation", "attribute_binding")
SPLITS = ("seen", "heldout")
MIN_AREA = 0.004
MAX_DISTANCE = 48.0
MIN_ALPHA, MAX_ALPHA = 0.5, 1.6
SMALL_LARGE = 0.3
FIT_SIGMAS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5)
FIT_SIDE = 16
MAX_FIT_ERROR = 0.3
SEEN_PAIRS = tuple((c, s) for c in COLORS for s in SHAPES if (c, s) not in HELD_OUT)
HELD_OUT_PAIRS = tuple(sorted(HELD_OUT, key=lambda p: (list(COLORS).index(p[0]), SHAPES.index(p[1]))))


@dataclass(frozen=True)
class ObjectSpec:
    """What a prompt says about one object; None = not stated. count None means at least one."""
    shape: str
    color: Optional[str] = None
    size: Optional[str] = None
    position: Optional[str] = None
    count: Optional[int] = None

    def __post_init__(self):
        check_choice("shape", self.shape, SHAPES)
        for name, allowed in (("color", COLORS), ("size", SIZES), ("position", POSITIONS)):
            if getattr(self, name) is not None:
                check_choice(name, getattr(self, name), allowed)
        if self.count is not None:
            check_choice("count", self.count, (1, 2, 3))


@dataclass(frozen=True)
class Expectation:
    """Objects a prompt asks for; with a relation, objects[0] stands in it to objects[1]."""
    objects: tuple[ObjectSpec, ...]
    relation: Optional[str] = None

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        if self.relation is not None:
            check_choice("relation", self.relation, RELATIONS)
            if len(self.objects) != 2:
                raise ValueError(f"a relation needs exactly 2 objects; got {len(self.objects)}")


@dataclass(frozen=True)
class Prompt:
    task: str
    split: str
    text: str
    expectation: Expectation
    seed: int


@dataclass(frozen=True)
class Detection:
    """One component read back from an image; shape is None when it matches no shape."""
    color: str
    shape: Optional[str]
    size: str
    cx: float
    cy: float
    side: float       # fitted bounding-box side, fraction of the canvas
    area: float       # pixels at alpha >= 0.5, fraction of the canvas
    error: float      # relative L1 error of the fitted shape


# ------------------------------------------------------------------------------------------------ prompts

def prompt_text(expectation: Expectation) -> str:
    """Canonical wording, the same words and order as the canonical captions of the training data."""
    phrases = []
    for spec in expectation.objects:
        text = noun_phrase(spec.shape, spec.color, spec.size, spec.count)
        if spec.position is not None:
            text = f"{text} {position_phrase(spec.position)}"
        phrases.append(text)
    if expectation.relation is not None:
        return f"{phrases[0]} {expectation.relation} {phrases[1]}"
    return " and ".join(phrases)


def _two_objects(rng: np.random.Generator, first: tuple[str, str], pool: Sequence[tuple[str, str]]):
    """A second pair from pool differing from `first` in both color and shape."""
    options = [p for p in pool if p[0] != first[0] and p[1] != first[1]]
    return options[rng.integers(len(options))]


def _task_specs(task: str, split: str, i: int, rng: np.random.Generator) -> Expectation:
    heldout = split == "heldout"
    pairs = HELD_OUT_PAIRS if heldout else SEEN_PAIRS
    pick = lambda seq: seq[rng.integers(len(seq))]  # noqa: E731
    cycled = HELD_OUT_PAIRS[i % len(HELD_OUT_PAIRS)]
    if task == "single_object":
        if heldout:
            return Expectation((ObjectSpec(cycled[1], cycled[0], size=pick(list(SIZES))),))
        return Expectation((ObjectSpec(SHAPES[i % len(SHAPES)]),))
    if task == "colors":
        if heldout:
            return Expectation((ObjectSpec(cycled[1], cycled[0]),))
        color = list(COLORS)[i % len(COLORS)]
        return Expectation((ObjectSpec(pick([s for c, s in SEEN_PAIRS if c == color]), color),))
    if task == "counting":
        c, s = cycled if heldout else pick(pairs)
        return Expectation((ObjectSpec(s, c, count=1 + i % 3),))
    if task == "position":
        c, s = cycled if heldout else pick(pairs)
        return Expectation((ObjectSpec(s, c, position=POSITIONS[i % len(POSITIONS)]),))
    # Two objects: in the held-out split one of them (the first or the second, at random) is held out.
    first = cycled if heldout else pick(pairs)
    second = _two_objects(rng, first, HELD_OUT_PAIRS + SEEN_PAIRS if heldout else SEEN_PAIRS)
    a, b = (first, second) if rng.random() < 0.5 else (second, first)
    objects = (ObjectSpec(a[1], a[0]), ObjectSpec(b[1], b[0]))
    if task == "relation":
        return Expectation(objects, RELATIONS[i % len(RELATIONS)])
    return Expectation(objects)


def benchmark_prompts(split: str, per_task: int = 36, seed: int = 0) -> list[Prompt]:
    """The fixed prompt set of a split ("seen" or "heldout"): per_task prompts for each of TASKS."""
    check_choice("split", split, SPLITS)
    if not is_int(per_task) or not 1 <= per_task <= 999:
        raise ValueError(f"per_task must be an integer in [1, 999]; got {per_task!r}")
    s = SPLITS.index(split)
    prompts = []
    for t, task in enumerate(TASKS):
        rng = np.random.default_rng([int(seed), s, t])
        for i in range(per_task):
            exp = _task_specs(task, split, i, rng)
            prompts.append(Prompt(task, split, prompt_text(exp), exp, int(seed) * 1_000_000 + s * 100_000 +
                                  t * 1_000 + i))
    return prompts


def scene_for(expectation: Expectation, rng: np.random.Generator, background: Optional[str] = None) -> Scene:
    """A scene that satisfies the expectation and holds nothing else: unstated colors and sizes are random,
    each spec is drawn count (default 1) times, positions and relations as stated (strictly)."""
    background = background or list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    for _ in range(100):
        items, positions = [], []
        for spec in expectation.objects:
            color = spec.color or list(COLORS)[rng.integers(len(COLORS))]
            size = spec.size or list(SIZES)[rng.integers(len(SIZES))]
            for _ in range(spec.count or 1):
                items.append((color, spec.shape, size))
                positions.append(spec.position)
        centers = place(rng, [z for _, _, z in items], positions, expectation.relation)
        if centers is not None:
            return Scene(background, tuple(ShapeObject(c, s, z, x, y) for (c, s, z), (x, y) in zip(items, centers)))
    raise ValueError(f"could not place the objects of {expectation}")


def ground_truth(prompt: Prompt, size: int = 64) -> np.ndarray:
    """A rendered scene that satisfies the prompt, drawn from the prompt's own seed: uint8 [size, size, 3]."""
    return render(scene_for(prompt.expectation, np.random.default_rng(prompt.seed)), size)


# --------------------------------------------------------------------------------------------- evaluator

def segment(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel of a float RGB image: (palette index of the nearest background -> color line, -1 where
    unclear; alpha along that line; background RGB). Object pixels are those with index >= 0 and alpha >= 0.5."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    bg = np.median(border, axis=0)
    d = np.asarray(list(COLORS.values()), np.float32) - bg   # [8, 3] directions from the background
    dd = np.maximum((d * d).sum(1), 1e-6)
    p = image.reshape(-1, 3) - bg
    alpha = (p @ d.T) / dd
    dist2 = np.where(alpha > 0.1, (p * p).sum(1, keepdims=True) - alpha * alpha * dd, np.inf)
    best = np.argmin(dist2, axis=1)
    rows = np.arange(len(best))
    a = alpha[rows, best]
    clear = (dist2[rows, best] <= MAX_DISTANCE ** 2) & (a <= MAX_ALPHA)
    shape = image.shape[:2]
    return np.where(clear, best, -1).reshape(shape), np.where(clear, a, 0.0).reshape(shape), bg


def label(classes: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of equal non-negative classes (row runs joined by union-find).
    Returns (labels, -1 where classes < 0; number of components)."""
    h, w = classes.shape
    padded = np.full((h, w + 2), -1, classes.dtype)
    padded[:, 1:-1] = classes
    change = padded[:, 1:] != padded[:, :-1]                 # [h, w + 1]: a run boundary before column j
    rr, cc = np.nonzero(change)
    runs = []                                                # per row: (start, end, class, run id)
    by_row: list[list[tuple[int, int, int, int]]] = [[] for _ in range(h)]
    for k in range(len(rr) - 1):
        r, c = rr[k], cc[k]
        if rr[k + 1] == r and classes[r, c] >= 0:
            run = (int(c), int(cc[k + 1]), int(classes[r, c]), len(runs))
            runs.append((int(r),) + run)
            by_row[r].append(run)
    parent = list(range(len(runs)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for r in range(1, h):
        above, here = by_row[r - 1], by_row[r]
        i = j = 0
        while i < len(above) and j < len(here):
            a, b = above[i], here[j]
            if a[0] < b[1] and b[0] < a[1] and a[2] == b[2]:
                ra, rb = find(a[3]), find(b[3])
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
            if a[1] < b[1]:
                i += 1
            else:
                j += 1
    labels = np.full((h, w), -1, np.int64)
    roots = {}
    for r, start, end, _, k in runs:
        labels[r, start:end] = roots.setdefault(find(k), len(roots))
    return labels, len(roots)


@functools.lru_cache(maxsize=1024)
def _gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """Blur along one axis as an [n, n] matrix (rows normalised; identity for sigma 0)."""
    if sigma <= 0:
        return np.eye(n, dtype=np.float32)
    i = np.arange(n)
    g = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2).astype(np.float32)
    return g / g.sum(1, keepdims=True)


def _template(shape: str, half: float, cx: float, cy: float, h: int, w: int) -> np.ndarray:
    """The renderer's anti-aliased coverage of a shape (box half-side `half`, center (cx, cy)) on an [h, w] grid."""
    half = round(half * SUBPIXEL) / SUBPIXEL     # a coarse grid of sizes, so that masks come from the cache
    left, top = round((cx - half) * SUBPIXEL), round((cy - half) * SUBPIXEL)
    cov = shape_coverage(shape, half, left % SUBPIXEL, top % SUBPIXEL, 4)
    x0, y0 = left // SUBPIXEL, top // SUBPIXEL
    out = np.zeros((h, w), np.float32)
    a0, b0 = max(0, -y0), max(0, -x0)
    a1, b1 = min(cov.shape[0], h - y0), min(cov.shape[1], w - x0)
    if a1 > a0 and b1 > b0:
        out[y0 + a0:y0 + a1, x0 + b0:x0 + b1] = cov[a0:a1, b0:b1]
    return out


def _nearest(labels: np.ndarray, steps: int) -> np.ndarray:
    """Grow labelled regions (-1 = none) into unlabelled pixels by up to `steps` 8-neighbour steps, so that
    each pixel near objects belongs to the nearest one; what stays unreached is -1."""
    h, w = labels.shape
    out = labels
    for _ in range(steps):
        padded = np.full((h + 2, w + 2), -1, labels.dtype)
        padded[1:-1, 1:-1] = out
        grown = out.copy()
        for dy in range(3):
            for dx in range(3):
                grown = np.where(grown < 0, padded[dy:dy + h, dx:dx + w], grown)
        out = grown
    return out


def fit_shape(coverage: np.ndarray) -> tuple[str, float, float, float, float]:
    """Best explanation of one object's coverage map [h, w] (pixel units, object well inside) as a shape:
    (shape, side, box center x, box center y, relative L1 error), lengths in pixels of the map.

    Each shape is placed from the map's moments, which blur keeps: its side from the mass (mass = FILL * side^2)
    and its box from the center of mass (CENTROID_DROP); it is rendered (4 x 4 supersampled), blurred by each
    of FIT_SIGMAS, and scored by sum |coverage - template| / mass; the least error wins."""
    h, w = coverage.shape
    mass = float(coverage.sum())
    ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
    mx = float((coverage.sum(0) * xs).sum()) / mass
    my = float((coverage.sum(1) * ys).sum()) / mass
    blurs = [(_gaussian_matrix(h, s), _gaussian_matrix(w, s)) for s in FIT_SIGMAS]
    best = None
    for shape in SHAPES:
        half = math.sqrt(mass / FILL[shape]) / 2
        cx, cy = mx, my - CENTROID_DROP[shape] * half
        template = _template(shape, half, cx, cy, h, w)
        error = min(float(np.abs(gy @ template @ gx.T - coverage).sum()) for gy, gx in blurs) / mass
        if best is None or error < best[4]:
            best = (shape, 2 * half, cx, cy, error)
    return best


def detect(image: np.ndarray) -> list[Detection]:
    """The objects in an RGB image [H, W, 3] (uint8, or float in 0..255)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 8:
        raise ValueError(f"image must be an RGB array [H, W, 3] with H, W >= 8; got shape {image.shape}")
    H, W = image.shape[:2]
    image = image.astype(np.float32)
    classes, alpha, bg = segment(image)
    labels, n = label(np.where(alpha >= MIN_ALPHA, classes, -1))
    areas = np.bincount(labels[labels >= 0], minlength=n)
    names = list(COLORS)
    found = []
    kept = np.nonzero(areas >= MIN_AREA * H * W)[0]
    for comp in kept:
        ys, xs = np.nonzero(labels == comp)
        color = int(classes[ys[0], xs[0]])
        # Work at about FIT_SIDE px per object: block-average big images (mass is kept) before fitting.
        k = max(1, int(math.sqrt(areas[comp]) / FIT_SIDE))
        pad = 5 * k
        y0, x0 = max(ys.min() - pad, 0), max(xs.min() - pad, 0)
        y1, x1 = min(ys.max() + 1 + pad, H), min(xs.max() + 1 + pad, W)
        y1, x1 = y0 + (y1 - y0) // k * k, x0 + (x1 - x0) // k * k
        # The object's coverage: alpha along its own color's line in the padded box (faint edge pixels are
        # too close to every line to have been classed reliably), less other components and unclear pixels.
        p = image[y0:y1, x0:x1] - bg
        d = np.asarray(COLORS[names[color]], np.float32) - bg
        a = (p @ d) / float(d @ d)
        off = (p * p).sum(-1) - a * a * float(d @ d)
        # Pixels nearer to another object are not ours: grow all objects over a window `pad` wider.
        wy0, wx0 = max(y0 - pad, 0), max(x0 - pad, 0)
        lab = labels[wy0:y1 + pad, wx0:x1 + pad]
        others = np.isin(lab, kept) & (lab != comp)
        if others.any():
            near = _nearest(np.where(others | (lab == comp), lab, -1), pad) == comp
            near = near[y0 - wy0:y1 - wy0, x0 - wx0:x1 - wx0]
        else:
            near = np.ones((y1 - y0, x1 - x0), bool)
        own = near & (off <= MAX_DISTANCE ** 2)
        cov = np.where(own, np.clip(a, 0, 1), 0).astype(np.float32)
        cov = cov.reshape((y1 - y0) // k, k, (x1 - x0) // k, k).mean((1, 3))
        shape, side, cx, cy, error = fit_shape(cov)
        side = side * k / max(H, W)
        found.append(Detection(names[color], shape if error <= MAX_FIT_ERROR else None,
                               "small" if side < SMALL_LARGE else "large", (x0 + cx * k) / W, (y0 + cy * k) / H,
                               side, float(areas[comp]) / (H * W), error))
    return found


def _matches(d: Detection, spec: ObjectSpec) -> bool:
    return (d.shape == spec.shape and spec.color in (None, d.color) and spec.size in (None, d.size)
            and (spec.position is None or position_of(d.cx, d.cy) == spec.position))


def satisfied(detections: Sequence[Detection], expectation: Expectation) -> bool:
    """Whether detected objects satisfy every stated attribute (see the module docstring)."""
    candidates = []
    for spec in expectation.objects:
        m = [i for i, d in enumerate(detections) if _matches(d, spec)]
        if not m or (spec.count is not None and len(m) != spec.count):
            return False
        candidates.append(m)
    for combo in itertools.product(*candidates):
        if len(set(combo)) < len(combo):
            continue
        if expectation.relation is None:
            return True
        a, b = detections[combo[0]], detections[combo[1]]
        if relation_holds((a.cx, a.cy), (b.cx, b.cy), expectation.relation):
            return True
    return False


def evaluate(image: np.ndarray, expectation: Expectation) -> bool:
    """1/0 score of one image against what its prompt states."""
    return satisfied(detect(image), expectation)


# ---------------------------------------------------------------------------------------------- scoring

def score(results: Iterable[tuple[Prompt | str, bool]]) -> dict[str, float]:
    """Per-task accuracy and "mean" (the unweighted mean over the tasks present), from (prompt or task, ok)."""
    hits: dict[str, list[bool]] = {}
    for item, ok in results:
        task = item.task if isinstance(item, Prompt) else item
        check_choice("task", task, TASKS)
        hits.setdefault(task, []).append(bool(ok))
    out = {t: float(np.mean(hits[t])) for t in TASKS if t in hits}
    out["mean"] = float(np.mean(list(out.values()))) if out else float("nan")
    return out


def format_table(scores: dict[str, dict[str, float]]) -> str:
    """A text table: one row per task plus mean, one column per split (e.g. {"seen": ..., "heldout": ...})."""
    columns = list(scores)
    lines = [f"{'task':<18}" + "".join(f"{c:>10}" for c in columns)]
    for row in TASKS + ("mean",):
        if any(row in scores[c] for c in columns):
            cells = "".join(f"{scores[c][row]:>10.3f}" if row in scores[c] else f"{'-':>10}" for c in columns)
            lines.append(f"{row:<18}" + cells)
    return "\n".join(lines)
