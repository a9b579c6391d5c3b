"""The `profit-ds` command line: a Typer app whose commands live in `profit_ds.commands.*`.

Every usage error, ours (`UsageError`) or the parser's (an unknown option or command, a value
of the wrong type, a missing argument), becomes one line on stderr and exit code 2; `--debug`
(or PROFIT_DS_DEBUG=1) shows the traceback instead.

Start-up is kept cheap: command modules import torch, transformers and DeepSpeed only inside
the commands, so `profit-ds --help` or a typo costs less than importing torch.
"""
from __future__ import annotations

import functools
import inspect
import os
import sys
import typing
import warnings
from typing import Any, Callable, Optional, Sequence

import typer

from profit_ds import stops
from profit_ds.memory import bound_native_caches
from profit_ds.config import (FIELDS, LORA_DEFAULTS, REAL_MODEL_DEFAULTS, field_default,
                              field_type)
from profit_ds.errors import Terminated, UsageError, explain

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Federated prompt tuning benchmark (Profit) on a frozen ZeRO-3 backbone.")


def _register() -> None:
    """Import command modules; each decorates its function onto `app`."""
    from profit_ds.commands import (bench, data, export, models, personalize, plan,  # noqa: F401
                                    report, run, score, sweep)


def config_options(names: Sequence[str]) -> Callable[[Callable], Callable]:
    """Give a command one flag per RunConfig field in `names` (`--num-clients` for
    `num_clients`), with the field's help and default, so a default is written once (in
    config.py) and `--help` shows it.

    Every flag defaults to None, meaning "not given": `config.resolve` then layers defaults,
    a `--config` file and the flags given. The command receives them as `overrides`, a dict of
    field name to value (list fields parsed from comma-separated text), next to its own
    parameters.
    """
    def decorate(command: Callable) -> Callable:
        hints = typing.get_type_hints(command)  # in the command's module, not this one
        own = [p.replace(annotation=hints[p.name], kind=inspect.Parameter.KEYWORD_ONLY)
               for p in inspect.signature(command).parameters.values() if p.name != "overrides"]
        generated, annotations = [], {}
        for name in names:
            kind = field_type(name)
            default = field_default(name)
            flag = "--" + name.replace("_", "-")
            text = FIELDS[name].metadata["help"]
            if kind is not bool and default is not None:
                text += f" (default: {_shown(default)}"
                if name in REAL_MODEL_DEFAULTS:
                    text += f"; {_shown(REAL_MODEL_DEFAULTS[name])} for a pretrained --model"
                if name in LORA_DEFAULTS["builtin"]:
                    text += (f"; with --adapter lora {_shown(LORA_DEFAULTS['builtin'][name])}, "
                             f"{_shown(LORA_DEFAULTS['pretrained'][name])} pretrained")
                text += ")"
            # a flag that defaults to "decide for me" (None) can also be turned off
            flags = [f"{flag}/--no-{flag[2:]}"] if kind is bool and default is None else [flag]
            info = typer.Option(None, *flags, help=text, show_default=False)
            cli_type = Optional[str if kind not in (int, float, bool) else kind]
            generated.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                               default=info, annotation=cli_type))
            annotations[name] = cli_type

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            flags = {n: _parse_flag(n, kwargs.pop(n)) for n in names}
            return command(overrides=flags, **kwargs)

        wrapper.__signature__ = inspect.Signature(generated + own)
        wrapper.__annotations__ = {**annotations,
                                   **{p.name: p.annotation for p in own}}
        del wrapper.__wrapped__  # Typer must read the generated signature, not the original
        return wrapper

    return decorate


