"""The CLI starts without the heavy libraries: `--help`, `configs` and argument errors import no torch."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "trl", "deepspeed", "datasets", "accelerate", "peft")


def _imported_after(code: str) -> list[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_cli_imports_no_torch():
    assert _imported_after("import rewardlab.cli.main") == []


@pytest.mark.parametrize("args", [["--help"], ["configs"], ["nosuch"], ["score"]])
def test_help_configs_and_argument_errors_answer_without_torch(args):
    code = ("from rewardlab.cli.main import app\n"
            f"try:\n    app({args!r})\nexcept SystemExit as stop:\n    assert stop.code in (0, 2), stop.code")
    assert _imported_after(code) == []


def test_help_lists_the_commands():
    done = subprocess.run([sys.executable, "-m", "rewardlab", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in ("train", "eval", "score", "configs", "export"))


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_deepspeed_still_learns_it_runs_on_the_cpu_before_it_is_imported():
    code = ("import os, rewardlab, torch\n"
            "assert 'DS_ACCELERATOR' not in os.environ\n"
            "import deepspeed\n"
            "print(os.environ.get('DS_ACCELERATOR'), torch.cuda.is_available())")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    accelerator, cuda = done.stdout.strip().splitlines()[-1].split()
    assert accelerator == ("None" if cuda == "True" else "cpu")
    assert "Setting ds_accelerator" not in done.stdout


def _cli(args: list[str], env: dict[str, str]) -> tuple[int, str, list[str]]:
    """(exit code, stderr, heavy modules imported) of `rewardlab ARGS` in a fresh interpreter."""
    code = (f"import json, sys\nfrom rewardlab.cli.main import app\ntry:\n    app({args!r})\nexcept SystemExit as stop:\n"
            f"    print(json.dumps([stop.code, sorted(m for m in {HEAVY!r} if m in sys.modules)]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    exit_code, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    return exit_code, done.stderr.strip(), heavy


@pytest.fixture(scope="module")
def schema_cache(tmp_path_factory) -> dict[str, str]:
    """An environment whose schema cache the first command fills (it imports every module, torch too)."""
    env = {**os.environ, "REWARDLAB_CACHE": str(tmp_path_factory.mktemp("cache"))}
    exit_code, stderr, heavy = _cli(["train", "algo=nope"], env)
    assert exit_code == 2 and "torch" in heavy and stderr.startswith("error: unknown choice 'nope' for algo")
    return env


@pytest.mark.parametrize("args,message", [
    (["train", "algo=nope"], "error: unknown choice 'nope' for algo; choices: "),
    (["train", "run.iterationz=3"], "error: unknown config key 'run.iterationz'"),
    (["train", "run.iterations=abc"], "error: run.iterations: Value 'abc' of type 'str' could not be converted to Integer"),
    (["train", "algo.lrr=1"], "error: unknown config key 'algo.lrr'"),
    (["eval", "generation.sampling.temperature=hot"], "error: generation.sampling.temperature: Value 'hot'"),
])
def test_override_errors_are_reported_without_importing_torch(schema_cache, args, message):
    exit_code, stderr, heavy = _cli(args, schema_cache)
    assert exit_code == 2 and stderr.startswith(message) and len(stderr.splitlines()) == 1
    assert heavy == []


def _shape(node) -> object:
    """Everything OmegaConf knows about a config node: value, node type, declared type, optional, class name."""
    from omegaconf import DictConfig, ListConfig

    meta = node._metadata
    about = (type(node).__name__, repr(meta.ref_type), meta.optional, getattr(meta.object_type, "__qualname__", None))
    if isinstance(node, DictConfig) and not node._is_none() and not node._is_missing():
        return about, {key: _shape(node._get_node(key)) for key in node.keys()}
    if isinstance(node, ListConfig) and not node._is_none() and not node._is_missing():
        return about, [_shape(node._get_node(i)) for i in range(len(node))]
    return about, node._value()


def test_every_schema_survives_the_cache_unchanged():
    """The rebuilt classes give OmegaConf the same keys, defaults, types and class names as the real ones,
    and keep the subclass relations between them (for new schemas too: every stored one is compared)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from rewardlab import schema_cache
    from rewardlab.config import register_schemas

    register_schemas()
    description = json.loads(json.dumps(schema_cache.describe()))  # what the cache file holds
    rebuilt = schema_cache.rebuild(description)
    assert {e["group"] for e, _ in rebuilt} >= {"schema/algo", "schema/reward", "schema/dataset", "schema/generation"}
    for entry, shadow in rebuilt:
        real = ConfigStore.instance().load(f"{entry['group'] + '/' if entry['group'] else ''}{entry['name']}.yaml").node
        assert _shape(OmegaConf.structured(shadow)) == _shape(real), entry["name"]
    builder = schema_cache._Builder(description["classes"])
    for ref in description["classes"]:  # the same dataclass bases, so issubclass checks answer the same
        module, qualname = ref.split(":")
        real = sys.modules[module]
        for part in qualname.split("."):
            real = getattr(real, part)
        names = [[f"{b.__module__}:{b.__qualname__}" for b in c.__mro__ if dataclasses.is_dataclass(b)]
                 for c in (real, builder.cls(ref))]
        assert names[0] == names[1], ref


