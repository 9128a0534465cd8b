"""The engine: a Llama-family model's forward pass over a paged KV cache.

It owns loading Hugging Face model directories (and the embedded default model),
the block pool and block tables, the model runner (packed prefill, batched
decode), the sampler, the tokenizer with its incremental detokenizer, and, in
`engine.transfer`, moving KV blocks between two block pools in different
processes. It runs with no Ray and no network, on the CPU and on CUDA.
"""
