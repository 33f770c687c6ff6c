"""deploy/app_pin.py as a module (deploy/ holds scripts, not a package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_path = Path(__file__).resolve().parents[2] / "deploy" / "app_pin.py"
_spec = importlib.util.spec_from_file_location("app_pin", _path)
assert _spec is not None and _spec.loader is not None
app_pin = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(app_pin)
