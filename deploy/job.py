"""Ray job entrypoint: run the hookray engine (``hookray run``) as a Ray job.

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"REDIS_URL": "redis://redis.internal:6379/0",
                                          "RAY_JOB_STOP_WAIT_TIME_S": "30"}}' \\
        -- python deploy/job.py --config deploy/main.json \\
        [--hooks deploy/hooks.example.json] [--duration SECONDS] [--report-sec SECONDS]

(deploy/main.json leaves REDIS_URL empty: the job needs a Redis every node reaches.)

Ray copies the working dir to the cluster and runs this file from there. The repo
root (the parent of ``deploy/``) is put first on ``sys.path`` so that the driver runs
the very code that was submitted (the actors get the same working dir from the job's
runtime_env). Everything else is ``actors.cli.cmd_run``, unchanged (options of
``hookray run`` not listed here, e.g. ``--api-port``, are passed on as they are):

* settings come from ``--config`` plus environment overrides. Inside a Ray job Ray
  sets ``RAY_ADDRESS`` to the cluster's GCS address, which is also a settings key, so
  the engine joins the job's own cluster (never a new local Ray). Ray finds that
  address by looking for a running Ray on the node: with several independent Rays on
  one machine (parallel test sessions) it may name another one; ``--ray-address``
  then pins the cluster;
* ``--hooks`` files: each hook is created unless a file created it before (deleted or
  renamed since, it is not created again: ``hookray hooks file-records``) or its
  account has one of that name already (left as it is);
* ``ray job stop`` sends SIGTERM: the run loop ends, the actors are stopped and the
  job ends as STOPPED. Ray force-kills the job ``RAY_JOB_STOP_WAIT_TIME_S`` (default
  3) seconds after the signal, and the engine's shutdown takes up to 20 s (the retry
  worker takes its hand-overs back, transports close): set it to 30 through the job's
  runtime_env ``env_vars``, as above (a warning says so when it is lower; the actors
  die with the driver in any case);
* ``--duration 0`` runs until the job is stopped; with a duration the job ends as
  SUCCEEDED when it is over, after a last progress line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _use_repo_root() -> None:
    """Make the packages next to this file importable, ahead of any installed copy."""
    root = str(ROOT)
    if (ROOT / "engine" / "__init__.py").is_file() and root not in sys.path:
        sys.path.insert(0, root)


def _parser() -> argparse.ArgumentParser:
    # the option types of `hookray run`, this file's own copy of it: a bad value is
    # refused in the same words ("argument --duration: expected a number of seconds,
    # got 'abc'"), naming the option, before anything starts
    _use_repo_root()
    from actors.cli import non_negative_seconds, positive_seconds

    p = argparse.ArgumentParser(
        prog="deploy/job.py",
        description="Run the hookray engine as a Ray job (the same as `hookray run`).",
        epilog="Other options of `hookray run` (e.g. --api-port PORT) are passed on.")
    p.add_argument("--config", "-c", metavar="MAIN_JSON",
                   default=os.environ.get("HOOKRAY_CONFIG") or None,
                   help="settings file, relative to the job's working dir (default: "
                   "$HOOKRAY_CONFIG, else built-in defaults); environment variables "
                   "override it")
    p.add_argument("--hooks", nargs="+", default=[], metavar="FILE",
                   help="hook JSON files (object or array) to create at start")
    p.add_argument("--duration", type=non_negative_seconds, default=0.0, metavar="SECONDS",
                   help="stop after this long (0: run until the job is stopped)")
    p.add_argument("--report-sec", type=positive_seconds, default=10.0, metavar="SECONDS",
                   help="interval of the progress lines")
    p.add_argument("--ray-address", metavar="HOST:PORT",
                   help="Ray cluster to join (default: inside a Ray job the job's cluster, "
                   "from Ray's RAY_ADDRESS; else RAY_ADDRESS of the settings, else a local Ray)")
    return p


def run_argv(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The ``hookray`` command line equivalent to this job's arguments; options this
    parser does not know go to ``hookray run`` as they are (it rejects unknown ones)."""
    argv = ["--config", args.config] if args.config is not None else []
    argv += ["run", "--duration", str(args.duration), "--report-sec", str(args.report_sec)]
    if args.ray_address:
        argv += ["--ray-address", args.ray_address]
    argv += extra
    if args.hooks:
        argv += ["--hooks", *args.hooks]
    return argv


# the engine's shutdown (actors.driver.STOP_SEC) and a margin for the driver's own end
STOP_WAIT_NEEDED_SEC = 25


def stop_wait_warning(env: dict[str, str] | os._Environ[str]) -> str | None:
    """What to say of the job's RAY_JOB_STOP_WAIT_TIME_S, or None: `ray job stop`
    SIGKILLs the driver that long after its SIGTERM (default 3 s), cutting the engine's
    shutdown short (hand-overs not taken back, connections not closed)."""
    raw = env.get("RAY_JOB_STOP_WAIT_TIME_S")
    try:
        wait = int(raw) if raw is not None else 3  # as Ray reads it: "30.5", "" fail
    except ValueError:
        return (f"deploy/job.py: warning: RAY_JOB_STOP_WAIT_TIME_S is {raw!r}, not a whole "
                f"number of seconds: Ray cannot read it when the job is stopped; set it to "
                f"30 in the job's runtime_env env_vars")
    if wait >= STOP_WAIT_NEEDED_SEC:
        return None
    shown = raw if raw is not None else "not set (3 s)"
    return (f"deploy/job.py: warning: RAY_JOB_STOP_WAIT_TIME_S is {shown}: "
            f"`ray job stop` kills this job before its shutdown (up to 20 s) ends; set it "
            f"to 30 in the job's runtime_env env_vars")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    import actors.cli
    from actors.cli import _parser as hookray_parser
    from actors.cli import main as hookray_main

    actors.cli.STOP_HINT = "`ray job stop JOB_ID` stops"  # no terminal to press Ctrl-C in

    hookray_argv = run_argv(args, extra)
    _, unknown = hookray_parser().parse_known_args(hookray_argv)
    if unknown:  # refused by this file's parser, with its usage, not by `hookray`'s
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (known: the options "
                     "above and those of `hookray run`, e.g. --api-port)")
    if (said := stop_wait_warning(os.environ)) is not None:
        print(said, file=sys.stderr, flush=True)
    return hookray_main(hookray_argv)


if __name__ == "__main__":
    sys.exit(main())
