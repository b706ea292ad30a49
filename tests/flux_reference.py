"""A naive reference of ALGORITHM.md section 4 (FLUX.1's XLabs IP-Adapter, Kontext and Redux), for the tests.

Written from the spec text alone, as tests/helpers.py's `ReferenceProcessor` is for section 1: attention as an
explicit softmax(QKᵀ/√d + bias)·V in fp32, Python loops over samples and references, the bias table filled cell by
cell from the table of section 2, no caching and no chunking. The drivers install `ReferenceFluxProcessor` on every
attention of a stock diffusers FLUX pipeline, call it, and put the original processors back (arXiv 2503.06568).

Which mask a block uses, per pass of one pipeline call (trace events name it `"step:block"`):
- IP-Adapter, global: double block 18 reads and uses its own gate M; single blocks 18 and 37 re-read it (stored
  only); a double block before the first read of the call uses its own local M; afterwards, the latest read.
- IP-Adapter, local: every double block reads and uses its own M.
- Kontext / Redux: every block biases with the latest Â read before it (none before the first read of the call);
  blocks 18 (double), 18 and 37 (single) read a new Â after computing their own output with the old one.
- True CFG: the negative pass (the second transformer call of a step) reads nothing and uses what the positive
  pass of that step left: the latest stored mask (global), or the same block's M of the positive pass (local).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models.embeddings import apply_rotary_emb
from torch import Tensor

BLOCKED = -1e7  # "every other text token → reference: blocked (−1e7 in the reference)"
CONCEPT_BLOCK = "transformer_blocks.18"  # the concept-specific block: double-stream block 18 (the last)
REREAD_BLOCKS = ("single_transformer_blocks.18", "single_transformer_blocks.37")  # the reference's counter mod 19
OUTSIDE_WINDOW_C = 0.5  # Kontext/Redux: c outside [start, end] (section 2)
MODES = ("ip", "kontext", "redux")


# ---------------------------------------------------------------------------------------------------------------
# The math, written from the spec


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
    """softmax(q kᵀ / √d + bias) v for each sample, in fp32: q [B, Lq, H, d], k, v [B, Lk, H, d] -> [B, Lq, H*d]."""
    outs = []
    for b in range(q.shape[0]):
        qb, kb, vb = (x[b].transpose(0, 1).float() for x in (q, k, v))  # [H, L, d]
        logits = qb @ kb.transpose(-1, -2) / math.sqrt(qb.shape[-1])  # [H, Lq, Lk]
        if bias is not None:
            logits = logits + bias[b].float()
        probs = logits.softmax(dim=-1)
        outs.append((probs @ vb).transpose(0, 1).flatten(1))  # [Lq, H*d]
    return torch.stack(outs).to(q.dtype)


def text_share(q_img: Tensor, k_text: Tensor) -> Tensor:
    """P of section 4: softmax over the T text keys only of q·k/√d.

    q_img [H, N, d], k_text [H, T, d] -> [H, N, T]."""
    logits = q_img.float() @ k_text.float().transpose(-1, -2) / math.sqrt(q_img.shape[-1])
    return logits.softmax(dim=-1)


def concept_share(probs: Tensor, span: slice) -> Tensor:
    """r[n] = mean over heads h and t in S of P[h, n, t]; probs [H, N, T] -> [N]."""
    heads, tokens = probs.shape[0], span.stop - span.start
    total = torch.zeros(probs.shape[1], dtype=probs.dtype, device=probs.device)
    for h in range(heads):
        for t in range(span.start, span.stop):
            total = total + probs[h, :, t]
    return total / (heads * tokens)


def gate_mask(r: Tensor) -> Tensor:
    """M[n] = r[n] / (max r + 1e-6): the IP-Adapter gate (the U-Net convention of section 1)."""
    return r / (r.max() + 1e-6)


def mean_one_mask(r: Tensor) -> Tensor:
    """Â[n] = r[n] / mean r: the in-sequence references' mask (section 2), mean 1."""
    return r / r.mean()


