"""evaluate: the challenger (the distilled student) against the champion, ground truth first, then both judges;
the gates that decide whether promote may move `champion`.

Inputs: `conditions`, `base_model`, `policy` (the RL teacher), `student`, `reward_model`, `audit_model`; the
registry's current `onereward-generator@champion`, if any (its version is recorded; promote refuses to act if
`champion` moved in between).
Output: `evaluation` — `evaluation.json` (verdict with every reason, metrics, candidate and champion versions),
`report.html` (image grids per task: input | mask | base | RL | student | target, and the metric tables),
`samples/<task>.png`. A failing gate writes nothing and fails the stage (its metrics and report still go to
MLflow), so promote cannot run.
Config: `seed`, `image_size`, `generator`, `labels`, `distill`, `evaluate`, `tracking`.
Metrics: `<model>.heldout.<task>.{bg_psnr,bg_ssim,mse_mask,measure}` for base, teacher, student (also
student_<k> for every distilled step count) and champion; `<model>.<judge>.<task>.{win_rate,win_rate_low,
win_rate_high,good,same,bad}` vs the champion (vs the base when there is none), judge in audit | reward;
`<model>.latency_s` (one image); `student.quality_ratio`, `student.speed_ratio`; `gate.passed`;
`gate.<task>.{mse_mask,measure}.rise` with `.rise_low`, `.rise_high` (the student's relative rise over the incumbent
and its 95 % paired bootstrap interval).

Each model samples the same held-out conditions from the same noise at its own setting: base and teacher with
the teacher's steps and CFG, the student and the champion with their registered step counts and no CFG. Models
that are adapters on one external base (flux: base, teacher, student and a champion trained from the same FLUX)
share one network, each adapter put in place for its own calls, as in rl_finetune: one FLUX in memory, not four.
"""

from __future__ import annotations

import base64
import html
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from onereward import tracking
from onereward.config import GateConfig
from onereward.data.images import to_png
from onereward.models import tensors
from onereward.models.generator import META, MaskedFlowGenerator, load_generator
from onereward.models.judge import Judge
from onereward.stages import GateFailed, StageContext
from onereward.stages.promote import Verdict, current_champion
from onereward.stages.rl_finetune import (
    Conditions,
    WeightsView,
    _criteria,
    _load_judge,
    bootstrap_interval,
    ground_truth_per_image,
    pairwise_p,
    sample_grid,
    sample_rows,
    trainable_state,
    validation_rows,
    wins_of,
)

JUDGES = ("audit", "reward")
GT = ("bg_psnr", "bg_ssim", "mse_mask", "measure")  # higher is better for the first two, lower for the rest


class GatesRefused(GateFailed):
    """The challenger failed evaluate's gates: nothing is written and promote does not run."""


@dataclass
class Contender:
    name: str  # base | teacher | student | student_<k> | champion
    gen: MaskedFlowGenerator | WeightsView
    steps: int
    guidance: float
    version: str | None = None


def sample(c: Contender, cond: Conditions, seed: int) -> torch.Tensor:
    noise = [(seed * 104_729 + i) % 2**31 for i in range(len(cond.rows))]  # the same noise for every model
    return sample_rows(c.gen, cond, c.steps, c.guidance, noise).cpu()  # beside the conditions' ground truth


