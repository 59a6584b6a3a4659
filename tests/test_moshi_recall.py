"""Conversation recall on a tiny patched Moshi: streamed predictions equal the parallel forward's,
and each fact is scored at the frames that hold its answer's text tokens."""

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import pytest
import torch
from moshi.models.lm import LMModel

from moshi_ttt import MemoryConfig
from moshi_ttt.moshi import AdapterConfig, patch_lm
from moshi_ttt.moshi import data as md
from moshi_ttt.moshi.config import tiny_lm_kwargs
from moshi_ttt.moshi.recall import fact_recall, recall_summary, text_predictions
from moshi_ttt.moshi.synth import tone_conversations
from moshi_ttt.moshi.train import delayed_io

ADAPTER = AdapterConfig(
    memory=MemoryConfig(kind="ttt_cache", window=8, block=4, num_virtual=3),
    memory_layers=(1,),
    base_memory=MemoryConfig(kind="window", window=8),
)


@pytest.fixture(scope="module")
def conversation(tmp_path_factory, spm):
    """One tone conversation with two facts: its codes (random Mimi, the tiny tokenizer) and
    facts."""
    import json

    out = tmp_path_factory.mktemp("conv")
    jsonl = tone_conversations(out, n=1, seed=3, filler_exchanges=1, num_facts=2)
    ((entry, conv),) = list(md.read_dataset(jsonl))
    codes = md.conversation_codes(conv, md.load_mimi(num_codebooks=2), spm)
    facts = json.loads(entry.wav.with_suffix(".json").read_text())["facts"]
    return codes, facts


def lm(spm) -> LMModel:
    torch.manual_seed(0)
    return patch_lm(
        LMModel(**tiny_lm_kwargs(text_card=spm.vocab_size(), card=2048)), ADAPTER
    ).eval()


def test_streamed_predictions_equal_the_parallel_forward(conversation, spm):
    codes, _ = conversation
    model = lm(spm)
    streamed = text_predictions(model, codes, segment=16)
    inputs, _ = delayed_io(model, codes.long()[None])
    with torch.no_grad():
        _, logits = model.forward_text(inputs)  # one parallel call, no streaming state
    assert torch.equal(streamed, logits[0, 0].argmax(-1))


def test_each_fact_is_scored_at_its_answer_tokens(conversation, spm):
    codes, facts = conversation
    model = lm(spm)
    scores = fact_recall(model, codes, facts, spm, segment=16)
    assert scores and len(scores) <= len(facts)
    pred = text_predictions(model, codes, segment=16)
    for s in scores:
        f = next(f for f in facts if f["key"] == s.key)
        assert list(s.targets) == md.word_tokens(spm, f["value"].split()[0])
        assert list(codes[0, list(s.frames)]) == list(s.targets)  # the text row holds them there
        assert list(s.predicted) == pred[list(s.frames)].tolist()
        assert s.recalled == (s.predicted == s.targets) and s.distance > 0
    summ = recall_summary(scores)
    assert summ["recalled"] == sum(s.recalled for s in scores) and summ["facts"] == len(scores)
    with pytest.raises(ValueError, match="needs the text tokenizer"):
        fact_recall(model, codes, facts, None, segment=16)


def test_the_recall_command_scores_what_the_library_scores(tmp_path, spm, capsys):
    import json

    from moshi_ttt import cli

    tok = tmp_path / "t.model"
    tok.write_bytes(spm.serialized_model_proto())
    jsonl = tone_conversations(tmp_path / "c", n=1, seed=3, filler_exchanges=1, num_facts=2)
    assert (
        cli.main(
            [
                "moshi",
                "recall",
                "--tiny",
                "--tokenizer",
                str(tok),
                "--data",
                str(jsonl),
                "--segment",
                "16",
                "--out",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    got = json.loads((tmp_path / "r.json").read_text())
    torch.manual_seed(0)  # the command's model: tiny, seed 0, the ttt_cache preset
    model = patch_lm(
        LMModel(**tiny_lm_kwargs(text_card=spm.vocab_size(), card=2048)),
        AdapterConfig.preset("ttt_cache", num_layers=3),
    ).eval()
    ((entry, conv),) = list(md.read_dataset(jsonl))
    codes = md.conversation_codes(conv, md.load_mimi(num_codebooks=2), spm)
    facts = json.loads(entry.wav.with_suffix(".json").read_text())["facts"]
    ref = fact_recall(model, codes, facts, spm, segment=16)
    assert got["summary"] == recall_summary(ref)
    assert [tuple(f["predicted"]) for f in got["facts"]] == [s.predicted for s in ref]
