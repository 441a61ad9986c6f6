"""Shapes world (specs/shapes-world.md): flat-colored shapes on a plain background, their captions and the scene
sampler (the stream as a dataset is shapes_dataset). Coordinates are relative to the canvas (0 = left/top,
1 = right/bottom) and an object's (cx, cy) is the center of its bounding box, whose side is SIZES[size] of the canvas side.

Rendering is anti-aliased by default (4 x 4 supersampled coverage, blended toward the background; box
corners snap to a 1/8 px grid so that coverage masks are cached): interiors
are the exact palette RGB, edges are mixtures of object and background color only. Smooth edges are easier for
a small autoencoder than a staircase and keep 32 px shapes recognisable; the evaluator reads such mixtures
back as the object color (it projects pixels onto background -> palette lines), so they cost nothing there.
`render(..., antialias=False)` gives hard edges (pixel-center sampling, palette colors only).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..config import is_int, is_number

COLORS = {
    "red": (230, 25, 25), "green": (25, 180, 25), "blue": (25, 60, 230), "yellow": (240, 220, 20),
    "purple": (150, 40, 200), "orange": (250, 130, 0), "cyan": (0, 200, 220), "pink": (250, 110, 180),
}
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SIZES = {"small": 0.2, "large": 0.4}
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
RELATIONS = ("above", "below", "to the left of", "to the right of")
OPPOSITE = {"above": "below", "below": "above", "to the left of": "to the right of",
            "to the right of": "to the left of"}
HELD_OUT = frozenset({("green", "star"), ("purple", "triangle"), ("orange", "square"), ("cyan", "circle"),
                      ("pink", "diamond")})
KINDS = ("object", "position", "count", "relation", "pair")
COUNT_WORDS = ("one", "two", "three")

MIN_SIZE = 16
GAP = 3 / 64          # bounding boxes at least 3 px apart at 64 px (spec: >= 2 px)
MARGIN = 2 / 64       # and 2 px from the canvas edge, so blur never reaches the border the evaluator reads
CELL_MARGIN = 0.05    # a placed or captioned position keeps its center this far inside its 3 x 3 cell
STAR_INNER = 0.41     # inner / outer radius; fill of the bounding box 5 r sin 36 / (2 sin 72 (1 + cos 36)) = 0.350
_STAR_W, _STAR_H = math.sin(math.radians(72)), (1 + math.cos(math.radians(36))) / 2
FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5,
        "star": 5 * STAR_INNER * math.sin(math.radians(36)) / (4 * _STAR_W * _STAR_H)}
# Center of mass below the bounding-box center, in half-sides (v runs from -1 at the top to 1 at the bottom).
CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1 / 3, "diamond": 0.0, "star": 1 / _STAR_H - 1}


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def check_size(size, name: str = "size") -> None:
    if not is_int(size) or size < MIN_SIZE:
        raise ValueError(f"{name} must be an integer >= {MIN_SIZE}; got {size!r}")


@dataclass(frozen=True)
class ShapeObject:
    """One flat-colored shape; (cx, cy) is its bounding-box center, relative to the canvas."""
    color: str
    shape: str
    size: str
    cx: float
    cy: float

    def __post_init__(self):
        check_choice("color", self.color, COLORS)
        check_choice("shape", self.shape, SHAPES)
        check_choice("size", self.size, SIZES)
        for name in ("cx", "cy"):
            v = getattr(self, name)
            if not is_number(v) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1]; got {v!r}")


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[ShapeObject, ...]

    def __post_init__(self):
        check_choice("background", self.background, BACKGROUNDS)
        object.__setattr__(self, "objects", tuple(self.objects))


# ---------------------------------------------------------------------------------------------- geometry

def position_of(cx: float, cy: float) -> str:
    """The 3 x 3 cell holding the point (cx, cy)."""
    col, row = min(int(cx * 3), 2), min(int(cy * 3), 2)
    return POSITIONS[3 * row + col]


def clear_position(cx: float, cy: float, margin: float = CELL_MARGIN) -> Optional[str]:
    """position_of(cx, cy) when the point is at least `margin` from the inner cell borders, else None."""
    if any(abs(v - b) < margin for v in (cx, cy) for b in (1 / 3, 2 / 3)):
        return None
    return position_of(cx, cy)


def relation_holds(a: Sequence[float], b: Sequence[float], relation: str, strict: bool = False) -> bool:
    """Whether the point a = (cx, cy) is `relation` the point b ("a above b").

    Lenient (the evaluator): offset along the relation's axis > 0.1 of the canvas and at most 2x as large
    across it. Strict (what scenes are built with and captions state): along >= 0.25 and across <= along.
    """
    return bool(_relation_mask(a[0], a[1], b[0], b[1], relation, strict))


def _relation_mask(ax, ay, bx, by, relation: str, strict: bool):
    check_choice("relation", relation, RELATIONS)
    dx, dy = bx - ax, by - ay
    along, across = {"above": (dy, dx), "below": (-dy, dx), "to the left of": (dx, dy),
                     "to the right of": (-dx, dy)}[relation]
    if strict:
        return (along >= 0.25) & (np.abs(across) <= along)
    return (along > 0.1) & (np.abs(across) <= 2 * along)


def _cell_range(position: str) -> tuple[float, float, float, float]:
    i = POSITIONS.index(position)
    col, row = i % 3, i // 3
    return (col / 3 + CELL_MARGIN, (col + 1) / 3 - CELL_MARGIN, row / 3 + CELL_MARGIN, (row + 1) / 3 - CELL_MARGIN)


def place(rng: np.random.Generator, sizes: Sequence[str], positions: Optional[Sequence[Optional[str]]] = None,
          relation: Optional[str] = None, restarts: int = 40) -> Optional[list[tuple[float, float]]]:
    """Centers for objects of `sizes`: inside the canvas, bounding boxes >= GAP apart, object k in the 3 x 3
    cell positions[k] when given, and objects 0 and 1 in the strict `relation`. None when nothing was found."""
    halves = [SIZES[s] / 2 for s in sizes]
    positions = list(positions) if positions is not None else [None] * len(sizes)
    for _ in range(restarts):
        centers: list[tuple[float, float]] = []
        for k, h in enumerate(halves):
            lo, hi = h + MARGIN, 1 - h - MARGIN
            x0, x1, y0, y1 = lo, hi, lo, hi
            if positions[k] is not None:
                c = _cell_range(positions[k])
                x0, x1, y0, y1 = max(lo, c[0]), min(hi, c[1]), max(lo, c[2]), min(hi, c[3])
            cand = np.array([x0, y0]) + rng.random((64, 2)) * np.array([x1 - x0, y1 - y0])
            ok = np.ones(64, bool)
            for (px, py), ph in zip(centers, halves):
                reach = h + ph + GAP
                ok &= (np.abs(cand[:, 0] - px) >= reach) | (np.abs(cand[:, 1] - py) >= reach)
            if k == 1 and relation is not None:
                ok &= _relation_mask(centers[0][0], centers[0][1], cand[:, 0], cand[:, 1], relation, True)
            if not ok.any():
                break
            centers.append(tuple(float(v) for v in cand[np.argmax(ok)]))
        if len(centers) == len(halves):
            return centers
    return None


# --------------------------------------------------------------------------------------------- rendering

def _half_planes(vertices: np.ndarray) -> np.ndarray:
    """[n, 3] rows (a, b, c) with a x + b y <= c exactly on the inside of a convex polygon."""
    v, w = vertices, np.roll(vertices, -1, 0)
    normal = np.stack([w[:, 1] - v[:, 1], v[:, 0] - w[:, 0]], 1)
    c = (normal * v).sum(1)
    flip = np.where((normal * vertices.mean(0)).sum(1) <= c, 1.0, -1.0)   # the centroid is inside
    return np.concatenate([normal, c[:, None]], 1) * flip[:, None]


def _star_pieces() -> list[list[tuple[float, float, float]]]:
    """The star as convex pieces: its inner pentagon and five tip triangles (apex up, y down)."""
    k = np.arange(10)
    angle = -np.pi / 2 + k * np.pi / 5
    radius = np.where(k % 2 == 0, 1.0, STAR_INNER)
    points = np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1)
    tips = [_half_planes(points[[(2 * i - 1) % 10, 2 * i, 2 * i + 1]]) for i in range(5)]
    return [[tuple(map(float, row)) for row in _half_planes(points[1::2])]] + \
        [[tuple(map(float, row)) for row in t] for t in tips]


_STAR = _star_pieces()


def _star_exact(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The regular star stretched to fill [-1, 1]^2: the union of its convex pieces, each cut row by row."""
    x, y = u * _STAR_W, (v + 1.0) * _STAR_H - 1.0
    out = None
    for planes in _STAR:
        lo, hi = np.full(np.shape(y), -np.inf), np.full(np.shape(y), np.inf)
        for a, b, c in planes:
            if a == 0:                            # a horizontal edge keeps or drops whole rows
                lo = np.where(b * y <= c, lo, np.inf)
            elif a < 0:
                lo = np.maximum(lo, (c - b * y) / a)
            else:
                hi = np.minimum(hi, (c - b * y) / a)
        piece = (x >= lo) & (x <= hi)
        out = piece if out is None else out | piece
    return out


