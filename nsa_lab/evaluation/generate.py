"""Text from a trained run: ``nsa-lab generate``.

The prompt is encoded with the run's own tokenizer, run through the model once
(prefill, filling the KV caches), and each new token is one cached step
(:meth:`~nsa_lab.models.transformer.GQATransformer.generate`). Greedy by default
(``temperature=0``); otherwise sampled at the temperature, over the ``top_k`` most
likely tokens when given, reproducibly for a ``seed``. Generation stops early when the
model ends the document (its EOS token, which is not printed).

The text is written as the tokens arrive, never splitting a character:
:class:`ByteStream` feeds byte tokens through an incremental UTF-8 decoder,
:class:`PieceStream` holds BPE pieces back while they end in an incomplete character.

There is no sliding window over the context: prompt and new tokens together must fit
``model.max_seq_len``. Every option is checked before the model runs.
"""

from __future__ import annotations

import codecs
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from omegaconf import DictConfig

from nsa_lab.config import ConfigError
from nsa_lab.data.tokenizer import ByteTokenizer, Tokenizer
from nsa_lab.evaluation.loading import load_run
from nsa_lab.evaluation.needle import eval_autocast, eval_device

DEFAULT_TEMPERATURE = 0.0  # greedy
_REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class Generation:
    """What :func:`generate_run` wrote: the text, the new token ids, and whether the
    model ended the document (EOS) before ``max_new_tokens``."""

    text: str
    tokens: list[int]
    ended: bool


class ByteStream:
    """Byte tokens -> text through an incremental UTF-8 decoder: a character whose bytes
    come in several tokens is written once its last byte is in. Ids that are not bytes
    (EOS) give no text; invalid UTF-8 becomes U+FFFD, as in :meth:`ByteTokenizer.decode`."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        """The text that ``token`` completes (possibly none)."""
        return self._decoder.decode(bytes([token])) if 0 <= token < 256 else ""

    def finish(self) -> str:
        """What is left: an incomplete character at the end becomes U+FFFD."""
        return self._decoder.decode(b"", final=True)


class PieceStream:
    """Tokens of any tokenizer -> text: the tokens not yet written are decoded together,
    and held back while their text ends in U+FFFD (a multi-byte character that later
    tokens may complete). Written pieces end on a character boundary, so the pieces
    join to the decoding of all tokens at once."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._pending: list[int] = []

    def push(self, token: int) -> str:
        self._pending.append(token)
        text = self._tokenizer.decode(self._pending)
        if text.endswith(_REPLACEMENT):
            return ""
        self._pending = []
        return text

    def finish(self) -> str:
        text = self._tokenizer.decode(self._pending)
        self._pending = []
        return text


def text_stream(tokenizer: Tokenizer) -> ByteStream | PieceStream:
    """The streaming decoder for ``tokenizer``."""
    return ByteStream() if isinstance(tokenizer, ByteTokenizer) else PieceStream(tokenizer)


def run_tokenizer(cfg: DictConfig, vocab_size: int) -> Tokenizer:
    """The tokenizer the run trained with (``data.tokenizer``), checked against the
    model's ``vocab_size``.

    A BPE lives in the token cache of the run's corpus (``nsa-lab train`` and
    ``nsa-lab prepare`` put it there); it is looked up as the data module does, and
    learnt again only if that cache no longer holds it.
    """
    if cfg.data.tokenizer == "byte":
        tokenizer: Tokenizer = ByteTokenizer()
    else:
        from nsa_lab.data import NSADataModule, cache_dir_for

        data = NSADataModule(
            cfg.data, cfg.train.seed, cache_dir=cache_dir_for(cfg.data, cfg.tracking.uri)
        )
        tokenizer = data.prepare_tokenizer()
    if tokenizer.vocab_size != vocab_size:
        raise ConfigError(
            "data.tokenizer",
            cfg.data.tokenizer,
            f"gives {tokenizer.vocab_size} token ids, the run's model has {vocab_size}",
        )
    return tokenizer


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    """The decoding options, before anything is loaded."""
    if max_new_tokens < 1:
        raise ConfigError("--max-new-tokens", max_new_tokens, "must be >= 1")
    if not math.isfinite(temperature) or temperature < 0:
        raise ConfigError("--temperature", temperature, "must be >= 0 (0: greedy)")
    if top_k is not None and top_k < 1:
        raise ConfigError("--top-k", top_k, "must be >= 1")


