"""Label Studio interchange for preference labels: the import file a team labels by hand
(`onereward labels export`) and the validation of the JSON export it gives back.

One Label Studio task per (condition, criterion, unordered candidate pair). `data` holds `image1`, `image2`
and `input` (the masked input) as PNG data: URIs, or as the addresses of PNG objects written beside
(`--images-uri`: a flux export inline would be terabytes), and `prompt`, `task`, `criterion`, `condition_id`,
`candidate1`, `candidate2`, `pair_id`. A labelling config that fits it:

    <View>
      <Header value="$task / $criterion: $prompt"/>
      <Image name="input" value="$input"/>
      <Image name="image1" value="$image1"/>
      <Image name="image2" value="$image2"/>
      <Choices name="better" toName="image1" choice="single" required="true">
        <Choice value="image1"/><Choice value="image2"/>
      </Choices>
    </View>

`<Pairwise name="better" toName="image1,image2"/>` works too (its result is `selected: left | right`).
"""

from __future__ import annotations

import base64
import hashlib
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from onereward.data.images import from_png, to_png

if TYPE_CHECKING:
    from onereward.config import Settings

CHOICE_INDEX = {"image1": 0, "left": 0, "image2": 1, "right": 1}


def export_fingerprint(s: Settings) -> str | None:
    """The bytes of the Label Studio export that `labels.kind: import` reads, hashed into label_preferences' key:
    new labels at an unchanged URI are new data. Here, not beside the stage, so that computing the key of a
    cached run imports no torch."""
    from onereward import storage

    uri = s.labels.import_uri
    if s.labels.kind != "import" or not uri:
        return None
    return hashlib.sha256(storage.read_bytes(uri) if storage.exists(uri) else b"").hexdigest()[:16]


def pair_id(condition_id: str, criterion: str, a: str, b: str) -> str:
    """The same id for both orders of a pair, so a pair labelled twice is seen as one."""
    lo, hi = sorted((a, b))
    return hashlib.sha1(f"{condition_id}|{criterion}|{lo}|{hi}".encode()).hexdigest()[:16]


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def masked_input_png(image: bytes, mask: bytes) -> bytes:
    """The condition as the generator sees it: the region to generate is mid-grey."""
    img = from_png(image).copy()
    img[from_png(mask, "L") > 127] = 128
    return to_png(img)


def inline(image_id: str, png: bytes) -> str:
    """A task's image as a data: URI inside the import file."""
    return data_uri(png)


def condition_tasks(cond: dict, cands: list[dict], criteria: Mapping[str, list[str]], seed: int = 0,
                    ref: Callable[[str, bytes], str] = inline) -> list[dict]:
    """The Label Studio import tasks of one condition: every pair of its candidates (sorted by id) for every
    criterion of its task. `ref(image id, PNG)` gives the value a task shows an image by: a data: URI (`inline`),
    or the address of an object it wrote (`onereward labels export --images-uri`); it is asked once an image."""
    if len(cands) < 2:
        return []
    shown = ref(f"{cond['condition_id']}-input", masked_input_png(cond["image"], cond["mask"]))
    shown_as = {c["candidate_id"]: ref(c["candidate_id"], c["image"]) for c in cands}
    tasks = []
    for criterion in criteria.get(cond["task"], []):
        for i, a in enumerate(cands):
            for b in cands[i + 1 :]:
                pid = pair_id(cond["condition_id"], criterion, a["candidate_id"], b["candidate_id"])
                # a fixed left/right order would teach annotators (and the judge) a position habit
                swap = int(hashlib.sha1(f"{seed}:{pid}".encode()).hexdigest(), 16) % 2
                first, second = (b, a) if swap else (a, b)
                tasks.append({"data": {
                    "image1": shown_as[first["candidate_id"]], "image2": shown_as[second["candidate_id"]],
                    "input": shown, "prompt": cond["prompt"], "task": cond["task"], "criterion": criterion,
                    "condition_id": cond["condition_id"], "candidate1": first["candidate_id"],
                    "candidate2": second["candidate_id"], "pair_id": pid}})
    return tasks



@dataclass(frozen=True)
class Judgement:
    """One imported label that passed every check."""

    entry: str
    pair_id: str
    condition_id: str
    criterion: str
    winner_id: str
    loser_id: str
    confidence: float  # the share of the entry's annotations that chose the winner


@dataclass(frozen=True)
class Rejected:
    entry: str
    pair_id: str
    reason: str
    detail: str


class _Reject(Exception):
    def __init__(self, reason: str, detail: str, pid: str = ""):
        super().__init__(detail)
        self.reason, self.detail, self.pid = reason, detail, pid


