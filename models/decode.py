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
from models.heads import ConstraintHeads, HeadsCache

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
        sequence = torch.tensor([prompt_ids + output_ids], device=self.base.device)
        # Logits at position i predict token i + 1, so one more than the output is kept.
        outputs = self.base.model(input_ids=sequence, output_hidden_states=True, logits_to_keep=len(output_ids) + 1)
        logprobs = torch.log_softmax(outputs.logits[0, :-1].float(), dim=-1)
        output_logprobs = logprobs[torch.arange(len(output_ids)), torch.tensor(output_ids)].tolist()
        heads_out = self.heads(self.heads.select_hidden_states(outputs.hidden_states).to(self.heads.readout_bias.dtype))

        logits, weights = heads_out.constraint_logits[0], heads_out.attention_weights[0]
        prompt_pieces = IncrementalDetokenizer(self.base.tokenizer)
        output_pieces = IncrementalDetokenizer(self.base.tokenizer)
        split = len(prompt_ids)
        prompt_trace = self.trace_tokens(0, prompt_ids, [prompt_pieces.push(t) for t in prompt_ids],
                                         [None] * split, logits[:split], weights[:, :split])
        output_trace = self.trace_tokens(split, output_ids, [output_pieces.push(t) for t in output_ids],
                                         output_logprobs, logits[split:], weights[:, split:])
        return prompt_trace, output_trace

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
        scores = torch.sigmoid(constraint_logits.float()).tolist()
        k = min(self.top_k_attention, attention_weights.shape[-1])
        top_weights, top_positions = attention_weights.float().topk(k, dim=-1)  # (C, t, k)
        top_weights, top_positions = top_weights.tolist(), top_positions.tolist()
        traces = []
        for offset, token_id in enumerate(token_ids):
            attention = {}
            for c, constraint in enumerate(self.constraints):
                visible = min(k, start + offset + 1)  # a token attends only to itself and earlier ones
                attention[constraint] = list(zip(top_positions[c][offset][:visible], top_weights[c][offset][:visible]))
            traces.append(TokenTrace(start + offset, token_id, pieces[offset], logprobs[offset],
                                     dict(zip(self.constraints, scores[offset])), attention))
        return traces


class DecodeSession:
    """One request's decoding state: KV caches, sampler, text and stop handling."""

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
        self._past_key_values = None
        self._heads_cache: HeadsCache | None = None
        self._next_logits: torch.Tensor | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @torch.inference_mode()
    def prefill(self) -> list[TokenTrace]:
        """Run the prompt through the base model and the heads; return the prompt's trace."""
        input_ids = torch.tensor([self.prompt_ids], device=self.model.base.device)
        outputs = self.model.base.model(input_ids=input_ids, use_cache=True, output_hidden_states=True,
                                        logits_to_keep=1)
        self._past_key_values = outputs.cache
        self._next_logits = outputs.logits[0, -1].float()
        heads_out = self._run_heads(outputs.hidden_states)

        prompt_detokenizer = IncrementalDetokenizer(self.model.base.tokenizer)
        pieces = [prompt_detokenizer.push(token_id) for token_id in self.prompt_ids]
        self.prompt_trace = self.model.trace_tokens(0, self.prompt_ids, pieces, [None] * len(self.prompt_ids),
                                                    heads_out.constraint_logits[0], heads_out.attention_weights[0])
        return self.prompt_trace

    def _run_heads(self, hidden_states: tuple[torch.Tensor, ...]):
        tap = self.model.heads.select_hidden_states(hidden_states).to(self.model.heads.readout_bias.dtype)
        heads_out = self.model.heads(tap, cache=self._heads_cache)
        self._heads_cache = heads_out.cache
        return heads_out

    @torch.inference_mode()
    def step(self) -> TokenTrace:
        """Sample the next token, run it through both models, and return its trace."""
        if self._next_logits is None:
            self.prefill()
        token_id, logprob, alternatives = self._sample(self._next_logits)
        position = len(self.prompt_ids) + len(self.output_ids)
        self.output_ids.append(token_id)
        piece = self._append_text(token_id)

        outputs = self.model.base.model(input_ids=torch.tensor([[token_id]], device=self.model.base.device),
                                        cache=self._past_key_values, use_cache=True,
                                        output_hidden_states=True)
        self._past_key_values = outputs.cache
        self._next_logits = outputs.logits[0, -1].float()
        heads_out = self._run_heads(outputs.hidden_states)
        trace = self.model.trace_tokens(position, [token_id], [piece], [logprob],
                                        heads_out.constraint_logits[0], heads_out.attention_weights[0])[0]
        trace.top_logprobs = alternatives
        self.output_trace.append(trace)
        self._update_finish_reason(token_id, trace)
        return trace

    def _sample(self, logits: torch.Tensor) -> tuple[int, float, list[tuple[int, str, float]] | None]:
        """Return the sampled token id, its logprob and, if requested, the most likely alternatives."""
        logprobs = torch.log_softmax(logits, dim=-1)
        scaled_logits = logits / self.params.temperature if self.params.temperature > 0 else None
        # A temperature near 0 (such as 1e-300) overflows the scaled logits to inf, and softmax then
        # gives NaN; sampling at such a temperature is greedy decoding in the limit.
        if scaled_logits is None or not torch.isfinite(scaled_logits).all():
            token_id = int(torch.argmax(logits))
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
        return token_id, float(logprobs[token_id]), alternatives

    def _append_text(self, token_id: int) -> str:
        piece = self._detokenizer.push(token_id)
        if token_id not in self._special_ids:
            self._visible += piece
        return piece

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
