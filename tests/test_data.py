"""jaxgpt.data on the real GPT-2 tokenizer and the shared chat files.

Masks are checked token by token against a ChatML rendering written here in
plain Python (not the Jinja template under test), with the tokenizer's own
character offsets deciding which turn each token belongs to.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt.data import (DataConfig, DataError, DataIterator, DataSource, build_dataset, build_datasets,
                         eval_batches, main, pack_best_fit)
from jaxgpt.model import GPT2, GPT2Config
from jaxgpt.tokenizer import add_chat_template, load_tokenizer

from conftest import shared_path

IM_END = 50258


@pytest.fixture(scope="module")
def tok():
    return add_chat_template(load_tokenizer())


def oasst():
    return str(shared_path("chat", "oasst_en100_messages.jsonl"))


def sharegpt():
    return str(shared_path("chat", "sharegpt_identity.json"))


def original_messages(path: str) -> dict[str, list[dict]]:
    """``path:LINE`` -> messages, read with plain json (ShareGPT roles mapped by hand)."""
    out = {}
    if path.endswith(".jsonl"):
        for n, line in enumerate(open(path), 1):
            out[f"{path}:{n}"] = json.loads(line)["messages"]
    else:
        text = open(path).read()
        records = json.loads(text)
        # each record starts on the line of its opening brace, in order
        lines = [n for n, line in enumerate(text.splitlines(), 1) if line == "  {"]
        assert len(lines) == len(records)
        roles = {"human": "user", "gpt": "assistant", "system": "system"}
        for n, rec in zip(lines, records):
            out[f"{path}:{n}"] = [{"role": roles[c["from"]], "content": c["value"]} for c in rec["conversations"]]
    return out


def chatml(messages):
    """Render ChatML and the character spans of each turn: (text, [(role, start, end)])."""
    text, spans = "", []
    for m in messages:
        text += f"<|im_start|>{m['role']}\n"
        start = len(text)
        text += m["content"].strip() + "<|im_end|>"
        spans.append((m["role"], start, len(text)))
        text += "\n"
    return text, spans


# ----------------------------------------------------------------------------- acceptance 1: the loss mask


@pytest.mark.parametrize("source", [oasst, sharegpt])
def test_only_assistant_tokens_and_every_end_of_turn_are_trained(tok, source):
    path = source()
    ds = build_dataset(DataConfig(sources=[path], seq_len=4096), tok)  # no truncation: whole conversations
    originals = original_messages(path)
    assert ds.num_segments == len(originals) and ds.stats.truncated == 0
    n_checked = 0
    for k in range(ds.num_segments):
        ids, mask = ds.segment(k)
        text, spans = chatml(originals[ds.segment_sources[k]])
        enc = tok(text, return_offsets_mapping=True)
        assert ids.tolist() == enc["input_ids"]  # the template renders exactly this text
        for j, (a, b) in enumerate(enc["offset_mapping"]):
            turn = [(role, s, e) for role, s, e in spans if s <= a and b <= e]
            in_reply = bool(turn) and turn[0][0] == "assistant"
            # trained <=> the token lies inside an assistant reply (content + <|im_end|>); nothing else
            assert bool(mask[j]) == in_reply, (ds.segment_sources[k], j, tok.decode([ids[j]]))
            if ids[j] == IM_END:
                assert bool(mask[j]) == (turn[0][0] == "assistant")
            n_checked += 1
        n_replies = sum(m["role"] == "assistant" for m in originals[ds.segment_sources[k]])
        assert int(mask[ids == IM_END].sum()) == n_replies  # every reply's end-of-turn is trained
    assert n_checked == ds.stats.tokens


def test_loss_on_completion_and_all(tok):
    path = oasst()
    multi = [w for w, m in original_messages(path).items() if len(m) >= 4][:20]
    lines = sorted(int(w.rsplit(":", 1)[1]) for w in multi)
    cfg = dict(sources=[path], seq_len=4096, max_examples=lines[-1])
    completion = build_dataset(DataConfig(loss_on="completion", **cfg), tok)
    everything = build_dataset(DataConfig(loss_on="all", **cfg), tok)
    originals = original_messages(path)
    for k in range(completion.num_segments):
        ids, mask = completion.segment(k)
        messages = originals[completion.segment_sources[k]]
        trained = tok.decode(ids[mask.astype(bool)].tolist())
        assert trained == messages[-1]["content"].strip() + "<|im_end|>"  # only the final reply
        _, all_mask = everything.segment(k)
        assert all_mask.all()
    assert everything.stats.trained_tokens == everything.stats.tokens - everything.num_segments


def test_other_formats_render_as_chat(tmp_path, tok):
    f = tmp_path / "mixed"
    f.mkdir()
    (f / "a.jsonl").write_text(
        json.dumps({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}) + "\n")
    (f / "b.jsonl").write_text(json.dumps({"prompt": "Say hi", "completion": " hi"}) + "\n"
                               + json.dumps({"prompt": "Say yo", "completion": "yo"}) + "\n")
    ds = build_dataset(DataConfig(sources=[str(f / "a.jsonl"), str(f / "b.jsonl")], seq_len=64), tok)
    assert ds.stats.formats == {str(f / "a.jsonl"): "alpaca", str(f / "b.jsonl"): "prompt_completion"}
    texts = sorted(tok.decode(ds.segment(k)[0].tolist()) for k in range(ds.num_segments))
    assert texts == sorted([
        "<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n",
        "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n",
        "<|im_start|>user\nSay yo<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"])


def test_plain_text_chunks_train_every_token_once(tmp_path):
    tok = load_tokenizer()
    f = tmp_path / "doc.txt"
    f.write_text("To be, or not to be, that is the question.\n" * 40)
    ds = build_dataset(DataConfig(sources=[str(f)], seq_len=32), tok)
    ids = tok(f.read_text())["input_ids"] + [tok.eos_token_id]
    assert len(tok) == 50257  # text data adds no chat tokens
    rows = ds.batch(range(ds.num_rows))
    targets = rows["targets"][rows["loss_mask"] > 0]
    assert sorted(targets.tolist()) == sorted(ids[1:])  # every token but the first is a target exactly once
    assert ds.stats.trained_tokens == len(ids) - 1


# ----------------------------------------------------------------------------- acceptance 2: packing


def test_packed_rows_decode_to_the_original_conversations(tok):
    path = oasst()
    ds = build_dataset(DataConfig(sources=[path], seq_len=1024), tok)
    originals = original_messages(path)
    batch = ds.batch(range(ds.num_rows))
    seen, n_long = [], 0
    for r in range(ds.num_rows):
        seg = batch["segment_ids"][r]
        n_seg = int(seg.max())
        assert n_seg == len(ds.row_segment_ids(r))
        used = int((seg > 0).sum())
        assert (seg[used:] == 0).all() and (seg[:used] > 0).all()  # padding only at the end
        assert (np.diff(seg[:used]) >= 0).all() and set(seg[:used]) == set(range(1, n_seg + 1))
        assert (batch["loss_mask"][r][seg == 0] == 0).all()
        for s, k in enumerate(ds.row_segment_ids(r), 1):
            at = seg == s
            np.testing.assert_array_equal(batch["positions"][r][at], np.arange(at.sum()))
            inputs, targets = batch["input_ids"][r][at], batch["targets"][r][at]
            np.testing.assert_array_equal(inputs[1:], targets[:-1])  # targets are the inputs shifted by one
            tokens = np.append(inputs, targets[-1])
            where = ds.segment_sources[k]
            text, _ = chatml(originals[where])
            full = tok(text)["input_ids"]
            if len(full) <= ds.seq_len + 1:
                assert tok.decode(tokens.tolist()) == text
            else:  # truncated to a row: exactly its first seq_len + 1 tokens
                assert tokens.tolist() == full[: ds.seq_len + 1]
                n_long += 1
            seen.append(where)
    assert sorted(seen) == sorted(originals)  # every conversation exactly once
    assert ds.stats.truncated == n_long > 0
    assert ds.stats.rows == ds.num_rows and 0.5 < ds.stats.packing_efficiency <= ds.stats.fill <= 1


def test_best_fit_decreasing():
    rows = pack_best_fit(np.array([6, 5, 4, 3, 2, 2, 1]), 8)
    assert sorted(sorted(r) for r in rows) == [[0, 4], [1, 3], [2, 5, 6]]  # 6+2, 5+3, 4+2+1
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=500)
    rows = pack_best_fit(lengths, 100)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(lengths[r].sum() <= 100 for r in rows)
    assert len(rows) <= int(np.ceil(lengths.sum() / 100 * 11 / 9)) + 1  # BFD's 11/9 OPT + 6/9 bound


def test_packed_logits_equal_logits_alone(tok):
    """With segment ids and per-segment positions, packing changes no conversation's logits."""
    ds = build_dataset(DataConfig(sources=[sharegpt()], seq_len=128, max_examples=60), tok)
    r = max(range(ds.num_rows), key=lambda i: len(ds.row_segment_ids(i)))
    assert len(ds.row_segment_ids(r)) >= 3
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2)
    # random weights straight from numpy (eager nnx init compiles op by op: slow on a busy CPU)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT2(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.5, s.shape), jnp.float32), state)
    forward = jax.jit(lambda st, ids, pos, seg: nnx.merge(graphdef, st)(ids, positions=pos, segment_ids=seg))

    batch = ds.batch([r])
    n_seg, seg_ids = len(ds.row_segment_ids(r)), batch["segment_ids"][0]
    # Row 0: the packed row. Row 1: the same tokens without segment masking. Rows 2..: each conversation
    # alone as a plain causal sequence (positions 0.., one segment), right-padded; padding after a
    # sequence cannot change its logits under the causal mask, so one batch runs them all.
    ids = np.full((n_seg + 2, 128), ds.pad_id, np.int32)
    pos = np.broadcast_to(np.arange(128, dtype=np.int32), ids.shape).copy()
    seg = np.ones_like(ids)
    ids[:2], pos[0], seg[0] = batch["input_ids"][0], batch["positions"][0], seg_ids
    for s in range(1, n_seg + 1):
        conv = batch["input_ids"][0][seg_ids == s]
        ids[s + 1, : len(conv)] = conv
    logits = np.asarray(forward(state, ids, pos, seg))
    assert np.abs(logits).max() > 1.0  # big enough for the tolerance to mean something
    for s in range(1, n_seg + 1):
        at = seg_ids == s
        np.testing.assert_allclose(logits[0, at], logits[s + 1, : at.sum()], atol=1e-4, rtol=0)
    # and the masking is what makes it so: without it the later conversations' logits differ
    last = seg_ids == n_seg
    assert np.abs(logits[1, last] - logits[n_seg + 1, : last.sum()]).max() > 1e-2


