"""A transcription of ALGORITHM.md section 6 for FLUX.2, written from the spec alone, to check the library against.

Nothing here comes from conceptrol: the token layout is counted from the sizes the test chose, the bias table is
filled entry by entry from the spec's table, every attention is an explicit softmax(q kᵀ/√d + bias) · v, and Â is
read from an explicit softmax over the text keys. The projections, norms and rotary embedding are diffusers' own
modules, called as diffusers' FLUX.2 processors call them.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.embeddings import apply_rotary_emb

LATENT, TEXT = "latent", "text"


class Section6:
    """Installed on a stock FLUX.2 pipeline in place of every attention processor.

    spans[b][i]: (start, stop) of reference i's concept among the text keys for sample b, or None (a global
    reference); ref_tokens: each reference's token count; kv: the KV pipeline's sequences (refs before the latent).
    """

    def __init__(self, pipe, spans, num_text, num_latent, ref_tokens, concept_block, total_steps, scale=1.0,
                 start=0.0, end=1.0, kv=False):
        self.spans, self.scale, self.start, self.end = spans, scale, start, end
        self.num_text, self.num_latent, self.ref_tokens, self.kv = num_text, num_latent, list(ref_tokens), kv
        self.concept_block, self.total_steps = concept_block, total_steps
        self.step, self.passes = 0, 0
        self.masks = None  # [B][R] -> list [N] of the latest read (None before the first read)
        self.records = []
        self._tables = {}  # (sample, c, reads so far) -> the table; filling one entry by entry takes a while
        transformer = pipe.transformer
        processors = {}
        for key in transformer.attn_processors:
            block = key.removesuffix(".attn.processor")
            processors[key] = (NaiveSingle if block.startswith("single_") else NaiveDouble)(self, block)
        transformer.set_attn_processor(processors)
        transformer.register_forward_pre_hook(self._on_forward)

    def _on_forward(self, module, args):
        self.passes += 1

    def on_step_end(self, pipe, step, timestep, callback_kwargs):
        self.records.append(self.masks)
        self.step, self.passes = step + 1, 0
        return {}

    # Where each token sits: [text | latent | ref_1 .. ref_R], or [text | refs | latent] for the KV pipeline.
    def kinds(self):
        kinds = [TEXT] * self.num_text
        refs = [i for i, count in enumerate(self.ref_tokens) for _ in range(count)]
        latent = [LATENT] * self.num_latent
        return kinds + (refs + latent if self.kv else latent + refs)

    def strength(self):
        """c inside the window, 0.5 outside (section 2's window, as section 6 says)."""
        k, steps = self.step, self.total_steps
        inside = not (k / steps < self.start or (k + 1) / steps > self.end)
        return self.scale if inside else 0.5

    def table(self, sample):
        key = (sample, self.strength(), len(self.records), id(self.masks), self.kv)
        if key not in self._tables:
            self._tables[key] = self._fill(sample)
        return self._tables[key]

    def _fill(self, sample):
        """The bias of one sample, entry by entry: the spec's table."""
        kinds = self.kinds()
        length = len(kinds)
        log_c = math.log(self.strength())
        spans = self.spans[sample]
        bias = torch.zeros(length, length, dtype=torch.float64)
        latent_index = [n for n, kind in enumerate(kinds) if kind == LATENT]
        for row in range(length):
            for col in range(length):
                r, c = kinds[row], kinds[col]
                if isinstance(c, int) and spans[c] is not None:  # a column of reference c, which has a concept
                    if r == LATENT:
                        value = log_c
                        if self.masks is not None:
                            value += math.log(self.masks[sample][c][latent_index.index(row)])
                        bias[row, col] = value
                    elif r == TEXT:
                        first, stop = spans[c]
                        bias[row, col] = log_c if first <= row < stop else -math.inf
                elif isinstance(r, int) and spans[r] is not None and c == LATENT:
                    bias[row, col] = log_c
        return bias

    def read(self, query, key, kinds_q):
        """Â_i = r_i / mean r_i from the latent queries against the text keys (softmax over the text keys only)."""
        latent_rows = [n for n, kind in enumerate(kinds_q) if kind == LATENT]
        q = query[:, latent_rows].double()  # [B, N, H, d]
        k = key[:, : self.num_text].double()  # [B, T, H, d]
        logits = torch.einsum("bnhd,bthd->bhnt", q, k) / math.sqrt(q.shape[-1])
        probs = torch.softmax(logits, dim=-1)
        masks = []
        for b, spans in enumerate(self.spans):
            per_ref = []
            for span in spans:
                if span is None:
                    per_ref.append(None)
                    continue
                r = probs[b, :, :, span[0]:span[1]].mean(dim=(0, 2))  # mean over heads and the span: [N]
                per_ref.append((r / r.mean()).tolist())
            masks.append(per_ref)
        return masks


class NaiveBlock(torch.nn.Module):
    """diffusers hands a processor only the keywords its __call__ names: each kind names them all."""

    def __init__(self, run, name):
        super().__init__()
        self.run, self.name = run, name

    def attention(self, q, k, v, kv_cache, kv_cache_mode):
        """softmax(q kᵀ/√d + bias) v, explicitly; the KV pipeline's reference rows attend to the references only."""
        run = self.run
        kinds = run.kinds()
        query_kinds = kinds
        if kv_cache_mode == "cached":  # the queries are [text | latent]; the references' keys come from the cache
            k_refs, v_refs = kv_cache.get()
            text = run.num_text
            k = torch.cat([k[:, :text], k_refs, k[:, text:]], 1)
            v = torch.cat([v[:, :text], v_refs, v[:, text:]], 1)
            query_kinds = [kind for kind in kinds if not isinstance(kind, int)]
        elif kv_cache_mode == "extract":
            refs = [n for n, kind in enumerate(kinds) if isinstance(kind, int)]
            kv_cache.store(k[:, refs[0]:refs[-1] + 1].clone(), v[:, refs[0]:refs[-1] + 1].clone())
        positive = run.passes == 1
        acts = any(s is not None for spans in run.spans for s in spans)
        bias = torch.stack([run.table(b) for b in range(len(run.spans))]) if acts else None  # [B, L, L]
        if bias is not None:
            rows = [n for n, kind in enumerate(kinds) if not isinstance(kind, int) or kv_cache_mode is None]
            bias = bias[:, rows] if kv_cache_mode == "cached" else bias
        logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
        if bias is not None:
            logits = logits + bias[:, None]
        if kv_cache_mode == "extract":  # reference rows: the references' keys only
            is_ref = torch.tensor([isinstance(kind, int) for kind in kinds])
            blocked = is_ref[:, None] & ~is_ref[None, :]
            logits = logits.masked_fill(blocked, -math.inf)
        out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(logits, dim=-1), v.double()).flatten(2).to(q.dtype)
        if self.name == run.concept_block and positive and acts:
            run.masks = run.read(q, k, query_kinds)
        return out


