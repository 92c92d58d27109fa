"""edge_core.yamlsafe: safe loading, line numbers, and every refusal."""

from __future__ import annotations

import pytest

from edge_core.errors import BundleError, YamlError
from edge_core.yamlsafe import LocatedDoc, load_yaml

DOC = b"""\
# a comment
targets:
  - labels: {role: gateway}
resources:
  - kind: file
    path: /etc/motd
    content: |
      hello
    mode: 0644
  - kind: sysctl
    name: vm.swappiness
    value: 10
when: 2024-05-01
ratio: 0.5
flag: yes
nothing:
"""


def test_values_are_plain_types() -> None:
    doc = load_yaml(DOC, name="b.yaml")
    assert doc.value["targets"] == [{"labels": {"role": "gateway"}}]
    assert doc.value["resources"][0]["content"] == "hello\n"
    assert doc.value["resources"][0]["mode"] == 0o644
    assert doc.value["resources"][1]["value"] == 10
    assert doc.value["when"] == "2024-05-01"  # a timestamp stays the text it was written as
    assert doc.value["ratio"] == 0.5
    assert doc.value["flag"] is True
    assert doc.value["nothing"] is None


@pytest.mark.parametrize(
    ("where", "line"),
    [
        ((), 2),
        (("targets",), 2),
        (("targets", 0), 3),
        (("targets", 0, "labels", "role"), 3),
        (("resources", 0, "kind"), 5),
        (("resources", 0, "path"), 6),
        (("resources", 0, "content"), 7),
        (("resources", 0, "mode"), 9),
        (("resources", 1), 10),
        (("resources", 1, "value"), 12),
        (("resources", 1, "no_such_field"), 10),  # deepest existing node
        (("resources", 7, "path"), 4),
        (("flag",), 15),
        (("missing", "deeper"), 2),
    ],
)
def test_line_of_path(where: tuple[str | int, ...], line: int) -> None:
    assert load_yaml(DOC, name="b.yaml").line(where) == line


def test_empty_document_is_none() -> None:
    doc = load_yaml(b"# only a comment\n", name="e.yaml")
    assert doc.value is None
    assert doc.line(("anything",)) == 1
    assert isinstance(doc, LocatedDoc)


@pytest.mark.parametrize(
    ("data", "line", "fragment"),
    [
        (b"a: &anchor 1\nb: *anchor\n", 1, "anchors"),
        (b"a: 1\nb: [*x]\n", 2, "alias"),
        (b"a: 1\n---\nb: 2\n", 2, "one YAML document"),
        (b"a: 1\nb: 2\na: 3\n", 3, "duplicate key 'a'"),
        (b"a: 1\nb: [1, 2\nc: 3\n", 3, "syntax error"),
        (b"a:\n  b: 1\n c: 2\n", 3, "syntax error"),
        (b"x: !!python/object/apply:os.system [ls]\n", 1, "unsupported YAML tag"),
        (b"x: !!binary aGVsbG8=\n", 1, "unsupported YAML tag"),
        (b"x: !!set {a, b}\n", 1, "unsupported YAML tag"),
        (b"<<: {a: 1}\n", 1, "merge keys"),
        (b"? [a, b]\n: 1\n", 1, "plain scalars"),
        (b"x: " + b"[" * 80 + b"]" * 80 + b"\n", 1, "nests too deeply"),
    ],
)
def test_refusals_carry_the_line(data: bytes, line: int, fragment: str) -> None:
    with pytest.raises(YamlError) as info:
        load_yaml(data, name="bad.yaml")
    assert info.value.line == line
    assert fragment in str(info.value)
    assert "bad.yaml" in str(info.value)
    assert isinstance(info.value, BundleError)


def test_billion_laughs_refused_before_expansion() -> None:
    lol = b"a: &a [x, x, x, x, x, x, x, x, x]\n" + b"".join(
        b"%c: &%c [*%c, *%c, *%c, *%c, *%c, *%c, *%c, *%c, *%c]\n" % ((98 + i, 98 + i) + (97 + i,) * 9)
        for i in range(8)
    )
    with pytest.raises(YamlError, match="anchors"):
        load_yaml(lol, name="lol.yaml")


def test_size_cap() -> None:
    data = b"a: " + b"x" * 100 + b"\n"
    assert load_yaml(data, name="ok.yaml", max_bytes=len(data)).value == {"a": "x" * 100}
    with pytest.raises(YamlError, match="over the 50-byte cap"):
        load_yaml(data, name="big.yaml", max_bytes=50)
    with pytest.raises(YamlError, match="cap"):
        load_yaml(b"a: b\n" * (1024 * 1024 // 5 + 1), name="big.yaml")