@functools.lru_cache(maxsize=1)
def _star_table(n: int = 1024) -> np.ndarray:
    centers = (np.arange(n) + 0.5) / n * 2 - 1
    return _star_exact(centers[None, :], centers[:, None])


def inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of points in a shape filling the box [-1, 1]^2 (u right, v down); u, v broadcast."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "triangle":                       # apex at the top center, base along the bottom edge
        return (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2)
    if shape == "star":                           # looked up in a 1024^2 rasterisation of the exact star
        table = _star_table()
        n = table.shape[0]
        i, j = np.floor((v + 1.0) * (n / 2)).astype(np.int64), np.floor((u + 1.0) * (n / 2)).astype(np.int64)
        valid_i, valid_j = (i >= 0) & (i < n), (j >= 0) & (j < n)
        return table[np.clip(i, 0, n - 1), np.clip(j, 0, n - 1)] & valid_i & valid_j
    raise ValueError(f"shape must be one of {', '.join(SHAPES)}; got {shape!r}")


SUBPIXEL = 8   # rendered bounding boxes start on a 1/8 px grid, so each coverage mask is computed once


@functools.lru_cache(maxsize=4096)
def shape_coverage(shape: str, half: float, fx: int, fy: int, ss: int) -> np.ndarray:
    """Coverage [h, w] of a shape whose box (side 2 * half px) starts fx/SUBPIXEL, fy/SUBPIXEL px into pixel (0, 0)."""
    offsets = (np.arange(ss) + 0.5) / ss
    w, h = math.ceil(fx / SUBPIXEL + 2 * half), math.ceil(fy / SUBPIXEL + 2 * half)
    u = ((np.arange(w)[:, None] + offsets).ravel() - fx / SUBPIXEL - half) / half
    v = ((np.arange(h)[:, None] + offsets).ravel() - fy / SUBPIXEL - half) / half
    hit = inside(shape, u[None, :], v[:, None])
    coverage = hit.reshape(h, ss, w, ss).sum((1, 3), dtype=np.float32) / (ss * ss)
    coverage.flags.writeable = False
    return coverage