def ground_truth(out: torch.Tensor, cond: Conditions, task: str
                 ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """rl_finetune's held-out measures, plus SSIM outside the mask; and rl_finetune's per image (`rise_intervals`)."""
    b = cond.batch
    ssim = float(tensors.masked_ssim(out, b["images"], 1 - b["masks"]).mean())
    each = ground_truth_per_image(out, cond, task)
    return {"bg_psnr": float(each["bg_psnr"].mean()), "bg_ssim": ssim, "mse_mask": float(each["mse_mask"].mean()),
            "measure": float(each["measure"].mean())}, each


def judged(judge: Judge, a: torch.Tensor, b: torch.Tensor, cond: Conditions, task: str, criteria: list[str],
           margin: float, bootstrap: int, seed: int) -> dict[str, float]:
    """Win rate of a over b with its 95 % bootstrap interval, and Good/Same/Bad shares (|P - 0.5| < margin is
    Same)."""
    p = pairwise_p(judge, a, b, cond, task, criteria)
    wins = wins_of(p)
    low, high = bootstrap_interval(wins, bootstrap, seed)
    return {"win_rate": float(wins.mean()), "win_rate_low": low, "win_rate_high": high,
            "good": float((p > 0.5 + margin).float().mean()), "same": float(((p - 0.5).abs() <= margin).float().mean()),
            "bad": float((p < 0.5 - margin).float().mean()), "p_mean": float(p.mean())}


def latency(c: Contender, cond: Conditions, n: int, budget_s: float = float("inf")) -> float:
    """Seconds to sample one image: the median of `n` single-image calls, or of those made within `budget_s` (three
    at least). The mean of 8 calls moved the student's speed ratio between 6.7 and 8.3 over identical runs on 2
    cores; the median of three or more is not moved by a slow first call, so none is spent warming up (a 28-step
    teacher's took ~3 s of evaluate's ~60 on tiny)."""
    b = cond.batch
    times: list[float] = []
    for i in range(n):
        if len(times) >= 3 and sum(times) > budget_s:
            break
        j = i % len(cond.rows)
        t0 = time.perf_counter()
        c.gen.sample(b["images"][j : j + 1], b["masks"][j : j + 1], b["prompts"][j : j + 1], steps=c.steps,
                     guidance=c.guidance, seed=i)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def quality_ratio(student: dict[str, dict[str, float]], teacher: dict[str, dict[str, float]],
                  student_wr: list[float], teacher_wr: list[float]) -> dict[str, float]:
    """How much of the teacher's quality the student keeps (1 = all of it), two ways: `ground_truth`, the mean
    over tasks of teacher/student in-mask error and task measure (lower is better), and `audit`, the student's
    audit win rate vs the base over the teacher's, pooled over tasks."""
    gt = float(np.mean([teacher[t][k] / max(student[t][k], 1e-8) for t in student for k in ("mse_mask", "measure")]))
    return {"ground_truth": gt, "audit": float(np.mean(student_wr)) / max(float(np.mean(teacher_wr)), 1e-8)}


def relative_rise(value: float, reference: float) -> float:
    return value / max(reference, 1e-8) - 1


def rise_intervals(challenger: dict[str, torch.Tensor], incumbent: dict[str, torch.Tensor], n: int, seed: int
                   ) -> dict[str, tuple[float, float]]:
    """95 % bootstrap interval of the challenger's relative rise over the incumbent in in-mask error and the task's
    measure, from their per-image values (`ground_truth_per_image`) on the same conditions and noise: the two
    models' images of a condition are resampled together."""
    rows = len(incumbent["measure"])
    idx = np.random.default_rng(seed).integers(0, rows, (n, rows))
    out = {}
    for k in ("mse_mask", "measure"):
        x, y = challenger[k].double().numpy(), incumbent[k].double().numpy()
        rise = x[idx].mean(1) / np.maximum(y[idx].mean(1), 1e-8) - 1
        out[k] = (float(np.quantile(rise, 0.025)), float(np.quantile(rise, 0.975)))
    return out


def gates(g: GateConfig, challenger: dict[str, dict[str, float]], incumbent: dict[str, dict[str, float]],
          incumbent_name: str, audit: dict[str, dict[str, float]], student_quality: float,
          rises: dict[str, dict[str, tuple[float, float]]] | None = None, same_as_incumbent: bool = False) -> Verdict:
    """Every check, passed or not, as a reason; passed only if all hold. `rises`: the bootstrap intervals of the
    relative rises (`rise_intervals`), reported beside them; the check reads the rise itself. `same_as_incumbent`:
    the challenger has the incumbent's weights and sampling settings, which is said first and refused."""
    failed, held = [], []

    def check(ok: bool, text: str) -> None:
        (held if ok else failed).append(("ok: " if ok else "FAILED: ") + text)

    if same_as_incumbent:
        check(False, f"the student is the {incumbent_name}: the same weights and sampling settings, nothing new "
                     "to promote")

    if incumbent_name == "champion" or g.win_rate_vs_base:
        for t, a in audit.items():
            check(a["win_rate_low"] > g.min_audit_win_rate_low,
                  f"{t}: audit win rate vs {incumbent_name} {a['win_rate']:.2f}, lower bound {a['win_rate_low']:.2f} "
                  f"{'>' if a['win_rate_low'] > g.min_audit_win_rate_low else '<='} {g.min_audit_win_rate_low}")
    else:
        held.append("ok: no champion yet: the audit win-rate gate is not asked against the base "
                    "(evaluate.gates.win_rate_vs_base=false); rates: "
                    + ", ".join(f"{t} {a['win_rate']:.2f}" for t, a in audit.items()))
    for t, m in challenger.items():
        ref = incumbent[t]
        drop = ref["bg_psnr"] - m["bg_psnr"]
        check(drop <= g.max_bg_psnr_drop, f"{t}: background PSNR {m['bg_psnr']:.2f} dB vs {incumbent_name} "
              f"{ref['bg_psnr']:.2f} (drop {drop:.2f}, tolerance {g.max_bg_psnr_drop})")
        tolerances = (("mse_mask", g.max_mask_error_rise),
                      ("measure", g.max_measure_rise_by_task.get(t, g.max_measure_rise)))
        for k, tol in tolerances:
            rise = relative_rise(m[k], ref[k])
            interval = rises.get(t, {}).get(k) if rises else None
            within = f", 95 % interval {interval[0]:+.1%} to {interval[1]:+.1%}" if interval else ""
            check(rise <= tol, f"{t}: {k} {m[k]:.4f} vs {incumbent_name} {ref[k]:.4f} ({rise:+.1%}{within}; "
                  f"tolerance +{tol:.0%})")
    check(student_quality >= g.min_student_quality,
          f"student keeps {student_quality:.3f} of the teacher's quality by {' and '.join(g.student_quality_from)} "
          f"(minimum {g.min_student_quality})")
    return Verdict(not failed, failed + held)


# ---------------------------------------------------------------------------------------------- report
def _img(arr: np.ndarray) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(to_png(arr)).decode()}">'


