"""Shapes world and its benchmark (specs/shapes-world.md).

The evaluator is checked against the renderer: the scene each benchmark prompt describes scores 1 at 32, 64
and 128 px and after blur, color noise and a color shift; scenes that break one stated attribute (color,
shape, size, count, position, relation, binding) score 0. The data side: training scenes never hold a held-out
pair, captions only state what is true, everything is seeded, fill ratios match the spec.
"""
import numpy as np
import pytest
import torch

from ldm.data.shapes import (COLORS, FILL, HELD_OUT, KINDS, OPPOSITE, POSITION_PHRASES, POSITIONS, RELATION_PHRASES,
                             SHAPES, SIZES, Scene, ShapeObject, caption, place, position_of, relation_holds, render,
                             sample_scene)
from ldm.data.shapes_dataset import ShapesDataset, example, make_batch
from ldm.eval.shapes_eval import (SPLITS, TASKS, Expectation, ObjectSpec, benchmark_prompts, detect,
                                  evaluate, format_table, ground_truth, prompt_text, scene_for, score)

PROMPTS = {split: benchmark_prompts(split) for split in SPLITS}
ALL = PROMPTS["seen"] + PROMPTS["heldout"]


def degrade(image: np.ndarray, rng: np.random.Generator, sigma: float = 1.0, noise: float = 5.0,
            shift: float = 10.0) -> np.ndarray:
    """Gaussian blur (sigma px), per-pixel color noise and a global color shift, as a generator might."""
    n = image.shape[0]
    i = np.arange(n)
    g = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
    g /= g.sum(1, keepdims=True)
    x = (g @ image.transpose(2, 0, 1).astype(np.float64) @ g.T).transpose(1, 2, 0)
    x += rng.normal(0, noise, x.shape) + rng.uniform(-shift, shift, 3)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------- prompt set

def test_prompt_set_is_fixed_balanced_and_split_by_held_out_pairs():
    for split, prompts in PROMPTS.items():
        assert len(prompts) == 36 * len(TASKS)
        assert [p.task for p in prompts] == [t for t in TASKS for _ in range(36)]
        assert len({p.seed for p in prompts}) == len(prompts)
        assert prompts == benchmark_prompts(split)                      # a pure function of its arguments
        for p in prompts:
            pairs = {(o.color, o.shape) for o in p.expectation.objects if o.color}
            if split == "seen":
                assert not pairs & HELD_OUT, p
            else:
                assert pairs & HELD_OUT, p
        by_task = {t: [p for p in prompts if p.task == t] for t in TASKS}
        assert {p.expectation.objects[0].count for p in by_task["counting"]} == {1, 2, 3}
        assert {p.expectation.objects[0].position for p in by_task["position"]} == set(POSITIONS)
        assert {p.expectation.relation for p in by_task["relation"]} == set(OPPOSITE)
        for p in by_task["relation"] + by_task["attribute_binding"]:
            a, b = p.expectation.objects
            assert a.color != b.color and a.shape != b.shape
    seen = {p.task: p.text for p in PROMPTS["seen"][::36]}
    assert seen["single_object"] == "a circle" and seen["position"].endswith("in the top left corner")
    assert PROMPTS["heldout"][0].text in {f"a {z} {c} {s}" for c, s in HELD_OUT for z in SIZES}
    assert benchmark_prompts("seen", seed=1) != PROMPTS["seen"]


def test_prompts_speak_the_captions_language():
    """Every word of every prompt occurs in training captions, and the canonical caption of a prompt's scene
    with the unstated attributes removed is the prompt itself (for the one-object tasks)."""
    rng = np.random.default_rng(0)
    vocabulary = {w for _ in range(2000) for w in caption(sample_scene(rng), rng).replace(",", "").split()}
    for p in ALL:
        assert p.text == prompt_text(p.expectation)
        assert set(p.text.split()) <= vocabulary | {"green", "star", "stars"}, p.text
        if len(p.expectation.objects) == 1 and p.expectation.objects[0].count is None:
            spec = p.expectation.objects[0]
            obj = scene_for(p.expectation, np.random.default_rng(p.seed)).objects[0]
            full = caption(Scene("white", [obj]))
            for attribute, value in (("size", obj.size), ("color", obj.color)):
                if getattr(spec, attribute) is None:
                    full = full.replace(f" {value} ", " ")
            if spec.position is None:
                full = full.split(" in the ")[0].split(" at the ")[0].split(" on the ")[0]
            article = lambda t: "a " + t[3:] if t.startswith("an ") else t  # noqa: E731  (a/an follows the first word)
            assert article(full) == article(p.text), (full, p.text)


