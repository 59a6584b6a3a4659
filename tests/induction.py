"""A hand-built StreamingLM that recalls by 3-gram induction: at each token it predicts the token
that followed the same three tokens earlier in the stream. It answers MQAR from its memory alone
(and nothing without it), so it tells a memory that survives a restart from one that does not."""

import math

import torch

import moshi_ttt as mt
from moshi_ttt.layers.norm import RMSNorm

C = 30  # code width: every token id has a random unit code in R^C
# residual slots: token code, a constant, 3 previous codes, output
E, BIAS, P, O = 0, 30, (32, 64, 96), 128


def induction_model(kind: str = "full", window: int = 4096, seed: int = 0) -> mt.StreamingLM:
    cfg = mt.ModelConfig(
        vocab_size=256,
        dim=512,
        num_layers=2,
        num_heads=4,
        hidden_dim=4,
        max_period=1e13,
        memory=mt.MemoryConfig(kind=kind, window=window),
    )
    model = mt.StreamingLM(cfg).eval()
    code = torch.randn(256, C, generator=torch.Generator().manual_seed(seed))
    code = code / code.norm(dim=1, keepdim=True)  # [V, C]
    D, H, Dh = cfg.dim, cfg.num_heads, cfg.head_dim
    theta = model.layers[0].self_attn.freqs.double()  # [Dh / 2] RoPE frequencies
    fast = [d for d in range(Dh // 2) if theta[d] > 0.03]  # sharp relative-position peaks
    # pairs RoPE turns < 0.2 rad over 1000 tokens: content matching
    slow = torch.arange(Dh - 3 * C, Dh)
    assert theta[(Dh - 3 * C) // 2] < 2e-4
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # the MLPs (linear_out = 0) add nothing
        for norm in (m for m in model.modules() if isinstance(m, RMSNorm)):
            norm.alpha.fill_(1.0)
        model.emb.weight[:, E : E + C] = code
        model.emb.weight[:, BIAS] = 1.0
        # layer 0: head j attends to the token j + 1 back and writes its code to slot P[j]
        s0 = math.sqrt(2 / D)  # RMSNorm multiplies [code, 1] by 1 / s0
        wq, wk, wv = model.layers[0].self_attn.in_proj.weight.view(3, H, Dh, D)
        amp = 24.0  # |q| = |k| per fast pair: the peak beats the neighbouring offsets by ~40 nats
        for j in range(3):
            for d in fast:
                ang = (j + 1) * theta[d].item()
                wq[j, 2 * d, BIAS], wq[j, 2 * d + 1, BIAS] = (
                    amp * s0 * math.cos(ang),
                    -amp * s0 * math.sin(ang),
                )
                wk[j, 2 * d, BIAS] = amp * s0
            wv[j, :C, E : E + C] = s0 * torch.eye(C)
            model.layers[0].self_attn.out_proj.weight[P[j] : P[j] + C, j * Dh : j * Dh + C] = (
                torch.eye(C)
            )
        # layer 1, head 0: query codes (x_t, x_t-1, x_t-2) meet key codes (x_s-1, x_s-2, x_s-3);
        # value x_s -> O
        s1 = math.sqrt(5 / D)  # five unit-norm slots after layer 0
        g = math.sqrt(25.0 * math.sqrt(Dh))  # attention logit 25 per matching token
        wq, wk, wv = model.layers[1].self_attn.in_proj.weight.view(3, H, Dh, D)
        for i, (qs, ks) in enumerate(((E, P[0]), (P[0], P[1]), (P[1], P[2]))):
            rows = slow[i * C : (i + 1) * C]
            wq[0, rows, qs : qs + C] = g * s1 * torch.eye(C)
            wk[0, rows, ks : ks + C] = g * s1 * torch.eye(C)
        wv[0, :C, E : E + C] = s1 * torch.eye(C)
        model.layers[1].self_attn.out_proj.weight[O : O + C, :C] = torch.eye(C)
        model.head.weight[:, O : O + C] = 30.0 * code  # logits read the copied code only
    return model
