"""Evaluation. `shapes_eval`: the shapes-world alignment benchmark, scored exactly by reading images back."""
from .shapes_eval import (SPLITS, TASKS, Detection, Expectation, ObjectSpec, Prompt, benchmark_prompts, detect,
                          evaluate, fit_shape, format_table, prompt_text, satisfied, scene_for, score)

__all__ = [
    "SPLITS", "TASKS", "Detection", "Expectation", "ObjectSpec", "Prompt", "benchmark_prompts", "detect",
    "evaluate", "fit_shape", "format_table", "prompt_text", "satisfied", "scene_for", "score",
]
