"""The cluster configs in clusters/ are checked with the code that consumes them.

* aws.yaml / gcp.yaml go through what ``ray up`` does before it touches a cloud:
  ``ray.autoscaler._private.util.prepare_config`` (merge with the provider's
  defaults.yaml, setup-command merging, per-type worker bounds) and
  ``validate_config`` (Ray's ray-schema.json plus its cross-field checks), then
  through ``AutoscalingConfig``, the reader of the v2 autoscaler that runs on the
  head (default for ``ray up`` since Ray 2.50) and picks node types by priority.

  ``ray up`` then continues in ``commands._bootstrap_config``:
  ``provider.fillout_available_node_types_resources`` (AWS: DescribeInstanceTypes)
  and ``provider.bootstrap_config`` (AWS: IAM profile, key pair, subnets, security
  group; GCP: project, service account, key pair, subnets). Every one of those
  calls the cloud API with credentials, so the tests stop before them and check
  the provider-specific parts with pure functions instead: Ray's own
  security-group rule builder, and botocore's offline validation of the
  RunInstances request Ray builds from each node_config.
* kuberay.yaml: the fields the KubeRay CRDs require, the Ray autoscaler's own
  RayCluster-CR reader (``_derive_autoscaling_config_from_ray_cr``, what the
  autoscaler sidecar runs), Ray's RuntimeEnv validation, the ``sdd-search``
  argument parser for the entrypoint, and the MLflow Service/Deployment wiring.

Nothing here contacts AWS, GCP or Kubernetes.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import (
    _derive_autoscaling_config_from_ray_cr,
)
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
from ray.runtime_env import RuntimeEnv

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
VM_FILES = ["aws.yaml", "gcp.yaml"]
COMMAND_LISTS = [
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
]
# GPUs per instance / machine type named in the configs.
AWS_GPUS = {"g5.xlarge": 1, "g6.xlarge": 1, "p4d.24xlarge": 8, "g6e.48xlarge": 8}
GCP_GPUS = {"g2-standard-8": 1, "a2-highgpu-8g": 8}
GPU_COUNT_BY_TYPE = {"gpu_1x": 1, "gpu_8x": 8}


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / name).read_text())


def _pyproject_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _env_file_vars(config: dict) -> dict[str, str]:
    """The ``export K=V`` lines that initialization_commands write to ~/.sdd-search.env."""
    writer = next(
        c for c in config["initialization_commands"] if ".sdd-search.env" in c and "printf" in c
    )
    exports = [word for word in shlex.split(writer) if word.startswith("export ")]
    pairs = (word.removeprefix("export ").split("=", 1) for word in exports)
    return {key: value.strip('"') for key, value in pairs}


def _all_commands(config: dict) -> list[str]:
    return [cmd for key in COMMAND_LISTS for cmd in config.get(key, [])]


def _mlflow_command(config: dict) -> str:
    matches = [c for c in _all_commands(config) if "mlflow server" in c]
    assert len(matches) == 1, "exactly one command runs the MLflow server"
    assert matches[0] in config["head_setup_commands"], (
        "the head's setup installs it, not Ray's start"
    )
    return matches[0]


def _run_mlflow_unit_install(config: dict, home: Path, bucket: str) -> tuple[str, list[str]]:
    """Run the head's unit-installing command as ``ray up`` would (bash, ~/.bashrc's variables),
    with ``sudo`` running its command as it is and ``systemctl`` recording its arguments; the
    unit folder is ``home/systemd``. Returns (the installed unit's text, systemctl's calls)."""
    bin_dir, units = home / "bin", home / "systemd"
    for folder in (bin_dir, units, home / "mlflow", home / "sdd-venv" / "bin"):
        folder.mkdir(parents=True, exist_ok=True)
    calls = home / "systemctl.calls"
    calls.write_text("")
    (bin_dir / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
    (bin_dir / "systemctl").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (home / "sdd-venv" / "bin" / "mlflow").write_text("#!/bin/sh\nsleep 60\n")
    for tool in (bin_dir / "sudo", bin_dir / "systemctl", home / "sdd-venv" / "bin" / "mlflow"):
        tool.chmod(0o755)
    command = _mlflow_command(config).replace("/etc/systemd/system", str(units))
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(home), "SDD_BUCKET": bucket}
    subprocess.run(["bash", "-c", command], env=env, check=True, timeout=30)
    unit = (units / "sdd-mlflow.service").read_text()
    return unit, calls.read_text().splitlines()


def _unit_sections(unit: str) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    for line in unit.splitlines():
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        elif "=" in line:
            key, value = line.split("=", 1)
            current[key] = value
    return sections


def _workers(config: dict) -> dict[str, dict]:
    return {
        k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]
    }


def _gpu_family(node_type: str) -> str:
    return node_type.rsplit("_", 1)[0]  # gpu_1x_spot -> gpu_1x


@pytest.fixture(params=VM_FILES)
def vm(request) -> tuple[str, dict]:
    return request.param, _load(request.param)


# --------------------------------------------------------------------------
# aws.yaml / gcp.yaml: Ray's cluster-launcher functions
# --------------------------------------------------------------------------


def test_vm_config_passes_ray_schema_as_written(vm):
    _, raw = vm
    validate_config(copy.deepcopy(raw))


def test_vm_config_prepared_like_ray_up(vm):
    name, raw = vm
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    assert prepared["provider"]["type"] == name.removesuffix(".yaml")
    # defaults.yaml is merged key by key: had a command list been left out, the
    # provider defaults (which pip-install a Ray nightly wheel) would run instead.
    assert prepared["setup_commands"] == raw["setup_commands"]
    assert prepared["head_setup_commands"] == raw["setup_commands"] + raw["head_setup_commands"]
    assert prepared["worker_setup_commands"] == raw["setup_commands"] + raw["worker_setup_commands"]
    assert prepared["head_start_ray_commands"] == raw["head_start_ray_commands"]
    assert prepared["worker_start_ray_commands"] == raw["worker_start_ray_commands"]
    assert not any("ray-wheels" in c for c in _all_commands(prepared))
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0
    for node_type in _workers(prepared).values():
        assert node_type["min_workers"] == 0, "GPU nodes only while trials need them"
        assert 0 < node_type["max_workers"] <= prepared["max_workers"]


def test_v2_autoscaler_prefers_spot_and_falls_back_to_on_demand_twin(vm):
    _, raw = vm
    node_types = AutoscalingConfig(
        copy.deepcopy(raw), skip_content_hash=True
    ).get_node_type_configs()
    spot = [n for n in node_types if n.endswith("_spot")]
    assert {_gpu_family(n) for n in spot} == {"gpu_1x", "gpu_8x"}
    for name in spot:
        twin = name.removesuffix("_spot") + "_ondemand"
        assert twin in node_types, f"{name} has no on-demand fallback"
        # Same resources -> same utilization score, so priority decides (spot
        # first); after a failed spot launch the availability score, which ranks
        # above priority, drops and the twin wins.
        assert node_types[name].resources == node_types[twin].resources
        assert node_types[name].priority > node_types[twin].priority
        assert node_types[name].max_worker_nodes == node_types[twin].max_worker_nodes


def test_gpu_counts(vm):
    name, raw = vm
    nodes = raw["available_node_types"]
    head = nodes[raw["head_node_type"]]
    assert head["resources"]["GPU"] == 0 and head["resources"]["CPU"] > 0
    for node_name, node in _workers(raw).items():
        family = _gpu_family(node_name)
        gpus = GPU_COUNT_BY_TYPE[family]
        assert node["resources"]["GPU"] == gpus
        assert node["resources"][family] == gpus, "custom resource: one unit per GPU"
        config = node["node_config"]
        if name == "aws.yaml":
            assert AWS_GPUS[config["InstanceType"]] == gpus
        else:
            assert GCP_GPUS[config["machineType"]] == gpus
            (accelerator,) = config["guestAccelerators"]
            assert accelerator["acceleratorCount"] == gpus


def test_spot_market_options(vm):
    name, raw = vm
    nodes = raw["available_node_types"]
    assert "InstanceMarketOptions" not in nodes[raw["head_node_type"]]["node_config"]
    for node_name in [n for n in nodes if n.endswith("_spot")]:
        spot = copy.deepcopy(nodes[node_name]["node_config"])
        twin = copy.deepcopy(nodes[node_name.removesuffix("_spot") + "_ondemand"]["node_config"])
        if name == "aws.yaml":
            assert spot.pop("InstanceMarketOptions") == {"MarketType": "spot"}
            assert "InstanceMarketOptions" not in twin
        else:
            spot_scheduling, twin_scheduling = spot.pop("scheduling"), twin.pop("scheduling")
            assert spot_scheduling["provisioningModel"] == "SPOT"
            assert spot_scheduling["automaticRestart"] is False
            assert twin_scheduling["provisioningModel"] == "STANDARD"
            for scheduling in (spot_scheduling, twin_scheduling):
                assert scheduling["onHostMaintenance"] == "TERMINATE"  # GPU VMs cannot migrate
        assert spot == twin, f"{node_name} and its on-demand twin must launch the same machine"


def test_mlflow_server_on_head_bound_to_localhost(vm, tmp_path):
    """The head's MLflow server is a systemd unit that restarts it on failure, bound to
    127.0.0.1:5000, apart from Ray: no Ray start command touches it."""
    name, raw = vm
    unit, _ = _run_mlflow_unit_install(raw, tmp_path, "my-bucket")
    sections = _unit_sections(unit)
    service = sections["Service"]
    assert service["Restart"] == "on-failure" and int(service["RestartSec"]) > 0
    assert sections["Install"]["WantedBy"] == "multi-user.target"
    words = shlex.split(service["ExecStart"])
    assert words[:2] == [f"{tmp_path}/sdd-venv/bin/mlflow", "server"]
    options = dict(zip(words[2::2], words[3::2], strict=True))
    assert options["--host"] == "127.0.0.1"
    assert options["--port"] == "5000"
    assert options["--backend-store-uri"] == f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    scheme = "s3" if name == "aws.yaml" else "gs"
    assert options["--artifacts-destination"] == f"{scheme}://my-bucket/mlflow-artifacts"
    assert not any(
        "mlflow" in c for c in raw["worker_start_ray_commands"] + raw["worker_setup_commands"]
    )
    assert not any("mlflow" in c for c in raw["head_start_ray_commands"]), "apart from Ray"
    assert not any("0.0.0.0" in c for c in _all_commands(raw)), "nothing listens on all interfaces"
    head_start = next(c for c in raw["head_start_ray_commands"] if "ray start --head" in c)
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "--port=6379" in head_start
    assert any(
        "ray start --address=$RAY_HEAD_IP:6379" in c for c in raw["worker_start_ray_commands"]
    )
    if shutil.which("systemd-analyze"):  # systemd's own reading of the unit file
        check = subprocess.run(
            ["systemd-analyze", "verify", str(tmp_path / "systemd" / "sdd-mlflow.service")],
            capture_output=True,
            text=True,
        )
        problems = [line for line in check.stderr.splitlines() if "sdd-mlflow.service" in line]
        assert not problems, check.stderr


def test_commands_are_valid_bash(vm):
    _, raw = vm
    for command in _all_commands(raw):
        result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert result.returncode == 0, f"{command!r}: {result.stderr}"


def test_setup_installs_package_at_launched_version(vm, tmp_path):
    name, raw = vm
    variables = _env_file_vars(raw)
    assert variables["SDD_SEARCH_VERSION"] == _pyproject_version()
    assert "${SDD_SEARCH_VERSION}" in variables["SDD_SEARCH_SOURCE"]
    assert variables["SDD_PYTHON"] == "3.11"
    install = next(c for c in raw["setup_commands"] if "sdd-search[" in c)
    assert "sdd-search[" in install and "@ ${SDD_SEARCH_SOURCE}" in install
    assert '"ray[default,tune,train]==${RAY_VERSION}"' in install
    assert ("boto3" if name == "aws.yaml" else "google-cloud-storage") in install
    assert any("source ~/sdd-venv/bin/activate" in c for c in raw["setup_commands"])

    # Run the initialization commands in a scratch home, as Ray does (bash -i
    # sourcing ~/.bashrc), and read the variables back the way later commands do.
    (tmp_path / ".bashrc").write_text("")
    env = {"HOME": str(tmp_path), "PATH": os.environ["PATH"]}
    for command in raw["initialization_commands"] * 2:  # idempotent on re-run
        subprocess.run(["bash", "-c", command], env=env, check=True)
    assert (tmp_path / ".bashrc").read_text().count("sdd-search.env") == 1
    shown = subprocess.run(
        ["bash", "-c", "source ~/.bashrc; echo $SDD_SEARCH_SOURCE; echo $SDD_BUCKET"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert shown[0].endswith(f"@v{_pyproject_version()}")
    assert shown[1] == variables["SDD_BUCKET"]


def test_torch_is_the_build_the_images_driver_runs(vm):
    """Every node installs torch from the cu128 index first (CUDA 12.8: NVIDIA driver >= 570,
    which the configs' images have; PyPI's default 2.14 wheels need CUDA 13's driver >= 580),
    then the package with the same pins, so that nothing replaces that build; the comments
    name the driver the images need."""
    from packaging.requirements import Requirement

    name, raw = vm
    variables = _env_file_vars(raw)
    assert variables["TORCH_INDEX"] == "https://download.pytorch.org/whl/cu128"
    torch_version, vision = variables["TORCH_VERSION"], variables["TORCHVISION_VERSION"]
    torch_minor, vision_minor = (int(v.split(".")[1]) for v in (torch_version, vision))
    assert vision.startswith("0.") and vision_minor == torch_minor + 15, "torchvision's pair"
    requirement = next(
        Requirement(d)
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        if d.startswith("torch") and not d.startswith("torchvision")
    )
    assert requirement.specifier.contains(torch_version)
    installs = [c for c in raw["setup_commands"] if "pip install" in c]
    assert len(installs) == 2
    first, second = (shlex.split(c) for c in installs)
    assert first[first.index("--index-url") + 1] == "$TORCH_INDEX"
    pins = ["torch==${TORCH_VERSION}", "torchvision==${TORCHVISION_VERSION}"]
    assert set(pins) <= set(first) and set(pins) <= set(second)
    assert "--index-url" not in second and "--extra-index-url" not in second
    text = (CLUSTERS / name).read_text()
    assert ">= 570" in text and "Any Ubuntu AMI with the NVIDIA driver works" not in text
    if name == "gcp.yaml":
        images = [
            disk["initializeParams"]["sourceImage"]
            for node in _workers(raw).values()
            for disk in node["node_config"]["disks"]
        ]
        assert all(re.search(r"-nvidia-(\d+)$", image) for image in images), images
        assert all(int(re.search(r"-nvidia-(\d+)$", i).group(1)) >= 570 for i in images)


def test_nodes_are_terminated_not_left_stopped(vm):
    """cache_stopped_nodes: false: `ray down` and idle scale-down leave no stopped GPU worker
    billing its disk (Ray's default for both providers is true)."""
    name, raw = vm
    assert raw["provider"]["cache_stopped_nodes"] is False
    assert prepare_config(copy.deepcopy(raw))["provider"]["cache_stopped_nodes"] is False


def test_mlflow_unit_is_installed_once_and_restarted_only_when_it_changes(vm, tmp_path):
    """Every `ray up` runs the head's setup: the first installs and starts the unit, the next
    ones only make sure it runs (a search logging to it is never cut off), and a changed unit
    (here: another bucket) is installed and restarted."""
    _, raw = vm
    first, calls = _run_mlflow_unit_install(raw, tmp_path, "bucket-a")
    assert calls == ["daemon-reload", "enable sdd-mlflow", "restart sdd-mlflow"]
    again, calls = _run_mlflow_unit_install(raw, tmp_path, "bucket-a")
    assert again == first and calls == ["enable --now sdd-mlflow"]
    changed, calls = _run_mlflow_unit_install(raw, tmp_path, "bucket-b")
    assert "bucket-b" in changed and calls == [
        "daemon-reload",
        "enable sdd-mlflow",
        "restart sdd-mlflow",
    ]
    readme = (CLUSTERS / "README.md").read_text()
    name = "aws" if "s3://" in first else "gcp"
    assert f"ray exec clusters/{name}.yaml 'sudo systemctl restart sdd-mlflow'" in readme


def test_mlflow_database_is_restored_only_onto_a_new_head(vm, tmp_path):
    """The backup the README's step 9 writes is fetched only when the head has no database (a
    stand-in `aws`/`gcloud` records the call)."""
    name, raw = vm
    (restore,) = [c for c in raw["head_setup_commands"] if "mlflow-backup" in c]
    tool = "aws" if name == "aws.yaml" else "gcloud"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / tool).write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\necho db > "$4"\n')
    (bin_dir / tool).chmod(0o755)
    (tmp_path / "mlflow").mkdir()
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "SDD_BUCKET": "b"}
    subprocess.run(["bash", "-c", restore], env=env, check=True)
    scheme = "s3" if name == "aws.yaml" else "gs"
    (call,) = (tmp_path / "calls").read_text().splitlines()
    assert call.split()[:4] == [
        *(["s3", "cp"] if tool == "aws" else ["storage", "cp"]),
        f"{scheme}://b/mlflow-backup/mlflow.db",
        f"{tmp_path}/mlflow/mlflow.db",
    ]
    subprocess.run(["bash", "-c", restore], env=env, check=True)  # a database is there: no call
    assert len((tmp_path / "calls").read_text().splitlines()) == 1
    readme = (CLUSTERS / "README.md").read_text()
    assert f"{scheme}://my-sdd-bucket/mlflow-backup/mlflow.db" in readme


