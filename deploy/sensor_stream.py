"""A synthetic sensor stream for the demo: correlated readings, labelled anomalies.

Twelve sensors are driven by three slowly moving latent factors (think load,
ambient temperature, pressure), so in the normal regime each sensor is predictable
from the others. Injected anomalies, each an episode over one sensor:

* spike — one reading jumps 6–10 σ;
* broken correlation — the sensor's reading is mirrored about its mean (same
  range, but it now moves against the sensors it normally follows);
* drift — a growing offset;
* stuck — the sensor repeats one value while the others move.

A row is labelled anomalous where the reading is off the truth by more than one
standard deviation of the sensor's reading (its whole spread, `sigma`, not only its
measurement noise): less is within what the sensor does normally.

`load_shift` and `setpoints` move the plant to another operating point (the demo's
drift act): the load factor's mean, in its standard deviations, and sensors' set-points,
in each sensor's standard deviations (none: the operating point every model of the
demo starts from). With the load the sensors move along their correlations; a
set-point moves one sensor off them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SENSORS = [
    "inlet_temp", "outlet_temp", "coolant_temp", "bearing_temp",
    "motor_current", "motor_voltage", "rpm", "vibration",
    "inlet_pressure", "outlet_pressure", "flow_rate", "power_kw",
]  # fmt: skip
KINDS = ("spike", "broken_correlation", "drift", "stuck")
_LATENT = 3


@dataclass
class Episode:
    kind: str
    sensor: int
    start: int
    length: int


class SensorStream:
    """Rows in time order; `normal(n)` for training, `mixed(n)` with labels for the demo."""

    def __init__(
        self, seed: int = 0, load_shift: float = 0.0, setpoints: dict[str, float] | None = None
    ):
        self.rng = np.random.default_rng(seed)
        plant = np.random.default_rng(1234)  # the plant is the same in every stream
        self.mixing = plant.normal(size=(_LATENT, len(SENSORS)))
        self.offset = plant.uniform(20, 80, size=len(SENSORS))
        self.scale = plant.uniform(0.5, 5, size=len(SENSORS))
        self.noise = 0.08
        # latent factor 0 is the load: its mean moves every sensor along its loading
        self.offset = self.offset + self.scale * load_shift * self.mixing[0]
        for name, shift in (setpoints or {}).items():
            i = SENSORS.index(name)
            self.offset[i] += shift * self.sigma[i]
        self._z = np.zeros(_LATENT)

    def _latent(self, n: int) -> np.ndarray:
        z = np.empty((n, _LATENT))
        eps = self.rng.normal(size=(n, _LATENT))
        cur = self._z
        for t in range(n):  # AR(1): slow, correlated movement
            cur = 0.8 * cur + 0.6 * eps[t]
            z[t] = cur
        self._z = cur
        return z

    def normal(self, n: int) -> np.ndarray:
        z = self._latent(n)
        raw = z @ self.mixing + self.noise * self.rng.normal(size=(n, len(SENSORS)))
        return (self.offset + self.scale * raw).astype(np.float32)

    @property
    def noise_sigma(self) -> np.ndarray:
        return self.scale * self.noise

    @property
    def sigma(self) -> np.ndarray:
        """Per-sensor standard deviation of normal readings (input units)."""
        return self.scale * np.sqrt((self.mixing**2).sum(axis=0) + self.noise**2)

    def mixed(
        self, n: int, mean_gap: int = 500
    ) -> tuple[np.ndarray, np.ndarray, list[str], list[Episode]]:
        """(rows, labels 0/1, kind per row ('' when normal), episodes).

        A row is labelled anomalous where its reading is off the truth by more than
        1 × the sensor's standard deviation (a stuck sensor that happens to read close
        to right is not).
        """
        x = self.normal(n)
        truth = x.copy()
        sigma = self.sigma
        labels = np.zeros(n, dtype=np.int8)
        kinds = [""] * n
        episodes: list[Episode] = []
        lengths = {"spike": 1, "broken_correlation": 60, "drift": 50, "stuck": 60}
        t = int(self.rng.integers(mean_gap // 4, mean_gap // 2))
        while t < n - max(lengths.values()):
            kind = KINDS[len(episodes) % len(KINDS)]
            s = int(self.rng.integers(len(SENSORS)))
            idx = np.arange(t, t + lengths[kind])
            if kind == "spike":
                x[idx, s] += self.rng.choice([-1, 1]) * self.rng.uniform(6, 10) * sigma[s]
            elif kind == "broken_correlation":
                x[idx, s] = 2 * self.offset[s] - x[idx, s]  # same range, opposite direction
            elif kind == "drift":
                x[idx, s] += np.linspace(0, 6, len(idx)) * sigma[s]
            else:
                x[idx, s] = x[idx[0], s]
            hit = idx[np.abs(x[idx, s] - truth[idx, s]) > 1.0 * sigma[s]]
            labels[hit] = 1
            for i in hit:
                kinds[i] = kind
            episodes.append(Episode(kind, s, t, len(idx)))
            t += len(idx) + int(self.rng.integers(mean_gap // 2, 3 * mean_gap // 2))
        return x, labels, kinds, episodes
