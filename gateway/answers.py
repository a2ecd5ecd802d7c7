"""A request's answer in OpenAI's shapes, built from the answer events of its invocations: whole (`Assembly.body`)
or as stream chunks (what `Assembly.add` returns while streaming), with log-probabilities.

A completions request with several prompts runs one invocation per prompt, and each invocation generates
`sampling.n` sequences (its indexes). Choice `p * n + j` is prompt p's j-th choice, as OpenAI numbers them; with
best_of, a prompt's choices are its n sequences of highest cumulative log-probability, best first.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from gateway.openai_api import Parsed, Prompt
from gateway.tools import ToolStream, answer_message, finish_reason
from gpu_runtime.tokenizer import Tokenizer
from invoker.submit import Answer
from protocol.messages import Done, Failed, Restart, Start, Token, TopLogprobs

# A token with its log-probability and best alternatives; the log-probability is None for a prompt's first token
# (nothing predicts it) and when the engine sent none.
Scored = tuple[int, float | None, TopLogprobs]

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's tokens for single bytes


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (every byte drawn as a printable character), as character -> byte."""
    chars = {b: chr(b) for b in [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]}
    unprintable = [b for b in range(256) if b not in chars]
    chars |= {b: chr(256 + i) for i, b in enumerate(unprintable)}
    return {c: b for b, c in chars.items()}


_BYTE_LEVEL = _byte_level_alphabet()


def _raw_bytes(token: str) -> bytes | None:
    """The bytes a vocabulary entry stands for, when it is a byte-level or byte-fallback token."""
    match = _BYTE_FALLBACK.fullmatch(token)
    if match:
        return bytes([int(match.group(1), 16)])
    if token and all(c in _BYTE_LEVEL for c in token):
        return bytes(_BYTE_LEVEL[c] for c in token)
    return None


@functools.lru_cache(maxsize=1 << 16)
def piece(tok: Tokenizer, token_id: int) -> tuple[str, bytes]:
    """A token's text and UTF-8 bytes as log-probabilities show them. A token that is only part of a character
    has no text of its own: it reads `bytes:\\xe2\\x80`, as OpenAI writes such tokens."""
    text = tok.decode([token_id])
    raw = _raw_bytes(tok.backend.id_to_token(token_id) or "") if "\ufffd" in text else None
    if raw is None:
        return text, text.encode()
    try:
        return raw.decode(), raw
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw


def completion_logprobs(tok: Tokenizer, scored: list[Scored], offset: int) -> dict:
    """Completions' `logprobs`: each token, its log-probability, its best alternatives with the token itself (as
    OpenAI: up to k + 1 of them) and where its text starts in the choice's text (from `offset`)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, lp, top in scored:
        text = piece(tok, token_id)[0]
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append(None if lp is None else {piece(tok, t)[0]: v for t, v in top} | {text: lp})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def _chat_token(tok: Tokenizer, token_id: int, lp: float | None) -> dict:
    text, raw = piece(tok, token_id)
    return {"token": text, "logprob": lp, "bytes": list(raw)}


def chat_logprobs(tok: Tokenizer, scored: list[Scored]) -> dict:
    """Chat's `logprobs`: each token with its log-probability, bytes and its best k alternatives."""
    content = [
        {**_chat_token(tok, token_id, lp), "top_logprobs": [_chat_token(tok, t, v) for t, v in top]}
        for token_id, lp, top in scored
    ]
    return {"content": content, "refusal": None}


@dataclass
class Seq:
    """One generated sequence as its events arrive."""

    parts: list[str] = field(default_factory=list)
    tools: ToolStream | None = None  # streamed chat with tools: turns its text into content and tool_calls deltas
    scored: list[Scored] = field(default_factory=list)  # its tokens (not held-back text)
    done: Done | None = None
    offset: int = 0  # where its next token's text starts in the choice's text (streamed completions logprobs)

    def score(self) -> float:
        """Cumulative log-probability: what best_of ranks by."""
        if self.done is not None and self.done.cumulative_logprob is not None:
            return self.done.cumulative_logprob
        return sum(lp or 0.0 for _, lp, _ in self.scored)


