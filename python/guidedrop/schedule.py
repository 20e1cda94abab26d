"""Rate schedules, advanced by the training loop (never inside ``forward``: a counter
changed in ``forward`` is lost under ``nn.DataParallel``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from torch import nn

from . import _validation as V
from .modules import GuidedDropout


class LinearRamp:
    """Ramps every guidedrop layer's ``drop_rate`` linearly from 0 to its value at
    construction (the target) over ``steps`` calls of :meth:`step` (DropBlock's schedule).

        sched = guidedrop.LinearRamp(model, steps=5000)
        for batch in loader:
            train_step(batch)
            sched.step()

    ``layers`` restricts it to the given layers, an iterable of them (a list, an
    ``nn.ModuleList`` or ``nn.Sequential``; modules of ``model``, when both are given).
    ``steps``: any integral number >= 0 (0: the targets at once). Raises TypeError /
    ValueError naming the argument, and a ValueError where there is no layer to ramp (as
    torch's optimizers refuse an empty parameter list): a ramp made before
    ``guidedrop.models.insert`` would ramp nothing.

    A layer's target is its ``drop_rate`` when the ramp is made, unless an earlier ramp
    set that rate: then the earlier ramp's target (as torch's LR schedulers keep
    ``initial_lr``), so that a second ramp over the same model (a restarted schedule, a
    notebook cell run twice) ramps to the same targets, not to the 0 the first one set.
    A rate assigned after a ramp set it, even the value the ramp set, is a new target.
    """

    def __init__(self, model: nn.Module | None = None, steps: int = 1,
                 layers: Iterable[GuidedDropout] | None = None):
        given = layers is not None
        if model is None and layers is None:
            raise ValueError("LinearRamp needs a model or layers")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if layers is None:
            layers = [m for m in model.modules() if isinstance(m, GuidedDropout)]
        if (isinstance(layers, (GuidedDropout, Mapping, nn.ModuleDict))
                or not isinstance(layers, Iterable)):  # a dict iterates its keys
            raise TypeError(f"layers must be an iterable of guidedrop layers (e.g. [layer], "
                            f"a dict's .values()), got {type(layers).__name__}")
        self.layers = list(layers)
        for m in self.layers:
            if not isinstance(m, GuidedDropout):
                hint = (f" (in the {type(layers).__name__} given as layers: the layers of a "
                        f"model are LinearRamp(model))" if isinstance(layers, nn.Module) else "")
                raise TypeError(f"layers must be guidedrop layers, got {type(m).__name__}{hint}")
        if given and model is not None:
            # a layer outside the model would be ramped while the model's own are not
            inside = {id(m) for m in model.modules()}
            stray = [type(m).__name__ for m in self.layers if id(m) not in inside]
            if stray:
                raise ValueError(f"layers must be modules of the model; not in it: "
                                 f"{', '.join(stray)}")
        if not self.layers:
            raise ValueError("LinearRamp found no guidedrop layer to ramp" + (
                "" if given else f" in the {type(model).__name__}: insert the layers "
                "(guidedrop.models.insert) before making the ramp"))
        self.steps = V.integer("steps", steps, 0)
        both = [_target(m) for m in self.layers]
        self.targets, self._params = [t for t, _ in both], [q for _, q in both]
        self.step_count = 0
        self._set()

    def _set(self) -> None:
        # past the end, 1 without dividing: step_count / steps overflows a float for huge
        # ints (a loaded state's), and steps may be 0
        frac = 1.0 if self.step_count >= self.steps else self.step_count / self.steps
        for m, target, param in zip(self.layers, self.targets, self._params, strict=True):
            if frac == 1.0 and param is not None:
                # the parameter itself at the end: 1 - (1 - keep) may be keep's neighbour
                setattr(m, m._rate, param)
            else:
                m.drop_rate = target * frac
            m._ramp = (target, param)  # see _target

    def step(self) -> None:
        """Advance the ramp by one step: every layer's ``drop_rate`` becomes
        ``target * min(1, step_count / steps)`` (its target itself at the end)."""
        self.step_count += 1
        self._set()

    def __repr__(self) -> str:
        return (f"LinearRamp(step_count={self.step_count}, steps={self.steps}, "
                f"layers={len(self.layers)})")

    def state_dict(self) -> dict:
        """``{"step_count": int, "steps": int, "targets": [float, ...]}``, one target rate per
        layer in order, as torch's LR schedulers keep theirs: save it with the model's and
        restore it with :meth:`load_state_dict` (the layers keep no rate in the model's
        state_dict, as nn.Dropout)."""
        return {"step_count": self.step_count, "steps": self.steps, "targets": list(self.targets)}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a :meth:`state_dict`. Everything is checked before anything changes: a
        refused state (TypeError / ValueError naming the key) leaves the ramp and its
        layers as they were."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict from LinearRamp.state_dict(), got "
                            f"{type(state).__name__}")
        keys = ("step_count", "steps", "targets")
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"state is missing {', '.join(missing)}: not a LinearRamp state")
        # as nn.Module.load_state_dict (strict): a key it would ignore is a mistake
        unexpected = [repr(k) for k in state if k not in keys]
        if unexpected:
            raise ValueError(f"state has unexpected keys {', '.join(unexpected)}: not a "
                             f"LinearRamp state")
        step_count = V.integer("step_count", state["step_count"], 0)
        steps = V.integer("steps", state["steps"], 0)
        targets = state["targets"]
        # A sequence, one rate per layer in order: a dict or a set iterates its keys or
        # in no fixed order, which would load wrong rates without an error.
        if isinstance(targets, (str, bytes)) or not isinstance(targets, Sequence):
            raise TypeError(f"targets must be a list of rates, got {type(targets).__name__}")
        targets = [V.real(f"targets[{i}]", t) for i, t in enumerate(targets)]
        if len(targets) != len(self.layers):
            raise ValueError(f"targets holds {len(targets)} rates for {len(self.layers)} layers")
        # A layer may still refuse a rate (Selectout's keep = 1 - drop_rate must be > 0):
        # its target, which a later step() reaches, or the current one. Then put
        # everything back.
        # (the parameter itself, not drop_rate: 1 - (1 - keep) may move keep by an ulp)
        before = ((self.step_count, self.steps, self.targets, self._params),
                  [(getattr(m, m._rate), getattr(m, "_ramp", None)) for m in self.layers])
        # a target kept keeps its parameter; another one ends as 1 - target where inverted
        params = [q if t == old else None
                  for t, old, q in zip(targets, self.targets, self._params, strict=True)]
        self.step_count, self.steps, self.targets, self._params = (step_count, steps, targets,
                                                                   params)
        try:
            for i, (m, target) in enumerate(zip(self.layers, targets, strict=True)):
                try:
                    m.drop_rate = target
                except (TypeError, ValueError) as e:  # the key, not only the layer's name
                    raise type(e)(f"targets[{i}] = {target!r} is refused by "
                                  f"{type(m).__name__}: {e}") from None
            self._set()
        except Exception:  # whatever failed, the ramp and its layers as they were
            (self.step_count, self.steps, self.targets, self._params), rates = before
            for m, (rate, ramped) in zip(self.layers, rates, strict=True):
                setattr(m, m._rate, rate)
                if ramped is not None:  # the marks too: a later ramp finds the targets
                    m._ramp = ramped
            raise


def _target(m: GuidedDropout) -> tuple[float, float | None]:
    """The rate a new ramp takes to, and the parameter that gives it (None: unknown): the
    target of the ramp that set m's rate, while m's rate is still the one that ramp set
    (m._ramp: setting the rate otherwise drops it, GuidedDropout.__setattr__); else m's
    rate."""
    ramped = getattr(m, "_ramp", None)  # (target, parameter of the target)
    return ramped if ramped is not None else (m.drop_rate, getattr(m, m._rate))
