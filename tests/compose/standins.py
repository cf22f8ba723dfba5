"""Test scaffolding: every base image compose needs, pulled if a registry answers, else a stand-in.

No image registry is reachable on the machines CI runs on (and some sites are air-gapped). An image
that is neither in the engine's store nor pullable is built here, under the very tag compose and the
Dockerfiles name, from a Debian bookworm that debootstrap fetches from Debian's mirror and `docker
import` loads without a registry. Each stand-in keeps the real image's contract (entrypoint,
environment names, paths, user, the tools its health check calls); its Dockerfile under
standins/<name>/ says what differs. docker-compose.yml keeps naming the public images.

    python tests/compose/standins.py [--profile celery]    # what `make test-compose` runs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CACHE = REPO / ".cache" / "compose"
BASE = "flywheel-test/debootstrap:bookworm"
LABEL = "org.flywheel.test-standin"  # on every stand-in: the digest of the recipe it was built from
MIRROR = "http://deb.debian.org/debian"
# Stand-ins by image name (the tag is whatever compose asks for): folders under standins/.
STANDINS = {
    "python": "python",
    "debian": "debian",
    "golang": "golang",
    "postgres": "postgres",
    "prom/prometheus": "prometheus",
    "prom/alertmanager": "alertmanager",
    "redis": "redis",
}
# No stand-in: Grafana is neither in Debian nor anywhere else reachable, and a fake one would prove
# nothing. It has its own compose profile, which the test does not start.
NOT_STOOD_IN = {"grafana/grafana": "Grafana (profile `grafana`): no package on any reachable registry"}

# What Debian's own Docker images configure for apt (debuerreotype): no caches, no translations.
APT_CONF = {
    "docker-clean": (
        'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb '
        '/var/cache/apt/*.bin || true"; };\n'
        'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb '
        '/var/cache/apt/*.bin || true"; };\n'
        'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n'
    ),
    "docker-gzip-indexes": 'Acquire::GzipIndexes "true";\n',
    "docker-no-languages": 'Acquire::Languages "none";\n',
    "docker-autoremove-suggests": 'Apt::AutoRemove::SuggestsImportant "false";\n',
}
SOURCES = f"""Types: deb
URIs: {MIRROR}
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def log(message: str) -> None:
    print(f"[standins] {message}", flush=True)


def docker(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], text=True, **kwargs)


def present(image: str) -> bool:
    return docker("image", "inspect", image, capture_output=True).returncode == 0


def compose_file() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def base_images(profiles: tuple[str, ...] = ()) -> list[str]:
    """Every image compose runs without building it, and every FROM of what it builds, in the
    services the given profiles start (services without a profile always)."""
    found: list[str] = []
    for service in compose_file()["services"].values():
        if service.get("profiles") and not set(service["profiles"]) & set(profiles):
            continue
        if "build" not in service:
            found.append(service["image"])
            continue
        context = REPO / service["build"]["context"]
        text = (context / service["build"].get("dockerfile", "Dockerfile")).read_text()
        stages = {s.lower() for s in re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M | re.I)}
        for base in re.findall(r"^FROM\s+(?:--platform=\S+\s+)?(\S+)", text, re.M | re.I):
            if base.lower() not in stages:
                found.append(base)
    return list(dict.fromkeys(found))


def name_of(image: str) -> str:
    return image.rsplit(":", 1)[0].removeprefix("docker.io/").removeprefix("library/")


# --- the Debian base, without a registry ----------------------------------------------------------------


