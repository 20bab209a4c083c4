"""A local transformers causal LM as a search backend: one prefill per prompt, a forked KV cache.

Every row of a step shares the prompt's cache entries (forking indexes the batch dimension; nothing
is re-encoded), all rollouts of a step advance together in one batched forward per token, and a
commit keeps the rollout's own cache, cropped to the committed tokens, so the next step starts
without recomputation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from transformers import DynamicCache

from transformers.cache_utils import DynamicLayer

from .base import Backend, Beam, Counters, Prefill, Rollout, RolloutCall, Sampler, eos_ids_of
from .prefix_cache import PrefixCache

# a cached prefix shorter than this is not worth a forward of its own next to the padded batch
MIN_PREFIX = 8


def fork_cache(cache: DynamicCache, index: torch.Tensor) -> DynamicCache:
    """A new cache made of the rows ``index`` (repeats allowed) of ``cache``, which stays intact."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    new.batch_select_indices(index)
    return new


class _Cache:
    """A beam's keys/values: rows ``index`` and columns ``start:end`` of ``base``, read lazily, and,
    when its rows hold prompts of different lengths, each row's left padding (``None`` when no row is
    padded: the plain causal path, bit for bit as before).

    Why lazy: a commit picks a few rows of a rollout's cache and the next rollout (or, batched, the
    merge of several searches' beams) copies rows again; with the pick recorded instead of copied,
    each step copies every row once (``kv`` or ``merge_caches``), not twice."""

    def __init__(self, base: DynamicCache, pads: torch.Tensor | None = None, index: torch.Tensor | None = None,
                 start: int = 0, end: int | None = None) -> None:
        self.base, self.pads, self.index, self.start = base, pads, index, start
        self.end = base.get_seq_length() if end is None else end
        self._kv: DynamicCache | None = base if index is None and start == 0 and end is None else None

    @property
    def kv(self) -> DynamicCache:
        """The cache itself (the rows and columns copied out of ``base`` at the first use)."""
        if self._kv is None:
            index = self.index if self.index is not None else torch.arange(self.base_rows, device=_device(self.base))
            kv = fork_cache(self.base, index)
            if self.end < self.base.get_seq_length():
                kv.crop(self.end - self.base.get_seq_length())
            if self.start:
                for layer in kv.layers:
                    layer.keys, layer.values = layer.keys[:, :, self.start:], layer.values[:, :, self.start:]
            self._kv = kv
        return self._kv

    @property
    def base_rows(self) -> int:
        return self.base.layers[0].keys.shape[0]

    @property
    def width(self) -> int:
        return self.end - self.start

    def select(self, index: torch.Tensor) -> "_Cache":
        """The rows ``index`` (repeats allowed), not copied yet; columns that every chosen row pads are
        dropped, so a row that leaves a batch of longer prompts is back on the plain path."""
        base, rows, start, end = self._source(index)
        return _Cache(base, None, rows, start, end).with_pads(self.pads, index)

    def _source(self, index: torch.Tensor | None = None) -> tuple[DynamicCache, torch.Tensor | None, int, int]:
        """Where rows ``index`` of this cache (all of them for None) live: ``(cache, its rows, first
        column, end column)`` -- the copy once ``kv`` made one, else ``base``."""
        if self._kv is not None and self._kv is not self.base:  # already copied out: index the copy
            return self._kv, index, 0, self._kv.get_seq_length()
        if index is not None and self.index is not None:
            index = self.index[index]
        elif index is None:
            index = self.index
        return self.base, index, self.start, self.end

    def with_pads(self, pads: torch.Tensor | None, index: torch.Tensor) -> "_Cache":
        if pads is None:
            return self
        pads = pads[index.cpu()]
        cut = int(pads.min())
        if cut and _mergeable(self.base):
            self.start += cut
            pads = pads - cut
        self.pads = pads if bool(pads.any()) else None
        return self

    def cropped(self, drop: int) -> "_Cache":
        """The same rows without their last ``drop`` columns (not copied)."""
        if drop <= 0:
            return self
        base, rows, start, end = self._source()
        return _Cache(base, self.pads, rows, start, end - drop)

    @property
    def rows(self) -> int:
        return len(self.index) if self.index is not None else self.base_rows


def _device(kv: DynamicCache) -> torch.device:
    return kv.layers[0].keys.device


