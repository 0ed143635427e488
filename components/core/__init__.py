"""The ML core: the multi-view model, its objectives, batching and view grouping,
retrieval evaluation, metrics, diagnostics, recall gates, the frozen encoders and the
distributed-training helpers.

Pure computation on tensors and arrays: no files, no storage, no MLflow (the encoders
load their weights from installed packages). May import `components.contract`,
`components.config`, `components.errors` and `components.core` only.
"""
