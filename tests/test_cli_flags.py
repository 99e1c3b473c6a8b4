"""The command line speaks one language: every subcommand has a real description and help on every flag,
one spelling per concept, and the old spellings of renamed flags still parse (hidden from --help)."""
import importlib

import pytest

from dhs import cli
from dhs.guard import ArgumentParser

# old spelling -> current spelling, per command (issue #13); nothing else is an alias
ALIASES = {
    'parent': {'--sky': '--base-uri', '--max-bad-fraction': '--max-fail-frac'},
    'cache': {'--cache-uri': '--cache', '--fail-fraction': '--max-fail-frac'},
    'inject': {'--psf': '--psf-model'},
    'search': {'--brick': '--bricks', '--splits': '--split-table', '--top': '--n-top'},
    'mock-sky': {'--bricks': '--n-bricks', '--lenses': '--n-lenses', '--workers': '--num-workers'},
}
# the least each command needs to parse, and a good value for each renamed flag
REQUIRED = {
    'parent': ['--base-uri', 'sky', '--out', 'o'],
    'cache': ['--bricks', '0001p000', '--base-uri', 'sky', '--cache', 'c'],
    'inject': ['--manifest', 'm', '--cache', 'c', '--out', 'o'],
    'search': ['--parent', 'p', '--cache', 'c', '--checkpoint', 'ck.pt', '--out', 'o'],
    'mock-sky': ['--out', 'o'],
}
VALUES = {'--sky': 'https://host/dr10', '--max-bad-fraction': '0.2', '--cache-uri': 'cache2', '--fail-fraction': '0.1', '--psf': 'moffat',
          '--brick': '0001p000', '--splits': 'splits.parquet', '--top': '7', '--bricks': '3', '--lenses': '2', '--workers': '3'}


class _Captured(Exception):
    def __init__(self, parser): self.parser = parser


def parser_of(name: str, table=cli.COMMANDS) -> ArgumentParser:
    "The parser a command's main(argv) builds, caught as it parses."
    mod = importlib.import_module(table[name][0])
    real = ArgumentParser.parse_args
    def capture(self, *a, **k): raise _Captured(self)
    ArgumentParser.parse_args = capture
    try: mod.main([])
    except _Captured as c: return c.parser
    finally: ArgumentParser.parse_args = real
    raise AssertionError(f'dhs {name}: main() never parsed its arguments with dhs.guard.ArgumentParser')


def all_parsers():
    out = {name: parser_of(name) for name in cli.available(cli.COMMANDS)}
    out.update({f'bench {name}': parser_of(name, cli.BENCHES) for name in cli.available(cli.BENCHES)})
    return out


@pytest.fixture(scope='module')
def parsers():
    return all_parsers()


def test_every_subcommand_describes_itself_and_every_flag_has_help(parsers):
    assert {'run', 'parent', 'manifest', 'cache', 'inject', 'train', 'score', 'bench inject'} <= set(parsers)
    for name, p in parsers.items():
        d = p.description or ''
        assert len(d) > 60 and not d.lstrip('`').startswith(('dhs', 'usage')), f'dhs {name}: description {d!r} repeats the usage line'
        for a in p._actions:
            assert a.help and a.help.strip() and a.help != '==SUPPRESS==', f'dhs {name}: {a.option_strings or a.dest} has no help'
        assert '--debug' in p.format_help(), name


def test_one_spelling_per_concept(parsers):
    visible = {s for p in parsers.values() for a in p._actions for s in a.option_strings if s not in getattr(a, 'dhs_aliases', ())}
    old = {o for m in ALIASES.values() for o in m} - {'--bricks'}   # --bricks: brick names in cache and search (mock-sky's count is --n-bricks)
    assert not visible & old, f'old spellings still shown: {visible & old}'
    assert {'--base-uri', '--cache', '--max-fail-frac', '--bricks', '--n-top', '--num-workers'} <= visible
    for name, p in parsers.items():
        help_text = p.format_help()
        for o in ALIASES.get(name, {}):
            assert f'{o} ' not in help_text and f'{o},' not in help_text, f'dhs {name}: {o} shown in --help'


def test_renamed_flags_keep_their_old_spelling(parsers, capsys):
    for name, p in parsers.items():
        assert p.aliases() == ALIASES.get(name, {}), f'dhs {name}: aliases {p.aliases()}'
    for name, mapping in ALIASES.items():
        p = parsers[name]
        for old, new in mapping.items():
            base = [t for t in REQUIRED[name]]
            if new in base:   # a required flag: give it only under the spelling under test
                i = base.index(new); del base[i:i + 2]
            a_new, a_old = p.parse_args(base + [new, VALUES[old]]), p.parse_args(base + [old, VALUES[old]])
            assert vars(a_new) == vars(a_old), (name, old, new)
            assert f'{old} is now spelled {new}' in capsys.readouterr().err
