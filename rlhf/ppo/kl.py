"""KL-coefficient controllers for the RLHF reward penalty -kl_coef * KL(pi || ref).

Both controllers expose the same interface: a `value` attribute (the coefficient to use now),
`update(current_kl, n_steps)` after each PPO batch, and `state_dict()` / `load_state_dict()` so a
resumed run continues with the coefficient it had reached rather than the initial one.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["AdaptiveKLController", "FixedKLController"]


def _checked_coefficient(value: Any, what: str) -> float:
    """`value` as a float, rejecting negatives and non-finite numbers (a NaN would poison every reward)."""
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value}")
    return value


class FixedKLController:
    """A constant KL coefficient; `update` is a no-op."""

    def __init__(self, value: float) -> None:
        """Use `value` as the KL coefficient for the whole run."""
        self.value = _checked_coefficient(value, "KL coefficient")

    def update(self, current_kl: float, n_steps: int) -> None:
        """Ignore the observation: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float]:
        """The coefficient, for checkpoints."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the coefficient saved by `state_dict`."""
        self.value = _checked_coefficient(state["value"], "saved KL coefficient")


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (section 2.2), a proportional controller.

    After each batch with observed KL `current_kl` over `n_steps` samples (or episodes):

        error  = clip(current_kl / target - 1, -0.2, 0.2)
        value *= 1 + error * n_steps / horizon

    The coefficient grows when the policy drifts further from the reference than `target` and shrinks
    when it stays closer. Clipping the error bounds how fast a single noisy KL estimate can move it.
    """

    ERROR_CLIP = 0.2

    def __init__(self, init_value: float, target: float, horizon: float) -> None:
        """Start at `init_value`, steering the KL towards `target` over roughly `horizon` steps."""
        self.value = _checked_coefficient(init_value, "initial KL coefficient")
        if not target > 0:
            raise ValueError(f"KL target must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"KL horizon must be > 0, got {horizon}")
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move the coefficient towards the value that keeps the KL at `target`."""
        error = min(max(float(current_kl) / self.target - 1.0, -self.ERROR_CLIP), self.ERROR_CLIP)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """The current coefficient, for checkpoints.

        `target` and `horizon` are configuration and come from the run's config on resume, so only
        the state the controller has accumulated is saved.
        """
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the coefficient saved by `state_dict`."""
        self.value = _checked_coefficient(state["value"], "saved KL coefficient")