def test_every_node_gets_an_identity_not_keys(vm):
    name, raw = vm
    nodes = raw["available_node_types"]
    if name == "aws.yaml":
        head = nodes[raw["head_node_type"]]["node_config"]["IamInstanceProfile"]
        for node in _workers(raw).values():
            worker = node["node_config"]["IamInstanceProfile"]
            assert worker and worker != head, "workers get their own (S3-only) profile"
    else:
        assert "gcp_credentials" not in raw["provider"]
        project = raw["provider"]["project_id"]
        for node in _workers(raw).values():
            (account,) = node["node_config"]["serviceAccounts"]
            assert account["email"].endswith(f"@{project}.iam.gserviceaccount.com")
            assert account["scopes"] == ["https://www.googleapis.com/auth/cloud-platform"]


def test_file_mounts_sources_exist(vm):
    _, raw = vm
    for remote, local in raw["file_mounts"].items():
        assert remote.startswith("/home/ubuntu/")
        assert (ROOT / local).exists(), f"file_mounts source {local} (relative to the repo root)"


def test_no_credentials_in_cluster_files():
    patterns = [
        r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",  # AWS access key ids
        r"(?i)aws_secret_access_key|aws_access_key_id|aws_session_token",
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
        r'"private_key"\s*:',  # GCP service-account key JSON
        r"(?i)password\s*[:=]\s*\S+",
    ]
    files = sorted(CLUSTERS.glob("*.yaml")) + [CLUSTERS / "README.md"]
    for path in files:
        text = path.read_text()
        for pattern in patterns:
            assert not re.search(pattern, text), f"{path.name} matches {pattern}"


