"""KFP v2 pipelines built from the graph: container components (clusters) and lightweight Python
components (kfp.local). Both call the same stage function with the same artifact names."""


import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from onereward.config import Settings
from onereward.orchestration import contract
from onereward.pipeline import GRAPH, Graph, Stage

KFP_TYPES = {"Dataset": "Dataset", "Model": "Model", "Metrics": "Metrics", "HTML": "HTML"}


def component_spec(stage: Stage, graph: Graph, image: str) -> dict[str, Any]:
    """A KFP component spec (YAML form) whose container runs `onereward stage NAME`."""
    args: list[Any] = ["stage", stage.name, "--config", {"inputValue": "config"},
                       "--set-json", {"inputValue": "overrides"}]
    for name in stage.inputs:
        args += ["--in", name, {"inputUri": name}]
    for out in stage.outputs:
        args += ["--out", out.name, {"outputUri": out.name}]
    return {
        "name": stage.name,
        "description": stage.description,
        "inputs": [{"name": "config", "type": "String"}, {"name": "overrides", "type": "String"},
                   *({"name": n, "type": KFP_TYPES[graph.output_kind(n)]} for n in stage.inputs)],
        "outputs": [{"name": o.name, "type": KFP_TYPES[o.kind]} for o in stage.outputs],
        "implementation": {"container": {"image": image, "command": contract.entrypoint(stage), "args": args}},
    }


def _python_component_source(stage: Stage, graph: Graph) -> str:
    ins = "".join(f", {n}: Input[{KFP_TYPES[graph.output_kind(n)]}]" for n in stage.inputs)
    outs = "".join(f", {o.name}: Output[{KFP_TYPES[o.kind]}]" for o in stage.outputs)
    in_map = ", ".join(f"{n!r}: {n}.uri" for n in stage.inputs)
    out_map = ", ".join(f"{o.name!r}: {o.name}.uri" for o in stage.outputs)
    return (
        f"def {stage.name}(config: str, overrides: str{ins}{outs}):\n"
        f"    from onereward.orchestration.entry import run_stage\n"
        f"    run_stage({stage.name!r}, config, overrides, {{{in_map}}}, {{{out_map}}})\n"
    )


def python_components(graph: Graph) -> dict[str, Any]:
    """Lightweight components for kfp.local: KFP ships a function's source to the runner, so each one is
    written to a generated module (from the graph) and imported from there."""
    from kfp import dsl

    header = "from kfp.dsl import Input, Output, Dataset, Model, Metrics, HTML\n\n\n"
    src = header + "\n\n".join(_python_component_source(s, graph) for s in graph)
    path = Path(tempfile.mkdtemp(prefix="onereward-kfp-")) / "onereward_kfp_components.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    # they run in this environment, which has kfp: without install_kfp_package=False each task would first
    # `pip install kfp` (2.8 s a task here)
    return {s.name: dsl.component(getattr(module, s.name), install_kfp_package=False) for s in graph}


def build_pipeline(graph: Graph = GRAPH, settings: Settings | None = None, *, image: str = "",
                   gpu_image: str = "", local: bool = False, name: str = "onereward"):
    """The pipeline function: one task per stage, artifacts wired by name, GPU settings on GPU stages."""
    from kfp import components, dsl
    from kfp import kubernetes as k8s

    res = settings.resources if settings else Settings().resources
    graph = graph.with_resources(res.gpus, res.timeouts, res.cpu_processes)
    if local:
        comps = python_components(graph)
    else:
        comps = {s.name: components.load_component_from_text(yaml.safe_dump(
            component_spec(s, graph, gpu_image if s.resources.gpu else image))) for s in graph}

    @dsl.pipeline(name=name, description="OneReward: unified mask-guided generation, one VLM reward")
    def pipeline(config: str = "configs/flux.yaml", overrides: str = "[]"):
        produced: dict[str, Any] = {}
        for s in graph:
            task = comps[s.name](config=config, overrides=overrides, **{n: produced[n] for n in s.inputs})
            task.set_display_name(s.name)
            for o in s.outputs:
                produced[o.name] = task.outputs[o.name] if len(s.outputs) > 1 else task.output
            if local:
                continue
            r = s.retry
            task.set_retry(num_retries=r.retries, backoff_duration=f"{r.backoff_seconds}s",
                           backoff_factor=r.backoff_factor, backoff_max_duration=f"{r.max_backoff_seconds}s")
            # KFP's cache keys on the component's inputs only, so it would miss what a stage's external
            # fingerprint catches (new images under an unchanged manifest URI): such stages always run
            task.set_caching_options(enable_caching=s.fingerprint is None)
            task.set_cpu_request(s.resources.cpu).set_memory_request(s.resources.memory)
            task.set_memory_limit(s.resources.memory)
            if s.resources.timeout_s:
                k8s.set_timeout(task, s.resources.timeout_s)
            k8s.use_secret_as_env(task, contract.S3_SECRET, {k: k for k in contract.S3_SECRET_KEYS})
            k8s.use_secret_as_env(task, contract.MLFLOW_CLIENT_SECRET,
                                  {k: k for k in contract.MLFLOW_CLIENT_SECRET_KEYS}, optional=True)
            k8s.use_config_map_as_env(task, contract.PIPELINE_CONFIGMAP,
                                      {k: k for k in contract.PIPELINE_CONFIGMAP_KEYS})
            k8s.use_config_map_as_env(task, contract.PIPELINE_CONFIGMAP,
                                      {k: k for k in contract.PIPELINE_CONFIGMAP_OPTIONAL_KEYS}, optional=True)
            gpu = bool(s.resources.gpu)
            for label, pool in contract.node_selector(res, gpu).items():
                k8s.add_node_selector(task, label, pool)
            if gpu:
                task.set_accelerator_type(res.gpu_type).set_accelerator_limit(s.resources.gpu)
                k8s.add_toleration(task, **contract.gpu_toleration(res))
                k8s.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                    size_limit=s.resources.shm)

    return pipeline


def compile_pipeline(output: str, settings: Settings, image: str, gpu_image: str,
                     graph: Graph = GRAPH) -> dict[str, Any]:
    from kfp import compiler

    pipeline = build_pipeline(graph, settings, image=image, gpu_image=gpu_image)
    compiler.Compiler().compile(pipeline, output)
    return yaml.safe_load_all(Path(output).read_text()).__next__()


def run_local(settings_overrides: list[str], config: str, pipeline_root: str, graph: Graph = GRAPH):
    """Run the graph under kfp.local (SubprocessRunner, this Python environment)."""
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root,
               raise_on_error=True)
    pipeline = build_pipeline(graph, local=True)
    return pipeline(config=config, overrides=json.dumps(settings_overrides))
