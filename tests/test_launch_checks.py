"""The launch checks every bundle runs first: strict overrides, settings, the short error summary."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import yaml
from monai.bundle import run as bundle_run

from dae.bundle import check_overrides, culprit, format_summary, unknown_key
from dae.errors import ConfigError, DataError

CONFIG = """
imports:
  - $import dae
  - $import dae.bundle
output_dir: {out}
epochs: 3
amp: none
resume: true
network_def:
  feature_size: 48
transforms:
  - {{keys: image}}
free_keys: [backbones]
backbones:
  random: {{kind: dino}}
initialize:
  - "$dae.bundle.start_run()"
  - "$dae.bundle.save_run_record(@output_dir)"
run:
  - "$open(@output_dir + '/seen.txt', 'w').write(repr((@epochs, @resume, sorted(@backbones))))"
"""


@pytest.fixture
def bundle(tmp_path):
    base = tmp_path / "train.yaml"
    base.write_text(CONFIG.format(out=tmp_path / "run"))
    overlay = tmp_path / "demo.yaml"
    overlay.write_text("epochs: 2\n")
    return [str(base), str(overlay)], tmp_path / "run"


def test_overrides_of_known_and_free_keys_run_and_are_recorded(bundle):
    files, out = bundle
    bundle_run(
        config_file=files, resume="false", **{"network_def#feature_size": 24, "backbones#mine": {"kind": "dino"}}
    )
    assert (out / "seen.txt").read_text() == "(2, False, ['mine', 'random'])"
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["epochs"] == 2 and config["network_def"]["feature_size"] == 24
    assert config["backbones"]["mine"] == {"kind": "dino"}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"epoch": 2}, "--epoch: unknown key 'epoch'; did you mean 'epochs'?"),
        (
            {"network_def#feature_sise": 2},
            "unknown key 'feature_sise' under 'network_def'; did you mean 'feature_size'?",
        ),
        ({"epochs": "two", "amp": "bf17"}, "epochs (command line): expected a positive integer, got 'two'"),
        ({"amp": "bf17"}, "amp (command line): expected one of none, bf16, fp16, got 'bf17'"),
        ({"resume": "maybe"}, "resume (command line): cannot read 'maybe' as a boolean"),
        ({"output_dir": "/proc/forbidden/run"}, "output_dir (command line): expected a folder that can be created"),
    ],
)
def test_bad_overrides_fail_before_the_run_naming_the_key(bundle, overrides, expected):
    files, out = bundle
    with pytest.raises(RuntimeError) as caught:
        bundle_run(config_file=files, **overrides)
    error = culprit(caught.value)
    assert isinstance(error, ConfigError)
    assert expected in str(error)
    assert not (out / "seen.txt").exists()


def test_debug_is_accepted_everywhere(bundle):
    files, out = bundle
    bundle_run(config_file=files, debug=True)
    assert (out / "seen.txt").exists()


def test_unknown_key_walks_lists_and_dicts():
    config = {"train": {"transforms": [{"keys": "image"}]}}
    assert unknown_key(config, "train#transforms#0#keys") is None
    assert "did you mean 'train'" in unknown_key(config, "trian")
    assert (
        unknown_key(config, "train#transforms#3")
        == "'train#transforms' is a list of 1 items; '3' is not an index of it"
    )
    assert (
        unknown_key(config, "train#transforms#0#keys#x")
        == "'train#transforms#0#keys' is a single value ('image'), it has no key 'x'"
    )
    with pytest.raises(ConfigError, match="--a: unknown key"):
        check_overrides(config, {"a": 1, "train#transforms": []})


def test_summary_shows_the_projects_error_inside_monais_wrapping(tmp_path):
    try:
        try:
            raise DataError("volume data/ct.nii.gz: 12 NaN voxels")
        except DataError as inner:
            raise RuntimeError("Failed to evaluate ConfigExpression: $@trainer.run()") from inner
    except RuntimeError as outer:
        summary = format_summary(outer, tmp_path / "error.log")
    lines = summary.splitlines()
    assert lines[0] == "ERROR DataError: volume data/ct.nii.gz: 12 NaN voxels"
    assert lines[1].startswith("Advice: fix or remove the named entries")
    assert str(tmp_path / "error.log") in lines[2]


def test_summary_of_a_foreign_error_says_where_it_was_raised():
    try:
        {}["missing"]
    except KeyError as error:
        summary = format_summary(error)
    assert summary.startswith("ERROR KeyError: 'missing' (raised at ")
    assert "test_launch_checks.py" in summary


def test_uncaught_error_prints_the_summary_and_logs_the_traceback(tmp_path):
    script = textwrap.dedent(
        f"""
        from dae.bundle import install_error_report
        from dae.errors import ConfigError
        install_error_report({str(tmp_path)!r})
        def deep():
            raise ConfigError("epochs: expected a positive integer, got 'two'")
        try:
            deep()
        except ConfigError as e:
            raise RuntimeError("Failed to evaluate ConfigExpression") from e
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "ERROR ConfigError: epochs: expected a positive integer, got 'two'",
        "Advice: fix the named key in the command line or the config file.",
        f"Full traceback: {tmp_path / 'error.log'} (or rerun with --debug, or DAE_DEBUG=1)",
    ]
    assert "def deep" not in proc.stderr and "in deep" in (tmp_path / "error.log").read_text()
    debug = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={"DAE_DEBUG": "1"})
    assert "Traceback (most recent call last)" in debug.stderr and debug.stderr.rstrip().endswith("DAE_DEBUG=1)")
