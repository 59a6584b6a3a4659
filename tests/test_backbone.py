"""A study's shared backbone: its binding checks leave training as a plain loop would, it stops
once binding formed, every memory starts from its weights, and the report names it."""

import dataclasses
from pathlib import Path

import pytest
import torch

from moshi_ttt import pipeline
from moshi_ttt.checkpoint import init_from, load_checkpoint, save_checkpoint
from moshi_ttt.config import MemoryConfig, ModelConfig, memory_variant
from moshi_ttt.models.lm import StreamingLM
from moshi_ttt.pipeline import Backbone, EvalConfig, StudyPreset, train_backbone
from moshi_ttt.trainer import Trainer
from moshi_ttt.training import TRAIN_PRESETS

TINY = dataclasses.replace(
    TRAIN_PRESETS["recall-backbone"], steps=6, batch_size=4, warmup=2, bf16=False
)


def preset(min_binding: float, memories=("window",)) -> StudyPreset:
    mem = dataclasses.replace(
        TRAIN_PRESETS["recall-memory"],
        steps=2,
        batch_size=2,
        warmup=1,
        bf16=False,
        seq_schedule=(),
        near_steps=2,
    )
    ec = EvalConfig(
        perplexity=False,
        tasks=(),
        cross_session=(),
        diagnostics=False,
        num=1,
        binding_keys=(4,),
        binding_distances=(0.5, 2),
        binding_num=4,
        cost_lengths=(64,),
    )
    return StudyPreset(
        model="recall",
        memories=memories,
        window=32,
        block=16,
        ttt_chunk=32,
        corpus=False,
        train=mem,
        eval=ec,
        backbone=Backbone(TINY, check_every=2, min_binding=min_binding, num=8),
    )


def test_checks_leave_training_as_a_plain_loop(tmp_path):
    path = train_backbone(preset(1.0), tmp_path, "cpu", progress=False)  # never reaches 1.0
    model, meta = load_checkpoint(path)
    assert meta["steps"] == 6 and not meta["formed"]
    assert [c["step"] for c in meta["checks"]] == [2, 4, 6]
    torch.manual_seed(TINY.seed)
    ref = StreamingLM(memory_variant(ModelConfig.preset("recall"), "window", 32, 32, 16)[1])
    trainer = Trainer(ref, TINY, None, progress=False)
    for _ in range(6):
        trainer.train_step()
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_training_stops_once_binding_formed(tmp_path):
    meta = load_checkpoint(train_backbone(preset(0.0), tmp_path, "cpu", progress=False))[1]
    assert meta["formed"] and meta["steps"] == 2 and len(meta["checks"]) == 1


def test_a_memory_starts_from_the_backbone_and_keeps_its_own_parameters(tmp_path):
    torch.manual_seed(1)
    window = StreamingLM(memory_variant(ModelConfig.preset("recall"), "window", 32, 32, 16)[1])
    save_checkpoint(tmp_path / "b.pt", window)
    cfg = memory_variant(ModelConfig.preset("recall"), "ttt_cache", 32, 32, 16)[1]
    torch.manual_seed(2)
    fresh = StreamingLM(cfg)
    torch.manual_seed(2)
    model = StreamingLM(cfg)
    new = init_from(model, tmp_path / "b.pt")
    assert new and all(".memory." in k for k in new)
    shared = window.state_dict()
    for k, v in model.state_dict().items():
        expected = shared[k] if k in shared else fresh.state_dict()[k]
        torch.testing.assert_close(v, expected, rtol=0, atol=0)


def test_study_trains_every_memory_from_one_backbone(tmp_path, monkeypatch):
    monkeypatch.setitem(pipeline.STUDY_PRESETS, "bb-test", preset(0.0, ("window", "ttt_cache")))
    metrics = pipeline.run_study("bb-test", None, tmp_path, "cpu")
    backbone = tmp_path / "backbone" / "model.pt"
    for m in metrics["models"].values():
        assert m["init"]["checkpoint"] == str(backbone) and m["init"]["formed"]
        assert m["train"]["steps"] == 2
    report = (tmp_path / "report.md").read_text()
    assert "Every model starts from one backbone, trained 2 steps" in report


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"check_every": 0}, "check_every"),
        ({"min_binding": 1.5}, "min_binding"),
        ({"distance": -1}, "distance"),
    ],
)
def test_backbone_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        Backbone(TINY, **bad)


