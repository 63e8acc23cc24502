"""Fast tests of text loading, splitting, tokenization, sampling and evaluation, on a pico Llama.

The shared texts beside the repository are read through the `wikitext` and `shakespeare` fixtures: without them
the tests that read them skip here and fail in CI, and the others still run."""

import json
import math

import pyarrow as pa  # installed with datasets: a requirement, never skipped
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mla_convert import data
from mla_convert.data import (
    CALIBRATION_PART,
    EVALUATION_PART,
    TextPart,
    load_text,
    open_text_stream,
    tokenize_into_sequences,
)
from mla_convert.errors import MLAConvertError
from mla_convert.evaluate import ReferenceLogProbs, ScoredBatch, evaluate, score_batches
from mla_convert.sampling import sample_from_model
from mla_convert.verify import compare_logits

from conftest import build_pico, byte_tokenizer, shared_text, token_ids


SOURCE = "llama-gqa"
VOCAB_SIZE = 258  # the pico models' (256 bytes and 2 specials)


@pytest.fixture(scope="module")
def shakespeare():
    return shared_text("tinyshakespeare.txt")


@pytest.fixture(scope="module")
def bpe_tokenizer(shakespeare):
    """A 300-token byte-level BPE trained on a little Shakespeare: real enough merges, built in well under a second."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet()),
        show_progress=False,
    )
    backend.train_from_iterator([shakespeare.read_text(encoding="utf-8")[:50_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tokenizer():
    """The pico models' tokenizer."""
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    return build_pico(SOURCE)


@pytest.fixture(scope="module")
def other():
    """Another pico Llama of the same shape: a reference that disagrees with `model`."""
    return build_pico(SOURCE, seed=1)


# --- parts and descriptions -------------------------------------------------------------------------------------


def test_describe():
    assert CALIBRATION_PART.describe() == "first 80%"
    assert EVALUATION_PART.describe() == "last 20%"
    assert TextPart(0.2, 0.4).describe() == "20%-40%"
    assert TextPart(0.0, 1.0).describe() == "all"
    assert TextPart(0.0, 0.125).describe() == "first 12.5%"


@pytest.mark.parametrize("start,end", [(0.5, 0.5), (0.8, 0.2), (-0.1, 0.5), (0.0, 1.5)])
def test_invalid_part(start, end):
    with pytest.raises(MLAConvertError, match="invalid text part"):
        TextPart(start, end)


def test_calibration_and_evaluation_parts_split_a_text_exactly(wikitext):
    whole = wikitext.read_text(encoding="utf-8")
    calibration, calibration_desc = load_text(str(wikitext), CALIBRATION_PART)
    evaluation, evaluation_desc = load_text(str(wikitext), EVALUATION_PART)
    # Together they are the whole text, in order: no overlap and nothing lost.
    assert calibration + evaluation == whole
    # Cut at a line boundary near 80% of the characters.
    assert calibration.endswith("\n")
    assert abs(len(calibration) / len(whole) - 0.8) < 0.01
    cut = len(calibration)
    assert calibration_desc == f"wikitext2_valid.txt, first 80% (chars 0-{cut})"
    assert evaluation_desc == f"wikitext2_valid.txt, last 20% (chars {cut}-{len(whole)})"


def test_adjacent_parts_tile_the_text(shakespeare):
    whole = shakespeare.read_text(encoding="utf-8")
    cuts = [0.0, 0.2, 0.4, 0.9, 1.0]
    pieces = [load_text(str(shakespeare), TextPart(a, b))[0] for a, b in zip(cuts, cuts[1:])]
    assert "".join(pieces) == whole


def test_max_chars_keeps_the_start_of_the_part(wikitext):
    evaluation, _ = load_text(str(wikitext), EVALUATION_PART)
    capped, description = load_text(str(wikitext), EVALUATION_PART, max_chars=10_000)
    assert len(capped) <= 10_000 and evaluation.startswith(capped) and capped.endswith("\n")
    assert description.startswith("wikitext2_valid.txt, last 20% (chars ")


