"""Any hub data set (or local data directory) through `datasets.load_dataset`, with a field mapping."""

from __future__ import annotations

from dataclasses import dataclass

from rewardlab.config import schema
from rewardlab.data.jsonl import FieldsConfig, FieldsTask


@schema("dataset", "hf")
@dataclass
class HubConfig(FieldsConfig):
    _target_: str = "rewardlab.data.hf.HubTask"


class HubTask(FieldsTask):
    """`dataset.hub_id=<id or directory>` with `prompt_field`/`answer_field`/`solution_field` and splits."""

    name = "hf"
