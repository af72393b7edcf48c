"""flags.py: a dataclass's fields as flags, with their types, defaults and help, and back."""
import argparse
from dataclasses import dataclass

import pytest

from flags import HelpFormatter, add_flags, from_flags, setting


@dataclass
class Settings:
    n_experts: int = setting(64, "experts", flag="--experts")
    active: float = setting(0.75, "active share")
    router: str | None = setting(None, "router", choices=["a", "b"])
    bias: bool = setting(True, "a bias")
    sequential: bool = setting(False, "sequential")
    layers: tuple = setting((), "layers", type=int)
    files: tuple = setting((), "files", action="append", metavar="FILE")
    hidden: int = 3  # no help: no flag
    norm: bool | None = setting(None, "unset: the dataclass decides")


def parse(*args):
    parser = argparse.ArgumentParser()
    add_flags(parser, Settings)
    return from_flags(parser.parse_args(list(args)), Settings)


def test_defaults_types_switches_and_lists():
    assert parse() == Settings()
    got = parse("--experts", "8", "--active", "0.5", "--router", "b", "--no-bias", "--sequential",
                "--layers", "1", "2", "--files", "x", "--files", "y")
    assert got == Settings(8, 0.5, "b", False, True, (1, 2), ("x", "y"))
    assert isinstance(got.active, float) and got.layers == (1, 2)
    # a bool that defaults to None takes both switches, and stays None without either
    assert [parse(*a).norm for a in ((), ("--norm",), ("--no-norm",))] == [None, True, False]


def test_bad_values_and_fields_without_help():
    for args in (["--router", "c"], ["--experts", "x"], ["--hidden", "4"], ["--n-experts", "8"]):
        with pytest.raises(SystemExit):
            parse(*args)


def test_help_prints_no_default_for_unset_flags():
    # a None default is decided later, and the help says how ("(default: None)" would mislead);
    # an empty list is a flag given no times
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    add_flags(parser, Settings)
    parser.add_argument("--out", required=True, help="where")
    text = " ".join(parser.format_help().split())
    assert "None" not in text and "[]" not in text and "where" in text
    assert "active share (default: 0.75)" in text and "a bias (default: True)" not in text
    assert parse().router is None  # the value itself is unchanged
