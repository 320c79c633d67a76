"""``nsa-lab generate``: greedy and sampled continuation of a checkpoint's prompt, streamed
text that never splits a character, and bad input refused before the model runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from nsa_lab.cli import main
from nsa_lab.config import ConfigError, load_config
from nsa_lab.data import NSADataModule
from nsa_lab.data.tokenizer import ByteTokenizer, Tokenizer, train_bpe
from nsa_lab.evaluation.generate import (
    ByteStream,
    PieceStream,
    generate_run,
    run_tokenizer,
    text_stream,
)
from nsa_lab.models import GQATransformer
from nsa_lab.training.module import LanguageModel
from tests.test_attention_layers import SMALL as LAYER_SMALL

MAX_SEQ_LEN = 64
BYTES = ByteTokenizer()
# Characters of one to four UTF-8 bytes.
MIXED = "aé€🙂 naïve 日本語 ok"


def make_checkpoint(
    folder: Path, variant: str = "nsa", *overrides: str, vocab_size: int = BYTES.vocab_size
) -> Path:
    """A tiny untrained model (byte-level unless ``overrides`` say otherwise) saved as a
    training checkpoint; its weights are livelier than the 0.02 init, so that the greedy
    choice is never a near tie."""
    cfg = load_config(
        overrides=[
            *LAYER_SMALL,
            f"attn.name={variant}",
            "attn.impl=torch",
            "model.n_layers=2",
            f"model.max_seq_len={MAX_SEQ_LEN}",
            f"data.seq_len={MAX_SEQ_LEN}",
            "data.source=builtin",
            *overrides,
        ]
    )
    torch.manual_seed(0)
    module = LanguageModel(OmegaConf.to_container(cfg, resolve=True), vocab_size)
    for p in module.parameters():
        p.data.normal_(0.0, 0.3)
    path = folder / f"{variant}.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("generate"))


def loaded_model(path: Path) -> GQATransformer:
    ckpt = torch.load(path, weights_only=False)
    module = LanguageModel(**ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    return module.model.eval()


def argmax_continuation(
    model: GQATransformer, prompt: str, n: int, tokenizer: Tokenizer = BYTES
) -> list[int]:
    """The greedy continuation the slow way: a whole forward pass per token, up to EOS."""
    tokens = torch.from_numpy(tokenizer.encode(prompt).astype("int64"))[None]
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(tokens)[0, -1].argmax())
            if token == tokenizer.eos_id:
                break
            out.append(token)
            tokens = torch.cat([tokens, torch.tensor([[token]])], dim=1)
    return out


def streamed(stream: ByteStream | PieceStream, ids: list[int]) -> list[str]:
    return [piece for piece in (*map(stream.push, ids), stream.finish()) if piece]


def test_generate_prints_the_greedy_continuation_of_full_forwards(checkpoint, capsys):
    assert (
        main(
            [
                "generate",
                str(checkpoint),
                "--prompt",
                "abc",
                "--max-new-tokens",
                "5",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    expected = argmax_continuation(loaded_model(checkpoint), "abc", 5)
    assert len(expected) > 0
    assert out == BYTES.decode(expected) + "\n"


@pytest.mark.parametrize("variant", ["full", "window", "nsa_shared_kv"])
def test_generation_is_the_argmax_of_full_forwards_for_other_variants(tmp_path, variant):
    path = make_checkpoint(tmp_path, variant)
    generation = generate_run(str(path), 30, prompt=MIXED, device="cpu", out=_Sink())
    assert generation.tokens == argmax_continuation(loaded_model(path), MIXED, 30)
    assert generation.text == BYTES.decode(generation.tokens)


def test_a_bpe_run_decodes_with_the_bpe_of_its_token_cache(tmp_path, capsys):
    cache = tmp_path / "token_cache"
    bpe = ["data.tokenizer=bpe", "data.vocab_size=512", f"data.cache_dir={cache}"]
    path = make_checkpoint(tmp_path, "nsa", *bpe, vocab_size=512)
    cfg = load_config(overrides=[*bpe, f"data.seq_len={MAX_SEQ_LEN}"])
    data = NSADataModule(cfg.data, cfg.train.seed, cache_dir=cache)
    data.prepare_data()  # what training leaves: the BPE and the tokens in the cache
    files = sorted(cache.iterdir())
    tokenizer = run_tokenizer(cfg, 512)
    assert tokenizer.digest == data.tokenizer.digest
    assert sorted(cache.iterdir()) == files  # the same entry, not a second BPE
    with pytest.raises(ConfigError, match="gives 512 token ids, the run's model has 257"):
        run_tokenizer(cfg, 257)

    args = ["generate", str(path), "--prompt", MIXED, "--max-new-tokens", "12", "--device", "cpu"]
    assert main(args) == 0
    expected = argmax_continuation(loaded_model(path), MIXED, 12, tokenizer)
    assert expected
    assert capsys.readouterr().out == tokenizer.decode(expected) + "\n"


def test_a_prompt_file_is_continued_like_the_same_prompt_text(checkpoint, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(MIXED)
    args = ["generate", str(checkpoint), "--max-new-tokens", "9", "--device", "cpu"]
    assert main([*args, "--prompt", MIXED]) == 0
    typed = capsys.readouterr().out
    assert main([*args, "--prompt-file", str(prompt)]) == 0
    assert capsys.readouterr().out == typed


def test_sampling_is_reproducible_for_a_seed(checkpoint):
    def sample(seed: int, top_k: int | None = 5) -> list[int]:
        return generate_run(
            str(checkpoint),
            20,
            prompt="abc",
            temperature=0.8,
            top_k=top_k,
            seed=seed,
            device="cpu",
            out=_Sink(),
        ).tokens

    assert sample(0) == sample(0)
    assert sample(1) == sample(1)
    assert len({tuple(sample(seed, top_k=None)) for seed in range(4)}) > 1


class _Sink:
    """A stdout that records each write and each flush."""

    def __init__(self) -> None:
        self.events: list[str | None] = []  # None: a flush

    def write(self, text: str) -> None:
        self.events.append(text)

    def flush(self) -> None:
        self.events.append(None)


def _scripted(tokens: list[int]):
    """A ``GQATransformer.generate`` that yields ``tokens`` one by one."""

    def generate(self, prompt, max_new_tokens, **kwargs):
        for token in tokens[:max_new_tokens]:
            yield torch.tensor([token])

    return generate


def test_text_streams_out_whole_characters_flushed_as_they_complete(checkpoint, monkeypatch):
    ids = list(BYTES.encode(MIXED))
    monkeypatch.setattr(GQATransformer, "generate", _scripted(ids))
    sink = _Sink()
    generation = generate_run(str(checkpoint), len(ids), prompt="abc", device="cpu", out=sink)
    assert generation.text == MIXED and not generation.ended
    writes = [e for e in sink.events if e is not None]
    assert writes == [*MIXED, "\n"]  # one character per write: none split, none held back
    assert all(e is None for e in sink.events[1::2])  # every write is flushed at once


def test_generation_stops_at_the_end_of_the_document(checkpoint, monkeypatch, capsys):
    script = [*BYTES.encode("hi é"), BYTES.eos_id, *BYTES.encode("next document")]
    monkeypatch.setattr(GQATransformer, "generate", _scripted(script))
    assert (
        main(
            [
                "generate",
                str(checkpoint),
                "--prompt",
                "abc",
                "--max-new-tokens",
                "20",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out == "hi é\n"
    assert "ended the document after 5 tokens" in captured.err


def test_the_byte_stream_never_splits_a_multibyte_character():
    ids = list(BYTES.encode(MIXED))
    pieces = streamed(ByteStream(), ids)
    assert "".join(pieces) == MIXED
    assert pieces == list(MIXED)
    # A four-byte character arrives in four tokens: nothing until the last one.
    stream = ByteStream()
    assert [stream.push(b) for b in "🙂".encode()] == ["", "", "", "🙂"]
    # What cannot become a character is replaced, as ByteTokenizer.decode does; EOS is no text.
    broken = [0xE2, 0x82, ord("x"), BYTES.eos_id, 0xF0, 0x9F]
    assert "".join(streamed(ByteStream(), broken)) == BYTES.decode(broken) == "\ufffdx\ufffd"


def test_the_bpe_stream_holds_back_pieces_of_a_character():
    tokenizer = train_bpe([MIXED * 20, "plain ascii text " * 50], vocab_size=300)
    assert isinstance(text_stream(tokenizer), PieceStream)
    assert isinstance(text_stream(BYTES), ByteStream)
    ids = [int(i) for i in tokenizer.encode(MIXED * 2)]
    pieces = streamed(PieceStream(tokenizer), ids)
    assert "".join(pieces) == tokenizer.decode(ids) == MIXED * 2
    assert all("\ufffd" not in piece for piece in pieces)
    # A character the BPE never saw is several byte tokens: held back, then written whole.
    ids = [int(i) for i in tokenizer.encode("a\U0001d11eb")]  # a, G clef (4 bytes), b
    stream = PieceStream(tokenizer)
    pieces = [stream.push(i) for i in ids]
    assert len(ids) >= 6 and "" in pieces and "\U0001d11e" in "".join(pieces)
    assert "".join(pieces) + stream.finish() == "a\U0001d11eb"
    assert all("\ufffd" not in piece for piece in pieces)


def test_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--help"])
    assert exit_info.value.code == 0
    assert "example: nsa-lab generate" in capsys.readouterr().out


def test_bad_input_exits_2_naming_the_option_before_the_model_runs(
    checkpoint, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(GQATransformer, "generate", lambda *a, **k: pytest.fail("the model ran"))
    monkeypatch.chdir(tmp_path)
    ckpt = str(checkpoint)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    long_prompt = "x" * (MAX_SEQ_LEN - 4)
    ok = [ckpt, "--prompt", "abc", "--max-new-tokens", "5"]  # a later option replaces a value
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cases = [
        ([*ok, "--max-new-tokens", "0"], "--max-new-tokens=0: must be >= 1"),
        ([*ok, "--max-new-tokens", "-3"], "--max-new-tokens=-3: must be >= 1"),
        ([str(tmp_path / "missing.ckpt"), *ok[1:]], "missing.ckpt': is neither a checkpoint"),
        (["0" * 32, *ok[1:], "--tracking-uri", uri], f"RUN='{'0' * 32}': no such run"),
        ([*ok, "--prompt", ""], "--prompt='': must not be empty"),
        ([ckpt, "--max-new-tokens", "5"], "--prompt=None: is required"),
        ([*ok, "--prompt-file", str(empty)], "give either --prompt or --prompt-file"),
        ([ckpt, "--prompt-file", "nope.txt", *ok[3:]], "--prompt-file='nope.txt': cannot"),
        ([ckpt, "--prompt-file", str(empty), *ok[3:]], "empty.txt': is empty"),
        ([*ok, "--temperature", "-0.5"], "--temperature=-0.5: must be >= 0"),
        ([*ok, "--temperature", "nan"], "--temperature=nan: must be >= 0"),
        ([*ok, "--temperature", "0.8", "--top-k", "0"], "--top-k=0: must be >= 1"),
        ([*ok, "--device", "tpu"], "--device='tpu'"),
        (
            [*ok, "--prompt", long_prompt],
            f"--max-new-tokens=5: no sliding policy: prompt tokens + --max-new-tokens must be "
            f"<= model.max_seq_len={MAX_SEQ_LEN}; the prompt is {MAX_SEQ_LEN - 4} tokens: "
            "at most 4 new tokens",
        ),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(["generate", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err, (args, err)
        # One line (after MLflow's notes when it opens a store), no traceback.
        assert "Traceback" not in err and err.splitlines()[-1].startswith("nsa-lab: error:"), err
    # At the limit it fits.
    monkeypatch.setattr(GQATransformer, "generate", _scripted([ord("y")] * 4))
    assert main(["generate", *ok, "--prompt", long_prompt, "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == "yyyy\n"


def test_generate_run_raises_config_errors_for_direct_callers(checkpoint):
    with pytest.raises(ConfigError, match="--max-new-tokens"):
        generate_run(str(checkpoint), 0, prompt="abc")


def test_a_run_id_against_a_missing_sqlite_store_creates_nothing(tmp_path, capsys):
    store = tmp_path / "absent.db"
    argv = ["generate", "0123456789abcdef0123456789abcdef", "--prompt", "a",
            "--max-new-tokens", "2", "--tracking-uri", f"sqlite:///{store}"]  # fmt: skip
    assert main(argv) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not store.exists()
