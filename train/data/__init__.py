"""The data layer: corpus -> TFDS (ArrayRecord) -> sentencepiece -> packed grain batches.

Entry points: `pipeline.prepare(data_config)` and `pipeline.make_lm_iterator(...)`.
"""