# ----------------------------------------------------------------------------- acceptance 3: the iterator


@pytest.fixture(scope="module")
def small(tok):
    return build_dataset(DataConfig(sources=[sharegpt()], seq_len=128, max_examples=120), tok)


def take(it, n):
    return [next(it) for _ in range(n)]


def same(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)


def test_iterator_epochs_shuffle_and_cover_every_row(small):
    n = small.num_rows
    it = DataIterator(small, global_batch=1, seed=3)
    epoch0 = [int(b["input_ids"][0].sum()) for b in take(it, n)]
    epoch1 = [int(b["input_ids"][0].sum()) for b in take(it, n)]
    every = [int(small.batch([r])["input_ids"][0].sum()) for r in range(n)]
    assert sorted(epoch0) == sorted(every) == sorted(epoch1) and epoch0 != epoch1
    b = next(DataIterator(small, global_batch=4, seed=3))
    assert {k: (v.dtype, v.shape) for k, v in b.items()} == {
        "input_ids": (np.int32, (4, 128)), "targets": (np.int32, (4, 128)), "loss_mask": (np.float32, (4, 128)),
        "segment_ids": (np.int32, (4, 128)), "positions": (np.int32, (4, 128))}


def test_iterator_resume_is_byte_identical(small):
    a = DataIterator(small, global_batch=6, seed=7)
    first = take(a, small.num_rows // 6 + 3)  # past an epoch boundary
    saved = json.loads(json.dumps(a.state()))  # what a checkpoint stores
    expected = take(a, 5)
    b = DataIterator(small, global_batch=6, seed=7).restore(saved)
    assert saved["epoch"] == 1
    assert all(same(x, y) for x, y in zip(expected, take(b, 5)))
    c = DataIterator(small, global_batch=6, seed=8)
    assert not all(same(x, y) for x, y in zip(first, take(c, len(first))))  # the seed matters
    with pytest.raises(DataError, match="seed 7 != 8"):
        DataIterator(small, global_batch=6, seed=8).restore(saved)


def test_two_processes_together_equal_one(small):
    one = DataIterator(small, global_batch=8, seed=1)
    procs = [DataIterator(small, global_batch=8, process_index=p, process_count=2, seed=1) for p in range(2)]
    for _ in range(small.num_rows // 8 + 2):
        whole = next(one)
        halves = [next(p) for p in procs]
        assert all(h["input_ids"].shape == (4, 128) for h in halves)
        assert same(whole, {k: np.concatenate([h[k] for h in halves]) for k in whole})
    # a state saved by either process resumes the others: the position is global
    assert procs[0].state() == procs[1].state() == one.state()


def test_streaming_resume_and_processes(tok):
    """Streaming packs windows on the fly: resume and the process split hold as in memory."""
    cfg = DataConfig(sources=[oasst(), DataSource(sharegpt(), weight=0.5)], seq_len=256, streaming=True,
                     stream_window=48, max_examples=60)
    ds, _ = build_datasets(cfg, tok)
    a = DataIterator(ds, global_batch=4, seed=2)
    take(a, 9)
    saved = json.loads(json.dumps(a.state()))
    assert saved["row"] > 0 and saved["window"] > 0  # mid-window
    expected = take(a, 40)  # past the end of epoch 0 (120 examples)
    assert a.state()["epoch"] >= 1
    b = DataIterator(ds, global_batch=4, seed=2).restore(saved)
    assert all(same(x, y) for x, y in zip(expected, take(b, 40)))
    procs = [DataIterator(ds, global_batch=4, process_index=p, process_count=2, seed=2).restore(saved)
             for p in range(2)]
    for whole in expected[:6]:
        halves = [next(p) for p in procs]
        assert same(whole, {k: np.concatenate([h[k] for h in halves]) for k in whole})
    assert ds.stats.formats == {oasst(): "messages", sharegpt(): "sharegpt"}


def test_eval_split_and_eval_batches(tok):
    train, held = build_datasets(DataConfig(sources=[sharegpt()], seq_len=128, max_examples=100,
                                            eval_fraction=0.1), tok)
    assert held.num_segments == 10 and train.num_segments == 90
    assert not set(held.segment_sources) & set(train.segment_sources)
    batches = list(eval_batches(held, 4))
    tokens = sum(int(b["loss_mask"].sum()) for b in batches)
    assert tokens == held.stats.trained_tokens and len(batches) == -(-held.num_rows // 4)
    assert batches[-1]["input_ids"].shape == (4, 128)


def test_source_weights(tok):
    path = sharegpt()
    ds = build_dataset(DataConfig(sources=[DataSource(path, weight=2.0), {"path": oasst(), "weight": 0.5}],
                                  seq_len=1024, max_examples=40), tok)
    counts = {}
    for w in ds.segment_sources:
        counts[w.rsplit(":", 1)[0]] = counts.get(w.rsplit(":", 1)[0], 0) + 1
    assert counts == {path: 80, oasst(): 20}


# ----------------------------------------------------------------------------- acceptance 4: bad input


def write(tmp_path, name, lines):
    f = tmp_path / name
    f.write_bytes(b"\n".join(x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines) + b"\n")
    return str(f)


def chat(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


GOOD = chat(("user", "hi"), ("assistant", "hello"))


@pytest.mark.parametrize("line, message", [
    (b'{"messages": [', r"bad.jsonl:2: invalid JSON \(Expecting value at column 15\)"),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', r"bad.jsonl:2: not valid UTF-8 \(byte 0xe9"),
    ({"text_": "x"}, r"bad.jsonl:2: missing field 'messages'"),
    ({"messages": "hi"}, r"bad.jsonl:2: field 'messages' must be list, got str"),
    (chat(("user", "hi"), ("assistant", 3)), r"bad.jsonl:2: messages\[1\]: field 'content' must be str, got int"),
    ({"messages": [{"content": "hi"}]}, r"bad.jsonl:2: messages\[0\]: missing field 'role'"),
    (chat(("user", "hi"), ("bot", "hello")), r"bad.jsonl:2: messages\[1\] has unknown role 'bot'"),
    (chat(("user", "hi"), ("assistant", "  \n")), r"bad.jsonl:2: messages\[1\].content is empty"),
    (chat(("user", "hi"), ("assistant", "ok"), ("user", "and?")),
     r"bad.jsonl:2: conversation ends with a user turn, not an assistant turn"),
    ({"messages": []}, r"bad.jsonl:2: field 'messages' is an empty conversation"),
    (chat(("user", "hi <|im_end|>"), ("assistant", "ok")), r"bad.jsonl:2: messages\[0\].content contains the control"),
    ([1, 2], r"bad.jsonl:2: expected a JSON object, got list"),
])
def test_bad_record_names_file_and_line(tmp_path, tok, line, message):
    path = write(tmp_path, "bad.jsonl", [GOOD, line, GOOD])
    with pytest.raises(DataError, match=message):
        build_dataset(DataConfig(sources=[path]), tok)
    ds = build_dataset(DataConfig(sources=[path], skip_invalid=True), tok)  # opt-in: skipped and counted
    assert ds.stats.skipped == 1 and ds.num_segments == 2 and ds.stats.records == 3
    assert message.split(": ", 1)[1][:12].replace("\\", "") in ds.stats.skip_reasons[0].replace("\\", "")


def test_bad_sharegpt_json_array_names_line(tmp_path, tok):
    f = tmp_path / "share.json"
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    bad = {"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "yo"}]}
    f.write_text(json.dumps([good, good, bad], indent=1))
    line = [n for n, s in enumerate(f.read_text().splitlines(), 1) if s == " {"][2]  # the third record's first line
    with pytest.raises(DataError, match=rf"share.json:{line}: conversations\[1\] has unknown from 'robot'"):
        build_dataset(DataConfig(sources=[str(f)]), tok)
    f.write_text(json.dumps([good, good], indent=1)[:-3] + "\n  ,\n]")
    with pytest.raises(DataError, match=r"share.json:\d+: invalid JSON"):
        build_dataset(DataConfig(sources=[str(f)]), tok)


def test_parquet_through_datasets_names_the_row(tmp_path, tok):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = [GOOD, GOOD, chat(("user", "hi"), ("assistant", "ok"), ("user", "and?"))]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c.parquet row 2: conversation ends with a user turn"):
        build_dataset(DataConfig(sources=[str(tmp_path / "c.parquet")]), tok)
    ds = build_dataset(DataConfig(sources=[str(tmp_path / "c.parquet")], skip_invalid=True), tok)
    assert ds.num_segments == 2 and tok.decode(ds.segment(0)[0].tolist()).startswith("<|im_start|>user\nhi")



def test_folder_reads_files_in_name_order_and_errors_name_each_file(tmp_path, tok):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.csv").write_text("text\nfirst\n")
    write(folder, "b.jsonl", [{"text": "second"}])
    (folder / "c.csv").write_text("text\nthird\n\"\"\n")  # its row 1 is an empty text
    with pytest.raises(DataError, match=r"c.csv row 1: "):  # not a.csv: each file is read on its own
        build_dataset(DataConfig(sources=[str(folder)], seq_len=32), tok)
    ds = build_dataset(DataConfig(sources=[str(folder)], seq_len=32, skip_invalid=True), tok)
    assert [w.rsplit("/", 1)[1] for w in ds.segment_sources] == ["a.csv row 0", "b.jsonl:1", "c.csv row 0"]


def test_byte_order_mark_is_not_part_of_the_data(tmp_path, tok):
    plain = write(tmp_path, "plain.jsonl", [GOOD, GOOD])
    with_bom = tmp_path / "bom.jsonl"
    with_bom.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "plain.jsonl").read_bytes())
    as_json = tmp_path / "bom.json"
    as_json.write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD, GOOD]).encode())
    expected = build_dataset(DataConfig(sources=[plain]), tok)
    for path in (with_bom, as_json):
        ds = build_dataset(DataConfig(sources=[str(path)]), tok)
        assert ds.fingerprint == expected.fingerprint  # the same packed tokens


