"""The decode loop: base model with its KV cache, heads with theirs, one token a step.

Every step runs the base model once with ``output_hidden_states=True``. The
tap layer's hidden state of the new token feeds the heads' incremental step,
so the trace costs no second pass over the text.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field

import torch

from models.base import BaseModel
from models.heads import ConstraintHeads
from models.runner import make_runner

logger = logging.getLogger(__name__)


class PromptTooLongError(ValueError):
    """The prompt plus the requested tokens do not fit in the model's context."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int, supplied_response: bool = False):
        self.prompt_tokens, self.max_tokens, self.context_length = prompt_tokens, max_tokens, context_length
        # A supplied response is the longer part far more often than the prompt, so it names the field.
        self.param = "response" if supplied_response else "prompt"
        second = (f"the response is {max_tokens} tokens (with the end-of-turn token, if added)" if supplied_response
                  else f"max_tokens is {max_tokens}")
        fix = "Shorten the prompt or the response." if supplied_response else "Shorten the prompt or lower max_tokens."
        super().__init__(f"the prompt is {prompt_tokens} tokens and {second}, together {prompt_tokens + max_tokens}, "
                         f"but the model's context holds {context_length} tokens. {fix}")


@dataclass
class SamplingParams:
    """Sampling settings of one request; temperature 0 means greedy."""

    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None  # None draws a fresh seed, recorded on the session
    stop: list[str] = field(default_factory=list)
    # constraint → minimum score: generation ends at the first token scoring below it
    min_scores: dict[str, float] = field(default_factory=dict)
    top_logprobs: int = 0  # alternatives recorded per generated token, most likely first


@dataclass
class ConstraintStop:
    """The point where a constraint's score first fell below its minimum and ended the generation."""

    constraint: str
    position: int  # sequence position of the token that fell below
    score: float
    min_score: float


@dataclass
class TokenTrace:
    """One token of the sequence with what every constraint head made of it."""

    position: int  # index in the whole prompt + output sequence
    token_id: int
    text: str
    logprob: float | None  # None for prompt tokens
    scores: dict[str, float]
    attention: dict[str, list[tuple[int, float]]]  # constraint → top-k (position, weight), heaviest first
    # The most likely tokens at this position as (token id, text, logprob); None unless requested
    top_logprobs: list[tuple[int, str, float]] | None = None


