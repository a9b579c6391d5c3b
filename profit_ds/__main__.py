"""`python -m profit_ds` and the `profit-ds` script.

The CLI is imported here, inside the entry point, so that Ctrl-C while it loads (Typer, Rich:
a noticeable moment on a slow or busy machine) ends in the same one line as Ctrl-C later."""
import sys


def main() -> None:
    try:
        from profit_ds.cli import main as cli_main
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    cli_main()


if __name__ == "__main__":
    main()
