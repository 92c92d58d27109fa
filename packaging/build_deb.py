#!/usr/bin/env python3
"""Build ``edge-agent_<version>_<arch>.deb`` and ``fleet-server_<version>_<arch>.deb`` with ``dpkg-deb``.

Each package carries a self-contained virtual environment under ``/opt/<package>`` made from pinned
wheels (``packaging/requirements-*.txt``) with Debian's own ``/usr/bin/python3``, so a device needs
no network access to install it. The tree is staged under ``packaging/build/<package>/root`` and
packed by ``dpkg-deb --build --root-owner-group``. See ``docs/packaging.md`` for the decisions.

    python3 packaging/build_deb.py                   # both packages into packaging/build/dist
    python3 packaging/build_deb.py --package edge-agent --out DIR
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PACKAGES",
    "BuildError",
    "PackageSpec",
    "build_package",
    "debian_version",
    "main",
    "project_version",
]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_BUILD_DIR = HERE / "build"
DEFAULT_CACHE_DIR = DEFAULT_BUILD_DIR / "cache"
DEFAULT_PYTHON = Path("/usr/bin/python3")
_MANYLINUX = re.compile(r"manylinux_(\d+)_(\d+)_")
_LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
SHTAB = "shtab==1.13.0"
"""Generates the shell completions at build time; it is never installed in a package's venv."""
COMPLETION_PARSERS = {"edge-agent": "edge_agent.cli", "fleetctl": "fleet_server.fleetctl"}
"""The command whose completions a package ships -> the module whose ``build_parser()`` defines it."""
COMPLETION_FILES = {"bash": "usr/share/bash-completion/completions/{cmd}",
                    "zsh": "usr/share/zsh/vendor-completions/_{cmd}",
                    "fish": "usr/share/fish/vendor_completions.d/{cmd}.fish"}


class BuildError(Exception):
    """A step of the package build failed; the message names the step."""


@dataclass(frozen=True)
class PackageSpec:
    """What goes into one binary package."""

    name: str
    summary: str
    description: str
    requirements: str
    commands: tuple[str, ...]
    unit: str
    conffiles: tuple[tuple[str, str], ...]  # (file in packaging/, absolute path on the device)
    extra_depends: tuple[str, ...] = ()
    recommends: tuple[str, ...] = ("systemd",)
    drop_packages: tuple[str, ...] = ()  # top-level import packages removed from the venv
    # compiled modules left out of the venv (dotted names): optional accelerators whose library runs
    # its pure-Python code without them
    drop_extensions: tuple[str, ...] = ()
    ship_profiles: bool = False
    lean_bin: bool = False  # bin/ keeps only the interpreter links and the package's own commands
    optimize: int = 0  # the commands run with -O or -OO, and the venv's byte code is of that level

    @property
    def venv(self) -> str:
        """Where the virtual environment lives on the device."""
        return f"/opt/{self.name}"


PACKAGES: dict[str, PackageSpec] = {
    "edge-agent": PackageSpec(
        name="edge-agent",
        summary="edge-fleet device agent: signed GitOps releases, drift correction, MQTT reports",
        description=(
            "The edge-fleet agent pulls a signed release of the fleet's configuration from a Git\n"
            "mirror, verifies it against the operators' keys, applies it transactionally through\n"
            "local drivers, corrects drift and reports state and health over MQTT.\n"
            "Its Python dependencies travel in a private virtual environment under /opt/edge-agent."
        ),
        requirements="requirements-agent.txt",
        commands=("edge-agent",),
        unit="edge-agent.service",
        conffiles=(("agent.yaml", "/etc/edge-agent/agent.yaml"),),
        drop_packages=("fleet_server",),
        # dulwich's Rust accelerators (tree parsing, pack index search, delta application, tree
        # diffs): resident memory and 2 MB on disk, for no time that a 500-file sync shows
        # (docs/packaging.md); dulwich runs its own Python code without them
        drop_extensions=("dulwich._objects", "dulwich._pack", "dulwich._diff_tree"),
        ship_profiles=True,
        lean_bin=True,
        optimize=2,
    ),
    "fleet-server": PackageSpec(
        name="fleet-server",
        summary="edge-fleet fleet server: device registry, canary rollouts, HTTP API, dashboard",
        description=(
            "The edge-fleet fleet server ingests device reports over MQTT, keeps the device\n"
            "registry in SQLite, rolls signed releases out in canary waves and serves an HTTP API,\n"
            "Prometheus metrics and a web dashboard. Also ships fleetctl.\n"
            "Its Python dependencies travel in a private virtual environment under /opt/fleet-server."
        ),
        requirements="requirements-server.txt",
        commands=("fleet-server", "fleetctl"),
        unit="fleet-server.service",
        conffiles=(("server.yaml", "/etc/fleet-server/server.yaml"),),
        extra_depends=("adduser",),
        recommends=("systemd", "git"),  # fleetctl release sign/verify list a work tree with git
    ),
}