def test_aws_security_group_opens_only_ssh():
    pytest.importorskip("boto3", reason="ray's AWS provider module imports boto3")
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    raw = _load("aws.yaml")
    for name, node in raw["available_node_types"].items():
        assert "SecurityGroupIds" not in node["node_config"], f"{name}: use Ray's group"
    extra = raw["provider"]["security_group"]["IpPermissions"]
    # The exact rules `ray up` authorizes on the group it creates.
    rules = _create_default_inbound_rules(["sg-cluster"], extra)
    for rule in rules:
        outside = rule.get("IpRanges") or rule.get("Ipv6Ranges") or rule.get("PrefixListIds")
        if outside:
            assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22)
        else:
            assert rule["UserIdGroupPairs"] == [{"GroupId": "sg-cluster"}], "intra-cluster only"
    assert any(rule.get("IpRanges") for rule in rules), "SSH stays reachable for ray up"


def test_aws_node_configs_are_valid_run_instances_requests():
    botocore_session = pytest.importorskip("botocore.session")
    from botocore.validate import ParamValidator

    shape = (
        botocore_session.get_session()
        .get_service_model("ec2")
        .operation_model("RunInstances")
        .input_shape
    )
    raw = _load("aws.yaml")
    for name, node in raw["available_node_types"].items():
        # What Ray's AWSNodeProvider._create_node passes to ec2.create_instances.
        request = copy.deepcopy(node["node_config"])
        request.update(
            MinCount=1,
            MaxCount=1,
            SubnetId="subnet-0123456789abcdef0",
            SecurityGroupIds=["sg-0123456789abcdef0"],
            KeyName="ray-autoscaler_1_us-west-2",
            TagSpecifications=[
                {"ResourceType": "instance", "Tags": [{"Key": "ray-cluster-name", "Value": "x"}]}
            ],
        )
        report = ParamValidator().validate(request, shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"
        assert request["ImageId"] == raw["available_node_types"]["head"]["node_config"]["ImageId"]


def test_aws_nodes_require_imdsv2():
    raw = _load("aws.yaml")
    for name, node in raw["available_node_types"].items():
        options = node["node_config"]["MetadataOptions"]
        assert options["HttpTokens"] == "required", name
        assert options["HttpEndpoint"] == "enabled" and options["HttpPutResponseHopLimit"] == 1


def test_aws_readme_names_the_key_ray_creates_and_the_p4_spot_quota():
    from ray.autoscaler._private.aws.config import key_pair

    raw = _load("aws.yaml")
    readme = (CLUSTERS / "README.md").read_text()
    _, key_path = key_pair(0, "<region>", None)  # what `ray up` writes, for the first key
    assert "~/.ssh/" + Path(key_path).name in readme
    assert "ray-autoscaler_1_" not in readme
    quota = "All P4, P3 and P2 Spot Instance Requests"
    assert quota in readme and quota in (CLUSTERS / "aws.yaml").read_text()
    assert raw["auth"]["ssh_user"] == "ubuntu"


def _gcloud_commands(readme: str, verb: str) -> list[list[str]]:
    joined = readme.replace("\\\n", " ")
    return [shlex.split(line.strip()) for line in joined.splitlines() if verb in line]


def test_gcp_nodes_join_their_own_network_with_tag_scoped_rules():
    """Every node is on the sdd-search subnetwork and carries the sdd-search tag; the README's
    firewall rules all target that tag, only SSH comes from outside, and the cluster's ports
    are open only between sdd-search nodes."""
    raw = _load("gcp.yaml")
    project, region = raw["provider"]["project_id"], raw["provider"]["region"]
    for name, node in raw["available_node_types"].items():
        config = node["node_config"]
        (interface,) = config["networkInterfaces"]
        assert interface["subnetwork"] == (
            f"projects/{project}/regions/{region}/subnetworks/sdd-search"
        ), name
        assert config["tags"]["items"] == ["sdd-search"], name
    readme = (CLUSTERS / "README.md").read_text()
    (network,) = _gcloud_commands(readme, "compute networks create")
    assert "sdd-search" in network and "--subnet-mode=custom" in network
    (subnet,) = _gcloud_commands(readme, "compute networks subnets create")
    assert {"--network=sdd-search", f"--region={region}"} <= set(subnet)
    rules = {words[4]: words for words in _gcloud_commands(readme, "compute firewall-rules create")}
    assert len(rules) == 2, rules
    for words in rules.values():
        assert "--network=sdd-search" in words and "--target-tags=sdd-search" in words, words
    outside = [w for w in rules.values() if any(a.startswith("--source-ranges") for a in w)]
    (ssh,) = outside
    assert "--allow=tcp:22" in ssh
    (internal,) = [w for w in rules.values() if w is not ssh]
    assert "--source-tags=sdd-search" in internal and not any(
        "source-ranges" in a for a in internal
    )
    assert "default-allow" not in readme, "the default network is not used"


def test_gcp_zone_is_consistent():
    raw = _load("gcp.yaml")
    provider = raw["provider"]
    assert provider["availability_zone"].startswith(provider["region"] + "-")
    for name, node in raw["available_node_types"].items():
        for disk in node["node_config"]["disks"]:
            disk_type = disk["initializeParams"]["diskType"]
            assert disk_type.startswith(f"zones/{provider['availability_zone']}/diskTypes/"), name
            assert not disk_type.endswith("pd-standard"), (
                f"{name}: g2/a2 need pd-balanced or pd-ssd"
            )


def test_placeholders_are_documented():
    readme = (CLUSTERS / "README.md").read_text()
    for path in sorted(CLUSTERS.glob("*.yaml")):
        text = path.read_text()
        assert "CHANGE ME" in text
        for token in sorted(set(re.findall(r"CHANGE-ME[\w-]*", text))):
            assert token in readme, (
                f"{path.name}: placeholder {token} is not explained in README.md"
            )


# --------------------------------------------------------------------------
# kuberay.yaml
# --------------------------------------------------------------------------


def _kuberay_documents() -> dict[str, dict]:
    documents = [d for d in yaml.safe_load_all((CLUSTERS / "kuberay.yaml").read_text()) if d]
    by_kind = {d["kind"]: d for d in documents}
    assert len(by_kind) == len(documents), "one document per kind"
    return by_kind


def _rayjob() -> dict:
    return _kuberay_documents()["RayJob"]


def test_kuberay_documents():
    documents = _kuberay_documents()
    assert set(documents) == {
        "ServiceAccount",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "NetworkPolicy",
        "RayJob",
    }
    for document in documents.values():
        assert document["metadata"]["name"]


def test_rayjob_has_the_fields_kuberay_requires():
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("sdd-search ")
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # in-pod, ClusterIP only
    head_container = head["template"]["spec"]["containers"][0]
    assert head_container["image"].startswith("rayproject/ray:")
    groups = cluster["workerGroupSpecs"]
    assert {g["groupName"] for g in groups} == {"gpu-1x", "gpu-8x"}
    for group in groups:
        for key in (
            "groupName",
            "replicas",
            "minReplicas",
            "maxReplicas",
            "rayStartParams",
            "template",
        ):
            assert key in group, f"{group.get('groupName')}: {key}"
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        assert container["image"].startswith("rayproject/ray:") and container["image"].endswith(
            "-gpu"
        )
        gpus = GPU_COUNT_BY_TYPE[group["groupName"].replace("-", "_")]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert int(limits["nvidia.com/gpu"]) == gpus
        assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
            "tolerations"
        ]
    # rayStartParams is map[string]string in the CRD.
    for params in [head["rayStartParams"]] + [g["rayStartParams"] for g in groups]:
        assert all(isinstance(v, str) for v in params.values()), params


