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
from qkdd.stages.decoy import DecoyCounts, bounds, decoy_key_length, valid_intensities
from qkdd.stages.decoy import unrounded_length as unrounded_length_of
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
    min_block: int | None = None  # the smallest block (key-basis detections) that yields key; None: none


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


MU1_RANGE = (0.02, 1.2)
"""Signal intensities the optimiser considers (μ2 lies strictly between μ3 and μ1 − μ3)."""
Z_RANGE = (0.02, 0.995)
"""Key-basis probabilities the optimiser considers: from test-heavy (small blocks) to key-heavy."""
SEARCH_POINTS = 256
"""Quasi-random points of the global stage (a Sobol sequence over the whole box, small p_Z included)."""
REFINED_STARTS = 4
"""Best distinct points of the global stage that Nelder-Mead refines."""
MAX_BLOCK = 10**13
"""Largest block :func:`min_block` considers; beyond it no block yields key."""
BLOCK_PRECISION = 1.01
NO_KEY = 1e3
"""The optimiser's loss where a block yields no key: above −ln(key per pulse) of any key."""
""":func:`min_block` is within 1% above the smallest block that yields key (and always yields key)."""


def _from_unit(model: LinkModel, u: Sequence[float]) -> LinkModel:
    """The model with intensities, probabilities and basis bias from a point of the unit box [0, 1]^5.

    μ3 is the model's; μ1 spans MU1_RANGE, μ2 a fraction of (μ3, μ1 − μ3), p1 a fraction of (0, 1), p2 a
    fraction of what p1 leaves and p_Z spans Z_RANGE: every point meets μ1 > μ2 + μ3 > 2 μ3 and p_k > 0."""
    clipped = [min(max(float(v), 0.0), 1.0) for v in u]
    mu3 = model.intensities[2]
    low = max(MU1_RANGE[0], 3 * mu3)
    mu1 = low + clipped[0] * (MU1_RANGE[1] - low)
    mu2 = mu3 + (0.01 + 0.98 * clipped[1]) * (mu1 - 2 * mu3)
    p1 = 0.01 + 0.98 * clipped[2]
    p2 = (1 - p1) * (0.01 + 0.98 * clipped[3])
    return replace(
        model,
        intensities=(mu1, mu2, mu3),
        intensity_probabilities=(p1, p2, 1 - p1 - p2),
        z_probability=Z_RANGE[0] + clipped[4] * (Z_RANGE[1] - Z_RANGE[0]),
    )


def _to_unit(model: LinkModel) -> list[float]:
    """The point of the unit box whose :func:`_from_unit` is (about) ``model``, clipped to the box."""
    mu1, mu2, mu3 = model.intensities
    p1, p2, _ = model.intensity_probabilities
    low = max(MU1_RANGE[0], 3 * mu3)
    u = [
        (mu1 - low) / (MU1_RANGE[1] - low),
        ((mu2 - mu3) / max(mu1 - 2 * mu3, 1e-12) - 0.01) / 0.98,
        (p1 - 0.01) / 0.98,
        (p2 / max(1 - p1, 1e-12) - 0.01) / 0.98,
        (model.z_probability - Z_RANGE[0]) / (Z_RANGE[1] - Z_RANGE[0]),
    ]
    return [min(max(v, 0.0), 1.0) for v in u]


def unrounded_length(model: LinkModel, km: float, block: int) -> tuple[float, int]:
    """(LCWXZ Eq. 1 before the floor, pulses) for the model's expected counts: negative where a block
    this size yields no key, which tells the optimiser how far it is from key."""
    counts, pulses, _ = expected_counts(model, km, block)
    found = bounds(counts, model.eps_sec)
    return (-math.inf if found is None else unrounded_length_of(counts, found, model.eps_sec)), pulses


def _loss(model: LinkModel, km: float, block: int) -> float:
    """What the optimiser minimises: −ln(key per pulse) where there is key; above any such value where
    there is none, growing with the bits missing (Nelder-Mead only compares values)."""
    value, pulses = unrounded_length(model, km, block)
    if value >= 1:
        return -math.log(value / pulses)
    return NO_KEY + math.log1p(1 - value) if value > -math.inf else math.inf


