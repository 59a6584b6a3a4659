"""Training a patched tiny Moshi stage by stage: each stage trains exactly its parameters (checked
against the adapter's own list and the layer rule), a resumed run equals an uninterrupted one,
the outputs load back into a fresh model, and bad settings fail clearly."""

import csv
import dataclasses
import math
import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import pytest
import torch
from moshi.models.lm import LMModel

from moshi_ttt import InPlaceTTTConfig, MemoryConfig
from moshi_ttt.layers.records import reconstruction_loss
from moshi_ttt.moshi import AdapterConfig, added_keys, load_added, patch_lm
from moshi_ttt.moshi.config import tiny_lm_kwargs
from moshi_ttt.moshi.trainer import MoshiTrainConfig, MoshiTrainer, full_state, stage_parameters
from moshi_ttt.training import Stage

ADAPTER = AdapterConfig(
    inplace_ttt=InPlaceTTTConfig(layers=(1,), chunk_size=4, target="hidden"),
    memory=MemoryConfig(kind="ttt_cache", window=6, block=2, num_virtual=3),
    memory_layers=(0,),
    base_memory=MemoryConfig(kind="window", window=6),
)


def model(seed=0) -> LMModel:
    torch.manual_seed(seed)
    return patch_lm(LMModel(**tiny_lm_kwargs()), ADAPTER)


def conversations(n=3, T=20):
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        c = torch.randint(0, 40, (5, T), generator=g)
        c[0] = torch.randint(0, 50, (T,), generator=g)
        out.append(c)
    return out


def tiny_cfg(**over) -> MoshiTrainConfig:
    return MoshiTrainConfig.preset("tiny", num_layers=3, **over)


def test_each_stage_trains_exactly_its_parameters():
    lm = model()
    names = [n for n, _ in lm.named_parameters()]
    added = set(added_keys(lm)) & set(names)
    memory, attention, everything = tiny_cfg().stages
    assert set(stage_parameters(lm, memory)) == added and added
    expected = added | {
        n
        for n in names
        if n.startswith("transformer.layers.") and int(n.split(".")[2]) >= 1 and ".self_attn." in n
    }
    expected = {n for n in expected if not (n.startswith("transformer.layers.0."))}
    assert set(stage_parameters(lm, attention)) == expected
    assert set(stage_parameters(lm, everything)) == set(names)


def test_a_stage_changes_only_its_parameters_and_holds_only_them_in_the_optimizer(tmp_path):
    lm = model()
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    trainer = MoshiTrainer(lm, tiny_cfg(), conversations(), tmp_path, progress=False)
    trainer.train_step()  # stage "memory"
    trained = set(stage_parameters(lm, trainer.cfg.stages[0]))
    in_opt = {id(p) for g in trainer.opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for n, p in lm.named_parameters() if n in trained}
    changed = {n for n, p in lm.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trained
    trainer.train_step()  # stage "attention": the optimizer is rebuilt for its parameters
    assert {id(p) for g in trainer.opt.param_groups for p in g["params"]} == {
        id(p)
        for n, p in lm.named_parameters()
        if n in set(stage_parameters(lm, trainer.cfg.stages[1]))
    }


def test_resumed_training_equals_an_uninterrupted_run(tmp_path):
    convs = conversations()
    whole = MoshiTrainer(model(), tiny_cfg(), convs, tmp_path / "a", progress=False)
    whole.fit()
    first = MoshiTrainer(model(), tiny_cfg(), convs, tmp_path / "b", progress=False)
    first.train_step()
    first.save()
    again = MoshiTrainer(model(seed=3), tiny_cfg(), convs, tmp_path / "b", progress=False)
    again.fit(resume=True)
    for (k, a), b in zip(whole.lm.state_dict().items(), again.lm.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=k)
    assert [r["loss"] for r in again.log] == [r["loss"] for r in whole.log[1:]]  # steps 2 and 3


def test_outputs_load_into_a_fresh_model_and_the_log_is_finite(tmp_path):
    trainer = MoshiTrainer(model(), tiny_cfg(), conversations(), tmp_path, progress=False)
    trainer.fit()
    fresh = model(seed=9)
    load_added(fresh, tmp_path / "added.safetensors")
    ours = trainer.lm.state_dict()
    for k in added_keys(fresh):
        torch.testing.assert_close(fresh.state_dict()[k], ours[k], rtol=0, atol=0, msg=k)
    assert (tmp_path / "model.safetensors").is_file()  # the last stage trains everything
    rows = list(csv.DictReader(open(tmp_path / "train_log.csv")))
    assert [r["stage"] for r in rows] == ["memory", "attention", "all"]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    assert all(f"train/{k}".encode() in events.read_bytes() for k in ("loss", "text", "audio"))


def test_a_non_finite_loss_stops_with_the_step_and_stage(tmp_path):
    lm = model()
    with torch.no_grad():
        next(p for n, p in lm.named_parameters() if n in set(added_keys(lm))).fill_(float("nan"))
    trainer = MoshiTrainer(lm, tiny_cfg(), conversations(), tmp_path, progress=False)
    with pytest.raises(FloatingPointError, match="step 0 .stage memory"):
        trainer.train_step()


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(stages=()), "at least one stage"),
        (dict(stages=(Stage("x", 1),), segment=0), "segment"),
        (dict(stages=(Stage("x", 1),), lr=0.0), "lr"),
    ],
)
def test_bad_training_configs_fail_clearly(over, match):
    with pytest.raises(ValueError, match=match):
        MoshiTrainConfig(**over)


