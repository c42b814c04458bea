"""Evaluation: retrieval recall, caption metrics, VQA accuracy, scene metrics, dataset loaders and the runner."""
