"""Deployment files, checked as far as a machine without a Docker engine can.

- Dockerfile: hadolint, and its instructions read back (numeric non-root user, dependencies before source,
  exec-form CMD, EXPOSE 8000, a curl-free HEALTHCHECK on /ready, the checkpoint named once); then the image's
  exact CMD and HEALTHCHECK commands are run here, against the tiny checkpoint on a free port.
- deploy/install-deps.sh: run here with a stand-in `python` whose pip only records what it is asked, for the
  GPU and the CPU image, over a base that ships another torch: both end with constraints.txt's torch.
- docker-compose.yml: the compose-spec JSON schema, Debian's docker-compose 1.29, and its services read back.
- deploy/nginx/nginx.conf: run by a real nginx in front of a real service, streaming without buffering.
- deploy/k8s/: kubernetes-validate against a pinned Kubernetes version, and the manifests read back.

Tools that come from Debian (docker-compose, nginx) skip with the reason when absent; .ci/run installs them.
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from gpt import GPT, CharTokenizer, GPTConfig, save_checkpoint

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
INSTALL_DEPS = REPO / "deploy" / "install-deps.sh"
COMPOSE_FILE = REPO / "docker-compose.yml"
NGINX_CONF = REPO / "deploy" / "nginx" / "nginx.conf"
K8S_DIR = REPO / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"
IMAGE_PORT = 8000  # the port the image's CMD, HEALTHCHECK and EXPOSE agree on
IMAGE_WORKDIR = "/app"  # where the Dockerfile puts the repository; the repository root here


def find_tool(name: str) -> str:
    """A command from this Python's environment (pip-installed tools) or PATH; skip the test if absent."""
    beside_python = Path(sys.executable).parent / name
    path = str(beside_python) if beside_python.is_file() else shutil.which(name)
    if path is None:
        pytest.skip(f"`{name}` is not installed (see .ci/run for how CI installs it)")
    return path


def run_tool(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------------------------- Dockerfile


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    arguments: str  # the rest of the instruction, continuation lines joined


def parse_dockerfile(text: str) -> list[Instruction]:
    instructions: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments may sit between continuation lines, as in Docker's own parser
        pending += stripped
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def expand_args(instructions: list[Instruction]) -> list[Instruction]:
    """`${NAME}` replaced by the default of the ARG NAME declared above it, as a build without --build-arg."""
    defaults: dict[str, str] = {}
    expanded = []
    for instruction in instructions:
        arguments = re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), m.group(0)),
                           instruction.arguments)
        if instruction.keyword == "ARG" and "=" in arguments:
            name, _, default = arguments.partition("=")
            defaults[name] = default
        expanded.append(Instruction(instruction.keyword, arguments))
    return expanded


def exec_form(arguments: str) -> list[str]:
    """The JSON array of an exec-form CMD/HEALTHCHECK; fails the test on shell form."""
    try:
        command = json.loads(arguments)
    except json.JSONDecodeError:
        pytest.fail(f"not an exec-form (JSON array) command: {arguments}")
    assert isinstance(command, list) and all(isinstance(part, str) for part in command), arguments
    return command


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions with its build arguments at their defaults."""
    return expand_args(parse_dockerfile(DOCKERFILE.read_text()))


def only(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [instruction for instruction in instructions if instruction.keyword == keyword]
    assert len(found) == 1, f"expected exactly one {keyword}, found {len(found)}"
    return found[0]


def image_cmd(dockerfile: list[Instruction]) -> list[str]:
    return exec_form(only(dockerfile, "CMD").arguments)


def image_healthcheck(dockerfile: list[Instruction]) -> list[str]:
    """The HEALTHCHECK's command, options dropped: `HEALTHCHECK --interval=.. CMD ["python", ...]`."""
    arguments = only(dockerfile, "HEALTHCHECK").arguments
    options, separator, command = arguments.partition("CMD ")
    assert separator, f"HEALTHCHECK without CMD: {arguments}"
    assert all(option.startswith("--") for option in options.split()), options
    return exec_form(command)


