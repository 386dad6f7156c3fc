"""The extension zips made by scripts/build_extension.py.

- A real build of the linux-x64 zip (pip downloads the pinned wheels into
  build/wheel-cache; skipped, with the reason, when the package index cannot be
  reached): its layout, its generated manifest, and every wheel's tags, checked
  here with ``packaging`` independently of the script's own checks.
- The script's refusals, on small wheels made here (no network).
- ``@pytest.mark.blender``: the zip installed by Blender's own installer in the
  real bpy module (a subprocess; needs TASKQUEUE_BPY_PYTHON, see conftest.py).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import io
import os
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build_extension.py"
PACKAGE_DIR = ROOT / "blender_taskqueue"
CACHE = ROOT / "build" / "wheel-cache"
PINS = tomllib.loads((ROOT / "scripts" / "extension_wheels.toml").read_text(encoding="utf-8"))
PINNED: dict[str, str] = {str(canonicalize_name(k)): v for k, v in PINS["packages"].items()}
PYTHONS = [tuple(int(x) for x in v.split(".")) for v in PINS["python"]]
SOURCE_MANIFEST = tomllib.loads((ROOT / "blender_manifest.toml").read_text(encoding="utf-8"))
ZIP_NAME = f"{SOURCE_MANIFEST['id']}-{SOURCE_MANIFEST['version']}-linux_x64.zip"
EXIT_NETWORK = 3

# What Blender 4.2+ on Linux x86_64 can load: manylinux up to glibc 2.28.
LINUX_PLATFORMS = [f"manylinux_2_{m}_x86_64" for m in range(28, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64",
]


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_extension", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


be = load_script()


def supported_tags(python: tuple[int, ...]) -> set[Tag]:
    """The tags CPython ``python`` on Blender's Linux accepts (pip's own rules)."""
    version = (python[0], python[1])
    interpreter = f"cp{python[0]}{python[1]}"
    tags = set(cpython_tags(python_version=version, abis=[interpreter], platforms=LINUX_PLATFORMS))
    tags |= set(compatible_tags(python_version=version, interpreter=interpreter, platforms=LINUX_PLATFORMS))
    return tags


def run_build(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT
    )


# linux_build and linux_zip (the zip, built once per session) come from conftest.py.


def zip_names(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as zf:
        return zf.namelist()


def wheel_names(path: Path) -> list[str]:
    return sorted(n.removeprefix("wheels/") for n in zip_names(path) if n.startswith("wheels/"))


# ---------------------------------------------------------------------------
# The real build


def test_build_reports_zip_size_and_wheels(linux_build: tuple[Path, str]) -> None:
    path, stdout = linux_build
    assert path.is_file()
    assert f"built {path} (" in stdout and "for linux-x64" in stdout
    for name in wheel_names(path):
        assert f"wheels/{name} (" in stdout


def test_zip_root_is_the_package_plus_manifest_and_wheels(linux_zip: Path) -> None:
    names = zip_names(linux_zip)
    assert "__init__.py" in names and "blender_manifest.toml" in names
    assert not any(n.startswith("blender_taskqueue/") for n in names), "the package folder must not be nested"
    assert not any("__pycache__" in n or n.endswith((".pyc", ".pyo")) for n in names)
    expected = {
        p.relative_to(PACKAGE_DIR).as_posix(): p.read_bytes()
        for p in PACKAGE_DIR.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in {".pyc", ".pyo"}
    }
    with zipfile.ZipFile(linux_zip) as zf:
        package = {n: zf.read(n) for n in names if n != "blender_manifest.toml" and not n.startswith("wheels/")}
    assert package == expected
    assert all(n.endswith(".whl") and n.count("/") == 1 for n in names if n.startswith("wheels/"))


def test_package_stays_loadable_as_a_legacy_addon(linux_zip: Path) -> None:
    with zipfile.ZipFile(linux_zip) as zf:
        tree = ast.parse(zf.read("__init__.py"))
    bl_info = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "bl_info" for t in node.targets)
    )
    assert tuple(bl_info["blender"]) <= (3, 4, 0)
    assert bl_info["name"] and bl_info["category"]


def test_manifest_is_the_source_plus_platforms_and_wheels(linux_zip: Path) -> None:
    with zipfile.ZipFile(linux_zip) as zf:
        manifest = tomllib.loads(zf.read("blender_manifest.toml").decode("utf-8"))
    assert manifest.pop("platforms") == ["linux-x64"]
    assert manifest.pop("wheels") == [f"./wheels/{n}" for n in wheel_names(linux_zip)]
    assert manifest == SOURCE_MANIFEST
    permissions = manifest["permissions"]
    assert isinstance(permissions, dict) and {"files", "network"} <= permissions.keys()
    for reason in permissions.values():
        assert isinstance(reason, str) and 0 < len(reason) <= 64 and reason[-1].isalnum()


def test_every_wheel_is_pinned_unmodified_and_fits_linux_x64(linux_zip: Path) -> None:
    supported = {py: supported_tags(py) for py in PYTHONS}
    per_python: dict[tuple[int, ...], dict[str, list[str]]] = {py: {} for py in PYTHONS}
    with zipfile.ZipFile(linux_zip) as zf:
        for name in wheel_names(linux_zip):
            dist, version, _build, tags = parse_wheel_filename(name)
            assert dist in PINNED, f"{name}: not pinned"
            assert str(version) == PINNED[dist], f"{name}: pinned {PINNED[dist]}"
            fits = [py for py in PYTHONS if tags & supported[py]]
            assert fits, f"{name}: tags {sorted(map(str, tags))} fit no target Python on linux-x64"
            for py in fits:
                per_python[py].setdefault(dist, []).append(name)
            data = zf.read(f"wheels/{name}")
            assert hashlib.sha256(data).digest() == hashlib.sha256((CACHE / name).read_bytes()).digest()
            assert zipfile.ZipFile(io.BytesIO(data)).testzip() is None
    for py in PYTHONS:
        assert sorted(per_python[py]) == sorted(PINNED), f"Python {py}: missing wheels"
        for pinned_name, names in per_python[py].items():
            assert len(names) == 1, f"Python {py}: several wheels of {pinned_name}: {names}"
    for py in PYTHONS:
        (core,) = per_python[py]["pydantic-core"]
        _, _, _, tags = parse_wheel_filename(core)
        interpreter = f"cp{py[0]}{py[1]}"
        assert all(t.interpreter == interpreter and t.abi == interpreter for t in tags), core
        assert all(t.platform in LINUX_PLATFORMS for t in tags), f"{core}: a placeholder or foreign wheel"


def test_offline_build_uses_the_cache_alone(linux_zip: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_CONFIG_FILE": os.devnull}
    proc = run_build("--out", str(tmp_path), "--platform", "linux-x64", "--offline", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "pip download" not in proc.stdout
    assert (tmp_path / ZIP_NAME).read_bytes() == linux_zip.read_bytes(), "the build is not reproducible"


# ---------------------------------------------------------------------------
# Refusals (no network)


def test_offline_without_cached_wheels_fails_clearly(tmp_path: Path) -> None:
    proc = run_build("--out", str(tmp_path / "out"), "--platform", "windows-x64", "--offline",
                     "--cache", str(tmp_path / "empty-cache"))
    assert proc.returncode == 1
    assert "--offline" in proc.stderr and f"pydantic-core=={PINNED['pydantic-core']}" in proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unreachable_index_exits_3_so_callers_can_tell(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="1",
               PIP_TIMEOUT="2")
    proc = run_build("--out", str(tmp_path / "out"), "--platform", "linux-x64",
                     "--cache", str(tmp_path / "cache"), env=env)
    assert proc.returncode == EXIT_NETWORK, proc.stderr
    assert "could not reach the package index" in proc.stderr


ELF_X86_64 = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HH", 3, 62) + bytes(64)
ELF_ARM64 = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HH", 3, 183) + bytes(64)
PE_AMD64 = b"MZ" + bytes(58) + struct.pack("<I", 64) + b"PE\0\0" + struct.pack("<H", 0x8664) + bytes(64)


def make_wheel(folder: Path, filename: str, files: dict[str, bytes], requires: tuple[str, ...] = ()) -> Path:
    """A small wheel with METADATA matching its file name, plus ``files``."""
    name, version = filename.split("-")[:2]
    path = folder / filename
    headers = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", "Requires-Python: >=3.10"]
    headers += [f"Requires-Dist: {r}" for r in requires]
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in files.items():
            zf.writestr(member, data)
        zf.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(headers) + "\n\nDescription\n")
    return path


LINUX = be.PLATFORMS["linux-x64"]
PINS_OBJ = be.Pins.load()
CORE = PINNED["pydantic-core"]
PSUTIL = PINNED["psutil"]


def test_refuses_a_pure_python_pydantic_core_placeholder(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path, f"pydantic_core-{CORE}-py3-none-any.whl", {"pydantic_core/__init__.py": b""})
    errors = be.check_wheel(wheel, LINUX, ["3.11"], PINS_OBJ)
    assert any("placeholder" in e for e in errors), errors


def test_refuses_a_wheel_for_another_python(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path, f"pydantic_core-{CORE}-cp313-cp313-manylinux_2_17_x86_64.whl",
                       {"pydantic_core/_pydantic_core.cpython-313-x86_64-linux-gnu.so": ELF_X86_64})
    assert be.check_wheel(wheel, LINUX, ["3.13"], PINS_OBJ) == []
    errors = be.check_wheel(wheel, LINUX, ["3.11"], PINS_OBJ)
    assert any("do not fit" in e for e in errors), errors


def test_refuses_native_code_for_another_system_or_cpu(tmp_path: Path) -> None:
    for blob, what in ((PE_AMD64, "pe for x86_64"), (ELF_ARM64, "elf for arm64")):
        folder = tmp_path / what.replace(" ", "-")
        folder.mkdir()
        wheel = make_wheel(folder, f"psutil-{PSUTIL}-cp36-abi3-manylinux_2_17_x86_64.whl",
                           {"psutil/_psutil_linux.abi3.so": blob})
        errors = be.check_wheel(wheel, LINUX, ["3.11"], PINS_OBJ)
        assert any(what in e for e in errors), errors


def test_refuses_a_wheel_whose_requirements_the_pins_do_not_meet(tmp_path: Path) -> None:
    requires = (f"pydantic-core=={CORE}", "annotated-types>=0.6.0", "email-validator>=2; extra == 'email'",
                "tomli>=1; python_version < '3.11'")
    ok = make_wheel(tmp_path, f"pydantic-{PINNED['pydantic']}-py3-none-any.whl", {}, requires)
    assert be.check_wheel(ok, LINUX, ["3.11", "3.13"], PINS_OBJ) == []
    (tmp_path / "bad").mkdir()
    bad = make_wheel(tmp_path / "bad", f"pydantic-{PINNED['pydantic']}-py3-none-any.whl", {},
                     ("pydantic-core==9.9.9", "email-validator>=2"))
    errors = be.check_wheel(bad, LINUX, ["3.11"], PINS_OBJ)
    assert any("pinned pydantic-core==" in e for e in errors), errors
    assert any("email-validator" in e and "not pinned" in e for e in errors), errors


def test_reads_the_cpus_of_a_universal_macos_binary() -> None:
    fat = b"\xca\xfe\xba\xbe" + struct.pack(">I", 2)
    fat += struct.pack(">IIIII", 0x01000007, 3, 4096, 100, 12) + struct.pack(">IIIII", 0x0100000C, 0, 8192, 100, 14)
    assert be.native_cpus(fat) == ("macho", {"x86_64", "arm64"})
    assert be.native_cpus(PE_AMD64) == ("pe", {"x86_64"})
    assert be.native_cpus(b"#!/bin/sh\n") is None


def test_refuses_a_newer_glibc_than_blender_needs(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path, f"psutil-{PSUTIL}-cp36-abi3-manylinux_2_34_x86_64.whl",
                       {"psutil/_psutil_linux.abi3.so": ELF_X86_64})
    assert any("do not fit" in e for e in be.check_wheel(wheel, LINUX, ["3.11"], PINS_OBJ))


def test_refuses_a_set_where_blender_would_find_no_wheel_for_one_python(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path, f"pydantic_core-{CORE}-cp311-cp311-manylinux_2_17_x86_64.whl",
                       {"pydantic_core/_pydantic_core.cpython-311-x86_64-linux-gnu.so": ELF_X86_64})
    errors = be.check_wheel_set([wheel], LINUX, PINS_OBJ)
    assert any("Python 3.13: Blender's installer would pick 0 wheels of pydantic-core" in e for e in errors), errors


def test_blender_wheel_filter_mirror() -> None:
    # Cases from Blender's _extensions_wheel_filter_for_this_system (bl_pkg, 4.2.13+).
    win = be.PLATFORMS["windows-x64"]
    mac_arm = be.PLATFORMS["macos-arm64"]
    assert be.blender_selects("a-1-cp311-cp311-win_amd64.whl", win, (3, 11))
    assert not be.blender_selects("a-1-cp313-cp313-win_amd64.whl", win, (3, 11))
    assert be.blender_selects("a-1-cp36-abi3-win_amd64.whl", win, (3, 13))
    assert be.blender_selects("a-1-py3-none-any.whl", win, (3, 11))
    assert be.blender_selects("a-1-cp311-cp311-macosx_10_9_universal2.whl", mac_arm, (3, 11))
    assert not be.blender_selects("a-1-cp311-cp311-macosx_11_0_x86_64.whl", mac_arm, (3, 11))
    assert be.blender_selects("a-1-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", LINUX, (3, 11))
    assert not be.blender_selects("a-1-cp311-cp311-musllinux_1_1_x86_64.whl", LINUX, (3, 11))


def test_manifest_must_not_preset_generated_keys_or_list_permissions() -> None:
    source = (ROOT / "blender_manifest.toml").read_text(encoding="utf-8")
    with pytest.raises(be.BuildError, match="wheels"):
        be.generate_manifest('wheels = ["./wheels/x-1-py3-none-any.whl"]\n' + source, LINUX, [])
    listed = source.replace("[permissions]", "permissions = [\"files\"]\n[old_permissions]")
    with pytest.raises(be.BuildError, match="table of reasons"):
        be.generate_manifest(listed, LINUX, [])
    punctuated = re.sub(r'(?m)^network = ".*"$', 'network = "Goes online."', source)
    with pytest.raises(be.BuildError, match="punctuation"):
        be.generate_manifest(punctuated, LINUX, [])
    with pytest.raises(be.BuildError, match="not one of"):
        be.generate_manifest(punctuated.replace('network = "Goes online."', 'internet = "Goes online"'), LINUX, [])


# ---------------------------------------------------------------------------
# Blender's own installer


@pytest.mark.blender
def test_blender_installs_the_zip_and_its_wheels_import(linux_zip: Path, run_bpy: Any) -> None:
    report, proc = run_bpy(Path(__file__).with_name("bpy_install_extension.py"), str(linux_zip))
    context = f"\n--- Blender said ---\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    python = tuple(report["python"])
    assert python in PYTHONS, f"bpy runs Python {python}, the zip targets {PYTHONS}"
    assert report["preloaded"] == [], "bpy's Python already has the libraries: the test would prove nothing"
    assert report["install"] == ["FINISHED"], context
    installed = set(report["installed_files"])
    assert {"__init__.py", "blender_manifest.toml", "engine/engine.py"} <= installed
    assert {f"wheels/{n}" for n in wheel_names(linux_zip)} <= installed
    assert report["validate"]["returncode"] == 0, report["validate"]["output"]
    assert report["compat_error"] is None

    interpreter = f"cp{python[0]}{python[1]}"
    selected = report["wheels_selected"]
    assert sorted(parse_wheel_filename(n)[0] for n in selected) == sorted(PINNED), selected
    (core,) = [n for n in selected if n.startswith("pydantic_core-")]
    assert f"-{interpreter}-{interpreter}-" in core
    assert report["sync_errors"] == [] and report["site_packages_in_sys_path"]

    site_packages = report["site_packages"]
    dists = {"pydantic": "pydantic", "pydantic_core": "pydantic-core", "annotated_types": "annotated-types",
             "typing_extensions": "typing-extensions", "typing_inspection": "typing-inspection",
             "structlog": "structlog", "platformdirs": "platformdirs", "psutil": "psutil"}
    for module, dist in dists.items():
        result = report["imports"][module]
        assert "error" not in result, f"import {module}: {result['error']}{context}"
        assert result["file"].startswith(site_packages + os.sep), result["file"]
        assert result["version"] == PINNED[dist]
    native = report["imports"]["pydantic_core._pydantic_core"]["file"]
    assert native.endswith(f".cpython-{python[0]}{python[1]}-x86_64-linux-gnu.so"), native

    package: dict[str, Any] = report["package"]
    assert "error" not in package, package.get("error")
    assert "/extensions/user_default/blender_taskqueue/" in package["file"]
    assert tuple(package["bl_info_blender"]) <= (3, 4, 0)
    assert "interrupted" in package["job_states"]

    # register() imports the Blender layer (blender_taskqueue/blender/). Until it
    # exists, enabling must fail on exactly that; once it does, it must work.
    if (PACKAGE_DIR / "blender" / "__init__.py").is_file():
        assert report["enabled"] and report["disabled_cleanly"] is True, f"{report['enable']}{context}"
    else:
        assert not report["enabled"]
        assert "cannot import name 'blender'" in report["enable"]["error"], report["enable"]
