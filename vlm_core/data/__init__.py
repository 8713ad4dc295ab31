"""The data path from records to batches.

    llava.py      LLaVA JSON / JSONL  ──► validated ``Sample``s + ``QuarantinedRecord``s
    tokenizer.py  train / load the tokenizer; ``ChatEncoder``: turns ──► ids, loss mask, image groups
    image.py      ``ImageProcessor``: image file ──► ``[3, S, S]`` float tensor
    dataset.py    ``SFTDataset``: ``Sample`` ──► ``TokenizedSample``
    packing.py    ``pack``: ``TokenizedSample``s ──► ``PackedBatch``;
                  ``SampleStream`` / ``PackedLoader``: the resumable order of batches
    errors.py     ``DataError``

Nothing is imported here, so that ``import vlm_core.data.llava`` does not pull in transformers.
"""
