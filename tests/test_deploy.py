"""The deployment files in deploy/: every manifest parses, names a job script and flags that exist,
agrees with the Dockerfile's image tag and Ray version, and the audit RayJob's command runs locally
on the demo model. (No Kubernetes here: the manifests are checked as data, the command for real.)"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
SECRET = "memray-s3"
# RayJobSpec fields of KubeRay's ray.io/v1 CRD (ray-operator/apis/ray/v1/rayjob_types.go).
RAYJOB_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend",
}  # fmt: skip


def yaml_files() -> list[Path]:
    return sorted(DEPLOY.glob("*.yaml"))


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifests() -> list[tuple[str, dict]]:
    """(file name, document) for every Kubernetes object in deploy/."""
    return [(path.name, doc) for path in yaml_files() for doc in load(path) if "kind" in doc]


def job_specs() -> list[tuple[str, dict]]:
    """Every RayJob spec the manifests submit: RayJobs, RayCronJob templates, RayJobs kept in ConfigMaps."""
    found = []
    for name, doc in manifests():
        if doc["kind"] == "RayJob":
            found.append((f"{name}:RayJob", doc["spec"]))
        elif doc["kind"] == "RayCronJob":
            found.append((f"{name}:RayCronJob", doc["spec"]["jobTemplate"]))
        elif doc["kind"] == "ConfigMap":
            for key, text in doc.get("data", {}).items():
                inner = yaml.safe_load(text)
                if isinstance(inner, dict) and inner.get("kind") == "RayJob":
                    found.append((f"{name}:ConfigMap/{key}", inner["spec"]))
    return found


def cluster_specs() -> list[tuple[str, dict]]:
    specs = [(f"{name}:RayCluster", doc["spec"]) for name, doc in manifests() if doc["kind"] == "RayCluster"]
    return specs + [(where, spec["rayClusterSpec"]) for where, spec in job_specs() if "rayClusterSpec" in spec]


@functools.cache
def dockerfile() -> dict:
    """ARG defaults, the FROM image, WORKDIR and COPY sources of deploy/Dockerfile."""
    args, copies, base, workdir = {}, [], None, None
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "ARG" and "=" in words[1]:
            key, value = words[1].split("=", 1)
            args[key] = value
        elif words[0] == "FROM":
            base = words[1]
        elif words[0] == "WORKDIR":
            workdir = words[1]
        elif words[0] == "COPY":
            copies += [w for w in words[1:-1] if not w.startswith("--")]
    return {"args": args, "from": base, "workdir": workdir, "copies": copies}


def expected_image_tag() -> str:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    return f"memray-audit:{version}-ray{dockerfile()['args']['RAY_VERSION']}"


@functools.cache
def accepted_flags(script: str) -> frozenset[str]:
    """The long options a job script's real parser accepts, read from its --help."""
    result = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return frozenset(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", result.stdout))


def split_args(tokens: list[str]) -> tuple[list[str], list[tuple[str, str | None]]]:
    """Positionals before the first option, then (option, value or None for a switch) in order."""
    first = next((i for i, t in enumerate(tokens) if t.startswith("--")), len(tokens))
    options, rest = [], tokens[first:]
    while rest:
        flag, rest = rest[0], rest[1:]
        assert flag.startswith("--"), f"unexpected argument {flag!r} after the options"
        value = None
        if rest and not rest[0].startswith("--"):
            value, rest = rest[0], rest[1:]
        options.append((flag, value))
    return tokens[:first], options


def without_claims(template: dict) -> dict:
    """A pod template without its PersistentVolumeClaim volumes and their mounts."""
    template = copy.deepcopy(template)
    spec = template["spec"]
    claims = {v["name"] for v in spec.get("volumes", []) if "persistentVolumeClaim" in v}
    spec["volumes"] = [v for v in spec.get("volumes", []) if v["name"] not in claims]
    for container in spec["containers"]:
        container["volumeMounts"] = [m for m in container.get("volumeMounts", []) if m["name"] not in claims]
    return template


def in_repo(token: str) -> Path | None:
    """The repository file a token names, if it looks like a repo-relative path."""
    if "://" in token or token.startswith(("-", "/")) or "/" not in token:
        return None
    return REPO / token


# ---------------------------------------------------------------------------------------------


def test_every_yaml_parses_and_every_manifest_is_named():
    assert {p.name for p in yaml_files()} >= {
        "raycluster.yaml",
        "rayjob-audit.yaml",
        "raycronjob-nightly.yaml",
        "cronjob-nightly.yaml",
        "nightly-reports-pvc.yaml",
        "secret.example.yaml",
        "runtime_env.yaml",
    }
    for path in yaml_files():
        assert load(path), f"{path.name} is empty"
    kinds = set()
    for name, doc in manifests():
        kinds.add(doc["kind"])
        assert doc.get("apiVersion"), name
        metadata = doc["metadata"]
        assert metadata.get("name") or metadata.get("generateName"), f"{name}: {doc['kind']} has no name"
        if doc["kind"] in ("RayCluster", "RayJob", "RayCronJob"):
            assert doc["apiVersion"] == "ray.io/v1", name
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "Secret"} <= kinds


