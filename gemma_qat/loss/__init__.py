"""The training losses over the 262,144-token vocabulary, chunked so [B, T, V] logits never exist at once.

  distill.py  the losses the train step calls: KL to the teacher (+ CE), CE alone, top-k KL from a cache
  fused.py    the default path: head, loss and the loss's gradient in one chunked pass (XLA)
  kernel.py   fused.py's vocabulary passes as two Pallas kernels, used on one NVIDIA GPU

Above model/ (the head's logits) and below train/.
"""
