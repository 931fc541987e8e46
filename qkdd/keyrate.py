"""``qkdd keyrate``: expected secret key against distance, from the same bound the daemons use.

The link model is the one ``qkdd.links.sim`` simulates (its parameters and defaults): channel
transmittance η = η_det · 10^(−α L / 10); a pulse of mean photon number μ is detected with probability
Q_μ = 1 − (1 − p_d)^2 e^(−η μ) (two detectors, each with dark-count probability p_d); a detection is an
error with probability E_μ = [ (1 − (1 − p_d)^2) e^(−η μ) / 2 + e_d (1 − e^(−η μ)) ] / Q_μ. After-pulses
add a fraction p_ap of further detections with random bits. For a block of n_Z key-basis detections the
expected counts per intensity and basis go into the finite-key decoy-state bound of
:mod:`qkdd.stages.decoy` (Lim et al. 2014), with λ = f_EC · n_Z · h(E_Z) + the confirmation tag's bits
(what the daemons count as disclosed).

Reference columns: the asymptotic decoy-state rate (GLLP with the exact single-photon yield and error
of the model: Gottesman, Lo, Lütkenhaus, Preskill 2004; Lo, Ma, Chen 2005) and the PLOB bound
−log2(1 − η_ch) of the channel (Pirandola, Laurenza, Ottaviani, Banchi, Nat. Commun. 8, 15043 (2017)).
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from qkdd.errors import InputError
from qkdd.stages import confirm
from qkdd.stages.decoy import DecoyCounts, bounds, decoy_key_length
from qkdd.stages.keylength import binary_entropy


@dataclass(frozen=True)
class LinkModel:
    fiber_loss_db_per_km: float = 0.2
    detector_efficiency: float = 0.25
    dark_count_probability: float = 1e-6
    afterpulse_probability: float = 0.0
    misalignment: float = 0.01
    f_ec: float = 1.05
    clock_hz: float = 1e9
    intensities: tuple[float, float, float] = (0.5, 0.2, 0.0)  # the sim backend's defaults
    intensity_probabilities: tuple[float, float, float] = (0.4, 0.4, 0.2)
    z_probability: float = 0.8
    eps_sec: float = 1e-9
    eps_cor: float = 1e-15

    def channel(self, km: float) -> float:
        return float(10 ** (-self.fiber_loss_db_per_km * km / 10))

    def key_detections_per_pulse(self, km: float) -> float:
        """Expected key-basis (Z) sifted detections per pulse: p_Z^2 Σ_k p_k Q_k."""
        gains, _ = self.gains_and_errors(km)
        return self.z_probability**2 * sum(
            p * q for p, q in zip(self.intensity_probabilities, gains, strict=True)
        )

    def gains_and_errors(self, km: float) -> tuple[list[float], list[float]]:
        eta = self.detector_efficiency * self.channel(km)
        dark = 1 - (1 - self.dark_count_probability) ** 2
        gains, errors = [], []
        for mu in self.intensities:
            arrive = 1 - math.exp(-eta * mu)
            q = 1 - (1 - dark) * (1 - arrive)
            wrong = dark * (1 - arrive) / 2 + self.misalignment * arrive
            q_ap = q * (1 + self.afterpulse_probability)
            gains.append(q_ap)
            errors.append((wrong + self.afterpulse_probability * q / 2) / q_ap)
        return gains, errors


@dataclass(frozen=True)
class Row:
    distance_km: float
    eta: float
    key_per_pulse: float
    key_bps: float
    qber: float
    phase_error: float | None
    asymptotic_per_pulse: float
    plob_per_pulse: float


def expected_counts(model: LinkModel, km: float, block: int) -> tuple[DecoyCounts, int, float]:
    """(counts, pulses, Z error rate) for a block of ``block`` key-basis detections."""
    gains, errors = model.gains_and_errors(km)
    pz, p = model.z_probability, model.intensity_probabilities
    pulses = math.ceil(block / model.key_detections_per_pulse(km))
    n_z = tuple(round(pulses * pz * pz * pk * q) for pk, q in zip(p, gains, strict=True))
    n_x = tuple(round(pulses * (1 - pz) ** 2 * pk * q) for pk, q in zip(p, gains, strict=True))
    m_x = tuple(round(n * e) for n, e in zip(n_x, errors, strict=True))
    qber = sum(n * e for n, e in zip(n_z, errors, strict=True)) / max(sum(n_z), 1)
    leak = math.ceil(model.f_ec * sum(n_z) * binary_entropy(qber)) + confirm.TAG_BITS
    return DecoyCounts(model.intensities, p, n_z, n_x, m_x, leak), pulses, qber


def asymptotic_per_pulse(model: LinkModel, km: float) -> float:
    """GLLP with the model's exact single-photon yield Y_1 and error e_1; all intensities give key."""
    eta = model.detector_efficiency * model.channel(km)
    dark = 1 - (1 - model.dark_count_probability) ** 2
    y1 = 1 - (1 - dark) * (1 - eta)
    e1 = (dark * (1 - eta) / 2 + model.misalignment * eta) / y1
    gains, errors = model.gains_and_errors(km)
    rate = 0.0
    for mu, pk, q, e in zip(model.intensities, model.intensity_probabilities, gains, errors, strict=True):
        q1 = mu * math.exp(-mu) * y1
        rate += pk * (q1 * (1 - binary_entropy(e1)) - model.f_ec * q * binary_entropy(e))
    return max(0.0, model.z_probability**2 * rate)


