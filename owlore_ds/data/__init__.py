"""Training data: read any supported format, tokenize (cached), and cut the global batches.

Formats (detected from the file; records.py):
- LMFlow JSON: {"type": "text_only" | "text2text" | "conversation", "instances": [...]}
- rows in .jsonl / .json / .parquet (ROW_FORMATS): `text`; `input`+`output`;
  `messages` ({role, content}); Alpaca (`instruction`, `input`, `output`, optional
  `system`, `history`) and ShareGPT (`conversations` of {from, value}, optional
  `system`), both read as LLaMA-Factory documents them and rendered with the chat
  template, loss on the responses only; pre-tokenized `input_ids` (optional `labels`)
- a folder: every .json/.jsonl/.parquet/.txt file in it (a .txt file is one text)
- Megatron-LM indexed datasets (P.bin + P.idx; indexed.py), cut into windows or blended
  by weight (windows.py).
- --streaming: a Hugging Face datasets folder or .jsonl/.parquet/.txt files read, tokenized and
  cut into the same windows while training (streaming.py).

Every example becomes a row of `block_size` token ids with labels (-100 where no loss
is taken) and an attention mask (tokenize.py), cached in a compact form that every rank
memory-maps and widens to int64 rows only for the batch it trains (rows.CompactRows);
with `packing`, examples are packed several to a row and the row carries `position_ids`
that restart at 0 in each example, from which the model call builds a mask that keeps examples apart (modeling.document_attention_mask).
The order of global batches (batches.py) depends only on the seed and the data, never on
the number of ranks or on the micro-batch/accumulation split.
"""

from owlore_ds.data.batches import GlobalBatches, calibration_windows
from owlore_ds.data.loading import dataset_counts, load_training_data, render_example
from owlore_ds.data.records import data_files, documents, iter_jsonl, read_records
from owlore_ds.data.rows import IGNORE_INDEX, CompactRows, TokenizedData, TrainingData
from owlore_ds.data.streaming import StreamingBatches
from owlore_ds.data.tokenize import assemble_rows, compact_arrays, encode_records, pack_examples, tokenize_records
from owlore_ds.data.windows import BlendedWindows, PackedWindows

__all__ = ["IGNORE_INDEX", "BlendedWindows", "CompactRows", "GlobalBatches", "PackedWindows", "StreamingBatches",
           "TokenizedData", "TrainingData", "assemble_rows", "calibration_windows", "compact_arrays", "data_files",
           "dataset_counts", "documents", "encode_records", "iter_jsonl", "load_training_data", "pack_examples",
           "read_records", "render_example", "tokenize_records"]
