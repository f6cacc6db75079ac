"""What can be checked of the container images without building them (deploy/images; docs/deploy.md).

Building needs podman and a base image (OFFLINE-NOTES.md) and takes minutes of CPU: not done here. These checks read
the Containerfiles as instructions: non-root user, HEALTHCHECK, no secret in ENV/ARG, every COPY source present and
not filtered out by .containerignore, every kiln-* dependency of what an image installs installed with it, and every
command the Kubernetes manifests run present in the image they name.
"""

from __future__ import annotations

import doctest
import fnmatch
import importlib.util
import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "deploy" / "images"
CONTAINERFILES = {"kiln-services": IMAGES / "Containerfile.services", "kiln-runner": IMAGES / "Containerfile.runner"}
KNOWN = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER", "WORKDIR",
         "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|CREDS|PRIVATE|API_?KEY|ACCESS_?KEY|SEED|_KEY$",
                         re.IGNORECASE)
PACKAGE_DIRS = ("libs", "services", "trainers")


@dataclass(frozen=True)
class Instruction:
    cmd: str
    args: str
    line: int


def parse(text: str) -> list[Instruction]:
    """Instructions of a Containerfile: line continuations joined, comments and blank lines dropped."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # a comment inside a continued instruction is skipped, as docker does
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line)
        joined = " ".join(part for part in buf if part)
        buf = []
        cmd, _, args = joined.partition(" ")
        out.append(Instruction(cmd.upper(), args.strip(), start))
    assert not buf, f"the file ends inside a continued instruction (line {start})"
    return out


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The build stages, each starting with its FROM (ARGs before the first FROM are left out)."""
    found: list[list[Instruction]] = []
    for ins in instructions:
        if ins.cmd == "FROM":
            found.append([ins])
        elif found:
            found[-1].append(ins)
    return found


def stage_name(stage: list[Instruction]) -> str | None:
    words = stage[0].args.split()
    return words[2] if len(words) == 3 and words[1].upper() == "AS" else None


def copy_parts(ins: Instruction) -> tuple[dict[str, str], list[str], str]:
    """(flags, sources, destination) of a COPY."""
    words = shlex.split(ins.args)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    return flags, words[:-1], words[-1]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def env_pairs(args: str) -> dict[str, str]:
    words = shlex.split(args)
    if words and "=" not in words[0]:  # legacy form: ENV NAME value
        return {words[0]: " ".join(words[1:])}
    return dict(w.split("=", 1) for w in words)


def pyproject(folder: Path) -> dict:
    return tomllib.loads((folder / "pyproject.toml").read_text())


def dist_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


@dataclass
class Image:
    name: str
    path: Path
    instructions: list[Instruction]

    @property
    def stages(self) -> list[list[Instruction]]:
        return stages(self.instructions)

    @property
    def final(self) -> list[Instruction]:
        return self.stages[-1]

    def installed(self) -> list[Path]:
        """The repository packages the build stages copy in (and install: checked below)."""
        found = []
        for stage in self.stages[:-1]:
            for ins in stage:
                if ins.cmd == "COPY" and "from" not in copy_parts(ins)[0]:
                    for src in copy_parts(ins)[1]:
                        if src.split("/")[0] in PACKAGE_DIRS and (ROOT / src / "pyproject.toml").exists():
                            found.append(ROOT / src)
        return found

    def scripts(self) -> dict[str, str]:
        """Console scripts of the installed packages: name -> module:function."""
        return {k: v for p in self.installed() for k, v in pyproject(p)["project"].get("scripts", {}).items()}

    def modules(self) -> set[str]:
        """Top-level Python packages of the installed repository packages."""
        return {d.name for p in self.installed() for d in (p / "src").iterdir()
                if d.is_dir() and (d / "__init__.py").exists()}

    def final_files(self) -> set[str]:
        """Paths the final stage copies from the build context, as they are in the image."""
        found = set()
        for ins in self.final:
            if ins.cmd == "COPY":
                flags, sources, dest = copy_parts(ins)
                if "from" not in flags:
                    for src in sources:
                        found.add(dest.rstrip("/") + "/" + Path(src).name if dest.endswith("/") else dest)
        return found


@pytest.fixture(scope="module", params=sorted(CONTAINERFILES))
def image(request: pytest.FixtureRequest) -> Image:
    path = CONTAINERFILES[request.param]
    return Image(request.param, path, parse(path.read_text()))