def test_a_second_run_reuses_the_first_runs_backbone(tmp_path, monkeypatch):
    monkeypatch.setitem(pipeline.STUDY_PRESETS, "bb-test", preset(0.0, ("window",)))
    backbone = train_backbone(preset(0.0), tmp_path / "first", "cpu", progress=False)
    metrics = pipeline.run_study("bb-test", None, tmp_path / "second", "cpu", backbone=backbone)
    assert not (tmp_path / "second" / "backbone").exists()
    assert metrics["models"]["window-32"]["init"]["checkpoint"] == str(backbone)
    with pytest.raises(ValueError, match="no such checkpoint"):
        pipeline.run_study(
            "bb-test", None, tmp_path / "third", "cpu", backbone=tmp_path / "nope.pt"
        )
    plain = dataclasses.replace(preset(0.0), backbone=None)
    monkeypatch.setitem(pipeline.STUDY_PRESETS, "plain", plain)
    with pytest.raises(ValueError, match="has no backbone"):
        pipeline.run_study("plain", None, tmp_path / "fourth", "cpu", backbone=backbone)


def test_gated_memories_from_a_backbone_start_at_its_gate():
    sp = preset(0.0, ("window", "ttt_cache", "pooled"))
    sp = dataclasses.replace(sp, backbone=dataclasses.replace(sp.backbone, gate_init=2.0))
    gates = {
        name: cfg.memory.gate_init for name, cfg, *_ in pipeline.study_jobs(sp, None, Path("s"))
    }
    default = MemoryConfig().gate_init  # a window has no gate: it keeps the default
    assert gates == {"window-32": default, "ttt_cache-32": 2.0, "pooled-32": 2.0}
    scratch = dataclasses.replace(sp, backbone=None)
    assert {
        cfg.memory.gate_init for _, cfg, *_ in pipeline.study_jobs(scratch, None, Path("s"))
    } == {default}


def test_the_recall_study_holds_a_ttt_cache_at_infinis_state_bytes():
    """The frontier compares memories at equal state: one TTT cache of the recall preset fits in
    infini's bytes (within 1%), measured on streamed states."""
    from moshi_ttt.diagnostics import state_bytes_curve

    sp = pipeline.STUDY_PRESETS["recall"]
    cfgs = {name: cfg for name, cfg, *_ in pipeline.study_jobs(sp, None, Path("s"))}
    nbytes = {
        n: state_bytes_curve(StreamingLM(c), [256])[0]["state_bytes"]
        for n, c in cfgs.items()
        if c.memory.kind in ("infini", "ttt_cache")
    }
    infini = nbytes.pop("infini-32")
    assert min(abs(b - infini) for b in nbytes.values()) <= 0.01 * infini


def test_the_corpus_mixed_recall_study_trains_on_both_and_reports_perplexity(
    tmp_path, monkeypatch, corpus
):
    """recall-corpus: the recall preset's memories from one backbone, half of every batch corpus
    rows; its report holds the perplexity of every model beside binding, and it needs a corpus."""
    sp = pipeline.STUDY_PRESETS["recall-corpus"]
    base = pipeline.STUDY_PRESETS["recall"]
    assert sp.train == dataclasses.replace(base.train, task_frac=0.5, answer_weight=24.0)
    tiny = preset(0.0, ("window", "ttt_cache"))
    ec = dataclasses.replace(tiny.eval, perplexity=True, max_len=300, docs=2, buckets=(100, 300))
    mix = dataclasses.replace(
        tiny,
        corpus=True,
        eval=ec,
        train=dataclasses.replace(tiny.train, task_frac=0.5, batch_size=4),
    )
    monkeypatch.setitem(pipeline.STUDY_PRESETS, "mix-test", mix)
    with pytest.raises(ValueError, match="trains on corpus text"):
        pipeline.run_study("mix-test", None, tmp_path / "none", "cpu")
    metrics = pipeline.run_study("mix-test", corpus, tmp_path / "mix", "cpu")
    for name, m in metrics["models"].items():
        assert [b["hi"] for b in m["loss_by_position"]] == [100, 300], name
        assert m["binding"]["one"]["4"] and m["train"]["task_frac"] == 0.5
    report = (tmp_path / "mix" / "report.md").read_text()
    assert "| window-32 | " in report.split("## Perplexity by position")[1]


def test_scaling_steps_keeps_every_stage_in_proportion():
    from moshi_ttt.training import Stage

    tcfg = dataclasses.replace(
        TINY, stages=(Stage("memory", 300, ("*.memory.*",)), Stage("all", 900))
    )
    scaled = pipeline.scale_steps(tcfg, 40)
    assert [(s.name, s.steps, s.train) for s in scaled.stages] == [
        ("memory", 10, ("*.memory.*",)),
        ("all", 30, ("*",)),
    ]
    assert scaled.total_steps() == 40
    odd = pipeline.scale_steps(tcfg, 7)  # rounding: the last stage takes the rest
    assert [s.steps for s in odd.stages] == [2, 5] and odd.total_steps() == 7
    assert pipeline.scale_steps(TINY, 3).stages == () and pipeline.scale_steps(TINY, 3).steps == 3


