"""Moving KV blocks between the block pools of two processes.

One interface, several backends picked by where the two ends live: `nccl`
(different GPUs), `cuda_ipc` (one GPU: the receiver's pool mapped once),
`gloo` (CPU), and `fake` (in-process, with fault injection, for tests).
"""
