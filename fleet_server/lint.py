"""Every schema and policy check of a config repo, each problem with its file and line.

The rules (documented for operators in ``docs/config-repo.md``):

* YAML: syntax, one document, no anchors/aliases, size cap (``edge_core.yamlsafe``).
* Format: ``fleet.yaml``, every ``bundles/<name>/bundle.yaml`` (unknown keys, types, missing
  fields, unknown resource and health-check kinds, duplicate ids, overlays); ``rollouts/*.yaml``
  are full rollout plans (``parse_plan``) and fleet.yaml's ``rollout:`` an inline plan or a
  ``{plan: NAME}`` naming one of them (``parse_fleet_rollout``), each error at its line.
* Payloads: every ``source`` exists inside its bundle directory (a symlink leading out is an
  escape), every overlay replacement exists, templates name only known values, every
  ``secret_file`` names a sealed-secret document.
* Profiles: the profiles a bundle's selectors name must each allow every resource and health
  check (``edge_core.policy``: paths, kinds, systemd units, sysctl keys, modes; the same message
  the agent refuses a release with); a bundle with a selector naming no profile needs at least one
  known profile that allows each of them.
* References: ``watch`` names a resource id some bundle declares; an id declared by two bundles
  is a warning (a device targeted by both refuses the release).
* Plaintext secrets in inline content, values and payload files (see ``_secret_findings``);
  a line ending in ``# lint: allow-secret`` is exempt.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edge_core.bundle import (
    BUILTIN_VALUES,
    Bundle,
    Selector,
    apply_one_overlay,
    default_resource_id,
)
from edge_core.errors import BundleError, YamlError
from edge_core.policy import Refusal, check_refusal, resource_refusal
from edge_core.profiles import DeviceProfile
from edge_core.resources import CommandRes, File, HealthCheck, Resource, SecretFile, SystemdUnit, parse_check
from edge_core.yamlsafe import LocatedDoc, load_yaml
from fleet_server.authoring.problems import fleet_problems, load_all_profiles, parse_bundle_partial
from fleet_server.errors import PlanError
from fleet_server.rollouts.plan import PlanRef, parse_fleet_rollout, parse_plan

__all__ = ["ALLOW_SECRET_MARKER", "SEALED_SECRET_TYPE", "LintProblem", "lint_repo"]

Severity = Literal["error", "warning"]
Where = tuple[str | int, ...]

SEALED_SECRET_TYPE = "edge-fleet/sealed-secret"  # noqa: S105 (a document type)
ALLOW_SECRET_MARKER = "# lint: allow-secret"  # noqa: S105 (a comment marker)
_MAX_SCAN_BYTES = 4 * 1024 * 1024

_STRONG_SECRETS = (
    (re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"), "a PEM private key block"),
    (re.compile(r"(?<![A-Za-z0-9])AKIA[0-9A-Z]{16}(?![A-Za-z0-9])"), "an AWS access key id"),
    (re.compile(r"(?<![A-Za-z0-9])gh[pousr]_[A-Za-z0-9]{36,}"), "a GitHub token"),
)
_ASSIGNMENT = re.compile(
    r"(?i)(?<![A-Za-z0-9])([A-Za-z0-9_.\-]*(?:password|passwd|secret|token|api[_\-]?key))[\"']?"
    r"\s*[:=]\s*(.+)$"
)
_PLACEHOLDER_START = ("$", "{", "<", "%", "!", "(", "*", "/", "#")
_NOT_LITERAL = frozenset({"null", "none", "nil", "true", "false", "changeme", "redacted", "xxx", "..."})


@dataclass(frozen=True, order=True)
class LintProblem:
    """One finding: the repo-relative ``file``, its 1-based ``line``, the reason and severity."""

    file: str
    line: int
    reason: str
    severity: Severity = "error"


class _Report:
    def __init__(self) -> None:
        self.problems: list[LintProblem] = []

    def add(self, file: str, line: int, reason: str, severity: Severity = "error") -> None:
        self.problems.append(LintProblem(file, max(1, line), reason, severity))

    def bundle_error(self, file: str, doc: LocatedDoc, exc: BundleError | PlanError) -> None:
        self.add(file, doc.line(exc.where), exc.reason)


def lint_repo(repo_dir: Path, profile_dirs: Sequence[Path]) -> list[LintProblem]:
    """Check the config repo at ``repo_dir`` against the format and the profiles of ``profile_dirs``.

    Returns every problem found, sorted by file and line.

    Raises:
        ConfigError: a device profile in ``profile_dirs`` is itself invalid.
    """
    profiles = load_all_profiles(profile_dirs)
    report = _Report()
    if not profiles:
        report.add(".", 1, "no device profiles found; profile checks skipped", "warning")
    _lint_fleet(repo_dir, report)
    _lint_rollouts(repo_dir, report)
    linted = _lint_bundles(repo_dir, profiles, report)
    _lint_cross_bundle(linted, report)
    return sorted(report.problems)


def _load(repo_dir: Path, rel: str, report: _Report) -> LocatedDoc | None:
    try:
        data = (repo_dir / rel).read_bytes()
    except OSError as exc:
        report.add(rel, 1, f"cannot read: {exc.strerror or exc}")
        return None
    try:
        return load_yaml(data, name=rel)
    except YamlError as exc:
        report.add(rel, exc.line, exc.reason.split(": ", 1)[-1])
        return None


def _lint_fleet(repo_dir: Path, report: _Report) -> None:
    if not (repo_dir / "fleet.yaml").is_file():
        return
    doc = _load(repo_dir, "fleet.yaml", report)
    if doc is not None:
        problems = fleet_problems(doc.value)
        for exc in problems:
            report.bundle_error("fleet.yaml", doc, exc)
        if isinstance(doc.value, Mapping) and not any(p.where[:1] == ("rollout",) for p in problems):
            _lint_default_plan(repo_dir, doc, report)


def _lint_default_plan(repo_dir: Path, doc: LocatedDoc, report: _Report) -> None:
    """Check fleet.yaml's ``rollout:``: an inline plan, or ``{plan: NAME}`` naming an existing plan."""
    try:
        declared = parse_fleet_rollout(doc.value.get("rollout"))
    except PlanError as exc:
        report.bundle_error("fleet.yaml", doc, exc)
        return
    if isinstance(declared, PlanRef) and not any(
            (repo_dir / "rollouts" / f"{declared.name}{suffix}").is_file() for suffix in (".yaml", ".yml")):
        report.add("fleet.yaml", doc.line(("rollout", "plan")),
                   f"rollout plan rollouts/{declared.name}.yaml does not exist")


