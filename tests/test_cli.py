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


def test_cli_import_is_light():
    "`dhs --help` must not load torch or Spark: importing the command table imports no phase module."
    code = 'import sys, dhs.cli; print(sorted(m for m in ("torch", "pyspark", "dhs.train", "dhs.inject") if m in sys.modules))'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == '[]', out.stdout + out.stderr


def test_every_command_answers_help(capsys):
    "Each subcommand's module imports and describes itself (a broken import would fail here, not in a user's run); in this process, so the heavy imports happen once."
    from dhs.cli import COMMANDS, BENCHES, main
    for name in list(COMMANDS) + [f'bench {b}' for b in BENCHES]:
        try: rc = main(name.split() + ['--help'])
        except SystemExit as e: rc = e.code
        out = capsys.readouterr()
        assert rc in (0, None) and 'usage:' in out.out, (name, out.err[-500:])
