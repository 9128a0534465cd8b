"""The router: pdserve's public front door.

It owns the HTTP (OpenAI-compatible) and gRPC ingress, request validation and
tokenization, chat templates, the routing policies that pick a prefill and a
decode replica, relaying the decode replica's token stream to the client
(detokenized, with stop strings), and cancellation. It moves no tensors and
reaches the worker replicas only over gRPC, finding them in the registry's reports
(router/directory.py).
"""