def row(model: LinkModel, km: float, block: int) -> Row:
    counts, pulses, qber = expected_counts(model, km, block)
    result = decoy_key_length(counts, eps_sec=model.eps_sec, eps_cor=model.eps_cor)
    found = bounds(counts, model.eps_sec)
    per_pulse = result.secret_bits / pulses
    channel = model.channel(km)
    return Row(
        distance_km=km,
        eta=model.detector_efficiency * channel,
        key_per_pulse=per_pulse,
        key_bps=per_pulse * model.clock_hz,
        qber=qber,
        phase_error=None if found is None or result.secret_bits == 0 else found.phase_error,
        asymptotic_per_pulse=asymptotic_per_pulse(model, km),
        plob_per_pulse=-math.log2(1 - channel) if channel < 1 else math.inf,
    )


def optimize(model: LinkModel, km: float, block: int) -> LinkModel:
    """The intensities μ1, μ2 (μ3 kept), their probabilities and the Z-basis bias that maximise the key
    per pulse at this distance (Nelder–Mead from scipy over a bounded parametrisation; several starts)."""
    try:
        from scipy.optimize import minimize  # noqa: PLC0415 - optional
    except ImportError:
        raise InputError("--optimize needs scipy: pip install 'qkdd[keyrate]'") from None
    mu3 = model.intensities[2]

    def unpack(x: Sequence[float]) -> LinkModel | None:
        mu1, mu2, p1, p2, pz = x
        if not (mu3 < mu2 and mu2 + mu3 < mu1 <= 1.5 and min(p1, p2) >= 0.01 and p1 + p2 <= 0.99):
            return None
        if not 0.05 <= pz <= 0.99:
            return None
        return replace(
            model,
            intensities=(mu1, mu2, mu3),
            intensity_probabilities=(p1, p2, 1 - p1 - p2),
            z_probability=pz,
        )

    def loss(x: Sequence[float]) -> float:
        candidate = unpack(x)
        return 1.0 if candidate is None else -row(candidate, km, block).key_per_pulse * 1e3

    best = model
    best_value = loss(_pack(model))
    for start in (
        _pack(model),
        [0.5, 0.15, 0.5, 0.3, 0.8],
        [0.7, 0.2, 0.4, 0.4, 0.7],
        [0.4, 0.1, 0.6, 0.25, 0.9],
    ):
        found = minimize(
            loss, start, method="Nelder-Mead", options={"xatol": 1e-3, "fatol": 1e-9, "maxiter": 400}
        )
        if found.fun < best_value and unpack(found.x) is not None:
            best_value, best = float(found.fun), unpack(found.x) or best
    return best


def _pack(model: LinkModel) -> list[float]:
    return [
        model.intensities[0],
        model.intensities[1],
        model.intensity_probabilities[0],
        model.intensity_probabilities[1],
        model.z_probability,
    ]


