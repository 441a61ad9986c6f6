"""Datasets. `shapes`: the procedural captioned shapes world (specs/shapes-world.md)."""
from .shapes import (BACKGROUNDS, COLORS, HELD_OUT, KINDS, POSITIONS, RELATIONS, SHAPES, SIZES, Scene, ShapeObject,
                     caption, noun_phrase, place, position_of, position_phrase, relation_holds, render, sample_scene)
from .shapes_dataset import ShapesDataset, example, make_batch

__all__ = [
    "BACKGROUNDS", "COLORS", "HELD_OUT", "KINDS", "POSITIONS", "RELATIONS", "SHAPES", "SIZES", "Scene",
    "ShapeObject", "ShapesDataset", "caption", "example", "make_batch", "noun_phrase", "place", "position_of",
    "position_phrase", "relation_holds", "render", "sample_scene",
]