# -------------------------------------------------------------------------------------------- evaluator

@pytest.mark.parametrize("size", [32, 64, 128])
def test_ground_truth_scores_one(size):
    prompts = {32: ALL[::2], 64: ALL, 128: ALL[::3]}[size]
    failures = [p.text for p in prompts if not evaluate(ground_truth(p, size), p.expectation)]
    assert failures == []


def test_blurred_noisy_shifted_ground_truth_scores_one():
    rng = np.random.default_rng(0)
    failures = [p.text for p in ALL if not evaluate(degrade(ground_truth(p), rng), p.expectation)]
    assert failures == []


def _next(seq, value, step=1):
    seq = list(seq)
    return seq[(seq.index(value) + step) % len(seq)]


def wrong(expectation: Expectation, kind: str) -> Expectation:
    """The expectation with one stated attribute broken."""
    objs = list(expectation.objects)
    a = objs[0]
    if kind == "color":
        objs[0] = ObjectSpec(a.shape, _next(COLORS, a.color), a.size, a.position, a.count)
    elif kind == "shape":
        objs[0] = ObjectSpec(_next(SHAPES, a.shape), a.color, a.size, a.position, a.count)
    elif kind == "size":
        objs[0] = ObjectSpec(a.shape, a.color, _next(SIZES, a.size), a.position, a.count)
    elif kind == "count":
        objs[0] = ObjectSpec(a.shape, a.color, a.size, a.position, {1: 2, 2: 3, 3: 2}[a.count])
    elif kind == "position":
        objs[0] = ObjectSpec(a.shape, a.color, a.size, _next(POSITIONS, a.position, 4), a.count)
    elif kind == "binding":                      # the colors change places between the two objects
        b = objs[1]
        objs = [ObjectSpec(a.shape, b.color), ObjectSpec(b.shape, a.color)]
    elif kind == "missing":
        objs = objs[1:]
    elif kind == "relation":
        return Expectation(objs, OPPOSITE[expectation.relation])
    return Expectation(objs, expectation.relation if len(objs) == 2 else None)


WRONG_KINDS = {
    ("single_object", "seen"): ["shape"], ("single_object", "heldout"): ["shape", "color", "size"],
    ("colors", "seen"): ["color", "shape"], ("colors", "heldout"): ["color", "shape"],
    ("counting", "seen"): ["count", "color"], ("counting", "heldout"): ["count", "shape"],
    ("position", "seen"): ["position", "color"], ("position", "heldout"): ["position", "shape"],
    ("relation", "seen"): ["relation", "binding"], ("relation", "heldout"): ["relation", "binding"],
    ("attribute_binding", "seen"): ["binding", "missing"], ("attribute_binding", "heldout"): ["binding", "shape"],
}


def test_wrong_scenes_score_zero():
    passed = []
    for i, p in enumerate(ALL):
        kinds = WRONG_KINDS[p.task, p.split]
        kind = kinds[i % len(kinds)]
        scene = scene_for(wrong(p.expectation, kind), np.random.default_rng(p.seed + 7))
        if evaluate(render(scene), p.expectation):
            passed.append((kind, p.text))
    assert passed == []


def test_extra_objects_are_allowed_but_counts_are_exact():
    spec = Expectation((ObjectSpec("circle", "red", count=2),))
    two = [ShapeObject("red", "circle", "small", 0.2, 0.2), ShapeObject("red", "circle", "small", 0.8, 0.2)]
    extra = [ShapeObject("red", "square", "small", 0.2, 0.8), ShapeObject("blue", "circle", "small", 0.8, 0.8)]
    assert evaluate(render(Scene("white", two + extra)), spec)
    assert not evaluate(render(Scene("white", two + [ShapeObject("red", "circle", "small", 0.5, 0.8)])), spec)
    assert evaluate(render(Scene("gray", two)), Expectation((ObjectSpec("circle", "red"),)))   # "a": at least one


