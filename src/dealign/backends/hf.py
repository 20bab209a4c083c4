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

from .base import Backend, Beam, Counters, Rollout, Sampler, eos_ids_of


def fork_cache(cache: DynamicCache, index: torch.Tensor) -> DynamicCache:
    """A new cache made of the rows ``index`` (repeats allowed) of ``cache``, which stays intact."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    new.batch_select_indices(index)
    return new


@dataclass
class _Cache:
    """A beam's keys/values and, when its rows hold prompts of different lengths, each row's left
    padding (``None`` when no row is padded: the plain causal path, bit for bit as before)."""

    kv: DynamicCache
    pads: torch.Tensor | None = None  # [rows], long

    def select(self, index: torch.Tensor) -> "_Cache":
        pads = self.pads[index.cpu()] if self.pads is not None else None
        return _Cache(fork_cache(self.kv, index), pads if pads is not None and bool(pads.any()) else None)


@dataclass
class _RolloutState:
    cache: _Cache
    base_ids: list[list[int]]
    position_logprobs: list[torch.Tensor]  # [rows, vocab] after each fed token


class HFBackend(Backend):
    """Drives a ``transformers`` causal LM (any ``AutoModelForCausalLM``) and its tokenizer."""

    def __init__(self, model: Any, tokenizer: Any, *, name: str = "model") -> None:
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

    # Backend -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: Sequence[int]) -> Beam:
        if len(ids) == 0:
            raise ValueError("the prompt encodes to no tokens; give a non-empty prompt")
        logprobs, cache = self._forward(torch.tensor([list(ids)], dtype=torch.long), None)
        return Beam(ids=[list(ids)], next_logprobs=logprobs[:, -1], state=cache)

    @torch.inference_mode()
    def prefill_many(self, prompts: Sequence[Sequence[int]]) -> Beam:
        if not prompts or any(len(ids) == 0 for ids in prompts):
            raise ValueError("every prompt must encode to at least one token")
        width = max(len(ids) for ids in prompts)
        pads = torch.tensor([width - len(ids) for ids in prompts], dtype=torch.long)
        tokens = torch.tensor([[self._pad] * (width - len(ids)) + list(ids) for ids in prompts], dtype=torch.long)
        logprobs, cache = self._forward(tokens, None, pads if bool(pads.any()) else None)
        return Beam(ids=[list(ids) for ids in prompts], next_logprobs=logprobs[:, -1], state=cache)

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
        sampler = sampler or Sampler()
        index = torch.as_tensor(list(parents), dtype=torch.long)
        rows, n_forced = forced.shape
        lead, copy_of = _leaders(follow, rows)
        cache = beam.state.select(index.to(self.device))
        parent_lp = beam.next_logprobs[index]

        tokens = forced.clone()
        lp = torch.empty(rows, n_forced)
        lp[:, 0] = parent_lp.gather(1, forced[:, :1]).squeeze(1)
        logprobs, cache = self._forward(forced, cache)
        if n_forced > 1:
            lp[:, 1:] = logprobs[:, :-1].gather(2, forced[:, 1:, None]).squeeze(2)
        positions = [logprobs[:, j] for j in range(n_forced)]
        done = torch.zeros(rows, dtype=torch.bool)
        length = torch.full((rows,), n_forced + steps, dtype=torch.long)
        for j in range(n_forced):  # forced tokens may already end a row
            hit = _is_eos(forced[:, j], self.eos_ids) & ~done
            length[hit] = j + 1
            done |= hit

        gen_tok, gen_lp = [], []
        cur = positions[-1]
        n_fed = n_forced
        for s in range(steps):
            tok = sampler.pick(cur if lead is None else cur[lead])
            if copy_of is not None:
                tok = tok[copy_of]
            tok_lp = cur.gather(1, tok[:, None]).squeeze(1)
            tok = torch.where(done, torch.full_like(tok, self._pad), tok)
            tok_lp = torch.where(done, torch.zeros_like(tok_lp), tok_lp)
            gen_tok.append(tok)
            gen_lp.append(tok_lp)
            hit = _is_eos(tok, self.eos_ids) & ~done
            length[hit] = n_forced + s + 1
            done |= hit
            last = s == steps - 1
            if bool(done.all()) or (last and not feed_last):
                break
            logprobs, cache = self._forward(tok[:, None], cache)
            cur = logprobs[:, -1]
            positions.append(cur)
            n_fed += 1
        pad = steps - len(gen_tok)
        if gen_tok or pad:
            gen = torch.stack(gen_tok, 1) if gen_tok else torch.empty(rows, 0, dtype=torch.long)
            glp = torch.stack(gen_lp, 1) if gen_lp else torch.empty(rows, 0)
            tokens = torch.cat([tokens, gen, torch.full((rows, pad), self._pad, dtype=torch.long)], 1)
            lp = torch.cat([lp, glp, torch.zeros(rows, pad)], 1)
        return Rollout(
            parents=list(parents),
            tokens=tokens,
            logprobs=lp,
            length=length.tolist(),
            finished=done.tolist(),
            n_fed=n_fed,
            state=_RolloutState(cache, [beam.ids[p] for p in parents], positions),
        )

    @torch.inference_mode()
    def commit(self, rollout: Rollout, rows: Sequence[int], keep: int) -> Beam:
        st: _RolloutState = rollout.state
        if not 1 <= keep <= rollout.n_fed:
            raise ValueError(f"cannot keep {keep} tokens of a rollout that fed {rollout.n_fed}")
        index = torch.as_tensor(list(rows), dtype=torch.long)
        cache = st.cache.select(index.to(self.device))
        if keep < rollout.n_fed:
            cache.kv.crop(-(rollout.n_fed - keep))
        ids = [st.base_ids[r] + rollout.tokens[r, :keep].tolist() for r in rows]
        return Beam(ids=ids, next_logprobs=st.position_logprobs[keep - 1][index], state=cache)


    def peek(self, rollout: Rollout, rows: Sequence[int], keep: int) -> torch.Tensor:
        if not 1 <= keep <= rollout.n_fed:
            raise ValueError(f"cannot keep {keep} tokens of a rollout that fed {rollout.n_fed}")
        return rollout.state.position_logprobs[keep - 1][torch.as_tensor(list(rows), dtype=torch.long)]


class NaiveHFBackend(HFBackend):
    """The correctness oracle: no cache, the full sequence re-encoded for every token of every row,
    rows one at a time.  Same contract and (up to float noise) the same numbers as ``HFBackend``;
    kept for tests and the benchmark, not offered to users."""

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
