from rewardlab.cli.main import app

app(prog_name="rewardlab")
