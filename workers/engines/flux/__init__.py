"""The parts of the Flux engine (`workers.engines.diffusers_engine.FluxDiffusionEngine`).

`hooks`: per-request state and the hooks on the shared transformer that fill it; `phases`:
loading, encoding, the denoise call's arguments and decoding, as `FluxPipeline` does them;
`magcache`: the MagCache ratios and their calibration run.
"""
