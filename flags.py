"""
flags.py: command-line flags from a settings dataclass, so that every setting is declared once. A
field's name, type and default are the flag's; its metadata holds the help text (setting() writes
it), and the parsed flags build the dataclass back (from_flags).

    python convert.py --help        # ConvertSpec's, DiveSpec's and DataSpec's fields
    python train.py --help          # TrainSpec's

A field `n_experts` becomes --n-experts (metadata "flag" renames it); a bool field is a switch
(--name when it defaults to False, --no-name when True, both when its default is None); a tuple
field takes several values (metadata "nargs") or repeats (metadata "action": "append"); other
metadata ("choices", "type", "metavar") goes to argparse as is. A field without help has no flag.
HelpFormatter is argparse's ArgumentDefaultsHelpFormatter without "(default: None)" or "[]".
Imports nothing of ours.
"""
import argparse
import dataclasses
import types


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, but for a None one, which is decided later (the help says
    how in words; "(default: None)" would mislead), and an empty list (a flag given no times)."""

    def _get_help_string(self, action):
        unset = action.default is None or action.default == []
        return action.help if unset else super()._get_help_string(action)


def setting(default, help: str, **flag):
    """A dataclass field whose flag says `help`; flag: argparse options (choices, nargs, ...)."""
    return dataclasses.field(default=default, metadata={"help": help, **flag})


def add_flags(parser, settings, only: tuple | None = None, **overrides) -> None:
    """A flag per field of the dataclass `settings` that has help (or per field named in `only`);
    overrides: {field name: argparse options that replace its own}."""
    for field in dataclasses.fields(settings):
        if "help" not in field.metadata or only is not None and field.name not in only:
            continue
        options = {**field.metadata, **overrides.get(field.name, {})}
        name = options.pop("flag", None)
        kind = field.type
        if isinstance(kind, types.UnionType):  # int | None and the like: the type that is not None
            kind = next(t for t in kind.__args__ if t is not type(None))
        default = list(field.default) if isinstance(field.default, tuple) else field.default
        if kind is bool:  # left out when not given, so that from_flags takes the field's default
            if field.default is None:  # unset: the dataclass decides; --name and --no-name
                name = name or "--" + field.name.replace("_", "-")
                options["action"] = argparse.BooleanOptionalAction
            else:
                name = name or ("--no-" if field.default else "--") + field.name.replace("_", "-")
                options["action"] = "store_false" if field.default else "store_true"
            default = argparse.SUPPRESS
        else:
            name = name or "--" + field.name.replace("_", "-")
            options.setdefault("type", str if kind is tuple else kind)
            if "choices" not in options:
                options.setdefault("metavar", name[2:].upper().replace("-", "_"))
            if kind is tuple and options.get("action") != "append":
                options.setdefault("nargs", "*")
        parser.add_argument(name, dest=field.name, default=default, **options)


def from_flags(args, settings, **given):
    """The dataclass `settings` built from the parsed flags that are its fields (a list given to a
    tuple field as a tuple), and `given`."""
    names = {f.name for f in dataclasses.fields(settings)}
    values = {n: tuple(v) if isinstance(v, list) else v for n, v in vars(args).items()
              if n in names}
    return settings(**{**values, **given})
