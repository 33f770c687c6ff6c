"""What participants and coordinator agree on: parameter sets, keys, wire format.

Exactly one module here, :mod:`protocol.ckks`, imports ``tenseal``; the rest is
plain Python and numpy so that the plaintext twin and the tests of the wire
format need no cryptography at all.
"""

PROTOCOL_VERSION = 4
"""2: m, V, r travel in the units of :class:`protocol.adam.StateUnits`, m and V
one level below the top (``StateUnits.levels``). 3: a vector's chunks travel in
one raw Array with their lengths beside it, not one Array per chunk
(:mod:`protocol.records`). 4: the fingerprint covers the relinearisation keys
(participant.ctx stores them)."""

STATE_UNITS_VERSION = 2
"""The first protocol version whose m, V, r are in :class:`protocol.adam.StateUnits`
(a checkpoint's state from before it cannot be resumed)."""


def hedrl_version() -> str:
    """The installed hedrl's version (``--version`` of every console script)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hedrl")
    except PackageNotFoundError:
        return "unknown (not installed)"
