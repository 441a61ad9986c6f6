"""User-facing pipelines (text-to-image, image-to-image, variations, cascades)."""
