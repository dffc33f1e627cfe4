"""rlhf-pipeline: pretraining, SFT, reward modelling and PPO as stages over an artifact store.

Importing this package is cheap: torch, transformers and friends load only where a stage needs them.
"""

__version__ = "0.1.0"