def prompt_bytes(prompt: str | None, prompt_file: str | None) -> bytes:
    """The prompt as bytes: ``prompt`` (as typed: bytes the shell passed that are not
    UTF-8 are kept), or the bytes of ``prompt_file`` as they are. Exactly one of the two,
    not empty."""
    if prompt is not None and prompt_file is not None:
        raise ConfigError("--prompt-file", prompt_file, "give either --prompt or --prompt-file")
    if prompt is None and prompt_file is None:
        raise ConfigError("--prompt", None, "is required (or --prompt-file F)")
    if prompt is not None:
        if not prompt:
            raise ConfigError("--prompt", prompt, "must not be empty")
        return prompt.encode("utf-8", errors="surrogateescape")
    try:
        data = Path(prompt_file).read_bytes()
    except OSError as exc:
        raise ConfigError("--prompt-file", prompt_file, f"cannot be read: {exc.strerror}") from None
    if not data:
        raise ConfigError("--prompt-file", prompt_file, "is empty")
    return data


def check_fits(prompt_tokens: int, max_new_tokens: int, max_seq_len: int) -> None:
    """Prompt and new tokens must fit the model's context: nothing slides."""
    if prompt_tokens + max_new_tokens > max_seq_len:
        room = max_seq_len - prompt_tokens
        hint = f"at most {room} new tokens after this prompt" if room >= 1 else "shorten the prompt"
        raise ConfigError(
            "--max-new-tokens",
            max_new_tokens,
            f"no sliding policy: prompt tokens + --max-new-tokens must be <= "
            f"model.max_seq_len={max_seq_len}; the prompt is {prompt_tokens} tokens: {hint}",
        )


def generate_run(
    ref: str,
    max_new_tokens: int,
    prompt: str | None = None,
    prompt_file: str | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int | None = None,
    seed: int = 0,
    device: str = "auto",
    tracking_uri: str | None = None,
    out: TextIO | None = None,
) -> Generation:
    """Continue a prompt with the checkpoint or MLflow run ``ref``, writing the text to
    ``out`` (stdout) token by token and a newline at the end.

    Every option is checked, and the run and its tokenizer loaded, before the model runs.
    """
    out = out or sys.stdout
    torch_device = eval_device(device)
    check_sampling(max_new_tokens, temperature, top_k)
    raw = prompt_bytes(prompt, prompt_file)
    loaded = load_run(ref, tracking_uri)
    model = loaded.module.model
    tokenizer = run_tokenizer(loaded.cfg, model.embed.num_embeddings)
    ids = tokenizer.encode(raw)
    check_fits(len(ids), max_new_tokens, model.max_seq_len)

    model = model.to(torch_device).eval()
    generator = torch.Generator(device=torch_device).manual_seed(seed)
    prompt_ids = torch.from_numpy(ids.astype("int64"))[None].to(torch_device)
    stream = text_stream(tokenizer)
    pieces: list[str] = []
    tokens: list[int] = []
    ended = False

    def write(text: str) -> None:
        if text:
            pieces.append(text)
            out.write(text)
            out.flush()

    with torch.no_grad(), eval_autocast(torch_device):
        steps = model.generate(
            prompt_ids,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            generator=generator,
        )
        for token in steps:
            token_id = int(token[0])
            if token_id == tokenizer.eos_id:
                ended = True
                break
            tokens.append(token_id)
            write(stream.push(token_id))
    write(stream.finish())
    out.write("\n")
    out.flush()
    if ended:
        print(
            f"nsa-lab: note: the model ended the document after {len(tokens)} tokens",
            file=sys.stderr,
        )
    return Generation("".join(pieces), tokens, ended)
