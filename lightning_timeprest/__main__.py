from lightning_timeprest.cli import main

main()
