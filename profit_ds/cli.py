"""The `profit-ds` command line: a Typer app whose commands live in `profit_ds.commands.*`.

Errors the user can fix (`UsageError`) become one line on stderr and exit code 2; `--debug`
(or PROFIT_DS_DEBUG=1) shows the traceback instead.
"""
from __future__ import annotations

import os
import sys

import typer

from profit_ds.errors import UsageError, explain

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Federated prompt tuning benchmark (Profit) on a frozen ZeRO-3 backbone.")


def _register() -> None:
    """Import command modules; each decorates its function onto `app`."""
    from profit_ds.commands import (bench, data, export, models, personalize, plan,  # noqa: F401
                                    report, run, score, sweep)


def quiet_libraries() -> None:
    """Keep library chatter (DeepSpeed's accelerator guess and INFO logs, deprecation
    warnings) out of the terminal, so progress, tables and one-line errors stay readable."""
    import logging
    import warnings

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skips the "no GPU found" warning
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("DeepSpeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main() -> None:
    """Console entry point: run the app, mapping UsageError to a one-line error and exit 2."""
    debug = "--debug" in sys.argv or os.environ.get("PROFIT_DS_DEBUG") == "1"
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
    quiet_libraries()
    _register()
    try:
        # without standalone mode, click returns a command's typer.Exit code instead of exiting
        code = app(standalone_mode=False)
    except UsageError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (typer.Exit, SystemExit) as stop:
        code = getattr(stop, "exit_code", getattr(stop, "code", 0))
        sys.exit(code)
    except Exception as err:  # click usage errors arrive here in standalone_mode=False
        import click
        message = explain(err)
        if message and not debug:
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)
        if isinstance(err, click.ClickException) and not debug:
            err.show()
            sys.exit(2)
        if isinstance(err, click.exceptions.Abort):
            print("aborted", file=sys.stderr)
            sys.exit(130)
        raise
    if isinstance(code, int) and code:
        sys.exit(code)
