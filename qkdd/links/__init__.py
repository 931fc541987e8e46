"""Quantum-link backends: the interface each side of the link offers, and the registry.

A backend is a factory ``open_link(role, options) -> AliceLink | BobLink`` registered under the entry
point group ``qkdd.links`` (a vendor's package adds hardware this way without touching qkdd); the
built-in ``sim`` is also registered here directly, so it works from a source checkout. A backend object
may also offer ``warm_up()``: the daemon calls it on a worker thread at start, while the first connection
is set up, so that whatever it loads or compiles is not paid inside the first round.

Work scales with detections, not pulses: Bob's side reports only detected pulses, and Alice's side is
asked for what she prepared at given pulse indices (:class:`qkdd.stages.sifting.Preparation`).

A weak-coherent-pulse backend chooses its source's settings for its distance with
:func:`qkdd.keyrate.tune`: given a :class:`qkdd.keyrate.LinkModel` of its hardware (fiber loss, detector
efficiency, dark counts, after-pulses, misalignment) and the link's length, it returns the intensities,
their probabilities, the basis bias and a frame size from ``qkdd keyrate``'s optimiser, the same at both
ends (it needs scipy). ``qkdd init --distance-km`` does this for ``sim``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

from qkdd.errors import InputError
from qkdd.stages.sifting import Detections, Preparation

ENTRY_POINT_GROUP = "qkdd.links"
BUILTIN = {"sim": "qkdd.links.sim:open_link"}


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """What a backend declares about its source."""

    name: str
    pulses_per_frame: int
    # mean photon number of each intensity class (weak coherent pulses); empty for a single-photon source
    intensities: tuple[float, ...] = ()
    intensity_probabilities: tuple[float, ...] = ()


@runtime_checkable
class AliceLink(Protocol):
    info: LinkInfo

    def preparation(self, frame: int) -> Preparation:
        """Alice's record of frame ``frame``: what she sent at any pulse index."""
        ...


@runtime_checkable
class BobLink(Protocol):
    info: LinkInfo

    def detections(self, frame: int) -> Detections:
        """Bob's detections in frame ``frame``."""
        ...


LinkFactory = Callable[[str, Mapping[str, Any]], AliceLink | BobLink]


def available() -> dict[str, str]:
    """Backend name -> ``module:attribute`` of its factory."""
    found = dict(BUILTIN)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry.name, entry.value)
    return found


def open_link(name: str, role: str, options: Mapping[str, Any]) -> AliceLink | BobLink:
    """Open backend ``name`` for ``role`` with its ``[link.<name>]`` options."""
    backends = available()
    if name not in backends:
        raise InputError(f"link.backend: unknown backend {name!r}; available: {', '.join(sorted(backends))}")
    module_name, _, attribute = backends[name].partition(":")
    factory: LinkFactory = getattr(importlib.import_module(module_name), attribute)
    link = factory(role, options)
    expected = AliceLink if role == "alice" else BobLink
    if not isinstance(link, expected):
        raise InputError(f"link.backend: {name!r} did not return a {expected.__name__} for role {role}")
    return link
