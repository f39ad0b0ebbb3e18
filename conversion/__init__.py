"""Release formats that are not plain HF layout, and what they share: dequantization and safe, streaming IO.

`hf_archs.from_official` and `hf-archs convert` both go through here: a format module turns a release directory
into a plan (our tensor name -> how to produce it), checked against the model before any data is read.
"""
