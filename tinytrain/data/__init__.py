"""The data's way in: corpora prepared into token shards (prep/), the tokenizer, the sample order
(the one function for a run's data position) and the Lightning datamodule that serves it."""
