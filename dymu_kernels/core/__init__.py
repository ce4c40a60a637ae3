"""The model-agnostic DyMU machinery (no transformers, no vLLM):

- :mod:`.encoder` — the DToMe encoder driver over a pre-norm ViT block protocol;
- :mod:`.compact` — the compact sequence (text + unique visual rows) and its merge map;
- :mod:`.maps` — merge maps through AnyRes packing and bilinear pooling;
- :mod:`.positions` — position providers: the model's own positions of the virtual sequence;
- :mod:`.vtu_state` — the VTU bookkeeping a KV cache carries between forwards;
- :mod:`.lm_features` — what VTU attention computes, checked against a language model;
- :mod:`.thresholds` — the threshold file, presets, calibration driver.
"""
