"""`rewardlab export RUN_DIR --out DIR [--merge-lora]`: a run's model as a plain model directory.

The model comes from the run's `final/` (written when a run completes) or, for a run that stopped, its
newest checkpoint (an FSDP one's shards are read whole into the model the run started from). A full
model is copied as saved (weights, config, tokenizer); a LoRA run holds only
adapters, which peft's `merge_and_unload` folds into the base model named in their adapter_config.json.
The directory is built beside `--out` and renamed into place, so it is complete or absent.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from rewardlab import sharded_checkpoint
from rewardlab.checkpoint import Checkpointer, _no_progress_bars
from rewardlab.errors import UserError
from rewardlab.policy.lora import adapter_base, is_adapter_dir


def model_dir(run_dir: Path) -> Path:
    """The run's model directory: final/ when the run completed, else the newest checkpoint's policy/."""
    run_dir = Path(run_dir)
    if (run_dir / "final").is_dir():
        return run_dir / "final"
    latest = Checkpointer(run_dir).latest() if run_dir.is_dir() else None
    if latest is None:
        raise UserError(f"{run_dir} has no final/ and no checkpoint; give the `run dir:` a training run printed")
    return latest / "policy"  # under FSDP only the tokenizer: the weights are in ../sharded/


def _merged(source: Path, target: Path) -> None:
    """Save base + adapters from `source`, merged into plain weights, and the tokenizer, to `target`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = adapter_base(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    except OSError as exc:
        raise UserError(f"cannot load the LoRA base model {base} named in {source}/adapter_config.json "
                        f"({str(exc).splitlines()[0]})") from None
    PeftModel.from_pretrained(model, str(source)).merge_and_unload().save_pretrained(target)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(target)


def _from_shards(checkpoint: Path, target: Path) -> None:
    """The whole model of an FSDP checkpoint (each rank's shard of the weights): the model the run started
    from, with the saved weights read into it (DCP reshards them into whole tensors in this process)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rewardlab.checkpoint import STATE, load_state

    folder = checkpoint / sharded_checkpoint.FOLDER
    sharded_checkpoint.check_files(folder)
    model = AutoModelForCausalLM.from_pretrained(load_state(checkpoint / STATE)["policy_source"], dtype="auto")
    sharded_checkpoint.load_weights(model, folder)
    with _no_progress_bars():
        model.save_pretrained(target)
    AutoTokenizer.from_pretrained(str(checkpoint / "policy")).save_pretrained(target)


def export_model(run_dir: Path, out: Path, merge_lora: bool = False) -> Path:
    """Write the run's model to `out` (a new or empty directory); LoRA adapters need `merge_lora`."""
    source = model_dir(run_dir)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty; choose a new directory")
    adapters = is_adapter_dir(source)
    if adapters and not merge_lora:
        raise UserError(f"{source} holds LoRA adapters only; pass --merge-lora to write the merged full model "
                        f"(or load the adapters with peft from {source})")
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if (source.parent / sharded_checkpoint.FOLDER).is_dir():
            _from_shards(source.parent, tmp)
        elif adapters:
            _merged(source, tmp)
        else:
            shutil.copytree(source, tmp)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