def rootfs_tarball() -> Path:
    """A minimal bookworm root file system, configured as Debian's Docker images are; cached."""
    tarball = CACHE / "bookworm-minbase.tar"
    if tarball.exists():
        return tarball
    if shutil.which("debootstrap") is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            sys.exit("standins: a Debian base without a registry needs debootstrap (apt-get install debootstrap)")
        log("installing debootstrap")
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "debootstrap"], check=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="flywheel-rootfs-") as tmp:
        root = Path(tmp) / "rootfs"
        log(f"debootstrap --variant=minbase bookworm from {MIRROR} (once; cached in {tarball})")
        result = subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", str(root), MIRROR], capture_output=True, text=True
        )
        if result.returncode != 0:
            sys.exit(f"standins: debootstrap failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
        (root / "etc/apt/sources.list").unlink(missing_ok=True)
        (root / "etc/apt/sources.list.d/debian.sources").write_text(SOURCES)
        for name, text in APT_CONF.items():
            (root / "etc/apt/apt.conf.d" / name).write_text(text)
        # As in Debian's images: packages installed during a build never start services.
        policy = root / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (root / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        partial = tarball.with_suffix(".tmp")
        subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."], check=True)
        partial.rename(tarball)
    log(f"rootfs ready in {time.monotonic() - started:.0f}s ({tarball.stat().st_size / 1e6:.0f} MB)")
    return tarball


def ensure_base() -> None:
    if present(BASE):
        return
    tarball = rootfs_tarball()
    changes = [
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        'CMD ["bash"]',
    ]
    args = [arg for change in changes for arg in ("--change", change)]
    with tarball.open("rb") as f:
        docker("import", *args, "-", BASE, stdin=f, check=True, stdout=subprocess.DEVNULL)
    log(f"imported {BASE} from {tarball.name}")


# --- stand-ins ---------------------------------------------------------------------------------------


def _golang_context(image: str, folder: Path) -> Path:
    """The golang stand-in's build folder with Go's own release in go/, as the module proxy serves it."""
    version = image.rsplit(":", 1)[1]
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    module = f"golang.org/toolchain@v0.0.1-go{version}.linux-{arch}"
    go = shutil.which("go")
    if go is None:
        sys.exit(f"standins: Go is needed to fetch {module} for the golang stand-in (make install needs it too)")
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"}
    found = subprocess.run([go, "mod", "download", "-json", module], capture_output=True, text=True, env=env)
    if found.returncode != 0:
        sys.exit(f"standins: go mod download {module} failed: {found.stdout}{found.stderr}")
    goroot = Path(json.loads(found.stdout)["Dir"])
    context = Path(tempfile.mkdtemp(prefix="flywheel-golang-"))
    shutil.copytree(folder, context, dirs_exist_ok=True)
    shutil.copytree(goroot, context / "go", symlinks=True)
    # The module cache keeps files read-only and the zip carries no modes: as Go does when it
    # switches toolchains, make the binaries executable again.
    for path in (context / "go").rglob("*"):
        mode = 0o755 if path.is_dir() else 0o644
        if path.is_file() and (path.parent.name == "bin" or "pkg/tool/" in path.as_posix()):
            mode = 0o755
        path.chmod(mode)
    return context


def recipe(image: str) -> str:
    """A digest of the stand-in's folder: a stand-in built from an older recipe is rebuilt."""
    folder = HERE / "standins" / STANDINS[name_of(image)]
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def standin_recipe(image: str) -> str | None:
    """The recipe an image in the store was built from, if it is one of our stand-ins."""
    labels = docker("image", "inspect", "--format", "{{json .Config.Labels}}", image, capture_output=True)
    if labels.returncode != 0:
        return None
    return (json.loads(labels.stdout) or {}).get(LABEL)


def build_standin(image: str) -> None:
    folder = HERE / "standins" / STANDINS[name_of(image)]
    context = _golang_context(image, folder) if name_of(image) == "golang" else folder
    started = time.monotonic()
    try:
        # The classic builder: stand-ins need no BuildKit feature, and it is in every engine.
        result = docker(
            "build",
            "--tag",
            image,
            "--label",
            f"{LABEL}={recipe(image)}",
            str(context),
            capture_output=True,
            env={**os.environ, "DOCKER_BUILDKIT": "0"},
        )
    finally:
        if context != folder:
            shutil.rmtree(context, ignore_errors=True)
    if result.returncode != 0:
        sys.exit(f"standins: building the stand-in for {image} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    log(f"{image}: stand-in built from {folder.relative_to(REPO)} in {time.monotonic() - started:.0f}s")


def ensure(profiles: tuple[str, ...] = ()) -> dict[str, str]:
    """Each base image: 'present', 'pulled' or 'stand-in'."""
    outcome: dict[str, str] = {}
    for image in base_images(profiles):
        name = name_of(image)
        built_from = standin_recipe(image)
        if built_from is not None and name in STANDINS and built_from == recipe(image):
            outcome[image] = "stand-in"
            continue
        if built_from is None and present(image):
            outcome[image] = "present"
            continue
        pulled = docker("pull", "--quiet", image, capture_output=True)
        if pulled.returncode == 0:
            outcome[image] = "pulled"
            continue
        if name in NOT_STOOD_IN:
            sys.exit(f"standins: {image} cannot be pulled and has no stand-in: {NOT_STOOD_IN[name]}")
        if name not in STANDINS:
            sys.exit(f"standins: {image} cannot be pulled ({pulled.stderr.strip()}) and has no stand-in here")
        log(f"{image}: no registry answers ({pulled.stderr.strip()[:120]}); building a stand-in")
        ensure_base()
        build_standin(image)
        outcome[image] = "stand-in"
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="append", default=[], help="also cover this compose profile's services")
    args = parser.parse_args()
    for image, how in ensure(tuple(args.profile)).items():
        log(f"{image:<34} {how}")
    for name, why in NOT_STOOD_IN.items():
        log(f"{name:<34} not used by this test: {why}")


if __name__ == "__main__":
    main()