def test_an_edited_source_file_makes_the_cache_stale_and_the_next_write_replaces_it(tmp_path, monkeypatch):
    from rewardlab import schema_cache

    package = tmp_path / "package"
    package.mkdir()
    (package / "module.py").write_text("x = 1\n")
    monkeypatch.setattr(schema_cache, "_package", lambda: package)
    monkeypatch.setenv("REWARDLAB_CACHE", str(tmp_path / "cache"))
    schema_cache.write()
    first = schema_cache.cache_file()
    assert first.exists() and json.loads(first.read_text())["version"] == schema_cache.VERSION
    (package / "module.py").write_text("x = 22\n")
    assert schema_cache.cache_file() != first and not schema_cache.load()  # stale: nothing stored
    schema_cache.write()
    assert schema_cache.cache_file().exists() and not first.exists()


def test_the_real_schemas_replace_the_cached_stand_ins_for_the_run(schema_cache):
    """The CLI checks overrides against the cached stand-ins and then runs with the real classes, also for
    modules imported before the stand-ins were stored (register_schemas stores those again)."""
    code = ("import rewardlab.algos.pg\nfrom rewardlab import config\n"
            "assert config.register_cached_schemas()\n"
            "before = sum(config._stored_class(*key) is node for key, node in config._declared.items())\n"
            "config.register_schemas()\n"
            "after = [config._stored_class(*key) is node for key, node in config._declared.items()]\n"
            "print(before, sum(after), len(after))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=schema_cache)
    assert done.returncode == 0, done.stderr[-2000:]
    before, real, declared = map(int, done.stdout.split())
    assert before == 0 and real == declared > 40


@pytest.mark.parametrize("code,status,message", [(None, 0, ""), (75, 75, ""), ("stopped", 1, "stopped\n")])
def test_the_quick_exit_keeps_the_exit_code_the_exit_handlers_and_all_buffered_output(code, status, message):
    """`rewardlab` ends with os._exit (cli/quick_exit.py): the status is SystemExit's, atexit handlers still run,
    and what Python and C code printed into a pipe's buffers still comes out."""
    program = ("import atexit, ctypes, sys\nfrom rewardlab.cli.quick_exit import exit_now\n"
               "atexit.register(lambda: print('handler ran'))\n"
               "print('from Python')\nctypes.CDLL(None).printf(b'from C\\n')\n"
               f"exit_now({code!r})")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"})
    assert (done.returncode, sorted(done.stdout.splitlines()), done.stderr) == (
        status, ["from C", "from Python", "handler ran"], message)


def test_the_quick_exit_waits_for_a_running_non_daemon_thread():
    program = ("import threading, time\nfrom rewardlab.cli.quick_exit import exit_now\n"
               "threading.Thread(target=lambda: (time.sleep(0.3), print('thread done'))).start()\nexit_now(4)")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (4, "thread done\n")
