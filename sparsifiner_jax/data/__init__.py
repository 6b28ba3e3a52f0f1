"""Input data: tfds pipelines (``input_pipeline``), per-example TF augmentation (``augment``), the bundled
digits dataset (``digits``) and the input options (``options``, importable without TensorFlow).

TensorFlow is only the input pipeline's engine here, so its C++ start-up notices (oneDNN, absl) are
silenced before it is imported, unless the user set these variables.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
