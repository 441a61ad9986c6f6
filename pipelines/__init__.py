"""User-facing pipelines: text-to-image, image-to-image, super-resolution and cascades (variations come later)."""
from .base import DiffusionPipeline, PipelineOutput
from .cascade import CascadePipeline
from .image_to_image import ImageToImagePipeline
from .super_resolution import SuperResolutionPipeline
from .text_to_image import TextToImagePipeline

LatentDiffusionPipeline = DiffusionPipeline  # the name before pixel-space stages

__all__ = ["DiffusionPipeline", "LatentDiffusionPipeline", "PipelineOutput", "TextToImagePipeline",
           "ImageToImagePipeline", "SuperResolutionPipeline", "CascadePipeline"]
