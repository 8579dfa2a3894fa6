"""LEO: Latent Embedding Optimization (Rusu et al., ICLR 2019) in TF2.

Modules:
  config: frozen ``DataConfig`` / ``ModelConfig`` / ``OuterConfig``.
  data: the original embeddings on disk (safe loading) and task sources.
  model: ``LEO``, a learner of ``maml_tf.training.Trainer``.
  randomness: stateless dropout and sampling seeds.
  experiment: the original's train / validate / test protocol.
  synthetic: a synthetic embeddings set in the original format (the demo).
"""

import maml_tf  # noqa: F401  (before TensorFlow: sets its environment)
