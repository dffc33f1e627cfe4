"""The pipeline's stages, one module each. Registered as `rlhf.stages` entry points in pyproject.toml."""