def parse_distances(text: str) -> list[float]:
    """``START:STOP:STEP`` (STOP included) or a comma-separated list, in km."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            count = math.floor((stop - start) / step + 1e-9) + 1
            return [start + i * step for i in range(count)]
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise InputError(
            f"--distances: expected START:STOP:STEP or a list like 0,10,50; got {text!r}"
        ) from None


def load_model(path: Path | None, overrides: dict[str, Any]) -> LinkModel:
    """Defaults, then a TOML file (top level or its ``[link.sim]``/``[keyrate]`` table), then flags."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise InputError(f"{path}: cannot read link parameters: {error}") from None
        values.update(raw.get("keyrate", raw.get("link", {}).get("sim", raw)))
        values.pop("seed", None)
        values.pop("pulses_per_frame", None)
        values.pop("distance_km", None)
        values.pop("eve_fraction", None)
        values.pop("single_photon", None)
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(LinkModel)}
    for name in values:
        if name not in known:
            raise InputError(f"{name}: unknown link parameter; known: {', '.join(sorted(known))}")
    for name in ("intensities", "intensity_probabilities"):
        if name in values:
            values[name] = tuple(float(v) for v in values[name])
            if len(values[name]) != 3:
                raise InputError(f"{name}: expected three values (signal, decoy, vacuum)")
    model = LinkModel(**values)
    if abs(sum(model.intensity_probabilities) - 1) > 1e-9:
        raise InputError("intensity_probabilities: expected three probabilities that sum to 1")
    if not 0 < model.z_probability < 1:
        raise InputError("z_probability: expected a number in (0, 1)")
    return model


def run(
    model: LinkModel, distances: Sequence[float], block: int, *, optimize_each: bool = False
) -> list[tuple[Row, LinkModel]]:
    out = []
    for km in distances:
        used = optimize(model, km, block) if optimize_each else model
        out.append((row(used, km, block), used))
    return out


def plot(rows: Sequence[Row], path: Path) -> None:
    try:
        import matplotlib  # noqa: PLC0415 - optional

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'qkdd[keyrate]'") from None
    figure, axes = plt.subplots(figsize=(7, 4.5))
    distance = [r.distance_km for r in rows]

    def positive(values: Callable[[Row], float]) -> list[float]:
        return [values(r) if values(r) > 0 else math.nan for r in rows]

    axes.semilogy(distance, positive(lambda r: r.plob_per_pulse), "k--", label="PLOB bound")
    axes.semilogy(
        distance, positive(lambda r: r.asymptotic_per_pulse), "C1-", label="asymptotic decoy (GLLP)"
    )
    axes.semilogy(
        distance, positive(lambda r: r.key_per_pulse), "C0o-", label="finite-key decoy (Lim et al. 2014)"
    )
    axes.set_xlabel("fiber length (km)")
    axes.set_ylabel("secret key per pulse (bits)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report(results: Sequence[tuple[Row, LinkModel]], model: LinkModel, block: int, as_json: bool) -> str:
    rows = [r for r, _ in results]
    if as_json:
        parameters = {**asdict(model), "block": block}
        out: dict[str, Any] = {"parameters": parameters, "rows": [asdict(r) for r in rows]}
        if any(m != model for _, m in results):
            for entry, (_, used) in zip(out["rows"], results, strict=True):
                entry["optimized"] = {
                    "intensities": used.intensities,
                    "intensity_probabilities": used.intensity_probabilities,
                    "z_probability": used.z_probability,
                }
        return json.dumps(out)
    lines = [
        f"{'km':>6} {'eta':>10} {'key/pulse':>11} {'key bit/s':>11} {'QBER':>7} {'phase':>7} "
        f"{'asymptotic':>11} {'PLOB':>10}"
    ]
    for r in rows:
        phase = "-" if r.phase_error is None else f"{100 * r.phase_error:.2f}%"
        lines.append(
            f"{r.distance_km:>6.1f} {r.eta:>10.3e} {r.key_per_pulse:>11.3e} {r.key_bps:>11.3e} "
            f"{100 * r.qber:>6.2f}% {phase:>7} {r.asymptotic_per_pulse:>11.3e} {r.plob_per_pulse:>10.3e}"
        )
    return "\n".join(lines)
