"""The ``hoverserve`` command line as a package: its command groups, its entry points, the bounds
it shares with the API, and the one model-name lookup it shares with the service's catalog."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from models.zoo import ModelNotFound, default_model, installed_models, list_models, resolve_model
from service.catalog import Catalog
from service.cli import COMMAND_GROUPS, EXIT_USAGE, build_parser, main
from service.errors import UnknownModel
from worker.options import MAX_MPP, check_mpp, check_roi

ROOT = Path(__file__).resolve().parents[2]
CMU1 = ROOT / ".." / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"

COMMANDS = {"infer", "model", "export", "evaluate", "serve", "worker", "submit", "jobs", "key"}


def one_error_line(err: str) -> str:
    """The single stderr line of a failed command (asserting there is nothing else)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hoverserve: error: ")
    return lines[0]


def argparse_error(err: str) -> str:
    """The error line argparse prints after the usage (asserting no traceback)."""
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def subcommands(parser: argparse.ArgumentParser) -> set[str]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(action.choices)


# --------------------------------------------------------------------------- the command groups


def test_every_command_group_registers_its_commands() -> None:
    assert subcommands(build_parser()) == COMMANDS
    added: set[str] = set()
    for group in COMMAND_GROUPS:
        before = set(added)
        parser = argparse.ArgumentParser(prog="x")
        group.register(parser.add_subparsers())
        added |= subcommands(parser)
        assert added > before, f"{group.__name__} registers nothing"
    assert added == COMMANDS


def test_building_the_parser_twice_gives_the_same_commands() -> None:
    # Nothing registers itself on import: every call builds the whole parser again.
    assert subcommands(build_parser()) == subcommands(build_parser()) == COMMANDS


@pytest.mark.parametrize("argv", [["--help"], ["jobs", "--help"], ["model", "--help"]])
def test_python_dash_m_runs_the_whole_command_line(argv: list[str]) -> None:
    run = subprocess.run([sys.executable, "-m", "service.cli", *argv], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr
    if argv == ["--help"]:
        assert all(command in run.stdout for command in COMMANDS)
    elif argv[0] == "jobs":
        assert "list,status,download,cancel,retry,delete" in run.stdout
    else:
        assert "set-postprocess" in run.stdout and "calibrate" in run.stdout


# --------------------------------------------------------------------------- shared bounds


def _message(check: Callable[[Any], object], value: object) -> str:
    with pytest.raises(ValueError) as info:
        check(value)
    return str(info.value)


@pytest.mark.parametrize("command", [["infer", "x.svs"], ["submit", "x.svs"],
                                     ["evaluate", "a.npz", "b.npz"]])
@pytest.mark.parametrize("mpp", ["20", "0.001", "nan"])
def test_a_bad_mpp_is_refused_with_the_apis_message(command: list[str], mpp: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--mpp", mpp])
    assert exit_info.value.code == EXIT_USAGE
    line = argparse_error(capsys.readouterr().err)
    assert line.endswith(f"argument --mpp: {_message(check_mpp, float(mpp))}")


def test_the_largest_mpp_is_accepted_where_the_api_accepts_it() -> None:
    args = build_parser().parse_args(["infer", "x.svs", "--mpp", str(MAX_MPP)])
    assert args.mpp == MAX_MPP


def test_a_bad_roi_is_refused_with_the_apis_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["submit", "x.svs", "--roi", "0,0,0,5"])
    assert exit_info.value.code == EXIT_USAGE
    line = argparse_error(capsys.readouterr().err)
    assert line.endswith(f"argument --roi: {_message(check_roi, (0, 0, 0, 5))}")


def test_region_size_defaults_and_bounds_come_from_the_worker_options(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from worker.options import DEFAULT_BATCH_SIZE, DEFAULT_REGION_SIZE, MAX_REGION_SIZE

    args = build_parser().parse_args(["infer", "x.svs"])
    assert (args.region_size, args.batch_size) == (DEFAULT_REGION_SIZE, DEFAULT_BATCH_SIZE)
    with pytest.raises(SystemExit):
        main(["infer", "x.svs", "--region-size", str(MAX_REGION_SIZE + 1)])
    assert str(MAX_REGION_SIZE) in argparse_error(capsys.readouterr().err)


# --------------------------------------------------------------------------- one model lookup


def test_an_unknown_model_name_lists_the_installed_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["infer", str(CMU1), "--model", "no-such-model", "--quiet"]) == EXIT_USAGE
    line = one_error_line(capsys.readouterr().err)
    assert "--model" in line and "'no-such-model'" in line
    assert all(path.stem in line for path in list_models())
    assert main(["model", "info", "no-such-model"]) == EXIT_USAGE
    line = one_error_line(capsys.readouterr().err)
    assert all(path.stem in line for path in list_models())


def test_names_files_and_the_default_alias_resolve_to_one_file() -> None:
    bundled = list_models()[0]
    assert resolve_model(bundled.stem) == bundled
    assert resolve_model(bundled.name) == bundled  # the file name, as `model list` prints it
    assert resolve_model(str(bundled)) == bundled
    assert resolve_model(None) == resolve_model("default") == default_model()


def test_the_service_accepts_names_only_never_a_path(tmp_path: Path) -> None:
    outside = tmp_path / "secret.onnx"
    outside.write_bytes(b"not a model")
    with pytest.raises(ModelNotFound) as info:
        resolve_model(str(outside), files=False)
    assert set(info.value.known) == set(installed_models())
    with pytest.raises(UnknownModel, match=r"unknown model .*; installed: "):
        Catalog(None).resolve(str(outside))


def test_the_catalog_and_the_command_line_agree_on_every_name(tmp_path: Path) -> None:
    extra = tmp_path / "local-model.onnx"
    extra.write_bytes(b"")
    shadow = tmp_path / f"{list_models()[0].stem}.onnx"  # a bundled name: the bundled one wins
    shadow.write_bytes(b"")
    catalog = Catalog(tmp_path)
    assert catalog.paths() == installed_models(tmp_path)
    assert catalog.paths()[shadow.stem] == list_models()[0]
    for name in [*catalog.paths(), None, "default"]:
        canonical, path = catalog.resolve(name)
        assert path == resolve_model(name, tmp_path, files=False)
        assert catalog.paths()[canonical] == path
    assert catalog.resolve("local-model") == ("local-model", extra)
    assert catalog.resolve(None)[0] == catalog.default_name()