def report_html(title: str, verdict: Verdict, metrics: dict[str, float], models: list[str],
                grids: dict[str, np.ndarray]) -> str:
    def v(key: str, fmt: str) -> str:
        return format(metrics[key], fmt) if key in metrics else "—"

    def judge_cell(m: str, j: str, t: str) -> str:
        k = f"{m}.{j}.{t}"
        return (f"<td>{v(k + '.win_rate', '.2f')} [{v(k + '.win_rate_low', '.2f')}, {v(k + '.win_rate_high', '.2f')}]"
                f" G/S/B {v(k + '.good', '.2f')}/{v(k + '.same', '.2f')}/{v(k + '.bad', '.2f')}</td>")

    rows = []
    for t in grids:
        head = "".join(f"<th>{k}</th>" for k in GT)
        body = "".join(f"<tr><td>{m}</td>" + "".join(f"<td>{v(f'{m}.heldout.{t}.{k}', '.4f')}</td>" for k in GT)
                       + "".join(judge_cell(m, j, t) for j in JUDGES) + "</tr>" for m in models)
        rows.append(f"<h2>{t}</h2><p>input | mask | base | RL | student | target</p>{_img(grids[t])}"
                    f"<table><tr><th>model</th>{head}<th>audit win rate [95 %]</th><th>reward win rate [95 %]</th>"
                    f"</tr>{body}</table>")
    speed = "".join(f"<tr><td>{k}</td><td>{v:.4g}</td></tr>" for k, v in sorted(metrics.items())
                    if k.endswith(("latency_s", "_ratio")))
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in verdict.reasons)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
            "img{image-rendering:pixelated}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><h2>verdict: {'PASSED' if verdict.passed else 'REFUSED'}</h2>"
            f"<ul>{reasons}</ul><h2>speed</h2><table>{speed}</table>{''.join(rows)}</body></html>")


# ---------------------------------------------------------------------------------------------- the stage
def load_sharing(folders: dict[str, Path]) -> dict[str, MaskedFlowGenerator | WeightsView]:
    """The generator saved in each folder. Those that are adapters on one external base (`base_uri`, with the same
    rank, size and dtype) share one network: each is a view with its adapter's weights, and a folder that is the
    base's pointer (no adapter) gets the adapter as loaded fresh, which is the base (B = 0)."""
    from onereward.models.flux import FluxFillGenerator

    nets: dict[tuple, tuple[FluxFillGenerator, dict[str, torch.Tensor]]] = {}
    out: dict[str, MaskedFlowGenerator | WeightsView] = {}
    for name, folder in folders.items():
        meta = json.loads((folder / META).read_text())
        if not (meta.get("base_uri") and meta.get("lora_rank")):
            out[name] = load_generator(folder)
            continue
        key = FluxFillGenerator.base_of(folder, meta)
        if key not in nets:
            gen = FluxFillGenerator.from_pretrained(*key)
            nets[key] = (gen, trainable_state(gen))
        gen, fresh = nets[key]
        out[name] = WeightsView(gen, trainable_state(gen) if gen.load_adapter_of(folder, meta) else fresh)
    return out


