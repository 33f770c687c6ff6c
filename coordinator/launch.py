"""``hedrl run``: a simulated federation on this machine, with an exit status.

``flwr run .`` keeps working; this wraps it for people and scripts:

1. the run config (the app's defaults, then ``--preset``, then ``key=value``
   pairs) is checked before anything starts: unknown keys, values out of
   range, an env id gymnasium does not know, fewer SuperNodes than
   participants each end it with one line naming the fix;
2. it starts its own ``flower-superlink --simulation`` on free ports (so two
   runs on one machine never share one) and stops it by PID at the end;
3. it submits the run (``flwr run --format json`` gives the run id), prints
   the run's hedrl lines (``flwr log --stream``; ``--verbose``: every line),
   reads the final status (``flwr ls --run-id … --format json``) and exits 0
   only if the run completed; otherwise it prints the run's first hedrl error
   line. Ctrl-C stops the run (``flwr stop``) before it stops the SuperLink.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import shutil
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from coordinator.local_flwr import (
    LaunchError,
    flwr,
    follow,
    json_out,
    local_superlink,
    status,
)
from protocol import hedrl_version
from protocol.config import RunConfig
from protocol.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
#: where ``--preset NAME`` looks, in this order
PRESET_DIRS = (REPO / "deploy" / "presets", REPO / "benchmarks" / "presets")


# ---- the run config ---------------------------------------------------------------
def app_defaults(app: Path) -> dict[str, Any]:
    """The app's ``[tool.flwr.app.config]``."""
    path = app / "pyproject.toml"
    try:
        return tomllib.loads(path.read_text())["tool"]["flwr"]["app"]["config"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise LaunchError(
            f"{app} is not the hedrl app (no [tool.flwr.app.config] in {path}: "
            f"{exc}); run from a clone of hedrl or pass --app DIR"
        ) from None


def preset_path(name: str) -> Path:
    """A preset file: a path, or a name in benchmarks/presets or deploy/presets."""
    path = Path(name).expanduser()
    if path.suffix == ".toml" and path.is_file():
        return path
    for folder in PRESET_DIRS:
        if (folder / f"{name}.toml").is_file():
            return folder / f"{name}.toml"
    known = sorted({p.stem for d in PRESET_DIRS for p in d.glob("*.toml")})
    raise LaunchError(
        f"--preset {name!r}: no such file or preset; presets: {', '.join(known)}"
    )


def parse_pairs(items: list[str]) -> dict[str, Any]:
    """``key=value`` arguments: TOML values, bare words taken as strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise LaunchError(f"{item!r}: expected key=value, e.g. num-rounds=50")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text  # env-id=CartPole-v1 without quotes
        out[key.strip()] = value
    return out


def merged_config(
    defaults: dict[str, Any], preset: dict[str, Any], pairs: dict[str, Any]
) -> dict[str, Any]:
    """The overrides (preset, then pairs), checked against the app's keys and
    their types; integers are accepted where a float is declared."""
    overrides = {**preset, **pairs}
    for key, value in overrides.items():
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise LaunchError(
                f"unknown run-config key {key!r}{hint} (docs/configuration.md)"
            )
        want = type(defaults[key])
        if want is float and type(value) is int:
            overrides[key] = float(value)
        elif type(value) is not want:
            raise LaunchError(
                f"{key}={value!r}: expected a {want.__name__} "
                f"(default {defaults[key]!r})"
            )
    return overrides


def check_env_id(env_id: str) -> None:
    """ConfigError unless gymnasium's registry knows ``env_id`` (with the
    closest id it knows)."""
    import gymnasium

    try:
        gymnasium.spec(env_id)
    except gymnasium.error.Error:
        close = difflib.get_close_matches(env_id, list(gymnasium.registry), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"env-id {env_id!r} is not a registered gymnasium environment; "
            f"{hint}(python -c 'import gymnasium; gymnasium.pprint_registry()')"
        ) from None


def check_config(defaults: dict[str, Any], overrides: dict[str, Any]) -> RunConfig:
    """RunConfig's own checks and the env id against gymnasium's registry."""
    try:
        cfg = RunConfig.from_mapping({**defaults, **overrides})
        check_env_id(cfg.env_id)
    except ConfigError as exc:
        raise LaunchError(str(exc)) from None
    return cfg


def toml_value(value: Any) -> str:
    """One value as TOML (bool, int, float or string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    # JSON's escapes are TOML basic-string escapes; non-ASCII stays literal
    # (TOML has no surrogate-pair escapes)
    return json.dumps(str(value), ensure_ascii=False)


def write_config(path: Path, overrides: dict[str, Any]) -> Path:
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in overrides.items()))
    return path


