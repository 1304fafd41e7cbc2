"""Text generation with a KV cache for any JAX candidate (float, PTQ, QAT student with its fake-quant
policy, Q4_0 / mobile exports).

The whole loop runs under one jit: the prompt is prefilled through the model's KV cache
(gemma_qat/model/kv_cache.py) in one forward pass, then each new token is one single-token forward
that appends to the cache. Shapes are static: the prompt is padded to a multiple of 64 positions and
the cache holds L = prompt + max_new_tokens rounded up to a multiple of 64, so prompts of similar
length share a compile. Cost: one prompt-length forward plus one token-pass per new token, attending
over the L cache slots (the mask hides the empty ones and, on sliding layers, those outside the window).

Sampling: temperature 0 = greedy; otherwise softmax(z / temperature) restricted to the top_k logits
and then the smallest set whose mass reaches top_p (the most likely token is always kept).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemma_qat.data.tokenizer import END_OF_TURN, START_OF_TURN, Tokenizer
from gemma_qat.eval.candidates import Candidate
from gemma_qat.model.embed import logits_from_hidden
from gemma_qat.model.kv_cache import init_cache

BUCKET = 64
_NEG = -1e30  # finite "excluded" logit: categorical never picks it and no inf - inf NaNs appear


def chat_prompt(text: str) -> str:
    """One user turn in Gemma's template, opened for the model's answer."""
    return f"{START_OF_TURN}user\n{text}{END_OF_TURN}\n{START_OF_TURN}model\n"


def filter_logits(z, *, temperature: float, top_k: int | None, top_p: float | None):
    """[V] fp32 logits -> tempered logits with excluded tokens at _NEG (static settings)."""
    z = z / temperature
    if top_k:
        kth = jax.lax.top_k(z, min(top_k, z.shape[-1]))[0][-1]
        z = jnp.where(z < kth, _NEG, z)
    if top_p is not None and top_p < 1.0:
        sorted_z = jnp.sort(z)[::-1]
        probs = jax.nn.softmax(sorted_z)
        # keep token i while the mass before it is < top_p: the first token is always kept
        keep = (jnp.cumsum(probs) - probs) < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_z, jnp.inf))
        z = jnp.where(z < cutoff, _NEG, z)
    return z


@functools.lru_cache(maxsize=16)
def _sampler(model, prefill: int, length: int, temperature: float, top_k: int | None, top_p: float | None):
    softcap = model.config.final_softcap

    @jax.jit
    def run(variables, buf, start, stop, eos, vocab, key):
        # buf [1, L] with the prompt in [0, start) (start <= prefill); fills [start, stop) or until a
        # token of eos [k] (traced, like start/stop, so prompts and tokenizers share one compile per
        # setting); only ids < vocab are drawn: Gemma pads its embedding past the tokenizer, and
        # those ids decode to nothing
        def draw(z, key):
            z = jnp.where(jnp.arange(z.shape[-1]) < vocab, z, _NEG)  # [V] fp32
            if temperature <= 0:
                return jnp.argmax(z).astype(jnp.int32)
            z = filter_logits(z, temperature=temperature, top_k=top_k, top_p=top_p)
            return jax.random.categorical(key, z).astype(jnp.int32)

        cache = init_cache(model.config, 1, length, model.dtype)
        (h, table), cache = model.apply(variables, buf[:, :prefill], cache=cache, return_hidden=True)
        # The padding after the prompt went into slots [start, prefill); rewinding the length makes
        # decoding overwrite them, and causality kept every prompt token from attending to them.
        cache = cache.replace(length=start)
        h_last = jax.lax.dynamic_slice_in_dim(h, start - 1, 1, axis=1)  # [1, 1, D]
        z = logits_from_hidden(h_last, table, softcap=softcap)[0, 0]  # [V] next-token logits

        def cond(state):
            cur, done = state[:2]
            return (cur < stop) & ~done

        def body(state):
            cur, _, buf, key, cache, z = state
            key, sub = jax.random.split(key)
            tok = draw(z, sub)
            buf = jax.lax.dynamic_update_slice(buf, tok[None, None], (0, cur))
            # Append tok at slot cur (its position) and get the logits after it. The last
            # iteration's forward goes unused: one token-pass, cheaper than a conditional.
            logits, cache = model.apply(variables, tok[None, None], cache=cache)  # [1, 1, V]
            return cur + 1, jnp.any(tok == eos), buf, key, cache, logits[0, 0]

        cur, _, buf, *_ = jax.lax.while_loop(cond, body, (start, jnp.bool_(False), buf, key, cache, z))
        return buf, cur

    return run


def generate(candidate: Candidate, prompt_ids: Sequence[int], *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_ids: Sequence[int] = (), vocab_limit: int | None = None) -> list[int]:
    """New token ids after `prompt_ids` (the stopping eos included if one was produced); only ids
    below `vocab_limit` (default: the model's vocabulary) are ever produced."""
    if not candidate.is_jax:
        raise ValueError(f"generation runs JAX candidates; {candidate.name!r} is {candidate.kind} "
                         "(run a GGUF file with llama.cpp itself)")
    cfg = candidate.config
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("the prompt is empty (it needs at least a <bos> token)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if any(not 0 <= t < cfg.vocab_size for t in prompt):
        raise ValueError(f"prompt token ids must lie in [0, {cfg.vocab_size})")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    stop = len(prompt) + max_new_tokens
    if stop > cfg.max_position:
        raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"{cfg.max_position} positions")
    length = min(-(-stop // BUCKET) * BUCKET, cfg.max_position)  # cache slots
    prefill = min(-(-len(prompt) // BUCKET) * BUCKET, length)
    buf = np.zeros((1, length), np.int32)
    buf[0, : len(prompt)] = prompt
    greedy = temperature <= 0  # sampling settings are static only where they change the program
    run = _sampler(candidate.model, prefill, length, 0.0 if greedy else float(temperature), None if greedy else top_k or None,
                   None if greedy or top_p is None or top_p >= 1.0 else float(top_p))
    eos = jnp.asarray(sorted({int(e) for e in eos_ids}) or [-1], jnp.int32)  # -1: never produced
    out, cur = run(candidate.variables, jnp.asarray(buf), jnp.int32(len(prompt)), jnp.int32(stop), eos,
                   jnp.int32(vocab_limit or cfg.vocab_size), jax.random.PRNGKey(seed))
    return np.asarray(out)[0, len(prompt): int(cur)].tolist()


def stop_ids(tokenizer: Tokenizer) -> list[int]:
    """<eos>, and <end_of_turn> when the vocabulary has it (an instruction model ends its turn there)."""
    ids = [tokenizer.eos_id, tokenizer.piece_to_id(END_OF_TURN)]
    return [i for i in ids if i is not None and i >= 0]


def generate_text(candidate: Candidate, tokenizer: Tokenizer, prompt: str, *, chat: bool = False,
                  **kw) -> dict:
    """Tokenizes (with <bos>; in the chat template if `chat`), generates, decodes. Returns
    {"prompt", "tokens", "text", "stopped"} where stopped says whether a stop token ended it."""
    text = chat_prompt(prompt) if chat else prompt
    ids = tokenizer.encode(text, add_bos=True)
    stops = stop_ids(tokenizer)
    new = generate(candidate, ids, eos_ids=stops, vocab_limit=tokenizer.vocab_size, **kw)
    stopped = bool(new) and new[-1] in stops
    return {"prompt": text, "tokens": new, "text": tokenizer.decode(new[:-1] if stopped else new),
            "stopped": stopped}
