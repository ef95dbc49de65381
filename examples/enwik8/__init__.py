"""A Sparse Transformer over bytes (Child et al. 2019), trained on enwik8 or a built-in corpus.

Modules: ``config`` (the settings, which are also the command-line flags), ``data`` (corpora, the
90/5/5 split, ``tf.data`` pipelines), ``model`` (the pre-norm Transformer with bsattn attention),
``train`` (the training loop, ``python -m examples.enwik8.train``) and ``evaluate`` (bits per byte
and sampling, ``python -m examples.enwik8.evaluate``).
"""