def _run(argv: list[str], step: str, *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-20:]
        raise BuildError(f"{step} failed (exit {proc.returncode}): " + "\n".join(detail))
    return proc.stdout


def _say(text: str) -> None:
    sys.stderr.write(f"build_deb: {text}\n")


def project_version(pyproject: Path = REPO / "pyproject.toml") -> str:
    """Return ``project.version`` from ``pyproject.toml``.

    Raises:
        BuildError: the file has no project version.
    """
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    version = data.get("project", {}).get("version")
    if not isinstance(version, str) or not version:
        raise BuildError(f"{pyproject}: no project.version")
    return version


def debian_version(pep440: str) -> str:
    """Map a PEP 440 version to a Debian one that sorts the same (``1.0rc1`` -> ``1.0~rc1``).

    Raises:
        BuildError: the version has characters Debian does not allow.
    """
    text = pep440.strip().lower().replace("-", ".")
    text = re.sub(r"\.?(dev|a|b|rc)(\d*)", r"~\1\2", text)
    text = text.replace("+", "+local")
    if not re.fullmatch(r"[0-9][A-Za-z0-9.+~]*", text):
        raise BuildError(f"cannot turn version {pep440!r} into a Debian version")
    return text


def _architecture() -> str:
    return _run(["dpkg", "--print-architecture"], "dpkg --print-architecture").strip()


def _min_glibc(wheels: list[Path]) -> tuple[int, int] | None:
    """The newest glibc any of the wheels needs (each wheel needs the oldest of its own tags)."""
    need: tuple[int, int] | None = None
    for wheel in wheels:
        platform = wheel.stem.split("-")[-1]
        versions = [(int(a), int(b)) for a, b in _MANYLINUX.findall(platform + "_")]
        versions += [v for tag, v in _LEGACY_MANYLINUX.items() if tag + "_" in platform]
        if versions:
            oldest = min(versions)
            need = oldest if need is None else max(need, oldest)
    return need


def _python_minor(python: Path) -> str:
    out = _run([str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], "python version")
    return out.strip()


def _stdlib_dir(python: Path) -> str:
    out = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"], "python stdlib")
    return out.strip()


def _copy_sources(build_dir: Path) -> Path:
    """Copy the files the project's wheel is built from, without caches or stray build output."""
    src = build_dir / "src"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("edge_core", "edge_agent", "fleet_server"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    return src


def _tools_pip(cache_dir: Path, python: Path) -> Path:
    """A build-only venv whose pip downloads and installs the wheels (made with the target python)."""
    tools = cache_dir / f"tools-venv-{python.name}"
    pip = tools / "bin" / "pip"
    if not pip.exists():
        _run([str(python), "-m", "venv", str(tools)], "create the build tools venv (needs python3-venv)")
    return pip


def _shtab_path(cache_dir: Path, pip: Path) -> Path:
    """Install :data:`SHTAB` (pure Python, no dependencies) into a build-only directory; return it."""
    target = cache_dir / "shtab"
    if not (target / "shtab").is_dir():
        _run([str(pip), "install", "--quiet", "--no-deps", "--target", str(target), SHTAB],
             f"install {SHTAB} for the shell completions")
    return target


def _write_completions(spec: PackageSpec, root: Path, shtab_dir: Path) -> list[Path]:
    """Write bash, zsh and fish completions of each command of ``spec`` that has a parser, generated
    by shtab from the argparse parser with the package's own venv (shtab is put on its path only for
    this step, so the installed venv does not carry it)."""
    python = root / spec.venv.lstrip("/") / "bin" / "python"
    env = {**os.environ, "PYTHONPATH": str(shtab_dir), "PYTHONDONTWRITEBYTECODE": "1"}
    written: list[Path] = []
    for cmd in spec.commands:
        module = COMPLETION_PARSERS.get(cmd)
        if module is None:
            continue
        for shell, pattern in COMPLETION_FILES.items():
            code = (f"import importlib, shtab, sys; parser = importlib.import_module({module!r})"
                    f".build_parser(); parser.prog = {cmd!r}; sys.stdout.write(shtab.complete(parser, "
                    f"{shell!r}))")
            text = _run([str(python), "-c", code], f"generate the {shell} completion of {cmd}", env=env)
            dest = root / pattern.format(cmd=cmd)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text, encoding="utf-8")
            written.append(dest)
    return written


