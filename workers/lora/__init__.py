"""LoRA adapters on the workers: where a registered adapter's folder is (`registry`), the
adapters one model keeps loaded (`cache`), loading and applying them to the transformer
of a diffusion model of any family (`diffusion`, `mixed`), vLLM's and PEFT's per-request
adapters for the text engines (`text`, `combine`, `peft_text`) and what a worker
publishes to Redis (`directory`). The request side is `omni_tasks.lora`."""