# ---------------------------------------------------------------------------------------------------------------
# The joint sequence and the bias table


@dataclass
class Layout:
    """One transformer call's joint sequence [encoder tokens | hidden tokens], one kind per position."""

    kinds: list[tuple[str, int]]  # ("text", t): T5 token t | ("latent", n): latent token n | ("ref", j): reference j
    grid: tuple[int, int]  # the latent tokens' (rows, cols), from img_ids

    def where(self, kind: str) -> list[int]:
        return [p for p, (k, _) in enumerate(self.kinds) if k == kind]

    @property
    def references(self) -> int:
        return len({j for k, j in self.kinds if k == "ref"})


def cell_bias(layout: Layout, row: int, col: int, spans: list[slice], c: float, masks: list[Tensor | None],
              conceptrol: bool) -> float:
    """One cell of section 2's table with the reference tokens as the condition (section 4b)."""
    (row_kind, i), (col_kind, j) = layout.kinds[row], layout.kinds[col]
    log_c = math.log(c)
    if not conceptrol:  # plain: log c on every text-or-latent -> reference and reference -> text-or-latent entry
        if col_kind == "ref" and row_kind in ("text", "latent"):
            return log_c
        if row_kind == "ref" and col_kind in ("text", "latent"):
            return log_c
        return 0.0
    if row_kind == "latent" and col_kind == "ref":  # log c + log Â[latent row]; no log Â before the first read
        return log_c + (0.0 if masks[j] is None else float(masks[j][i].double().log()))
    if row_kind == "ref" and col_kind == "latent":
        return log_c
    if row_kind == "text" and col_kind == "ref":  # concept text -> its reference log c, every other text blocked
        return log_c if spans[j].start <= i < spans[j].stop else BLOCKED
    return 0.0


def column_regions(layout: Layout) -> list[tuple[int, int]]:
    """Runs of consecutive positions whose columns are alike for cell_bias (same kind, same reference)."""
    def key(kind):
        return (kind[0], kind[1] if kind[0] == "ref" else -1)

    regions, start = [], 0
    for p in range(1, len(layout.kinds) + 1):
        if p == len(layout.kinds) or key(layout.kinds[p]) != key(layout.kinds[start]):
            regions.append((start, p))
            start = p
    return regions


def bias_table(layout: Layout, spans: list[slice], c: float, masks: list[Tensor | None], conceptrol: bool) -> Tensor:
    """The additive bias [L, L] of one sample, row by row; a cell depends on its column only through the column's
    kind (and reference), so each row is filled region by region with cell_bias's value."""
    length = len(layout.kinds)
    table = torch.zeros(length, length, dtype=torch.float64)
    regions = column_regions(layout)
    for row in range(length):
        for start, stop in regions:
            table[row, start:stop] = cell_bias(layout, row, start, spans, c, masks, conceptrol)
    return table.float()


def bias_table_cell_by_cell(layout: Layout, spans: list[slice], c: float, masks: list[Tensor | None],
                            conceptrol: bool) -> Tensor:
    """bias_table without the region shortcut (for small layouts in tests)."""
    length = len(layout.kinds)
    table = torch.zeros(length, length, dtype=torch.float64)
    for row in range(length):
        for col in range(length):
            table[row, col] = cell_bias(layout, row, col, spans, c, masks, conceptrol)
    return table.float()


def _grid(img_ids: Tensor, latent_rows: list[int]) -> tuple[int, int]:
    ids = img_ids[latent_rows]
    grid = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    if grid[0] * grid[1] != len(latent_rows):
        raise ValueError(f"latent img_ids do not form a grid: {grid} for {len(latent_rows)} tokens")
    return grid


def flux_layout(num_text: int, img_ids: Tensor) -> Layout:
    """[text | latent]: FluxPipeline (IP-Adapter), every encoder token a T5 token."""
    kinds = [("text", t) for t in range(num_text)] + [("latent", n) for n in range(img_ids.shape[0])]
    return Layout(kinds, _grid(img_ids, list(range(img_ids.shape[0]))))


