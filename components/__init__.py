"""Multi-view listing embeddings: the steps of the retraining workflow and the code they share."""