def _lint_rollouts(repo_dir: Path, report: _Report) -> None:
    rollouts = repo_dir / "rollouts"
    if not rollouts.is_dir():
        return
    for path in sorted([*rollouts.glob("*.yaml"), *rollouts.glob("*.yml")]):
        rel = path.relative_to(repo_dir).as_posix()
        doc = _load(repo_dir, rel, report)
        if doc is None:
            continue
        try:
            plan = parse_plan(doc.value, source=rel)
        except PlanError as exc:
            report.bundle_error(rel, doc, exc)
            continue
        last = len(plan.waves) - 1
        if plan.waves[last].promotion == "manual":
            report.add(rel, doc.line(("waves", last, "promotion")),
                       "promotion: manual asks approval AFTER this wave passed, i.e. once every device has "
                       "the release; to approve before any device of this wave is assigned, use "
                       "pause_before: true", "warning")


@dataclass(frozen=True)
class _Linted:
    """What cross-bundle checks need from one bundle."""

    file: str
    doc: LocatedDoc
    declared: Mapping[str, Where]
    watches: tuple[tuple[str, Where], ...]


def _lint_bundles(repo_dir: Path, profiles: Mapping[str, DeviceProfile], report: _Report) -> list[_Linted]:
    bundles_dir = repo_dir / "bundles"
    linted: list[_Linted] = []
    if not bundles_dir.is_dir():
        report.add("bundles", 1, "the repo has no bundles/ directory", "warning")
        return linted
    for bdir in sorted(bundles_dir.iterdir()):
        rel_dir = bdir.relative_to(repo_dir).as_posix()
        if not bdir.is_dir():
            report.add(rel_dir, 1, "only bundle directories belong in bundles/", "warning")
            continue
        file = f"{rel_dir}/bundle.yaml"
        if not (bdir / "bundle.yaml").is_file():
            report.add(rel_dir, 1, "bundle directory has no bundle.yaml")
            continue
        doc = _load(repo_dir, file, report)
        if doc is None:
            continue
        bundle, problems = parse_bundle_partial(bdir.name, doc.value)
        for exc in problems:
            report.bundle_error(file, doc, exc)
        if bundle is None:
            continue
        ctx = _BundleLint(repo_dir=repo_dir, bdir=bdir, file=file, doc=doc, bundle=bundle, profiles=profiles,
                         report=report)
        linted.append(ctx.run())
    return linted