def kontext_layout(num_text: int, img_ids: Tensor) -> Layout:
    """[text | latent | reference]: hidden tokens whose img_ids start with 0 are latent, the others reference tokens
    (one reference per distinct first coordinate, in order of appearance; the stock pipeline sets it to 1)."""
    kinds, firsts, n = [("text", t) for t in range(num_text)], [], 0
    for first in img_ids[:, 0].tolist():
        if first == 0:
            kinds.append(("latent", n))
            n += 1
            continue
        if first not in firsts:
            firsts.append(first)
        kinds.append(("ref", firsts.index(first)))
    latent_rows = [p for p, first in enumerate(img_ids[:, 0].tolist()) if first == 0]
    return Layout(kinds, _grid(img_ids, latent_rows))


def redux_layout(num_encoder: int, num_t5: int, ref_tokens: list[int], img_ids: Tensor) -> Layout:
    """[T5 | Redux | latent]: the encoder tokens after the T5 ones are the references' (R tokens per image); a
    pass whose encoder tokens are only T5 (a negative prompt encoded by the pipeline) has no reference."""
    extra = num_encoder - num_t5
    if extra not in (0, sum(ref_tokens)):
        raise ValueError(f"{num_encoder} encoder tokens: expected {num_t5} T5 tokens plus 0 or {sum(ref_tokens)}")
    kinds = [("text", t) for t in range(num_t5)]
    if extra:
        kinds += [("ref", j) for j, count in enumerate(ref_tokens) for _ in range(count)]
    kinds += [("latent", n) for n in range(img_ids.shape[0])]
    return Layout(kinds, _grid(img_ids, list(range(img_ids.shape[0]))))


# ---------------------------------------------------------------------------------------------------------------
# Per-call state and the processor


@dataclass
class FluxReferenceRun:
    """Settings and per-call state of the naive reference (a fresh one per driver call)."""

    mode: str  # "ip" | "kontext" | "redux"
    spans: list[list[slice]]  # per sample, per reference (IP: per adapter): the concept's 0-based T5 token span
    masking: str = "global"  # "global" | "local" (IP only) | "none"
    c: float = 1.0  # Kontext/Redux reference strength
    scale: float | None = None  # IP: the adapter scale; None = the loaded processors' own
    start: float = 0.0
    end: float = 1.0
    concept_block: str = CONCEPT_BLOCK
    reread_blocks: tuple[str, ...] = REREAD_BLOCKS
    t5_tokens: int | None = None  # Redux: the T5 tokens before the reference tokens (the driver builds them)
    ref_tokens: list[int] = field(default_factory=list)  # Redux: tokens of each reference image
    user_masks: list[Tensor | None] | None = None  # IP: per adapter, the user's mask of each sample on the grid [B, N]
    # per call
    step: int = 0
    total: int = 1
    calls_in_step: int = 0
    negative: bool = False
    layout: Layout | None = None
    current: Tensor | None = None  # [B, refs, N]: the latest read (IP: M, Kontext/Redux: Â)
    current_source: str | None = None  # "step:block" of that read
    local: dict[str, tuple[Tensor, str]] = field(default_factory=dict)  # IP local: block -> (M, source), this step
    recorded: dict[int, Tensor] = field(default_factory=dict)  # step -> [B, refs, N] read at the concept block
    trace: list[tuple] = field(default_factory=list)  # (step, pass, block, "read" | "use", source)

    @property
    def active(self) -> bool:
        """The window: the adapter acts at step k unless k/T < start or (k+1)/T > end."""
        return not (self.step / self.total < self.start or (self.step + 1) / self.total > self.end)

    @property
    def pass_name(self) -> str:
        return "negative" if self.negative else "positive"

    def log(self, block: str, event: str, source: str | None) -> None:
        self.trace.append((self.step, self.pass_name, block, event, source))


