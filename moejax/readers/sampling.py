"""Autoregressive sampling with a KV cache (saved_run.open_run loads a trained model).

`Sampler.generate` prefills the prompt in one pass, then decodes one token per step inside a single
jitted `lax.fori_loop`, reading and writing a fixed-size cache [B, max_len, KV, K] per layer.
Temperature 0 is greedy decoding; otherwise tokens are drawn from softmax(logits / temperature),
optionally restricted to the top_k most likely, with keys derived from (seed, step), so a seed
always gives the same text.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import config as config_lib
from moejax.errors import ConfigError


def sample_token(logits_BV, key, temperature, top_k: int = 0):
    """Next token ids [B]: argmax if temperature is a number <= 0, else a draw from the
    tempered softmax (temperature may be traced), restricted to the top_k logits if top_k > 0."""
    if isinstance(temperature, (int, float)) and temperature <= 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if top_k and top_k < logits_BV.shape[-1]:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def _generate(graphdef, state, prompt_BP, key, temperature, *, max_new_tokens, greedy, top_k):
    model = nnx.merge(graphdef, state)
    B, P = prompt_BP.shape
    N = max_new_tokens
    sample = lambda logits_BV, i: sample_token(logits_BV, jax.random.fold_in(key, i),
                                               0.0 if greedy else temperature, top_k)
    cache = model.init_cache(B, P + N)
    logits_BPV, cache = model.extend(prompt_BP, cache, 0)
    logits_BNV = jnp.zeros((B, N, logits_BPV.shape[-1]), jnp.float32).at[:, 0].set(
        logits_BPV[:, -1])
    tokens_BN = jnp.zeros((B, N), jnp.int32).at[:, 0].set(sample(logits_BPV[:, -1], 0))

    def step(i, carry):
        tokens_BN, logits_BNV, cache = carry
        logits_B1V, cache = model.extend(tokens_BN[:, i - 1, None], cache, P + i - 1)
        token_B = sample(logits_B1V[:, 0], i)
        return tokens_BN.at[:, i].set(token_B), logits_BNV.at[:, i].set(logits_B1V[:, 0]), cache

    tokens_BN, logits_BNV, _ = jax.lax.fori_loop(1, N, step, (tokens_BN, logits_BNV, cache))
    return tokens_BN, logits_BNV


class Sampler:
    """Compiled generation for a snapshot of one model's weights; reuse it to sample many times
    without recompiling (only a new prompt shape, max_new_tokens, top_k or greedy recompiles)."""

    def __init__(self, model):
        graphdef, self.state = nnx.split(model)
        # The graphdef holds the (unhashable) config, so it is closed over rather than static.
        self._run = jax.jit(functools.partial(_generate, graphdef),
                            static_argnames=('max_new_tokens', 'greedy', 'top_k'))

    def generate(self, prompt_BP, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int = 0, seed: int = 0):
        """Continue each prompt row by max_new_tokens tokens: (tokens [B, N], logits [B, N, V]).

        logits[:, i] are the model's logits that token i was drawn from. Prompts share one
        length and hold one document each (start them with the tokenizer's bos id, as the
        training data does). Temperature 0 is greedy; top_k 0 samples from the whole vocab.
        """
        config_lib.check_sampling_args(_plain(max_new_tokens), _plain(temperature),
                                       _plain(top_k))
        return self._run(self.state, jnp.asarray(prompt_BP, jnp.int32), jax.random.key(seed),
                         jnp.float32(max(temperature, 0.0)), max_new_tokens=int(max_new_tokens),
                         greedy=temperature <= 0, top_k=int(top_k))


def _plain(value):
    """A NumPy scalar as the Python int or float it holds (other values unchanged)."""
    return value.item() if isinstance(value, np.generic) else value


def generate(model, prompt_BP, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0):
    """One-off `Sampler(model).generate(...)` (compiles on every call)."""
    return Sampler(model).generate(prompt_BP, max_new_tokens, temperature=temperature,
                                   top_k=top_k, seed=seed)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt as the model saw documents in training: bos, then the text's tokens."""
    return [tokenizer.bos_id] + list(tokenizer.encode(prompt))


def continuation_text(tokenizer, tokens) -> str:
    """Decode generated ids up to (not including) the first end-of-document token."""
    tokens = [int(t) for t in tokens]
    if tokenizer.eos_id in tokens:
        tokens = tokens[:tokens.index(tokenizer.eos_id)]
    return tokenizer.decode(tokens)


def check_length(prompt: str, prompt_len: int, max_new_tokens: int, max_len: int) -> None:
    """Prompt (with bos) + new tokens must fit the model's positions; blame what overflows."""
    if prompt_len >= max_len:
        shown = prompt if len(prompt) <= 24 else prompt[:24] + '...'
        raise ConfigError('--prompt', shown, f'is {prompt_len} tokens with bos, which leaves no '
                          f'room for new tokens in model.max_len={max_len}: shorten it to at most '
                          f'{max_len - 1} tokens with bos')
    if prompt_len + max_new_tokens > max_len:
        raise ConfigError('--max_new_tokens', max_new_tokens,
                          f'prompt ({prompt_len} tokens with bos) + new tokens must be <= '
                          f'model.max_len={max_len}; use at most {max_len - prompt_len}')


def generate_text(run, prompt: str, max_new_tokens: int, *, temperature: float = 0.0,
                  top_k: int = 0, seed: int = 0, num_samples: int = 1) -> list[str]:
    """num_samples continuations of `prompt` by a saved_run.SavedRun (the prompt text is not
    repeated in them)."""
    config_lib.check_sampling_args(*map(_plain, (max_new_tokens, temperature, top_k,
                                                 num_samples)))
    ids = prompt_ids(run.tokenizer, prompt)
    check_length(prompt, len(ids), max_new_tokens, run.cfg.model.max_len)
    prompt_BP = np.tile(np.asarray(ids, np.int32), (num_samples, 1))
    tokens_BN, _ = run.sampler.generate(prompt_BP, max_new_tokens, temperature=temperature,
                                        top_k=top_k, seed=seed)
    return [continuation_text(run.tokenizer, row) for row in np.asarray(tokens_BN)]