def test_records_are_split_by_index(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": f"record {i}"}) + "\n" for i in range(10)))
    calibration, calibration_desc = load_text(str(path), CALIBRATION_PART)
    evaluation, evaluation_desc = load_text(str(path), EVALUATION_PART)
    assert calibration.split("\n\n") == [f"record {i}" for i in range(8)]
    assert evaluation.split("\n\n") == ["record 8", "record 9"]
    assert calibration_desc.startswith("records.jsonl, first 80% (records 0-8 of 10")
    assert evaluation_desc.startswith("records.jsonl, last 20% (records 8-10 of 10")


def test_json_parquet_and_folder_sources(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps([{"body": "alpha"}, {"body": "beta"}]))
    rows = {"body": ["gamma", "delta", "epsilon", "zeta", "eta"], "n": list(range(5))}
    pq.write_table(pa.table(rows), folder / "b.parquet")
    text, _ = load_text(str(folder), TextPart(0.0, 1.0), text_column="body")
    assert text == "alpha\n\nbeta\n\ngamma\n\ndelta\n\nepsilon\n\nzeta\n\neta"
    text, _ = load_text(str(folder / "b.parquet"), EVALUATION_PART, text_column="body")
    assert text == "eta"
    # Two records have no last 20%.
    with pytest.raises(MLAConvertError, match=r"no text in a.json, last 20% \(records 2-2 of 2"):
        load_text(str(folder / "a.json"), EVALUATION_PART, text_column="body")


# --- errors -------------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(MLAConvertError, match="not found"):
        load_text(str(tmp_path / "nope.txt"), EVALUATION_PART)
    with pytest.raises(MLAConvertError, match="not found"):
        load_text("./no/such/folder", EVALUATION_PART)


def test_missing_column(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"content": "a", "id": 1}) + "\n" + json.dumps({"content": "b", "id": 2}) + "\n")
    with pytest.raises(MLAConvertError, match=r"no 'text' column; available columns: \['content', 'id'\]"):
        load_text(str(path), CALIBRATION_PART)


def test_missing_parquet_column(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"content": ["a", "b"]}), path)
    with pytest.raises(MLAConvertError, match=r"no 'text' column; available columns: \['content'\]"):
        load_text(str(path), CALIBRATION_PART)