def arg_default(dockerfile: list[Instruction], name: str) -> str:
    [default] = [i.arguments.partition("=")[2] for i in dockerfile
                 if i.keyword == "ARG" and i.arguments.partition("=")[0] == name]
    return default


def image_env(dockerfile: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in dockerfile:
        if instruction.keyword == "ENV":
            for pair in shlex.split(instruction.arguments):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def test_dockerfile_passes_hadolint() -> None:
    result = run_tool(find_tool("hadolint"), str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def torch_pin() -> str:
    [pin] = [line.removeprefix("torch==") for line in (REPO / "constraints.txt").read_text().splitlines()
             if line.startswith("torch==")]
    return pin


def cpu_torch_index(dockerfile_text: str) -> str:
    """The TORCH_INDEX_URL of the CPU image's build command, as the Dockerfile's header documents it."""
    [url] = re.findall(r"--build-arg TORCH_INDEX_URL=(\S+)", dockerfile_text)
    return url


def test_the_default_base_brings_no_torch_and_compose_builds_from_the_same_one(
        dockerfile: list[Instruction], compose: dict) -> None:
    base_image = arg_default(dockerfile, "BASE_IMAGE")
    assert "FROM ${BASE_IMAGE}" in DOCKERFILE.read_text().splitlines()
    # A python image: Python >= 3.11 (the version constraints.txt was resolved for) and pip, without torch,
    # so what install-deps.sh installs is the only torch in the image.
    assert re.fullmatch(r"python:3\.1[1-9](\.\d+)?-slim(-\w+)?", base_image), base_image
    build_args = compose["x-image"]["build"]["args"]
    assert interpolation_default(build_args["BASE_IMAGE"]) == base_image
    # The GPU image takes torch from PyPI, whose Linux x86_64 wheel is the CUDA build; the CPU image from
    # PyTorch's CPU index.
    assert arg_default(dockerfile, "TORCH_INDEX_URL") == "https://pypi.org/simple"
    assert cpu_torch_index(DOCKERFILE.read_text()) == "https://download.pytorch.org/whl/cpu"


def test_pyproject_requires_at_least_the_pinned_torch() -> None:
    import tomllib

    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"torch>={torch_pin()}" in dependencies


# Stands in for pip: records each call (with the contents of the files it names, which the script deletes) and
# "installs" a torch==X requirement into the fake site-packages, replacing the torch there as pip would.
FAKE_PIP = r"""
import json, os, re, sys
args = sys.argv[1:]
files = {a: open(a).read() for a in args if os.path.isfile(a)}
with open(os.environ["FAKE_PIP_LOG"], "a") as log:
    log.write(json.dumps({"args": args, "files": files}) + "\n")
for arg in args:
    pinned = re.fullmatch(r"torch==(\S+)", arg)
    if pinned and os.environ.get("FAKE_PIP_INSTALLS") == "1":
        local = "+cpu" if any(a.endswith("/whl/cpu") for a in args) else ""
        with open(os.path.join(os.environ["FAKE_SITE"], "torch", "__init__.py"), "w") as module:
            module.write(f"__version__ = {pinned.group(1) + local!r}\n")
            module.write(f"class version:\n    cuda = {None if local else '13.0'!r}\n")
"""


def run_install_deps(tmp_path: Path, torch_index_url: str, *, pip_installs: bool = True,
                     base_torch: str = "2.8.0") -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    """deploy/install-deps.sh as the Dockerfile runs it (from /app, beside pyproject.toml and constraints.txt,
    TORCH_INDEX_URL from the build argument), over a base whose Python already has torch `base_torch`."""
    app, bin_dir, site = tmp_path / "app", tmp_path / "bin", tmp_path / "site"
    for folder in (app, bin_dir, site / "torch"):
        folder.mkdir(parents=True)
    for name in ("pyproject.toml", "constraints.txt"):
        shutil.copy(REPO / name, app / name)
    (site / "torch" / "__init__.py").write_text(
        f"__version__ = {base_torch!r}\nclass version:\n    cuda = '12.9'\n")
    (tmp_path / "fake_pip.py").write_text(FAKE_PIP)
    python = bin_dir / "python"
    python.write_text(f"""#!/bin/sh
if [ "$1" = -m ] && [ "$2" = pip ]; then shift 2; exec {sys.executable} {tmp_path / 'fake_pip.py'} "$@"; fi
exec {sys.executable} "$@"
""")
    python.chmod(0o755)
    log = tmp_path / "pip.log"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": str(site), "TORCH_INDEX_URL": torch_index_url,
           "FAKE_PIP_LOG": str(log), "FAKE_SITE": str(site),
           "FAKE_PIP_INSTALLS": "1" if pip_installs else "0"}
    result = subprocess.run(["sh", str(INSTALL_DEPS)], cwd=app, env=env, capture_output=True, text=True,
                            timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls


@pytest.mark.parametrize("image", ["gpu", "cpu"])
def test_install_deps_gives_exactly_the_pinned_torch_over_a_base_with_another(
        image: str, dockerfile: list[Instruction], tmp_path: Path) -> None:
    dockerfile_text = DOCKERFILE.read_text()
    index = arg_default(dockerfile, "TORCH_INDEX_URL") if image == "gpu" else cpu_torch_index(dockerfile_text)
    result, calls = run_install_deps(tmp_path, index, base_torch="2.8.0")
    assert result.returncode == 0, result.stdout + result.stderr
    pin = torch_pin()
    [torch_install, requirements_install] = calls
    # torch alone, from the image's index, at the pin, whatever torch was there.
    args = torch_install["args"]
    assert args[0] == "install" and args[-1] == f"torch=={pin}" and "--no-deps" in args
    assert args[args.index("--index-url") + 1] == index
    # Then the runtime requirements under constraints.txt itself, whose torch line is the same pin.
    args = requirements_install["args"]
    constraints = args[args.index("-c") + 1]
    assert constraints == "constraints.txt"
    assert f"torch=={pin}" in (REPO / "constraints.txt").read_text().splitlines()
    requirements = requirements_install["files"][args[args.index("-r") + 1]].splitlines()
    assert f"torch>={pin}" in requirements and "--index-url" not in args
    # The script's own last step reads the installed torch back.
    expected = f"torch {pin}+cpu, CUDA build None" if image == "cpu" else f"torch {pin}, CUDA build 13.0"
    assert expected in result.stdout


def test_install_deps_fails_the_build_when_the_installed_torch_is_not_the_pin(tmp_path: Path) -> None:
    result, _ = run_install_deps(tmp_path, "https://pypi.org/simple", pip_installs=False, base_torch="2.8.0")
    assert result.returncode != 0
    assert f"torch 2.8.0 is not the pinned {torch_pin()}" in result.stderr


def test_dockerfile_installs_dependencies_before_copying_the_source(dockerfile: list[Instruction]) -> None:
    keywords = [instruction.keyword for instruction in dockerfile]
    [install] = [n for n, i in enumerate(dockerfile) if i.keyword == "RUN" and "install-deps" in i.arguments]
    copied = {n: i.arguments.split()[0] for n, i in enumerate(dockerfile) if i.keyword == "COPY"}
    dependency_files = {"pyproject.toml", "constraints.txt", "deploy/install-deps.sh"}
    for n, source in copied.items():
        if n < install:
            assert set(dockerfile[n].arguments.split()[:-1]) <= dependency_files, dockerfile[n]
        else:
            assert source.rstrip("/") in {"gpt", "training", "service", arg_default(dockerfile, "CHECKPOINT")}
    assert keywords.count("COPY") >= 5


def test_dockerfile_runs_as_a_numeric_non_root_user(dockerfile: list[Instruction]) -> None:
    users = [instruction.arguments for instruction in dockerfile if instruction.keyword == "USER"]
    assert users, "no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}: Kubernetes' runAsNonRoot needs a numeric UID"
    assert gid in {"", "0"} or gid.isdigit()


def test_dockerfile_ships_the_checkpoint_it_serves_and_names_it_once(dockerfile: list[Instruction]) -> None:
    checkpoint = arg_default(dockerfile, "CHECKPOINT")
    copies = [i.arguments.split() for i in dockerfile if i.keyword == "COPY"]
    assert [f"{checkpoint}/", f"{checkpoint}/"] in copies
    assert image_env(dockerfile)["CAESAR_CHECKPOINT"] == f"{IMAGE_WORKDIR}/{checkpoint}"
    assert only(dockerfile, "WORKDIR").arguments == IMAGE_WORKDIR
    assert DOCKERFILE.read_text().count(checkpoint) == 1, "name the shipped checkpoint in ARG CHECKPOINT only"
    assert {"model.safetensors", "config.json"} <= {path.name for path in (REPO / checkpoint).iterdir()}


def test_dockerfile_exposes_8000_and_starts_the_service_in_exec_form(dockerfile: list[Instruction]) -> None:
    assert only(dockerfile, "EXPOSE").arguments == str(IMAGE_PORT)
    expected = ["python", "-m", "service", "--host", "0.0.0.0", "--port", str(IMAGE_PORT)]
    assert image_cmd(dockerfile) == expected


def test_dockerfile_healthcheck_probes_ready_with_python(dockerfile: list[Instruction]) -> None:
    command = image_healthcheck(dockerfile)
    assert command[0] == "python"
    assert f"http://127.0.0.1:{IMAGE_PORT}/ready" in " ".join(command)
    assert not {"curl", "wget"} & set(" ".join(command).split())


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule, closely enough for these patterns: the last matching pattern wins; `!` re-includes."""
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!").removeprefix("**/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(parts[n], pattern)
               for n, prefix in enumerate(prefixes)):
            excluded = not negated
    return excluded


def test_dockerignore_keeps_local_state_out_and_the_image_inputs_in(dockerfile: list[Instruction]) -> None:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for local_state in [".venv/bin/python", "data/julius_caesar.txt", "runs/x/model.safetensors",
                        ".git/HEAD", "service/__pycache__/app.cpython-311.pyc", ".pytest_cache/v",
                        "checkpoints/some-run/model.safetensors"]:
        assert dockerignore_excludes(patterns, local_state), local_state
    for instruction in dockerfile:
        if instruction.keyword == "COPY":
            for source in instruction.arguments.split()[:-1]:
                assert not dockerignore_excludes(patterns, source.rstrip("/")), f"{source} is ignored"
    checkpoint = arg_default(dockerfile, "CHECKPOINT")
    assert not dockerignore_excludes(patterns, f"{checkpoint}/model.safetensors")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def service_env(dockerfile: list[Instruction], checkpoint: Path, **settings: str) -> dict[str, str]:
    """The image's ENV with its paths mapped onto this checkout, plus CAESAR_* settings for the test."""
    env = dict(os.environ)
    for key, value in image_env(dockerfile).items():
        if key != "HOME":
            env[key] = value.replace(IMAGE_WORKDIR, str(REPO))
    env.update({"CAESAR_CHECKPOINT": str(checkpoint), "CAESAR_DEVICE": "cpu", "CAESAR_THREADS": "1",
                "CAESAR_MAX_BATCH_SIZE": "2", "OMP_NUM_THREADS": "1"})
    env.update({f"CAESAR_{key.upper()}": value for key, value in settings.items()})
    return env


@contextmanager
def running(command: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as log_file:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()  # SIGKILL would leave nginx's worker processes behind
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def wait_until_ready(port: int, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"/ready not 200 after {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def on_port(command: list[str], port: int) -> list[str]:
    """The image's command with the Python here and `port` instead of the image's."""
    command = [sys.executable if part == "python" else part for part in command]
    return [part.replace(str(IMAGE_PORT), str(port)) for part in command]


@pytest.mark.slow
def test_the_image_command_serves_a_checkpoint_and_its_healthcheck_follows_readiness(
        dockerfile: list[Instruction], tiny_checkpoint: Path, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "service.log"
    env = service_env(dockerfile, tiny_checkpoint)
    healthcheck = on_port(image_healthcheck(dockerfile), port)
    with running(on_port(image_cmd(dockerfile), port), env, log) as server:
        wait_until_ready(port, server, log)
        assert subprocess.run(healthcheck, env=env, timeout=30).returncode == 0

        answer = httpx.post(f"http://127.0.0.1:{port}/generate", timeout=30,
                            json={"inputs": "CAESAR:", "parameters": {"max_new_tokens": 12, "seed": 3}})
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["generated_text"]) == 12

        # `docker stop` sends SIGTERM: the service drains and exits 0, and the health check then fails.
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert subprocess.run(healthcheck, env=env, capture_output=True, timeout=30).returncode != 0


# ------------------------------------------------------------------------------------------------ compose


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def interpolation_default(value: str) -> str:
    """`${VAR:-default}` -> `default`: what compose uses when the operator sets nothing."""
    match = re.fullmatch(r"\$\{\w+:?-([^}]*)\}", value)
    assert match, f"expected ${{VAR:-default}}, got {value}"
    return match.group(1)


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration):
        total += float(amount) * units[unit]
    return total


def test_compose_file_matches_the_compose_spec_schema() -> None:
    check_jsonschema = find_tool("check-jsonschema")
    result = run_tool(check_jsonschema, "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_loads_in_docker_compose_1_29() -> None:
    docker_compose = find_tool("docker-compose")
    for profiles in ([], ["--profile", "train"], ["--profile", "train", "--profile", "proxy"]):
        result = run_tool(docker_compose, "-f", str(COMPOSE_FILE), *profiles, "config", "-q")
        assert result.returncode == 0, f"{profiles}: {result.stderr}"


def test_compose_file_avoids_keys_that_docker_compose_1_29_rejects(compose: dict) -> None:
    assert "name" not in compose
    assert all("gpus" not in service for service in compose["services"].values())


def test_compose_api_serves_the_shipped_checkpoint_on_a_gpu_by_default(
        compose: dict, dockerfile: list[Instruction]) -> None:
    api = compose["services"]["api"]
    assert "profiles" not in api, "`docker compose up` with no profile must start api"
    shipped = image_env(dockerfile)["CAESAR_CHECKPOINT"]
    assert interpolation_default(api["environment"]["CAESAR_CHECKPOINT"]) == shipped
    [gpu] = api["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert api["init"] is True
    drain_s = float(interpolation_default(api["environment"]["CAESAR_DRAIN_TIMEOUT_S"]))
    assert seconds(api["stop_grace_period"]) > drain_s
    assert "/ready" in " ".join(api["healthcheck"]["test"])
    assert [port.rsplit(":", 1)[1] for port in api["ports"]] == [str(IMAGE_PORT)]
    [volume] = api["volumes"]
    assert volume.endswith(":/models:ro")


def test_compose_train_writes_where_api_reads(compose: dict) -> None:
    api, train = compose["services"]["api"], compose["services"]["train"]
    assert train["profiles"] == ["train"]
    assert train["deploy"] == api["deploy"]
    [api_volume], [train_volume] = api["volumes"], train["volumes"]
    assert train_volume == api_volume.removesuffix(":ro"), "train must write the folder api mounts"
    command = train["command"]
    assert command[:3] == ["python", "-m", "training"]
    out = command[command.index("--out") + 1]
    # Both default to the same variable: once it names a checkpoint, train writes it and api serves it.
    assert out.startswith("${CAESAR_CHECKPOINT:-/models/")
    assert api["environment"]["CAESAR_CHECKPOINT"].startswith("${CAESAR_CHECKPOINT:-")


def test_compose_proxy_puts_this_repos_nginx_config_in_front_of_api(compose: dict) -> None:
    proxy = compose["services"]["proxy"]
    assert proxy["profiles"] == ["proxy"]
    assert "./deploy/nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in proxy["volumes"]
    assert proxy["depends_on"]["api"]["condition"] == "service_healthy"
    assert "http://api:8000;" in NGINX_CONF.read_text()  # the compose service name and the image's port


# -------------------------------------------------------------------------------------------------- nginx


def render_nginx_conf(upstream_port: int, listen_port: int) -> str:
    """deploy/nginx/nginx.conf with only the upstream and the listen address swapped for local ones."""
    text = NGINX_CONF.read_text()
    replacements = {"http://api:8000;": f"http://127.0.0.1:{upstream_port};",
                    "listen 8080;": f"listen 127.0.0.1:{listen_port};"}
    for old, new in replacements.items():
        assert text.count(old) == 1, f"nginx.conf should contain `{old}` once"
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def streaming_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer: CharTokenizer) -> Path:
    """A random model wide enough that each decode step takes milliseconds, so a stream visibly spreads
    over time: a buffering proxy would deliver its first event together with its last."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=128, n_layer=6, n_head=8, n_embd=512)
    path = tmp_path_factory.mktemp("ckpt") / "streaming"
    save_checkpoint(path, GPT(config), tokenizer, preset=None, metadata={"note": "random weights, for tests"})
    return path


@pytest.mark.slow
def test_nginx_passes_server_sent_events_through_unbuffered(
        dockerfile: list[Instruction], streaming_checkpoint: Path, tmp_path: Path) -> None:
    nginx = find_tool("nginx")
    api_port, proxy_port = free_port(), free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_nginx_conf(api_port, proxy_port))
    nginx_command = [nginx, "-c", str(conf), "-e", str(tmp_path / "nginx-error.log"),
                     "-g", f"daemon off; pid {tmp_path / 'nginx.pid'};"]
    new_tokens = 40
    body = {"inputs": "BRUTUS:", "parameters": {"max_new_tokens": new_tokens, "seed": 11, "temperature": 0.8}}
    log = tmp_path / "service.log"
    env = service_env(dockerfile, streaming_checkpoint)
    with running(on_port(image_cmd(dockerfile), api_port), env, log) as server, \
            running(nginx_command, dict(os.environ), tmp_path / "nginx.log"):
        wait_until_ready(api_port, server, log)
        expected = httpx.post(f"http://127.0.0.1:{api_port}/generate", json=body, timeout=60).json()

        event_times: list[float] = []
        events: list[dict] = []
        started = time.perf_counter()
        with httpx.stream("POST", f"http://127.0.0.1:{proxy_port}/generate_stream", json=body, timeout=60,
                          headers={"X-Request-ID": "through-nginx"}) as response:
            assert response.status_code == 200, response.read()
            assert response.headers["x-request-id"] == "through-nginx"
            for line in response.iter_lines():
                if line.startswith("data:"):
                    event_times.append(time.perf_counter() - started)
                    events.append(json.loads(line.removeprefix("data:")))

    assert len(events) == new_tokens
    assert events[-1]["generated_text"] == expected["generated_text"]
    assert "".join(event["token"]["text"] for event in events) == expected["generated_text"]
    # Unbuffered, the first event arrives after one prefill while 39 decode steps are still to come. Without
    # `proxy_http_version 1.1` (nginx's default is 1.0) events arrive in clumps and this ratio was 0.9.
    first, last = event_times[0], event_times[-1]
    assert first < 0.5 * last, f"first event at {first * 1000:.0f} ms, last at {last * 1000:.0f} ms"


# ---------------------------------------------------------------------------------------------- kubernetes


def k8s_documents() -> dict[str, dict]:
    documents = {}
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            documents[f"{document['kind']}/{document['metadata']['name']}"] = document
    return documents


def kubernetes_validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    return run_tool(find_tool("kubernetes-validate"), "-k", KUBERNETES_VERSION, "--strict", *map(str, paths))


def test_k8s_manifests_validate_against_a_pinned_kubernetes() -> None:
    manifests = sorted(K8S_DIR.glob("*.yaml"))
    assert len(manifests) >= 5
    result = kubernetes_validate(*manifests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_k8s_validation_catches_a_misspelt_field(tmp_path: Path) -> None:
    broken = tmp_path / "api.yaml"
    broken.write_text((K8S_DIR / "api.yaml").read_text().replace("readinessProbe:", "readinesProbe:"))
    result = kubernetes_validate(broken)
    assert result.returncode != 0 and "readinesProbe" in result.stdout + result.stderr


def container(document: dict) -> dict:
    [only_container] = document["spec"]["template"]["spec"]["containers"]
    return only_container


def test_k8s_api_deployment_probes_drains_and_mounts_the_checkpoint_read_only() -> None:
    documents = k8s_documents()
    deployment = documents["Deployment/caesar-gpt-api"]
    pod = deployment["spec"]["template"]["spec"]
    api = container(deployment)
    assert api["args"] == image_cmd(parse_dockerfile(DOCKERFILE.read_text()))
    assert api["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert api["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert api["livenessProbe"]["httpGet"]["path"] == "/health"
    env = {variable["name"]: variable["value"] for variable in api["env"]}
    pre_stop = api["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + float(env["CAESAR_DRAIN_TIMEOUT_S"])
    [mount] = [m for m in api["volumeMounts"] if m["mountPath"] == "/models"]
    assert mount["readOnly"] is True
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["readOnly"] is True
    assert env["CAESAR_CHECKPOINT"].startswith("/models/")
    assert pod["securityContext"]["runAsNonRoot"] is True

    service = documents["Service/caesar-gpt-api"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert documents["PersistentVolumeClaim/caesar-gpt-checkpoints"]


def test_k8s_training_jobs_use_one_gpu_and_one_process_per_gpu() -> None:
    documents = k8s_documents()
    single = container(documents["Job/caesar-gpt-train"])
    assert single["args"][:3] == ["python", "-m", "training"]
    assert single["resources"]["limits"]["nvidia.com/gpu"] == 1

    ddp = container(documents["Job/caesar-gpt-train-ddp"])
    args = ddp["args"]
    assert args[:3] == ["python", "-m", "torch.distributed.run"]
    assert args[args.index("-m", 3) + 1] == "training"
    gpus = ddp["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus > 1 and int(args[args.index("--nproc_per_node") + 1]) == gpus
    api_mount = container(documents["Deployment/caesar-gpt-api"])["env"]
    served = next(variable["value"] for variable in api_mount if variable["name"] == "CAESAR_CHECKPOINT")
    for job in (single, ddp):
        assert job["args"][job["args"].index("--out") + 1] == served, "the API serves what training writes"


def test_podman_flow_script_parses_and_builds_the_cpu_image() -> None:
    flow = REPO / "deploy" / "podman-compose-flow.sh"
    result = run_tool("bash", "-n", str(flow))
    assert result.returncode == 0, result.stderr
    # The flow (run by .ci/run) builds the CPU image the way the Dockerfile documents it.
    assert f'"TORCH_INDEX_URL={cpu_torch_index(DOCKERFILE.read_text())}"' in flow.read_text()
