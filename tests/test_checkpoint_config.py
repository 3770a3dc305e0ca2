"""`--resume` compares the config with the checkpoint's: keys added to fedmkt since are judged by their default."""

import copy
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from fedmkt.config import parse_run_config
from fedmkt.errors import FedMKTError
from fedmkt.federation.checkpoint import check_resumable
from fedmkt.files import json_default


def _state_of(config) -> dict:
    """A checkpoint record whose summary stores `config` as a run saves it."""
    return {"summary": {"config": json.loads(json.dumps(asdict(config), default=json_default))}}


def _without_dp(state: dict) -> dict:
    """The record as a checkpoint saved before `privacy.dp` existed stores it."""
    older = copy.deepcopy(state)
    del older["summary"]["config"]["privacy"]["dp"]
    return older


def test_a_key_the_checkpoint_predates_is_accepted_at_its_default(tmp_path):
    config = parse_run_config(["--config", "tiny"])
    check_resumable(_without_dp(_state_of(config)), config, tmp_path)


def test_a_key_the_checkpoint_predates_is_refused_away_from_its_default(tmp_path):
    older = _without_dp(_state_of(parse_run_config(["--config", "tiny"])))
    with_dp = parse_run_config(
        ["--config", "tiny", "--privacy.dp.enabled", "true", "--privacy.dp.noise_multiplier", "1.0"]
    )
    with pytest.raises(FedMKTError, match=r"differs from the checkpoint's at privacy\.dp\. Fix"):
        check_resumable(older, with_dp, Path(tmp_path))


def test_a_key_the_checkpoint_stores_is_compared_as_before(tmp_path):
    saved = _state_of(parse_run_config(["--config", "tiny"]))
    changed = parse_run_config(["--config", "tiny", "--transfer.ce_weight", "0.5"])
    with pytest.raises(FedMKTError, match=r"at transfer\.ce_weight\. Fix"):
        check_resumable(saved, changed, tmp_path)