def test_empty_text(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n\n")
    with pytest.raises(MLAConvertError, match="no text in empty.txt, first 80%"):
        load_text(str(path), CALIBRATION_PART)


# --- tokenization -------------------------------------------------------------------------------------------------


def test_tokenize_into_sequences(bpe_tokenizer, wikitext, monkeypatch):
    text, _ = load_text(str(wikitext), EVALUATION_PART, max_chars=20_000)
    sequences = tokenize_into_sequences(bpe_tokenizer, text, seq_len=64, max_tokens=1000)
    assert sequences.shape == (15, 64) and sequences.dtype == torch.long
    # Without a limit: every whole window of the text, no special tokens added.
    ids = bpe_tokenizer(text, add_special_tokens=False)["input_ids"]
    everything = tokenize_into_sequences(bpe_tokenizer, text, seq_len=64, max_tokens=None)
    assert everything.shape == (len(ids) // 64, 64)
    # Consecutive windows of the text's tokens, in order; the limit keeps the first ones.
    assert everything.flatten().tolist() == ids[: everything.numel()]
    assert torch.equal(sequences, everything[:15])
    assert bpe_tokenizer.bos_token_id not in everything

    # Tokenization stops at the chunk that reaches max_tokens instead of tokenizing the whole text.
    monkeypatch.setattr(data, "TOKENIZE_CHUNK_CHARS", 1_000)
    calls = []
    counting = lambda *args, **kwargs: calls.append(1) or bpe_tokenizer(*args, **kwargs)  # noqa: E731
    assert tokenize_into_sequences(counting, text, seq_len=64, max_tokens=256).shape == (4, 64)
    assert 1 <= len(calls) < 10


def test_too_little_text(tokenizer):
    with pytest.raises(MLAConvertError, match="fewer than one sequence of 512"):
        tokenize_into_sequences(tokenizer, "Too short.", seq_len=512, max_tokens=None)
    with pytest.raises(MLAConvertError, match="10 tokens do not fill one sequence of 64"):
        tokenize_into_sequences(tokenizer, "Some text " * 100, seq_len=64, max_tokens=10)


# --- evaluation ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sequences(tokenizer, wikitext):
    text, _ = load_text(str(wikitext), EVALUATION_PART, max_chars=20_000)
    return tokenize_into_sequences(tokenizer, text, seq_len=32, max_tokens=32 * 6)


@torch.no_grad()
def direct_scores(model, reference, sequences) -> dict[str, float]:
    """The metrics computed in one go from both models' full logits, as their definitions say."""
    targets = sequences[:, 1:]
    log_q = model(sequences).logits[:, :-1].log_softmax(-1)
    log_p = reference(sequences).logits[:, :-1].log_softmax(-1)
    nll = -log_q.gather(-1, targets[..., None]).mean()
    reference_nll = -log_p.gather(-1, targets[..., None]).mean()
    return {
        "perplexity": float(nll.exp()),
        "reference_perplexity": float(reference_nll.exp()),
        "kl": float((log_p.exp() * (log_p - log_q)).sum(-1).mean()),  # KL(reference || model) per position
        "top1_agreement": float((log_q.argmax(-1) == log_p.argmax(-1)).double().mean()),
    }


def test_evaluate_against_itself(model, sequences):
    results = evaluate(model, sequences, reference=model, batch_size=4, progress=False)
    assert results["tokens"] == 6 * 31
    assert results["kl"] == pytest.approx(0.0, abs=1e-9)
    assert results["top1_agreement"] == 1.0
    assert results["perplexity"] == pytest.approx(results["reference_perplexity"])
    alone = evaluate(model, sequences, progress=False)
    assert alone.keys() == {"perplexity", "nll", "tokens"}
    expected = direct_scores(model, model, sequences)["perplexity"]
    assert alone["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert alone["nll"] == pytest.approx(math.log(expected), rel=1e-5)


def test_evaluate_against_another_model(model, other, sequences):
    results = evaluate(model, sequences, reference=other, batch_size=4, progress=False)
    expected = direct_scores(model, other, sequences)
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, rel=1e-5), key
    # The two models differ, so the comparison says something: not a KL of 0 nor full agreement.
    assert expected["kl"] > 0.01 and expected["top1_agreement"] < 1.0
    # Batching must not change the result.
    one_by_one = evaluate(model, sequences, reference=other, batch_size=1, progress=False)
    assert one_by_one["kl"] == pytest.approx(results["kl"], rel=1e-5)
    assert one_by_one["perplexity"] == pytest.approx(results["perplexity"], rel=1e-5)


def test_cached_reference_gives_what_the_reference_model_gives(model, other, sequences):
    cached = ReferenceLogProbs(other, sequences, batch_size=4, progress=False)
    direct = evaluate(model, sequences, reference=other, batch_size=4, progress=False)
    results = evaluate(model, sequences, reference=cached, batch_size=4, progress=False)
    for key in ("kl", "reference_perplexity", "perplexity", "top1_agreement"):
        assert results[key] == pytest.approx(direct[key], rel=1e-3), key
    with pytest.raises(MLAConvertError, match="other sequences or batches"):
        evaluate(model, sequences, reference=cached, batch_size=2, progress=False)


def test_sequences_beyond_the_models_positions_warn(model, caplog):
    with caplog.at_level("WARNING"):
        evaluate(model, token_ids(1, 520, vocab=VOCAB_SIZE), progress=False)
    assert "sequences of 520 tokens are longer than the model's max_position_embeddings (512)" in caplog.text


def test_evaluate_rejects_foreign_token_ids(model):
    with pytest.raises(MLAConvertError, match="outside the model's vocabulary"):
        evaluate(model, torch.full((1, 8), VOCAB_SIZE), progress=False)


def test_non_finite_logits_are_never_agreement(model, sequences):
    """NaN logits agree with each other under argmax: the scoring core must count them as broken, not as top-1."""
    logits = torch.randn(2, 5, 11)
    broken = logits.clone()
    broken[0, 1, 3] = float("nan")
    broken[1, 4] = float("inf")
    sums = score_batches([ScoredBatch(broken, torch.zeros(2, 5, dtype=torch.long), broken.clone())])
    assert sums.nonfinite == 2 and sums.agreements == 8 and sums.tokens == 10
    with pytest.raises(MLAConvertError, match="NaN or infinite logits at 2 of 10 positions"):
        sums.require_finite("the model")

    nan_model = build_pico(SOURCE)
    with torch.no_grad():
        nan_model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(MLAConvertError, match="NaN or infinite logits"):
        evaluate(nan_model, sequences, reference=model, progress=False)
    with pytest.raises(MLAConvertError, match="NaN or infinite logits"):
        evaluate(nan_model, sequences, progress=False)
    # conversion's check of its result against the source goes through the same core
    assert compare_logits(model, model, sequences[:2])["top1_agreement"] == 1.0
    with pytest.raises(MLAConvertError, match="the converted model \\(or its source\\) gives NaN"):
        compare_logits(model, nan_model, sequences[:2])


# --- data-free calibration ----------------------------------------------------------------------------------------


def test_sample_from_model(model, tokenizer):
    torch.manual_seed(1234)
    expected_next = torch.rand(1)
    torch.manual_seed(1234)
    first = sample_from_model(model, tokenizer, num_tokens=100, seq_len=20, seed=7, batch_size=2, progress=False)
    # The caller's random stream is not consumed by sampling.
    assert torch.equal(torch.rand(1), expected_next)
    assert first.shape == (5, 20) and first.dtype == torch.long
    assert (first[:, 0] == tokenizer.bos_token_id).all()
    assert ((first >= 0) & (first < VOCAB_SIZE)).all()
    again = sample_from_model(model, tokenizer, num_tokens=100, seq_len=20, seed=7, batch_size=2, progress=False)
    assert torch.equal(first, again)
    other = sample_from_model(model, tokenizer, num_tokens=100, seq_len=20, seed=8, batch_size=2, progress=False)
    assert not torch.equal(first, other)
    # A partial last row is rounded up to a whole one.
    assert sample_from_model(model, tokenizer, 41, 20, seed=7, batch_size=4, progress=False).shape == (3, 20)

    # End-of-sequence is suppressed so that every row is full length, even from a model that all but insists on it.
    eager_to_end = build_pico(SOURCE)
    bump = torch.zeros(VOCAB_SIZE)
    bump[tokenizer.eos_token_id] = 30.0
    eager_to_end.lm_head.register_forward_hook(lambda module, args, output: output + bump)
    rows = sample_from_model(eager_to_end, tokenizer, num_tokens=40, seq_len=20, seed=7, batch_size=2, progress=False)
    assert rows.shape == (2, 20) and tokenizer.eos_token_id not in rows


def test_hub_dataset_is_streamed_by_record_index(monkeypatch):
    """The hub path, with `datasets.load_dataset` replaced by a local stand-in: tests never touch the network."""
    import datasets

    def fake_load_dataset(name, config=None, split=None, streaming=False):
        assert (name, config, split, streaming) == ("someone/corpus", "en", "train", True)
        rows = {"text": [f"doc {i}" for i in range(10)], "id": list(range(10))}
        dataset = datasets.Dataset.from_dict(rows).to_iterable_dataset()
        dataset.info.splits = datasets.SplitDict({"train": datasets.SplitInfo(name="train", num_examples=10)})
        return dataset

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    # The stand-in is the hub here: reachable whatever HF_HUB_OFFLINE and the network say.
    monkeypatch.setattr(data, "require_hub", lambda what: None)
    text, description = load_text("someone/corpus:en", EVALUATION_PART)
    assert text == "doc 8\n\ndoc 9"
    assert description == "someone/corpus:en@train, last 20% (records 8-10 of 10, 12 chars)"
    # Capped at a line boundary, as a local file of the same records is: reading stops once the cut is known.
    text, description = load_text("someone/corpus:en@train", CALIBRATION_PART, max_chars=20)
    assert text == "doc 0\n\ndoc 1\n\ndoc 2\n"
    assert description.endswith("(records 0-8 of 10, first 20 of its chars)")
    with pytest.raises(MLAConvertError, match=r"no 'body' column; available columns: \['id', 'text'\]"):
        load_text("someone/corpus:en", EVALUATION_PART, text_column="body")


# --- streaming ----------------------------------------------------------------------------------------------------


def test_small_read_blocks_cut_a_text_file_at_the_same_line_starts(shakespeare, monkeypatch):
    """A text file is read in blocks; where the blocks end must not move the cuts (nor lose characters)."""
    expected = [load_text(str(shakespeare), part)[0] for part in (CALIBRATION_PART, EVALUATION_PART)]
    monkeypatch.setattr(data, "READ_BLOCK_CHARS", 997)
    monkeypatch.setattr(data, "TOKENIZE_CHUNK_CHARS", 5_000)
    for part, text in zip((CALIBRATION_PART, EVALUATION_PART), expected):
        (record,) = list(open_text_stream(str(shakespeare), part).records())
        pieces = list(record)
        assert "".join(pieces) == text
        assert all(len(piece) <= 5_000 and piece.endswith(("\n", " ")) for piece in pieces[:-1])


def test_records_stream_from_any_index(tmp_path):
    """Rows of a folder of .jsonl and .parquet files, in path order, from a record index on (how healing resumes);
    blank records are kept as records without text, so that indexes stay those of the source."""
    texts = [f"record {i} " + "word " * (i % 7) for i in range(23)]
    texts[5] = "   "
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts[:10])))
    pq.write_table(pa.table({"text": texts[10:]}), tmp_path / "b.parquet")
    stream = open_text_stream(str(tmp_path), CALIBRATION_PART)
    assert stream.description == f"{tmp_path.name}, first 80% (records 0-18 of 23)"
    records = ["".join(record) for record in stream.records()]
    assert records == [t if t.strip() else "" for t in texts[:18]]
    assert ["".join(record) for record in stream.records(8)] == records[8:]
    held_out = ["".join(record) for record in open_text_stream(str(tmp_path), EVALUATION_PART).records()]
    assert held_out == texts[18:]