def _refine(
    model: LinkModel, km: float, block: int, start: Sequence[float], evaluations: int, any_key: bool
) -> tuple[float, list[float]]:
    from scipy.optimize import OptimizeResult, minimize  # noqa: PLC0415 - optional, checked by optimize()

    def stop_at_key(intermediate_result: OptimizeResult) -> None:
        if any_key and intermediate_result.fun < NO_KEY:
            raise StopIteration

    simplex = [list(start)]
    for axis in range(len(start)):  # a simplex a tenth of the box wide, pointing into the box
        vertex = list(start)
        vertex[axis] += 0.1 if vertex[axis] < 0.5 else -0.1
        simplex.append(vertex)
    found = minimize(
        lambda u: _loss(_from_unit(model, u), km, block),
        start,
        method="Nelder-Mead",
        bounds=[(0.0, 1.0)] * len(start),
        options={"initial_simplex": simplex, "xatol": 1e-4, "fatol": 1e-6, "maxfev": evaluations},
        callback=stop_at_key,
    )
    return float(found.fun), [float(v) for v in found.x]


def optimize(
    model: LinkModel,
    km: float,
    block: int,
    *,
    starts: Sequence[LinkModel] = (),
    points: int = SEARCH_POINTS,
    refined: int = REFINED_STARTS,
    evaluations: int = 600,
    any_key: bool = False,
) -> LinkModel:
    """The intensities μ1, μ2 (μ3 kept), their probabilities and the Z-basis bias that maximise the key
    per pulse at this distance and block; ``model`` itself where no parameters yield key.

    Global stage: ``points`` points of a Sobol sequence over the whole parameter box (so small p_Z,
    which small blocks need for their phase-error estimate, is always tried), plus ``model`` and
    ``starts`` (say, the optimum at the previous distance). Local stage: Nelder-Mead (scipy) from the
    ``refined`` best distinct points (``evaluations`` each at most), on −ln(key per pulse) or, where there
    is no key yet, the bits missing (:func:`unrounded_length`). ``any_key``: stop at the first parameters
    that yield key (whether any do is all :func:`min_block` asks). Deterministic: the same arguments give
    the same parameters."""
    try:
        from scipy.stats import qmc  # noqa: PLC0415 - optional
    except ImportError:
        raise InputError("--optimize needs scipy: pip install 'qkdd[keyrate]'") from None
    candidates = [_to_unit(m) for m in (*starts, model) if valid_intensities(m.intensities)]
    candidates += qmc.Sobol(d=5, seed=12345).random(points).tolist()
    scored = sorted((_loss(_from_unit(model, u), km, block), u) for u in candidates)
    chosen: list[list[float]] = []
    for _, u in scored:
        if len(chosen) == refined:
            break
        if all(max(abs(a - b) for a, b in zip(u, c, strict=True)) > 0.1 for c in chosen):
            chosen.append(u)
    best_loss, best = scored[0]
    for u in chosen:
        if any_key and best_loss < NO_KEY:
            break
        loss, found = _refine(model, km, block, u, evaluations, any_key)
        if loss < best_loss:
            best_loss, best = loss, found
    if best_loss >= NO_KEY:
        return model
    start_loss = _loss(model, km, block) if valid_intensities(model.intensities) else math.inf
    return _from_unit(model, best) if best_loss <= start_loss else model


def _threshold(yields: Callable[[int], bool], low: int, high: int) -> int:
    """The smallest block in (low, high] for which ``yields`` holds, within BLOCK_PRECISION (bisection in
    ln(block)); ``yields(high)`` must hold and ``yields(low)`` must not."""
    while high > low * BLOCK_PRECISION and high - low > 1:
        middle = min(high - 1, max(low + 1, round(math.sqrt(low * high))))
        if yields(middle):
            high = middle
        else:
            low = middle
    return high