def render(scene: Scene, size: int = 64, antialias: bool = True) -> np.ndarray:
    """The scene as uint8 [size, size, 3]; anti-aliased with 4 x 4 supersampling unless told otherwise."""
    check_size(size)
    bg = np.asarray(BACKGROUNDS[scene.background], np.float32)
    img = np.empty((size, size, 3), np.float32)
    img[:] = bg
    for obj in scene.objects:
        half = SIZES[obj.size] * size / 2
        left = round((obj.cx * size - half) * SUBPIXEL)
        top = round((obj.cy * size - half) * SUBPIXEL)
        x0, y0 = left // SUBPIXEL, top // SUBPIXEL
        cov = shape_coverage(obj.shape, half, left % SUBPIXEL, top % SUBPIXEL, 4 if antialias else 1)
        # Clip to the canvas (objects built by `place` always lie inside).
        cx0, cy0 = max(0, -x0), max(0, -y0)
        cx1, cy1 = min(cov.shape[1], size - x0), min(cov.shape[0], size - y0)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        # Objects never share a pixel, so adding each one's coverage-weighted color offset is exact.
        color = np.asarray(COLORS[obj.color], np.float32) - bg
        img[y0 + cy0:y0 + cy1, x0 + cx0:x0 + cx1] += cov[cy0:cy1, cx0:cx1, None] * color
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ scenes