def load_champion(name: str, home: Path) -> tuple[str, Path, int, float] | None:
    """The registry's champion: (version, its generator's folder under `home`, sample steps, guidance) from its
    tags, or None."""
    import mlflow

    client = mlflow.MlflowClient()
    version = current_champion(client, name)
    if version is None:
        return None
    tags = client.get_model_version(name, version).tags
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}",
                                                     dst_path=str(home / f"champion-{version}")))
    folder = next(p.parent for p in local.rglob(META))
    return version, folder, int(tags.get("sample_steps", 4)), float(tags.get("guidance", 1.0))


def evaluate(ctx: StageContext) -> dict[str, float]:
    import tempfile

    s = ctx.settings
    ev, dc = s.evaluate, s.distill
    criteria = _criteria(s)
    sets = {t: Conditions.of(r) for t, r in validation_rows(ctx.inputs["conditions"], ev.conditions).items() if r}
    student_reg = ctx.inputs["student"].read_json("registry.json")
    name = student_reg["name"]
    folders = {m: ctx.inputs[art].local_dir() / "model"
               for m, art in (("base", "base_model"), ("teacher", "policy"), ("student", "student"))}
    with tempfile.TemporaryDirectory() as tmp:
        champ = load_champion(name, Path(tmp))
        gens = load_sharing(folders | ({"champion": champ[1]} if champ else {}))
    student_gen = gens["student"]
    judges = {j: _load_judge(ctx.inputs[art], student_gen.device)
              for j, art in (("audit", "audit_model"), ("reward", "reward_model"))}
    contenders = [Contender("base", gens["base"], dc.teacher_steps, dc.teacher_guidance),
                  Contender("teacher", gens["teacher"], dc.teacher_steps, dc.teacher_guidance,
                            str(ctx.inputs["policy"].read_json("registry.json")["version"])),
                  Contender("student", student_gen, dc.steps, 1.0, str(student_reg["version"]))]
    contenders += [Contender(f"student_{k}", student_gen, k, 1.0) for k in dc.report_steps if k != dc.steps]
    if champ is not None:
        contenders.append(Contender("champion", gens["champion"], champ[2], champ[3], champ[0]))
    incumbent = "champion" if champ is not None else "base"
    print(f"evaluate: student version {student_reg['version']} vs {incumbent}"
          + (f" version {champ[0]}" if champ else "") + f" on {sum(len(c.rows) for c in sets.values())} held-out "
          f"conditions", flush=True)

    metrics: dict[str, float] = {}
    gt: dict[str, dict[str, dict[str, float]]] = {c.name: {} for c in contenders}
    each: dict[str, dict[str, dict[str, torch.Tensor]]] = {c.name: {} for c in contenders}  # per image
    outs: dict[str, dict[str, torch.Tensor]] = {c.name: {} for c in contenders}
    digests = {id(c.gen): c.gen.weights_digest() for c in contenders}  # the student serves three contenders
    sampled: dict[tuple[str, int, float], str] = {}  # (weights, steps, guidance) -> who sampled them first
    sampled_by: dict[str, str] = {}  # contender -> whose samples it has (its own name, or one it equals)
    for c in contenders:
        t0 = time.perf_counter()
        same = sampled_by[c.name] = sampled.setdefault((digests[id(c.gen)], c.steps, c.guidance), c.name)
        for t, cond in sets.items():
            outs[c.name][t] = outs[same][t] if same != c.name else sample(c, cond, s.seed)
            gt[c.name][t], each[c.name][t] = ground_truth(outs[c.name][t], cond, t)
            metrics |= {f"{c.name}.heldout.{t}.{k}": v for k, v in gt[c.name][t].items()}
        how = f"the same weights and settings as {same}: its samples" if same != c.name else "sampled"
        print(f"evaluate: {c.name} ({c.steps} steps, CFG {c.guidance}) {how} in {time.perf_counter() - t0:.1f} s: "
              + ", ".join(f"{t} bg {m['bg_psnr']:.2f} dB, mask {m['mse_mask']:.4f}, measure {m['measure']:.4f}"
                          for t, m in gt[c.name].items()), flush=True)
    vs_base: dict[str, dict[str, list[float]]] = {}
    for c in contenders:
        if c.name == incumbent:
            continue
        for j, judge in judges.items():
            for t, cond in sets.items():
                r = judged(judge, outs[c.name][t], outs[incumbent][t], cond, t, criteria[t], ev.same_margin,
                           ev.bootstrap, s.seed)
                metrics |= {f"{c.name}.{j}.{t}.{k}": v for k, v in r.items()}
                if incumbent == "base" and j == "audit":
                    vs_base.setdefault(c.name, {})[t] = r["win_rate"]
    if incumbent == "champion":  # the quality ratio compares student and teacher against the same base
        for c in contenders:
            if c.name.startswith(("student", "teacher")):
                vs_base[c.name] = {t: judged(judges["audit"], outs[c.name][t], outs["base"][t], cond, t, criteria[t],
                                             ev.same_margin, ev.bootstrap, s.seed)["win_rate"]
                                   for t, cond in sets.items()}
                metrics |= {f"{c.name}.audit_vs_base.{t}.win_rate": v for t, v in vs_base[c.name].items()}
    for c in contenders:
        if c.name.startswith("student"):
            parts = quality_ratio(gt[c.name], gt["teacher"], list(vs_base[c.name].values()),
                                  list(vs_base["teacher"].values()))
            metrics |= {f"{c.name}.quality_ratio.{k}": v for k, v in parts.items()}
            metrics[f"{c.name}.quality_ratio"] = min(parts[k] for k in ev.gates.student_quality_from)

    anyset = next(iter(sets.values()))
    for c in contenders:
        if c.name in ("teacher", "student") or c.name.startswith("student_"):
            metrics[f"{c.name}.latency_s"] = latency(c, anyset, ev.latency_images, ev.latency_budget_s)
    metrics["student.speed_ratio"] = metrics["teacher.latency_s"] / metrics["student.latency_s"]
    for c in contenders:
        if c.name.startswith("student_"):
            metrics[f"{c.name}.speed_ratio"] = metrics["teacher.latency_s"] / metrics[f"{c.name}.latency_s"]

    audit = {t: {k: metrics[f"student.audit.{t}.{k}"] for k in ("win_rate", "win_rate_low")} for t in sets}
    rises = {t: rise_intervals(each["student"][t], each[incumbent][t], ev.bootstrap, s.seed) for t in sets}
    for t, by in rises.items():
        for k, (low, high) in by.items():
            metrics |= {f"gate.{t}.{k}.rise": relative_rise(gt["student"][t][k], gt[incumbent][t][k]),
                        f"gate.{t}.{k}.rise_low": low, f"gate.{t}.{k}.rise_high": high}
    verdict = gates(ev.gates, gt["student"], gt[incumbent], incumbent, audit, metrics["student.quality_ratio"],
                    rises, same_as_incumbent=sampled_by[incumbent] == "student")
    metrics["gate.passed"] = float(verdict.passed)
    grids = {}
    for t, cond in sets.items():
        grids[t] = sample_grid(cond, [outs[m][t] for m in ("base", "teacher", "student")], ev.grid_rows)
    order = [c.name for c in contenders]
    page = report_html(f"onereward evaluation: {name} version {student_reg['version']} vs {incumbent}", verdict,
                       metrics, order, grids)
    result = {"passed": verdict.passed, "reasons": verdict.reasons, "candidate": {"name": name,
              "version": str(student_reg["version"])}, "champion": champ[0] if champ else None,
              "incumbent": incumbent, "metrics": metrics}
    tracking.log_dict(result, "evaluation.json")
    tracking.log_text(page, "report.html")
    print("evaluate: gates " + ("PASSED" if verdict.passed else "REFUSED") + "\n  " + "\n  ".join(verdict.reasons),
          flush=True)
    if not verdict.passed:
        raise GatesRefused("evaluate: the challenger failed the gates; nothing promoted:\n  "
                           + "\n  ".join(r for r in verdict.reasons if r.startswith("FAILED")), metrics)
    out = ctx.outputs["evaluation"]
    out.write_json("evaluation.json", result)
    out.write_bytes("report.html", page.encode())
    for t, arr in grids.items():
        out.write_bytes(f"samples/{t}.png", to_png(arr))
    print("evaluate: report.html written with the evaluation artifact (promote prints its path)", flush=True)
    return metrics