def _mergeable(kv: DynamicCache) -> bool:
    """Whether the cache's rows can be padded and stacked with another's: plain growing layers only
    (a sliding-window or quantised layer keeps state that padding would shift)."""
    return all(type(layer) is DynamicLayer and layer.is_initialized for layer in kv.layers)


def merge_caches(caches: Sequence[_Cache], index: Sequence[torch.Tensor]) -> _Cache:
    """One cache holding rows ``index[i]`` of ``caches[i]``, in order: each narrower one left-padded
    with masked columns to the widest, its pads raised by as many, so every row still attends to
    (and is positioned by) exactly its own tokens.  Each row is copied once, into place, straight
    from the cache it lives in (a lazy ``_Cache``'s base)."""
    widths = [c.width for c in caches]
    width = max(widths)
    rows = [len(i) for i in index]
    first = caches[0].base
    kv = copy.copy(first)
    kv.layers = [copy.copy(layer) for layer in first.layers]
    sources = [c._source(idx) for c, idx in zip(caches, index)]
    for n, layer in enumerate(kv.layers):
        for name in ("keys", "values"):
            like = getattr(first.layers[n], name)
            out = like.new_zeros((sum(rows), like.shape[1], width, like.shape[3]))
            lo = 0
            for (base, idx, start, end), w, r in zip(sources, widths, rows):
                src = getattr(base.layers[n], name)
                if start == 0 and end == src.shape[2] and w == width:
                    torch.index_select(src, 0, idx, out=out[lo:lo + r])
                else:
                    out[lo:lo + r, :, width - w:] = src[:, :, start:end].index_select(0, idx)
                lo += r
            setattr(layer, name, out)
    pads = torch.cat([(c.pads[idx.cpu()] if c.pads is not None else torch.zeros(len(idx), dtype=torch.long)) + (width - w)
                      for c, idx, w in zip(caches, index, widths)])
    return _Cache(kv, pads if bool(pads.any()) else None)


@dataclass
class _RolloutState:
    cache: _Cache
    base_ids: list[list[int]]
    position_logprobs: list[torch.Tensor]  # [rows, vocab] after each fed token
    offset: int = 0  # where this rollout's rows start in ``cache`` (a rollout of a group shares it)
    fed: int = 0  # tokens the group fed to ``cache`` (>= this rollout's n_fed when a longer call rode with it)


@dataclass
class _Picker:
    """Who chooses the generated tokens of rows ``lo:hi`` (``llo:lhi`` among the rows that choose
    their own, see ``_leaders``): one search's sampler, so each keeps its own random stream."""

    sampler: Sampler
    lo: int
    hi: int
    llo: int
    lhi: int
    steps: int = 0  # tokens this call generates
    feed_last: bool = False  # whether its last generated token is fed too
    fed: int = 0  # tokens fed to its rows when it stopped (its rollout's n_fed)


