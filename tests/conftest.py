"""Settings of the whole test session, made before any test module imports a library.

- No model hub: the tests build their own small models, and a test that asks the hub must fail
  at once. huggingface_hub reads HF_HUB_OFFLINE when it is first imported, so a test that sets
  it later is too late once another test has imported it.
- No W&B: img2dataset imports it; it must neither phone home nor write run folders.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
