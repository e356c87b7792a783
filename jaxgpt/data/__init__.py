"""Chat data: read, validate, render with the chat template, mask, pack, iterate.

Public API (what ``jaxgpt.train`` uses; ``DataConfig`` is the run config's ``data`` section, in ``jaxgpt.config``)::

    cfg = DataConfig(sources=["chats.jsonl"], seq_len=1024)       # or DataConfig.from_dict({...})
    tok = add_chat_template(load_tokenizer(), cfg.template)        # jaxgpt.tokenizer; resize the model to len(tok)
    train, evalset = build_datasets(cfg, tok)                      # PackedDataset, PackedDataset | None
    print(train.stats.summary())                                   # examples, tokens, truncated, efficiency ...
    it = DataIterator(train, global_batch=32, process_index=jax.process_index(),
                      process_count=jax.process_count(), seed=cfg.seed, shuffle=cfg.shuffle)
    batch = next(it)            # this process's rows of the global batch, numpy [global_batch // process_count, seq_len]
    saved = it.state()          # small JSON dict; DataIterator(...).restore(saved) continues with identical batches
    for batch in eval_batches(evalset, global_batch, process_index=pi, process_count=pc): ...

With ``DataConfig(streaming=True)`` the training set is a ``StreamingDataset``
(read lazily, packed a window at a time) behind the same ``DataIterator`` API.

Batches are dicts of numpy arrays ``[B, seq_len]``: ``input_ids``, ``targets``,
``segment_ids``, ``positions`` (int32) and ``loss_mask`` (float32). A packed
conversation of tokens ``x`` with token mask ``m`` holds ``x[:-1]`` as inputs,
``x[1:]`` as targets and ``m[1:]`` as loss mask; ``segment_ids`` count 1.. per
conversation in a row (0 = padding) and ``positions`` restart at 0 for each, so
the model's segment masking keeps packed conversations apart.

Pipeline (one way), a module each: ``read`` (sources: local json/jsonl/txt read here so
errors can name the line; parquet/csv/arrow files and hub datasets through ``datasets``)
-> records -> validated examples (messages | text) -> ``pack`` (tokens + trained-token
mask from the chat template's ``{% generation %}`` spans via ``return_assistant_tokens_mask``;
best-fit-decreasing packing into rows) -> ``build`` (truncate / drop, eval split, weights,
streaming windows) -> ``iterator``; ``inspect`` is the CLI.

Formats: ``messages`` ({role, content} lists, OpenAI/TRL), ``sharegpt``
(``conversations: [{from: human|gpt|system, value}]``), ``prompt_completion``
(strings, or TRL conversational message lists), ``alpaca`` (``instruction``,
optional ``input``/``system``, ``output``), ``text`` (continued pre-training:
every token trained, long documents split into ``seq_len`` chunks).

Bad input raises ``DataError`` (a ``ValueError``) naming the file and line
(``path:LINE: ...``) or dataset row (``path row I: ...``); with
``skip_invalid=True`` bad records are skipped and counted instead.

Preference pairs (``objective.name: dpo``) in TRL's standard, conversational and implicit-prompt
forms: ``preference`` (``build_preference_datasets``; a pair's chosen and rejected replies are
neighbouring segments of a row).

``python -m jaxgpt.data inspect --data FILE`` shows rendered examples with the
trained tokens marked, and the statistics.
"""

from jaxgpt.config import DataConfig, DataError, DataSource
from jaxgpt.data.build import StreamingDataset, build_dataset, build_datasets, build_preference_datasets
from jaxgpt.data.inspect import inspect_main, main, render_marked
from jaxgpt.data.iterator import DataIterator, eval_batches
from jaxgpt.data.pack import DataStats, PackedDataset, pack_best_fit, tokenize_chats, tokenize_texts
from jaxgpt.data.preference import PreferenceDataset, detect_pair_form, to_pair
from jaxgpt.data.read import Example, detect_format, read_records, to_example

__all__ = ["DataConfig", "DataError", "DataIterator", "DataSource", "DataStats", "Example", "PackedDataset",
           "PreferenceDataset", "StreamingDataset", "build_dataset", "build_datasets", "build_preference_datasets",
           "detect_pair_form", "to_pair", "detect_format", "eval_batches", "inspect_main",
           "main", "pack_best_fit", "read_records", "render_marked", "to_example", "tokenize_chats", "tokenize_texts"]