class ConstraintModel:
    """A base model with its constraint heads, ready to decode."""

    def __init__(self, base: BaseModel, heads: ConstraintHeads, top_k_attention: int = 5):
        self.base = base
        self.heads = heads.to(base.device)
        self.top_k_attention = top_k_attention
        self.eos_token_ids = base.eos_token_ids()
        self.runner = make_runner(base, heads.config.tap_layers)
        self.heads_qkv = heads.fused_qkv()

    @property
    def constraints(self) -> list[str]:
        return self.heads.config.constraints

    def encode(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None) -> list[int]:
        """Tokenize a raw prompt, or apply the chat template to messages."""
        tokenizer = self.base.tokenizer
        if messages is not None:
            if not tokenizer.chat_template:
                raise ValueError(f"model {self.base.name} has no chat template; send `prompt` instead of `messages`")
            encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
        return tokenizer(prompt, add_special_tokens=True).input_ids

    def encode_response(self, prompt: str | None, messages: list[dict[str, str]] | None, response: str,
                        end_of_turn: bool) -> tuple[list[int], list[int]]:
        """Tokenize a prompt and a supplied response the way a generation would have produced them."""
        prompt_ids = self.encode(prompt, messages)
        output_ids = self.base.tokenizer(response, add_special_tokens=False).input_ids
        if end_of_turn and self.base.tokenizer.eos_token_id is not None:
            output_ids.append(self.base.tokenizer.eos_token_id)
        return prompt_ids, output_ids

    @torch.inference_mode()
    def score(self, prompt_ids: list[int], output_ids: list[int]) -> tuple[list[TokenTrace], list[TokenTrace]]:
        """Run prompt + a given output through both models in one pass; return both traces.

        The output tokens get the logprobs the model would have given them, so
        the traces have the same shape as a generation's.
        """
        if not output_ids:
            raise ValueError("nothing to score: the response has no tokens")
        if len(prompt_ids) + len(output_ids) > self.base.context_length:
            raise PromptTooLongError(len(prompt_ids), len(output_ids), self.base.context_length, supplied_response=True)
        # Logits at position i predict token i + 1, so one more than the output is kept.
        prefilled = self.runner.prefill(prompt_ids + output_ids, logits_to_keep=len(output_ids) + 1)
        logprobs = torch.log_softmax(prefilled.logits[:-1], dim=-1)
        output_logprobs = logprobs[torch.arange(len(output_ids)), torch.tensor(output_ids)].tolist()
        heads_out = self.heads(prefilled.tap_hidden_states.to(self.heads.readout_bias.dtype))

        logits, weights = heads_out.constraint_logits[0], heads_out.attention_weights[0]
        prompt_pieces = IncrementalDetokenizer(self.base.tokenizer)
        output_pieces = IncrementalDetokenizer(self.base.tokenizer)
        split = len(prompt_ids)
        prompt_trace = self.trace_tokens(0, prompt_ids, [prompt_pieces.push(t) for t in prompt_ids],
                                         [None] * split, logits[:split], weights[:, :split])
        output_trace = self.trace_tokens(split, output_ids, [output_pieces.push(t) for t in output_ids],
                                         output_logprobs, logits[split:], weights[:, split:])
        return prompt_trace, output_trace

    def new_batch(self) -> "DecodeBatch":
        return DecodeBatch(self)

    def start(self, input_ids: list[int], params: SamplingParams) -> "DecodeSession":
        if len(input_ids) + params.max_tokens > self.base.context_length:
            raise PromptTooLongError(len(input_ids), params.max_tokens, self.base.context_length)
        unknown = sorted(set(params.min_scores) - set(self.constraints))
        if unknown:
            raise ValueError(f"min_scores names {', '.join(unknown)}, which the heads do not score; "
                             f"known: {', '.join(self.constraints)}")
        return DecodeSession(self, input_ids, params)

    def trace_tokens(self, start: int, token_ids: list[int], pieces: list[str], logprobs: list[float | None],
                     constraint_logits: torch.Tensor, attention_weights: torch.Tensor) -> list[TokenTrace]:
        """Turn the heads' output for consecutive positions into token traces.

        Args:
            constraint_logits: (t, C) for the positions start .. start + t - 1.
            attention_weights: (C, t, T) each constraint's attention over all positions.
        """
        positions = list(range(start, start + len(token_ids)))
        traces = self.trace_rows(positions, token_ids, logprobs, constraint_logits, attention_weights.transpose(0, 1))
        for trace, piece in zip(traces, pieces):
            trace.text = piece
        return traces

    def trace_rows(self, positions: list[int], token_ids: list[int], logprobs: list[float | None],
                   constraint_logits: torch.Tensor, attention_weights: torch.Tensor) -> list[TokenTrace]:
        """Return one token trace per (position, token), with the text left empty for the caller to fill.

        Args:
            constraint_logits: (B, C), one row per token: a decode step's rows, or a prompt's positions.
            attention_weights: (B, C, L) each constraint's attention over the first L positions.
        """
        scores = torch.sigmoid(constraint_logits.float()).tolist()
        k = min(self.top_k_attention, attention_weights.shape[-1])
        top_weights, top_positions = attention_weights.float().topk(k, dim=-1)  # (B, C, k)
        top_weights, top_positions = top_weights.tolist(), top_positions.tolist()
        traces = []
        for row, (position, token_id) in enumerate(zip(positions, token_ids)):
            visible = min(k, position + 1)  # a token attends only to itself and earlier ones
            attention = {constraint: list(zip(top_positions[row][c][:visible], top_weights[row][c][:visible]))
                         for c, constraint in enumerate(self.constraints)}
            traces.append(TokenTrace(position, token_id, "", logprobs[row],
                                     dict(zip(self.constraints, scores[row])), attention))
        return traces