def test_ray_jobs_use_kuberays_rayjob_fields():
    specs = job_specs()
    assert len(specs) == 3  # the audit RayJob, the RayCronJob template, the CronJob's RayJob
    for where, spec in specs:
        assert set(spec) <= RAYJOB_FIELDS, f"{where}: unknown RayJob fields {set(spec) - RAYJOB_FIELDS}"
        assert spec["entrypoint"].strip(), where
        # The local working_dir is read by the submitter pod: only K8sJobMode has one.
        assert spec["submissionMode"] == "K8sJobMode", where
        assert spec["shutdownAfterJobFinishes"] is True, f"{where}: GPU clusters must not outlive their job"
    for name, doc in manifests():
        if doc["kind"] == "RayCronJob":
            # jobTemplate is a RayJob spec itself (no metadata/spec wrapper) in KubeRay's CRD.
            assert set(doc["spec"]) <= {"schedule", "jobTemplate", "suspend"}, name
            assert "spec" not in doc["spec"]["jobTemplate"], name
            assert len(doc["spec"]["schedule"].split()) == 5, name


@pytest.mark.parametrize("where, spec", job_specs(), ids=[w for w, _ in job_specs()])
def test_entrypoint_runs_a_job_script_with_existing_files_and_accepted_flags(where, spec):
    entrypoint = spec["entrypoint"]
    tokens = shlex.split(entrypoint)
    assert tokens[0] == "python" and re.fullmatch(r"jobs/\w+\.py", tokens[1]), f"{where}: {entrypoint}"
    assert (REPO / tokens[1]).is_file(), f"{where}: {tokens[1]} does not exist in the repository"
    for token in tokens[1:]:
        path = in_repo(token)
        assert path is None or path.exists(), f"{where}: {token} does not exist in the repository"
        # The submitter runs the entrypoint through a shell: brace patterns must reach memray unexpanded.
        if "{" in token:
            assert f"'{token}'" in entrypoint, f"{where}: quote {token} or the shell expands it"
    _, options = split_args(tokens[2:])
    unknown = {flag for flag, _ in options} - accepted_flags(tokens[1])
    assert not unknown, f"{where}: {tokens[1]} does not accept {sorted(unknown)}"


def test_runtime_envs_are_valid_and_agree_with_runtime_env_yaml():
    from ray.runtime_env import RuntimeEnv

    base = yaml.safe_load((DEPLOY / "runtime_env.yaml").read_text())
    assert "working_dir" not in base  # given with --working-dir on the command line
    assert {".git", "memray-out"} <= set(base["excludes"])
    envs = [("runtime_env.yaml", base)]
    for where, spec in job_specs():
        env = yaml.safe_load(spec["runtimeEnvYAML"])
        # The repository copy in the image, which the submitter pod uploads as the job's working_dir.
        assert env.pop("working_dir") == dockerfile()["workdir"], where
        assert env == base, f"{where}: runtimeEnvYAML differs from deploy/runtime_env.yaml"
        envs.append((where, env))
    for where, env in envs:
        assert set(env) <= RuntimeEnv.known_fields, f"{where}: {set(env) - RuntimeEnv.known_fields}"
        RuntimeEnv(**env, working_dir=str(REPO))  # Ray's own validation (types, paths)


def test_images_and_ray_versions_agree_with_the_dockerfile():
    import ray

    docker = dockerfile()
    ray_version = docker["args"]["RAY_VERSION"]
    assert re.fullmatch(r"rayproject/ray:\$\{RAY_VERSION\}-py3\d+-gpu", docker["from"]), docker["from"]
    # The image's Ray is the Ray that jobs are developed and submitted with.
    assert ray_version.split(".")[:2] == ray.__version__.split(".")[:2]
    for source in docker["copies"]:
        assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"
    allowed = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {f"!{s}" for s in docker["copies"]} <= set(allowed), "the .dockerignore allowlist misses a COPY source"

    specs = cluster_specs()
    assert len(specs) == 4
    for where, spec in specs:
        assert spec["rayVersion"] == ray_version, where
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            for container in group["template"]["spec"]["containers"]:
                image = container["image"]
                assert image.endswith("/" + expected_image_tag()), f"{where}: {image} != .../{expected_image_tag()}"


