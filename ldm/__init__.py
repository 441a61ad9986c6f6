"""ldm: latent text-to-image diffusion, written to the equations of the papers it implements."""
__version__ = "0.1.0"