class _BundleLint:
    """The payload, profile, template and secret checks of one bundle."""

    def __init__(self, *, repo_dir: Path, bdir: Path, file: str, doc: LocatedDoc, bundle: Bundle,
                 profiles: Mapping[str, DeviceProfile], report: _Report) -> None:
        self.repo_dir, self.bdir, self.file, self.doc = repo_dir, bdir, file, doc
        self.bundle, self.profiles, self.report = bundle, profiles, report
        self.text_lines = _text_lines((bdir / "bundle.yaml").read_bytes())

    def err(self, where: Where, reason: str, severity: Severity = "error") -> None:
        self.report.add(self.file, self.doc.line(where), reason, severity)

    def run(self) -> _Linted:
        located = self._located_resources()
        if not self.bundle.targets and not self.bundle.raw.get("targets"):
            self.err(("targets",), "the bundle has no targets, so it applies to no device", "warning")
        for res, where in located:
            self._check_payload(res, where)
            self._check_profiles(res, f"resource {res.id!r}", where)
            self._check_inline_secrets(res, where)
        for check, where in self._located_checks():
            self._check_profiles(check, f"health check {check.name!r}", where)
        self._check_overlay_files()
        self._check_templates(located)
        for key, value in self.bundle.values.items():
            self._check_value_secret(("values", key), key, value)
        for i, ov in enumerate(self.bundle.overlays):
            for key, value in ov.values.items():
                self._check_value_secret(("overlays", i, "values", key), key, value)
        self._check_payload_secrets()
        declared: dict[str, Where] = {}
        watches: list[tuple[str, Where]] = []
        for res, where in located:
            declared.setdefault(res.id, where)
            if isinstance(res, SystemdUnit | CommandRes):
                watches.extend((w, (*where, "watch", k)) for k, w in enumerate(res.watch))
        return _Linted(self.file, self.doc, declared, tuple(watches))

    def _located_resources(self) -> list[tuple[Resource, Where]]:
        """Base resources and those overlays add or patch, each with its location (deduplicated)."""
        raw_list = self.bundle.raw.get("resources")
        where_of: dict[str, Where] = {}
        if isinstance(raw_list, list):
            for i, r in enumerate(raw_list):
                rid = default_resource_id(r) if isinstance(r, Mapping) else None
                if rid is not None:
                    where_of.setdefault(rid, ("resources", i))
        out = [(r, where_of.get(r.id, ("resources",))) for r in self.bundle.resources]
        seen = set(self.bundle.resources)
        for i, ov in enumerate(self.bundle.overlays):
            try:
                resolved = apply_one_overlay(self.bundle, i)
            except BundleError:
                continue  # already reported by the format check
            patched = {p.id: j for j, p in enumerate(ov.resources)}
            for res in resolved.resources:
                if res not in seen:
                    seen.add(res)
                    out.append((res, ("overlays", i, "resources", patched.get(res.id, 0))))
        return out

    def _located_checks(self) -> list[tuple[HealthCheck, Where]]:
        """The bundle's health checks that parse, each with its location (bad ones are format errors)."""
        raw_list = self.bundle.raw.get("health")
        out: list[tuple[HealthCheck, Where]] = []
        for i, raw in enumerate(raw_list if isinstance(raw_list, list) else []):
            try:
                out.append((parse_check(raw, ("health", i)), ("health", i)))
            except BundleError:
                continue  # already reported by the format check
        return out

    def _payload_path(self, rel: str, where: Where) -> Path | None:
        target = self.bdir / rel
        try:
            resolved = target.resolve(strict=True)
        except (OSError, RuntimeError):
            self.err(where, f"payload file {rel} does not exist in bundles/{self.bundle.name}/")
            return None
        if not resolved.is_relative_to(self.bdir.resolve()):
            self.err(where, f"payload {rel} leads outside the bundle directory")
            return None
        if not resolved.is_file():
            self.err(where, f"payload {rel} is not a regular file")
            return None
        return resolved

    def _check_payload(self, res: Resource, where: Where) -> None:
        if isinstance(res, File | SystemdUnit) and res.source is not None:
            self._payload_path(res.source, (*where, "source"))
        if isinstance(res, SecretFile):
            self._check_sealed(res, (*where, "secret"))

    def _check_sealed(self, res: SecretFile, where: Where) -> None:
        path = self.repo_dir / res.secret
        try:
            data = path.read_bytes()
        except OSError as exc:
            self.err(where, f"sealed secret {res.secret} cannot be read: {exc.strerror or exc}")
            return
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            doc = None
        if not isinstance(doc, dict) or doc.get("type") != SEALED_SECRET_TYPE:
            self.err(where, f"{res.secret} is not a sealed secret (no \"type\": \"{SEALED_SECRET_TYPE}\")")

    def _check_overlay_files(self) -> None:
        for i, ov in enumerate(self.bundle.overlays):
            for base, repl in ov.files.items():
                self._payload_path(repl, ("overlays", i, "files", base))

    def _profiles_for(self, selectors: Iterable[Selector]) -> tuple[set[str], bool]:
        named: set[str] = set()
        unnamed = False
        for s in selectors:
            if s.profiles:
                named.update(s.profiles)
            else:
                unnamed = True
        return named, unnamed

    def _check_profiles(self, item: Resource | HealthCheck, subject: str, where: Where) -> None:
        """Report what the named profiles refuse (the agent's own message), or what no profile allows."""
        if not self.profiles:
            return
        named, unnamed = self._profiles_for(self.bundle.targets)
        if not self.bundle.targets:
            unnamed = True
        for name in sorted(named):
            profile = self.profiles.get(name)
            if profile is None:
                continue
            refusal = _refusal_of(item, profile)
            if refusal is not None:
                self.err(where, refusal.message)
        if unnamed:
            refusals = [_refusal_of(item, p) for p in self.profiles.values()]
            if all(r is not None for r in refusals):
                reasons = "; ".join(r.reason for r in refusals if r is not None)
                self.err(where, f"{subject}: no known device profile allows it ({reasons})")

    def _check_templates(self, located: list[tuple[Resource, Where]]) -> None:
        known = set(self.bundle.values) | set(BUILTIN_VALUES)
        for ov in self.bundle.overlays:
            known |= set(ov.values)
        for i, sel in enumerate(self.bundle.targets):
            if not sel.profiles:
                continue
            missing = [p for p in sel.profiles if p not in self.profiles]
            if missing and self.profiles:
                self.err(("targets", i, "profiles"), f"no known device profile named {missing[0]!r}",
                         "warning")
        for res, where in located:
            if not isinstance(res, File) or not res.template:
                continue
            texts: list[tuple[str, str]] = []
            if res.content is not None:
                texts.append(("content", res.content))
            elif res.source is not None:
                sources = {res.source} | {r for ov in self.bundle.overlays for b, r in ov.files.items()
                                          if b == res.source}
                for src in sorted(sources):
                    path = self.bdir / src
                    if path.is_file():
                        try:
                            texts.append((src, path.read_text(encoding="utf-8")))
                        except (OSError, UnicodeDecodeError):
                            self.err((*where, "source"), f"template {src} is not UTF-8 text")
            for label, text in texts:
                for name in _template_names(text):
                    if name is None:
                        self.err(where, f"template {label} has an invalid $ placeholder (write $$ for a $)")
                    elif name not in known and not name.startswith("label_"):
                        self.err(where, f"template {label} refers to unknown value ${{{name}}}")

    def _check_inline_secrets(self, res: Resource, where: Where) -> None:
        content = res.content if isinstance(res, File | SystemdUnit) else None
        if content is None:
            return
        start = self.doc.line((*where, "content"))
        for text_line, reason in _secret_findings(content.splitlines()):
            line = _find_line(self.text_lines, text_line, start)
            if line and self.text_lines[line - 1].rstrip().endswith(ALLOW_SECRET_MARKER):
                continue
            self.report.add(self.file, line or start,
                            f"resource {res.id!r}: inline content contains {reason}; "
                            "use a secret_file with a sealed secret")

    def _check_value_secret(self, where: Where, key: str, value: str) -> None:
        line = self.doc.line(where)
        if any(t.rstrip().endswith(ALLOW_SECRET_MARKER) for t in self.text_lines[line - 1:line]):
            return
        for _text, reason in _secret_findings([f"{key}: {value}"]):
            self.err(where, f"value {key!r} contains {reason}; use a secret_file with a sealed secret")

    def _check_payload_secrets(self) -> None:
        for path in sorted(self.bdir.rglob("*")):
            if path.name == "bundle.yaml" and path.parent == self.bdir:
                continue
            if path.is_symlink() or not path.is_file():
                continue
            data = path.read_bytes()[:_MAX_SCAN_BYTES]
            if b"\x00" in data[:8192]:
                continue
            rel = path.relative_to(self.repo_dir).as_posix()
            lines = _text_lines(data)
            for number, line in enumerate(lines, start=1):
                if line.rstrip().endswith(ALLOW_SECRET_MARKER):
                    continue
                for _text, reason in _secret_findings([line]):
                    self.report.add(rel, number, f"payload contains {reason}; use a secret_file with a "
                                                 "sealed secret")


