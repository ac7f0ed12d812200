"""Decoding for the Flamingo model: greedy, beam and nucleus search over a KV cache, stopping at the end-of-chunk
token (OpenFlamingo's ``generate`` does not run on transformers 5)."""

from __future__ import annotations

import torch

from recon.captioners.flamingo.model import Flamingo


def _cache_repeat(cache, k: int):
    if hasattr(cache, "batch_repeat_interleave"):
        cache.batch_repeat_interleave(k)
        return cache
    return tuple(tuple(t.repeat_interleave(k, 0) for t in layer) for layer in cache)  # legacy tuple caches


def _cache_select(cache, index: torch.Tensor):
    if hasattr(cache, "reorder_cache"):
        cache.reorder_cache(index)
        return cache
    return tuple(tuple(t.index_select(0, index) for t in layer) for layer in cache)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -float("inf"))
    return logits


@torch.no_grad()
def beam_step(
    logp: torch.Tensor,
    scores: torch.Tensor,
    generated: torch.Tensor,
    finished: list[list[tuple[list[int], float]]],
    row_done: list[bool],
    k: int,
    eos: int,
    length: int,
    length_penalty: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of beam search over ``B`` rows of ``k`` beams: ``logp [B*k, V]`` next-token log-probs, ``scores
    [B*k]`` the beams' summed log-probs, ``generated [B*k, length-1]`` their tokens so far.

    Of each row's best ``2k`` extensions, one ending in ``eos`` among the top ``k`` joins ``finished[row]`` (its
    score ``sum log p / length ** length_penalty``; the ``k`` best are kept), the others fill the ``k`` beams in
    order. A row is done (``row_done[row] = True``) when it has ``k`` finished hypotheses and none of its running
    beams can beat the worst of them. Returns ``(select, tokens, new_scores)``: the beam each new beam extends, its
    token and its summed score (``-inf`` for the beams of a done row)."""
    b, vocab = logp.shape[0] // k, logp.shape[-1]
    top_s, top_i = (scores[:, None] + logp).view(b, k * vocab).topk(2 * k, dim=-1)
    select = torch.arange(b * k, device=logp.device)
    tokens = torch.full((b * k,), eos, dtype=torch.long, device=logp.device)
    new_scores = torch.full((b * k,), -float("inf"), device=logp.device)

    def norm(score: float) -> float:
        return score / max(length, 1) ** length_penalty

    for row in range(b):
        if row_done[row]:
            continue
        j = 0
        for rank, (s, idx) in enumerate(zip(top_s[row].tolist(), top_i[row].tolist())):
            src, tok = row * k + idx // vocab, idx % vocab
            if tok == eos:
                if rank < k:
                    finished[row].append((generated[src].tolist(), norm(s)))
                continue
            select[row * k + j], tokens[row * k + j], new_scores[row * k + j] = src, tok, s
            j += 1
            if j == k:
                break
        finished[row] = sorted(finished[row], key=lambda h: -h[1])[:k]
        if len(finished[row]) == k and finished[row][-1][1] >= norm(float(new_scores[row * k])):
            row_done[row] = True
    return select, tokens, new_scores


def generate(
    model: Flamingo,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    media: torch.Tensor,
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    method: str = "greedy",
    num_beams: int = 1,
    num_return_sequences: int = 1,
    top_p: float = 1.0,
    top_k: int = 0,
    temperature: float = 1.0,
    repetition_penalty: float = 1.0,
    length_penalty: float = 1.0,
    eos_token_id: int | None = None,
    banned_token_ids: tuple[int, ...] = (),
) -> list[list[tuple[list[int], float]]]:
    """Decode after left-padded prompts ``input_ids [B, L]`` with their ``media [B, T_img, n, Dv]``.

    The prompt runs once with the LM's KV cache; each step then feeds one token, which cross-attends to the row's
    latest image (``media_offset``). ``method``: ``greedy``, ``beam`` (``num_beams`` wide, scores
    ``sum log p / length ** length_penalty``) or ``nucleus`` (``top_p`` / ``top_k`` / ``temperature``; uses torch's
    global RNG, so seed around the call). Decoding of a sequence stops at ``eos_token_id`` (default
    ``<|endofchunk|>``). ``repetition_penalty`` applies to the tokens generated so far, not to the prompt (few-shot
    prompts share the answer's vocabulary). Returns per row ``num_return_sequences`` ``(token ids without eos,
    score)``, best first.
    """
    eos = model.eoc_token_id if eos_token_id is None else int(eos_token_id)
    b = input_ids.shape[0]
    k = num_beams if method == "beam" else num_return_sequences
    if method == "beam" and num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences={num_return_sequences} exceeds num_beams={num_beams}")
    if method not in ("greedy", "beam", "nucleus"):
        raise ValueError(f"decoding method {method!r}: expected greedy, beam or nucleus")
    mask = attention_mask.long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids, media, attention_mask=mask, position_ids=positions, use_cache=True)
    cache, logits = model.output_cache(out), out.logits[:, -1].float()
    media_count = (input_ids == model.media_token_id).sum(-1)
    last_pos = positions[:, -1]
    if k > 1:
        cache = _cache_repeat(cache, k)
        logits, mask, media, media_count, last_pos = (
            t.repeat_interleave(k, 0) for t in (logits, mask, media, media_count, last_pos)
        )
    banned = torch.tensor(sorted(set(banned_token_ids) | {model.media_token_id}), device=logits.device)
    generated = torch.zeros(b * k, 0, dtype=torch.long, device=logits.device)
    scores = torch.zeros(b * k, device=logits.device)
    if method == "beam":
        scores.view(b, k)[:, 1:] = -float("inf")  # step 0: every beam starts from the same prompt
    done = torch.zeros(b * k, dtype=torch.bool, device=logits.device)
    finished: list[list[tuple[list[int], float]]] = [[] for _ in range(b)]
    row_done = [False] * b

    def norm(score: float, length: int) -> float:
        return score / max(length, 1) ** length_penalty

    for step in range(max_new_tokens):
        logits[:, banned] = -float("inf")
        if step < min_new_tokens:
            logits[:, eos] = -float("inf")
        if repetition_penalty != 1.0 and generated.shape[1]:
            seen = logits.gather(1, generated)
            logits.scatter_(
                1, generated, torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty)
            )
        if method == "nucleus":
            logits = _filter_top_k_top_p(logits / temperature, top_k, top_p)
        logp = logits.log_softmax(-1)
        if method == "beam":
            select, tokens, new_scores = beam_step(
                logp, scores, generated, finished, row_done, k, eos, step + 1, length_penalty
            )
            if all(row_done):
                break
            generated = torch.cat([generated[select], tokens[:, None]], dim=1)
            scores = new_scores
            cache = _cache_select(cache, select)
        else:
            tokens = logp.argmax(-1) if method == "greedy" else torch.multinomial(logp.exp(), 1).squeeze(1)
            tokens = tokens.masked_fill(done, eos)
            scores = scores + logp.gather(1, tokens[:, None]).squeeze(1).masked_fill(done, 0.0)
            generated = torch.cat([generated, tokens[:, None]], dim=1)
            done = done | (tokens == eos)
            if bool(done.all()):
                break
        if step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(b * k, 1)], dim=1)
        last_pos = last_pos + 1
        out = model(
            tokens[:, None],
            media,
            attention_mask=mask,
            position_ids=last_pos[:, None],
            cache=cache,
            use_cache=True,
            media_offset=media_count,
        )
        cache, logits = model.output_cache(out), out.logits[:, -1].float()

    results = []
    for row in range(b):
        if method == "beam":
            hyps = list(finished[row])
            if not row_done[row]:
                hyps += [
                    (generated[row * k + j].tolist(), norm(float(scores[row * k + j]), generated.shape[1]))
                    for j in range(k)
                    if scores[row * k + j] > -float("inf")
                ]
            results.append(sorted(hyps, key=lambda h: -h[1])[:num_return_sequences])
        else:
            rows = []
            for j in range(k):
                seq = generated[row * k + j].tolist()
                rows.append((seq[: seq.index(eos)] if eos in seq else seq, float(scores[row * k + j])))
            results.append(rows)
    return results