def test_streaming_resume_skips_the_records_it_read(tmp_path, tok):
    """A line of Unicode blanks (no record) is skipped alike when reading and when resuming."""
    lines = []
    for i in range(12):
        lines.append(chat(("user", f"question {i}"), ("assistant", f"answer {i}")))
        if i == 2:
            lines.append("\u00a0\u3000".encode())  # blank as text, not as bytes
    path = write(tmp_path, "c.jsonl", lines)
    ds, _ = build_datasets(DataConfig(sources=[path], seq_len=32, streaming=True, stream_window=4), tok)
    a = DataIterator(ds, global_batch=2, seed=0)
    take(a, 3)
    saved = a.state()
    assert saved["consumed"][0] > 3  # past the blank line
    b = DataIterator(ds, global_batch=2, seed=0).restore(saved)
    assert all(same(x, y) for x, y in zip(take(a, 4), take(b, 4)))


def test_streaming_state_refused_when_the_file_changed(tmp_path, tok):
    path = write(tmp_path, "c.jsonl", [chat(("user", f"q{i}"), ("assistant", f"a{i}")) for i in range(8)])
    cfg = DataConfig(sources=[path], seq_len=32, streaming=True, stream_window=4)
    it = DataIterator(build_datasets(cfg, tok)[0], global_batch=2)
    take(it, 2)
    saved = it.state()
    write(tmp_path, "c.jsonl", [chat(("user", f"other {i}"), ("assistant", f"a{i}")) for i in range(8)])
    with pytest.raises(DataError, match=r"data state: fingerprint .* changed since it was saved"):
        DataIterator(build_datasets(cfg, tok)[0], global_batch=2).restore(saved)

