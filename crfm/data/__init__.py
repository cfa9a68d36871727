"""Paper stage (a), inputs: the dataset index, image–mask pairs, prompt vectors and their encoding."""
