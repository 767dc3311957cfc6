"""Step caching in the continuous engine: each sample keeps its own cache state.

The methods are `step_cache.py`'s (DeepCache for UNets, first-block cache for SD 3.x and FLUX.1),
with the same schedules and thresholds, so a sample's image matches the request-level engine's
cached image for its seed. What differs: there, one pipeline call owns one cache state; here the
samples of one denoiser call are at different steps, at different levels or uncached, so the state
lives in each `_Sample` (a `SampleCache`, dropped when the sample finishes or leaves) and the
decision "compute this step in full or reuse" is made per sample at every step.

- UNets (`unet.UNetDenoiser.predict_cached`): the samples due a full step (or uncached) run the
  whole UNet as one sub-batch, which also hands each cached sample its new deep features; the others
  run DeepCache's shallow path as a second sub-batch, fed their own cached features. Two calls
  rather than one spliced forward: the FLOPs are the same (the shallow layers run once per sample
  either way), the full step stays diffusers' own forward, and the shallow one is the very
  `shallow_forward` the request-level engine runs. The price is a second, smaller call in the
  iterations that mix both kinds: on the embedded model (2 shared CPU cores) 8 full + 8 shallow
  rows as two calls cost 11-40% more CPU than at a 16-row call's per-row rate (cache_bench
  --continuous-only; docs/performance.md). A spliced forward would win back the shallow layers'
  share of that (the deep layers run on the full rows alone either way), at the cost of a second
  copy of the UNet's forward between its first down block and last up block to keep in step with
  diffusers; worth doing if a GPU measurement shows mixed iterations matter.
- Transformers (`first_block_splice`): one forward; after the first block each sample's residual
  decides for that sample, and the other blocks run only on the rows of the samples that compute,
  the others get the residual those blocks added on their last full step.

State changes are collected during a denoiser call and applied only once it succeeded, so a call
that fails (and is retried, split or with a smaller batch) leaves every sample's cache as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

# step_cache's own forward swapping (put back after the call, offloading hooks kept)
from inference_server.step_cache import _patched, transformer_reuses


@dataclass(eq=False)
class Stream:
    """First-block-cache state of one stream of rows (a sample, or one conditioning of it)."""

    head_residual: torch.Tensor | None = None  # the first block's residual on the last full step
    # what the other blocks added on that step: (hidden, encoder or None)
    tail_residual: tuple[torch.Tensor, torch.Tensor | None] | None = None


@dataclass(eq=False)
class SampleCache:
    """One sample's step-cache state: its level, the steps its schedule counts, what it keeps."""

    level: str
    # The denoising steps the schedule counts, as the request-level runner passes `step_cache`
    # (`int(steps * strength)`), so both engines warm up for the same number of steps.
    steps: int
    # UNet: the last up block's input (this sample's rows) on its last full step
    deep: torch.Tensor | None = None
    streams: list[Stream] = field(default_factory=list)  # transformers
    full_steps: int = 0
    reused_steps: int = 0

    def stream(self, index: int) -> Stream:
        while len(self.streams) <= index:
            self.streams.append(Stream())
        return self.streams[index]


@dataclass(eq=False)
class Unit:
    """Rows of one denoiser call that share one cache decision; `stream` None = never reuse."""

    rows: slice
    level: str
    stream: Stream | None
    cache: SampleCache | None


