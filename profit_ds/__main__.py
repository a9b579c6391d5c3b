"""`python -m profit_ds` and the `profit-ds` script.

The Ctrl-C handler goes in first and the CLI is imported after it, inside the entry point, so
that Ctrl-C while it loads (Typer, Rich: a noticeable moment on a slow or busy machine) ends in
the same one line as Ctrl-C later."""
import sys

from profit_ds import stops


def main() -> None:
    stops.install()
    try:
        from profit_ds.cli import main as cli_main
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        stops.exit_stopped(getattr(stops.latest(), "exit_code", 130))
    cli_main()


if __name__ == "__main__":
    main()