class ReferenceFluxProcessor:
    """FluxAttnProcessor / FluxIPAdapterAttnProcessor written plainly, with section 4's Conceptrol terms."""

    def __init__(self, block: str, original: Any, run: FluxReferenceRun):
        self.block, self.original, self.run = block, original, run
        self.is_double = block.startswith("transformer_blocks.")

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, image_rotary_emb=None, ip_hidden_states=None,
                 ip_adapter_masks=None):
        if attention_mask is not None or (ip_adapter_masks is not None and self.run.user_masks is None):
            raise NotImplementedError("the reference takes no attention_mask, and users' masks as user_masks=")
        q, k, v, ip_query = joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        run = self.run
        if run.mode == "ip":
            out = attention(q, k, v)
            gates = self.ip_gates(q, k)
        else:
            out = attention(q, k, v, self.sequence_bias().to(q.device))  # with the Â current before this block reads
            self.sequence_read(q, k)
        if encoder_hidden_states is None:
            return out
        text, image = out.split_with_sizes([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
        image = attn.to_out[1](attn.to_out[0](image))
        text = attn.to_add_out(text)
        if not hasattr(self.original, "to_k_ip"):
            return image, text
        return image, text, self.ip_output(attn, ip_query, ip_hidden_states, gates)

    # --- IP-Adapter (section 4a)

    def ip_gates(self, q: Tensor, k: Tensor) -> Tensor | None:
        """M [B, adapters, N] for this block's IP branch (None: no IP branch or masking off); reads where due."""
        run, block = self.run, self.block
        if run.masking == "none":
            return None
        if run.negative:  # reads none: what the positive pass of this step left
            if not self.is_double:
                return None
            gates, source = run.local[block] if run.masking == "local" else (run.current, run.current_source)
            run.log(block, "use", source)
            return gates
        if run.masking == "local":
            return self.ip_local_gates(q, k) if self.is_double else None
        if block == run.concept_block or block in run.reread_blocks:  # read and store; the concept block uses it
            run.current, run.current_source = self.read(q, k, gate_mask), self.source()
            self.record(run.current)
        if not self.is_double:
            return None
        if run.current is None:  # before the first read of the call: its own local mask
            run.log(block, "use", "local")
            return self.read(q, k, gate_mask, log=False)
        run.log(block, "use", run.current_source)
        return run.current

    def ip_local_gates(self, q: Tensor, k: Tensor) -> Tensor:
        """Local masking: this block's own M, kept for this step's negative pass."""
        gates, source = self.read(q, k, gate_mask), self.source()
        self.run.local[self.block] = (gates, source)
        self.record(gates)
        self.run.log(self.block, "use", source)
        return gates

    def ip_output(self, attn, ip_query: Tensor, ip_hidden_states: list[Tensor], gates: Tensor | None) -> Tensor:
        """Σ_a scale_a · U_a[n] · M_a[n] · softmax(q k_ip,aᵀ/√d) v_ip,a, q without the rotary embedding (as diffusers);
        U the user's mask (both passes of true CFG), M the concept mask, each 1 where not given."""
        batch, tokens = ip_query.shape[0], ip_query.shape[1]
        if len(ip_hidden_states) != len(self.run.spans[0]):
            raise ValueError(f"{len(ip_hidden_states)} IP-Adapter(s) but {len(self.run.spans[0])} span(s) per sample")
        total = torch.zeros(batch, tokens, attn.heads * attn.head_dim, dtype=ip_query.dtype, device=ip_query.device)
        for a, (states, to_k, to_v) in enumerate(zip(ip_hidden_states, self.original.to_k_ip, self.original.to_v_ip)):
            ip_key = to_k(states).view(batch, -1, attn.heads, attn.head_dim)
            ip_value = to_v(states).view(batch, -1, attn.heads, attn.head_dim)
            branch = attention(ip_query, ip_key, ip_value)  # [B, N, C]
            scale = self.ip_scale(a)
            for b in range(batch):
                gate = torch.ones(tokens, dtype=branch.dtype, device=branch.device) if gates is None else gates[b, a]
                users = self.run.user_masks
                if users is not None and users[a] is not None:
                    gate = gate * users[a][b].to(gate.device, gate.dtype)
                total[b] = total[b] + scale * (gate[:, None].to(branch.dtype) * branch[b])
        return total

    def ip_scale(self, a: int) -> float:
        run = self.run
        if not run.active:
            return 0.0
        return self.original.scale[a] if run.scale is None else run.scale

    # --- Kontext / Redux (section 4b)

    def sequence_bias(self) -> Tensor:
        """[B, L, L]: each sample's table with its own spans and the Â current now (c = 0.5 outside the window)."""
        run, layout = self.run, self.run.layout
        c = run.c if run.active else OUTSIDE_WINDOW_C
        tables = []
        for b, spans in enumerate(run.spans):
            masks = [None if run.current is None else run.current[b, j] for j in range(len(spans))]
            tables.append(bias_table(layout, spans, c, masks, conceptrol=run.masking != "none"))
        run.log(self.block, "use", run.current_source)
        return torch.stack(tables)

    def sequence_read(self, q: Tensor, k: Tensor) -> None:
        run = self.run
        if run.masking != "global" or run.negative:
            return
        if self.block == run.concept_block or self.block in run.reread_blocks:
            masks = self.read(q, k, mean_one_mask)
            run.current, run.current_source = masks, self.source()
            self.record(masks)

    # --- shared

    def source(self) -> str:
        return f"{self.run.step}:{self.block}"

    def read(self, q: Tensor, k: Tensor, normalize: Callable[[Tensor], Tensor], log: bool = True) -> Tensor:
        """The FLUX concept mask of each sample and reference from this block's q, k (after norms and rotary):
        latent query rows against the T5 text keys only -> [B, refs, N]."""
        run, layout = self.run, self.run.layout
        latent = torch.tensor(layout.where("latent"), device=q.device)
        text = torch.tensor(layout.where("text"), device=q.device)
        masks = []
        for b, spans in enumerate(run.spans):
            probs = text_share(q[b, latent].transpose(0, 1), k[b, text].transpose(0, 1))  # [H, N, T]
            masks.append(torch.stack([normalize(concept_share(probs, span)) for span in spans]))
        if log:
            run.log(self.block, "read", self.source())
        return torch.stack(masks)

    def record(self, masks: Tensor) -> None:
        if self.block == self.run.concept_block:
            self.run.recorded[self.run.step] = masks.detach().float().cpu()


def joint_qkv(attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None, rotary) -> tuple[Tensor, ...]:
    """q, k, v [B, L, H, d] as diffusers' FluxAttnProcessor builds them (q/k norms, [text | image], rotary), and the
    IP-Adapter's query (image rows after norm_q, before the rotary embedding)."""
    if getattr(attn, "fused_projections", False):
        raise NotImplementedError("the reference reads unfused projections; call unfuse_qkv_projections()")

    def heads(x: Tensor) -> Tensor:
        return x.unflatten(-1, (attn.heads, -1))  # [B, L, H, d]

    q = attn.norm_q(heads(attn.to_q(hidden_states)))
    k = attn.norm_k(heads(attn.to_k(hidden_states)))
    v = heads(attn.to_v(hidden_states))
    ip_query = q
    if encoder_hidden_states is not None:
        q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states))), q], dim=1)
        k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states))), k], dim=1)
        v = torch.cat([heads(attn.add_v_proj(encoder_hidden_states)), v], dim=1)
    if rotary is not None:
        q = apply_rotary_emb(q, rotary, sequence_dim=1)
        k = apply_rotary_emb(k, rotary, sequence_dim=1)
    return q, k, v, ip_query


