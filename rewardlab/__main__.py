from rewardlab.cli.main import main

main()
