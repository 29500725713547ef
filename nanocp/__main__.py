from nanocp.cli import main

main()
