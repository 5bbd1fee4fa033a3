"""One deploy contract: every Secret (and key), ConfigMap (and key) and service account that the compiled KFP
pipeline and the Airflow KubernetesPodOperator pods reference exists in the chart as Helm renders it
(release `onereward`), and their node pools are the chart's. References are collected from the builders'
output (not from a list kept beside them), one test per reference, so a failure names what is missing."""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from onereward.config import load_config

PROFILE = "flux"
ENDPOINT = {"s3": {"endpointUrl": "http://minio.storage.svc:9000"}}
GPU_SERVING = {"serving": {"gpu": {"enabled": True}}}


@dataclass(frozen=True, order=True)
class Ref:
    source: str  # "kfp" | "airflow"
    kind: str  # Secret | ConfigMap | ServiceAccount
    name: str
    key: str = ""  # "" = the whole object (envFrom, serviceAccountName)
    optional: bool = False

    def __str__(self) -> str:
        key = f"[{self.key}]" if self.key else ""
        return f"{self.source}:{self.kind}/{self.name}{key}{' (optional)' if self.optional else ''}"


@dataclass(frozen=True, order=True)
class Placement:
    source: str
    gpu: str  # the GPU resource name, "" on CPU pods
    node_selector: tuple[tuple[str, str], ...]
    tolerations: tuple[tuple[str, str, str], ...]  # (key, operator, effect)

    def __str__(self) -> str:
        return f"{self.source}:{'gpu' if self.gpu else 'cpu'}-pool"


def _kfp() -> tuple[set[Ref], set[Placement]]:
    from onereward.orchestration.kfp_pipeline import compile_pipeline

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "pipeline.yaml"
        compile_pipeline(str(out), load_config(PROFILE), "img:cpu", "img:gpu")
        spec, platform = list(yaml.safe_load_all(out.read_text()))
    refs, places = set(), set()
    containers = spec["deploymentSpec"]["executors"]
    for name, ex in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].items():
        for kind, field, key_field in (("Secret", "secretAsEnv", "secretKey"),
                                       ("ConfigMap", "configMapAsEnv", "configMapKey")):
            for src in ex.get(field, []):
                obj = src["secretName"] if kind == "Secret" else src["configMapName"]
                refs |= {Ref("kfp", kind, obj, m[key_field], bool(src.get("optional"))) for m in src["keyToEnv"]}
        accel = containers[name]["container"].get("resources", {}).get("accelerator", {})
        places.add(Placement("kfp", accel.get("resourceType", ""),
                             tuple(sorted(ex.get("nodeSelector", {}).get("labels", {}).items())),
                             tuple(sorted((t["key"], t["operator"], t.get("effect", ""))
                                          for t in ex.get("tolerations", [])))))
    return refs, places


def _airflow() -> tuple[set[Ref], set[Placement]]:
    from onereward.orchestration.airflow_dag import build_dag

    with tempfile.TemporaryDirectory() as d:
        kubeconfig = Path(d) / "kubeconfig"  # build_pod_request_obj() needs one; nothing connects
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            "users": [{"name": "u", "user": {"token": "x"}}]}))
        old = os.environ.get("KUBECONFIG")
        os.environ["KUBECONFIG"] = str(kubeconfig)
        try:
            dag = build_dag(mode="kubernetes", config=PROFILE, overrides=[], dag_id="contract_check")
            pods = [t.build_pod_request_obj() for t in dag.tasks]
        finally:
            if old is None:
                os.environ.pop("KUBECONFIG")
            else:
                os.environ["KUBECONFIG"] = old
    refs, places = set(), set()
    for pod in pods:
        refs.add(Ref("airflow", "ServiceAccount", pod.spec.service_account_name or "default"))
        c = pod.spec.containers[0]
        for src in c.env_from or []:
            if src.secret_ref:
                refs.add(Ref("airflow", "Secret", src.secret_ref.name, "", bool(src.secret_ref.optional)))
            if src.config_map_ref:
                refs.add(Ref("airflow", "ConfigMap", src.config_map_ref.name, "", bool(src.config_map_ref.optional)))
        for env in c.env or []:
            vf = env.value_from
            if vf and vf.secret_key_ref:
                refs.add(Ref("airflow", "Secret", vf.secret_key_ref.name, vf.secret_key_ref.key,
                             bool(vf.secret_key_ref.optional)))
            if vf and vf.config_map_key_ref:
                refs.add(Ref("airflow", "ConfigMap", vf.config_map_key_ref.name, vf.config_map_key_ref.key,
                             bool(vf.config_map_key_ref.optional)))
        gpu = [k for k in (c.resources.limits or {}) if k not in ("cpu", "memory", "ephemeral-storage")]
        places.add(Placement("airflow", gpu[0] if gpu else "", tuple(sorted((pod.spec.node_selector or {}).items())),
                             tuple(sorted((t.key, t.operator, t.effect or "") for t in pod.spec.tolerations or []))))
    return refs, places


