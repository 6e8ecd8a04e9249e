"""Progress of a run, phase by phase: loading, each request's images, training, measuring, writing outputs.

A run announces each phase as it starts (`phase(name, total, unit, kind, **info)`), advances it as
work is done (`advance(n, latents=..., image=...)`: `n` units, fractions allowed, and what was just
made where something was — the backend's latents [1, C, h, w] or an image [3, H, W] in [0, 1], for
previews) and leaves it when it ends. `Phases` itself only keeps the wall time of each kind of phase
(`seconds`, e.g. for benchmarks/demo_time.py); `TqdmPhases` draws one tqdm bar per phase on the
command line, and duge.backends.comfy_run drives ComfyUI's progress bar with previews the same way.

Kinds: "loading", "images" (a request's anchor and related images), "training" (a request's teacher
pool, counted in rows, and its steps), "measuring",
"grid" (the before/after images), "attacking" (`duge unlearn --attack`), "writing".
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from tqdm.auto import tqdm

KINDS = ("loading", "images", "training", "measuring", "grid", "attacking", "writing")


class Phases:
    """Receives a run's phases; keeps the seconds spent per kind. Subclasses show them (module doc)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}  # wall time per kind
        self.counts: dict[str, dict[str, float]] = {}  # work done per kind and unit (e.g. training: steps, rows)
        self.info: dict = {}  # the current phase's **info (e.g. target=...)
        self._current: tuple[str, str, float, str] | None = None  # (name, kind, start time, unit)

    @contextmanager
    def phase(self, name: str, total: float, unit: str, kind: str, **info):
        """The phase `name` of `total` units of work (`kind`: one of KINDS). A phase started inside
        another (e.g. a measurement's images) adds its work to the outer one."""
        if kind not in KINDS:
            raise ValueError(f"phase kind must be one of {KINDS}, got {kind!r}")
        if self._current is not None:
            yield self
            return
        self._current, self.info = (name, kind, time.perf_counter(), unit), info
        self.started(name, total, unit, kind)
        try:
            yield self
        finally:
            t0 = self._current[2]
            self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - t0
            self._current, self.info = None, {}
            self.ended(name, kind)

    @property
    def kind(self) -> str | None:
        """The kind of the phase running now, None between phases."""
        return self._current[1] if self._current is not None else None

    def advance(self, n: float = 1, latents=None, image=None) -> None:
        """`n` more units of the current phase done; `latents` [1, C, h, w] or `image` [3, H, W]: what was just made."""
        if self._current is not None:
            done = self.counts.setdefault(self.kind, {})
            done[self._current[3]] = done.get(self._current[3], 0.0) + n
        self.advanced(n, latents, image)

    # What a display does; nothing here.
    def started(self, name: str, total: float, unit: str, kind: str) -> None:
        pass

    def advanced(self, n: float, latents, image) -> None:
        pass

    def ended(self, name: str, kind: str) -> None:
        pass


class TqdmPhases(Phases):
    """One tqdm bar per phase, with its count, rate and remaining time; counts shown as whole units."""

    def __init__(self):
        super().__init__()
        self._bar = None

    def started(self, name, total, unit, kind):
        self._bar = tqdm(total=total, desc=name, unit=unit, dynamic_ncols=True,
                         bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} {unit} "
                                    "[{elapsed}<{remaining}]")

    def advanced(self, n, latents, image):
        if self._bar is not None:  # fractions of images per sampler step may add up past the total by rounding
            self._bar.update(min(n, self._bar.total - self._bar.n) if self._bar.total else n)

    def set_postfix(self, **values) -> None:
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def ended(self, name, kind):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    @staticmethod
    def write(text: str) -> None:
        """A log line that does not break the bar."""
        tqdm.write(text)


def current_phases(phases: Phases | None) -> Phases:
    """`phases`, or a `Phases` that only keeps time (so code can always report)."""
    return phases if phases is not None else Phases()
