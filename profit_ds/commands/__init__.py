"""One module per CLI command; `profit_ds.cli` registers them on the Typer app."""
