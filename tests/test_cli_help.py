"""Every command of fleetctl and edge-agent has an Examples section in its help, and every command
that prints data takes --json and its alias -o json."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from edge_agent.cli import build_parser as agent_parser
from fleet_server.fleetctl import build_parser as fleetctl_parser

# Commands that print nothing but progress or a document that is already JSON (the daemon).
_PRINTS_NO_DATA = {"edge-agent run"}


def _walk(parser: argparse.ArgumentParser, name: str) -> Iterator[tuple[str, argparse.ArgumentParser, bool]]:
    """Yield (command path, parser, is a leaf) for ``parser`` and every sub-command below it."""
    children = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    yield name, parser, not children
    for action in children:
        for sub_name, sub in action.choices.items():
            yield from _walk(sub, f"{name} {sub_name}")


def _commands() -> list[tuple[str, argparse.ArgumentParser, bool]]:
    return [*_walk(fleetctl_parser(), "fleetctl"), *_walk(agent_parser(), "edge-agent")]


@pytest.mark.parametrize(("name", "parser", "leaf"), _commands(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_every_command_has_examples(name: str, parser: argparse.ArgumentParser, leaf: bool) -> None:
    text = parser.format_help()
    assert "\nexamples:\n" in text, f"{name} --help has no examples section"
    examples = text.split("\nexamples:\n", 1)[1]
    assert name.split(maxsplit=1)[0] in examples, f"{name}: its examples do not show the command"


@pytest.mark.parametrize(("name", "parser", "leaf"), [c for c in _commands() if c[2]],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_every_command_that_prints_data_takes_json(name: str, parser: argparse.ArgumentParser,
                                                   leaf: bool) -> None:
    if name in _PRINTS_NO_DATA:
        return
    options = {o for a in parser._actions for o in a.option_strings}
    assert {"--json", "-o"} <= options, f"{name} has no --json / -o json"
    output = next(a for a in parser._actions if "-o" in a.option_strings)
    assert output.dest == "output"
    assert output.choices is not None
    assert "json" in output.choices