# ---------------------------------------------------------------------------------------------------------------
# Drivers


@dataclass
class FluxReferenceResult:
    """What a driver returns."""

    output: Any  # the pipeline's own output (FluxPipelineOutput, or a tuple with return_dict=False)
    masks: Tensor | None  # [steps, samples, h, w]: the first reference's mask read at the concept block each step
    all_masks: Tensor | None  # [steps, samples, refs, h, w]: every reference's (None when masking is "none")
    trace: list[tuple]  # (step, "positive" | "negative", block, "read" | "use", source "step:block" | "local" | None)


def normalize_spans(spans: list) -> list[list[slice]]:
    """One entry per sample: a slice or (start, stop), or a list of them (one per reference / IP-Adapter)."""
    out = []
    for entry in spans:
        items = entry if isinstance(entry, list) else [entry]
        out.append([x if isinstance(x, slice) else slice(*x) for x in items])
    return out


def run_reference_ip(pipe, spans: list, masking: str = "global", scale: float | None = None, start: float = 0.0,
                     end: float = 1.0, concept_block: str = CONCEPT_BLOCK,
                     reread_blocks: tuple[str, ...] = REREAD_BLOCKS, user_masks: list | None = None,
                     **pipe_kwargs) -> FluxReferenceResult:
    """FluxPipeline with an XLabs IP-Adapter loaded (`pipe.load_ip_adapter`), under section 4a. `user_masks`: per
    adapter None or the user's mask of every sample already on the latent grid, [B, rows·cols] (the caller resizes)."""
    if masking not in ("global", "local", "none"):
        raise ValueError(f"masking must be global, local or none, not {masking!r}")
    if not any(hasattr(p, "to_k_ip") for p in pipe.transformer.attn_processors.values()):
        raise ValueError("no IP-Adapter on this pipeline: call pipe.load_ip_adapter(...) first")
    run = FluxReferenceRun("ip", normalize_spans(spans), masking, scale=scale, start=start, end=end,
                           concept_block=concept_block, reread_blocks=tuple(reread_blocks), user_masks=user_masks)
    return _drive(pipe, run, pipe, pipe_kwargs)


