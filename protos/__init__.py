"""The gRPC contracts: `pdserve/v1/generate.proto` (public, package `pdserve.v1`)
and `pdserve/v1/decode_stream.proto` (internal decode-to-router token stream),
with their generated Python beside them; `generate.py` regenerates it and a test
checks that what is committed is current.
"""
