"""sparsec's compiler passes (installed as `sparsec.passes`).

Analysis passes read the graph and write `node.meta["sparsec"]`; rewrite passes read those
decisions and change the graph. The order lives in `sparsec/pipeline.py` only.
"""
