"""Training on long conversations with memory carried across consecutive segments.

moshi-finetune trains each 100 s segment on its own (fresh memory, initial token first). Here a
conversation's codes [K, T] are delayed once, as Moshi's ``LMModel.forward`` does for the whole
conversation, and cut into consecutive segments that run through Moshi's streaming path: the
memory (KV rings, TTT cache, fast weights) at the end of segment i is the start of segment i+1.
Gradients flow through one segment; the carried state is detached between segments (truncated
BPTT). ``carry=False`` is moshi-finetune's way: every segment is its own conversation.

Losses are Moshi's: cross-entropy on the text stream and on the ``dep_q`` audio streams Moshi
speaks, at positions whose target exists (after each stream's delay, code != -1); or training
stage 1's reconstruction loss of the TTT cache (``ops.ttt_cache.reconstruction_terms``: the
blocks a segment evicts, recovered from the virtual tokens after them), with the text loss
reported beside it and the depformer not run.
"""

from __future__ import annotations

import contextlib

import torch
from moshi.models.lm import LMModel
from moshi.models.lm_utils import _delay_sequence
from moshi.modules.transformer import StreamingMultiheadAttention
from torch.nn import functional as F

from ..layers.records import reconstruction_loss
from ..trainer import reconstructing, reconstruction_memories
from ..training import Stage
from .attention import MemoryAttention
from .streaming import detach_streaming_state


def check_codes(lm: LMModel, codes, segment: int) -> None:
    if not isinstance(codes, torch.Tensor) or codes.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"codes must be an integer tensor [K, T], got {getattr(codes, 'dtype', type(codes))}"
        )
    if codes.dim() != 2 or codes.shape[0] != lm.num_codebooks or codes.shape[1] < 1:
        raise ValueError(
            f"codes must have shape [K={lm.num_codebooks}, T >= 1] (text + {lm.n_q} audio "
            f"codebooks), got {tuple(codes.shape)}"
        )
    text, audio = codes[:1], codes[1:]
    if text.min() < -1 or text.max() >= lm.text_card or audio.min() < -1 or audio.max() >= lm.card:
        raise ValueError(
            f"codes out of range: text in [-1, {lm.text_card}), audio in [-1, {lm.card})"
        )
    if not isinstance(segment, int) or segment < 1:
        raise ValueError(f"segment must be a positive int (steps), got {segment!r}")


def check_contexts(lm: LMModel, segment: int, T: int) -> None:
    """Moshi's ring KV cache holds ``context`` steps and is exact for one step a call: a call of t
    steps overwrites t - 1 keys its first queries still need once the ring has wrapped."""
    for i, layer in enumerate(lm.transformer.layers):
        attn = layer.self_attn
        if isinstance(attn, StreamingMultiheadAttention) and not isinstance(attn, MemoryAttention):
            if attn.context is None or (T > attn.context and segment > 1):
                raise ValueError(
                    f"layer {i} keeps Moshi's ring KV cache of {attn.context} steps, which "
                    "segments of "
                    f"{segment} steps cannot stream exactly past it (conversation of {T} steps): "
                    "give every "
                    "layer a memory (AdapterConfig.base_memory) or keep conversations within the "
                    "context"
                )