def _pair(rng: np.random.Generator, allow_heldout: bool, exclude=()) -> tuple[str, str]:
    while True:
        pair = (list(COLORS)[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))])
        if (allow_heldout or pair not in HELD_OUT) and pair not in exclude:
            return pair


def sample_scene(rng: np.random.Generator, kind: Optional[str] = None, allow_heldout: bool = False) -> Scene:
    """A random scene of one of KINDS (uniform when kind is None):
    object: one object anywhere; position: one object near the middle of a 3 x 3 cell; count: 1-3 identical
    objects; relation: two different color-shape pairs in a strict relation; pair: two objects differing in
    both color and shape, anywhere. Held-out color-shape pairs appear only with allow_heldout=True."""
    if kind is None:
        kind = KINDS[rng.integers(len(KINDS))]
    check_choice("kind", kind, KINDS)
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    while True:
        if kind in ("object", "position"):
            pairs, sizes = [_pair(rng, allow_heldout)], [list(SIZES)[rng.integers(2)]]
        elif kind == "count":
            n = int(rng.integers(1, 4))
            large = rng.random() < (0.5 if n < 3 else 0.25)
            pairs, sizes = [_pair(rng, allow_heldout)] * n, ["large" if large else "small"] * n
        else:
            a = _pair(rng, allow_heldout)
            if kind == "relation":
                b = _pair(rng, allow_heldout, exclude=[a])
            else:
                b = a
                while b[0] == a[0] or b[1] == a[1]:
                    b = _pair(rng, allow_heldout)
            pairs, sizes = [a, b], [list(SIZES)[rng.integers(2)] for _ in range(2)]
        positions = [POSITIONS[rng.integers(9)]] if kind == "position" else None
        relation = RELATIONS[rng.integers(4)] if kind == "relation" else None
        centers = place(rng, sizes, positions, relation)
        if centers is not None:
            objects = tuple(ShapeObject(c, s, z, x, y) for (c, s), z, (x, y) in zip(pairs, sizes, centers))
            return Scene(background, objects)


# ---------------------------------------------------------------------------------------------- captions

POSITION_PHRASES = {
    "top left": ("in the top left corner", "at the top left", "in the upper left corner", "in the top left"),
    "top": ("at the top", "at the top center", "near the top"),
    "top right": ("in the top right corner", "at the top right", "in the upper right corner", "in the top right"),
    "left": ("on the left", "on the left side", "at the left"),
    "center": ("in the center", "in the middle", "in the center of the image"),
    "right": ("on the right", "on the right side", "at the right"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left corner",
                    "in the bottom left"),
    "bottom": ("at the bottom", "at the bottom center", "near the bottom"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the lower right corner",
                     "in the bottom right"),
}
RELATION_PHRASES = {"above": ("above",), "below": ("below", "under"), "to the left of": ("to the left of", "left of"),
                    "to the right of": ("to the right of", "right of")}
