"""Worked examples of extending the pipeline's stages."""