def delayed_io(lm: LMModel, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Moshi's input/target layout of a whole conversation. codes [B, K, T] -> (inputs, targets)
    [B, K, T]: inputs start with the initial token, targets[:, k, j] = codes[:, k, j - delay_k]."""
    B = codes.shape[0]
    initial = lm._get_initial_token().expand(B, -1, -1)
    # [B, K, T + 1]
    delayed = torch.cat([initial, _delay_sequence(lm.delays, codes, initial)], dim=2)
    return delayed[:, :, :-1], delayed[:, :, 1:]


def valid_targets(lm: LMModel, targets: torch.Tensor, start: int) -> torch.Tensor:
    """Which targets [B, K, t] at global delayed steps start..start+t exist: after stream k's
    delay, and not Moshi's zero token. -> [B, K, t] bool."""
    j = start + torch.arange(targets.shape[2], device=targets.device)  # [t]
    delays = torch.tensor(lm.delays, device=targets.device)
    return (j[None, None] >= delays[None, :, None]) & (targets != lm.zero_token_id)


def masked_ce(logits: torch.Tensor, targets: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Mean CE of logits [B, S, t, V] against targets [B, S, t] where ok [B, S, t] (0 if none)."""
    if not ok.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[ok].float(), targets[ok])


def logits_losses(
    lm: LMModel,
    text_logits: torch.Tensor,
    audio_logits: torch.Tensor,
    targets: torch.Tensor,
    start: int,
) -> dict:
    """Mean CE of text_logits [B, 1, t, text_card] and audio_logits [B, dep_q, t, card] against
    targets [B, K, t] at global delayed steps start..start+t (``valid_targets``)."""
    valid = valid_targets(lm, targets, start)  # [B, K, t]
    a = slice(lm.audio_offset, lm.audio_offset + lm.dep_q)
    text = masked_ce(text_logits, targets[:, :1], valid[:, :1])
    audio = masked_ce(audio_logits, targets[:, a], valid[:, a])
    return {"text": text, "audio": audio, "loss": text + audio}


def segment_losses(lm: LMModel, inputs: torch.Tensor, targets: torch.Tensor, start: int) -> dict:
    """One (streaming) call over inputs [B, K, t] at global steps start..start+t ->
    ``logits_losses``."""
    out, text_logits = lm.forward_text(inputs)  # [B, t, D], [B, 1, t, text_card]
    audio_logits = lm.forward_depformer_training(targets, out)  # [B, dep_q, t, card]
    return logits_losses(lm, text_logits, audio_logits, targets, start)


def absorbing_segments(lm: LMModel, T: int, segment: int) -> list[bool]:
    """Per consecutive segment of a T-step conversation: whether a TTT cache of ``lm`` completes
    a block in it (its window holds W steps, so by step e it has evicted max(e - W, 0) tokens)."""
    mems = reconstruction_memories(lm)
    spans = [(s, min(s + segment, T)) for s in range(0, T, segment)]
    done = lambda m, e: max(e - m.cfg.window, 0) // m.cfg.block
    return [any(done(m, e) > done(m, s) for m in mems) for s, e in spans]


def reconstruction_segment(
    lm: LMModel, inputs: torch.Tensor, targets: torch.Tensor, start: int, terms: dict
) -> dict:
    """One streaming call with the reconstruction recorded: {"loss": the mean over the memories
    that absorbed a block, "text": the text CE (no gradient), "absorbed": whether any did}. With
    none, the loss is a zero on the call's graph, so a backward still runs (the same collectives
    on every rank of a sharded model)."""
    _, text_logits = lm.forward_text(inputs)
    with torch.no_grad():
        text = masked_ce(text_logits, targets[:, :1], valid_targets(lm, targets, start)[:, :1])
    absorbed = bool(terms)
    loss = reconstruction_loss(terms) if absorbed else text_logits.float().sum() * 0.0
    terms.clear()  # the next segment's terms start afresh
    return {"loss": loss, "text": text, "absorbed": absorbed}


def conversation_losses(
    lm: LMModel,
    codes: torch.Tensor,
    segment: int,
    carry: bool = True,
    backward: bool = False,
    loss_scale: float = 1.0,
    loss: str = "lm",
) -> list[dict]:
    """Losses of each consecutive segment of one conversation. codes [K, T] (text + n_q audio
    codebooks, Moshi's layout); ``segment`` steps per segment (the last may be shorter).

    ``carry``: the streaming state flows from segment to segment (no reset inside a
    conversation); else every segment starts fresh (moshi-finetune). ``backward``: backpropagate
    each segment's loss before the next segment runs (gradients accumulate in ``.grad``; the
    returned values are then detached; ``loss_scale`` multiplies what is backpropagated).
    ``loss``: ``"lm"`` -> [{"text", "audio", "loss"}] per segment; ``"reconstruction"`` ->
    [{"text", "loss"}] per segment in which a TTT cache absorbed a block (carried state only).
    """
    check_codes(lm, codes, segment)
    check_contexts(lm, segment, codes.shape[1])
    if loss not in ("lm", "reconstruction"):
        raise ValueError(f"loss must be 'lm' or 'reconstruction', got {loss!r}")
    if loss == "reconstruction" and not carry:
        raise ValueError("the reconstruction loss needs the carried state (carry=True)")
    ttt = getattr(lm, "moshi_ttt_config", None) and lm.moshi_ttt_config.inplace_ttt
    if backward and loss == "lm" and ttt and segment <= ttt.chunk_size:
        raise ValueError(
            f"segment={segment} <= In-Place TTT chunk_size={ttt.chunk_size}: no update is applied "
            "inside a segment, so TTT gets no gradient"
        )
    codes = codes.to(lm.device).long()[None]  # [1, K, T]
    T = codes.shape[2]
    inputs, targets = delayed_io(lm, codes)
    results = []
    recon = (
        reconstructing(lm, Stage("reconstruction", 1, loss="reconstruction"))
        if loss == "reconstruction"
        else contextlib.nullcontext({})
    )
    with lm.streaming(1), recon as terms:
        for s in range(0, T, segment):
            if carry:
                seg_in, seg_tgt, start = (
                    inputs[:, :, s : s + segment],
                    targets[:, :, s : s + segment],
                    s,
                )
            else:  # a conversation of its own: initial token first, delays from its first step
                lm.reset_streaming()
                (seg_in, seg_tgt), start = delayed_io(lm, codes[:, :, s : s + segment]), 0
            if loss == "lm":
                losses = segment_losses(lm, seg_in, seg_tgt, start)
            else:
                losses = reconstruction_segment(lm, seg_in, seg_tgt, start, terms)
            absorbed = losses.pop("absorbed", True)
            if backward:
                (losses["loss"] * loss_scale).backward()
                losses = {k: v.detach() for k, v in losses.items()}
            if absorbed:
                results.append(losses)
            detach_streaming_state(lm)
    return results
