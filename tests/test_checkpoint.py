"""The checkpoint helper without a training loop: a checkpoint or a kept artifact resumes only the configuration
(key) that saved it. The training stages' resume tests cover the rest (kill, resume, the scratch dropped at the
end)."""

from __future__ import annotations

import torch

from onereward import storage
from onereward.stages import StageContext
from onereward.stages.checkpoint import Checkpoints


def _ctx(tmp_path, key: str) -> StageContext:
    out = storage.ArtifactWriter(str(tmp_path / "out"), key)
    return StageContext("distill", None, {}, {"student": out}, key)


def test_a_checkpoint_resumes_only_the_configuration_that_saved_it(tmp_path, capsys):
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(net.parameters())
    rng = torch.Generator().manual_seed(3)
    ours = Checkpoints(_ctx(tmp_path, "a" * 16), every=5)
    ours.save(5, opt, rng, tensors={"net": net.state_dict()}, progress={"losses": [0.5]})
    ours.keep("teacher", {"states": torch.ones(2)}, {"seconds": 1.0})

    other = Checkpoints(_ctx(tmp_path, "b" * 16), every=5)
    assert other.resume() is None and other.kept("teacher") is None
    said = capsys.readouterr().out
    assert said.count("was left by another configuration (key aaaaaaaaaaaaaaaa, this run's bbbbbbbbbbbbbbbb)") == 2

    again = Checkpoints(_ctx(tmp_path, "a" * 16), every=5)
    ck = again.resume()
    assert ck.step == 5 and ck.progress == {"losses": [0.5]}
    assert torch.equal(ck.tensors("net")["weight"], net.weight.detach())
    tensors, facts = again.kept("teacher")
    assert torch.equal(tensors["states"], torch.ones(2)) and facts == {"seconds": 1.0}
    assert "resuming from checkpoint at step 5" in capsys.readouterr().out


def test_a_checkpoint_of_an_older_version_is_said_so_and_not_resumed_from(tmp_path, capsys):
    """Before checkpoints carried the run's key they were committed with `step-N`: such a one is not resumed from,
    and the message says why in those words."""
    ours = Checkpoints(_ctx(tmp_path, "a" * 16), every=5)
    with storage.writing(ours.uri, key="step-5", meta={"step": 5}) as w:
        w.write_json("progress.json", {})
    assert ours.resume() is None
    assert "was left by an older version of onereward" in capsys.readouterr().out