def _project_wheel(build_dir: Path, pip: Path) -> Path:
    src = _copy_sources(build_dir)
    dist = build_dir / "dist-wheel"
    if dist.exists():
        shutil.rmtree(dist)
    _run([str(pip), "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dist), str(src)],
         "build the edge-fleet wheel")
    wheels = sorted(dist.glob("edge_fleet-*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"expected one edge-fleet wheel in {dist}, found {len(wheels)}")
    shutil.rmtree(src)
    return wheels[0]


def _download_wheels(cache_dir: Path, pip: Path, requirements: Path) -> list[Path]:
    """Fetch the pinned binary wheels into the wheelhouse (reused when already there)."""
    house = cache_dir / "wheelhouse"
    house.mkdir(parents=True, exist_ok=True)
    _run([str(pip), "download", "--quiet", "--only-binary=:all:", "--no-deps", "--dest", str(house),
          "--requirement", str(requirements)], f"download the wheels of {requirements.name}")
    return sorted(house.glob("*.whl"))


def _rewrite_record(dist_info: Path, removed: set[str]) -> None:
    """Drop ``removed`` (paths relative to site-packages) from a dist-info RECORD."""
    record = dist_info / "RECORD"
    rows = list(csv.reader(io.StringIO(record.read_text(encoding="utf-8"))))
    def gone(name: str) -> bool:
        return any(name == p or name.startswith(p.rstrip("/") + "/") for p in removed)

    kept = [r for r in rows if r and not gone(r[0])]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(kept)
    record.write_text(out.getvalue(), encoding="utf-8")


def _make_venv(spec: PackageSpec, root: Path, cache_dir: Path, python: Path, project: Path) -> list[Path]:
    """Create ``/opt/<name>`` in the staging root, install the pinned wheels, fix its paths.

    Returns the wheels installed (their platform tags decide the libc6 dependency).
    """
    venv = root / spec.venv.lstrip("/")
    pip = _tools_pip(cache_dir, python)
    requirements = HERE / spec.requirements
    wheels = _download_wheels(cache_dir, pip, requirements)
    _run([str(python), "-m", "venv", "--without-pip", str(venv)], "create the package venv")
    vpy = venv / "bin" / "python"
    _run([str(pip), "--python", str(vpy), "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
          "--no-warn-script-location", "--find-links", str(cache_dir / "wheelhouse"),
          "--requirement", str(requirements), str(project)], "install the wheels into the package venv")
    _run([str(pip), "--python", str(vpy), "check"], "pip check of the package venv")
    site = next((venv / "lib").glob("python3*/site-packages"))
    for pkg in spec.drop_packages:
        shutil.rmtree(site / pkg)
    _drop_extensions(site, spec.drop_extensions)
    for info in site.glob("*.dist-info"):
        direct = info / "direct_url.json"
        if direct.exists():
            direct.unlink()
            _rewrite_record(info, {f"{info.name}/direct_url.json"})
        if info.name.startswith("edge_fleet-"):
            dropped = {f"{p}/" for p in spec.drop_packages}
            for cmd in ("fleetctl", "fleet-server", "edge-agent"):
                if cmd not in spec.commands:
                    (venv / "bin" / cmd).unlink(missing_ok=True)
                    dropped.add(f"../../../bin/{cmd}")
            _rewrite_record(info, dropped)
    if spec.lean_bin:
        _lean_bin(venv, site, spec.commands)
    _relocate(venv, spec.venv)
    for cmd in spec.commands:
        if not (venv / "bin" / cmd).exists():
            raise BuildError(f"console script {cmd} missing from the package venv")
        if spec.optimize:
            _add_interpreter_flag(venv / "bin" / cmd, "-" + "O" * spec.optimize)
    _run([str(vpy), "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "checked-hash",
          "-o", str(spec.optimize), "-s", str(root), "-p", "/", str(site)], "byte-compile the package venv")
    names = _requirement_names(requirements)
    return [w for w in wheels if w.name.split("-")[0].lower().replace("_", "-") in names]


def _drop_extensions(site: Path, modules: tuple[str, ...]) -> None:
    """Remove the compiled files of ``modules`` (dotted names) from ``site``, and their ``RECORD`` lines.

    Raises:
        BuildError: a module's package is not in the venv (a misspelt name would otherwise ship the
            files it meant to leave out).
    """
    removed: set[str] = set()
    for module in modules:
        package, _, name = module.rpartition(".")
        where = site / package.replace(".", "/")
        if not where.is_dir():
            raise BuildError(f"drop_extensions: no package {package} in the venv")
        for lib in sorted(where.glob(f"{name}.*.so")):
            lib.unlink()
            removed.add(lib.relative_to(site).as_posix())
    for info in site.glob("*.dist-info"):
        _rewrite_record(info, removed)


def _lean_bin(venv: Path, site: Path, commands: tuple[str, ...]) -> None:
    """Remove from ``bin/`` what the package never runs: the activate scripts (``Activate.ps1``
    among them) and the console scripts of its dependencies (dulwich's, cffi's); keep the
    interpreter links and ``commands``. Their ``RECORD`` lines go too."""
    removed: set[str] = set()
    for entry in sorted((venv / "bin").iterdir()):
        if entry.name in commands or entry.name.startswith("python"):
            continue
        entry.unlink()
        removed.add(f"../../../bin/{entry.name}")
    for info in site.glob("*.dist-info"):
        _rewrite_record(info, removed)


def _add_interpreter_flag(script: Path, flag: str) -> None:
    """Append ``flag`` to the ``#!`` line of a console script (Linux passes it as one argument).

    Raises:
        BuildError: the script has no ``#!`` line naming a python, or already carries an argument.
    """
    first, sep, rest = script.read_bytes().partition(b"\n")
    if not first.startswith(b"#!") or b" " in first or not first.rsplit(b"/", 1)[-1].startswith(b"python"):
        raise BuildError(f"{script}: unexpected #! line {first!r}")
    script.write_bytes(first + b" " + flag.encode() + sep + rest)


def _requirement_names(requirements: Path) -> set[str]:
    names: set[str] = set()
    for raw in requirements.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            names.add(re.split(r"[=<>!~ ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def _relocate(venv: Path, final: str) -> None:
    """Replace the staging path of the venv by its final path in pyvenv.cfg and bin/ scripts.

    Raises:
        BuildError: a file still names the staging path afterwards.
    """
    staged = str(venv).encode()
    targets = [venv / "pyvenv.cfg", *sorted(p for p in (venv / "bin").iterdir() if not p.is_symlink())]
    for path in targets:
        data = path.read_bytes()
        if staged in data:
            path.write_bytes(data.replace(staged, final.encode()))
    for dirpath, _dirs, files in os.walk(venv):
        for name in files:
            p = Path(dirpath) / name
            if not p.is_symlink() and staged in p.read_bytes():
                raise BuildError(f"{p} still names the staging path after relocation")


def _normalise_modes(root: Path) -> None:
    """Directories 0755, executables 0755, other files 0644, whatever the builder's umask was."""
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            p = Path(dirpath) / d
            if not p.is_symlink():
                p.chmod(0o755)
        for f in files:
            p = Path(dirpath) / f
            if p.is_symlink():
                continue
            mode = p.stat().st_mode
            p.chmod(0o755 if mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH) else 0o644)
    root.chmod(0o755)


def _installed_size_kib(root: Path) -> int:
    total = 0
    for dirpath, dirs, files in os.walk(root):
        if Path(dirpath) == root / "DEBIAN":
            dirs.clear()
            continue
        for f in files:
            p = Path(dirpath) / f
            total += p.lstat().st_size if not p.is_symlink() else 1
        total += 1024 * len(dirs)
    return (total + 1023) // 1024


def _control(spec: PackageSpec, version: str, arch: str, *, python_minor: str,
             glibc: tuple[int, int] | None, size_kib: int) -> str:
    depends = [f"python{python_minor}", f"python3 (>= {python_minor})"]
    if glibc is not None:
        depends.append(f"libc6 (>= {glibc[0]}.{glibc[1]})")
    depends += list(spec.extra_depends)
    return (
        f"Package: {spec.name}\n"
        f"Version: {version}\n"
        f"Architecture: {arch}\n"
        "Maintainer: edge-fleet maintainers <maintainers@edge-fleet.invalid>\n"
        f"Installed-Size: {size_kib}\n"
        f"Depends: {', '.join(depends)}\n"
        f"Recommends: {', '.join(spec.recommends)}\n"
        "Section: admin\n"
        "Priority: optional\n"
        "Homepage: https://edge-fleet.invalid/\n"
        f"Description: {spec.summary}\n"
        + "".join(f" {line}\n" if line else " .\n" for line in spec.description.splitlines())
    )


def _stage(spec: PackageSpec, root: Path, stdlib: str) -> None:
    """Copy the unit, conffiles, profiles, maintainer scripts and command links into the root;
    ``stdlib`` is the interpreter's standard-library directory (a dpkg trigger watches it)."""
    unit = root / "lib" / "systemd" / "system" / spec.unit
    unit.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / spec.unit, unit)
    for source, target in spec.conffiles:
        dest = root / target.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(HERE / source, dest)
    if spec.ship_profiles:
        profiles = root / "usr" / "share" / spec.name / "profiles"
        profiles.mkdir(parents=True)
        for prof in sorted((REPO / "device_profiles").glob("*.yaml")):
            shutil.copyfile(prof, profiles / prof.name)
    bindir = root / "usr" / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    for cmd in spec.commands:
        (bindir / cmd).symlink_to(f"{spec.venv}/bin/{cmd}")
    doc = root / "usr" / "share" / "doc" / spec.name
    doc.mkdir(parents=True)
    shutil.copyfile(REPO / "README.md", doc / "README.md")
    debian = root / "DEBIAN"
    debian.mkdir()
    for script in ("postinst", "prerm", "postrm"):
        shutil.copyfile(HERE / spec.name / "DEBIAN" / script, debian / script)
        (debian / script).chmod(0o755)
    (debian / "conffiles").write_text("".join(f"{t}\n" for _s, t in spec.conffiles), encoding="utf-8")
    if spec.optimize:
        # postinst writes the optimised byte code of the standard library again whenever a package
        # changes files under it (an upgrade of the interpreter drops that byte code).
        (debian / "triggers").write_text(f"interest-noawait {stdlib}\n", encoding="utf-8")


def build_package(spec: PackageSpec, out_dir: Path, *, build_dir: Path = DEFAULT_BUILD_DIR,
                  cache_dir: Path = DEFAULT_CACHE_DIR, python: Path = DEFAULT_PYTHON) -> Path:
    """Stage ``build_dir/<name>/root`` and pack it into ``out_dir``; return the path of the ``.deb``.

    ``cache_dir`` keeps the downloaded wheels and the build tools venv between builds.

    Raises:
        BuildError: any step failed (named in the message).
    """
    python = python.resolve()  # bind the venv to python3.X itself, not to whatever python3 becomes
    version = debian_version(project_version())
    arch = _architecture()
    minor = _python_minor(python)
    pkg_build = build_dir / spec.name
    if pkg_build.exists():
        shutil.rmtree(pkg_build)
    root = pkg_build / "root"
    root.mkdir(parents=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    pip = _tools_pip(cache_dir, python)
    _say(f"{spec.name} {version} ({arch}): building the edge-fleet wheel")
    project = _project_wheel(pkg_build, pip)
    _say(f"{spec.name}: installing pinned wheels into {spec.venv}")
    wheels = _make_venv(spec, root, cache_dir, python, project)
    _stage(spec, root, _stdlib_dir(python))
    _write_completions(spec, root, _shtab_path(cache_dir, pip))
    _normalise_modes(root)
    for script in ("postinst", "prerm", "postrm"):
        (root / "DEBIAN" / script).chmod(0o755)
    control = _control(spec, version, arch, python_minor=minor, glibc=_min_glibc(wheels),
                       size_kib=_installed_size_kib(root))
    (root / "DEBIAN" / "control").write_text(control, encoding="utf-8")
    out_dir.mkdir(parents=True, exist_ok=True)
    deb = out_dir / f"{spec.name}_{version}_{arch}.deb"
    # xz at level 3: every dpkg reads it; 3x faster than the default level 6 for 15% more bytes.
    _run(["dpkg-deb", "--build", "--root-owner-group", "-Zxz", "-z3", str(root), str(deb)],
         "dpkg-deb --build")
    _say(f"wrote {deb}")
    return deb


def main(argv: list[str] | None = None) -> int:
    """Command line: build the named packages (default all); print the .deb paths."""
    parser = argparse.ArgumentParser(prog="build_deb.py", description="Build the edge-fleet .deb packages.")
    parser.add_argument("--package", action="append", choices=sorted(PACKAGES),
                        help="package to build (repeatable; default: all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_BUILD_DIR / "dist", help="output directory")
    parser.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR, help="staging directory")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                        help="downloaded wheels and the build tools venv, kept between builds")
    parser.add_argument("--python", type=Path, default=DEFAULT_PYTHON,
                        help="the Debian interpreter the venv is built with (default /usr/bin/python3)")
    args = parser.parse_args(argv)
    try:
        for name in args.package or sorted(PACKAGES):
            deb = build_package(PACKAGES[name], args.out.resolve(), build_dir=args.build_dir.resolve(),
                                cache_dir=args.cache_dir.resolve(), python=args.python)
            sys.stdout.write(f"{deb}\n")
    except BuildError as exc:
        sys.stderr.write(f"build_deb: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
