"""The layers the architecture promises: answer checking and step splitting sit below rewards and algorithms,
and the evaluation, filters, data sets and the policy-gradient update reach no reward module."""

import subprocess
import sys

import pytest

BELOW_BOTH = ("rewardlab.rewards", "rewardlab.algos")


@pytest.mark.parametrize("module,forbidden", [
    ("rewardlab.answers", BELOW_BOTH), ("rewardlab.steps", BELOW_BOTH),
    ("rewardlab.evaluation", ("rewardlab.rewards",)), ("rewardlab.filters", ("rewardlab.rewards",)),
    ("rewardlab.data.math", ("rewardlab.rewards",)), ("rewardlab.algos.pg", ("rewardlab.rewards",)),
])
def test_module_imports_nothing_above_it(module, forbidden):
    code = (f"import sys, {module}\n"
            f"bad = sorted(m for m in sys.modules if m.startswith({forbidden!r}))\n"
            f"print(bad)\nsys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{module} pulls in {done.stdout.strip()} {done.stderr[-500:]}"
