"""`pdserve bench` and `pdserve diagnose`: offer a load, measure it, explain it.

Modules, leaves first: workload (what is sent, when), client (one request in, one
record out), stats (a run's numbers), result (a bench's runs and their JSON),
diagnosis (what diagnose finds), plots, run (the bench command), diagnose (the
diagnose command). Imports point from the commands to the leaves only.
"""