def test_a_memory_only_recipe_leaves_the_language_model_of_the_backbone(
    tmp_path, monkeypatch, corpus
):
    """The cpu preset's recipe: a window backbone trained on corpus text and facts, then memories
    trained on their memory parameters alone. Every other weight of a memory equals the
    backbone's, the window (nothing to train) is the backbone, and the backbone trained on the
    corpus equals a plain training loop on it."""
    from moshi_ttt.data.prepare import load_split
    from moshi_ttt.training import Stage

    cpu = pipeline.STUDY_PRESETS["cpu"]
    assert [s.train for s in cpu.train.stages] == [
        ("*.memory.*",)
    ] and cpu.backbone.spec == "window"
    bb_train = dataclasses.replace(
        cpu.backbone.train,
        steps=4,
        batch_size=4,
        warmup=1,
        near_steps=2,
        seq_schedule=((0, 32), (2, 192)),
    )
    mem_train = dataclasses.replace(
        cpu.train,
        steps=3,
        batch_size=4,
        warmup=1,
        near_steps=1,
        seq_schedule=((0, 32), (1, 320)),  # the fact up to 256 back
        stages=(Stage("memory", 3, ("*.memory.*",)),),
    )
    ec = EvalConfig(
        perplexity=False,
        tasks=(),
        cross_session=(),
        diagnostics=False,
        binding_keys=(1,),
        binding_distances=(0.5, 2),
        binding_num=4,
        cost_lengths=(64,),
    )
    sp = dataclasses.replace(
        cpu,
        memories=("window", "ttt_cache"),
        train=mem_train,
        eval=ec,
        backbone=dataclasses.replace(cpu.backbone, train=bb_train, check_every=4, num=4),
    )
    monkeypatch.setitem(pipeline.STUDY_PRESETS, "cpu-test", sp)
    metrics = pipeline.run_study("cpu-test", corpus, tmp_path, "cpu")
    memory = sum(
        p.numel()
        for n, p in StreamingLM(
            memory_variant(ModelConfig.preset("tiny"), "ttt_cache", 32, 32, 16)[1]
        ).named_parameters()
        if ".memory." in n
    )
    assert metrics["models"]["ttt_cache-32"]["trained_parameters"] == memory
    report = (tmp_path / "report.md").read_text()
    assert "window-32 is that backbone, unchanged" in report
    assert f"parameters trained on it: ttt_cache-32 {memory:,}" in report
    backbone = load_checkpoint(tmp_path / "backbone" / "model.pt")[0].state_dict()
    window = load_checkpoint(tmp_path / "window-32" / "model.pt")[0].state_dict()
    cache = load_checkpoint(tmp_path / "ttt_cache-32" / "model.pt")[0].state_dict()
    assert window.keys() == backbone.keys()
    for k, v in backbone.items():
        torch.testing.assert_close(window[k], v, rtol=0, atol=0, msg=k)
        torch.testing.assert_close(cache[k], v, rtol=0, atol=0, msg=k)
    torch.manual_seed(mem_train.seed)  # the memory's initial weights, as the study drew them
    fresh = StreamingLM(memory_variant(ModelConfig.preset("tiny"), "ttt_cache", 32, 32, 16)[1])
    moved = [
        k for k in cache if k not in backbone and not torch.equal(cache[k], fresh.state_dict()[k])
    ]
    assert moved and all(".memory." in k for k in moved)
    torch.manual_seed(bb_train.seed)
    ref = StreamingLM(memory_variant(ModelConfig.preset("tiny"), "window", 32, 32, 16)[1])
    trainer = Trainer(ref, bb_train, load_split(corpus, "train")[:2], progress=False)
    for _ in range(4):
        trainer.train_step()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(backbone[k], v, rtol=0, atol=0, msg=k)


def test_a_study_seed_reaches_the_backbone_and_every_memory(tmp_path, monkeypatch):
    monkeypatch.setitem(pipeline.STUDY_PRESETS, "bb-test", preset(0.0, ("window",)))
    metrics = pipeline.run_study("bb-test", None, tmp_path / "s5", "cpu", seed=5)
    assert load_checkpoint(tmp_path / "s5" / "backbone" / "model.pt")[1]["train"]["seed"] == 5
    assert metrics["models"]["window-32"]["train"]["seed"] == 5
    default = load_checkpoint(train_backbone(preset(0.0), tmp_path / "s0", "cpu", progress=False))[
        0
    ]
    seeded = load_checkpoint(tmp_path / "s5" / "backbone" / "model.pt")[0]
    assert any(
        not torch.equal(a, b)
        for a, b in zip(default.state_dict().values(), seeded.state_dict().values())
    )
