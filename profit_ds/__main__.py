from profit_ds.cli import main

main()