class HFBackend(Backend):
    """Drives a ``transformers`` causal LM (any ``AutoModelForCausalLM``) and its tokenizer."""

    stacks_rows = True

    def __init__(self, model: Any, tokenizer: Any, *, name: str = "model", prefix_cache_mb: float = 0.0) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = next(model.parameters()).device
        self.vocab_size = int(model.config.vocab_size) if hasattr(model.config, "vocab_size") else None
        self.eos_ids = frozenset(_eos_ids(model, tokenizer))
        if not self.eos_ids:
            raise ValueError(
                f"model {name!r} has no end-of-sequence token (neither its generation config nor its tokenizer "
                "names one); set tokenizer.eos_token before using it"
            )
        self.counters = Counters()
        self._pad = min(self.eos_ids)
        # what one forward pass costs beyond its rows, in rows: a CPU pays per row early (one cached
        # SmolLM2 step: 39 ms at 1 row, 96 at 32), an accelerator hardly at all into the hundreds
        self.pass_cost_rows = 24.0 if self.device.type == "cpu" else 512.0
        # recent prompts' caches (``prefix_cache.py``), None when off: off by default, since a prompt
        # read from a cached prefix may differ from a fresh read by float noise, and a library call's
        # answer must not depend on what the process read before; the server turns it on
        # (``with_prefix_cache``).  Unused for caches that cannot be cropped and stacked
        # (sliding-window, quantised layers), found at the first prefill.
        self.prefixes: PrefixCache | None = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb else None
        self._plain_cache: bool | None = None

    def with_prefix_cache(self, mb: float) -> "HFBackend":
        """This backend (same model, counters of its own) keeping up to ``mb`` MiB of recent prompts'
        caches, so a prompt that opens like one read before feeds only its rest."""
        other = self.with_own_counters()
        other.prefixes = PrefixCache(int(mb * 2**20)) if mb else None
        return other

    # model access --------------------------------------------------------------------------------
    def _forward(self, tokens: torch.Tensor, cache: _Cache | None, pads: torch.Tensor | None = None) -> tuple[torch.Tensor, _Cache]:
        """Feed ``tokens`` ``[rows, width]``; returns log-probs ``[rows, width, vocab]`` and the cache.

        Rows with left padding (``pads``, or the cache's) get an attention mask that hides the pad
        positions and position ids that start at their first real token, so a padded row computes
        what it would alone."""
        rows, width = tokens.shape
        self.counters.add(rows, width)
        kv = cache.kv if cache is not None else DynamicCache(config=self.model.config)
        pads = cache.pads if cache is not None else pads
        kwargs = {}
        if pads is not None:
            past = kv.get_seq_length()
            cols = torch.arange(past + width)
            kwargs["attention_mask"] = (cols[None, :] >= pads[:, None]).long().to(self.device)
            kwargs["position_ids"] = (cols[None, past:] - pads[:, None]).clamp(min=0).to(self.device)
        out = self.model(input_ids=tokens.to(self.device), cache=kv, use_cache=True, **kwargs)
        # the search's bookkeeping lives on the CPU; [rows, width, vocab] is small next to a forward
        logprobs = torch.log_softmax(out.logits.float(), dim=-1).cpu()
        kv = out.cache if getattr(out, "cache", None) is not None else kv
        return logprobs, _Cache(kv, pads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def supports_constraints(self) -> bool:
        return True

    # Backend -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: Sequence[int]) -> Beam:
        if len(ids) == 0:
            raise ValueError("the prompt encodes to no tokens; give a non-empty prompt")
        return self._prefill_rows([list(ids)])

    @torch.inference_mode()
    def prefill_many(self, prompts: Sequence[Sequence[int]]) -> Beam:
        if not prompts or any(len(ids) == 0 for ids in prompts):
            raise ValueError("every prompt must encode to at least one token")
        return self._prefill_rows([list(ids) for ids in prompts])

    def _prefill_padded(self, prompts: list[list[int]]) -> Beam:
        """One forward over ``prompts``, shorter ones left-padded and masked."""
        width = max(len(ids) for ids in prompts)
        pads = torch.tensor([width - len(ids) for ids in prompts], dtype=torch.long)
        tokens = torch.tensor([[self._pad] * (width - len(ids)) + list(ids) for ids in prompts], dtype=torch.long)
        logprobs, cache = self._forward(tokens, None, pads if bool(pads.any()) else None)
        if self._plain_cache is None:
            self._plain_cache = _mergeable(cache.kv)
        return Beam(ids=[list(ids) for ids in prompts], next_logprobs=logprobs[:, -1], state=cache)

    def _prefill_rows(self, prompts: list[list[int]]) -> Beam:
        """A beam whose row i has read ``prompts[i]``: a prompt seen before is its cached cache, one
        that starts like a cached one (``MIN_PREFIX`` tokens or more) feeds only its rest, and the
        others share one padded forward.  Each new prompt's cache is kept for later."""
        if self.prefixes is None or self._plain_cache is False:
            return self._prefill_padded(prompts)
        rows: list[tuple[_Cache, torch.Tensor] | None] = [None] * len(prompts)
        misses = []
        for i, ids in enumerate(prompts):
            entry, common = self.prefixes.longest(ids)
            if entry is not None and common == len(ids) == len(entry.ids):
                rows[i] = (entry.cache, entry.next_logprobs)
            elif entry is not None and common >= MIN_PREFIX:
                common = min(common, len(ids) - 1)  # feed one token at least: its log-probs are the beam's
                cache = entry.cache.select(torch.zeros(1, dtype=torch.long, device=self.device))
                cache = cache.cropped(len(entry.ids) - common)
                logprobs, cache = self._forward(torch.tensor([ids[common:]], dtype=torch.long), cache)
                rows[i] = (cache, logprobs[:, -1])
                self._keep(ids, *rows[i])
            else:
                misses.append(i)
                continue
            self.prefixes.hits += 1
            self.prefixes.tokens_saved += common
        if misses:
            beam = self._prefill_padded([prompts[i] for i in misses])
            if not self._plain_cache:
                return self._prefill_padded(prompts) if len(misses) < len(prompts) else beam
            if len(prompts) == 1:
                self._keep(prompts[0], beam.state, beam.next_logprobs)
                self.prefixes.misses += 1
                return beam
            for j, i in enumerate(misses):
                row = beam.state.select(torch.tensor([j], device=self.device)) if len(misses) > 1 else beam.state
                rows[i] = (row, beam.next_logprobs[j:j + 1])
                self._keep(prompts[i], *rows[i])
            self.prefixes.misses += len(misses)
        caches = [c for c, _ in rows]  # type: ignore[misc]
        next_lp = torch.cat([lp for _, lp in rows])  # type: ignore[misc]
        if len(prompts) == 1:
            return Beam(ids=[list(prompts[0])], next_logprobs=next_lp, state=caches[0])
        zero = torch.zeros(1, dtype=torch.long, device=self.device)
        return Beam(ids=[list(ids) for ids in prompts], next_logprobs=next_lp,
                    state=merge_caches(caches, [zero] * len(caches)))

    def _keep(self, ids: list[int], cache: _Cache, next_logprobs: torch.Tensor) -> None:
        compact = _Cache(cache.kv, cache.pads)  # its own rows only, not the batch it was read with
        nbytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in compact.kv.layers)
        self.prefixes.add(ids, compact, next_logprobs, nbytes)

    @torch.inference_mode()
    def rollout(
        self,
        beam: Beam,
        parents: Sequence[int],
        forced: torch.Tensor,
        steps: int,
        *,
        sampler: Sampler | None = None,
        feed_last: bool = False,
        follow: Sequence[int] | None = None,
    ) -> Rollout:
        return self.rollout_group([RolloutCall(beam, list(parents), forced, steps, sampler, feed_last, follow)])[0]

    @torch.inference_mode()
    def rollout_group(self, calls: Sequence[RolloutCall]) -> list[Rollout]:
        """Several rollouts (of different beams, e.g. different prompts' searches) in one set of
        forward passes: their rows are stacked, ragged widths left-padded and masked (``merge_caches``),
        each call's generated tokens chosen by its own sampler.  The calls force as many tokens
        (``Lockstep`` groups them so) but may generate different numbers of steps, with or without
        feeding the last: a call that is through rides along in the later passes (its rows fed a pad
        that its commit crops away), so the group costs the longest call's passes, not their sum."""
        first = calls[0]
        n_forced = first.forced.shape[1]
        if any(c.forced.shape[1] != n_forced for c in calls):
            raise ValueError("a rollout group needs the same forced width in every call")
        parts = split_by_passes([(_passes(c), len(c.parents)) for c in calls], self.pass_cost_rows)
        if len(parts) > 1:
            out: list[Rollout | None] = [None] * len(calls)
            for part in parts:
                for i, ro in zip(part, self.rollout_group([calls[i] for i in part])):
                    out[i] = ro
            return out  # type: ignore[return-value]
        parents = [torch.as_tensor(c.parents, dtype=torch.long) for c in calls]
        index = [p.to(self.device) for p in parents]
        if len(calls) == 1:
            cache = first.beam.state.select(index[0])
        elif all(_mergeable(c.beam.state.base) for c in calls):
            cache = merge_caches([c.beam.state for c in calls], index)
        else:  # e.g. sliding-window layers: one at a time
            return [self.rollout_group([c])[0] for c in calls]
        pickers, follow, lo, llo = [], [], 0, 0
        for c in calls:
            rows = len(c.parents)
            own = list(c.follow) if c.follow is not None else list(range(rows))
            leaders = len(set(own))
            follow += [lo + f for f in own]
            pickers.append(_Picker(c.sampler or Sampler(), lo, lo + rows, llo, llo + leaders, c.steps, c.feed_last))
            lo, llo = lo + rows, llo + leaders
        any_follow = any(c.follow is not None for c in calls)
        parent_lp = torch.cat([c.beam.next_logprobs[p] for c, p in zip(calls, parents)])
        forced = torch.cat([c.forced for c in calls])
        cons = _forked_constraints(calls)
        tokens, lp, length, done, fed, cache, positions = self._roll(cache, parent_lp, forced, pickers,
                                                                     follow if any_follow else None, cons)
        return [Rollout(parents=list(c.parents), tokens=tokens[p.lo:p.hi, :n_forced + c.steps],
                        logprobs=lp[p.lo:p.hi, :n_forced + c.steps], length=length[p.lo:p.hi],
                        finished=done[p.lo:p.hi], n_fed=p.fed,
                        state=_RolloutState(cache, [c.beam.ids[q] for q in c.parents],
                                            [pos[p.lo:p.hi] for pos in positions[:p.fed]], offset=p.lo, fed=fed),
                        constraint=cons.slice(p.lo, p.hi) if cons is not None else None)
                for c, p in zip(calls, pickers)]

    def _roll(self, cache: _Cache, parent_lp: torch.Tensor, forced: torch.Tensor, pickers: Sequence[_Picker],
              follow: Sequence[int] | None, cons: Any = None):
        """Feed ``forced`` to the rows of ``cache``, then generate each picker's ``steps`` tokens per
        row, one batched forward per token.  A picker stops where it would alone (its rows all ended,
        or its last step, fed only with ``feed_last``) and then draws nothing more, so its random
        stream and its ``fed`` count are the ones it has alone; its rows get pad tokens after.
        ``cons`` (the rows' constraint states, see ``Beam.constraint``) takes every token a row takes
        and masks every distribution the rows store or draw from."""
        rows, n_forced = forced.shape
        steps = max(p.steps for p in pickers)
        lead, copy_of = _leaders(follow, rows)
        tokens = forced.clone()
        lp = torch.empty(rows, n_forced)
        lp[:, 0] = parent_lp.gather(1, forced[:, :1]).squeeze(1)
        logprobs, cache = self._forward(forced, cache)
        positions = [logprobs[:, j] for j in range(n_forced)]
        done = torch.zeros(rows, dtype=torch.bool)
        length = torch.tensor([n_forced + p.steps for p in pickers for _ in range(p.lo, p.hi)], dtype=torch.long)
        for j in range(n_forced):  # forced tokens may already end a row
            if cons is not None:
                cons.advance(forced[:, j], ~done)
            hit = _is_eos(forced[:, j], self.eos_ids) & ~done
            length[hit] = j + 1
            done |= hit
            if cons is not None:
                positions[j] = cons.mask(positions[j], ~done)
        if n_forced > 1:  # each forced token's log-prob under its (masked) position
            before = logprobs[:, :-1] if cons is None else torch.stack(positions[:-1], 1)
            lp[:, 1:] = before.gather(2, forced[:, 1:, None]).squeeze(2)
        active = []
        for p in pickers:
            p.fed = n_forced
            if p.steps > 0 and not bool(done[p.lo:p.hi].all()):
                active.append(p)

        gen_tok, gen_lp = [], []
        cur = positions[-1]
        fed = n_forced
        for s in range(steps):
            if not active:
                break
            src = cur if lead is None else cur[lead]
            tok = torch.full((len(src),), self._pad, dtype=torch.long)
            for p in active:
                tok[p.llo:p.lhi] = p.sampler.pick(src[p.llo:p.lhi])
            if copy_of is not None:
                tok = tok[copy_of]
            tok_lp = cur.gather(1, tok[:, None]).squeeze(1)
            through = done.clone()  # rows that take no token this step: ended, or their picker is through
            for p in pickers:
                if p not in active:
                    through[p.lo:p.hi] = True
            tok = torch.where(through, torch.full_like(tok, self._pad), tok)
            tok_lp = torch.where(through, torch.zeros_like(tok_lp), tok_lp)
            gen_tok.append(tok)
            gen_lp.append(tok_lp)
            if cons is not None:
                cons.advance(tok, ~through)
            hit = _is_eos(tok, self.eos_ids) & ~through
            length[hit] = n_forced + s + 1
            done |= hit
            active = [p for p in active
                      if not bool(done[p.lo:p.hi].all()) and (s < p.steps - 1 or (s == p.steps - 1 and p.feed_last))]
            if not active:
                break
            logprobs, cache = self._forward(tok[:, None], cache)
            cur = logprobs[:, -1]
            if cons is not None:
                cur = cons.mask(cur, ~(through | done))
            positions.append(cur)
            fed += 1
            for p in active:
                p.fed = fed
            active = [p for p in active if s < p.steps - 1]
        pad = steps - len(gen_tok)
        if gen_tok or pad:
            gen = torch.stack(gen_tok, 1) if gen_tok else torch.empty(rows, 0, dtype=torch.long)
            glp = torch.stack(gen_lp, 1) if gen_lp else torch.empty(rows, 0)
            tokens = torch.cat([tokens, gen, torch.full((rows, pad), self._pad, dtype=torch.long)], 1)
            lp = torch.cat([lp, glp, torch.zeros(rows, pad)], 1)
        return tokens, lp, length.tolist(), done.tolist(), fed, cache, positions

    @torch.inference_mode()
    def prefill_group(self, calls: Sequence[Prefill]) -> list[Beam]:
        """Several searches' prefills in one forward: every prompt a row (a cached one read from the
        prefix cache), split back into one beam per call (each row's padding dropped again by
        ``_Cache.select``)."""
        if len(calls) == 1:
            c = calls[0]
            return [self.prefill_many(c.prompts) if c.many else self.prefill(c.prompts[0])]
        beam = self._prefill_rows([list(ids) for c in calls for ids in c.prompts])
        out, lo = [], 0
        for c in calls:
            index = torch.arange(lo, lo + len(c.prompts))
            out.append(Beam(ids=[list(ids) for ids in c.prompts], next_logprobs=beam.next_logprobs[index],
                            state=beam.state.select(index.to(self.device))))
            lo += len(c.prompts)
        return out

    @torch.inference_mode()
    def commit(self, rollout: Rollout, rows: Sequence[int], keep: int) -> Beam:
        st: _RolloutState = rollout.state
        if not 1 <= keep <= rollout.n_fed:
            raise ValueError(f"cannot keep {keep} tokens of a rollout that fed {rollout.n_fed}")
        index = torch.as_tensor(list(rows), dtype=torch.long)
        fed = max(st.fed, rollout.n_fed)
        cache = st.cache.select((index + st.offset).to(self.device)).cropped(fed - keep)
        ids = [st.base_ids[r] + rollout.tokens[r, :keep].tolist() for r in rows]
        return Beam(ids=ids, next_logprobs=st.position_logprobs[keep - 1][index], state=cache,
                    constraint=rollout.constraint.commit(rows, keep) if rollout.constraint is not None else None)


    def peek(self, rollout: Rollout, rows: Sequence[int], keep: int) -> torch.Tensor:
        if not 1 <= keep <= rollout.n_fed:
            raise ValueError(f"cannot keep {keep} tokens of a rollout that fed {rollout.n_fed}")
        return rollout.state.position_logprobs[keep - 1][torch.as_tensor(list(rows), dtype=torch.long)]