def test_detections_match_the_scene():
    rng = np.random.default_rng(1)
    for _ in range(40):
        scene = sample_scene(rng, allow_heldout=True)
        found = sorted(detect(render(scene)), key=lambda d: (d.cx, d.cy))
        objs = sorted(scene.objects, key=lambda o: (o.cx, o.cy))
        assert [(d.color, d.shape, d.size) for d in found] == [(o.color, o.shape, o.size) for o in objs]
        for d, o in zip(found, objs):
            assert abs(d.cx - o.cx) < 0.01 and abs(d.cy - o.cy) < 0.01 and abs(d.side - SIZES[o.size]) < 0.01


def test_non_shapes_are_not_read_as_shapes():
    yy, xx = np.mgrid[0:64, 0:64] + 0.5
    masks = {
        "bar": (abs(xx - 32) <= 12) & (abs(yy - 32) <= 4),
        "ring": ((xx - 32) ** 2 + (yy - 32) ** 2 <= 144) & ((xx - 32) ** 2 + (yy - 32) ** 2 >= 49),
        "two touching disks": ((xx - 26) ** 2 + (yy - 32) ** 2 <= 36) | ((xx - 38) ** 2 + (yy - 32) ** 2 <= 36),
        "upside-down triangle": (abs(yy - 32) <= 10) & (abs(xx - 32) <= (10 - (yy - 32)) / 2),
    }
    for name, mask in masks.items():
        image = np.zeros((64, 64, 3), np.uint8)
        image[mask] = COLORS["red"]
        assert [d.shape for d in detect(image)] == [None], name


def test_score_and_table():
    prompts = PROMPTS["seen"]
    results = [(p, p.task != "counting" or i % 2 == 0) for i, p in enumerate(prompts)]
    s = score(results)
    assert s["counting"] == 0.5 and s["colors"] == 1.0
    assert s["mean"] == pytest.approx((5 + 0.5) / 6)
    assert score([("colors", True), ("colors", False)]) == {"colors": 0.5, "mean": 0.5}
    table = format_table({"seen": s, "heldout": score([("relation", False)])})
    assert "counting" in table and "mean" in table and "0.500" in table and "-" in table


# ------------------------------------------------------------------------------------------------- data

def test_training_scenes_never_hold_held_out_pairs():
    rng = np.random.default_rng(0)
    for i in range(3000):
        scene = sample_scene(rng, kind=KINDS[i % len(KINDS)])
        assert not {(o.color, o.shape) for o in scene.objects} & HELD_OUT
    rng = np.random.default_rng(0)
    assert any({(o.color, o.shape) for o in sample_scene(rng, allow_heldout=True).objects} & HELD_OUT
               for _ in range(300))


def test_scenes_are_valid_for_every_kind():
    rng = np.random.default_rng(2)
    for i in range(1000):
        kind = KINDS[i % len(KINDS)]
        scene = sample_scene(rng, kind=kind)
        objs = scene.objects
        for o in objs:
            h = SIZES[o.size] / 2
            assert h + 1.9 / 64 <= o.cx <= 1 - h - 1.9 / 64 and h + 1.9 / 64 <= o.cy <= 1 - h - 1.9 / 64
        for a in objs:
            for b in objs:
                if a is not b:
                    reach = (SIZES[a.size] + SIZES[b.size]) / 2 + 2 / 64       # >= 2 px apart at 64 px
                    assert abs(a.cx - b.cx) >= reach or abs(a.cy - b.cy) >= reach
        pairs = [(o.color, o.shape) for o in objs]
        if kind in ("object", "position"):
            assert len(objs) == 1
        elif kind == "count":
            assert 1 <= len(objs) <= 3 and len({(o.color, o.shape, o.size) for o in objs}) == 1
        elif kind == "relation":
            assert len(objs) == 2 and pairs[0] != pairs[1]
            assert any(relation_holds((objs[0].cx, objs[0].cy), (objs[1].cx, objs[1].cy), r, strict=True)
                       for r in OPPOSITE)
        else:
            assert len(objs) == 2 and pairs[0][0] != pairs[1][0] and pairs[0][1] != pairs[1][1]


def _shape_word(token):
    if token in SHAPES:
        return token
    return token[:-1] if token.endswith("s") and token[:-1] in SHAPES else None