def test_kuberay_autoscaler_reads_the_gpu_groups():
    job = _rayjob()
    ray_cluster = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": job["metadata"]["name"], "namespace": "default"},
        "spec": job["spec"]["rayClusterSpec"],
    }
    config = _derive_autoscaling_config_from_ray_cr(ray_cluster)  # also runs validate_config
    node_types = config["available_node_types"]
    assert node_types["headgroup"]["resources"]["GPU"] == 0
    assert node_types["gpu-1x"]["resources"]["GPU"] == 1
    assert node_types["gpu-1x"]["resources"]["gpu_1x"] == 1
    assert node_types["gpu-8x"]["resources"]["GPU"] == 8
    assert node_types["gpu-8x"]["resources"]["gpu_8x"] == 8
    assert node_types["gpu-1x"]["min_workers"] == node_types["gpu-8x"]["min_workers"] == 0


def test_rayjob_runtime_env_and_entrypoint():
    from sdd_search.cli import build_parser
    from sdd_search.spec import parse_override

    spec = _rayjob()["spec"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)  # Ray's own validation of every field
    version = _pyproject_version()
    assert runtime_env["working_dir"].endswith(f"/v{version}.zip")
    (package,) = [p for p in runtime_env["pip"] if p.startswith("sdd-search")]
    assert package.endswith(f"@v{version}")
    # The torch build the GPU nodes' driver runs, as aws.yaml / gcp.yaml install it.
    variables = _env_file_vars(_load("aws.yaml"))
    assert f"--extra-index-url {variables['TORCH_INDEX']}" in runtime_env["pip"]
    cuda = variables["TORCH_INDEX"].rsplit("/", 1)[1]
    assert f"torch=={variables['TORCH_VERSION']}+{cuda}" in runtime_env["pip"]
    assert f"torchvision=={variables['TORCHVISION_VERSION']}+{cuda}" in runtime_env["pip"]

    entrypoint = spec["entrypoint"]
    # KubeRay's submitter pastes the entrypoint into a shell command line.
    assert not re.search(r"[;&|<>`$]", entrypoint)
    words = shlex.split(entrypoint)
    args = build_parser().parse_args(words[1:])
    assert args.address == "auto"
    assert args.spec == "search_spaces/cifar100.yaml"
    overrides = dict(parse_override(o) for o in args.overrides)
    assert overrides["tracking.uri"] == "http://mlflow:5000"
    assert re.fullmatch(r"(s3|gs)://[\w.-]+/sdd-search", overrides["storage"])


