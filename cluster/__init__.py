"""Putting pdserve together on Ray.

It owns the configuration schema, assembling the Ray Serve application from the
router and the two worker pools, placing the pools, introducing prefill and
decode replicas to each other, the autoscaling policy and its cost model, and
the `pdserve` command line (serve, generate, status, bench, diagnose).
Nothing imports this package.
"""
