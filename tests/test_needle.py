"""Needle in a haystack: sample layout, disjoint needle streams, the training mix, scoring."""

from __future__ import annotations

import re
import string
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from nsa_lab.config import ConfigError, DataConfig, load_config, parse_depths, parse_lengths
from nsa_lab.data import NSADataModule, PackedExamples
from nsa_lab.data.mix import Draw, EpochShuffle, TrainingMix
from nsa_lab.data.needle import (
    ANSWER_TOKENS,
    EVAL_STREAM,
    OVERHEAD_TOKENS,
    TRAIN_STREAM,
    NeedleFact,
    answer_mask,
    build_sample,
    encode,
    key_split,
    needle_position,
    random_fact,
    stream_rng,
    training_sample,
)
from nsa_lab.evaluation import needle as needle_eval
from nsa_lab.evaluation.needle import (
    cell_needles,
    default_lengths,
    evaluate_model,
    exact_match,
    greedy_answers,
    make_grid,
)
from nsa_lab.evaluation.results import CellResult, NeedleResults, markdown_table, write_results
from nsa_lab.models import GQATransformer
from tests.test_attention_layers import SMALL as LAYER_SMALL

FACT_RE = re.compile(r"The pass key of ([A-Za-z]+) is #(\d+)\.")
QA_RE = re.compile(r"Q: the pass key of ([A-Za-z]+) is #(\d+)\.")
CPU = torch.device("cpu")