@dataclass
class PromptAnswer:
    """The answer to one prompt: its invocation's sequences."""

    prompt: Prompt
    seqs: list[Seq]
    prompt_logprobs: tuple | None = None  # Start.prompt_logprobs (echo with logprobs)
    begun: bool = False  # streamed: its opening chunks went out
    failed: bool = False

    def complete(self) -> bool:
        return all(s.done is not None for s in self.seqs)

    def running(self) -> bool:
        """Whether a worker may still be generating it."""
        return not self.failed and not self.complete()

    def prompt_scored(self) -> list[Scored]:
        """The prompt's tokens with their log-probabilities, as far as the engine sent them."""
        rows = self.prompt_logprobs or ()
        return [(t, *(rows[k] if k < len(rows) else (None, ()))) for k, t in enumerate(self.prompt.ids)]


class Assembly:
    """One request's answer: its choices, built from the events of its invocations (one per prompt)."""

    def __init__(self, rid: str, model: str, parsed: Parsed, tok: Tokenizer, chat: bool) -> None:
        self.rid, self.model, self.parsed, self.tok, self.chat = rid, model, parsed, tok, chat
        self.answers = [self.fresh(p) for p in parsed.prompts]

    def fresh(self, prompt: Prompt) -> PromptAnswer:
        tools = self.parsed.tools if self.parsed.stream else None
        n = self.parsed.sampling.n
        seqs = [Seq(offset=len(prompt.echo), tools=None if tools is None else ToolStream(tools)) for _ in range(n)]
        return PromptAnswer(prompt, seqs)

    def complete(self) -> bool:
        return all(a.complete() for a in self.answers)

    def add(self, i: int, ev: Answer) -> list[dict]:
        """Take prompt i's next event; while streaming, return the chunk choices it makes (a `Failed` makes none:
        the caller reports it)."""
        answer = self.answers[i]
        if isinstance(ev, Failed):
            answer.failed = True
            return []
        if isinstance(ev, Restart):  # a re-run replaces the partial answer (only ever before anything was sent)
            self.answers[i] = self.fresh(answer.prompt)
            return []
        if isinstance(ev, Start) and answer.prompt_logprobs is None:
            answer.prompt_logprobs = ev.prompt_logprobs
        chunks = []
        if self.parsed.stream and not answer.begun:
            answer.begun = True
            chunks = self.opening(i)
        if isinstance(ev, Token):
            chunks += self.token(i, ev)
        elif isinstance(ev, Done):
            seq, index, reason = answer.seqs[ev.index], i * self.parsed.n + ev.index, ev.finish_reason
            seq.done = ev
            if seq.tools is not None:
                chunks += self.tool_chunks(index, seq.tools.finish())
                reason = finish_reason(reason, seq.tools.called)
            chunks.append(self.chunk_choice(index, None, self.logprobs([], 0), reason))
        return chunks if self.parsed.stream else []

    def opening(self, i: int) -> list[dict]:
        """The chunks that begin prompt i's choices: chat's assistant role, completions' echoed prompt."""
        answer, n = self.answers[i], self.parsed.n
        if self.chat:
            return [self.chunk_choice(i * n + j, "", self.logprobs([], 0), role=True) for j in range(n)]
        if not answer.prompt.echo:
            return []
        logprobs = self.logprobs(answer.prompt_scored(), 0)
        return [self.chunk_choice(i * n + j, answer.prompt.echo, logprobs) for j in range(n)]

    def token(self, i: int, ev: Token) -> list[dict]:
        seq = self.answers[i].seqs[ev.index]
        seq.parts.append(ev.text)
        scored = [] if ev.id < 0 else [(ev.id, ev.logprob, ev.top_logprobs)]  # held-back text has no token
        seq.scored += scored
        if seq.tools is not None:  # tool calls are whole deltas; their tokens' logprobs are not streamed
            return self.tool_chunks(i * self.parsed.n + ev.index, seq.tools.feed(ev.text))
        shown = self.parsed.logprobs is not None and scored  # a token's logprobs go out even without text
        if not self.parsed.stream or not (ev.text or shown):
            return []
        choice = self.chunk_choice(i * self.parsed.n + ev.index, ev.text, self.logprobs(scored, seq.offset))
        if shown:
            seq.offset += len(piece(self.tok, ev.id)[0])
        return [choice]

    def tool_chunks(self, index: int, deltas: list[dict]) -> list[dict]:
        return [{"index": index, "logprobs": None, "finish_reason": None, "delta": d} for d in deltas]

    def logprobs(self, scored: list[Scored], offset: int) -> dict | None:
        if self.parsed.logprobs is None:
            return None
        return chat_logprobs(self.tok, scored) if self.chat else completion_logprobs(self.tok, scored, offset)

    def chunk_choice(
        self, index: int, text: str | None, logprobs: dict | None, reason: str | None = None, role: bool = False
    ) -> dict:
        choice: dict = {"index": index, "logprobs": logprobs, "finish_reason": reason}
        if self.chat:
            choice["delta"] = ({"role": "assistant"} if role else {}) | ({} if text is None else {"content": text})
        else:
            choice["text"] = text or ""
        return choice

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        body = self.envelope("chat.completion.chunk" if self.chat else "text_completion", choices)
        return body if usage is None else {**body, "usage": usage}

    def envelope(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.rid, "object": kind, "created": int(time.time()), "model": self.model, "choices": choices}

    def body(self) -> dict:
        """The whole answer (non-streamed)."""
        n, choices = self.parsed.n, []
        for i, answer in enumerate(self.answers):
            seqs = answer.seqs
            if len(seqs) > n:  # best_of: the n of highest cumulative log-probability, best first
                seqs = sorted(seqs, key=Seq.score, reverse=True)[:n]
            choices += [self.choice(i * n + j, answer, seq) for j, seq in enumerate(seqs)]
        return {**self.envelope("chat.completion" if self.chat else "text_completion", choices), "usage": self.usage()}

    def choice(self, index: int, answer: PromptAnswer, seq: Seq) -> dict:
        text = answer.prompt.echo + "".join(seq.parts)
        reason = seq.done.finish_reason if seq.done else None
        choice: dict = {"index": index, "logprobs": self.whole_logprobs(answer, seq), "finish_reason": reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
            if self.parsed.tools is not None:
                choice["message"], called = answer_message(text, self.parsed.tools)
                choice["finish_reason"] = finish_reason(reason, called)
        else:
            choice["text"] = text
        return choice

    def whole_logprobs(self, answer: PromptAnswer, seq: Seq) -> dict | None:
        if self.parsed.logprobs is None or self.chat:
            return self.logprobs(seq.scored, 0)
        generated = completion_logprobs(self.tok, seq.scored, len(answer.prompt.echo))
        if not answer.prompt.echo:
            return generated
        echoed = completion_logprobs(self.tok, answer.prompt_scored(), 0)
        return {key: echoed[key] + generated[key] for key in generated}

    def usage(self) -> dict:
        """Prompt tokens once per prompt; completion tokens so far of every generated sequence (best_of's too)."""
        prompt = sum(len(a.prompt.ids) for a in self.answers)
        completion = sum(
            len(s.scored) if s.done is None else s.done.completion_tokens for a in self.answers for s in a.seqs
        )
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def merged(streams: list[AsyncIterator[Answer]]) -> AsyncIterator[tuple[int, Answer]]:
    """The events of several answers as they come, each with its stream's number (each stream's in order)."""
    if len(streams) == 1:  # the common case: no task per event (a task and a wait cost more than relaying it)
        try:
            async for ev in streams[0]:
                yield 0, ev
        finally:
            await streams[0].aclose()  # ends the answer's reader there (it unsubscribes and deletes its stream)
        return

    async def step(i: int) -> Answer | None:
        return await anext(streams[i], None)

    pending = {asyncio.create_task(step(i)): i for i in range(len(streams))}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):
                i, ev = pending.pop(task), task.result()
                if ev is None:
                    continue  # that answer ended
                pending[asyncio.create_task(step(i))] = i
                yield i, ev
    finally:
        # cancelling a read ends its answer's generator there (it unsubscribes and deletes its stream)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def resumed(early: list, events: AsyncIterator) -> AsyncIterator:
    """The items already read from `events`, then the rest of it."""
    for item in early:
        yield item
    async for item in events:
        yield item
