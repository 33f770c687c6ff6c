"""Flower ServerApp entry point of the hedrl coordinator."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from coordinator.federation import Federation
from coordinator.launch import check_env_id
from protocol.config import RunConfig

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run one encrypted (or plaintext-twin) federation."""
    cfg = RunConfig.from_mapping(dict(context.run_config))
    check_env_id(cfg.env_id)  # before any participant is asked for anything
    Federation(grid, cfg, context.run_id).run()
