"""Cluster profiles: every shipped one loads; each bad profile is one clear error naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from common.errors import UserError
from slurm.profiles import format_time, list_profiles, load_profile, parse_time

JZ_ENV = {"IDRPROJ": "abc"}


def test_shipped_profiles_load():
    assert set(list_profiles()) >= {"jean-zay-h100", "generic-gpu", "local-cpu"}
    for name in list_profiles():
        p = load_profile(name, environ=JZ_ENV)
        assert p.name == name and p.partition and p.time_limit_s > p.signal_lead_s
    jz = load_profile("jean-zay-h100", environ=JZ_ENV)
    assert (jz.account, jz.gpus_per_node, jz.procs_per_node, jz.time_limit_s) == ("abc@h100", 4, 4, 20 * 3600)
    assert (jz.qos, jz.constraint, jz.cpu_account) == ("qos_gpu_h100-t3", "h100", "abc@cpu")
    cpu = load_profile("local-cpu")
    assert (cpu.gpus_per_node, cpu.procs_per_node, cpu.env["DS_ACCELERATOR"]) == (0, 2, "cpu")
    assert load_profile("generic-gpu").account is None  # written `account: null`: a cluster without accounts


def test_unset_environment_variable_is_an_error():
    with pytest.raises(
        UserError, match=r"jean-zay-h100.yaml: 'account' uses \$\{IDRPROJ\}, which is not set"
    ):
        load_profile("jean-zay-h100", environ={})


def _write(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _base() -> dict:
    return yaml.safe_load((Path(__file__).parents[2] / "slurm/profiles/generic-gpu.yaml").read_text())


@pytest.mark.parametrize("key", ["account", "partition"])
def test_missing_account_or_partition(tmp_path, key):
    data = _base()
    del data[key]
    with pytest.raises(UserError, match=rf"profile .*site.yaml: missing key '{key}'") as e:
        load_profile(_write(tmp_path, data))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"partition": ""}, r"'partition' must be a non-empty string, got ''"),
        ({"account": ""}, r"'account' must be a non-empty string, got ''"),
        ({"gpus_per_node": -1}, r"'gpus_per_node' must be an integer >= 0, got -1"),
        ({"gpus_per_node": 0}, r"'procs_per_node' is required when gpus_per_node is 0"),
        ({"procs_per_node": 9}, r"'procs_per_node' 9 is more than the node's 8 GPUs"),
        ({"time_limit": "20h"}, r"'time_limit': '20h' is not a Slurm time limit"),
        ({"max_time_limit": "10:00:00"}, r"'time_limit' 1-00:00:00 is above max_time_limit 10:00:00"),
        ({"signal_lead_s": 86400}, r"'signal_lead_s' 86400 is not below the time limit 86400 s"),
        ({"sustained_tflops_per_proc": 0}, r"'sustained_tflops_per_proc' must be a positive number, got 0"),
        ({"partiton": "gpu"}, r"unknown key 'partiton' \(did you mean 'partition'\?\)"),
        ({"env": {"1BAD": "x"}}, r"env name '1BAD' is not a valid variable name"),
        ({"modules": "pytorch"}, r"'modules' must be a list of strings, got 'pytorch'"),
    ],
)
def test_bad_profile_values(tmp_path, change, message):
    data = {**_base(), **change}
    with pytest.raises(UserError, match=r"profile .*site.yaml: " + message):
        load_profile(_write(tmp_path, data))


def test_unknown_profile_name_suggests():
    with pytest.raises(UserError, match=r"unknown profile 'jean-zay' \(did you mean 'jean-zay-h100'\?\)"):
        load_profile("jean-zay")
    with pytest.raises(UserError, match=r"profile file .*nope.yaml does not exist"):
        load_profile("/nonexistent/nope.yaml")


def test_time_limits():
    assert parse_time("20:00:00", "t") == 72000
    assert parse_time("1-02:03:04", "t") == 86400 + 7384
    assert parse_time("90:00", "t") == 5400  # Slurm reads MM:SS
    assert parse_time(90, "t") == 5400  # minutes
    assert parse_time("90", "t") == 5400
    assert format_time(72000) == "20:00:00"
    assert format_time(86400 + 61) == "1-00:02:00"  # rounded up to whole minutes
    with pytest.raises(UserError, match=r"--time: '0:00' is not a positive time limit"):
        parse_time("0:00", "--time")
