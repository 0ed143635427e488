"""Releasing a model: the production store (local or S3) with versioned, verified
releases and the CURRENT pointer, the MLflow registry (loading models, aliases),
training runs in MLflow, the served model (MLflow pyfunc) and the champion.

May import `components.contract`, `components.config`, `components.errors`,
`components.core`, `components.io` and `components.release`.
"""
