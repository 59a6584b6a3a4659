"""Conversation recall on Moshi: facts stated early in a spoken conversation and asked much
later; the text tokens of Moshi's answer are scored.

The conversation streams through the (patched) model teacher-forced, in segments with the memory
carried, as in training. At each frame t the text logits predict the text token of frame t (text
has no delay). A fact is recalled when every text token of its answer's first value word, at the
frames ``interleave_text`` put them (from floor(answer_s x frame rate) on), is the argmax
prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from moshi.models.lm import LMModel

from .data import FRAME_RATE, word_tokens
from .streaming import detach_streaming_state
from .train import check_codes, check_contexts, delayed_io


@dataclass(frozen=True)
class FactScore:
    """One fact: its answer's frames, target tokens, predictions, and the distance in frames from
    where it was told to where it is asked."""

    key: str
    value: str
    frames: tuple[int, ...]
    targets: tuple[int, ...]
    predicted: tuple[int, ...]
    distance: int

    @property
    def recalled(self) -> bool:
        return self.targets == self.predicted


@torch.no_grad()
def text_predictions(lm: LMModel, codes: torch.Tensor, segment: int) -> torch.Tensor:
    """Argmax text token int64 [T] at every frame of one conversation (codes [K, T]), streamed
    in segments of ``segment`` frames with the memory carried."""
    check_codes(lm, codes, segment)
    check_contexts(lm, segment, codes.shape[1])
    inputs, _ = delayed_io(lm, codes.to(lm.device).long()[None])  # [1, K, T]
    out = []
    with lm.streaming(1):
        for s in range(0, inputs.shape[2], segment):
            _, text_logits = lm.forward_text(inputs[:, :, s : s + segment])  # [1, 1, t, text_card]
            out.append(text_logits[0, 0].argmax(-1).cpu())
            detach_streaming_state(lm)
    return torch.cat(out)


def fact_recall(
    lm: LMModel,
    codes: torch.Tensor,
    facts: list[dict],
    tokenizer,
    segment: int,
    frame_rate: float = FRAME_RATE,
) -> list[FactScore]:
    """Scores of ``facts`` (``{"key", "value", "told_s", "answer_s"}``, as synthetic conversations
    store them) in one conversation. A fact whose answer tokens are not in the text row (the
    word was cut by the next one) is left out."""
    if tokenizer is None:
        raise ValueError("conversation recall scores text tokens: it needs the text tokenizer")
    pred = text_predictions(lm, codes, segment)
    text = codes[0].long()
    scores = []
    for f in facts:
        tokens = word_tokens(tokenizer, str(f["value"]).split()[0])
        first = math.floor(f["answer_s"] * frame_rate)
        frames = tuple(range(first, first + len(tokens)))
        if not tokens or frames[-1] >= len(text) or text[list(frames)].tolist() != tokens:
            continue
        scores.append(
            FactScore(
                f["key"],
                str(f["value"]),
                frames,
                tuple(tokens),
                tuple(pred[list(frames)].tolist()),
                first - math.floor(f["told_s"] * frame_rate),
            )
        )
    return scores


def recall_summary(scores: list[FactScore]) -> dict:
    """Facts scored, facts recalled and their fraction, and the mean told-to-asked distance."""
    n = len(scores)
    hits = sum(s.recalled for s in scores)
    return {
        "facts": n,
        "recalled": hits,
        "accuracy": hits / n if n else None,
        "mean_distance_frames": sum(s.distance for s in scores) / n if n else None,
    }
