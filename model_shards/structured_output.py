"""Structured outputs on the model worker: each request's grammar (protocol's StructuredOutput),
compiled by xgrammar, masks the logits of its row before sampling.

Nothing here stalls the batch:
  - a grammar compiles on a background thread from the moment its request reaches the worker,
    while the request's prompt is prefilled; a step waits for it only if the compile outlasts
    the whole prefill (tens of milliseconds for a typical schema; compiled grammars are reused);
  - each step the masks are filled on the CPU (about a microsecond a row) after the forward
    pass has been queued, so on a GPU the filling overlaps the forward pass; the mask goes to
    the device from pinned memory without a sync and is applied there by xgrammar's kernel.
xgrammar (and the transformers it imports) loads on the first request that asks for a grammar.
"""

from __future__ import annotations

import concurrent.futures
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from model_folder.tokenizer import TOKENIZER_FILE, Tokenizer
from model_shards.device import host_to_device
from protocol.sampling_params import StructuredOutput

MAX_CACHED_GRAMMARS = 256
ANY_OBJECT = '{"type": "object"}'


class GrammarError(RuntimeError):
    """A grammar that could not be compiled, or a sampled token it refused."""


class GrammarCompiler:
    """One per worker: the vocabulary as xgrammar sees it, and compiled grammars by their spec."""

    def __init__(self, model_path: str, vocab_size: int):
        self.model_path = model_path
        self.vocab_size = vocab_size  # rows of the logits (lm_head), not the tokenizer's count
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="longctx-grammar")
        self._compiler: Any = None  # xgrammar.GrammarCompiler, built on the executor's thread
        self._compiled: OrderedDict[StructuredOutput, concurrent.futures.Future] = OrderedDict()

    def request_grammar(self, spec: StructuredOutput, output_token_ids: Sequence[int] = ()) -> RequestGrammar:
        """A request's grammar, compiling in the background; `output_token_ids`: tokens it has
        already produced (a preempted request that resumes), replayed into its matcher."""
        return RequestGrammar(self._compile(spec), output_token_ids)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _compile(self, spec: StructuredOutput) -> concurrent.futures.Future:
        future = self._compiled.get(spec)
        if future is None:  # a failed compile is kept too: it fails the same way again
            future = self._executor.submit(self._compile_now, spec)
        self._compiled[spec] = future
        self._compiled.move_to_end(spec)
        while len(self._compiled) > MAX_CACHED_GRAMMARS:
            self._compiled.popitem(last=False)
        return future

    def _compile_now(self, spec: StructuredOutput) -> Any:
        compiler = self._xgrammar_compiler()
        schema = ANY_OBJECT if spec.kind == "json_object" else spec.spec
        # Compact JSON: with any whitespace allowed, a weak model can emit blanks for ever.
        return compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=spec.strict)

    def _xgrammar_compiler(self) -> Any:
        if self._compiler is None:
            import transformers
            import xgrammar

            # The grammar's end allows exactly the tokens that end a request: the folder's eos ids.
            eos_token_ids = list(Tokenizer.from_folder(self.model_path).eos_token_ids) or None
            tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(Path(self.model_path) / TOKENIZER_FILE))
            info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                           stop_token_ids=eos_token_ids)
            self._compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        return self._compiler


class RequestGrammar:
    """One sequence's place in its grammar."""

    def __init__(self, compiled: concurrent.futures.Future, output_token_ids: Sequence[int] = ()):
        self._compiled = compiled
        self._matcher: Any = None
        self._replay = list(output_token_ids)

    def wait_until_compiled(self) -> None:
        self._ready_matcher()

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Allowed next tokens as bits of `bitmask[row]` (int32, (rows, ceil(vocab / 32))). After
        the grammar has ended (its stop token sampled and ignored: ignore_eos), the row is free."""
        matcher = self._ready_matcher()
        if not matcher.is_terminated():
            matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> None:
        if self._matcher is None:
            self._replay.append(token_id)
        elif not self._matcher.is_terminated() and not self._matcher.accept_token(token_id):
            raise GrammarError(f"the sampled token {token_id} breaks the request's grammar")

    def _ready_matcher(self) -> Any:
        if self._matcher is None:
            try:
                compiled = self._compiled.result()  # waits only if the compile outlasted the prefill
            except Exception as error:  # noqa: BLE001 - xgrammar raises plain RuntimeErrors
                raise GrammarError(f"the grammar could not be compiled: {error}") from None
            import xgrammar  # imported by the compile thread by now

            self._matcher = xgrammar.GrammarMatcher(compiled)
            for token_id in self._replay:
                self.accept(token_id)
        return self._matcher


def apply_grammar_masks(logits: torch.Tensor, grammars: Sequence[RequestGrammar | None]) -> torch.Tensor:
    """Disallowed tokens of each row with a grammar -> -inf, in place. `logits` (rows, vocab)."""
    rows = [row for row, grammar in enumerate(grammars) if grammar is not None]
    if not rows:
        return logits
    for row in rows:
        grammars[row].wait_until_compiled()  # xgrammar is imported on the compile thread, not here
    import xgrammar

    bitmask = xgrammar.allocate_token_bitmask(len(grammars), logits.shape[-1])  # (rows, words), all allowed
    for row in rows:
        grammars[row].fill_mask(bitmask, row)
    bitmask = host_to_device(bitmask, logits.device)
    xgrammar.apply_token_bitmask_inplace(logits, bitmask)
    return logits