@contextlib.contextmanager
def first_block_splice(transformer: Any, units: list[Unit]) -> Iterator[Callable[[], None]]:
    """Within the block, one call of `transformer` caches per unit (see the module docstring);
    yields `commit`, to call once the denoiser call succeeded.

    Every block of SD 3 and FLUX.1 is called with keyword arguments (hidden_states,
    encoder_hidden_states, temb, ...) and returns `(encoder_hidden_states, hidden_states)`; only
    those three are per row (FLUX's rotary embedding is per token), so the blocks after the first
    run on a subset of rows when given the subset of those.
    """
    pending: list[Callable[[], None]] = []
    blocks = [*transformer.transformer_blocks, *getattr(transformer, "single_transformer_blocks", [])]
    if len(blocks) < 2 or all(u.stream is None for u in units):  # nothing to skip, or nobody caches
        yield lambda: None
        return
    head, middle, tail = blocks[0], blocks[1:-1], blocks[-1]
    original_head = head.forward
    call: dict[str, Any] = {}

    def commit() -> None:
        for apply in pending:
            apply()

    def head_forward(**kwargs: Any) -> Any:
        encoder, hidden = original_head(**kwargs)
        residual = hidden - kwargs["hidden_states"]
        computed: list[Unit] = []
        reused: list[Unit] = []
        for u in units:
            s = u.stream
            reuse = (
                s is not None
                and s.head_residual is not None
                and s.tail_residual is not None
                and transformer_reuses(u.level, residual[u.rows], s.head_residual)
            )
            (reused if reuse else computed).append(u)
        for u in computed:
            if u.stream is not None:
                pending.append(_setter(u.stream, "head_residual", residual[u.rows].clone()))
        # A sample's step counts as full when any of its rows computed.
        full = {id(u.cache): u.cache for u in computed if u.cache is not None}
        samples = {id(u.cache): u.cache for u in units if u.cache is not None}
        pending.extend(_count(c, full=key in full) for key, c in samples.items())
        call.update(computed=computed, all_reused=not computed)
        if not reused:  # the whole call computes: the blocks see every row
            call.update(keep=None, head=(encoder, hidden), sub_rows=[u.rows for u in computed])
            return encoder, hidden
        out_hidden = hidden.clone()
        out_encoder = encoder.clone() if encoder is not None else None
        for u in reused:
            assert u.stream is not None and u.stream.tail_residual is not None
            hidden_rest, encoder_rest = u.stream.tail_residual
            out_hidden[u.rows] += hidden_rest
            if out_encoder is not None and encoder_rest is not None:
                out_encoder[u.rows] += encoder_rest
        if not computed:
            return out_encoder, out_hidden
        keep = torch.cat([torch.arange(u.rows.start, u.rows.stop) for u in computed]).to(hidden.device)
        sub_rows, start = [], 0
        for u in computed:
            n = u.rows.stop - u.rows.start
            sub_rows.append(slice(start, start + n))
            start += n
        sub_encoder = encoder[keep] if encoder is not None else None
        sub_hidden = hidden[keep]
        call.update(
            keep=keep, out=(out_encoder, out_hidden), head=(sub_encoder, sub_hidden), sub_rows=sub_rows
        )
        return sub_encoder, sub_hidden

    def wrap(block: Any, is_tail: bool) -> Any:
        original = block.forward

        def forward(**kwargs: Any) -> Any:
            if call["all_reused"]:
                return kwargs.get("encoder_hidden_states"), kwargs["hidden_states"]
            keep = call["keep"]
            if keep is not None:
                kwargs["temb"] = kwargs["temb"][keep]  # the model's forward passes every row's
            encoder, hidden = original(**kwargs)
            if not is_tail:
                return encoder, hidden
            head_encoder, head_hidden = call["head"]
            for u, rows in zip(call["computed"], call["sub_rows"], strict=True):
                if u.stream is None:
                    continue
                encoder_rest = (
                    None if encoder is None or head_encoder is None else encoder[rows] - head_encoder[rows]
                )
                pending.append(
                    _setter(u.stream, "tail_residual", (hidden[rows] - head_hidden[rows], encoder_rest))
                )
            if keep is None:
                return encoder, hidden
            out_encoder, out_hidden = call["out"]
            out_hidden[keep] = hidden
            if encoder is None:  # SD 3's last block returns no text stream; nobody reads it
                return None, out_hidden
            assert out_encoder is not None
            out_encoder[keep] = encoder
            return out_encoder, out_hidden

        return forward

    patches = {head: head_forward, tail: wrap(tail, is_tail=True)}
    patches |= {block: wrap(block, is_tail=False) for block in middle}
    with _patched(patches):
        yield commit


def _setter(target: Any, name: str, value: Any) -> Callable[[], None]:
    return lambda: setattr(target, name, value)


def _count(cache: SampleCache, *, full: bool) -> Callable[[], None]:
    def apply() -> None:
        if full:
            cache.full_steps += 1
        else:
            cache.reused_steps += 1

    return apply
