"""Build the installable Blender extension zips, one per platform.

    python scripts/build_extension.py --out DIR [--platform NAME ...] [--offline]

Each zip (``blender_taskqueue-<version>-<platform>.zip``, named like Blender's
own ``extension build --split-platforms``) holds, at its root:

- the contents of the package folder ``blender_taskqueue/`` (no ``__pycache__``,
  no ``*.pyc``), so Blender imports it as ``bl_ext.<repo>.blender_taskqueue``;
- ``blender_manifest.toml``: the repo's manifest plus the generated top-level
  ``platforms = [...]`` and ``wheels = [...]``, everything else kept;
- ``wheels/``: the unmodified wheels of the pins in
  ``scripts/extension_wheels.toml`` for that platform, for every Python listed
  there (3.11 for Blender 4.2 to 5.0, 3.13 for Blender 5.1+).

Wheels are fetched by package name with ``pip download`` into a cache folder
(``build/wheel-cache`` by default; ``--offline`` uses only the cache). pip can
hand back a wheel that does not fit the platform asked for (e.g. a pure-Python
pydantic-core placeholder), so every wheel in a zip is checked:

- its file name parses, its name and version are the pinned ones;
- its tags fit the target: CPython ``cpXY-cpXY`` for that very Python, or
  ``abi3``, or pure ``py3-none-any``; platform ``manylinux`` x86_64 up to glibc
  2.28 (what Blender 4.2+ needs), ``win_amd64``, or ``macosx`` up to 11.0 for
  the CPU (or ``universal2``);
- Blender's own installer (``_extensions_wheel_filter_for_this_system`` in
  ``scripts/addons_core/bl_pkg/bl_extension_ops.py``, mirrored here) picks
  exactly one wheel of each distribution for each (platform, Python);
- compiled distributions hold native modules whose binary format (ELF, PE,
  Mach-O) and CPU match the platform, and whose ``.cpython-XY`` suffix matches
  the Python; a pure wheel holds no native code;
- its ``Requires-Python`` admits the target Python, and every requirement in
  its ``Requires-Dist`` that applies there is pinned, at a version it accepts.

Any mismatch stops the build with a message naming the wheel and the reason.
Exit codes: 0 built, 1 refused or failed (message on stderr), 2 bad arguments,
3 a download failed because the package index could not be reached.

The manifest's permissions must be a table of reasons (Blender 4.2+ schema);
they are checked here with Blender's rules (known names, at most 64
characters, no trailing punctuation).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = ROOT / "blender_taskqueue"
MANIFEST_PATH = ROOT / "blender_manifest.toml"
PINS_PATH = ROOT / "scripts" / "extension_wheels.toml"
DEFAULT_CACHE = ROOT / "build" / "wheel-cache"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NETWORK = 3

# Blender 4.2+ official Linux builds need glibc 2.28 (VFX reference platform
# 2024), and its macOS builds need macOS 11.2: wheels built for newer systems
# would not load on every machine Blender runs on.
MANYLINUX_MAX_GLIBC_MINOR = 28
MACOS_MAX = (11, 0)

# Blender's manifest rules (bl_pkg/cli/blender_ext.py): permission names and
# the limit on a permission's reason.
PERMISSION_NAMES = frozenset({"files", "network", "clipboard", "camera", "microphone"})
TERSE_DESCRIPTION_MAX_LENGTH = 64

# Fixed timestamp for zip entries, so the same inputs make the same zip.
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)


class BuildError(Exception):
    """The build was refused or failed; the message says why."""


class NetworkError(BuildError):
    """pip could not reach the package index."""


# --------------------------------------------------------------------------
# TOML (tomllib is 3.11+; this script also runs on 3.10)


def _toml_loads(text: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef,assignment]
        except ModuleNotFoundError:
            from pip._vendor import tomli as tomllib  # type: ignore[no-redef,assignment]
    return tomllib.loads(text)


def _toml_string(value: str) -> str:
    # A TOML basic string; wheel names and platform names are plain ASCII.
    if not value.isascii() or any(c in value for c in '"\\') or not value.isprintable():
        raise BuildError(f"refusing to write {value!r} into the manifest")
    return f'"{value}"'


# --------------------------------------------------------------------------
# packaging (markers, specifiers): the real library if installed, else pip's copy


def _packaging() -> tuple[Any, Any, Any]:
    try:
        from packaging.requirements import Requirement
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version
    except ModuleNotFoundError:
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef,assignment]
        from pip._vendor.packaging.specifiers import SpecifierSet  # type: ignore[no-redef,assignment]
        from pip._vendor.packaging.version import Version  # type: ignore[no-redef,assignment]
    return Requirement, SpecifierSet, Version


def normalize_name(name: str) -> str:
    """PEP 503 name: ``Typing_Extensions`` -> ``typing-extensions``."""
    return re.sub(r"[-_.]+", "-", name).lower()


# --------------------------------------------------------------------------
# Targets


@dataclasses.dataclass(frozen=True)
class Platform:
    """One of Blender's extension platforms and what fits it."""

    name: str  # Blender's name, e.g. "linux-x64"
    wheel_tags: tuple[str, ...]  # platform tags a wheel may carry (pip gets these)
    blender_sysconfig: str  # sysconfig.get_platform() in that Blender, "-" -> "_"
    binary_format: str  # "elf" | "pe" | "macho"
    cpu: str  # "x86_64" | "arm64"
    markers: dict[str, str]  # PEP 508 environment markers of that system

    @property
    def file_suffix(self) -> str:
        return self.name.replace("-", "_")