def test_each_containerfile_parses_into_known_instructions(image: Image) -> None:
    assert image.instructions, image.path
    for ins in image.instructions:
        assert ins.cmd in KNOWN, f"{image.path.name}:{ins.line}: unknown instruction {ins.cmd}"
        assert ins.args, f"{image.path.name}:{ins.line}: {ins.cmd} without arguments"
    assert len(image.stages) >= 2, "multi-stage: build tools stay out of the runtime image"
    names = [stage_name(s) for s in image.stages]
    assert names[-1] == "runtime" and None not in names, names
    for stage in image.stages:
        for ins in stage:
            if ins.cmd == "COPY" and "from" in copy_parts(ins)[0]:
                assert copy_parts(ins)[0]["from"] in names, f"{image.path.name}:{ins.line}: unknown stage"
    for cmd in ("CMD", "HEALTHCHECK"):
        for ins in image.final:
            if ins.cmd == cmd:
                body = ins.args.split(" CMD ", 1)[1] if cmd == "HEALTHCHECK" else ins.args
                exec_form(body)  # exec form: no shell in between, signals reach the service


def test_the_runtime_user_is_not_root(image: Image) -> None:
    users = [ins for ins in image.final if ins.cmd == "USER"]
    assert users, f"{image.path.name}: the final stage sets no USER"
    uid, _, gid = users[-1].args.partition(":")
    # numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd
    assert uid.isdigit() and int(uid) != 0, users[-1]
    assert not gid or (gid.isdigit() and int(gid) != 0), users[-1]
    later = image.final[image.final.index(users[-1]) + 1:]
    assert not [i for i in later if i.cmd in ("RUN", "ADD")], "nothing runs as root after USER"


def test_no_secret_is_baked_in(image: Image) -> None:
    for ins in image.instructions:
        if ins.cmd == "ENV":
            for name, value in env_pairs(ins.args).items():
                assert not (SECRET_NAME.search(name) and value), f"{image.path.name}:{ins.line}: ENV {name}"
        if ins.cmd == "ARG":
            name, has_value, value = ins.args.partition("=")
            assert not (SECRET_NAME.search(name) and has_value and value), f"{image.path.name}:{ins.line}: {name}"
        if ins.cmd in ("COPY", "ADD"):
            for src in copy_parts(ins)[1]:
                assert not re.search(r"\.(creds|nk|pem|key)$|secret", src), f"{image.path.name}:{ins.line}: {src}"


def test_healthcheck_runs_a_file_of_the_image(image: Image) -> None:
    checks = [ins for ins in image.final if ins.cmd == "HEALTHCHECK"]
    assert len(checks) == 1, image.path.name
    argv = exec_form(checks[0].args.split(" CMD ", 1)[1])
    assert argv[0] == "python" and argv[1] in image.final_files(), argv


