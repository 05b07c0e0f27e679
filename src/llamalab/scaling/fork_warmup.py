"""Imported by the sweep runner's fork server only (``runner.FORKSERVER_PRELOAD``): the first operation on the meta
device, where ``build_model`` builds every model, makes torch import its meta-tensor machinery (about 0.5 s).
Doing it once in the server, before any run is forked, saves every run that half second."""

import torch

torch.empty(1, device="meta").normal_()