class NaiveDouble(NaiveBlock):
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                     kv_cache=None, kv_cache_mode=None, num_ref_tokens=0):
        heads = (-1, attn.head_dim)
        q = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, heads))
        k = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, heads))
        v = attn.to_v(hidden_states).unflatten(-1, heads)
        tq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, heads))
        tk = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, heads))
        tv = attn.add_v_proj(encoder_hidden_states).unflatten(-1, heads)
        q, k, v = torch.cat([tq, q], 1), torch.cat([tk, k], 1), torch.cat([tv, v], 1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = self.attention(q, k, v, kv_cache, kv_cache_mode)
        text = encoder_hidden_states.shape[1]
        image = attn.to_out[1](attn.to_out[0](out[:, text:]))
        return image, attn.to_add_out(out[:, :text])


class NaiveSingle(NaiveBlock):
    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None, kv_cache=None,
                     kv_cache_mode=None, num_txt_tokens=0, num_ref_tokens=0):
        projected = attn.to_qkv_mlp_proj(hidden_states)
        qkv, mlp = projected.split([3 * attn.inner_dim, projected.shape[-1] - 3 * attn.inner_dim], dim=-1)
        q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in qkv.chunk(3, dim=-1))
        q, k = attn.norm_q(q), attn.norm_k(k)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = self.attention(q, k, v, kv_cache, kv_cache_mode)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))
