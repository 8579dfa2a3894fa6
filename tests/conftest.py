"""Test configuration: quiet TF, strict autograph, markers and shared data."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("AUTOGRAPH_STRICT_CONVERSION", "1")
# The suite checks XLA:CPU's programs and bitwise CPU results: on a GPU host
# it runs on the CPU too, unless CUDA_VISIBLE_DEVICES says otherwise.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

# Before any test module imports TensorFlow: maml_tf sets its environment
# (oneDNN off, the BFC allocator on; README, Installing).
import maml_tf  # noqa: E402,F401

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
OMNIGLOT_DIR = SHARED / "data" / "omniglot"


def run_python(args, cwd=REPO, **env_vars) -> subprocess.CompletedProcess:
  """``python args`` in a fresh process (CPU only, TensorFlow quiet), in
  ``cwd``, with ``env_vars`` set."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="",
             **env_vars)
  return subprocess.run([sys.executable, *args], cwd=cwd,
                        capture_output=True, text=True, env=env, timeout=600)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long runs, excluded by default "
                          "(run with -m slow)")


@pytest.fixture
def omniglot_archives():
  """The official Omniglot 'background small' archives from ../shared."""
  if not (OMNIGLOT_DIR / "images_background_small1.zip").exists():
    pytest.skip(f"real Omniglot archives not found in {OMNIGLOT_DIR} (they "
                "are in ../shared/data/omniglot on CI; the same code is "
                "tested on generated archives)")
  return OMNIGLOT_DIR


@pytest.fixture(scope="session")
def omniglot_cache(tmp_path_factory):
  """A small Omniglot cache prepared from generated archives in the official
  layout (read-only: tests that edit a cache copy it first)."""
  from data_prep import omniglot
  from tests import image_files
  root = tmp_path_factory.mktemp("omniglot")
  image_files.small_archives(root / "raw")
  omniglot.prepare(omniglot.OmniglotPrepConfig(str(root / "raw"),
                                               str(root / "cache")))
  return root / "cache"
