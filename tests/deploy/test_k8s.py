"""The Kubernetes manifests (deploy/k8s) and the compose file (deploy/compose.yaml), checked offline:
every document against the schema of its kind (the core kinds from kubernetes-validate's bundled
schemas, strict; KEDA's from its CRDs, vendored in tests/deploy/schemas), the references between
them, the config they give the bot and the server, and KEDA's query against the real schema."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
# The oldest Kubernetes release still supported upstream when these manifests were written.
KUBERNETES_VERSION = "1.33.0"
KEDA_KINDS = {"ScaledObject": "scaledobjects", "TriggerAuthentication": "triggerauthentications"}


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


@pytest.fixture(scope="module")
def manifests(kustomization) -> list[dict[str, Any]]:
    return [d for name in kustomization["resources"] for d in documents(K8S / name)]


def by_kind(manifests: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return workload["spec"]["template"]["spec"]["containers"]


def test_every_yaml_file_is_listed_or_an_example(kustomization):
    listed = set(kustomization["resources"]) | {"kustomization.yaml", "secret.example.yaml"}
    assert {p.name for p in K8S.glob("*.yaml")} == listed


def test_every_document_matches_the_schema_of_its_kind(manifests):
    validators = {
        kind: jsonschema.Draft7Validator(json.loads((SCHEMAS / f"keda-{plural}-v1alpha1.json").read_text()))
        for kind, plural in KEDA_KINDS.items()
    }
    for doc in [*manifests, *documents(K8S / "secret.example.yaml")]:
        where = f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}"
        if doc["kind"] in KEDA_KINDS:
            assert doc["apiVersion"] == "keda.sh/v1alpha1", where
            errors = [e.message for e in validators[doc["kind"]].iter_errors(doc)]
            assert not errors, f"{where}: {errors}"
        else:
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{where}: {e.message} at {'/'.join(map(str, e.path))}")


def test_the_kinds_a_deployment_needs_are_there(manifests):
    kinds = {(m["kind"], m["metadata"]["name"]) for m in manifests}
    assert {
        ("Deployment", "imagine-server"),
        ("Deployment", "imagine-bot"),
        ("Deployment", "imagine-discord"),
        ("Job", "imagine-migrate"),
        ("Service", "imagine-server"),
        ("Service", "imagine-bot"),
        ("ConfigMap", "imagine-config"),
        ("PersistentVolumeClaim", "imagine-images"),
        ("ScaledObject", "imagine-server"),
        ("TriggerAuthentication", "imagine-database"),
    } <= kinds


def test_one_server_per_gpu_with_probes(manifests):
    [server] = containers(by_kind(manifests, "Deployment")["imagine-server"])
    assert server["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert server["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/health"
    assert "startupProbe" in server, "a model takes minutes to load: liveness must wait for it"


def test_bots_have_probes_and_no_gpu(manifests):
    for name in ("imagine-bot", "imagine-discord"):
        [bot] = containers(by_kind(manifests, "Deployment")[name])
        assert "nvidia.com/gpu" not in str(bot["resources"]), name
        assert "readinessProbe" in bot and "livenessProbe" in bot, name


def test_discord_runs_in_one_pod_only(manifests):
    deployments = by_kind(manifests, "Deployment")
    with_token = [
        n
        for n, d in deployments.items()
        if any(e["name"] == "DISCORD_TOKEN" for e in containers(d)[0]["env"])
    ]
    assert with_token == ["imagine-discord"]
    discord = deployments["imagine-discord"]["spec"]
    assert discord["replicas"] == 1 and discord["strategy"]["type"] == "Recreate"


def test_references_resolve(manifests):
    config_maps = by_kind(manifests, "ConfigMap")
    claims = by_kind(manifests, "PersistentVolumeClaim")
    [secret] = documents(K8S / "secret.example.yaml")
    secret_keys = set(secret["stringData"])
    workloads = [*by_kind(manifests, "Deployment").values(), *by_kind(manifests, "Job").values()]
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        mounts = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert mounts == {v["name"] for v in pod.get("volumes", [])}, workload["metadata"]["name"]
        for env in (e for c in pod["containers"] for e in c.get("env", [])):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret_keys, env
    for service in by_kind(manifests, "Service").values():
        selected = [
            w for w in by_kind(manifests, "Deployment").values()
            if service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]  # fmt: skip
        assert selected, f"Service {service['metadata']['name']} selects no pods"
        ports = {p["name"] for w in selected for c in containers(w) for p in c.get("ports", [])}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    scaled = by_kind(manifests, "ScaledObject")["imagine-server"]["spec"]
    assert scaled["scaleTargetRef"]["name"] in by_kind(manifests, "Deployment")
    auth = by_kind(manifests, "TriggerAuthentication")[scaled["triggers"][0]["authenticationRef"]["name"]]
    assert {r["key"] for r in auth["spec"]["secretTargetRef"]} <= secret_keys


def test_the_config_map_is_a_valid_config_for_the_bot_and_the_server(manifests):
    from bot.backends import load_backends_config
    from bot.config import load_core_config
    from bot.playground.config import load_playground_config
    from inference_server.config import load_config

    raw = tomllib.loads(by_kind(manifests, "ConfigMap")["imagine-config"]["data"]["config.toml"])
    env = {"DATABASE_URL": "postgresql://imagine:x@db:5432/imagine", "PLAYGROUND_PASSWORD": "secret"}
    core = load_core_config(raw, env)
    assert core.database.auto_migrate is False, "the migrate Job upgrades the schema"
    assert load_backends_config(raw, env).urls == ("http://imagine-server:8080",)
    assert load_playground_config(raw, env).exposed
    assert load_config(raw, environ={}).server.host == "0.0.0.0"


def imagine_variables(workloads: list[dict[str, Any]]) -> dict[str, str]:
    found = {}
    for workload in workloads:
        for container in containers(workload):
            for env in container.get("env", []):
                if env["name"].startswith("IMAGINE_") and "value" in env:
                    found[env["name"]] = env["value"]
    return found


def check_imagine_variables(variables: dict[str, str]) -> None:
    """Each IMAGINE_<SECTION>_<KEY> names a real key (a typo would be ignored silently) and its value
    is valid: load every section of both packages with them."""
    from bot.backends import load_backends_config
    from bot.config import load_core_config
    from bot.playground.config import load_playground_config
    from inference_server.config import load_config

    sections = {
        "inference_server", "model", "batching", "bot", "database", "storage", "quotas", "moderation",
        "backends", "discord", "slack", "playground",
    }  # fmt: skip
    known = set()
    from dataclasses import fields

    from bot.backends.config import BackendsConfig
    from bot.config import BotConfig, DatabaseConfig, ModerationConfig, QuotaConfig, StorageConfig
    from bot.discord_adapter.config import DiscordConfig
    from bot.playground.config import PlaygroundConfig
    from bot.slack_adapter.config import SlackConfig
    from inference_server.config import BatchingConfig, ModelConfig, ServerConfig

    classes = {
        "inference_server": ServerConfig, "model": ModelConfig, "batching": BatchingConfig, "bot": BotConfig,
        "database": DatabaseConfig, "storage": StorageConfig, "quotas": QuotaConfig,
        "moderation": ModerationConfig, "backends": BackendsConfig, "discord": DiscordConfig,
        "slack": SlackConfig, "playground": PlaygroundConfig,
    }  # fmt: skip
    assert set(classes) == sections
    for section, cls in classes.items():
        known |= {f"IMAGINE_{section}_{f.name}".upper() for f in fields(cls)}
    unknown = sorted(set(variables) - known - {"IMAGINE_CONFIG"})
    assert not unknown, f"these variables name no config key: {unknown}"
    env = {**variables, "PLAYGROUND_PASSWORD": "secret"}
    load_core_config({}, env)
    load_backends_config({}, env)
    load_playground_config({}, env)
    load_config({}, environ=env)


def test_imagine_variables_of_the_manifests_name_real_keys(manifests):
    variables = imagine_variables(
        [*by_kind(manifests, "Deployment").values(), *by_kind(manifests, "Job").values()]
    )
    assert "IMAGINE_MODEL_DEVICE" in variables
    check_imagine_variables(variables)


def compose_variables(service: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items() if k.startswith("IMAGINE_")}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())


def test_compose_has_the_fleet_and_runs_migrations_first(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "s3", "migrate", "server-1", "server-2", "bot-1", "bot-2"}
    for name in ("bot-1", "bot-2"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    assert services["migrate"]["command"] == ["python", "-m", "bot.migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("postgres", "s3", "server-1", "server-2"):
        assert "healthcheck" in services[name], name
    # Liveness is by heartbeat, not hostname; distinct hostnames name each claim's holder in the
    # jobs table (lease owners start with it), which `make deploy-test` reads.
    hostnames = [services[n]["hostname"] for n in ("bot-1", "bot-2", "server-1", "server-2")]
    assert len(set(hostnames)) == 4


def test_compose_bots_share_images_through_s3_not_a_folder(compose):
    services = compose["services"]
    storage = [{k: v for k, v in services[n]["environment"].items() if k.startswith(("IMAGINE_STORAGE_", "AWS_"))}
               for n in ("bot-1", "bot-2")]  # fmt: skip
    assert storage[0] == storage[1] and storage[0]["IMAGINE_STORAGE_BACKEND"] == "s3"
    assert "http://s3:9000" in storage[0]["IMAGINE_STORAGE_ENDPOINT_URL"]
    for name in ("bot-1", "bot-2"):
        assert services[name]["depends_on"]["s3"]["condition"] == "service_healthy"
        assert not services[name].get("volumes"), "no shared folder: what works here works across hosts"


def test_compose_takes_secrets_from_the_environment_only(compose):
    text = (REPO / "deploy" / "compose.yaml").read_text()
    secrets = {
        **{
            s: s for s in ("POSTGRES_PASSWORD", "INFERENCE_API_TOKEN", "PLAYGROUND_PASSWORD", "DISCORD_TOKEN")
        },
        "AWS_SECRET_ACCESS_KEY": "S3_SECRET_ACCESS_KEY",
    }
    for secret, variable in secrets.items():
        values = re.findall(rf"^\s+{secret}: (.*)$", text, flags=re.M)
        assert values, secret
        for value in values:
            assert value.startswith("${" + variable), f"{secret} is not read from the environment: {value}"
    assert "DISCORD_TOKEN" not in compose["services"]["bot-2"]["environment"], "one Discord connection"


def test_imagine_variables_of_the_compose_file_name_real_keys(compose):
    variables: dict[str, str] = {}
    for service in compose["services"].values():
        variables.update(compose_variables(service))
    variables = {k: re.sub(r"\$\{[A-Z0-9_]+:?-([^}]*)\}", r"\1", v) for k, v in variables.items()}
    assert "IMAGINE_BACKENDS_URLS" in variables
    check_imagine_variables(variables)


async def test_kedas_query_counts_the_queue_on_the_real_schema(tmp_path, db_url):
    from sqlalchemy import text

    from bot.bootstrap import build_core
    from bot.core.api import Actor, Place

    manifests = documents(K8S / "keda.yaml")
    [scaled] = [m for m in manifests if m["kind"] == "ScaledObject"]
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]
    config = {
        "database": {"url": db_url, "auto_migrate": True},
        "storage": {"dir": str(tmp_path / "images")},
        "backends": {"kind": "fake"},
    }
    async with build_core(config, {}, start_dispatcher=False) as core:
        core.service.register_delivery("web", _NoDelivery())
        views = [
            await core.service.imagine(
                Actor("web", f"u{i}"), Place("web"), f"a cat {i}", idempotency_key=f"k{i}"
            )
            for i in range(3)
        ]
        async with core.db.session() as s:
            assert (await s.execute(text(query))).scalar_one() == 3
        # A finished job is no longer queue: cancelling one leaves two.
        await core.service.cancel(Actor("web", "u0"), views[0].id)
        async with core.db.session() as s:
            assert (await s.execute(text(query))).scalar_one() == 2


class _NoDelivery:
    async def on_queued(self, *args: Any) -> None: ...
    async def on_progress(self, *args: Any) -> None: ...
    async def on_waiting(self, *args: Any) -> None: ...
    async def on_succeeded(self, *args: Any) -> None: ...
    async def on_failed(self, *args: Any) -> None: ...