class DecodeSession:
    """One request's decoding state: sampler, text and stop handling.

    Its caches live in the DecodeBatch that runs it. ``prefill``, ``step``
    and ``run`` decode it alone, in a batch of its own; the worker adds it to
    a shared batch instead.
    """

    def __init__(self, model: ConstraintModel, input_ids: list[int], params: SamplingParams):
        self.model = model
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=model.base.device).manual_seed(self.seed)
        self.prompt_ids = list(input_ids)
        self.output_ids: list[int] = []
        self.prompt_trace: list[TokenTrace] = []
        self.output_trace: list[TokenTrace] = []
        self.text = ""
        self.finish_reason: str | None = None  # stop, length, constraint or cancelled once finished
        self.stopped_by: ConstraintStop | None = None
        self._detokenizer = IncrementalDetokenizer(model.base.tokenizer)
        self._special_ids = set(model.base.tokenizer.all_special_ids)
        self._visible = ""  # output text without special tokens, before stop truncation
        self._text_taken = 0  # characters of text already handed out by take_text()
        self._next_logits: torch.Tensor | None = None  # (vocab,) float32, set by the batch
        self._solo: DecodeBatch | None = None  # the batch of its own that prefill() starts

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        """Tokens in the sequence so far, prompt and output."""
        return len(self.prompt_ids) + len(self.output_ids)

    def prefill(self) -> list[TokenTrace]:
        """Run the prompt in a batch of its own; return the prompt's trace."""
        self._solo = self.model.new_batch()
        return self._solo.add(self)

    def step(self) -> TokenTrace:
        """Decode one token in the session's own batch and return its trace."""
        if self._solo is None:
            self.prefill()
        return self._solo.step()[0][1]

    def sample(self, logprobs: torch.Tensor, greedy_id: int) -> tuple[int, list[tuple[int, str, float]] | None]:
        """Pick the next token from its logprobs (vocab,), whose argmax is ``greedy_id``; return it and,
        if requested, the likeliest ones."""
        temperature = self.params.temperature
        scaled_logits = self._next_logits / temperature if temperature > 0 else None
        # A temperature near 0 (such as 1e-300) overflows the scaled logits to inf, and softmax then
        # gives NaN; sampling at such a temperature is greedy decoding in the limit.
        if scaled_logits is None or not torch.isfinite(scaled_logits).all():
            token_id = greedy_id
        else:
            probs = torch.softmax(scaled_logits, dim=-1)
            if self.params.top_p < 1.0:
                probs = _top_p_filter(probs, self.params.top_p)
            token_id = int(torch.multinomial(probs, 1, generator=self.generator))
        alternatives = None
        if self.params.top_logprobs:
            top_values, top_ids = logprobs.topk(self.params.top_logprobs)
            decode = self.model.base.tokenizer.decode
            alternatives = [(token, decode([token]), value) for token, value in zip(top_ids.tolist(),
                                                                                    top_values.tolist())]
        return token_id, alternatives

    def accept(self, trace: TokenTrace) -> None:
        """Append a sampled token with its trace and update the text and finish reason."""
        self.output_ids.append(trace.token_id)
        piece = self._detokenizer.push(trace.token_id)
        if trace.token_id not in self._special_ids:
            self._visible += piece
        trace.text = piece
        self.output_trace.append(trace)
        self._update_finish_reason(trace.token_id, trace)

    def _update_finish_reason(self, token_id: int, trace: TokenTrace) -> None:
        stop_at = _find_stop(self._visible, self.params.stop)
        self.text = self._visible if stop_at is None else self._visible[:stop_at]
        # A constraint stop wins over the others: it is what the judgment must report.
        self.stopped_by = next((ConstraintStop(name, trace.position, trace.scores[name], minimum)
                                for name, minimum in self.params.min_scores.items()
                                if trace.scores[name] < minimum), None)
        if self.stopped_by is not None:
            self.finish_reason = "constraint"
        elif stop_at is not None or token_id in self.model.eos_token_ids:
            self.finish_reason = "stop"
        elif len(self.output_ids) >= self.params.max_tokens:
            self.finish_reason = "length"

    def cancel(self) -> None:
        """End the session where it is, keeping the tokens generated so far."""
        if not self.finished:
            self.finish_reason = "cancelled"

    def take_text(self) -> str:
        """Return the text that is final now and was not returned before.

        While decoding, a tail that could still grow into a stop sequence is
        held back, because a completed stop sequence is cut from the text.
        """
        if self.finished:
            final = self.text
        else:
            final = self._visible[:len(self._visible) - _stop_prefix_length(self._visible, self.params.stop)]
        new, self._text_taken = final[self._text_taken:], max(self._text_taken, len(final))
        return new

    def run(self) -> list[TokenTrace]:
        """Decode until a finish condition; return the output trace."""
        while not self.finished:
            self.step()
        return self.output_trace