def test_every_copy_source_exists_and_passes_the_ignore_file(image: Image) -> None:
    patterns = [p.strip() for p in (IMAGES / ".containerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for required in (".git", ".venv", "**/__pycache__", "**/*.egg-info"):
        assert required in patterns, required
    for ins in image.instructions:
        if ins.cmd == "COPY" and "from" not in copy_parts(ins)[0]:
            for src in copy_parts(ins)[1]:
                assert (ROOT / src).exists(), f"{image.path.name}:{ins.line}: {src} is not in the repository"
                prefixes = ["/".join(Path(src).parts[:i]) for i in range(1, len(Path(src).parts) + 1)]
                for pattern in patterns:
                    for prefix in prefixes:
                        hit = fnmatch.fnmatch(prefix, pattern) or (
                            pattern.startswith("**/") and fnmatch.fnmatch(Path(prefix).name, pattern[3:]))
                        assert not hit, f"{src} is filtered out by {pattern!r} of .containerignore"


def test_the_image_installs_what_it_copies_with_every_kiln_dependency(image: Image) -> None:
    installed = image.installed()
    assert installed, image.path.name
    install = " ".join(i.args for s in image.stages[:-1] for i in s if i.cmd == "RUN" and "pip install" in i.args)
    for folder in installed:
        assert f"./{folder.relative_to(ROOT)}" in install, f"{folder} is copied but not installed"
    names = {pyproject(p)["project"]["name"].lower() for p in installed}
    for folder in installed:
        for req in pyproject(folder)["project"].get("dependencies", []):
            dep = dist_name(req)
            if dep.startswith("kiln-"):
                assert dep in names, f"{image.name}: {folder.name} needs {dep}, which the image does not install"


def test_services_and_trainer_side_stay_apart() -> None:
    """STYLE.md: the trainer side must not pull in FastAPI or SQLAlchemy; the API must not pull in torch."""
    images = {name: Image(name, path, parse(path.read_text())) for name, path in CONTAINERFILES.items()}

    def deps(img: Image) -> set[str]:
        return {dist_name(r) for p in img.installed() for r in pyproject(p)["project"].get("dependencies", [])}

    assert not deps(images["kiln-runner"]) & {"fastapi", "sqlalchemy", "kiln-api", "kiln-store", "uvicorn"}
    assert not deps(images["kiln-services"]) & {"torch", "ultralytics", "kiln-trainer-sdk"}
    assert not [i for i in images["kiln-services"].instructions if i.cmd == "RUN" and "torch" in i.args]


def test_the_default_command_is_a_script_of_the_image(image: Image) -> None:
    cmd = [ins for ins in image.final if ins.cmd == "CMD"]
    assert cmd and exec_form(cmd[-1].args)[0] in image.scripts(), cmd


def rendered_containers() -> list[tuple[str, list[str], str]]:
    """(image, command, where) of every container the Kubernetes manifests start (base and the optional
    components; the overlays only re-tag the images)."""
    files = [*ROOT.glob("deploy/k8s/base/*.yaml"), *ROOT.glob("deploy/k8s/components/*/*.yaml"),
             *ROOT.glob("deploy/**/compose*.y*ml"), *ROOT.glob("deploy/**/docker-compose*.y*ml")]
    found = []
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict):
                continue
            if "services" in doc and isinstance(doc["services"], dict):  # a compose file
                for name, svc in doc["services"].items():
                    cmd = svc.get("command")
                    found.append((svc.get("image", ""), shlex.split(cmd) if isinstance(cmd, str) else cmd or [],
                                  f"{path.name}:{name}"))
                continue
            spec = doc.get("spec", {}).get("template", {}).get("spec", {})
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                found.append((c["image"], [*c.get("command", []), *c.get("args", [])], f"{path.name}:{c['name']}"))
    return found


def test_every_command_the_manifests_start_exists_in_its_image() -> None:
    images = {name: Image(name, path, parse(path.read_text())) for name, path in CONTAINERFILES.items()}
    containers = rendered_containers()
    assert len(containers) >= 6, containers
    started = set()
    for image_name, argv, where in containers:
        img = images[image_name.split(":")[0].split("/")[-1]]
        assert argv, f"{where}: say which service the image runs"
        if argv[0] in img.scripts():
            module = img.scripts()[argv[0]].split(":")[0].split(".")[0]
        elif argv[0] == "python" and argv[1] == "-m":
            module = argv[2]
        elif argv[0] == "python":
            assert argv[1] in img.final_files(), f"{where}: {argv[1]} is not copied into {img.name}"
            continue
        else:
            pytest.fail(f"{where}: {argv[0]} is neither a console script of {img.name} nor python")
        assert module in img.modules(), f"{where}: {module} is not a package {img.name} installs"
        assert any((ROOT / d).glob(f"*/src/{module}/__init__.py") for d in PACKAGE_DIRS), module
        started.add(module)
    assert {"kiln_api", "kiln_notifier", "kiln_metrics_writer", "kiln_runner", "kiln_clearml_forwarder",
            "kiln_store"} <= started, started


def _load(path: Path):  # noqa: ANN202 - a module loaded from a file
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_healthcheck_knows_every_service_and_its_ports() -> None:
    health = _load(IMAGES / "healthcheck.py")
    assert doctest.testmod(health).failed == 0
    services = {p.parent.name for p in ROOT.glob("services/*/src/*/__main__.py")}
    assert set(health.SERVICES) == services
    images = {name: Image(name, path, parse(path.read_text())) for name, path in CONTAINERFILES.items()}
    scripts = {k: v.split(":")[0].split(".")[0] for img in images.values() for k, v in img.scripts().items()}
    for module, (script, prefix, _) in health.SERVICES.items():
        assert scripts.get(script) == module, (script, module)
        settings = next(ROOT.glob(f"services/*/src/{module}/settings.py")).read_text()
        env_prefix = re.search(r'env_prefix="([A-Z_]+)"', settings).group(1)  # type: ignore[union-attr]
        assert prefix.startswith(env_prefix), (module, prefix, env_prefix)
        field = prefix[len(env_prefix):].lower() + "port"
        assert re.search(rf"^\s+{field}: ", settings, re.M), f"{module} has no setting {field}"
    # the worker images turn their health server on by default (127.0.0.1 unless told otherwise)
    for name, img in images.items():
        env = {k: v for i in img.final if i.cmd == "ENV" for k, v in env_pairs(i.args).items()}
        for module in img.modules() & set(health.SERVICES):
            if health.SERVICES[module][2] is None:
                assert health.url_of(module, env), f"{name}: {module} has no metrics port in the image"

