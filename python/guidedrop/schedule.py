"""Rate schedules, advanced by the training loop (never inside ``forward``: a counter
changed in ``forward`` is lost under ``nn.DataParallel``)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .modules import GuidedDropout


class LinearRamp:
    """Ramps every guidedrop layer's ``drop_rate`` linearly from 0 to its value at
    construction (the target) over ``steps`` calls of :meth:`step` (DropBlock's schedule).

        sched = guidedrop.LinearRamp(model, steps=5000)
        for batch in loader:
            train_step(batch)
            sched.step()

    ``layers`` restricts it to the given modules.
    """

    def __init__(self, model: nn.Module | None = None, steps: int = 1,
                 layers: Iterable[GuidedDropout] | None = None):
        if layers is None:
            if model is None:
                raise ValueError("LinearRamp needs a model or layers")
            layers = [m for m in model.modules() if isinstance(m, GuidedDropout)]
        self.layers = list(layers)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        self.steps = steps
        self.targets = [m.drop_rate for m in self.layers]
        self.step_count = 0
        self._set()

    def _set(self) -> None:
        frac = 1.0 if self.steps == 0 else min(1.0, self.step_count / self.steps)
        for m, target in zip(self.layers, self.targets):
            m.drop_rate = target * frac

    def step(self) -> None:
        self.step_count += 1
        self._set()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "steps": self.steps, "targets": list(self.targets)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["targets"]) != len(self.layers):
            raise ValueError("state_dict holds a different number of layers")
        self.step_count, self.steps = state["step_count"], state["steps"]
        self.targets = list(state["targets"])
        self._set()