def run(args: argparse.Namespace) -> int:
    app = Path(args.app).resolve() if args.app else REPO
    defaults = app_defaults(app)
    preset = tomllib.loads(preset_path(args.preset).read_text()) if args.preset else {}
    overrides = merged_config(defaults, preset, parse_pairs(args.overrides))
    cfg = check_config(defaults, overrides)
    nodes = args.supernodes or cfg.num_participants
    if nodes < cfg.num_participants:
        raise LaunchError(
            f"--supernodes {nodes} < num-participants {cfg.num_participants}: "
            f"pass --supernodes {cfg.num_participants} or num-participants={nodes}"
        )
    if shutil.which("flwr") is None or shutil.which("flower-superlink") is None:
        raise LaunchError("flwr and flower-superlink not on PATH: pip install hedrl")
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    federation = f"num-supernodes={nodes} client-resources-num-cpus={args.cpus}"
    with tempfile.TemporaryDirectory(prefix="hedrl-run-") as tmp:
        work = Path(tmp)
        config = write_config(work / "run-config.toml", overrides)
        with local_superlink(work, env) as fenv:
            started = json_out(
                flwr(
                    [
                        "run",
                        str(app),
                        "--run-config",
                        str(config),
                        "--federation-config",
                        federation,
                        "--format",
                        "json",
                    ],
                    fenv,
                )
            )
            if not started.get("success") or not started.get("run-id"):
                why = str(started.get("error-message", started)).strip()
                raise LaunchError(f"flwr run refused the run: {why.splitlines()[-1]}")
            run_id = str(started["run-id"])
            print(
                f"hedrl run: run {run_id}, {cfg.env_id}, {nodes} participants",
                flush=True,
            )
            try:
                error, results = follow(run_id, fenv, args.verbose)
                st, details = status(run_id, fenv)
            except KeyboardInterrupt:
                print(f"hedrl run: stopping run {run_id}", file=sys.stderr)
                flwr(["stop", run_id], fenv, timeout=30)
                return 130
    if st == "finished:completed":
        where = results or cfg.results_dir
        print(f"hedrl run: run {run_id} completed; results in {where}")
        return 0
    why = error or (details.strip().splitlines() or [st])[-1]
    print(f"hedrl run: run {run_id} {st}: {why}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="hedrl",
        description="Federated deep RL with a keyless coordinator (hedrl).",
    )
    ap.add_argument("--version", action="version", version=f"hedrl {hedrl_version()}")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "run",
        help="run a simulated federation on this machine",
        description=(
            "Run a simulated federation on this machine: its own local SuperLink "
            "on free ports, one SuperNode per participant, the run's hedrl lines "
            "as they come, exit status 0 only if the run completed. Example: "
            "hedrl run --preset cartpole-delta num-rounds=60 seed=3"
        ),
    )
    r.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="run-config values (TOML: lr=0.001 anneal-lr=true env-id='Acrobot-v1'); "
        "they override the preset's",
    )
    r.add_argument(
        "--preset",
        default="",
        help="a preset name (deploy/presets, then benchmarks/presets) or a "
        ".toml file of run-config keys",
    )
    r.add_argument(
        "--supernodes",
        type=int,
        default=0,
        help="simulated SuperNodes (default: num-participants)",
    )
    r.add_argument("--cpus", type=int, default=1, help="CPUs per simulated participant")
    r.add_argument(
        "--app", default="", help="the hedrl app directory (default: this checkout)"
    )
    r.add_argument(
        "--verbose", action="store_true", help="print Flower's and Ray's lines too"
    )
    args = ap.parse_args(argv)
    try:
        return run(args)
    except LaunchError as exc:
        print(f"hedrl run: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
