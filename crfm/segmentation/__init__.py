"""Paper stages (b) and (c), segmentors: frozen mmseg guides and judges, mask fidelity, downstream training.

Nothing here is imported eagerly: only the modules that need mmseg import it.
"""