class NaiveHFBackend(HFBackend):
    """The correctness oracle: no cache, the full sequence re-encoded for every token of every row,
    rows one at a time.  Same contract and (up to float noise) the same numbers as ``HFBackend``;
    kept for tests and the benchmark, not offered to users."""

    stacks_rows = False
    rollout_group = Backend.rollout_group  # the oracle runs every call on its own
    prefill_group = Backend.prefill_group

    @property
    def supports_constraints(self) -> bool:
        return False

    def _next(self, ids: list[int]) -> torch.Tensor:
        logprobs, _ = self._forward(torch.tensor([ids], dtype=torch.long), None)
        return logprobs[0, -1].clone()  # not a view: it would keep the whole [len, vocab] tensor alive

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int]) -> Beam:
        if len(ids) == 0:
            raise ValueError("the prompt encodes to no tokens; give a non-empty prompt")
        return Beam(ids=[list(ids)], next_logprobs=self._next(list(ids))[None], state=None)

    @torch.inference_mode()
    def prefill_many(self, prompts: Sequence[Sequence[int]]) -> Beam:
        if not prompts or any(len(ids) == 0 for ids in prompts):
            raise ValueError("every prompt must encode to at least one token")
        return Beam(ids=[list(ids) for ids in prompts], next_logprobs=torch.stack([self._next(list(ids)) for ids in prompts]), state=None)

    @torch.inference_mode()
    def rollout(self, beam, parents, forced, steps, *, sampler=None, feed_last=False, follow=None) -> Rollout:
        sampler = sampler or Sampler()
        rows, n_forced = forced.shape
        _leaders(follow, rows)  # checks it
        order = sorted(range(rows), key=lambda r: follow is not None and follow[r] != r)  # leaders first
        width = n_forced + steps
        tokens = torch.full((rows, width), self._pad, dtype=torch.long)
        lp = torch.zeros(rows, width)
        n_fed = n_forced + steps - (0 if feed_last else 1) if steps else n_forced
        positions = [None] * rows
        length, finished = [0] * rows, [False] * rows
        for r in order:
            p = parents[r]
            seq = list(beam.ids[p])
            cur = beam.next_logprobs[p]
            row_pos = []
            ended = None
            for j in range(width):
                if j < n_forced:
                    tok = int(forced[r, j])
                elif follow is not None and follow[r] != r:
                    tok = int(tokens[follow[r], j])
                else:
                    tok = int(sampler.pick(cur[None])[0])
                tokens[r, j] = tok
                lp[r, j] = cur[tok]
                seq.append(tok)
                if tok in self.eos_ids:
                    ended = j + 1
                    break
                if j < n_fed:
                    cur = self._next(seq)
                    row_pos.append(cur)
            length[r], finished[r], positions[r] = ended or width, ended is not None, row_pos
        return Rollout(list(parents), tokens, lp, length, finished, n_fed,
                       state=([beam.ids[p] for p in parents], positions))

    @torch.inference_mode()
    def commit(self, rollout: Rollout, rows: Sequence[int], keep: int) -> Beam:
        base, positions = rollout.state
        ids = [base[r] + rollout.tokens[r, :keep].tolist() for r in rows]
        nxt = torch.stack([positions[r][keep - 1] for r in rows])
        return Beam(ids=ids, next_logprobs=nxt, state=None)

    def peek(self, rollout: Rollout, rows: Sequence[int], keep: int) -> torch.Tensor:
        return self.commit(rollout, rows, keep).next_logprobs


