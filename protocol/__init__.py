"""What participants and coordinator agree on: parameter sets, keys, wire format.

Exactly one module here, :mod:`protocol.ckks`, imports ``tenseal``; the rest is
plain Python and numpy so that the plaintext twin and the tests of the wire
format need no cryptography at all.
"""

PROTOCOL_VERSION = 2
"""2: m, V, r travel in the units of :class:`protocol.adam.StateUnits`, m and V
one level below the top (``StateUnits.levels``)."""