class DecodeBatch:
    """Sessions that decode together: one forward pass per step for all of them.

    Sessions join with ``add`` (their prompt runs alone, then their caches
    join the batch's) and leave when they finish or by ``remove``, at any
    step. Each row attends only to its own positions, so a session's tokens
    and trace do not depend on what else runs beside it.
    """

    def __init__(self, model: ConstraintModel, heads: bool = True):
        """``heads=False`` decodes without the constraint heads (traces without scores), so that the
        benchmark can measure what the heads cost."""
        self.model = model
        self.heads = heads
        self.sessions: list[DecodeSession] = []  # row i of the caches belongs to sessions[i]
        self._cache = model.runner.new_cache()
        self._heads_cache = model.heads.new_cache(model.base.device)

    def __len__(self) -> int:
        return len(self.sessions)

    @torch.inference_mode()
    def add(self, session: DecodeSession) -> list[TokenTrace]:
        """Run a session's prompt through both models, make it a row; return the prompt's trace."""
        model = self.model
        if session.params.min_scores and not self.heads:
            raise ValueError("a batch without heads cannot apply constraint minimums")
        prefilled = model.runner.prefill(session.prompt_ids)
        self._cache.add(prefilled.row_cache)
        session._next_logits = prefilled.logits[-1]
        self.sessions.append(session)
        if not self.heads:
            return []

        heads_out = model.heads(prefilled.tap_hidden_states.to(model.heads.readout_bias.dtype))
        self._heads_cache.add([heads_out.cache.head_keys[0], heads_out.cache.head_values[0]])

        detokenizer = IncrementalDetokenizer(model.base.tokenizer)
        pieces = [detokenizer.push(token_id) for token_id in session.prompt_ids]
        session.prompt_trace = model.trace_tokens(0, session.prompt_ids, pieces, [None] * len(session.prompt_ids),
                                                  heads_out.constraint_logits[0], heads_out.attention_weights[0])
        return session.prompt_trace

    @torch.inference_mode()
    def remove(self, session: DecodeSession) -> None:
        row = self.sessions.index(session)
        self._cache.remove(row)
        if self.heads:
            self._heads_cache.remove(row)
        self.sessions[row] = self.sessions[-1]
        self.sessions.pop()

    @torch.inference_mode()
    def step(self) -> list[tuple[DecodeSession, TokenTrace]]:
        """Sample one token for every session, run them through both models, return each one's trace.

        Sessions that finish with this token leave the batch.
        """
        if not self.sessions:
            return []
        model = self.model
        logprobs = torch.log_softmax(torch.stack([s._next_logits for s in self.sessions]), dim=-1)
        greedy = logprobs.argmax(dim=-1).tolist()  # one batched argmax costs what one row's costs
        sampled = [session.sample(row_logprobs, greedy_id)
                   for session, row_logprobs, greedy_id in zip(self.sessions, logprobs, greedy)]
        token_ids = [token_id for token_id, _ in sampled]
        positions = [session.length for session in self.sessions]
        token_logprobs = logprobs[torch.arange(len(token_ids)), torch.tensor(token_ids)].tolist()

        input_ids = torch.tensor(token_ids, device=model.base.device)
        next_logits, tap_hidden_states = model.runner.decode(input_ids, self._cache)
        if self.heads:
            constraint_logits, attention = model.heads.decode_step(
                tap_hidden_states.to(model.heads.readout_bias.dtype), self._heads_cache, model.heads_qkv)
            traces = model.trace_rows(positions, token_ids, token_logprobs, constraint_logits, attention)
        else:
            traces = [TokenTrace(position, token_id, "", logprob, {}, {})
                      for position, token_id, logprob in zip(positions, token_ids, token_logprobs)]

        results = []
        for row, (session, trace) in enumerate(zip(list(self.sessions), traces)):
            trace.top_logprobs = sampled[row][1]
            session._next_logits = next_logits[row]
            session.accept(trace)
            results.append((session, trace))
        for session in [s for s in self.sessions if s.finished]:
            self.remove(session)
        return results


class IncrementalDetokenizer:
    """Turn token ids into text pieces one token at a time.

    Each piece is the difference between decoding a few tokens of context with
    and without the new ones, so a tokenizer that drops a word's leading space
    at the start of a decode still gives the right piece. A token that ends
    inside a multi-byte character decodes to U+FFFD: its piece stays empty and
    the next token carries the whole character.
    """

    CONTEXT_TOKENS = 6

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.pending_from = 0  # index of the first token whose text has not been returned

    def push(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        start = max(0, self.pending_from - self.CONTEXT_TOKENS)
        before = self._decode(self.token_ids[start:self.pending_from])
        after = self._decode(self.token_ids[start:])
        if after.endswith("\ufffd"):
            return ""
        self.pending_from = len(self.token_ids)
        return after[len(before):]

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, clean_up_tokenization_spaces=False) if token_ids else ""


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p``."""
    sorted_probs, sorted_ids = probs.sort(descending=True)
    cumulative = sorted_probs.cumsum(-1)
    outside = cumulative - sorted_probs >= top_p  # mass before this token already reaches top_p
    # The most likely token always stays: a top_p that rounds to 0 in float32 (such as 5e-324)
    # would otherwise remove every token and leave nothing to sample.
    outside[..., 0] = False
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter(-1, sorted_ids, sorted_probs)


def _stop_prefix_length(text: str, stop: list[str]) -> int:
    """Length of the longest end of ``text`` that begins some stop sequence."""
    longest = 0
    for sequence in stop:
        for length in range(min(len(sequence) - 1, len(text)), longest, -1):
            if text.endswith(sequence[:length]):
                longest = length
                break
    return longest


def _find_stop(text: str, stop: list[str]) -> int | None:
    """Return where the earliest stop sequence starts in ``text``, if any."""
    found = [text.find(sequence) for sequence in stop if sequence]
    found = [index for index in found if index >= 0]
    return min(found) if found else None