def test_mlflow_service_and_deployment_agree():
    from sdd_search.spec import parse_override

    documents = _kuberay_documents()
    service, deployment = documents["Service"], documents["Deployment"]
    assert service["spec"]["type"] == "ClusterIP"
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert (
        deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    )
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"

    container = pod["spec"]["containers"][0]
    (service_port,) = service["spec"]["ports"]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    target = service_port["targetPort"]
    assert container_ports.get(target, target) == service_port["port"] == 5000

    words = shlex.split(" ".join(container["args"]))
    server = words[words.index("mlflow") :]
    assert server[1] == "server"
    options = dict(zip(server[2::2], server[3::2], strict=True))
    assert int(options["--port"]) == service_port["port"]
    assert f"{service['metadata']['name']}:{service_port['port']}" in options[
        "--allowed-hosts"
    ].split(",")
    db_path = options["--backend-store-uri"].removeprefix("sqlite:///")
    (mount,) = container["volumeMounts"]
    assert db_path.startswith(mount["mountPath"] + "/")
    (volume,) = pod["spec"]["volumes"]
    assert volume["name"] == mount["name"]
    assert (
        volume["persistentVolumeClaim"]["claimName"]
        == documents["PersistentVolumeClaim"]["metadata"]["name"]
    )

    tracking = dict(
        parse_override(w)
        for w in shlex.split(_rayjob()["spec"]["entrypoint"])
        if w.startswith("tracking.")
    )
    assert (
        tracking["tracking.uri"] == f"http://{service['metadata']['name']}:{service_port['port']}"
    )


