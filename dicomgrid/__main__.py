from dicomgrid.cli import main

main()