def letters_haystack(n: int) -> np.ndarray:
    """Lower-case text whose every token says where it came from (no digits, no '#')."""
    return encode((string.ascii_lowercase * (n // 26 + 1))[:n])


def text_of(tokens: np.ndarray | torch.Tensor) -> str:
    return bytes(int(t) for t in tokens if int(t) < 256).decode()


@pytest.mark.parametrize("depth", [0.0, 0.37, 0.5, 1.0])
@pytest.mark.parametrize("length", [OVERHEAD_TOKENS + 1, 300, 1024])
def test_sample_has_the_requested_length_and_the_needle_at_the_requested_depth(length, depth):
    haystack = letters_haystack(2000)
    fact = NeedleFact("Bakodi", "012345")
    sample = build_sample(haystack, fact, depth, length)
    h = length - OVERHEAD_TOKENS

    assert len(sample.tokens) == length
    assert sample.needle_start == round(depth * h)
    needle = encode(fact.needle)
    assert np.array_equal(sample.tokens[sample.needle_start :][: len(needle)], needle)
    assert text_of(sample.tokens[sample.question_start : sample.answer_start]) == fact.question
    assert text_of(sample.tokens[sample.answer_start :]) == "012345."
    assert len(sample.prompt) == length - ANSWER_TOKENS
    # Around the needle the haystack's first h tokens stay in order, none lost or repeated.
    rest = np.concatenate(
        [sample.tokens[: sample.needle_start], sample.tokens[sample.needle_start + len(needle) :]]
    )
    assert np.array_equal(rest[:h], haystack[:h])


def test_depth_zero_and_one_are_the_ends_of_the_haystack():
    assert needle_position(0.0, 500) == 0
    assert needle_position(1.0, 500) == 500
    with pytest.raises(ValueError, match="depth"):
        needle_position(1.5, 500)
    with pytest.raises(ValueError, match="more than"):
        build_sample(letters_haystack(100), NeedleFact("Bakodi", "0" * 6), 0.5, OVERHEAD_TOKENS)


def test_cell_prompts_hide_one_eval_needle_at_the_depth_in_held_out_text():
    haystack = letters_haystack(5000)
    prompts, facts = cell_needles(haystack, 400, 0.25, trials=6, seed=3)
    assert prompts.shape == (6, 400 - ANSWER_TOKENS)
    h = 400 - OVERHEAD_TOKENS
    for row, fact in zip(prompts, facts, strict=True):
        text = text_of(row)
        assert text.index(fact.needle) == round(0.25 * h)
        assert text.endswith(fact.question)
        assert FACT_RE.findall(text) == [(fact.key, fact.value)]
        assert key_split(fact.key) == "eval"
    again, _ = cell_needles(haystack, 400, 0.25, trials=6, seed=3)
    assert np.array_equal(prompts, again)  # a cell's needles depend on the seed alone


def test_train_and_eval_needles_are_disjoint():
    train = [random_fact(stream_rng(TRAIN_STREAM, 0, i), "train") for i in range(3000)]
    evals = [random_fact(stream_rng(EVAL_STREAM, 0, i), "eval") for i in range(3000)]
    assert {f.key for f in train}.isdisjoint({f.key for f in evals})
    assert {key_split(f.key) for f in train} == {"train"}
    assert {key_split(f.key) for f in evals} == {"eval"}
    # The two halves of the key space are both used (the partition is not degenerate).
    assert len({f.key for f in train}) > 2900 and len({f.key for f in evals}) > 2900


def test_the_training_mix_only_ever_shows_training_needles():
    base = PackedExamples(letters_haystack(40_000), 256)
    mix = TrainingMix(base, needle_fraction=1.0, seed=0)
    keys = set()
    for index in list(range(0, len(mix), 7)) + [len(mix) + 3, 5 * len(mix) + 11]:
        inputs, targets = mix[index]
        keys |= {key for key, _ in FACT_RE.findall(text_of(torch.cat([inputs, targets[-1:]])))}
    assert len(keys) > 20
    assert {key_split(k) for k in keys} == {"train"}


def test_training_window_answers_every_question_it_asks():
    window = letters_haystack(1025)
    sample = training_sample(window, stream_rng(TRAIN_STREAM, 1, 2), OVERHEAD_TOKENS + 16)
    text = text_of(sample)
    assert len(sample) == 1025
    facts = FACT_RE.findall(text)
    assert facts and QA_RE.findall(text) == facts
    # Without the inserted parts, what is left is the window's own text, in order.
    plain = QA_RE.sub("", FACT_RE.sub("", text)).replace("\nQ: ", "").replace("\n", "")
    assert text_of(window).startswith(plain)


def test_mix_is_deterministic_replaces_the_fraction_and_renews_needles_each_epoch():
    base = PackedExamples(letters_haystack(200 * 128 + 1), 128)
    mix = TrainingMix(base, needle_fraction=0.3, seed=5)
    n = len(mix)
    replaced = [not torch.equal(mix[i][0], base[i][0]) for i in range(n)]
    assert 0.2 < np.mean(replaced) < 0.4
    assert all(torch.equal(mix[i][0], TrainingMix(base, 0.3, 5)[i][0]) for i in range(20))
    first = next(i for i in range(n) if replaced[i])
    other_epochs = [mix[first + e * n][0] for e in range(1, 4)]
    assert not any(torch.equal(mix[first][0], x) for x in other_epochs)
    inputs, targets = mix[first]
    assert torch.equal(inputs[1:], targets[:-1])  # still next-token pairs


def test_answer_mask_marks_exactly_the_targets_that_are_answers():
    window = letters_haystack(1025)
    sample = torch.from_numpy(training_sample(window, stream_rng(TRAIN_STREAM, 3, 4), 90))
    inputs, targets = sample[:-1].view(1, -1), sample[1:].view(1, -1)
    mask = answer_mask(inputs)
    answers = "".join(value + "." for _, value in QA_RE.findall(text_of(sample)))
    assert answers and text_of(targets[mask]) == answers
    # A question cut off before its answer starts marks nothing past the row's end.
    question_end = int(mask[0].nonzero()[0])
    assert not answer_mask(inputs[:, : question_end - 1]).any()
    assert answer_mask(inputs[:, : question_end + 1]).sum() == 1


def test_curriculum_serves_short_rows_then_whole_windows():
    base = PackedExamples(letters_haystack(40 * 512 + 1), 512)
    mix = TrainingMix(base, needle_fraction=1.0, seed=2, short_len=128)
    n = len(mix)
    for epoch, short, shape in [(0, True, (4, 128)), (2, True, (4, 128)), (0, False, (512,))]:
        inputs, targets = mix[Draw(epoch * n + 7, short)]
        assert inputs.shape == targets.shape == shape
        assert torch.equal(inputs[..., 1:], targets[..., :-1])
    # Each short row is a sample of its own: its questions are about its own needles.
    inputs, targets = mix[Draw(3, True)]
    for row_in, row_tg in zip(inputs, targets, strict=True):
        text = text_of(torch.cat([row_in, row_tg[-1:]]))
        assert FACT_RE.findall(text) and QA_RE.findall(text) == FACT_RE.findall(text)
    # Without needles the rows are the window's own tokens, cut.
    plain = TrainingMix(base, needle_fraction=0.0, seed=2, short_len=128)
    inputs, targets = plain[Draw(5, True)]
    assert torch.equal(inputs.flatten(), base[5][0]) and torch.equal(targets.flatten(), base[5][1])


@pytest.mark.parametrize(("batch", "replicas", "short_batches"), [(4, 1, 0), (4, 1, 7), (3, 2, 5)])
def test_curriculum_ends_after_its_batches_mid_epoch_and_across_epochs(
    batch, replicas, short_batches
):
    n = 40
    per_epoch = (-(-n // replicas) // batch) * batch  # draws a process trains on per epoch
    for rank in range(replicas):
        sampler = EpochShuffle(n, 1, replicas, rank, batch_size=batch, short_batches=short_batches)
        flags = []
        for epoch in range(3):
            sampler.set_epoch(epoch)
            flags += [draw.short for draw in sampler][:per_epoch]
        assert flags == [i // batch < short_batches for i in range(3 * per_epoch)]


def test_epoch_shuffle_is_a_seeded_permutation_offset_by_the_epoch():
    sampler = EpochShuffle(10, seed=1)
    first = [draw.index for draw in sampler]
    assert sorted(first) == list(range(10))
    assert first == [draw.index for draw in EpochShuffle(10, seed=1)]
    sampler.set_epoch(2)
    second = [draw.index for draw in sampler]
    assert sorted(second) == list(range(20, 30))
    assert [i - 20 for i in second] != first


def test_datamodule_mixes_needles_into_training_only():
    plain = NSADataModule(DataConfig(seq_len=256, batch_size=4), seed=0)
    mixed = NSADataModule(DataConfig(seq_len=256, batch_size=4, needle_fraction=0.5), seed=0)
    plain.setup()
    mixed.setup()
    assert isinstance(mixed.train_set, TrainingMix) and isinstance(plain.train_set, PackedExamples)
    assert np.array_equal(np.asarray(mixed.val_set.tokens), np.asarray(plain.val_set.tokens))
    assert mixed.n_train_tokens == plain.n_train_tokens
    loader = mixed.train_dataloader()
    assert isinstance(loader.sampler, EpochShuffle)
    texts = [text_of(row) for row in next(iter(loader))[0]]
    assert any(FACT_RE.search(t) for t in texts)


def test_needles_need_room_in_the_training_window():
    data = NSADataModule(DataConfig(seq_len=64, batch_size=4, needle_fraction=0.1), seed=0)
    with pytest.raises(ConfigError, match="data.seq_len=64"):
        data.setup()
    short = DataConfig(
        seq_len=256, batch_size=4, needle_fraction=0.1, curriculum_seq_len=64, curriculum_steps=5
    )
    with pytest.raises(ConfigError, match="data.curriculum_seq_len=64"):
        NSADataModule(short, seed=0).setup()


def test_datamodule_serves_the_curriculum_for_its_steps():
    cfg = DataConfig(seq_len=256, batch_size=4, curriculum_seq_len=128, curriculum_steps=3)
    data = NSADataModule(cfg, seed=0, accumulate=2)
    data.setup()
    shapes = [batch[0].shape for _, batch in zip(range(8), data.train_dataloader(), strict=False)]
    # 3 optimizer steps of 2 batches each are short, the rest whole.
    assert shapes == [(4, 2, 128)] * 6 + [(4, 256)] * 2


def test_exact_match_needs_the_digits_and_the_full_stop():
    fact = NeedleFact("Bakodi", "004217")
    assert exact_match("004217.", fact)
    assert not exact_match("004217 ", fact)
    assert not exact_match("04217..", fact)
    assert not exact_match(" 004217", fact)
    assert not exact_match("004218.", fact)


def tail(logits: torch.Tensor, last_positions: int | None) -> torch.Tensor:
    """What ``GQATransformer(idx, last_positions)`` returns, given the full logits."""
    return logits if last_positions is None else logits[:, logits.shape[1] - last_positions :]


class Uncached(nn.Module):
    """A model's ``generate`` (greedy) the slow way: a forward pass over the whole
    sequence per token, for models that have no KV cache."""

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> Iterator[torch.Tensor]:
        tokens = prompt
        for _ in range(max_new_tokens):
            token = self(tokens, last_positions=1)[:, -1].argmax(dim=-1)
            yield token
            tokens = torch.cat([tokens, token[:, None]], dim=1)


class NextByte(Uncached):
    """Predicts ``last token + 1``: a model whose greedy output is known in advance."""

    def forward(self, idx: torch.Tensor, last_positions: int | None = None) -> torch.Tensor:
        return tail(nn.functional.one_hot((idx + 1) % 257, 257).float(), last_positions)


class Oracle(Uncached):
    """Reads the needle's value off the prompt: the answer a perfect retriever gives."""

    def forward(self, idx: torch.Tensor, last_positions: int | None = None) -> torch.Tensor:
        logits = torch.zeros(*idx.shape, 257)
        for b, row in enumerate(idx.tolist()):
            text = text_of(row)
            value = FACT_RE.search(text).group(2) + "."
            done = len(text) - text.rindex("#") - 1
            logits[b, -1, ord(value[done])] = 1.0
        return tail(logits, last_positions)


class FullLogits(Uncached):
    """``model`` computing the logits of every position and slicing afterwards: the
    memory-hungry path that ``last_positions`` replaces; it generates without a cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, last_positions: int | None = None) -> torch.Tensor:
        return tail(self.model(idx), last_positions)


def long_context_model(length: int, variant: str = "nsa") -> GQATransformer:
    """A tiny float64 model for contexts of ``length``; NSA's selection is sparse at any
    length over 24 (3 blocks of 8), the window spans 12 tokens.

    On the CPU the PyTorch NSA op takes seconds a forward pass at 1024 tokens, the window
    a tenth of that.
    """
    cfg = load_config(
        overrides=[
            *LAYER_SMALL,
            f"attn.name={variant}",
            "attn.impl=torch",
            "model.n_layers=2",
            f"model.max_seq_len={length}",
            f"data.seq_len={length}",
        ]
    )
    torch.manual_seed(0)
    return GQATransformer(cfg.model, cfg.attn, 257).double().eval()


def test_greedy_answers_append_the_argmax_token_by_token():
    prompts = np.array([[10, 11], [200, 3]])
    out = greedy_answers(NextByte(), prompts, CPU)
    assert out.tolist() == [[12, 13, 14, 15, 16, 17, 18], [4, 5, 6, 7, 8, 9, 10]]


def test_last_positions_are_the_tail_of_the_full_logits():
    model = long_context_model(64)
    idx = torch.randint(0, 257, (2, 45))
    with torch.no_grad():
        full = model(idx)
        torch.testing.assert_close(model(idx, last_positions=1), full[:, -1:], rtol=0, atol=1e-12)
        torch.testing.assert_close(model(idx, last_positions=7), full[:, -7:], rtol=0, atol=1e-12)
        assert torch.equal(model(idx, last_positions=45), full)
        with pytest.raises(ValueError, match="last_positions=46"):
            model(idx, last_positions=46)


def test_long_prompts_get_the_same_answers_batched_or_not_and_without_a_cache(monkeypatch):
    """At 1024 tokens, all trials in one batch, one per batch, and full forward passes of
    the whole sequence per token (no KV cache) generate the same tokens (NSA's batching
    is tested by the selection diagnosis, its cached decoding by ``test_decoding``)."""
    length = 1024
    model = long_context_model(length, "window")
    prompts, _ = cell_needles(letters_haystack(3 * length), length, 0.3, trials=2, seed=0)
    batched = greedy_answers(model, prompts, CPU)
    assert batched.shape == (2, ANSWER_TOKENS)
    assert torch.equal(greedy_answers(FullLogits(model), prompts, CPU), batched)
    monkeypatch.setattr(needle_eval, "TOKENS_PER_BATCH", length)  # one prompt per batch
    assert torch.equal(greedy_answers(model, prompts, CPU), batched)


def test_evaluation_scores_a_perfect_retriever_100_and_a_blind_model_0():
    haystack = letters_haystack(3000)
    grid = make_grid(256, 256, lengths=[128, 256], depths=[0, 0.5, 1], trials=3)
    perfect = evaluate_model(Oracle(), haystack, grid, CPU)
    assert [(c.length, c.depth, c.correct) for c in perfect] == [
        (n, d, 3) for n in (128, 256) for d in (0.0, 0.5, 1.0)
    ]
    assert all(c.correct == 0 for c in evaluate_model(NextByte(), haystack, grid, CPU))


def test_grid_defaults_follow_the_trained_length():
    assert default_lengths(1024) == (256, 512, 1024)
    assert default_lengths(8192) == (2048, 4096, 8192)
    assert default_lengths(16384) == (4096, 8192, 16384)
    assert default_lengths(128) == (128,)
    assert make_grid(8192, 8192, lengths=parse_lengths("8k")).lengths == (8192,)
    grid = make_grid(1024, 1024)
    assert grid.lengths == (256, 512, 1024)
    assert grid.depths[0] == 0.0 and grid.depths[-1] == 1.0 and len(grid.depths) == 11
    assert grid.trials == 20


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"lengths": [2048]}, "--lengths"),
        ({"lengths": [OVERHEAD_TOKENS]}, "--lengths"),
        ({"depths": [0.5, 1.2]}, "--depths"),
        ({"trials": 0}, "--trials"),
    ],
)
def test_bad_grid_options_are_config_errors(kwargs, key):
    with pytest.raises(ConfigError) as info:
        make_grid(1024, 1024, **kwargs)
    assert info.value.key == key


def test_grid_options_parse_and_reject_junk():
    assert parse_lengths("256, 512,1k") == [256, 512, 1024]
    assert parse_depths("0,0.25,1") == [0.0, 0.25, 1.0]
    with pytest.raises(ConfigError, match="--lengths"):
        parse_lengths("256,abc")
    with pytest.raises(ConfigError, match="--depths"):
        parse_depths("half")


def test_haystack_too_short_for_the_length_is_a_config_error():
    with pytest.raises(ConfigError, match="held-out haystack"):
        cell_needles(letters_haystack(100), 400, 0.5, trials=2, seed=0)


def sample_results() -> NeedleResults:
    cells = [
        CellResult(256, 0.0, 4, 4),
        CellResult(256, 0.5, 4, 2),
        CellResult(512, 0.0, 4, 1),
        CellResult(512, 0.5, 4, 0),
    ]
    return NeedleResults(cells, {"variant": "nsa"})


def test_results_give_the_agreed_metric_names_and_means():
    metrics = sample_results().metrics()
    assert metrics == {
        "needle/acc": pytest.approx(7 / 16),
        "needle/acc_len_256": 0.75,
        "needle/acc_len_512": 0.125,
        "needle/acc_256_0": 1.0,
        "needle/acc_256_50": 0.5,
        "needle/acc_512_0": 0.25,
        "needle/acc_512_50": 0.0,
    }


def test_results_table_and_files(tmp_path):
    results = sample_results()
    table = markdown_table(results)
    assert "| depth \\ length | 256 | 512 |" in table
    assert "| 50% | 50 | 0 |" in table and "| **mean** | 75.0 | 12.5 |" in table
    json_path, csv_path, png_path = write_results(results, tmp_path)
    assert '"acc": 0.4375' in json_path.read_text()
    assert csv_path.read_text().splitlines()[2] == "256,0.5,4,2,0.5000"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (json_path, csv_path, png_path)
    )
