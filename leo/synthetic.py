"""A synthetic stand-in for LEO's miniImageNet embeddings, in the original
on-disk format, for the default demo and the tests.

``<root>/miniImageNet/center/{train,val,test}_embeddings.pkl``: dicts with
``keys`` (``"<row>-<wnid>-<wnid>_<image>.JPEG"``, fake wnids ``n9xxxxxxx``) and
``(n, 640)`` float32 ``embeddings``; 64 / 16 / 20 classes as miniImageNet.

Class structure (all splits share it, so meta-training on the train classes
carries over to the test classes):

* each class has a code ``u_c ~ N(0, I_m)`` on a low-dimensional manifold;
  an example's code is ``u_c`` plus within-class jitter;
* a fixed random nonlinear map (tanh layer, then linear to 640) embeds codes;
* every example also gets a large "nuisance" component from a shared
  low-dimensional subspace (like pose or background), isotropic noise and a
  common offset, then a ReLU (features of a ReLU network are non-negative).

Raw cosine nearest-neighbour 5-way 1-shot accuracy is about 30%, because the
nuisance dominates; a projection learned on the train classes (LDA) reaches
about 73% and the class codes themselves about 82%. A meta-learner has to find
the class-relevant directions from the train classes, which is what LEO's
encoder/decoder can learn.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil

import numpy as np
from absl import logging

from maml_tf.io_utils import make_temp_dir

SPLITS = ("train", "val", "test")
_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Shape and difficulty of the synthetic embeddings.

  Attributes:
    num_classes: classes in (train, val, test), miniImageNet's 64/16/20.
    examples_per_class: images per class.
    embedding_dim: d (640 as the released WRN-28-10 features).
    manifold_dim: m, the size of the class codes.
    hidden: width of the nonlinear map's tanh layer.
    within_class_std: jitter of an example's code around its class code.
    nuisance_dim: size of the shared nuisance subspace.
    nuisance_scale: its scale (relative to the class signal, about 1).
    noise_std: isotropic noise.
    offset: common offset before the ReLU.
    seed: fixes everything.
  """

  num_classes: tuple[int, int, int] = (64, 16, 20)
  examples_per_class: int = 200
  embedding_dim: int = 640
  manifold_dim: int = 8
  hidden: int = 32
  within_class_std: float = 0.7
  nuisance_dim: int = 16
  nuisance_scale: float = 2.0
  noise_std: float = 0.3
  offset: float = 0.5
  seed: int = 2019

  def __post_init__(self):
    if len(self.num_classes) != 3 or min(self.num_classes) < 1:
      raise ValueError(f"num_classes must be 3 counts >= 1, got "
                       f"{self.num_classes}")
    if self.examples_per_class < 2 or self.embedding_dim < 1:
      raise ValueError("examples_per_class must be >= 2 and embedding_dim "
                       ">= 1")

  @property
  def tag(self) -> str:
    """A directory name that changes whenever the data would."""
    text = json.dumps([_VERSION, dataclasses.asdict(self)], sort_keys=True)
    return f"v{_VERSION}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def generate(config: SyntheticConfig) -> dict[str, dict[str, np.ndarray]]:
  """The three splits as the original pickles' dicts.

  Returns:
    ``{split: {"keys": [n] str, "embeddings": [n, d] float32}}``.
  """
  c = config
  rng = np.random.default_rng(c.seed)
  a1 = rng.normal(size=(c.manifold_dim, c.hidden))
  b1 = 0.5 * rng.normal(size=c.hidden)
  a2 = rng.normal(size=(c.hidden, c.embedding_dim)) / np.sqrt(c.hidden)
  nuisance = rng.normal(size=(c.nuisance_dim, c.embedding_dim)) / np.sqrt(
      c.nuisance_dim)
  splits = {}
  first_class = 0
  for split, count in zip(SPLITS, c.num_classes):
    per = c.examples_per_class
    codes = rng.normal(size=(count, 1, c.manifold_dim))
    codes = codes + c.within_class_std * rng.normal(
        size=(count, per, c.manifold_dim))
    x = np.tanh(codes @ a1 + b1) @ a2
    x += c.nuisance_scale * (rng.normal(size=(count, per, c.nuisance_dim)) @
                             nuisance)
    x += c.noise_std * rng.normal(size=x.shape) + c.offset
    embeddings = np.maximum(x, 0).astype(np.float32).reshape(
        count * per, c.embedding_dim)
    keys = []
    for i in range(count):
      wnid = f"n{90000000 + first_class + i:08d}"
      keys += [f"{len(keys)}-{wnid}-{wnid}_{j:05d}.JPEG" for j in range(per)]
    splits[split] = {"keys": np.asarray(keys), "embeddings": embeddings}
    first_class += count
  return splits


def write(root: str, splits: dict, dataset_name: str = "miniImageNet",
          crop: str = "center", protocol: int = 2) -> None:
  """Writes ``<root>/<dataset>/<crop>/<split>_embeddings.pkl`` (protocol 2,
  as the released Python 2 pickles)."""
  directory = os.path.join(root, dataset_name, crop)
  os.makedirs(directory, exist_ok=True)
  for split, data in splits.items():
    with open(os.path.join(directory, f"{split}_embeddings.pkl"), "wb") as f:
      pickle.dump(data, f, protocol=protocol)


def ensure_synthetic_embeddings(cache_dir: str,
                                config: SyntheticConfig = SyntheticConfig()
                                ) -> str:
  """Generates the synthetic embeddings once into ``cache_dir``.

  The set is built in a temporary directory and renamed into place, so an
  interrupted generation leaves nothing half-written.

  Returns:
    The ``data_path`` to use (it holds ``miniImageNet/center/*.pkl``).
  """
  cache_dir = os.path.expanduser(cache_dir)
  root = os.path.join(cache_dir, config.tag)
  if os.path.isdir(root):
    logging.info("Using the cached synthetic embeddings in %s.", root)
    return root
  os.makedirs(cache_dir, exist_ok=True)
  logging.info("Generating synthetic miniImageNet-format embeddings (%s "
               "classes, %d per class, d=%d) into %s ...",
               "/".join(map(str, config.num_classes)),
               config.examples_per_class, config.embedding_dim, root)
  tmp = make_temp_dir(f".tmp-{config.tag}-", cache_dir)
  try:
    write(tmp, generate(config))
    with open(os.path.join(tmp, "synthetic.json"), "w") as f:
      json.dump(dataclasses.asdict(config), f, indent=1)
    try:
      os.replace(tmp, root)
    except OSError:  # another process finished first
      if not os.path.isdir(root):
        raise
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  logging.info("Synthetic embeddings ready in %s.", root)
  return root