def test_template_errors_name_the_record(tmp_path):
    tok = add_chat_template(load_tokenizer())
    tok.chat_template = tok.chat_template.replace(
        "{%- for message in messages -%}",
        "{%- for message in messages -%}{%- if message['role'] == 'system' -%}"
        "{{- raise_exception('no system turns') -}}{%- endif -%}", 1)
    path = write(tmp_path, "c.jsonl", [GOOD, chat(("system", "s"), ("user", "hi"), ("assistant", "ok"))])
    with pytest.raises(DataError, match=r"c.jsonl:2: the chat template fails on this conversation: no system turns"):
        build_dataset(DataConfig(sources=[path], template="tokenizer"), tok)


def test_missing_empty_too_long_and_unknown(tmp_path, tok):
    with pytest.raises(DataError, match=r"nope.jsonl: file not found"):
        build_dataset(DataConfig(sources=[str(tmp_path / "nope.jsonl")]), tok)
    empty = write(tmp_path, "empty.jsonl", [])
    with pytest.raises(DataError, match=r"empty.jsonl: no records \(empty dataset\)"):
        build_dataset(DataConfig(sources=[empty]), tok)
    long = write(tmp_path, "long.jsonl", [chat(("user", "hi " * 50), ("assistant", "ok " * 50))] * 2)
    with pytest.raises(DataError, match=r"long.jsonl: every example is longer than seq_len=16 tokens "
                                        r"\(truncation=drop; e.g. .*long.jsonl:1\)"):
        build_dataset(DataConfig(sources=[long], seq_len=16, truncation="drop"), tok)
    # truncating keeps the prompt, but no reply token fits in 16: nothing to train either
    with pytest.raises(DataError, match=r"long.jsonl: every example is longer than seq_len=16"):
        build_dataset(DataConfig(sources=[long], seq_len=16), tok)
    stream, _ = build_datasets(DataConfig(sources=[long], seq_len=16, streaming=True), tok)
    with pytest.raises(DataError, match=r"long.jsonl: no example fits seq_len=16"):
        next(DataIterator(stream, 1))
    odd = write(tmp_path, "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"odd.jsonl:1: cannot tell the format from the keys \['answer', 'question'\]"):
        build_dataset(DataConfig(sources=[odd]), tok)
    allbad = write(tmp_path, "allbad.jsonl", [b"{", b"{"])
    with pytest.raises(DataError, match=r"allbad.jsonl: all 2 records are invalid"):
        build_dataset(DataConfig(sources=[allbad], skip_invalid=True), tok)


def test_bad_config():
    with pytest.raises(DataError, match=r"unknown data config key\(s\) \['seqlen'\]"):
        DataConfig.from_dict({"sources": ["a.jsonl"], "seqlen": 5})
    with pytest.raises(DataError, match=r"data.loss_on='prompt': choose from assistant, all, completion"):
        DataConfig(sources=["a.jsonl"], loss_on="prompt")
    with pytest.raises(DataError, match=r"a.jsonl: weight=0: must be > 0"):
        DataConfig(sources=[{"path": "a.jsonl", "weight": 0}])


def test_inspect_cli_marks_trained_tokens(tmp_path, capsys):
    path = write(tmp_path, "c.jsonl", [chat(("system", "Be brief."), ("user", "hi"), ("assistant", "hello"))])
    assert main(["inspect", "--data", path, "-n", "1", "--seq-len", "64", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n⟦hello<|im_end|>⟧\n" in out
    assert re.search(r"trained tokens +2\n", out) and re.search(r"packing efficiency +3.1%", out)  # 2 of 64
    bad = write(tmp_path, "bad.jsonl", [GOOD, b"{"])
    assert main(["inspect", "--data", bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.jsonl:2: invalid JSON" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- third review (2026-11-29)


def _trained_text(tok, ds, k):
    ids, mask = ds.segment(k)
    return tok.decode(ids[mask.astype(bool)].tolist())


@pytest.mark.parametrize("spans", ["two per turn", "last turn only"])
def test_completion_with_a_tokenizer_template_of_other_spans(tmp_path, spans):
    # A template that wraps each reply and its end token in two {% generation %} spans, or marks only
    # the last turn: loss_on=completion still trains exactly the final reply, as transformers' mask says.
    tok = add_chat_template(load_tokenizer())
    span = "{%- generation -%}{{- message['content'] | trim + '<|im_end|>' -}}{%- endgeneration -%}"
    assert tok.chat_template.count(span) == 1
    if spans == "two per turn":
        new = ("{%- generation -%}{{- message['content'] | trim -}}{%- endgeneration -%}{{- '\\n' -}}"
               "{%- generation -%}{{- '<|im_end|>' -}}{%- endgeneration -%}")  # an untrained token between
    else:
        new = "{%- if loop.last -%}" + span + "{%- else -%}{{- message['content'] | trim + '<|im_end|>' -}}{%- endif -%}"
    t = tok.chat_template.replace(span, new)
    tok.chat_template = t
    conv = chat(("user", "Hello"), ("assistant", "Hello there"), ("user", "Bye"), ("assistant", "Goodbye now"))
    hf = tok.apply_chat_template(conv["messages"], return_dict=True, return_assistant_tokens_mask=True)
    hf_trained = tok.decode([i for i, m in zip(hf["input_ids"], hf["assistant_masks"]) if m])
    assert hf_trained.endswith("Goodbye now<|im_end|>")
    path = write(tmp_path, "c.jsonl", [conv])
    ds = build_dataset(DataConfig(sources=[path], template="tokenizer", loss_on="completion", seq_len=64), tok)
    assert _trained_text(tok, ds, 0) == "Goodbye now<|im_end|>"
    assistant = build_dataset(DataConfig(sources=[path], template="tokenizer", seq_len=64), tok)
    assert _trained_text(tok, assistant, 0) == hf_trained  # loss_on=assistant is transformers' own mask


def test_completion_refuses_a_template_that_renders_the_prompt_differently(tmp_path):
    tok = add_chat_template(load_tokenizer())
    # a template that renders the last turn differently (as some do for reasoning or a final marker)
    head = "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    span = "{%- generation -%}{{- message['content'] | trim + '<|im_end|>' -}}{%- endgeneration -%}"
    assert tok.chat_template.count(head) == tok.chat_template.count(span) == 1
    # the last turn's header differs (no token prefix), and two spans per reply (no span count either)
    tok.chat_template = tok.chat_template.replace(
        head, "{{- '<|im_start|>' + ('final ' if loop.last else '') + message['role'] + '\\n' -}}").replace(
        span, "{%- generation -%}{{- message['content'] | trim -}}{%- endgeneration -%}{{- '\\n' -}}"
              "{%- generation -%}{{- '<|im_end|>' -}}{%- endgeneration -%}")
    conv = chat(("user", "Hello"), ("assistant", "Hi"), ("user", "Bye"), ("assistant", "Later"))
    path = write(tmp_path, "c.jsonl", [conv])
    with pytest.raises(DataError, match=r"c.jsonl:1: loss_on=completion: the chat template renders the prompt "
                                        r"turns differently .* other than one span per assistant turn"):
        build_dataset(DataConfig(sources=[path], template="tokenizer", loss_on="completion", seq_len=64), tok)


def test_eval_sources_count_once_with_or_without_streaming(tmp_path, tok):
    train = write(tmp_path, "train.jsonl", [chat(("user", f"q{i}"), ("assistant", f"a{i}")) for i in range(8)])
    held = write(tmp_path, "held.jsonl", [chat(("user", f"e{i}"), ("assistant", f"r{i}")) for i in range(5)])
    sets = [build_datasets(DataConfig(sources=[train], eval_sources=[{"path": held, "weight": w}], seq_len=64,
                                      streaming=s), tok)[1] for s in (False, True) for w in (3.0, 0.5)]
    assert [ev.num_segments for ev in sets] == [5, 5, 5, 5]


def test_eval_split_of_a_source_does_not_depend_on_the_others(tok):
    def held_out(weight):
        _, ev = build_datasets(DataConfig(sources=[{"path": oasst(), "weight": weight}, sharegpt()], seq_len=512,
                                          max_examples=40, eval_fraction=0.2), tok)
        return sorted(w for w in ev.segment_sources if w.startswith(sharegpt()))
    assert held_out(1.0) == held_out(0.5) and len(held_out(1.0)) == 8


def test_sharegpt_system_field_becomes_the_system_turn(tmp_path, tok):
    rec = {"system": "You are a pirate.", "conversations": [{"from": "human", "value": "Hi"},
                                                            {"from": "gpt", "value": "Arr!"}]}
    ds = build_dataset(DataConfig(sources=[write(tmp_path, "s.jsonl", [rec])], seq_len=64), tok)
    assert tok.decode(ds.segment(0)[0].tolist()).startswith("<|im_start|>system\nYou are a pirate.<|im_end|>\n")


def test_folder_of_different_formats_detects_each_file(tmp_path, tok):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": "Hi"},
                                                                   {"from": "gpt", "value": "Yo"}]}] * 3))
    write(folder, "b.jsonl", [GOOD] * 2)
    ds = build_dataset(DataConfig(sources=[str(folder)], seq_len=64, skip_invalid=True), tok)
    assert ds.stats.skipped == 0 and ds.num_segments == 5
    assert ds.stats.formats == {str(folder): "sharegpt+messages"}


