"""A small decoder-only transformer with a paged KV cache, deterministic on CPU.

The weights come from a seeded generator, so every process that builds
``TinyLM(cfg)`` gets the same model without downloading anything.  The KV
cache lives in pages of ``page_tokens`` tokens; one pool holds, per layer, a
K page array and a V page array::

    pool[layer, 0 (K) | 1 (V), page, token_in_page, head, head_dim]   float32

so page ``(layer, kv, p)`` sits at flat page index ``(layer * 2 + kv) * n_pages + p``
of the pool, which is the index ``write_paged`` is given.

Bit-identical results across processes need identical op sequences on
identical shapes with one intra-op thread: prefill always runs a whole prompt
as one batch and decode always runs one request's step alone (batch 1).  The
single-process ``reference_generate`` uses the very same functions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

__all__ = ["ModelConfig", "TinyLM", "reference_generate", "set_deterministic"]


@dataclass(frozen=True)
class ModelConfig:
    vocab: int = 1024
    d_model: int = 256
    n_heads: int = 8
    n_layers: int = 4
    d_ff: int = 768
    max_seq: int = 1024
    page_tokens: int = 16
    seed: int = 1234

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def page_bytes(self) -> int:
        """Bytes of one K (or V) page of one layer."""
        return self.page_tokens * self.d_model * 4

    def pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_tokens)

    def kv_writes(self, n_prompt: int) -> int:
        """Writes (imms) one prefill sends: K and V pages of every layer, plus the first token."""
        return 2 * self.n_layers * self.pages_for(n_prompt) + 1

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, s: str) -> ModelConfig:
        return cls(**json.loads(s))


def set_deterministic() -> None:
    """One intra-op thread: reductions then always run in the same order."""
    torch.set_num_threads(1)
    torch.manual_seed(0)


class TinyLM:
    """Seeded random weights; greedy decoding over a paged KV cache."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        d, f = cfg.d_model, cfg.d_ff

        def w(*shape: int, scale: float) -> torch.Tensor:
            return torch.randn(*shape, generator=g) * scale

        self.tok_emb = w(cfg.vocab, d, scale=1.0)
        self.pos_emb = w(cfg.max_seq, d, scale=0.5)
        self.layers = []
        for _ in range(cfg.n_layers):
            self.layers.append({
                "ln1": 1.0 + w(d, scale=0.1),
                "wqkv": w(d, 3 * d, scale=1.5 / math.sqrt(d)),
                # a strong attention output makes the answer depend on the whole
                # KV cache, so a wrong page would show up as a wrong token
                "wo": w(d, d, scale=2.0 / math.sqrt(d)),
                "ln2": 1.0 + w(d, scale=0.1),
                "w1": w(d, f, scale=1.0 / math.sqrt(d)),
                "w2": w(f, d, scale=1.0 / math.sqrt(f)),
            })
        self.ln_f = 1.0 + w(d, scale=0.1)
        # untied head: with tied embeddings a random model just echoes its input token
        self.lm_head = w(d, cfg.vocab, scale=1.0 / math.sqrt(d))

    # -- pieces shared by prefill, decode and the reference --------------------

    def new_pool(self, n_pages: int) -> torch.Tensor:
        c = self.cfg
        return torch.zeros(c.n_layers, 2, n_pages, c.page_tokens, c.n_heads, c.head_dim)

    def _qkv(self, li: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c, p = self.cfg, self.layers[li]
        h = F.rms_norm(x, (c.d_model,)) * p["ln1"]
        q, k, v = (h @ p["wqkv"]).view(x.shape[0], 3, c.n_heads, c.head_dim).unbind(1)
        return q, k.contiguous(), v.contiguous()

    def _finish_layer(self, li: int, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        c, p = self.cfg, self.layers[li]
        x = x + attn.transpose(0, 1).reshape(x.shape[0], c.d_model) @ p["wo"]
        h = F.rms_norm(x, (c.d_model,)) * p["ln2"]
        return x + F.gelu(h @ p["w1"]) @ p["w2"]

    def _next_token(self, x_last: torch.Tensor) -> int:
        h = F.rms_norm(x_last, (self.cfg.d_model,)) * self.ln_f
        return int(torch.argmax(h @ self.lm_head))

    # -- prefill ---------------------------------------------------------------

    def embed(self, tokens: list[int]) -> torch.Tensor:
        n = len(tokens)
        if not 0 < n <= self.cfg.max_seq:
            raise ValueError(f"prompt length {n} not in 1..{self.cfg.max_seq}")
        return self.tok_emb[torch.tensor(tokens)] + self.pos_emb[:n]

    def prefill_layer(self, li: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One layer over the whole prompt: (new hidden state, K [n,H,D], V [n,H,D])."""
        q, k, v = self._qkv(li, x)
        attn = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                              is_causal=True)
        return self._finish_layer(li, x, attn), k, v

    def first_token(self, x: torch.Tensor) -> int:
        return self._next_token(x[-1:])

    def prefill_layers(self, tokens: list[int]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield (layer, K, V) layer by layer; the generator's return value is the first token."""
        x = self.embed(tokens)
        for li in range(self.cfg.n_layers):
            x, k, v = self.prefill_layer(li, x)
            yield li, k, v
        return self.first_token(x)

    def to_pages(self, kv: torch.Tensor) -> torch.Tensor:
        """[n, H, D] -> [pages, page_tokens, H, D], zero padded."""
        c = self.cfg
        n = kv.shape[0]
        out = kv.new_zeros(c.pages_for(n) * c.page_tokens, c.n_heads, c.head_dim)
        out[:n] = kv
        return out.view(-1, c.page_tokens, c.n_heads, c.head_dim)

    # -- decode ------------------------------------------------------------------

    def decode_step(self, pool: torch.Tensor, pages: torch.Tensor, pos: int, token: int) -> int:
        """Run ``token`` at position ``pos`` (batch 1): store its K/V in the pool, return the next token."""
        c = self.cfg
        if pos >= c.max_seq:
            raise ValueError(f"position {pos} past max_seq {c.max_seq}")
        page, off = int(pages[pos // c.page_tokens]), pos % c.page_tokens
        used = pages[: pos // c.page_tokens + 1]
        x = self.tok_emb[token:token + 1] + self.pos_emb[pos:pos + 1]
        for li in range(c.n_layers):
            q, k, v = self._qkv(li, x)
            pool[li, 0, page, off] = k[0]
            pool[li, 1, page, off] = v[0]
            keys = pool[li, 0].index_select(0, used).view(-1, c.n_heads, c.head_dim)[: pos + 1]
            vals = pool[li, 1].index_select(0, used).view(-1, c.n_heads, c.head_dim)[: pos + 1]
            attn = F.scaled_dot_product_attention(q.transpose(0, 1), keys.transpose(0, 1),
                                                  vals.transpose(0, 1))
            x = self._finish_layer(li, x, attn)
        return self._next_token(x)


def reference_generate(model: TinyLM, prompt: list[int], max_new: int) -> list[int]:
    """The single-process answer: prefill into a local paged pool, then greedy decode."""
    c = model.cfg
    n = len(prompt)
    n_pages = c.pages_for(n + max_new - 1)
    pool = model.new_pool(n_pages)
    pages = torch.arange(n_pages)
    gen = model.prefill_layers(prompt)
    np_ = c.pages_for(n)
    while True:
        try:
            li, k, v = next(gen)
        except StopIteration as stop:
            token = stop.value
            break
        pool[li, 0, :np_] = model.to_pages(k)
        pool[li, 1, :np_] = model.to_pages(v)
    out = [token]
    for i in range(1, max_new):
        token = model.decode_step(pool, pages, n + i - 1, token)
        out.append(token)
    return out