def _manylinux_tags() -> tuple[str, ...]:
    tags = [f"manylinux_2_{m}_x86_64" for m in range(MANYLINUX_MAX_GLIBC_MINOR, 4, -1)]
    return (*tags, "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64")


def _macos_tags(cpu: str) -> tuple[str, ...]:
    # macOS 11+ wheels are tagged X_0; 10.x ones carry the minor version.
    versions = [(major, 0) for major in range(MACOS_MAX[0], 10, -1)]
    versions += [(10, minor) for minor in range(16, 3, -1)]
    tags: list[str] = []
    for major, minor in versions:
        if cpu == "x86_64" or major >= 11:  # no arm64 wheel predates macOS 11
            tags.append(f"macosx_{major}_{minor}_{cpu}")
        tags.append(f"macosx_{major}_{minor}_universal2")
    return tuple(tags)


def _markers(sys_platform: str, system: str, machine: str, os_name: str) -> dict[str, str]:
    return {
        "sys_platform": sys_platform,
        "platform_system": system,
        "platform_machine": machine,
        "os_name": os_name,
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }


PLATFORMS: dict[str, Platform] = {
    p.name: p
    for p in (
        Platform(
            "linux-x64", _manylinux_tags(), "linux_x86_64", "elf", "x86_64",
            _markers("linux", "Linux", "x86_64", "posix"),
        ),
        Platform(
            "windows-x64", ("win_amd64",), "win_amd64", "pe", "x86_64",
            _markers("win32", "Windows", "AMD64", "nt"),
        ),
        Platform(
            "macos-arm64", _macos_tags("arm64"), "macosx_11.0_arm64", "macho", "arm64",
            _markers("darwin", "Darwin", "arm64", "posix"),
        ),
        Platform(
            "macos-x64", _macos_tags("x86_64"), "macosx_11.0_x86_64", "macho", "x86_64",
            _markers("darwin", "Darwin", "x86_64", "posix"),
        ),
    )
}


def python_tuple(version: str) -> tuple[int, int]:
    major, _, minor = version.partition(".")
    return int(major), int(minor)


# --------------------------------------------------------------------------
# Pins


