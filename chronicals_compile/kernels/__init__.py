"""Triton kernels and their launchers. They know nothing of FX or of torch.library: ``ops/`` wraps
them as custom ops, ``passes/`` decides where they go. Nothing here is imported until a kernel runs,
so importing the backend never imports Triton."""