def reconstruction_and_grads(lm, codes, segment):
    """Stage 1's loss of one conversation and its gradients on the added parameters: streamed in
    segments (segment > 0, the state carried) or in one parallel pass (segment = 0)."""
    from moshi_ttt.moshi.train import absorbing_segments, conversation_losses, delayed_io
    from moshi_ttt.trainer import reconstructing

    lm.zero_grad(set_to_none=True)
    names = sorted(set(added_keys(lm)) & {n for n, _ in lm.named_parameters()})
    if segment:
        n = sum(absorbing_segments(lm, codes.shape[1], segment))
        segs = conversation_losses(
            lm, codes, segment, backward=True, loss_scale=1.0 / n, loss="reconstruction"
        )
        loss = torch.stack([s["loss"] for s in segs]).mean()
    else:
        with reconstructing(lm, Stage("memory", 1, loss="reconstruction")) as terms:
            lm.forward_text(delayed_io(lm, codes[None])[0])
            loss = reconstruction_loss(terms)
        loss.backward()
    params = dict(lm.named_parameters())
    return loss.detach(), {n: params[n].grad.clone() for n in names if params[n].grad is not None}


def test_the_reconstruction_loss_streamed_in_one_segment_equals_the_parallel_pass():
    """Stage 1 streams segments through the TTT cache's block path; in one segment the blocks it
    absorbs and their recovered values are those of the parallel (training) pass: same loss, same
    gradients on every added parameter."""
    codes = conversations(1, T=24)[0]
    lm = model()
    par, g_par = reconstruction_and_grads(lm, codes, 0)
    seg, g_seg = reconstruction_and_grads(lm, codes, 24)
    torch.testing.assert_close(seg, par, rtol=1e-5, atol=0)
    assert g_par and g_seg.keys() == g_par.keys()
    for k in g_par:
        scale = g_par[k].abs().max().clamp_min(1e-12)
        torch.testing.assert_close(g_seg[k] / scale, g_par[k] / scale, rtol=0, atol=1e-4, msg=k)


def test_a_reconstruction_stage_trains_the_memory_and_needs_a_ttt_cache_and_long_conversations(
    tmp_path,
):
    cfg = dataclasses.replace(
        tiny_cfg(), stages=(Stage("memory", 4, ("@added",), "reconstruction"),), lr=3e-2
    )
    trainer = MoshiTrainer(model(), cfg, conversations(1, T=40), tmp_path, progress=False)
    rows = [trainer.train_step() for _ in range(4)]
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[0]["objective"] == "reconstruction"
    assert rows[0]["audio"] is None and math.isfinite(rows[0]["text"])
    short = MoshiTrainer(model(), cfg, conversations(1, T=6), tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match="evicts no whole block"):
        short.train_step()
    torch.manual_seed(0)
    plain = patch_lm(
        LMModel(**tiny_lm_kwargs()),
        dataclasses.replace(ADAPTER, memory=MemoryConfig(kind="window", window=6)),
    )
    with pytest.raises(ValueError, match="reconstruction loss"):
        MoshiTrainer(
            plain, cfg, conversations(1, T=40), tmp_path / "p", progress=False
        ).train_step()


