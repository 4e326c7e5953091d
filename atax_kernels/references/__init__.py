"""Gradient-space references that persist across steps: the EMA fold of captured capability gradients
(:mod:`.ema`) and the stored orthonormal basis :class:`~atax_kernels.Subspace` (:mod:`.subspace`)."""