P_OMIT_COLOR, P_SIZE, P_POSITION, P_RELATION, P_BACKGROUND = 0.15, 0.4, 0.7, 0.8, 0.3


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(shape: str, color: Optional[str] = None, size: Optional[str] = None, count: Optional[int] = None,
                determiner: Optional[str] = None) -> str:
    """Canonical noun phrase: 'a red circle', 'an orange star', 'one large red circle', 'two green triangles'.
    count=None gives the indefinite article (at least one); a count gives its number word."""
    words = [w for w in (size, color) if w] + [shape + ("s" if count is not None and count > 1 else "")]
    if determiner is None:
        determiner = article(words[0]) if count is None else COUNT_WORDS[count - 1]
    return " ".join([determiner] + words)


def position_phrase(position: str, variant: int = 0) -> str:
    options = POSITION_PHRASES[position]
    return options[variant % len(options)]


class _Choices:
    """Random caption choices; with rng=None every choice is the canonical one (full, first wording)."""

    def __init__(self, rng: Optional[np.random.Generator]):
        self.rng = rng

    def flip(self, p: float, canonical: bool) -> bool:
        return canonical if self.rng is None else bool(self.rng.random() < p)

    def pick(self, options: Sequence):
        return options[0] if self.rng is None else options[self.rng.integers(len(options))]


def _np(obj: ShapeObject, ch: _Choices, count: Optional[int] = None, keep_color: bool = False) -> str:
    color = obj.color if keep_color or not ch.flip(P_OMIT_COLOR, False) else None
    size = obj.size if ch.flip(P_SIZE, True) else None
    determiner = None
    if count is None and ch.flip(0.3, False):
        determiner = ch.pick(("one", "a single"))
    return noun_phrase(obj.shape, color, size, count, determiner)


def caption(scene: Scene, rng: Optional[np.random.Generator] = None) -> str:
    """A true description of the scene. With an rng the wording varies and color, size, position or relation
    are sometimes left out (never stated falsely); with rng=None it is the canonical, fully specified one."""
    ch = _Choices(rng)
    objs = list(scene.objects)
    groups: dict[tuple[str, str, str], list[ShapeObject]] = {}
    for o in objs:
        groups.setdefault((o.color, o.shape, o.size), []).append(o)
    if len(objs) == 1:
        o = objs[0]
        text = _np(o, ch)
        where = clear_position(o.cx, o.cy)
        if where is not None and ch.flip(P_POSITION, True):
            text = f"{text} {ch.pick(POSITION_PHRASES[where])}"
            if ch.flip(0.15, False):
                text = "there is " + text
    elif len(groups) == 1:
        text = _np(objs[0], ch, count=len(objs))
    elif len(objs) == 2:
        a, b = objs if ch.flip(0.5, True) else objs[::-1]
        keep = a.shape == b.shape        # dropping a color would make the two indistinguishable
        holds = [r for r in RELATIONS if relation_holds((a.cx, a.cy), (b.cx, b.cy), r, strict=True)]
        if holds and ch.flip(P_RELATION, True):
            middle = ch.pick(RELATION_PHRASES[ch.pick(holds)])
        else:
            middle = "and"
        text = f"{_np(a, ch, keep_color=keep)} {middle} {_np(b, ch, keep_color=keep)}"
    else:
        parts = [_np(g[0], ch, count=None if len(g) == 1 else len(g), keep_color=True) for g in groups.values()]
        text = ", ".join(parts[:-1]) + " and " + parts[-1]
    if ch.flip(P_BACKGROUND, False):
        if ch.flip(0.7, True) or text.startswith("there is"):
            text = f"{text} on a {scene.background} background"
        else:
            text = f"a {scene.background} background with {text}"
    return text