def run_reference_kontext(pipe, spans: list, c: float = 1.0, masking: str = "global", start: float = 0.0,
                          end: float = 1.0, concept_block: str = CONCEPT_BLOCK,
                          reread_blocks: tuple[str, ...] = REREAD_BLOCKS, **pipe_kwargs) -> FluxReferenceResult:
    """FluxKontextPipeline under section 4b ([text | latent | reference])."""
    run = _sequence_run("kontext", spans, c, masking, start, end, concept_block, reread_blocks)
    return _drive(pipe, run, pipe, pipe_kwargs)


def run_reference_redux(pipe, prior, spans: list, c: float = 1.0, masking: str = "global", start: float = 0.0,
                        end: float = 1.0, concept_block: str = CONCEPT_BLOCK,
                        reread_blocks: tuple[str, ...] = REREAD_BLOCKS, *, prompt: str | list[str], image,
                        prompt_2: str | list[str] | None = None, **pipe_kwargs) -> FluxReferenceResult:
    """FluxPriorReduxPipeline's embeddings built from `pipe`'s text encoders ([512 T5 | Redux tokens of each image]),
    then FluxPipeline under section 4b. `image`: one image or a list (each appended, our extension; the stock
    prior sums a list instead). A `negative_prompt` goes to the pipeline as is (its pass has no Redux tokens)."""
    run = _sequence_run("redux", spans, c, masking, start, end, concept_block, reread_blocks)
    device = pipe._execution_device
    t5, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=prompt_2, device=device, num_images_per_prompt=1,
                                       max_sequence_length=512)  # [B, 512, D]
    images = image if isinstance(image, list) else [image]
    tokens = prior.image_embedder(prior.encode_image(images, device, 1)).image_embeds.to(device)  # [refs, R, D]
    refs = [tokens[j][None].expand(t5.shape[0], -1, -1).to(t5.dtype) for j in range(len(images))]
    run.t5_tokens, run.ref_tokens = t5.shape[1], [r.shape[1] for r in refs]
    embeds = torch.cat([t5, *refs], dim=1)  # [B, 512 + refs·R, D]
    return _drive(pipe, run, pipe, {**pipe_kwargs, "prompt_embeds": embeds, "pooled_prompt_embeds": pooled})