def test_gpu_workers_credentials_and_pod_templates_are_the_same_everywhere():
    (secret,) = [doc for _, doc in manifests() if doc["kind"] == "Secret"]
    assert secret["metadata"]["name"] == SECRET
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
    specs = cluster_specs()
    head = specs[0][1]["headGroupSpec"]["template"]
    (worker,) = specs[0][1]["workerGroupSpecs"]
    for where, spec in specs:
        # Pod templates may not drift between the cluster, the audit job and the nightly jobs; only
        # the group sizes differ, and the nightly heads mount the reports claim.
        assert without_claims(spec["headGroupSpec"]["template"]) == head, where
        assert [g["template"] for g in spec["workerGroupSpecs"]] == [worker["template"]], where
    for template in (head, worker["template"]):
        for container in template["spec"]["containers"]:
            assert {"secretRef": {"name": SECRET}} in container["envFrom"]
    pod = worker["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert "nvidia.com/gpu" not in str(head)
    for where, spec in job_specs():
        # Fixed worker groups: KubeRay submits when every pod is ready, so the pool is complete.
        (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"], where


def test_both_nightly_schedules_create_the_same_rayjob():
    docs = {(doc["kind"], doc["metadata"].get("name")): doc for _, doc in manifests()}
    raycron = docs["RayCronJob", "memray-nightly"]
    cron = docs["CronJob", "memray-nightly"]
    assert cron["spec"]["schedule"] == raycron["spec"]["schedule"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][:3] == ["kubectl", "create", "-f"]
    path = Path(container["command"][3])
    (mount,) = container["volumeMounts"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert path.parent == Path(mount["mountPath"])
    configmap = docs["ConfigMap", volume["configMap"]["name"]]
    rayjob = yaml.safe_load(configmap["data"][path.name])
    assert rayjob["kind"] == "RayJob" and rayjob["apiVersion"] == "ray.io/v1"
    assert "generateName" in rayjob["metadata"] and "name" not in rayjob["metadata"]  # one per night
    assert rayjob["spec"] == raycron["spec"]["jobTemplate"]
    # The pod's ServiceAccount may create RayJobs.
    role = docs["Role", pod["serviceAccountName"]]
    binding = docs["RoleBinding", pod["serviceAccountName"]]
    assert {"kind": "ServiceAccount", "name": pod["serviceAccountName"]} in binding["subjects"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert any(
        "ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and "create" in r["verbs"] for r in role["rules"]
    )


def test_the_nightly_report_lands_on_a_claim_that_outlives_the_cluster():
    claims = {doc["metadata"]["name"] for _, doc in manifests() if doc["kind"] == "PersistentVolumeClaim"}
    reports = 0
    for where, spec in job_specs():
        _, options = split_args(shlex.split(spec["entrypoint"])[2:])
        report = dict(options).get("--report")
        if report is None:
            continue
        reports += 1
        # jobs/nightly.py writes the report (and its .json summary) as files where the driver runs: the head.
        pod = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = [
            m
            for m in pod["containers"][0]["volumeMounts"]
            if Path(report).is_relative_to(m["mountPath"]) and "persistentVolumeClaim" in volumes[m["name"]]
        ]
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] in claims, where
    assert reports == 2  # the RayCronJob and the CronJob


@pytest.mark.slow
def test_the_audit_rayjob_entrypoint_works_locally_on_the_demo_model(tmp_path):
    from test_distributed import SMALL_FLAGS

    from memray.catalog.reader import Catalog
    from memray.demo import demo_model_dir, write_demo_images

    (spec,) = [doc["spec"] for _, doc in manifests() if doc["kind"] == "RayJob"]
    tokens = shlex.split(spec["entrypoint"])
    assert tokens[:2] == ["python", "jobs/audit.py"]
    sources, options = split_args(tokens[2:])
    options = dict(options)
    # Only the cluster's paths and resources change: object storage becomes the demo model, images
    # and a catalog under tmp_path; one CPU actor on half a CPU (a 2-CPU machine, no GPU).
    assert sources and all(s.startswith("s3://") for s in sources)
    assert options["--model"].startswith("s3://") and options["--catalog"].startswith("s3://")
    model = demo_model_dir(tmp_path / "demo-model")
    manifest = write_demo_images(tmp_path / "demo-images")
    catalog = tmp_path / "catalog"
    options.update(
        {
            "--model": str(model),
            "--catalog": str(catalog),
            "--actors": "1",
            "--gpus-per-actor": "0",
            "--cpus-per-actor": "0.5",
        }
    )
    options.pop("--precision", None)  # autocast is for GPUs; memray refuses it on CPU
    assert not [v for v in options.values() if v and "://" in v]
    flags = [part for flag, value in options.items() for part in (flag, value) if part is not None]
    command = [sys.executable, tokens[1], str(manifest), *flags, *SMALL_FLAGS]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private local Ray
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Ray Data's actor pool passed its actors' constructor arguments through the object store, and Ray's
    # core worker warned of it on every run (ray-project/ray#53727): memray's auditors take theirs inline.
    assert "core_worker" not in result.stderr and "object store" not in result.stderr, result.stderr[-3000:]

    expected = sorted(json.loads(line)["id"] for line in manifest.read_text().splitlines())
    table = Catalog(str(catalog)).query("SELECT image_id, status FROM audits ORDER BY image_id")
    rows = list(zip(table.column("image_id").to_pylist(), table.column("status").to_pylist()))
    assert rows == [(image_id, "ok") for image_id in expected]