def _field(data: dict, name: str) -> str:
    if name not in data or data[name] in (None, ""):
        raise _Reject("missing_field", f"data.{name} is missing")
    if not isinstance(data[name], str):
        raise _Reject("wrong_type", f"data.{name} is {type(data[name]).__name__}, expected a string")
    return data[name]


def _vote(annotation: Any) -> int | None:
    """Index (0 = image1, 1 = image2) an annotation chose; None when it chose nothing."""
    if not isinstance(annotation, dict):
        raise _Reject("wrong_type", f"an annotation is {type(annotation).__name__}, expected an object")
    if annotation.get("was_cancelled"):
        return None
    result = annotation.get("result") or []
    if not isinstance(result, list):
        raise _Reject("wrong_type", "annotation result is not a list")
    for item in result:
        value = item.get("value") if isinstance(item, dict) else None
        if not isinstance(value, dict):
            continue
        if item.get("type") == "choices" and value.get("choices"):
            picked = value["choices"]
            if not isinstance(picked, list) or len(picked) != 1:
                raise _Reject("unknown_choice", f"choices {picked!r}: expected exactly one of image1, image2")
            picked = picked[0]
        elif item.get("type") == "pairwise" and value.get("selected"):
            picked = value["selected"]
        else:
            continue
        if picked not in CHOICE_INDEX:
            raise _Reject("unknown_choice", f"choice {picked!r} is none of {sorted(CHOICE_INDEX)}")
        return CHOICE_INDEX[picked]
    return None


def _judge(entry: str, task: Any, known: Mapping[str, tuple[str, set[str]]],
           criteria: Mapping[str, list[str]]) -> Judgement:
    if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
        raise _Reject("wrong_type", "entry is not a task object with a data object")
    data = task["data"]
    cond = _field(data, "condition_id")
    criterion = _field(data, "criterion")
    first, second = _field(data, "candidate1"), _field(data, "candidate2")
    pid = pair_id(cond, criterion, first, second)
    if cond not in known:
        raise _Reject("unknown_condition", f"condition {cond!r} is not in the conditions artifact", pid)
    task_name, cands = known[cond]
    if criterion not in criteria.get(task_name, []):
        raise _Reject("unknown_criterion", f"criterion {criterion!r} is not one of task {task_name!r}: "
                                           f"{list(criteria.get(task_name, []))}", pid)
    for c in (first, second):
        if c not in cands:
            raise _Reject("unknown_candidate", f"candidate {c!r} is not a candidate of condition {cond!r}", pid)
    if first == second:
        raise _Reject("self_pair", f"candidate {first!r} is compared with itself", pid)
    annotations = task.get("annotations", task.get("completions", []))
    if not isinstance(annotations, list):
        raise _Reject("wrong_type", "annotations is not a list", pid)
    try:
        votes = [v for v in (_vote(a) for a in annotations) if v is not None]
    except _Reject as r:
        raise _Reject(r.reason, r.detail, pid) from None
    if not votes:
        raise _Reject("missing_choice", "no annotation chose image1 or image2", pid)
    (top, n), *rest = Counter(votes).most_common()
    if rest and rest[0][1] == n:
        raise _Reject("tied_choices", f"{n} annotations chose each image", pid)
    winner, loser = (first, second) if top == 0 else (second, first)
    return Judgement(entry, pid, cond, criterion, winner, loser, n / len(votes))


def parse_export(export: Any, known: Mapping[str, tuple[str, set[str]]],
                 criteria: Mapping[str, list[str]]) -> tuple[list[Judgement], list[Rejected]]:
    """Validate a Label Studio JSON export (a list of tasks). `known` maps each condition id to its task and
    candidate ids. Every entry ends up either judged or rejected with its id and the reason."""
    if not isinstance(export, list):
        raise ValueError(f"a Label Studio JSON export is a list of tasks, got {type(export).__name__}")
    kept: list[Judgement] = []
    rejected: list[Rejected] = []
    seen: dict[str, str] = {}  # pair id -> the entry that labelled it
    for i, task in enumerate(export):
        tid = task.get("id") if isinstance(task, dict) else None
        entry = str(tid) if tid is not None else f"#{i}"
        try:
            j = _judge(entry, task, known, criteria)
            if j.pair_id in seen:
                raise _Reject("duplicate_pair", f"the same pair and criterion as entry {seen[j.pair_id]}", j.pair_id)
        except _Reject as r:
            rejected.append(Rejected(entry, r.pid, r.reason, r.detail))
            continue
        seen[j.pair_id] = entry
        kept.append(j)
    return kept, rejected