def _sequence_run(mode, spans, c, masking, start, end, concept_block, reread_blocks) -> FluxReferenceRun:
    if masking not in ("global", "none"):
        raise ValueError(f"masking must be global or none for {mode}, not {masking!r}")
    if not c > 0:
        raise ValueError(f"c must be positive, not {c}")
    return FluxReferenceRun(mode, normalize_spans(spans), masking, c=c, start=start, end=end,
                            concept_block=concept_block, reread_blocks=tuple(reread_blocks))


def _layout(run: FluxReferenceRun, encoder: Tensor, img_ids: Tensor) -> Layout:
    img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    if run.mode == "ip":
        return flux_layout(encoder.shape[1], img_ids)
    if run.mode == "kontext":
        return kontext_layout(encoder.shape[1], img_ids)
    return redux_layout(encoder.shape[1], run.t5_tokens, run.ref_tokens, img_ids)


def _check_call(run: FluxReferenceRun, batch: int) -> None:
    layout = run.layout
    if len(run.spans) != batch:
        raise ValueError(f"{len(run.spans)} span entries for a batch of {batch} samples")
    t5 = len(layout.where("text"))
    for spans in run.spans:
        for span in spans:
            if not 0 <= span.start < span.stop <= t5:
                raise ValueError(f"span {span} outside the {t5} T5 tokens")
        if run.mode != "ip" and layout.references and len(spans) != layout.references:
            raise ValueError(f"{layout.references} reference(s) in the sequence but {len(spans)} span(s) per sample")


def _drive(pipe, run: FluxReferenceRun, call: Callable, pipe_kwargs: dict) -> FluxReferenceResult:
    """Call the pipeline with the reference processors on every attention; restore the originals after."""
    saved = dict(pipe.transformer.attn_processors)
    for key, proc in saved.items():
        if run.mode != "ip" and hasattr(proc, "to_k_ip"):
            raise ValueError("the Kontext/Redux reference runs without an IP-Adapter; unload it first")
    installed = {key: ReferenceFluxProcessor(key.removesuffix(".attn.processor"), proc, run)
                 for key, proc in saved.items()}
    kwargs = dict(pipe_kwargs)
    user_callback = kwargs.pop("callback_on_step_end", None)
    if isinstance(user_callback, (PipelineCallback, MultiPipelineCallbacks)):
        kwargs["callback_on_step_end_tensor_inputs"] = user_callback.tensor_inputs

    def on_step_end(p, i, t, callback_kwargs):
        out = user_callback(p, i, t, callback_kwargs) if user_callback is not None else {}
        run.step, run.calls_in_step = i + 1, 0
        return out

    def pre_hook(module, args, kw):
        if args:
            raise RuntimeError("the reference expects the pipeline to call the transformer with keywords")
        if run.calls_in_step > 1:
            raise RuntimeError("more than two transformer calls in one step")
        run.negative = run.calls_in_step == 1  # FluxPipeline: positive pass first, then the negative one
        run.calls_in_step += 1
        run.total = pipe._num_timesteps
        run.layout = _layout(run, kw["encoder_hidden_states"], kw["img_ids"])
        _check_call(run, kw["hidden_states"].shape[0])

    hook = pipe.transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    pipe.transformer.set_attn_processor(dict(installed))
    try:
        output = call(callback_on_step_end=on_step_end, **kwargs)
    finally:
        hook.remove()
        pipe.transformer.set_attn_processor(dict(saved))
    return _result(run, output)


def _result(run: FluxReferenceRun, output) -> FluxReferenceResult:
    if not run.recorded:
        return FluxReferenceResult(output, None, None, run.trace)
    h, w = run.layout.grid
    stacked = torch.stack([run.recorded[s] for s in sorted(run.recorded)])  # [steps, B, refs, N]
    all_masks = stacked.unflatten(-1, (h, w))  # [steps, B, refs, h, w]
    return FluxReferenceResult(output, all_masks[:, :, 0], all_masks, run.trace)
