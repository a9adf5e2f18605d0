"""bpfree: training neural networks without end-to-end backpropagation.

GrAPE (DFA with feedback matrices aligned to forward-mode Jacobian estimates) and the baselines it
is compared with, on one interface::

    import bpfree
    model = bpfree.models.create("mlp", (1, 28, 28), 10, widths=(256, 256))
    method = bpfree.methods.create("grape", model, rule="cosine", eta=0.05)
    stats = method.step(x, y, torch.nn.functional.cross_entropy)   # fills .grad
    optimizer.step()
"""

from . import methods, models
from .points import AttachError, FeedbackPoint, Head, attach, feedback_points

__version__ = "0.1.0"
__all__ = ["AttachError", "FeedbackPoint", "Head", "attach", "feedback_points", "methods", "models", "__version__"]