def _forked_constraints(calls: Sequence[RolloutCall]) -> Any:
    """The constraint states of a group's rows, each call's beam rows forked for its parents (None
    when no call is constrained)."""
    parts = [c.beam.constraint.fork(c.parents) if c.beam.constraint is not None else None for c in calls]
    present = next((p for p in parts if p is not None), None)
    return type(present).concat(parts, [len(c.parents) for c in calls]) if present is not None else None


def _passes(call: RolloutCall) -> int:
    """The forward passes a rollout takes at most: the forced tokens, then one per generated token
    but the last (unless it is fed too)."""
    return 1 + max(call.steps - (0 if call.feed_last else 1), 0)


def split_by_passes(calls: Sequence[tuple[int, int]], pass_cost_rows: float) -> list[list[int]]:
    """Which of ``calls`` (``(passes, rows)`` each) to run together: a group takes as many passes as
    its longest call, every row riding in each, so a one-token call grouped with a long rollout pays
    for the long one's passes; apart, each group pays a pass's fixed cost (``pass_cost_rows``, in
    rows) per pass.  Returns the cheapest split into groups of neighbouring pass counts, as lists of
    indices into ``calls`` (one group when everything takes as many passes)."""
    counts = sorted({p for p, _ in calls})
    rows = [sum(r for p, r in calls if p == c) for c in counts]
    best: list[tuple[float, int]] = [(0.0, 0)]  # best[j]: the cost of counts[:j], where its last group starts
    for j in range(1, len(counts) + 1):
        best.append(min((best[i][0] + counts[j - 1] * (pass_cost_rows + sum(rows[i:j])), i) for i in range(j)))
    groups, j = [], len(counts)
    while j:
        i = best[j][1]
        groups.append([k for k, (p, _) in enumerate(calls) if counts[i] <= p <= counts[j - 1]])
        j = i
    return groups[::-1]


def _leaders(follow: Sequence[int] | None, rows: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """For ``rollout(follow=...)``: the rows that choose their own tokens, and for every row the
    position among those of the row whose tokens it takes.  Only leaders are sampled, so the random
    stream is the one the leaders alone would draw."""
    if follow is None:
        return None, None
    follow = list(follow)
    if len(follow) != rows or any(not 0 <= f < rows or follow[f] != f for f in follow):
        raise ValueError("follow must give, for every row, a row that chooses its own tokens")
    lead = sorted(set(follow))
    where = {r: i for i, r in enumerate(lead)}
    return torch.tensor(lead), torch.tensor([where[f] for f in follow])


def _is_eos(tokens: torch.Tensor, eos_ids: frozenset[int]) -> torch.Tensor:
    return torch.isin(tokens, torch.tensor(sorted(eos_ids), dtype=tokens.dtype))


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    gen = getattr(model, "generation_config", None)
    return eos_ids_of(getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None))