def test_text_file_documents_split_at_endoftext(tmp_path, tok):
    f = tmp_path / "corpus.txt"
    f.write_text("first doc\nline two\n<|endoftext|>\n\nsecond doc\n<|endoftext|>")
    ds = build_dataset(DataConfig(sources=[str(f)], seq_len=64), tok)
    assert sorted(ds.segment_sources) == [f"{f}:1", f"{f}:5"]
    texts = sorted(tok.decode(ds.segment(k)[0].tolist()) for k in range(ds.num_segments))
    assert texts == ["first doc\nline two<|endoftext|>", "second doc<|endoftext|>"]
    f.write_text("a\nb\nc <|im_end|> d\n")
    with pytest.raises(DataError, match=r"corpus.txt:1: text contains the control token '<\|im_end\|>' "
                                        r"\(on line 3 of the text\)"):
        build_dataset(DataConfig(sources=[str(f)], seq_len=64), tok)


def test_inspect_reads_config_values_as_train_does(tmp_path, capsys):
    path = write(tmp_path, "c.jsonl", [GOOD] * 4)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data:\n  sources: [{path}]\n  seq_len: 64\n  eval_fraction: 5e-1\n")  # YAML 1.1: a string
    assert main(["inspect", "--config", str(cfg), "-n", "0"]) == 0
    assert "eval:" in capsys.readouterr().out
    cfg.write_text(f"data:\n  sources: [{path}]\n  eval_fracton: 0.5\n")
    assert main(["inspect", "--config", str(cfg)]) == 2
    assert "unknown key 'data.eval_fracton'" in capsys.readouterr().err