def _refusal_of(item: Resource | HealthCheck, profile: DeviceProfile) -> Refusal | None:
    """The agent's own refusal of a resource or health check (``None``: the profile allows it)."""
    return resource_refusal(item, profile) if isinstance(item, Resource) else check_refusal(item, profile)


def _text_lines(data: bytes) -> list[str]:
    return data.decode("utf-8", errors="replace").splitlines()


def _find_line(lines: list[str], text: str, start: int) -> int:
    needle = text.strip()
    if not needle:
        return 0
    for i in range(max(0, start - 1), len(lines)):
        if needle in lines[i]:
            return i + 1
    return 0


def _template_names(text: str) -> list[str | None]:
    """Names a string.Template refers to (None for an invalid placeholder)."""
    names: list[str | None] = []
    for m in string.Template.pattern.finditer(text):
        if m.group("invalid") is not None:
            names.append(None)
        elif m.group("named") or m.group("braced"):
            names.append(m.group("named") or m.group("braced"))
    return names


def _is_literal(value: str) -> bool:
    v = value.strip().rstrip(",;").strip()
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
        v = v[1:-1].strip()
    if len(v) < 4 or v.startswith(_PLACEHOLDER_START) or v.lower() in _NOT_LITERAL:
        return False
    if any(c in v for c in "([") or "${" in v or "{{" in v:
        return False
    return not set(v) <= {"*", "x", "X", "."}