@functools.cache
def _collected() -> tuple[list[Ref], list[Placement]]:
    kfp_refs, kfp_places = _kfp()
    af_refs, af_places = _airflow()
    return sorted(kfp_refs | af_refs), sorted(kfp_places | af_places)


def _objects(docs: dict[str, list[dict]]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for ds in docs.values() for d in ds}


def _keys(obj: dict) -> set[str]:
    return set(obj.get("data") or {}) | set(obj.get("stringData") or {})


def test_the_builders_reference_the_runtime():
    refs, places = _collected()
    assert {(r.source, r.kind) for r in refs} >= {
        ("kfp", "Secret"), ("kfp", "ConfigMap"), ("airflow", "Secret"), ("airflow", "ConfigMap"),
        ("airflow", "ServiceAccount")}
    assert {(p.source, bool(p.gpu)) for p in places} == {("kfp", True), ("kfp", False), ("airflow", True),
                                                         ("airflow", False)}


@pytest.mark.parametrize("ref", _collected()[0], ids=str)
def test_reference_exists_in_the_rendered_chart(ref, helm_render):
    # required: there with the default values (and with an endpoint); optional: there at least when the
    # chart's optional settings (an S3 endpoint) are given
    renders = {"with an S3 endpoint": ENDPOINT} if ref.optional else {"defaults": {}, "with an S3 endpoint": ENDPOINT}
    for label, values in renders.items():
        objects = _objects(helm_render(values))
        obj = objects.get((ref.kind, ref.name))
        rendered = sorted(n for k, n in objects if k == ref.kind)
        assert obj is not None, f"{ref}: the chart ({label}) renders no {ref.kind} {ref.name!r}, only {rendered}"
        if ref.key:
            assert ref.key in _keys(obj), (f"{ref}: {ref.kind} {ref.name!r} ({label}) has no key {ref.key!r}, "
                                           f"only {sorted(_keys(obj))}")


def test_the_chart_publishes_only_what_the_pods_read(helm_render):
    objects = _objects(helm_render(ENDPOINT))
    read = {(r.kind, r.name, r.key) for r in _collected()[0] if r.source == "kfp"}  # KFP maps key by key
    for (kind, name), obj in objects.items():
        if any(r[:2] == (kind, name) for r in read):
            unread = sorted(key for key in _keys(obj) if (kind, name, key) not in read)
            assert unread == [], f"{kind} {name!r} publishes keys no pod reads: {unread}"


@pytest.mark.parametrize("placement", _collected()[1], ids=str)
def test_pods_use_the_charts_node_pools(placement, helm_render):
    flux = load_config(PROFILE).resources
    serving = _objects(helm_render(GPU_SERVING))[("Deployment", "onereward-serving")]["spec"]["template"]["spec"]
    [(label, gpu_pool)] = serving["nodeSelector"].items()
    if placement.gpu:
        limits = serving["containers"][0]["resources"]["limits"]
        assert placement.gpu in limits, f"{placement} requests {placement.gpu}; GPU serving requests {limits}"
        assert dict(placement.node_selector) == serving["nodeSelector"]
        assert set(placement.tolerations) == {(t["key"], t["operator"], t["effect"]) for t in serving["tolerations"]}
    else:
        assert dict(placement.node_selector) == {label: flux.cpu_node_pool} and placement.tolerations == ()
    assert gpu_pool == flux.gpu_node_pool, f"chart GPU pool {gpu_pool!r} != {PROFILE} profile's {flux.gpu_node_pool!r}"