def test_inspect_reads_a_run_config_from_any_folder(tmp_path, monkeypatch, capsys):
    from tests.conftest import ROOT

    monkeypatch.chdir(tmp_path)  # the shipped demo config's data paths are found in the package, as by train
    for config in (str(ROOT / "jaxgpt" / "configs" / "demo.yaml"), "demo"):  # by path or by name
        assert main(["inspect", "--config", config, "-n", "0"]) == 0
        assert "rows x seq_len" in capsys.readouterr().out
    other = tmp_path / "opt.yaml"
    other.write_text("optimizer:\n  lr: 1.0e-4\n")
    assert main(["inspect", "--config", str(other)]) == 2
    assert capsys.readouterr().err == f"error: {other}: no data.sources (or give --data PATH)\n"


def test_eval_split_survives_moving_the_data(tmp_path, tok):
    recs = [chat(("user", f"q{i}"), ("assistant", f"a{i}")) for i in range(30)]
    held = []
    for folder in ("a", "b/c"):
        (tmp_path / folder).mkdir(parents=True)
        path = write(tmp_path / folder, "chats.jsonl", recs)
        _, ev = build_datasets(DataConfig(sources=[path], seq_len=64, eval_fraction=0.2), tok)
        held.append(sorted(int(w.rsplit(":", 1)[1]) for w in ev.segment_sources))
    assert held[0] == held[1] and len(held[0]) == 6


@pytest.mark.parametrize("template, end", [("plain", "<|endoftext|>"), ("chatml", "<|im_end|>")])
def test_completion_trains_the_last_reply_of_a_multi_turn_chat(tmp_path, tok, template, end):
    # plain: the prompt alone ends in "\n\n" (one token), the whole chat splits it in two
    conv = chat(("user", "Hello"), ("assistant", "Hi"), ("user", "How are you?"), ("assistant", "Fine."))
    ds = build_dataset(DataConfig(sources=[write(tmp_path, "c.jsonl", [conv])], template=template,
                                  loss_on="completion", seq_len=64), load_tokenizer())
    assert _trained_text(tok, ds, 0) == "Fine." + end


def test_text_file_with_windows_line_endings(tmp_path, tok):
    f = tmp_path / "crlf.txt"
    f.write_bytes(b"doc one\r\n<|endoftext|>\r\ndoc two\r\n")
    ds = build_dataset(DataConfig(sources=[str(f)], seq_len=64), tok)
    texts = sorted(tok.decode(ds.segment(k)[0].tolist()) for k in range(ds.num_segments))
    assert texts == ["doc one<|endoftext|>", "doc two<|endoftext|>"]
