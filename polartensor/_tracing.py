"""Whether a call is being traced, so cached real tensors must not be handed out."""

from __future__ import annotations

import torch

__all__ = ["tracing"]


def tracing() -> bool:
    """True under torch.compile and whenever a FakeTensorMode is active.

    The second case matters: Dynamo runs some calls (e.g. a method of a tensor subclass) on
    fake tensors outside its own trace, where torch 2.11 reports ``is_compiling()`` False, and
    AOTAutograd traces with fake tensors too. A cached real tensor mixed into either fails with
    "Please convert all Tensors to FakeTensors first".
    """
    if torch.compiler.is_compiling():
        return True
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None