def test_a_stage_with_nothing_to_train_and_unknown_presets_fail_clearly(tmp_path):
    cfg = dataclasses.replace(tiny_cfg(), stages=(Stage("none", 1, ("nothing.*",)),))
    with pytest.raises(ValueError, match="trains no parameter"):
        MoshiTrainer(model(), cfg, conversations(), tmp_path, progress=False).train_step()
    with pytest.raises(ValueError, match="unknown Moshi training preset"):
        MoshiTrainConfig.preset("nope")


def test_the_command_trains_a_tiny_moshi_end_to_end(tmp_path, capsys):
    """``moshi-ttt moshi train --tiny --steps 3``: synthetic conversations encoded by a random
    Mimi, three stages, the added weights and a finite log; a second call with --resume and the
    same options finds the run finished and leaves its weights as they were."""
    from safetensors.torch import load_file

    from moshi_ttt import cli

    out = tmp_path / "run"
    args = [
        "moshi",
        "train",
        "--tiny",
        "--steps",
        "3",
        "--segment",
        "16",
        "--conversations",
        "2",
        "--out",
        str(out),
    ]
    assert cli.main(args) == 0
    rows = list(csv.DictReader(open(out / "train_log.csv")))
    assert [r["stage"] for r in rows] == ["memory", "attention", "all"]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    added = load_file(out / "added.safetensors")
    assert added and (out / "codes" / "manifest.json").is_file()
    assert cli.main(args + ["--resume"]) == 0
    again = load_file(out / "added.safetensors")
    for k, v in added.items():
        torch.testing.assert_close(again[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--moshi-weights", "nowhere.safetensors", "--config", "nowhere.json"], "no such file"),
        (["--moshi-weights", "nowhere.safetensors"], "needs --config"),
        (["--tiny", "--data", "nowhere.jsonl"], "no such file"),
        (["--tiny", "--adapter", "nope"], "not a preset"),
        (["--tiny", "--steps", "2"], "one per stage"),
        (["--tiny", "--stage-steps", "1,x,1"], "comma-separated"),
    ],
)
def test_bad_command_input_is_one_line(tmp_path, capsys, extra, message):
    from moshi_ttt import cli

    assert cli.main(["moshi", "train", *extra, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moshi-ttt: error:") and message in err and "\n" not in err


def test_a_conversation_naming_a_missing_mono_or_low_rate_wav_is_one_line(tmp_path, capsys):
    import wave

    import numpy as np

    from moshi_ttt import cli
    from moshi_ttt.moshi import data as md

    wav = tmp_path / "a.wav"
    md.write_conversation(wav, np.zeros((2, 24_000), np.float32), 24_000, [])
    jsonl = md.write_jsonl(tmp_path / "d.jsonl", [("a.wav", 1.0), ("gone.wav", 1.0)])
    assert (
        cli.main(["moshi", "train", "--tiny", "--data", str(jsonl), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "audio file not found" in capsys.readouterr().err
    with wave.open(str(wav), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(24_000)
        f.writeframes(np.zeros(24_000, "<i2").tobytes())
    jsonl = md.write_jsonl(tmp_path / "m.jsonl", [("a.wav", 1.0)])
    assert (
        cli.main(["moshi", "train", "--tiny", "--data", str(jsonl), "--out", str(tmp_path / "p")])
        == 2
    )
    assert "1 channel(s)" in capsys.readouterr().err
    md.write_conversation(wav, np.zeros((2, 4_000), np.float32), 4_000, [])  # 4 kHz: too low
    assert (
        cli.main(["moshi", "train", "--tiny", "--data", str(jsonl), "--out", str(tmp_path / "q")])
        == 2
    )
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar: one line
    assert (
        last.startswith("moshi-ttt: error:")
        and "sample rate 4000 Hz, which Mimi cannot take" in last
    )


def uneven_conversations():
    """Conversations of 3, 5, 4 and 3 segments (tiny preset: 8 steps a segment): ranks run
    different numbers of segments in one step."""
    return [c for T in (20, 36, 28, 20) for c in conversations(1, T=T)]


def _gloo_worker(rank, port, cfg, out):
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2"
    )
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    t = MoshiTrainer(
        model(), cfg, uneven_conversations(), out.parent / f"rank{rank}", progress=False
    )
    log = t.fit()
    weights = full_state(t.lm)  # gathered from the two shards
    from torch.distributed.tensor import DTensor

    held = {
        n: (p.to_local().numel(), p.numel())
        for n, p in t.lm.named_parameters()
        if isinstance(p, DTensor)
    }
    if rank == 0:
        torch.save({"weights": weights, "losses": [r["loss"] for r in log], "held": held}, out)
    dist.destroy_process_group()


def test_two_gloo_processes_train_as_one(tmp_path):
    """Two conversations per step: one process trains both; two processes (the weights sharded
    by FSDP2) train one each and sum their gradients; weights and losses agree. Adam divides by
    √v, so the update of an element whose gradient is near zero carries its float noise: the
    updates are compared at 2% of the largest one."""
    from conftest import assert_close, spawn_gloo_pair

    cfg = tiny_cfg(batch=2)
    single = MoshiTrainer(model(), cfg, uneven_conversations(), tmp_path / "one", progress=False)
    losses = [r["loss"] for r in single.fit()]
    spawn_gloo_pair(_gloo_worker, cfg, tmp_path / "two.pt")
    two = torch.load(tmp_path / "two.pt")
    start = model().state_dict()  # compare the updates: Adam scales float noise in tiny gradients
    moved = max(float((p - start[n]).abs().max()) for n, p in single.lm.state_dict().items())
    for n, p in single.lm.state_dict().items():
        assert_close(two["weights"][n] - start[n], p - start[n], 2e-2, n, floor=moved)
    assert_close(two["losses"], losses, 1e-6, "losses")
    # rank 0 holds half of the sharded weights (rows split, rounded up), the linear layers all
    sharded = set(two["held"])
    linears = {f"{n}.weight" for n, m in model().named_modules() if isinstance(m, torch.nn.Linear)}
    held, full = (sum(x) for x in zip(*two["held"].values()))
    assert sharded and 0.5 <= held / full < 0.6
    ttt_mlp = {n for n in linears if n.startswith("transformer.layers.1.gating.")}  # In-Place TTT
    assert ttt_mlp and linears - ttt_mlp <= sharded and not ttt_mlp & sharded
    assert not {n for n in sharded if ".memory." in n}  # a memory's weights stay whole
    with pytest.raises(ValueError, match="batch must be >= 1"):
        tiny_cfg(batch=0)


def test_weights_that_do_not_fit_the_config_are_one_line(tmp_path, capsys, monkeypatch):
    """A stock checkpoint whose config.json describes another model: one error line naming both."""
    import json

    from safetensors.torch import save_file

    from moshi_ttt import cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    lm = LMModel(**tiny_lm_kwargs())
    save_file(
        {k: v.contiguous() for k, v in lm.state_dict().items()}, str(tmp_path / "w.safetensors")
    )
    (tmp_path / "c.json").write_text(json.dumps(tiny_lm_kwargs(dim=48)))
    assert (
        cli.main(
            [
                "moshi",
                "train",
                "--moshi-weights",
                str(tmp_path / "w.safetensors"),
                "--config",
                str(tmp_path / "c.json"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "does not match" in err and "w.safetensors" in err and "\n" not in err


@pytest.mark.parametrize("objective", ["lm", "reconstruction"])
def test_each_conversation_starts_with_a_fresh_memory(tmp_path, objective):
    """Two conversations in one step: the second is not streamed on the first one's memory, so
    the step's loss is the mean of each conversation's loss computed alone."""
    from moshi_ttt.moshi.train import conversation_losses

    convs = conversations(2)
    cfg = dataclasses.replace(tiny_cfg(batch=2), stages=(Stage("all", 1, loss=objective),))
    trainer = MoshiTrainer(model(), cfg, convs, tmp_path, progress=False)
    alone = []
    for c in convs:
        segs = conversation_losses(model(), c, trainer.cfg.segment, loss=objective)
        alone.append(sum(float(s["loss"].detach()) for s in segs) / len(segs))
    row = trainer.train_step()
    assert math.isclose(row["loss"], sum(alone) / 2, rel_tol=1e-6)