def _shown(value: Any) -> str:
    """A default as --help shows it: 0.1667, 1,30,300, fp32."""
    if isinstance(value, list):
        return ",".join(f"{x:g}" for x in value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _parse_flag(name: str, value: Any) -> Any:
    """A flag's value as its RunConfig field takes it: list fields from '1,30,300'."""
    if value is None or field_type(name) != list[float]:
        return value
    try:
        return [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        flag = "--" + name.replace("_", "-")
        raise UsageError(f"{flag} {value}: expected comma-separated numbers") from None


def quiet_libraries() -> None:
    """Keep deprecation warnings out of the terminal, so progress, tables and one-line errors
    stay readable (DeepSpeed's own chatter: `model.ds_config.import_deepspeed`)."""
    warnings.filterwarnings("ignore", category=FutureWarning)


def _launcher_rank(argv: list[str]) -> list[str]:
    """`argv` without DeepSpeed's launcher argument `--local_rank=N` (or `--local_rank N`),
    which it appends to every rank's command line; the rank is kept in LOCAL_RANK, where the
    launcher also puts it."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--local_rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg == "--local_rank" and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def _usage_errors() -> tuple[type[BaseException], ...]:
    """The parser's usage-error classes: Typer's own (it vendors click since 0.22) and
    click's, for older Typer versions."""
    classes: list[type[BaseException]] = [typer.TyperException] if hasattr(
        typer, "TyperException") else []
    try:
        import click
        classes.append(click.ClickException)
    except ImportError:
        pass
    return tuple(classes)


def _one_line(err: BaseException) -> str:
    """A parser error as one line: its message, and the command it is about."""
    message = err.format_message() if hasattr(err, "format_message") else str(err)
    ctx = getattr(err, "ctx", None)
    where = f"{ctx.command_path}: " if ctx is not None and ctx.command_path else ""
    return where + " ".join(message.split())


def _interrupt(err: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C (or SIGTERM) an exception came from, if any: one in its chain (transformers'
    lazy imports turn one into an ImportError `from` it), else one received at all (a library
    swallowed it, and failed later); none where the raiser reported it and said so with
    `from None`."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return err
        seen.add(id(err))
        if err.__cause__ is None and err.__suppress_context__:
            return None
        err = err.__cause__ or err.__context__
    return stops.latest()


def _interrupted(stop: KeyboardInterrupt) -> typing.NoReturn:
    print("interrupted", file=sys.stderr)
    stops.exit_stopped(getattr(stop, "exit_code", 130))


def main() -> None:
    """Console entry point: run the app; usage errors are one line on stderr and exit 2."""
    debug = "--debug" in sys.argv or os.environ.get("PROFIT_DS_DEBUG") == "1"
    sys.argv = _launcher_rank([a for a in sys.argv if a != "--debug"])
    quiet_libraries()
    bound_native_caches()  # before torch computes: heap and oneDNN kept between forwards
    stops.install()
    try:
        _register()
        # without standalone mode, click returns a command's typer.Exit code instead of exiting
        code = app(standalone_mode=False)
    except UsageError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (typer.Exit, SystemExit) as stop:
        interrupt = _interrupt(stop)
        if interrupt is not None:
            _interrupted(interrupt)
        code = getattr(stop, "exit_code", getattr(stop, "code", 0))
        if code in (130, Terminated.exit_code):  # the command reported the stop itself
            stops.exit_stopped(code)
        sys.exit(code)
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM before a command could say more
        _interrupted(stop)
    except Exception as err:
        interrupt = _interrupt(err)  # e.g. a lazy import that Ctrl-C broke
        if interrupt is not None and not debug:
            _interrupted(interrupt)
        if type(err).__name__ == "NoArgsIsHelpError":  # `profit-ds` alone: its help, exit 0
            print(err.ctx.get_help())
            sys.exit(0)
        if isinstance(err, _usage_errors()) and not debug:
            print(f"error: {_one_line(err)}", file=sys.stderr)
            sys.exit(2)
        message = explain(err)
        if message and not debug:
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)
        if type(err).__name__ == "Abort" or isinstance(err, getattr(typer, "Abort", ())):
            print("aborted", file=sys.stderr)
            stops.exit_stopped(130)
        raise
    if code == 130:  # Typer's answer to a Ctrl-C (or SIGTERM) that no command reported
        _interrupted(stops.latest() or KeyboardInterrupt())
    if isinstance(code, int) and code:
        sys.exit(code)
