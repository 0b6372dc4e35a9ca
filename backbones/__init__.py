"""The video transformers, one file each, equal to diffusers' (layers.py: what they share)."""