def min_block(
    model: LinkModel, km: float, *, optimized: bool = False, block: int | None = None
) -> int | None:
    """The smallest block (key-basis detections) that yields key at this distance, within BLOCK_PRECISION
    above the smallest at which the search finds key (the block returned always yields key); None if not
    even MAX_BLOCK does.

    ``optimized``: with parameters searched for each block tried (a small global stage and the
    parameters of the blocks tried so far, stopping at the first that yield key), else with the
    model's own. ``block``: a block that
    ``model`` is known to suit (its optimum, say)."""
    # fewer detections than Eq. 1's fixed costs (the tag and 6 log2(21/ε_sec)) never yield a bit
    floor = max(1, math.floor(6 * math.log2(21 / model.eps_sec) + confirm.TAG_BITS))
    if block is None or unrounded_length(model, km, min(block, MAX_BLOCK))[0] < 1:
        if optimized:
            model = optimize(model, km, MAX_BLOCK)
        block = MAX_BLOCK
        if unrounded_length(model, km, block)[0] < 1:
            return None
    if block <= floor:
        return block

    # with the model's own parameters (cheap), which also bounds the optimised threshold from above
    fixed = _threshold(lambda n: unrounded_length(model, km, n)[0] >= 1, floor, block)
    if not optimized:
        return fixed
    tried = {fixed: model}

    def yields(n: int) -> bool:
        nearest = tried[min(tried, key=lambda m: abs(math.log(m / n)))]
        starts = list(tried.values())
        candidate = optimize(
            nearest, km, n, starts=starts, points=64, refined=2, evaluations=300, any_key=True
        )
        if unrounded_length(candidate, km, n)[0] < 1:
            return False
        tried[n] = candidate
        return True

    # the optimised threshold lies below: step down by factors of ten to bracket it, then bisect
    high, low = fixed, fixed
    while low > floor:
        low = max(floor, low // 10)
        if low == floor or not yields(low):
            break
        high = low
    return _threshold(yields, low, high)


TUNED_BLOCK = 10**6
"""Key-basis detections per frame :func:`tune` aims for at least: finite-size costs are then a small
part of the key, and a round stays a few million detections."""


@dataclass(frozen=True)
class LinkSettings:
    """What a weak-coherent-pulse link sets for its distance (:func:`tune`)."""

    intensities: tuple[float, float, float]  # μ1 > μ2 + μ3, μ3 the model's
    intensity_probabilities: tuple[float, float, float]
    z_probability: float
    pulses_per_frame: int
    key_per_pulse: float  # expected at these settings (0: the link yields no key at this distance)
    min_block: int | None  # the smallest block that yields key (optimised per block)

    def sim_options(self, distance_km: float) -> dict[str, Any]:
        """These settings as ``[link.sim]`` options for a link of ``distance_km`` km."""
        return {
            "distance_km": distance_km,
            "intensities": list(self.intensities),
            "intensity_probabilities": list(self.intensity_probabilities),
            "z_probability": self.z_probability,
            "pulses_per_frame": self.pulses_per_frame,
        }


def _significant(value: float, digits: int = 3) -> float:
    return float(f"{value:.{digits - 1}e}")


def tune(
    model: LinkModel,
    km: float,
    *,
    pulses_per_frame: int | None = None,
    min_pulses: int = 1,
    max_pulses: int = 1 << 40,
) -> LinkSettings:
    """Intensities, their probabilities, the basis bias and the frame size for a link of ``km`` km with
    the hardware of ``model`` (fiber loss, detector efficiency, dark counts, after-pulses, misalignment,
    f_EC, ε_sec; μ3 is kept): the call a link backend makes to choose its own parameters.

    The frame is ``pulses_per_frame`` if given, else the smallest power of two in [min_pulses,
    max_pulses] whose expected key-basis detections reach max(TUNED_BLOCK, 2 · min_block); the other
    settings are optimised (:func:`optimize`) for the block such frames give. Values are rounded to three
    significant digits, so that both ends of a link, each calling this, configure the same source.

    Raises:
        InputError: scipy is missing (``pip install 'qkdd[keyrate]'``).
    """
    smallest = min_block(optimize(model, km, TUNED_BLOCK), km, optimized=True, block=TUNED_BLOCK)
    target = max(TUNED_BLOCK, 2 * (smallest or 0))
    best = optimize(model, km, target)
    for _ in range(2):  # the frame sets the block, and the block the best settings
        per_pulse = best.key_detections_per_pulse(km)
        if pulses_per_frame is not None:
            pulses = pulses_per_frame
        else:
            pulses = 1 << max(0, math.ceil(math.log2(max(target / per_pulse, 1))))
            pulses = min(max(pulses, min_pulses), max_pulses)
        best = optimize(best, km, max(1, round(pulses * per_pulse)))
    mu1, mu2, mu3 = (_significant(mu) for mu in best.intensities)
    p1, p2, _ = (round(p, 3) for p in best.intensity_probabilities)
    rounded = replace(
        best,
        intensities=(mu1, mu2, mu3),
        intensity_probabilities=(p1, p2, round(1 - p1 - p2, 3)),
        z_probability=round(best.z_probability, 3),
    )
    if not valid_intensities(rounded.intensities) or min(rounded.intensity_probabilities) <= 0:
        rounded = best  # rounding broke a condition of the bound: keep the exact values
    block = max(1, round(pulses * rounded.key_detections_per_pulse(km)))
    return LinkSettings(
        intensities=rounded.intensities,
        intensity_probabilities=rounded.intensity_probabilities,
        z_probability=rounded.z_probability,
        pulses_per_frame=pulses,
        key_per_pulse=row(rounded, km, block).key_per_pulse,
        min_block=smallest,
    )


SIM_MAX_PULSES = 1 << 36
"""Longest frame :func:`sim_settings` picks: about a minute of pulses at 1 GHz (the simulator draws only
the detections, but walks the frame in chunks)."""


def sim_settings(
    distance_km: float, *, pulses_per_frame: int | None = None, min_pulses: int = 1
) -> LinkSettings:
    """:func:`tune` for the ``sim`` backend's hardware (its defaults: detector, dark counts, misalignment,
    fiber; no after-pulses; μ3 = 0, its vacuum), with frames of at most SIM_MAX_PULSES."""
    from qkdd.links.sim import SimParameters  # noqa: PLC0415 - the sim's defaults, only when asked

    sim = SimParameters(distance_km=distance_km)
    model = LinkModel(
        fiber_loss_db_per_km=sim.fiber_loss_db_per_km,
        detector_efficiency=sim.detector_efficiency,
        dark_count_probability=sim.dark_count_probability,
        afterpulse_probability=0.0,
        misalignment=sim.misalignment,
        intensities=(0.5, 0.2, 0.0),
    )
    return tune(
        model,
        distance_km,
        pulses_per_frame=pulses_per_frame,
        min_pulses=min_pulses,
        max_pulses=max(min_pulses, SIM_MAX_PULSES),
    )


def sim_options(
    distance_km: float, *, pulses_per_frame: int | None = None, min_pulses: int = 1
) -> dict[str, Any]:
    """``[link.sim]`` options for a link of ``distance_km`` km from :func:`sim_settings` (``qkdd init
    --distance-km``, ``qkdd demo --distance-km``)."""
    settings = sim_settings(distance_km, pulses_per_frame=pulses_per_frame, min_pulses=min_pulses)
    return settings.sim_options(distance_km)


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
    """A row per distance, each with its smallest block that yields key; ``optimize_each``: with the
    parameters optimised at each distance (warm-started from the previous distance's)."""
    out = []
    previous: list[LinkModel] = []
    for km in distances:
        used = optimize(model, km, block, starts=previous) if optimize_each else model
        previous = [used]
        smallest = min_block(used, km, optimized=optimize_each, block=block)
        out.append((replace(row(used, km, block), min_block=smallest), used))
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
        f"{'asymptotic':>11} {'PLOB':>10} {'min block':>10}"
    ]
    for r in rows:
        phase = "-" if r.phase_error is None else f"{100 * r.phase_error:.2f}%"
        smallest = "-" if r.min_block is None else f"{r.min_block:.2e}"
        lines.append(
            f"{r.distance_km:>6.1f} {r.eta:>10.3e} {r.key_per_pulse:>11.3e} {r.key_bps:>11.3e} "
            f"{100 * r.qber:>6.2f}% {phase:>7} {r.asymptotic_per_pulse:>11.3e} {r.plob_per_pulse:>10.3e} "
            f"{smallest:>10}"
        )
    return "\n".join(lines)
