"""Triton source emission for sparse layers (installed as `sparsec.codegen`)."""