def test_captions_are_truthful():
    rng = np.random.default_rng(3)
    words = {"one": 1, "two": 2, "three": 3}
    for _ in range(2000):
        scene = sample_scene(rng)
        objs = scene.objects
        for text in (caption(scene, rng), caption(scene)):
            tokens = text.replace(",", "").split()
            stated = []
            for i, tok in enumerate(tokens):
                shape = _shape_word(tok)
                if shape is None:
                    continue
                before = tokens[max(0, i - 3):i]
                color = next((w for w in before if w in COLORS), None)
                size = next((w for w in before if w in SIZES), None)
                match = [o for o in objs if o.shape == shape and color in (None, o.color) and size in (None, o.size)]
                assert match, (text, scene)
                count = next((words[w] for w in before if w in words), None)
                if count is not None:
                    assert len(match) == count, (text, scene)
                stated.append(match)
            assert stated, text
            for i, tok in enumerate(tokens):             # every palette color word sits on a stated shape
                if tok in COLORS:
                    assert any(_shape_word(t) for t in tokens[i + 1:i + 3]), text
            if len(objs) == 1:
                found = [(len(ph), pos) for pos, phs in POSITION_PHRASES.items() for ph in phs if ph in text]
                if found:
                    assert max(found)[1] == position_of(objs[0].cx, objs[0].cy), (text, scene)
            if len(stated) == 2 and len(objs) == 2:
                rel = [r for r, phs in RELATION_PHRASES.items() for ph in phs if f" {ph} " in f" {text} "]
                if rel:
                    a, b = stated[0][0], stated[1][0]
                    assert relation_holds((a.cx, a.cy), (b.cx, b.cy), max(rel, key=len), strict=True), text


def test_caption_variety():
    rng = np.random.default_rng(4)
    texts = [caption(sample_scene(rng), rng) for _ in range(600)]
    for piece in (" one ", "a single", " on a ", "background with", " and ", " above ", " left of ", "there is",
                  " in the top left corner", " at the top left", "two ", "three "):
        assert any(piece in f" {t} " for t in texts), piece
    assert any(not any(c in t.split() for c in COLORS) for t in texts)    # color left out sometimes


def test_seeded_determinism():
    images, captions = make_batch(12, seed=5)
    again, captions_again = make_batch(12, seed=5)
    assert np.array_equal(images, again) and captions == captions_again
    tail, tail_captions = make_batch(4, seed=5, start=8)                 # independent of batching
    assert np.array_equal(tail, images[8:]) and tail_captions == captions[8:]
    other, other_captions = make_batch(12, seed=6)
    assert not np.array_equal(other, images) and other_captions != captions
    ds = ShapesDataset(length=20, seed=5)
    image, text = ds[3]
    assert text == captions[3]
    assert torch.equal(image, torch.from_numpy(images[3]).permute(2, 0, 1).float() / 127.5 - 1)


