"""crfm: task-oriented data synthesis for remote-sensing semantic segmentation.

Fine-tune SD3's MM-DiT on (image, mask, prompt) triples and synthesize new pairs with
control-rectify flow matching (arXiv 2512.16740).
"""

__version__ = "0.1.0"
