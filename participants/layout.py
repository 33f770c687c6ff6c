"""Where each tensor of the actor-critic lives in the flat parameter vector θ.

θ is one float64 vector (so it can be clipped per layer, scaled and encrypted
as one array); :class:`Layout` names its tensors and their shapes, and
:func:`init_params` fills it as CleanRL's ``ppo.py`` initialises its networks
(orthogonal weights, zero biases).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class Layout:
    """Names and shapes of the tensors packed, in order, into a flat ``theta``.

    Weights use the PyTorch convention ``(out_features, in_features)``.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        """Number of elements of each tensor."""
        return tuple(math.prod(shape) for shape in self.shapes)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Start index of each tensor in ``theta``."""
        return tuple(itertools.accumulate(self.sizes[:-1], initial=0))

    @cached_property
    def size(self) -> int:
        """Total number of parameters."""
        return sum(self.sizes)

    def slices(self) -> list[tuple[str, slice]]:
        """Return ``(name, slice)`` pairs locating each tensor in ``theta``."""
        return [
            (name, slice(start, start + n))
            for name, start, n in zip(self.names, self.offsets, self.sizes, strict=True)
        ]

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Return reshaped views (not copies) of ``flat``, keyed by tensor name."""
        if flat.shape != (self.size,):
            raise ValueError(
                f"expected a flat vector of shape ({self.size},), got {flat.shape}"
            )
        return {
            name: flat[sl].reshape(shape)
            for (name, sl), shape in zip(self.slices(), self.shapes, strict=True)
        }


def make_layout(
    obs_dim: int, act_dim: int, continuous: bool, hidden: tuple[int, ...] = (64, 64)
) -> Layout:
    """Build the layout of an actor-critic with ``len(hidden)`` tanh layers each.

    Parameters
    ----------
    obs_dim : int
        Observation size.
    act_dim : int
        Number of discrete actions, or the action dimension if ``continuous``.
    continuous : bool
        Gaussian head (adds ``actor.logstd``) instead of a categorical one.
    hidden : tuple of int, default (64, 64)
        Hidden layer widths, shared by actor and critic.

    Returns
    -------
    Layout
        Actor tensors, then critic tensors, then ``actor.logstd`` if continuous.
    """
    names: list[str] = []
    shapes: list[tuple[int, ...]] = []
    for net, out_dim in (("actor", act_dim), ("critic", 1)):
        dims = [obs_dim, *hidden, out_dim]
        for j in range(len(dims) - 1):
            names += [f"{net}.{j}.weight", f"{net}.{j}.bias"]
            shapes += [(dims[j + 1], dims[j]), (dims[j + 1],)]
    if continuous:
        names.append("actor.logstd")
        shapes.append((act_dim,))
    return Layout(tuple(names), tuple(shapes))


def _orthogonal(
    shape: tuple[int, ...], gain: float, rng: np.random.Generator
) -> np.ndarray:
    """Orthogonal matrix as in ``torch.nn.init.orthogonal_`` (QR of a Gaussian)."""
    rows, cols = shape
    flat = rng.standard_normal((rows, cols))
    if rows < cols:
        flat = flat.T
    q, r = np.linalg.qr(flat)
    q *= np.sign(np.diag(r))
    if rows < cols:
        q = q.T
    return gain * q


def init_params(layout: Layout, rng: np.random.Generator) -> np.ndarray:
    """Initialise ``theta``: orthogonal weights, zero biases, zero ``logstd``.

    Gains are ``sqrt(2)`` for hidden layers, 0.01 for the actor output layer and
    1.0 for the critic output layer.
    """
    theta = np.zeros(layout.size)
    views = layout.views(theta)
    last = {
        net: max(
            int(n.split(".")[1])
            for n in layout.names
            if n.startswith(net + ".") and n.endswith(".weight")
        )
        for net in ("actor", "critic")
    }
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        if not name.endswith(".weight"):
            continue
        net, index = name.split(".")[0], int(name.split(".")[1])
        if index < last[net]:
            gain = float(np.sqrt(2.0))
        else:
            gain = 0.01 if net == "actor" else 1.0
        views[name][...] = _orthogonal(shape, gain, rng)
    return theta
