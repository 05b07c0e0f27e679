"""The LLaMA transformer (Touvron et al., 2023) in plain PyTorch.

Pre-normalisation with RMSNorm, SwiGLU feed-forward, rotary position embeddings on interleaved pairs, causal
attention through ``scaled_dot_product_attention``, grouped-query attention when ``n_kv_heads < n_heads``, no
biases and an untied output layer. Parameter names are Meta's, so Meta checkpoints load one to one.

This file knows nothing of parallelism, checkpoints or command lines. Inference (generation, evaluation) passes a
key/value cache per layer, following the protocol in ``Transformer``'s docstring; training passes none.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in fp32 whatever the input dtype (as in Meta's code)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * theta^(-2i/d) for i < d/2, shape (max_seq_len, head_dim // 2), fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (batch, seq, heads, head_dim) by the given angles.

    ``cos``/``sin`` are (seq, head_dim/2) or (batch, seq, head_dim/2), at least as long as x's sequence (longer
    tables are cut to it: under sequence parallelism only the attention sees the full sequence). Real arithmetic,
    not complex numbers, so it compiles and runs on every backend; computed in fp32 like Meta's reference.
    """
    cos, sin = cos[..., : x.shape[1], :], sin[..., : x.shape[1], :]
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row over a key/value cache, in fp32.

    For a single query the CPU flash kernel spends most of its time on set-up; this plain form compiles into
    a few fused loops (decode steps measured 25% faster with int8 weights on the 2-core CPU).
    """
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.float()).type_as(q)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``scaled_dot_product_attention`` (causal when there is no mask).

    On the CPU, bf16 or fp16 heads of at most 32 dimensions are attended in fp32, outside autocast (which
    would cast them back): there torch's reduced-precision flash kernel is the slower one until heads of 64
    (forward and backward, torch 2.13 on an AVX-512 BF16/AMX VM: 3.7x slower with 16-dimension heads, 1.2x
    with 32, 1.6x faster with 64). A 4-layer, 128-wide model with 16-dimension heads trains 2x faster in bf16.
    """
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= 32:
        with torch.autocast("cpu", enabled=False):  # CPU autocast would cast the fp32 inputs back down
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                 is_causal=mask is None)
        return out.type_as(q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The query, key and value projections of x (generation's decode view does them as one product)."""
        return self.wq(x), self.wk(x), self.wv(x)

    def forward(self, x, cos, sin, cache=None, input_pos=None, mask=None) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q, k, v = self.project(x)
        # -1 heads: under tensor parallelism each rank holds a slice of the heads
        q = q.view(bsz, seqlen, -1, self.head_dim)
        k = k.view(bsz, seqlen, -1, self.head_dim)
        v = v.view(bsz, seqlen, -1, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(input_pos, k, v)
            if mask is not None:  # attend over the slots the mask covers (generation passes the filled prefix)
                k, v = k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]]
        if self.n_kv_heads != self.n_heads:  # grouped-query attention: each kv head serves n_rep query heads
            n_rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        if seqlen == 1 and mask is not None:
            out = decode_attention(q, k, v, mask)
        else:
            out = causal_attention(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate (w1) and up (w3) projections of x (generation's decode view does them as one product)."""
        return self.w1(x), self.w3(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.project(x)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, cache=None, input_pos=None, mask=None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, input_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The LLaMA decoder. ``model(tokens)`` maps (batch, seq) token ids to (batch, seq, vocab) logits.

    Build it on the meta device and call ``init_weights()`` once it has real storage (see ``build_model``), so
    a 65B model is never materialised twice. ``layers`` is a ModuleDict keyed by layer number, so pipeline
    stages can delete layers and keep Meta's names (``layers.N...``); a stage without ``tok_embeddings``,
    ``norm`` or ``output`` (None) takes and passes on hidden states there instead.

    Inference interface, shared by ``forward`` and ``hidden_states``:

    - ``input_pos``: the positions of ``tokens``, (seq,) or (batch, seq); None means 0..seq-1. They select the
      rotary angles and are handed unchanged to each cache's ``update``.
    - ``caches``: None, or one cache per layer of this module, indexed in layer order. A cache is any object
      with ``update(input_pos, k, v) -> (k, v)``, which its layer calls once per pass with the new tokens' keys
      (rotated) and values, each (batch, kv_heads, seq, head_dim) in the activations' dtype (kv_heads: this
      rank's heads under tensor parallelism). It returns the keys and values the new tokens attend over,
      (batch, kv_heads, slots, head_dim), same dtype and device, the new ones among them; what it keeps, and
      where, is its own business.
    - ``mask``: None, or a boolean (batch or 1, 1, seq, slots) mask, True where query t may attend to entry s;
      only the first ``slots`` entries ``update`` returns are read, so a cache may return a larger static
      buffer. Without a mask attention is causal from the first returned entry (query t sees entries 0..t),
      so ``update`` must then return exactly the new tokens' keys and values.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        # ``model.to(bf16)`` would round the rotary tables; keep them fp32, recomputed on their new device.
        super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32:
            self.rope_cos, self.rope_sin = rope_tables(
                self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, device=self.rope_cos.device)
        return self

    def init_buffers(self) -> None:
        """Recompute the rotary tables in place (after ``to_empty`` they hold garbage)."""
        cos, sin = rope_tables(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta,
                               device=self.rope_cos.device)
        with torch.no_grad():
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Initialise every parameter; the paper does not state an init, so we use GPT-2's.

        Embedding, attention and feed-forward input matrices and the output layer: N(0, 0.02) truncated at
        ±3σ. The two matrices that write into the residual stream (``wo``, ``w2``) are scaled by
        1/sqrt(2·n_layers) so the residual variance stays flat with depth. Norm gains are 1. Parameters are
        drawn in a fixed order from ``generator`` (or the global RNG), so a seed fixes the model.
        """
        std = 0.02
        residual_std = std / math.sqrt(2 * self.args.n_layers)

        def normal(t: torch.Tensor, s: float) -> None:
            nn.init.trunc_normal_(t, mean=0.0, std=s, a=-3 * s, b=3 * s, generator=generator)

        normal(self.tok_embeddings.weight, std)
        for layer in self.layers.values():
            for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv,
                        layer.feed_forward.w1, layer.feed_forward.w3):
                normal(lin.weight, std)
            normal(layer.attention.wo.weight, residual_std)
            normal(layer.feed_forward.w2.weight, residual_std)
            layer.attention_norm.reset_parameters()
            layer.ffn_norm.reset_parameters()
        self.norm.reset_parameters()
        normal(self.output.weight, std)
        self.init_buffers()

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None, caches=None,
                mask: torch.Tensor | None = None, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for ``tokens`` (batch, seq): the output layer applied to ``hidden_states``.

        Training passes only ``tokens``: attention is causal from position 0. Inference passes ``input_pos``,
        ``caches`` and ``mask`` as the class docstring describes. ``logits_at`` (batch,) picks one sequence
        index per row: only those positions reach the final norm and output layer, and the logits are
        (batch, 1, vocab). A prefill needs only each prompt's last logits, and the output layer is the largest
        matrix.
        """
        h = self.hidden_states(tokens, input_pos, caches, mask, at=logits_at)
        return self.output(h) if self.output is not None else h

    def hidden_states(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None, caches=None,
                      mask: torch.Tensor | None = None, at: torch.Tensor | None = None) -> torch.Tensor:
        """The final-normed hidden states (batch, seq, dim) of ``tokens``: ``forward`` without the output layer.

        For callers that apply the output layer themselves, to the few positions they score (the evaluation
        harness). Arguments as in ``forward``; ``at`` is its ``logits_at``, giving (batch, 1, dim).
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if input_pos is None:
            cos, sin = self.rope_cos, self.rope_sin  # cut to the sequence length in apply_rotary
        else:
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        for i, layer in enumerate(self.layers.values()):
            h = layer(h, cos, sin, None if caches is None else caches[i], input_pos, mask)
        if at is not None:
            h = h[torch.arange(h.shape[0], device=h.device), at][:, None]
        return self.norm(h) if self.norm is not None else h


def build_model(args: ModelArgs, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                init: bool = True, seed: int | None = None) -> Transformer:
    """Build on the meta device, give it storage on ``device``, then initialise (or leave it for a load)."""
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    if init:
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        model.init_weights(generator)
    else:
        model.init_buffers()
    if dtype is not None:
        model.to(dtype)
    return model
