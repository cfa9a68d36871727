"""Paper stage (b): flow-matching sampling, control-rectify (CRFM), the mask-to-image pipeline and synthesis."""