@dataclasses.dataclass(frozen=True)
class Pins:
    """The contents of ``scripts/extension_wheels.toml``."""

    pythons: tuple[str, ...]
    packages: dict[str, str]  # normalized name -> exact version
    compiled: frozenset[str]

    @classmethod
    def load(cls, path: Path = PINS_PATH) -> Pins:
        data = _toml_loads(path.read_text(encoding="utf-8"))
        try:
            pythons = tuple(data["python"])
            packages = {normalize_name(k): str(v) for k, v in data["packages"].items()}
            compiled = frozenset(normalize_name(n) for n in data.get("compiled", ()))
        except (KeyError, TypeError, AttributeError) as exc:
            raise BuildError(f"{path}: expected `python`, `compiled` and [packages]: {exc}") from exc
        for version in packages.values():
            if not re.fullmatch(r"\d+(\.\d+)*", version):
                raise BuildError(f"{path}: pins must be exact release versions, found {version!r}")
        for py in pythons:
            if not re.fullmatch(r"3\.\d+", py):
                raise BuildError(f"{path}: python versions look like \"3.11\", found {py!r}")
        if unknown := compiled - packages.keys():
            raise BuildError(f"{path}: `compiled` names unpinned packages: {sorted(unknown)}")
        return cls(pythons, packages, compiled)


# --------------------------------------------------------------------------
# Wheel file names and tags


@dataclasses.dataclass(frozen=True)
class WheelName:
    """A parsed wheel file name (``{name}-{version}(-{build})?-{py}-{abi}-{plat}.whl``)."""

    filename: str
    name: str  # normalized
    version: str
    python_tags: tuple[str, ...]
    abi_tags: tuple[str, ...]
    platform_tags: tuple[str, ...]

    @classmethod
    def parse(cls, filename: str) -> WheelName:
        if not filename.endswith(".whl"):
            raise BuildError(f"{filename}: not a wheel")
        parts = filename[:-4].split("-")
        if len(parts) not in (5, 6):
            raise BuildError(f"{filename}: not a valid wheel file name")
        name, version = parts[0], parts[1]
        py, abi, plat = parts[-3:]
        return cls(
            filename, normalize_name(name), version,
            tuple(py.split(".")), tuple(abi.split(".")), tuple(plat.split(".")),
        )

    @property
    def is_pure(self) -> bool:
        return self.platform_tags == ("any",)


def _python_abi_fits(py_tag: str, abi_tag: str, python: tuple[int, int]) -> bool:
    major, minor = python
    cp = f"cp{major}{minor}"
    if abi_tag == cp:
        return py_tag == cp
    if abi_tag == "abi3":
        m = re.fullmatch(r"cp3(\d+)", py_tag)
        return major == 3 and m is not None and int(m.group(1)) <= minor
    if abi_tag == "none":
        return py_tag in {f"py{major}", f"py{major}{minor}", cp}
    return False


def tags_fit(wheel: WheelName, platform: Platform, python: tuple[int, int]) -> bool:
    """True if one of the wheel's (python, abi, platform) tags fits the target."""
    accepted = {"any", *platform.wheel_tags}
    return any(
        plat in accepted and _python_abi_fits(py, abi, python)
        for py, abi, plat in itertools.product(wheel.python_tags, wheel.abi_tags, wheel.platform_tags)
    )


def blender_selects(
    filename: str, platform: Platform, python: tuple[int, int], *, check_python: bool = True
) -> bool:
    """Would Blender's installer use this wheel on ``platform`` with ``python``?

    A copy of the rules of ``_extensions_wheel_filter_for_this_system`` in
    ``scripts/addons_core/bl_pkg/bl_extension_ops.py`` (Blender 4.2.13+, 4.3+):
    the platform tag is compared as a whole string (the glibc and macOS
    versions are ignored), the Python tag must name this minor version, or the
    major version only, or an older one with the ``abi3`` ABI. Blender 4.2.0
    skips the Python check (``check_python=False``).
    """
    py_tag, abi_tag, plat_tag = filename[:-4].split("-")[-3:]
    current = platform.blender_sysconfig
    if plat_tag in {"any", current}:
        pass
    elif current.startswith("macosx_") and plat_tag.startswith("macosx_") and (
        plat_tag.endswith("_" + current.rpartition("_")[2]) or plat_tag.endswith("_universal2")
    ):
        pass
    elif current.startswith("linux_") and plat_tag.startswith("manylinux") and (
        plat_tag.endswith("_" + current.partition("_")[2])
    ):
        pass
    else:
        return False
    if not check_python:
        return True
    stable_abi = any(t.startswith("abi") and t[3:].isdigit() and int(t[3:]) == python[0] for t in abi_tag.split("."))
    for tag in py_tag.split("."):
        m = re.fullmatch(r"(py|cp)(\d)(\d*)", tag)
        if m is None:
            return False
        major, minor = int(m.group(2)), m.group(3)
        if not minor:
            if major == python[0]:
                return True
        elif (major, int(minor)) == python or (stable_abi and python >= (major, int(minor))):
            return True
    return False


