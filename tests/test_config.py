"""Typed configs: budgets and flags parsed once, with messages a user can act on, before anything loads."""
from __future__ import annotations

import math

import pytest

from moetandem.config import CommitteeConfig, GateConfig, ServeConfig, SplitConfig, parse_budget
from moetandem.errors import InvalidRequestError


def test_parse_budget_units_and_fractions():
    assert parse_budget("6GiB", 10**12) == 6 * 2**30
    assert parse_budget("512MB", 10**12) == 512 * 10**6
    assert parse_budget("0.5", 1000) == 500
    assert parse_budget(0.25, 1000) == 250
    assert parse_budget("1", 1000) == 1000  # the whole model
    assert parse_budget(4096, 10**9) == 4096
    assert parse_budget("6GiB", 10) == 10  # clamped to all expert bytes, in one place
    assert parse_budget("0.5") == 0.5 and parse_budget("6GiB") == 6 * 2**30  # checkable before the model loads


@pytest.mark.parametrize("bad, hint", [("2.5", "fraction must be in (0, 1]"), (2.5, "2.5GiB"),
                                       ("0", "must be positive"), ("-1GiB", "use bytes"), ("lots", "use bytes"),
                                       ("6 parsecs", "use bytes"), (True, "use bytes")])
def test_parse_budget_errors_say_what_to_do(bad, hint):
    with pytest.raises(InvalidRequestError, match="--expert-budget") as e:
        parse_budget(bad, 10**9)
    assert hint in str(e.value)


def test_committee_config_validates_when_made():
    assert not CommitteeConfig().enabled and CommitteeConfig(budget="0.5").enabled
    with pytest.raises(InvalidRequestError, match="--policy needs --expert-budget"):
        CommitteeConfig(policy="lru")
    with pytest.raises(InvalidRequestError, match="unknown policy"):
        CommitteeConfig(budget="0.5", policy="psychic")
    with pytest.raises(InvalidRequestError, match="--refresh-every"):
        CommitteeConfig(budget="0.5", refresh_every=0)
    with pytest.raises(InvalidRequestError, match="fraction must be in"):
        CommitteeConfig(budget="2.5")


def test_gate_split_serve_configs():
    assert GateConfig().mode == "off" and GateConfig("masked", 0.3).cost == 0.3
    with pytest.raises(InvalidRequestError, match="unknown gate"):
        GateConfig("sometimes")
    with pytest.raises(InvalidRequestError, match="HOST:PORT"):
        SplitConfig("nowhere", token="t")
    with pytest.raises(InvalidRequestError, match="--token-file"):
        SplitConfig("127.0.0.1:1")
    with pytest.raises(InvalidRequestError, match="--cloud-timeout"):
        SplitConfig("127.0.0.1:1", token="t", link={"timeout_s": math.nan})
    assert SplitConfig("[::1]:50051", token="t").address == "[::1]:50051"
    with pytest.raises(InvalidRequestError, match="--max-batch"):
        ServeConfig(max_batch=0)


def test_cli_rejects_bad_budget_before_loading(capsys):
    from moetandem.cli import main
    assert main(["generate", "--model", "/does/not/exist", "--expert-budget", "2.5"]) == 2
    err = capsys.readouterr().err
    assert "fraction must be in (0, 1]" in err and "does/not/exist" not in err  # flags are checked first
