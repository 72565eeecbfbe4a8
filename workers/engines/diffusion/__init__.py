"""The family-independent parts of the diffusion engine
(`workers.engines.diffusers_engine.DiffusersEngine`).

`hooks`: per-request state and the hooks on the shared transformer that fill it;
`phases`: loading, the per-request pipeline and the encode phase; `batching`: the step
loop's stand-in transformer and its stacked forward pass; `probe`: the resource
manager's measurement of one size; `previews`: decoding the steps a request previews;
`magcache`: the MagCache ratios and their calibration run.
"""