def test_pods_use_the_service_account():
    documents = _kuberay_documents()
    account = documents["ServiceAccount"]["metadata"]["name"]
    cluster = documents["RayJob"]["spec"]["rayClusterSpec"]
    pods = [
        documents["Deployment"]["spec"]["template"]["spec"],
        cluster["headGroupSpec"]["template"]["spec"],
    ]
    pods += [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    assert all(pod["serviceAccountName"] == account for pod in pods)


def test_ray_version_is_the_same_everywhere():
    job = _rayjob()
    version = job["spec"]["rayClusterSpec"]["rayVersion"]
    cluster = job["spec"]["rayClusterSpec"]
    images = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]]
    images += [g["template"]["spec"]["containers"][0]["image"] for g in cluster["workerGroupSpecs"]]
    assert all(image.startswith(f"rayproject/ray:{version}-py311") for image in images)
    for name in VM_FILES:
        assert _env_file_vars(_load(name))["RAY_VERSION"] == version
    floor = next(
        d
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        if d.startswith("ray")
    )
    minimum = re.search(r">=\s*([\d.]+)", floor).group(1)
    assert _version_tuple(version) >= _version_tuple(minimum)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def test_network_policy_guards_the_heads_job_api():
    """The head pod (only it) is selected; every port is open to the Ray cluster's own pods,
    the dashboard / job API (8265) also to the RayJob's submitter and the KubeRay operator, and
    nothing else reaches it."""
    documents = _kuberay_documents()
    policy, job = documents["NetworkPolicy"], documents["RayJob"]
    cluster = job["spec"]["rayClusterSpec"]
    head_labels = cluster["headGroupSpec"]["template"]["metadata"]["labels"]
    worker_labels = [g["template"]["metadata"]["labels"] for g in cluster["workerGroupSpecs"]]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= head_labels.items()
    assert not any(selector.items() <= labels.items() for labels in worker_labels)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    own, api = policy["spec"]["ingress"]
    (peers,) = own["from"]
    assert "ports" not in own  # all of Ray's ports, for its own pods only
    for labels in [head_labels, *worker_labels]:
        assert peers["podSelector"]["matchLabels"].items() <= labels.items()
    assert api["ports"] == [{"protocol": "TCP", "port": 8265}]
    submitter, operator = api["from"]
    # KubeRay names the submitter Job after the RayJob; Kubernetes labels its pods job-name.
    assert submitter == {"podSelector": {"matchLabels": {"job-name": job["metadata"]["name"]}}}
    assert operator["namespaceSelector"] == {}
    assert operator["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
    dashboard = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    assert {"containerPort": 8265, "name": "dashboard"} in dashboard


# --------------------------------------------------------------------------------------------
# kuberay.yaml against KubeRay's own CRD schemas (v1.5.0, in ../shared/kuberay-crds)

CRDS = ROOT.parent / "shared" / "kuberay-crds" / "v1.5.0"


def _crd_schema(file: str) -> dict:
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay's CRDs are not here ({CRDS}: shared/kuberay-crds)")
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema validates the CRD schema")
    del jsonschema
    crd = yaml.safe_load((CRDS / file).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def _schema_errors(document: dict, schema: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft4Validator(schema)  # OpenAPI v3's schema dialect
    return [
        f"{'.'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def test_rayjob_matches_kuberays_crd_schema():
    schema = _crd_schema("rayjobs.yaml")
    job = _rayjob()
    assert _schema_errors(job, schema) == []
    # The check sees a mistake: rayStartParams values are strings in the CRD.
    broken = copy.deepcopy(job)
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0
    errors = _schema_errors(broken, schema)
    assert errors == [
        "spec.rayClusterSpec.headGroupSpec.rayStartParams.num-gpus: 0 is not of type 'string'"
    ]


def test_rayjobs_cluster_matches_kuberays_raycluster_crd_schema():
    schema = _crd_schema("rayclusters.yaml")
    job = _rayjob()
    ray_cluster = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": job["metadata"]["name"]},
        "spec": job["spec"]["rayClusterSpec"],
    }
    assert _schema_errors(ray_cluster, schema) == []
    broken = copy.deepcopy(ray_cluster)
    broken["spec"]["workerGroupSpecs"][0]["replicas"] = "0"
    assert _schema_errors(broken, schema) == [
        "spec.workerGroupSpecs.0.replicas: '0' is not of type 'integer'"
    ]


def test_the_readmes_walkthrough_names_tests_that_exist():
    """Each walkthrough command in the README's last table names the tests that exercise it, or
    says it needs a real cloud; every test it names is there."""
    readme = (CLUSTERS / "README.md").read_text()
    table = readme[readme.index("## Which commands the tests run") :]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) >= 8
    for row in rows:
        exercised = row.rsplit("|", 2)[1]
        assert "tests/" in exercised or "needs a real" in exercised, row
    named, file = [], None
    for match in re.finditer(r"`(tests/\w+\.py)?::(\w+)`", table):
        file = match.group(1) or file
        named.append((file, match.group(2)))
    assert len(named) >= 20
    for file, test in named:
        assert re.search(rf"^def {test}\(", (ROOT / file).read_text(), re.M), f"{file}::{test}"
