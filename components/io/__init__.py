"""Reading and writing the pipeline's files: catalogs and their images (local or S3),
the Great Expectations suite, the content-addressed feature and activation stores, step
manifests, the training data and test split, listing embeddings and FAISS indexes; and
the one process setting featurize makes (the C allocator keeps freed memory).

May import `components.contract`, `components.config`, `components.errors`,
`components.core` and `components.io`.
"""
