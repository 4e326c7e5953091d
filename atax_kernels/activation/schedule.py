"""When to refresh activation bases: :class:`RefreshSchedule`, a fixed interval that doubles while the bases do
not move (checked by ``ActivationSubspace.update_if_drifted``) and falls back to the base interval when they do.

Why: a refresh costs the capability forwards it observes plus one eigensolve per distinct input. Measured on
SmolLM2-135M-Instruct (30 SFT steps, lr 3e-5, bases rebuilt from the same 4 batches every 10 steps), the rebuilt
bases overlap the step-0 bases by 0.99 on average (min 0.95 over 121 inputs), so a fixed every-10 schedule pays
for eigensolves that return what it had; the doubling schedule pays one check for them and skips the eigensolves.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

from .._warn import user_stacklevel

__all__ = ["RefreshSchedule", "refresh_if_due", "check_refresh_every", "check_schedule_for",
           "refresh_every_state", "load_refresh_every_state"]


class RefreshSchedule:
    """Refresh steps for activation bases: every ``every`` steps while they move, doubling while they do not.

    Use in a training loop::

        sub = ActivationSubspace.from_loader(model, loader, energy=0.9)
        schedule = RefreshSchedule(every=10, tol=0.02)
        for step in range(steps):
            ...
            if schedule.due(step):
                # re-observes the loader it was built from (the same batches each time); tol=None: update()
                schedule.record(step, moved=sub.refresh(tol=schedule.tol))
            opt.step()

    Args:
        every: the base interval in steps (the first check is at step ``every``: the bases are fresh at 0).
        tol: how far below ``energy`` a basis' coverage of newly observed moments may fall before it counts as
            moved (see ``ActivationSubspace.update_if_drifted``). ``tol=None``: no check, a refresh every
            ``every`` steps (the fixed schedule).
        max_every: the longest interval (default: ``16 * every``).

    ``checks`` and ``refreshes`` count what happened; ``history`` holds ``(step, moved)`` of the last
    ``HISTORY`` checks.

    A schedule is stateful: ``ProjectedOptimizer`` and ``attach`` advance the object they are given (and save
    and restore its position with their checkpoints), so give each training run its own.
    """

    #: how many of the latest checks ``history`` keeps
    HISTORY = 64

    def __init__(self, every: int = 10, tol: float | None = 0.02, max_every: int | None = None) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0.0 <= tol < 1.0):
            raise ValueError(f"tol must be None or a number in [0, 1), got {tol!r}")
        if max_every is None:
            max_every = 16 * every
        if isinstance(max_every, bool) or not isinstance(max_every, int) or max_every < every:
            raise ValueError(f"max_every must be an int >= every ({every}), got {max_every!r}")
        self.every, self.tol, self.max_every = every, None if tol is None else float(tol), max_every
        self.interval = every
        self.next_step = every
        self.checks = 0
        self.refreshes = 0
        self.history: list[tuple[int, bool]] = []

    @property
    def adaptive(self) -> bool:
        """True when checks may skip refreshes (``tol`` given)."""
        return self.tol is not None

    def due(self, step: int) -> bool:
        """True when ``step`` (0-based) is a refresh (or check) step."""
        return step >= self.next_step

    def record(self, step: int, *, moved: bool = True) -> None:
        """After the check at ``step``: ``moved`` (the bases were rebuilt) resets the interval to ``every``, a
        check that kept the bases doubles it (up to ``max_every``)."""
        self.checks += 1
        self.refreshes += int(bool(moved))
        self.history.append((int(step), bool(moved)))
        del self.history[:-self.HISTORY]  # checkpoints carry it: bounded however long the run
        if moved or not self.adaptive:
            self.interval = self.every
        else:
            self.interval = min(2 * self.interval, self.max_every)
        self.next_step = step + self.interval

    def reset(self) -> None:
        """Back to the start (first check at step ``every``, no history), keeping the settings."""
        self.__dict__.update(RefreshSchedule(self.every, self.tol, self.max_every).__dict__)

    def state_dict(self) -> dict[str, Any]:
        """Settings and position (for a resumed run)."""
        return {"every": self.every, "tol": self.tol, "max_every": self.max_every, "interval": self.interval,
                "next_step": self.next_step, "checks": self.checks, "refreshes": self.refreshes,
                "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (settings included). Everything is validated before anything changes."""
        missing = [k for k in ("every", "tol", "max_every", "interval", "next_step") if k not in state]
        if missing:
            raise ValueError(f"RefreshSchedule state is missing {missing}")
        fresh = RefreshSchedule(state["every"], state["tol"], state["max_every"])  # validates the settings
        try:
            fresh.interval, fresh.next_step = int(state["interval"]), int(state["next_step"])
            fresh.checks, fresh.refreshes = int(state.get("checks", 0)), int(state.get("refreshes", 0))
            fresh.history = [(int(s), bool(m)) for s, m in state.get("history", [])][-self.HISTORY:]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"RefreshSchedule state is malformed: {exc}") from None
        self.__dict__.update(fresh.__dict__)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RefreshSchedule) and (self.every, self.tol, self.max_every) == (
            other.every, other.tol, other.max_every)

    __hash__ = None  # type: ignore[assignment]  # equal by settings, but mutable: not a dict key

    def __repr__(self) -> str:
        return f"RefreshSchedule(every={self.every}, tol={self.tol}, max_every={self.max_every})"


