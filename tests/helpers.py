"""Shared test helpers; tolerances come from protocol.tolerance (parameter set)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from protocol import keys
from protocol.adam import AdamHyper
from protocol.backend import Backend, Ct
from protocol.params import ParamSet, get_param_set
from protocol.tolerance import ckks_abs_tol, ckks_theta_rel_tol
from protocol.wire import Expect

if TYPE_CHECKING:
    from coordinator.federation import Federation


def ckks_circuit_tol(ps) -> float:  # noqa: ANN001
    """Relative θ-displacement tolerance of the HE-Adam circuit (parameter set)."""
    return ckks_theta_rel_tol(ps)


def assert_close(
    actual: np.ndarray, expected: np.ndarray, atol: float, what: str
) -> None:
    """Max-abs comparison with a message naming what was compared."""
    err = float(np.max(np.abs(np.asarray(actual) - np.asarray(expected))))
    assert err <= atol, f"{what}: max abs error {err:.3e} > tolerance {atol:.3e}"


def put_vector_arrays(rd: Any, key: str, data: bytes, lengths: list[int]) -> None:
    """Replace vector ``key``'s chunk data and lengths (its header stays): the
    protocol-3 layout written by hand, for tampering."""
    from flwr.app import Array, ArrayRecord

    rd[key] = ArrayRecord(
        {
            "data": Array(dtype="uint8", shape=(len(data),), stype="raw", data=data),
            "lengths": Array(
                dtype="uint32",
                shape=(len(lengths),),
                stype="raw",
                data=np.array(lengths, dtype="<u4").tobytes(),
            ),
        }
    )


def wire_expect(
    ps: ParamSet,
    fingerprint: str,
    backend: str = "ckks",
    kind: str = "gradient",
    level: int | None = None,
    **fields: Any,
) -> Expect:
    """An Expect for parameter set ``ps`` and key ``fingerprint``.

    Defaults: run 1, one chunk, round 1, layout digest "ab"*32, level ps.depth;
    ``fields`` override any Expect field.
    """
    base: dict[str, Any] = dict(
        param_set=ps.id,
        fingerprint=fingerprint,
        backend=backend,
        run_id=1,
        layout_digest="ab" * 32,
        slot_count=ps.slots,
        chunk_count=1,
        kind=kind,
        level=ps.depth if level is None else level,
        round=1,
    )
    base.update(fields)
    return Expect(**base)


def local_raw(tmp: Path, **overrides: Any) -> dict[str, Any]:
    """Run config of an in-process (LocalGrid) run: results and keys under ``tmp``.

    ``overrides`` are run-config keys (kebab-case: ``**{"num-rounds": 3}``).
    """
    return {
        "results-dir": str(tmp / "results"),
        "keys-dir": str(tmp / "keys"),
        "node-wait": 5.0,
        **overrides,
    }


def local_key_file(tmp: Path, run_id: int) -> Path:
    """The participant's secret context written for run ``run_id`` of local_raw(tmp)."""
    return tmp / "keys" / f"run-{run_id}" / "participant.ctx"


def local_federation(
    raw: dict[str, Any],
    run_id: int,
    on_round: Callable[[int, Federation], None] | None = None,
    **grid_kw: Any,
) -> Federation:
    """A Federation over a LocalGrid of raw["num-participants"] in-process nodes.

    ``grid_kw`` go to LocalGrid (tamper, tamper_request, node_configs); the grid
    is ``fed.grid``. Not run yet.
    """
    from benchmarks.local_grid import LocalGrid
    from coordinator.federation import Federation
    from protocol.config import RunConfig

    grid = LocalGrid(run_id, raw, raw["num-participants"], **grid_kw)
    return Federation(grid, RunConfig.from_mapping(raw), run_id, on_round=on_round)


def metrics_rows(fed: Federation) -> list[dict[str, Any]]:
    """The rows of a finished run's metrics.jsonl, one per round."""
    text = (fed.out_dir / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def decrypt_chunks(
    part: Backend, chunks: Iterable[bytes], count: int, level: int = 0
) -> np.ndarray:
    """The first ``count`` values of a chunked vector at ``level`` (θ's, the
    bottom, by default), decrypted by ``part``."""
    return np.concatenate([part.decrypt(c, level=level) for c in chunks])[:count]


def decrypt_theta(fed: Federation, key_file: Path, backend: str) -> np.ndarray:
    """The federation's current θ, decrypted with the participant's 8k-35x3 key."""
    part, _ = keys.participant_backend(key_file, get_param_set("8k-35x3"), backend)
    return decrypt_chunks(
        part, [fed.be.to_bytes(c) for c in fed.theta], fed.param_count
    )


__all__ = [
    "assert_close",
    "ckks_abs_tol",
    "ckks_circuit_tol",
    "decrypt_chunks",
    "decrypt_theta",
    "local_federation",
    "local_key_file",
    "local_raw",
    "metrics_rows",
    "wire_expect",
]


def plain_step_inputs(
    ps: ParamSet, plain: Backend, n: int = 3, replies: int = 4
) -> tuple[tuple[Any, ...], list[list[np.ndarray]]]:
    """Serialised twin chunks for one step of ``n`` chunks — θ (bottom), the
    refreshed (m, V, r) and ``replies`` gradients (top) — with unmasking masks:
    (the arguments of ``step_chunks``, masks for the next refresher)."""
    rng = np.random.default_rng(0)
    top = ps.depth

    def chunk(level: int, lo: float = -1.0, hi: float = 1.0) -> bytes:
        return plain.dump(Ct(rng.uniform(lo, hi, ps.slots), level))

    theta = [chunk(0) for _ in range(n)]
    state = [
        (chunk(top), chunk(top, 0.01, 0.1), chunk(top, 3.0, 10.0)) for _ in range(n)
    ]
    masks = [[rng.uniform(-1, 1, ps.slots) for _ in range(3)] for _ in range(n)]
    nxt = [[rng.uniform(-9, 9, ps.slots) for _ in range(3)] for _ in range(n)]
    grads = [[chunk(top, -0.01, 0.01) for _ in range(replies)] for _ in range(n)]
    return (theta, state, top, masks, grads, 5, AdamHyper()), nxt