# --------------------------------------------------------------------------
# Wheel contents: native code and metadata

_ELF_MACHINES = {62: "x86_64", 183: "arm64"}
_PE_MACHINES = {0x8664: "x86_64", 0xAA64: "arm64", 0x14C: "x86"}
_MACHO_CPUS = {0x01000007: "x86_64", 0x0100000C: "arm64"}


def native_cpus(head: bytes) -> tuple[str, set[str]] | None:
    """(binary format, CPUs) of a native library from its first bytes, None if not one."""
    if head[:4] == b"\x7fELF" and len(head) >= 20:
        byteorder = "<" if head[5] == 1 else ">"
        (machine,) = struct.unpack(byteorder + "H", head[18:20])
        return "elf", {_ELF_MACHINES.get(machine, f"elf-machine-{machine}")}
    if head[:2] == b"MZ" and len(head) >= 64:
        (offset,) = struct.unpack("<I", head[60:64])
        if head[offset:offset + 4] == b"PE\0\0" and len(head) >= offset + 6:
            (machine,) = struct.unpack("<H", head[offset + 4:offset + 6])
            return "pe", {_PE_MACHINES.get(machine, f"pe-machine-{machine:#x}")}
        return "pe", {"unknown"}
    if head[:4] in (b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe"):  # thin Mach-O, little-endian
        (cpu,) = struct.unpack("<I", head[4:8])
        return "macho", {_MACHO_CPUS.get(cpu, f"macho-cpu-{cpu:#x}")}
    if head[:4] == b"\xca\xfe\xba\xbe":  # fat (universal) Mach-O, big-endian
        (count,) = struct.unpack(">I", head[4:8])
        cpus = set()
        for i in range(min(count, 16)):
            (cpu,) = struct.unpack(">I", head[8 + 20 * i:12 + 20 * i])
            cpus.add(_MACHO_CPUS.get(cpu, f"macho-cpu-{cpu:#x}"))
        return "macho", cpus
    return None


def _is_native_name(member: str) -> bool:
    base = member.rsplit("/", 1)[-1]
    return base.endswith((".so", ".pyd", ".dylib", ".dll")) or ".so." in base


def _extension_python(member: str) -> tuple[int, int] | None:
    """The Python an extension module's file name is built for (``.cpython-311-``, ``.cp311-``)."""
    m = re.search(r"\.(?:cpython-|cp)(\d)(\d+)[-.]", member.rsplit("/", 1)[-1])
    return (int(m.group(1)), int(m.group(2))) if m else None


def _read_metadata(zf: zipfile.ZipFile, wheel: WheelName) -> dict[str, list[str]]:
    names = [n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
    if len(names) != 1:
        raise BuildError(f"{wheel.filename}: expected one *.dist-info/METADATA, found {names}")
    fields: dict[str, list[str]] = {}
    for line in zf.read(names[0]).decode("utf-8").splitlines():
        if not line.strip():
            break  # the description follows the headers
        key, sep, value = line.partition(":")
        if sep and not key.startswith((" ", "\t")):
            fields.setdefault(key.strip(), []).append(value.strip())
    return fields


def check_wheel(path: Path, platform: Platform, pythons: Sequence[str], pins: Pins) -> list[str]:
    """Every reason this wheel does not belong in the ``platform`` zip ([] if it does)."""
    Requirement, SpecifierSet, Version = _packaging()
    wheel = WheelName.parse(path.name)
    errors: list[str] = []

    def fail(message: str) -> None:
        errors.append(f"{path.name}: {message}")

    pinned = pins.packages.get(wheel.name)
    if pinned is None:
        fail("not a pinned package")
        return errors
    try:
        if Version(wheel.version) != Version(pinned):
            fail(f"version {wheel.version}, pinned {pinned}")
    except ValueError:
        fail(f"version {wheel.version!r} does not parse")
        return errors
    fits = [py for py in pythons if tags_fit(wheel, platform, python_tuple(py))]
    if not fits:
        fail(
            f"tags {'.'.join(wheel.python_tags)}-{'.'.join(wheel.abi_tags)}-{'.'.join(wheel.platform_tags)} "
            f"do not fit {platform.name} with Python {' or '.join(pythons)}"
        )
    if wheel.name in pins.compiled and wheel.is_pure:
        fail("a pure-Python wheel of a compiled package (a placeholder?): refused")

    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        fail(f"not a zip file: {exc}")
        return errors
    with zf:
        natives = [n for n in zf.namelist() if _is_native_name(n)]
        if wheel.is_pure and natives:
            fail(f"tagged pure Python but holds native code: {natives[:3]}")
        if wheel.name in pins.compiled and not any(n.endswith((".so", ".pyd")) for n in natives):
            fail("a compiled package without any extension module: refused")
        for member in natives:
            found = native_cpus(zf.open(member).read(4096))
            if found is None:
                fail(f"{member} is not a native library")
                continue
            fmt, cpus = found
            if fmt != platform.binary_format or platform.cpu not in cpus:
                fail(f"{member} is {fmt} for {'/'.join(sorted(cpus))}, {platform.name} needs "
                     f"{platform.binary_format} for {platform.cpu}")
            built_for = _extension_python(member)
            if fits and built_for is not None and f"{built_for[0]}.{built_for[1]}" not in fits:
                fail(f"{member} is built for Python {built_for[0]}.{built_for[1]}, "
                     f"the wheel's tags say {' or '.join(fits)}")

        meta = _read_metadata(zf, wheel)
    if [normalize_name(n) for n in meta.get("Name", [])] != [wheel.name]:
        fail(f"METADATA names {meta.get('Name')}, the file name {wheel.name}")
    if [Version(v) for v in meta.get("Version", [])] != [Version(wheel.version)]:
        fail(f"METADATA version {meta.get('Version')}, the file name {wheel.version}")
    for py in fits:
        environment = {**platform.markers, "python_version": py, "python_full_version": f"{py}.0", "extra": ""}
        for spec in meta.get("Requires-Python", []):
            if not SpecifierSet(spec).contains(f"{py}.0"):
                fail(f"Requires-Python {spec} excludes Python {py}")
        for line in meta.get("Requires-Dist", []):
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(environment):
                continue
            dep = normalize_name(req.name)
            if dep not in pins.packages:
                fail(f"needs {line!r} on Python {py}, which is not pinned in {PINS_PATH.name}")
            elif not req.specifier.contains(pins.packages[dep], prereleases=True):
                fail(f"needs {line!r}, pinned {dep}=={pins.packages[dep]}")
    return errors


def check_wheel_set(paths: Sequence[Path], platform: Platform, pins: Pins) -> list[str]:
    """Check every wheel, and that Blender picks exactly one of each pin per Python."""
    errors: list[str] = []
    for path in paths:
        errors += check_wheel(path, platform, pins.pythons, pins)
    for py in pins.pythons:
        chosen: dict[str, list[str]] = {}
        for path in paths:
            if blender_selects(path.name, platform, python_tuple(py)):
                chosen.setdefault(WheelName.parse(path.name).name, []).append(path.name)
        for name in sorted(pins.packages):
            picks = chosen.get(name, [])
            if len(picks) != 1:
                errors.append(
                    f"{platform.name}, Python {py}: Blender's installer would pick "
                    f"{len(picks)} wheels of {name} (want 1): {picks}"
                )
    return errors


# Blender 4.2.0 extracts every wheel of the platform whatever its Python tag,
# then keeps one per distribution, by version and then by file name, so cp313
# beats cp311. The Python check is in 4.2.13 (the next 4.2 release published as
# the bpy module; the fix landed somewhere in 4.2.1 to 4.2.13), 4.2.23 and 4.3+.
BLENDER_PYTHON_FILTER_SINCE = (4, 2, 13)


def old_blender_warnings(blender_version_min: str, paths: Sequence[Path], platform: Platform, pins: Pins) -> list[str]:
    """What Blender versions without the Python check would get wrong (for a warning)."""
    try:
        version_min = tuple(int(x) for x in blender_version_min.split("."))
    except ValueError:
        return []
    if version_min >= BLENDER_PYTHON_FILTER_SINCE:
        return []
    _, _, Version = _packaging()
    kept: dict[str, Path] = {}
    for path in paths:
        if not blender_selects(path.name, platform, (3, 0), check_python=False):
            continue
        base = path.name.partition("-")[0]
        if base not in kept or (Version(WheelName.parse(path.name).version), path.name) > (
            Version(WheelName.parse(kept[base].name).version), kept[base].name
        ):
            kept[base] = path
    warnings = []
    for py in pins.pythons:
        for path in kept.values():
            if not tags_fit(WheelName.parse(path.name), platform, python_tuple(py)):
                since = ".".join(map(str, BLENDER_PYTHON_FILTER_SINCE))
                warnings.append(
                    f"{platform.name}: Blender {blender_version_min} (blender_version_min) installs "
                    f"{path.name} on Python {py}, which cannot import it: Blender's installer ignores "
                    f"wheels' Python tags in 4.2.0 and checks them in {since}+"
                )
    return warnings


# --------------------------------------------------------------------------
# Wheel cache and pip


def _preference(wheel: WheelName, python: tuple[int, int]) -> tuple[int, int, str]:
    cp = f"cp{python[0]}{python[1]}"
    abi_rank = 0 if cp in wheel.abi_tags else 1 if "abi3" in wheel.abi_tags else 2
    universal = int(any(t.endswith("_universal2") for t in wheel.platform_tags))
    return abi_rank, universal, wheel.filename


def find_cached(cache: Path, name: str, version: str, platform: Platform, python: str) -> Path | None:
    """The best cached wheel of ``name==version`` that fits the target, or None."""
    _, _, Version = _packaging()
    target = python_tuple(python)
    candidates: list[tuple[tuple[int, int, str], Path]] = []
    for path in cache.glob("*.whl") if cache.is_dir() else ():
        try:
            wheel = WheelName.parse(path.name)
            same_version = Version(wheel.version) == Version(version)
        except (BuildError, ValueError):
            continue
        if (
            wheel.name == name and same_version and tags_fit(wheel, platform, target)
            and blender_selects(path.name, platform, target)
        ):
            candidates.append((_preference(wheel, target), path))
    return min(candidates)[1] if candidates else None


_NETWORK_PATTERNS = (
    "NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
    "Name or service not known", "Network is unreachable", "ConnectTimeout", "Read timed out",
    "ProxyError", "ConnectionError", "Connection refused",
)


def pip_download(requirements: Sequence[str], platform: Platform, python: str, dest: Path) -> None:
    """``pip download`` exactly these requirements for one platform and Python into ``dest``."""
    major, minor = python_tuple(python)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--dest", str(dest),
        "--python-version", python, "--implementation", "cp",
        "--abi", f"cp{major}{minor}", "--abi", "abi3", "--abi", "none",
    ]
    for tag in platform.wheel_tags:
        command += ["--platform", tag]
    command += list(requirements)
    print(f"  pip download for {platform.name}, Python {python}: {' '.join(requirements)}", flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        tail = "\n".join(output.splitlines()[-15:])
        if any(p in output for p in _NETWORK_PATTERNS):
            raise NetworkError(f"pip could not reach the package index (no network?):\n{tail}")
        raise BuildError(f"pip download failed for {platform.name}, Python {python}:\n{tail}")


def collect_wheels(
    platform: Platform, pins: Pins, cache: Path, *, offline: bool
) -> list[Path]:
    """The cached wheels for ``platform`` (downloading what is missing unless offline)."""
    chosen: set[Path] = set()
    for python in pins.pythons:
        missing = [n for n, v in sorted(pins.packages.items()) if not find_cached(cache, n, v, platform, python)]
        if missing and offline:
            raise BuildError(
                f"--offline: the cache {cache} has no wheel for {platform.name}, Python {python} of: "
                + ", ".join(f"{n}=={pins.packages[n]}" for n in missing)
                + ". Run once without --offline to fill it."
            )
        if missing:
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as tmp:
                pip_download([f"{n}=={pins.packages[n]}" for n in missing], platform, python, Path(tmp))
                for path in sorted(Path(tmp).iterdir()):
                    # Refuse what pip got wrong before it can enter the cache.
                    errors = check_wheel(path, platform, [python], pins)
                    if not errors and not blender_selects(path.name, platform, python_tuple(python)):
                        errors = [f"{path.name}: Blender would not use it on {platform.name}, Python {python}"]
                    if errors:
                        raise BuildError(
                            f"pip returned a wheel that does not fit {platform.name}, Python {python}:\n  "
                            + "\n  ".join(errors)
                        )
                    os.replace(path, cache / path.name)
        for name in sorted(pins.packages):
            found = find_cached(cache, name, pins.packages[name], platform, python)
            if found is None:
                raise BuildError(f"no wheel of {name}=={pins.packages[name]} fits {platform.name}, Python {python}")
            chosen.add(found)
    return sorted(chosen, key=lambda p: p.name)


# --------------------------------------------------------------------------
# Manifest


_TABLE_HEADER = re.compile(r"^\s*\[\[?\s*[A-Za-z0-9_.\-\"' ]+\]\]?\s*(#.*)?$")


def check_permissions(manifest: dict[str, Any]) -> list[str]:
    """Blender's rules for ``[permissions]``: a table of short reasons."""
    permissions = manifest.get("permissions", {})
    if not isinstance(permissions, dict):
        return ["[permissions] must be a table of reasons (name = \"why\"), not a list"]
    errors = []
    for key, reason in permissions.items():
        if key not in PERMISSION_NAMES:
            errors.append(f"permission {key!r} is not one of {sorted(PERMISSION_NAMES)}")
        elif not isinstance(reason, str) or not reason.strip():
            errors.append(f"permission {key!r} needs a reason")
        elif len(reason) > TERSE_DESCRIPTION_MAX_LENGTH:
            errors.append(f"permission {key!r}: reason longer than {TERSE_DESCRIPTION_MAX_LENGTH} characters")
        elif not (reason[-1].isalnum() or reason[-1] in ")]}"):
            errors.append(f"permission {key!r}: reason must not end with punctuation")
    return errors


def generate_manifest(source: str, platform: Platform, wheel_names: Sequence[str]) -> str:
    """The repo's manifest with top-level ``platforms`` and ``wheels`` for one platform."""
    original = _toml_loads(source)
    for key in ("platforms", "wheels"):
        if key in original:
            raise BuildError(f"{MANIFEST_PATH.name} must not set {key!r}: the build generates it")
    if "generated" in original.get("build", {}):
        raise BuildError(f"{MANIFEST_PATH.name} must not have [build.generated]")
    if errors := check_permissions(original):
        raise BuildError(f"{MANIFEST_PATH.name}: " + "; ".join(errors))

    wheels = [f"./wheels/{name}" for name in wheel_names]
    block = [
        f"# Generated by scripts/build_extension.py for {platform.name}.",
        f"platforms = [{_toml_string(platform.name)}]",
        "wheels = [",
        *(f"    {_toml_string(w)}," for w in wheels),
        "]",
        "",
    ]
    lines = source.splitlines()
    # Top-level keys must come before the first table header.
    at = next((i for i, line in enumerate(lines) if _TABLE_HEADER.match(line)), len(lines))
    text = "\n".join([*lines[:at], *block, *lines[at:]]) + "\n"

    generated = _toml_loads(text)
    expected = {**original, "platforms": [platform.name], "wheels": wheels}
    if generated != expected:
        raise BuildError("internal error: the generated manifest does not parse back to the intended one")
    return text


# --------------------------------------------------------------------------
# Zip


def package_files(package_dir: Path = PACKAGE_DIR) -> Iterator[tuple[Path, str]]:
    """(path, archive name) of every file of the package, without caches and hidden files."""
    for dirpath, dirnames, filenames in os.walk(package_dir):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        for filename in sorted(filenames):
            if filename.endswith((".pyc", ".pyo")) or filename.startswith("."):
                continue
            path = Path(dirpath) / filename
            yield path, path.relative_to(package_dir).as_posix()


def _zip_add(zf: zipfile.ZipFile, arcname: str, data: bytes, *, compress: bool) -> None:
    info = zipfile.ZipInfo(arcname, date_time=ZIP_DATE_TIME)
    info.external_attr = 0o644 << 16
    info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    zf.writestr(info, data)


def write_zip(out: Path, manifest_text: str, wheels: Sequence[Path]) -> None:
    """Write the extension zip to ``out`` atomically."""
    files = list(package_files())
    names = {arc for _, arc in files}
    if {"blender_manifest.toml"} & names or any(n.startswith("wheels/") for n in names):
        raise BuildError("the package folder must not hold blender_manifest.toml or wheels/")
    if "__init__.py" not in names:
        raise BuildError(f"{PACKAGE_DIR} has no __init__.py")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compresslevel=9) as zf:
            _zip_add(zf, "blender_manifest.toml", manifest_text.encode("utf-8"), compress=True)
            for path, arcname in files:
                _zip_add(zf, arcname, path.read_bytes(), compress=True)
            for wheel in wheels:
                # Wheels go in byte for byte (Blender wants them unmodified), uncompressed.
                _zip_add(zf, f"wheels/{wheel.name}", wheel.read_bytes(), compress=False)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _manifest_id_version(source: str) -> tuple[str, str]:
    data = _toml_loads(source)
    try:
        return str(data["id"]), str(data["version"])
    except KeyError as exc:
        raise BuildError(f"{MANIFEST_PATH.name} has no {exc}") from exc


@dataclasses.dataclass(frozen=True)
class Built:
    platform: str
    path: Path
    wheels: tuple[Path, ...]


def build(
    out_dir: Path, platforms: Iterable[str], *, cache: Path = DEFAULT_CACHE, offline: bool = False,
    pins: Pins | None = None,
) -> list[Built]:
    """Build one zip per platform into ``out_dir``; raise BuildError on any problem."""
    pins = pins or Pins.load()
    source = MANIFEST_PATH.read_text(encoding="utf-8")
    ext_id, ext_version = _manifest_id_version(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    built = []
    for name in platforms:
        platform = PLATFORMS[name]
        print(f"{platform.name}: collecting wheels", flush=True)
        wheels = collect_wheels(platform, pins, cache, offline=offline)
        if errors := check_wheel_set(wheels, platform, pins):
            raise BuildError(f"{platform.name}: refusing to build:\n  " + "\n  ".join(errors))
        for warning in old_blender_warnings(str(_toml_loads(source).get("blender_version_min", "")), wheels, platform, pins):
            print(f"warning: {warning}", file=sys.stderr)
        manifest = generate_manifest(source, platform, [w.name for w in wheels])
        out = out_dir / f"{ext_id}-{ext_version}-{platform.file_suffix}.zip"
        write_zip(out, manifest, wheels)
        built.append(Built(platform.name, out, tuple(wheels)))
    return built


def _size(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n < 1024 * 1024 else f"{n / (1024 * 1024):.2f} MiB"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for the zips")
    parser.add_argument(
        "--platform", action="append", choices=sorted(PLATFORMS), dest="platforms",
        help="build for this platform (repeatable; default: all four)",
    )
    parser.add_argument("--offline", action="store_true", help="use only the wheel cache; never run pip")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"wheel cache (default: {DEFAULT_CACHE})")
    args = parser.parse_args(argv)
    platforms = list(dict.fromkeys(args.platforms or PLATFORMS))
    try:
        built = build(args.out, platforms, cache=args.cache, offline=args.offline)
    except NetworkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NETWORK
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for item in built:
        print(f"built {item.path} ({_size(item.path.stat().st_size)}) for {item.platform}")
        for wheel in item.wheels:
            print(f"  wheels/{wheel.name} ({_size(wheel.stat().st_size)})")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