def check_refresh_every(refresh_every: Any, where: str) -> None:
    """``refresh_every`` is a positive int (a fixed interval) or a :class:`RefreshSchedule`; else a
    ``ValueError`` naming ``where``."""
    if isinstance(refresh_every, RefreshSchedule):
        return
    if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
        raise ValueError(f"{where}: refresh_every must be a positive int or an "
                         f"atax_kernels.activation.RefreshSchedule, got {refresh_every!r}")


def check_schedule_for(sub: Any, schedule: RefreshSchedule, where: str, *, can_observe: bool) -> None:
    """Refuse, before any step, a drift-checked schedule (``tol`` given) that ``update_if_drifted`` could not
    judge: no capability forward to re-observe (``can_observe``), ``contrast > 0``, averaged moments."""
    if not schedule.adaptive:
        return
    if not can_observe:
        raise ValueError(f"{where}: RefreshSchedule(tol={schedule.tol}) re-observes capability data at each "
                         f"check, and there is none to observe: build the subspace with "
                         f"ActivationSubspace.from_loader(model, capability_loader) (or pass reference_fn= to "
                         f"ProjectedOptimizer), or use RefreshSchedule(tol=None) / an int refresh_every")
    sub._check_drift_args(schedule.tol, f"{where}: RefreshSchedule(tol={schedule.tol})")


def refresh_if_due(refresh_every: "int | RefreshSchedule", step: int, rebuild: Callable[[float | None], bool], *,
                   at_start: bool) -> bool | None:
    """The one refresh rule of every optimizer and trainer path: at optimizer step ``step`` (0-based), run
    ``rebuild(tol)`` if a refresh is due, and return whether the bases were rebuilt (``None``: not due).

    ``refresh_every`` an int: due when ``step % refresh_every == 0`` and ``tol`` is ``None`` (a rebuild).
    A :class:`RefreshSchedule`: due when ``schedule.due(step)``, with its ``tol`` (``rebuild`` may keep the
    bases and return ``False``), and the outcome is recorded so the interval doubles while they are kept.
    Step 0 is due only when ``at_start`` (the caller knows whether bases exist yet); it is not recorded, so the
    first check stays at step ``every``.
    """
    schedule = refresh_every if isinstance(refresh_every, RefreshSchedule) else None
    if step == 0:
        due = at_start
    elif schedule is not None:
        due = schedule.due(step)
    else:
        due = step % refresh_every == 0
    if not due:
        return None
    moved = bool(rebuild(None if schedule is None else schedule.tol))
    if schedule is not None and step > 0:
        schedule.record(step, moved=moved)
    return moved


def refresh_every_state(refresh_every: "int | RefreshSchedule") -> Any:
    """What a checkpoint stores for ``refresh_every``: the int, or the schedule's ``state_dict()`` (plain data,
    loadable with ``torch.load(weights_only=True)``)."""
    if isinstance(refresh_every, RefreshSchedule):
        return refresh_every.state_dict()
    return refresh_every


def load_refresh_every_state(refresh_every: "int | RefreshSchedule", saved: Any, where: str) -> None:
    """Restore a schedule's position from what :func:`refresh_every_state` saved. The constructor's settings
    win: a checkpoint saved with another interval (or an int) leaves the schedule as constructed, and an int
    ``refresh_every`` resumed from a schedule's checkpoint stays an int, each with a ``UserWarning``. Raises
    ``ValueError`` (nothing changed) on a malformed saved schedule."""
    if not isinstance(refresh_every, RefreshSchedule):
        if isinstance(saved, dict):
            warnings.warn(f"{where}: the checkpoint was saved with refresh_every={_describe(saved)}; keeping "
                          f"refresh_every={refresh_every!r} as constructed", UserWarning, stacklevel=user_stacklevel())
        return
    if saved is None:
        return
    if isinstance(saved, dict):
        try:
            saved_settings = RefreshSchedule(saved["every"], saved["tol"], saved["max_every"])
        except (KeyError, TypeError, ValueError):
            saved_settings = None
        if saved_settings == refresh_every:
            refresh_every.load_state_dict(saved)
            return
    warnings.warn(f"{where}: the checkpoint was saved with refresh_every={_describe(saved)}; keeping "
                  f"{refresh_every!r} as constructed (its position is not resumed: it checks at the first step at "
                  f"or past {refresh_every.next_step})", UserWarning, stacklevel=user_stacklevel())


def _describe(saved: Any) -> str:
    """A saved ``refresh_every`` in a message: the int, or the schedule's settings (not its history)."""
    if isinstance(saved, dict):
        return f"RefreshSchedule(every={saved.get('every')}, tol={saved.get('tol')}, max_every={saved.get('max_every')})"
    return repr(saved)