def _secret_findings(lines: Iterable[str]) -> list[tuple[str, str]]:
    """Return (line, what) for every line that looks like it holds a plaintext secret.

    Strong patterns (PEM private keys, AWS access key ids, GitHub tokens) always count. An
    assignment ``<name ending in password/passwd/secret/token/api_key> = value`` (or ``:``) counts
    only when the value is a literal of at least 4 characters: placeholders (``${x}``, ``$X``,
    ``{{x}}``, ``<x>``, ``%(x)s``), paths, code calls, ``null``/``changeme`` and masks are not.
    """
    found: list[tuple[str, str]] = []
    for line in lines:
        if line.rstrip().endswith(ALLOW_SECRET_MARKER):
            continue
        for pattern, what in _STRONG_SECRETS:
            if pattern.search(line):
                found.append((line, what))
                break
        else:
            m = _ASSIGNMENT.search(line)
            if m and _is_literal(m.group(2)):
                found.append((line, f"a literal {m.group(1)} assignment"))
    return found


def _lint_cross_bundle(linted: list[_Linted], report: _Report) -> None:
    owners: dict[str, str] = {}
    for item in linted:
        for rid, where in item.declared.items():
            if rid in owners:
                report.add(item.file, item.doc.line(where),
                           f"resource id {rid!r} is also declared in {owners[rid]}; a device targeted by "
                           "both bundles refuses the release", "warning")
            else:
                owners[rid] = item.file
    for item in linted:
        for rid, where in item.watches:
            if rid not in owners:
                report.add(item.file, item.doc.line(where), f"watch names unknown resource id {rid!r}")