def test_dataset_items():
    ds = ShapesDataset(size=32, length=10, seed=0)
    assert len(ds) == 10
    image, text = ds[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1 and isinstance(text, str) and text
    with pytest.raises(IndexError):
        ds[10]
    images, captions = make_batch(3, seed=0, size=48)
    assert images.shape == (3, 48, 48, 3) and images.dtype == np.uint8 and len(captions) == 3


def test_dataset_batches_are_its_items_rendered_once():
    # the one rendering loop: batch(), captions() and pixel_values() are the items of example(seed, i)
    ds = ShapesDataset(size=32, length=9, seed=7)
    images, captions = ds.batch(2, 5)
    for k, i in enumerate(range(2, 7)):
        scene, text = example(7, i)
        assert np.array_equal(images[k], render(scene, 32)) and captions[k] == text
        assert torch.equal(ds.pixel_values(i), ds[i][0]) and torch.equal(ds.pixel_values(i, epoch=3), ds[i][0])
    assert ds.captions(2, 5) == captions and ds.captions() == ds.batch()[1] and len(ds.captions()) == 9
    assert ds.batch(9, 0)[0].shape == (0, 32, 32, 3)
    made = make_batch(5, seed=7, size=32, start=2)
    assert np.array_equal(made[0], images) and made[1] == captions
    for start, n in [(8, 2), (-1, 1), (0, -1), (0, 1.5)]:
        with pytest.raises(IndexError, match="out of range"):
            ds.batch(start, n)
    with pytest.raises(ValueError, match="start must be an integer >= 0"):
        make_batch(2, start=-1)


# --------------------------------------------------------------------------------------------- renderer

def test_fill_ratios_match_the_spec():
    spec = {"circle": 0.785, "square": 1.0, "triangle": 0.5, "diamond": 0.5, "star": 0.35}
    for shape in SHAPES:
        assert FILL[shape] == pytest.approx(spec[shape], abs=0.005)
        image = render(Scene("black", [ShapeObject("red", shape, "large", 0.5, 0.5)]), 200)
        coverage = image[..., 0].astype(np.float64) / COLORS["red"][0]
        ys, xs = np.nonzero(coverage > 0)
        assert xs.max() - xs.min() + 1 == pytest.approx(80, abs=1) and ys.max() - ys.min() + 1 == pytest.approx(80, abs=1)
        assert coverage.sum() / 80 ** 2 == pytest.approx(spec[shape], abs=0.01), shape


def test_rendered_colors_and_geometry():
    scene = Scene("gray", [ShapeObject("purple", "triangle", "large", 0.3, 0.3),
                           ShapeObject("cyan", "square", "small", 0.8, 0.8)])
    image = render(scene, 64)
    assert tuple(image[0, 0]) == (128, 128, 128)
    assert tuple(image[int(0.3 * 64) + 4, int(0.3 * 64)]) == COLORS["purple"]
    assert tuple(image[int(0.8 * 64), int(0.8 * 64)]) == COLORS["cyan"]
    hard = render(scene, 64, antialias=False)                # hard edges: background and palette colors only
    assert {tuple(c) for c in hard.reshape(-1, 3)} == {(128, 128, 128), COLORS["purple"], COLORS["cyan"]}
    tri = hard[..., 0] == COLORS["purple"][0]
    rows = tri.sum(1)[tri.any(1)]
    assert rows[-1] > rows[0] and list(rows) == sorted(rows)          # apex up: widest row at the bottom
    assert render(scene, 128).shape == (128, 128, 3)


def test_place_honours_positions_and_relations():
    rng = np.random.default_rng(5)
    for position in POSITIONS:
        (cx, cy), = place(rng, ["large"], [position])
        assert position_of(cx, cy) == position
    for relation in OPPOSITE:
        a, b = place(rng, ["large", "small"], relation=relation)
        assert relation_holds(a, b, relation, strict=True) and not relation_holds(a, b, OPPOSITE[relation])


# ------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("call,words", [
    (lambda: ShapeObject("magenta", "circle", "small", 0.5, 0.5), ["color", "red", "pink"]),
    (lambda: ShapeObject("red", "hexagon", "small", 0.5, 0.5), ["shape", "circle", "star"]),
    (lambda: ShapeObject("red", "circle", "medium", 0.5, 0.5), ["size", "small", "large"]),
    (lambda: ShapeObject("red", "circle", "small", 1.5, 0.5), ["cx", "[0, 1]"]),
    (lambda: Scene("blue", []), ["background", "black", "white", "gray"]),
    (lambda: render(Scene("white", []), 8), ["size", ">= 16"]),
    (lambda: make_batch(2, size=15), ["size", ">= 16"]),
    (lambda: ShapesDataset(size=12), ["size", ">= 16"]),
    (lambda: ShapesDataset(length=0), ["length"]),
    (lambda: sample_scene(np.random.default_rng(0), kind="crowd"), ["kind", "relation"]),
    (lambda: ObjectSpec("hexagon"), ["shape"]),
    (lambda: ObjectSpec("star", color="magenta"), ["color"]),
    (lambda: ObjectSpec("star", count=4), ["count"]),
    (lambda: Expectation((ObjectSpec("star"),), "behind"), ["relation", "above"]),
    (lambda: benchmark_prompts("test"), ["split", "seen", "heldout"]),
    (lambda: benchmark_prompts("seen", per_task=0), ["per_task"]),
    (lambda: detect(np.zeros((64, 64), np.uint8)), ["image", "[H, W, 3]"]),
    (lambda: score([("juggling", True)]), ["task", "single_object"]),
])
def test_bad_input(call, words):
    with pytest.raises(ValueError) as info:
        call()
    for word in words:
        assert word in str(info.value)
