"""The miniature learned prior: a small camera-conditioned pixel-space diffusion UNet trained on
procedural renders (docs/miniature-prior.md)."""
