"""What the coordinator relays with every θ: the steps to it and the sealed updates.

Participants act only on the twin they replay from these (participants/twin.py,
protocol/relay.py); the coordinator cannot read the sealed updates, only store
and forward them. It keeps every step's parent and chain hash, and the sealed
updates of recent steps. A participant that last replayed step s (with the
chain hash this store has for s) gets the steps of θ's chain after the newest
one it shares with s's chain; one whose step it does not know (another run's)
gets the chain from θ0.
"""

from __future__ import annotations

from collections.abc import Iterable

from protocol.ledger import Entry
from protocol.relay import ROOT_HASH, Relay, entry_hash

#: sealed updates are kept for this many steps back from the newest
KEEP_STEPS = 64


class RelayStore:
    """Steps by number: parent, chain hash, entry, and recent sealed updates."""

    def __init__(self, entries: Iterable[Entry] = ()) -> None:
        """``entries``: the steps of a resumed run's ledger, in order (no
        sealed updates: participants replayed them when they ran)."""
        self.hash: dict[int, str] = {0: ROOT_HASH}
        self.entry: dict[int, Entry] = {}
        self.sealed: dict[int, dict[tuple[int, int], bytes]] = {}
        for e in entries:
            self.add(e, {})

    def add(self, entry: Entry, sealed: dict[tuple[int, int], bytes]) -> None:
        """A completed step and the sealed updates it uses, by (index, round)."""
        self.entry[entry.step] = entry
        self.hash[entry.step] = entry_hash(self.hash[entry.parent], entry)
        self.sealed[entry.step] = sealed
        for step in [s for s in self.sealed if s <= entry.step - KEEP_STEPS]:
            del self.sealed[step]

    def relay(self, head: int, replayed: tuple[int, str]) -> Relay:
        """For θ = step ``head``'s output, to a participant that last replayed
        ``replayed`` = (step, chain hash): the steps after the newest one both
        chains share (θ0 if this store does not know the participant's step)."""
        step, hash_ = replayed
        other = step if self.hash.get(step) == hash_ else 0
        after: list[int] = []
        at = head
        while at != other:  # walk the later of the two back (parents come first)
            if at > other:
                after.append(at)
                at = self.entry[at].parent
            else:
                other = self.entry[other].parent
        after.reverse()
        sealed: dict[tuple[int, int], bytes] = {}
        for s in after:
            sealed.update(self.sealed.get(s, {}))
        return Relay(
            at,
            self.hash[at],
            head,
            self.hash[head],
            [self.entry[s] for s in after],
            sealed,
        )
