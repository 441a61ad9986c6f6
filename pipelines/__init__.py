"""User-facing pipelines: text-to-image and image-to-image (variations and cascades come later)."""
from .base import LatentDiffusionPipeline, PipelineOutput
from .image_to_image import ImageToImagePipeline
from .text_to_image import TextToImagePipeline

__all__ = ["LatentDiffusionPipeline", "PipelineOutput", "TextToImagePipeline", "ImageToImagePipeline"]
