"The `dhs` console script."
import subprocess, sys, shutil
from pathlib import Path


def _dhs(*args):
    exe = Path(sys.executable).parent/'dhs'
    cmd = [str(exe)] if exe.exists() else [sys.executable, '-m', 'dhs.cli']
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=120)


def test_help_lists_subcommands():
    out = _dhs('--help')
    assert out.returncode == 0
    assert 'run' in out.stdout and 'commands:' in out.stdout


def test_unknown_command_fails_clearly():
    out = _dhs('frobnicate')
    assert out.returncode == 2 and "unknown command 'frobnicate'" in out.stderr


def test_run_list_and_dry_run():
    out = _dhs('run', '--list')
    assert out.returncode == 0 and 'mock' in out.stdout and 'dr10-region' in out.stdout
    out = _dhs('run', '--preset', 'dr10-region', '--dry-run')
    assert out.returncode == 0 and '"sky": "dr10"' in out.stdout


def test_import_survey_module_is_light():
    out = subprocess.run([sys.executable, '-c', 'import dhs.core, dhs.runner, dhs.cli'], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
